"""The state writer's pure parts: ``reclaim_target`` as a table, and the in-memory
worker's unrolled ``start``/``complete`` leaving a task exactly as ``commit`` does."""

from __future__ import annotations

from typing import Any

import pytest

from background_tasks import TRANSITIONS, InvalidTransition, TaskStatus
from background_tasks._queue import ReadyQueue
from background_tasks._states import reclaim_target
from background_tasks._table import TaskTable
from background_tasks._task import Task
from background_tasks._writer import StateWriter

P, R, Y = TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.RETRYING
C, F, X = TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED


@pytest.mark.parametrize(
    ("interruptions", "max_recoveries", "cancel_requested", "target"),
    [
        (1, 5, False, P),
        (5, 5, False, P),  # at the bound: runs again
        (6, 5, False, F),  # past it: keeps killing its process
        (1, 0, False, F),
        (1, 5, True, X),  # a cancel asked for is honoured, not lost with the owner
        (9, 5, True, X),  # even past the bound
    ],
)
def test_reclaim_target(
    interruptions: int, max_recoveries: int, cancel_requested: bool, target: TaskStatus
) -> None:
    assert reclaim_target(interruptions, max_recoveries, cancel_requested) is target
    assert target in TRANSITIONS[R]


def test_the_table_is_read_only() -> None:
    with pytest.raises(TypeError):
        TRANSITIONS[C] = frozenset({P})  # type: ignore[index]


def _writer() -> StateWriter:
    return StateWriter(TaskTable(keep=10, journaled=False), ReadyQueue({}), None, "me", 5)


def _task(task_id: str) -> Task:
    return Task(task_id, "t", None, (), None, "default", 0, None, None, None, 1.0, 1.0)


def _state(task: Task) -> dict[str, Any]:
    """Every slot but the times, which the two paths read at different moments."""
    skip = {"id", "started_at", "finished_at", "waiters"}
    return {name: getattr(task, name) for name in Task.__slots__ if name not in skip}


@pytest.mark.parametrize("source", [P, Y])
def test_start_and_complete_equal_commit(source: TaskStatus) -> None:
    fast, slow = _writer(), _writer()
    a, b = _task("a"), _task("b")
    error = ValueError("x")
    for writer, task in ((fast, a), (slow, b)):
        writer.submitted(task)
        if source is Y:
            writer.commit(task, R, 2.0)
            writer.commit(task, Y, 3.0, error=error, retry_at=4.0)
    assert fast.start(a)
    slow.commit(b, R, 5.0)
    slow.table.running.add(b)
    assert _state(a) == _state(b)
    assert fast.table.running == {a}
    assert fast.table.counts == slow.table.counts
    fast.complete(a, 42)
    slow.table.running.discard(b)
    slow.commit(b, C, 6.0, result=42)
    assert _state(a) == _state(b)
    assert a.started_at is not None
    assert a.finished_at is not None
    assert a.started_at <= a.finished_at
    assert fast.table.counts == slow.table.counts
    assert fast.table.counts[C] == 1
    assert list(fast.table.finished) == [a]
    assert not fast.table.running


def test_start_refuses_a_task_that_is_not_waiting() -> None:
    writer = _writer()
    task = _task("a")
    writer.submitted(task)
    writer.commit(task, X, 2.0)
    assert not writer.start(task)
    assert task.status is X
    with pytest.raises(InvalidTransition):
        writer.complete(task, None)
