"""The state machine: the statuses, the one table of transitions, and every allowed
transition driven through the public API (on asyncio and trio)."""

from __future__ import annotations

import itertools
from collections.abc import MutableMapping
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from background_tasks import (
    TRANSITIONS,
    BackgroundTaskManager,
    InvalidTransition,
    RetryPolicy,
    TaskCancelled,
    TaskFailed,
    TaskStatus,
)
from background_tasks._states import check_transition

Logs = list[MutableMapping[str, Any]]

P, R, Y = TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.RETRYING
C, F, X = TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED

#: The table as the docs draw it (docs/reference/records.md); the code's must be exactly this.
EXPECTED = {
    (P, R),
    (P, X),
    (R, C),
    (R, F),
    (R, Y),
    (R, P),
    (R, X),
    (Y, R),
    (Y, X),
    (F, P),
    (X, P),
}
ALL_PAIRS = list(itertools.product(TaskStatus, TaskStatus))
FORBIDDEN = [pair for pair in ALL_PAIRS if pair not in EXPECTED]


# ------------------------------------------------------------------ the enum and the table


def test_members_and_values() -> None:
    assert [s.name for s in TaskStatus] == [
        "PENDING",
        "RUNNING",
        "RETRYING",
        "COMPLETED",
        "FAILED",
        "CANCELLED",
    ]
    for status in TaskStatus:
        assert isinstance(status, str)
        assert status.value == status.name.lower()
        assert str(status) == status.value
        assert TaskStatus(status.value) is status
    assert TaskStatus("pending") == "pending"


@pytest.mark.parametrize("status", list(TaskStatus), ids=str)
def test_is_terminal(status: TaskStatus) -> None:
    assert status.is_terminal is (status in {C, F, X})


def test_table_is_exactly_the_documented_one() -> None:
    actual = {(src, dst) for src, targets in TRANSITIONS.items() for dst in targets}
    assert actual == EXPECTED
    assert set(TRANSITIONS) == set(TaskStatus)
    assert TRANSITIONS[C] == frozenset()


@pytest.mark.parametrize(("source", "target"), sorted(EXPECTED), ids=lambda s: str(s))
def test_allowed_transition_passes(source: TaskStatus, target: TaskStatus) -> None:
    check_transition(source, target)  # no exception


@pytest.mark.parametrize(("source", "target"), FORBIDDEN, ids=lambda s: str(s))
def test_every_other_transition_raises(source: TaskStatus, target: TaskStatus) -> None:
    with pytest.raises(InvalidTransition) as info:
        check_transition(source, target)
    assert source.value in str(info.value)
    assert target.value in str(info.value)


def test_terminal_states_only_go_back_to_pending() -> None:
    for status in (C, F, X):
        assert TRANSITIONS[status] <= {P}
    # nothing leaves COMPLETED: a completed task never runs again
    for target in TaskStatus:
        with pytest.raises(InvalidTransition):
            check_transition(C, target)


def test_running_to_pending_is_allowed_for_interrupted_attempts() -> None:
    # Without a journal an interrupted attempt ends CANCELLED (see
    # test_shutdown_interrupts_running_without_journal); the journal tests drive
    # RUNNING -> PENDING through a real restart. Here: the table allows it.
    check_transition(R, P)
    assert P in TRANSITIONS[R]


# ------------------------------------------------------------------ each transition, live


def path(logs: Logs, task_id: str) -> list[tuple[str, str]]:
    return [
        (e["from"], e["to"])
        for e in logs
        if e["event"] == "task_transition" and e["task_id"] == task_id
    ]


NO_JITTER = RetryPolicy(max_attempts=2, base_delay=0.01, jitter=False)


@pytest.mark.anyio
async def test_pending_running_completed(debug_events: Logs) -> None:
    async def double(x: int) -> int:
        await anyio.lowlevel.checkpoint()
        return 2 * x

    async with BackgroundTaskManager() as manager:
        handle = await manager.submit(double, 21)
        assert await handle == 42
        record = await manager.get(handle.id)
    assert record is not None
    assert record.status is C
    assert path(debug_events, handle.id) == [("pending", "running"), ("running", "completed")]


@pytest.mark.anyio
async def test_pending_cancelled(debug_events: Logs) -> None:
    async def never() -> None:
        raise AssertionError("a cancelled pending task must not run")

    async with BackgroundTaskManager() as manager:
        handle = await manager.submit(never, delay=60)
        assert await manager.cancel(handle.id) is True
        with pytest.raises(TaskCancelled):
            await handle
        record = await manager.get(handle.id)
    assert record is not None
    assert record.status is X
    assert record.attempts == 0
    assert record.started_at is None
    assert record.finished_at is not None
    assert path(debug_events, handle.id) == [("pending", "cancelled")]


