"""Random programs of submit / cancel / requeue / sleep over ok, failing, flaky, slow and
timing-out tasks, run on asyncio and trio: the bounds hold, every handle resolves,
statuses move only along the table, and times are ordered."""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import event as note_event
from hypothesis import strategies as st

from background_tasks import (
    BackgroundTaskManager,
    InvalidTransition,
    QueueFull,
    RetryPolicy,
    TaskCancelled,
    TaskFailed,
    TaskHandle,
    TaskStatus,
    current_task,
)
from background_tasks._states import TRANSITIONS

MAX_CONCURRENCY = 3
QUEUE_LIMIT = 1  # queue "q"
MAX_PENDING = 8
KINDS = ("ok", "fail", "flaky", "slow", "timeout")

submit_op = st.tuples(
    st.just("submit"),
    st.sampled_from(KINDS),
    st.integers(-2, 2),  # priority
    st.sampled_from(["default", "q"]),
    st.sampled_from([None, 0.002]),  # delay
    st.sampled_from([None, "k1", "k2"]),  # idempotency key
    st.booleans(),  # with retries
)
cancel_op = st.tuples(st.just("cancel"), st.integers(0, 40))
requeue_op = st.tuples(st.just("requeue"), st.integers(0, 40))
sleep_op = st.tuples(st.just("sleep"), st.sampled_from([0, 0.001, 0.004]))
programs = st.lists(
    st.one_of(submit_op, submit_op, submit_op, cancel_op, requeue_op, sleep_op),
    min_size=1,
    max_size=40,
)


@dataclass
class Observed:
    running: int = 0
    peak: int = 0
    per_queue: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    queue_peak: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    attempts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    pending_peak: int = 0


async def run_program(program: list[tuple[Any, ...]], exit_early: bool) -> None:
    seen = Observed()

    async def body(kind: str) -> str:
        ctx = current_task()
        seen.running += 1
        seen.peak = max(seen.peak, seen.running)
        seen.per_queue[ctx.queue] += 1
        seen.queue_peak[ctx.queue] = max(seen.queue_peak[ctx.queue], seen.per_queue[ctx.queue])
        seen.attempts[ctx.id] += 1
        try:
            await anyio.lowlevel.checkpoint()
            if kind == "fail":
                raise ValueError("fail")
            if kind == "flaky" and ctx.attempt == 1:
                raise ValueError("flaky")
            if kind == "slow":
                await anyio.sleep(0.005)
            if kind == "timeout":
                await anyio.sleep(1)
            return kind
        finally:
            seen.running -= 1
            seen.per_queue[ctx.queue] -= 1

    retry = RetryPolicy(max_attempts=2, base_delay=0.001, jitter=True)
    manager = BackgroundTaskManager(
        max_concurrency=MAX_CONCURRENCY,
        queues={"q": QUEUE_LIMIT},
        max_pending=MAX_PENDING,
        shutdown_timeout=0.01,
    )
    handles: list[TaskHandle[Any]] = []
    with structlog.testing.capture_logs() as logs:
        async with manager:
            for op in program:
                if op[0] == "submit":
                    _, kind, priority, queue, delay, key, retried = op
                    try:
                        handle = await manager.submit(
                            body,
                            kind,
                            queue=queue,
                            priority=priority,
                            delay=delay,
                            key=key,
                            timeout=0.003 if kind == "timeout" else None,
                            retry=retry if retried else None,
                        )
                    except QueueFull:
                        stats = manager.statistics()
                        assert stats.pending + stats.retrying >= MAX_PENDING
                        continue
                    handles.append(handle)
                elif op[0] == "cancel" and handles:
                    await manager.cancel(handles[op[1] % len(handles)].id)
                elif op[0] == "requeue" and handles:
                    with contextlib.suppress(InvalidTransition):
                        await manager.requeue(handles[op[1] % len(handles)].id)
                elif op[0] == "sleep":
                    await anyio.sleep(op[1])
                stats = manager.statistics()
                seen.pending_peak = max(seen.pending_peak, stats.pending + stats.retrying)
                assert stats.running <= MAX_CONCURRENCY
            if not exit_early:
                with anyio.fail_after(10):
                    for handle in handles:
                        await _outcome(handle)
        # after exit every handle resolves at once: nothing is left waiting
        with anyio.fail_after(1):
            outcomes = {h.id: await _outcome(h) for h in handles}

    for outcome in outcomes.values():
        note_event(outcome)
    note_event(f"peak {seen.peak}")

    # ---- the bounds
    assert seen.peak <= MAX_CONCURRENCY
    assert seen.queue_peak["q"] <= QUEUE_LIMIT
    assert seen.running == 0
    assert seen.pending_peak <= MAX_PENDING

    # ---- every handle resolved to what its record says
    records = {r.id: r for r in await manager.list(limit=10_000)}
    assert set(outcomes) <= set(records)
    for task_id, outcome in outcomes.items():
        record = records[task_id]
        assert record.status.is_terminal
        expected = {
            TaskStatus.COMPLETED: "result",
            TaskStatus.FAILED: "failed",
            TaskStatus.CANCELLED: "cancelled",
        }[record.status]
        assert outcome == expected, (record, outcome)
        assert record.attempts <= record.max_attempts

    # ---- statistics agree with the records
    stats = manager.statistics()
    assert stats.running == stats.pending == stats.retrying == stats.queued == 0
    for status in TaskStatus:
        assert stats.by_status[status] == sum(r.status is status for r in records.values())

    # ---- statuses moved only along the table, one event per transition
    paths: dict[str, list[tuple[TaskStatus, TaskStatus]]] = defaultdict(list)
    for event in logs:
        if event["event"] == "task_transition":
            paths[event["task_id"]].append((TaskStatus(event["from"]), TaskStatus(event["to"])))
    for task_id, record in records.items():
        path = paths[task_id]
        assert path, f"no transitions for {task_id}"
        assert path[0][0] is TaskStatus.PENDING
        for (_, to), (source, _) in itertools.pairwise(path):
            assert to is source, path
        for source, target in path:
            assert target in TRANSITIONS[source], path
        assert path[-1][1] is record.status
        # attempts that actually ran are the RUNNING transitions (requeue resets the count)
        runs = sum(target is TaskStatus.RUNNING for _, target in path)
        assert runs == seen.attempts[task_id]

        # ---- times
        assert record.created_at <= record.scheduled_at
        if record.started_at is not None:
            assert record.created_at <= record.started_at
            assert record.finished_at is not None
            assert record.started_at <= record.finished_at
        if record.finished_at is not None:
            assert record.created_at <= record.finished_at


async def _outcome(handle: TaskHandle[Any]) -> str:
    try:
        await handle
    except TaskFailed:
        return "failed"
    except TaskCancelled:
        return "cancelled"
    return "result"


@pytest.fixture
def debug_level() -> Any:
    logger = logging.getLogger("background_tasks")
    old = logger.level
    logger.setLevel(logging.DEBUG)
    yield
    logger.setLevel(old)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(program=programs, exit_early=st.sampled_from([False, False, True]))
def test_random_programs(
    backend: str, debug_level: None, program: list[tuple[Any, ...]], exit_early: bool
) -> None:
    anyio.run(run_program, program, exit_early, backend=backend)