@pytest.mark.anyio
async def test_running_failed(debug_events: Logs) -> None:
    async def boom() -> None:
        raise ValueError("boom")

    async with BackgroundTaskManager() as manager:
        handle = await manager.submit(boom)
        with pytest.raises(TaskFailed):
            await handle
    assert path(debug_events, handle.id) == [("pending", "running"), ("running", "failed")]


@pytest.mark.anyio
async def test_running_retrying_running(debug_events: Logs) -> None:
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ValueError("first time")
        return "ok"

    async with BackgroundTaskManager() as manager:
        handle = await manager.submit(flaky, retry=NO_JITTER)
        assert await handle == "ok"
        record = await manager.get(handle.id)
    assert record is not None
    assert record.attempts == 2
    assert path(debug_events, handle.id) == [
        ("pending", "running"),
        ("running", "retrying"),
        ("retrying", "running"),
        ("running", "completed"),
    ]


@pytest.mark.anyio
async def test_running_cancelled(debug_events: Logs) -> None:
    started = anyio.Event()
    cleaned = False

    async def forever() -> None:
        nonlocal cleaned
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            cleaned = True

    async with BackgroundTaskManager() as manager:
        handle = await manager.submit(forever)
        await started.wait()
        assert await manager.cancel(handle.id) is True
        assert cleaned
        with pytest.raises(TaskCancelled):
            await handle
    assert path(debug_events, handle.id) == [("pending", "running"), ("running", "cancelled")]


@pytest.mark.anyio
async def test_retrying_cancelled(debug_events: Logs) -> None:
    async def boom() -> None:
        raise ValueError("boom")

    async with BackgroundTaskManager() as manager:
        policy = RetryPolicy(max_attempts=3, base_delay=60, jitter=False)
        handle = await manager.submit(boom, retry=policy)
        with anyio.fail_after(5):
            while True:
                record = await manager.get(handle.id)
                if record is not None and record.status is Y:
                    break
                await anyio.sleep(0.001)
        assert await handle.cancel() is True
        with pytest.raises(TaskCancelled):
            await handle
    assert path(debug_events, handle.id) == [
        ("pending", "running"),
        ("running", "retrying"),
        ("retrying", "cancelled"),
    ]


@pytest.mark.anyio
async def test_failed_pending_by_requeue(debug_events: Logs) -> None:
    fail = True

    async def sometimes() -> str:
        if fail:
            raise ValueError("boom")
        return "done"

    async with BackgroundTaskManager() as manager:
        handle = await manager.submit(sometimes)
        with pytest.raises(TaskFailed):
            await handle
        fail = False
        record = await manager.requeue(handle.id)
        assert record.status is P
        assert record.error is None
        assert record.attempts == 0
        assert await handle == "done"
    assert path(debug_events, handle.id) == [
        ("pending", "running"),
        ("running", "failed"),
        ("failed", "pending"),
        ("pending", "running"),
        ("running", "completed"),
    ]


@pytest.mark.anyio
async def test_cancelled_pending_by_requeue(debug_events: Logs) -> None:
    async def quick() -> int:
        return 7

    async with BackgroundTaskManager() as manager:
        handle = await manager.submit(quick, delay=60)
        await manager.cancel(handle.id)
        record = await manager.requeue(handle.id)
        assert record.status is P
        # requeue makes it due now (a fresh start), not 60 s later
        with anyio.fail_after(5):
            assert await handle == 7
    assert path(debug_events, handle.id) == [
        ("pending", "cancelled"),
        ("cancelled", "pending"),
        ("pending", "running"),
        ("running", "completed"),
    ]


@pytest.mark.anyio
async def test_shutdown_interrupts_running_without_journal(
    debug_events: Logs,
) -> None:
    started = anyio.Event()

    async def forever() -> None:
        started.set()
        await anyio.sleep_forever()

    manager = BackgroundTaskManager(shutdown_timeout=0.01)
    async with manager:
        handle = await manager.submit(forever)
        await started.wait()
    assert path(debug_events, handle.id) == [("pending", "running"), ("running", "cancelled")]


@pytest.mark.anyio
async def test_event_keys(debug_events: Logs) -> None:
    async def named() -> None:
        pass

    async with BackgroundTaskManager() as manager:
        handle = await manager.submit(named, queue="default")
        await handle
    transitions = [e for e in debug_events if e["event"] == "task_transition"]
    assert len(transitions) == 2
    for event in transitions:
        assert {"task_id", "name", "queue", "from", "to", "attempt"} <= set(event)
        assert event["task_id"] == handle.id
        assert event["name"].endswith("named")
        assert event["queue"] == "default"
        assert event["log_level"] == "debug"
    assert [e["attempt"] for e in transitions] == [1, 1]
