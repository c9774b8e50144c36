"""The in-memory manager: bounds, ordering, delays, keys, backpressure, queries, actions."""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

import anyio
import pytest
from support import C, F, P, R, X, Y, noop, wait_status

from background_tasks import (
    BackgroundTaskManager,
    ErrorInfo,
    InvalidTransition,
    QueueFull,
    RetryPolicy,
    TaskCancelled,
    TaskFailed,
    TaskHandle,
    TaskNotFound,
    TaskStatus,
    TaskTimeoutError,
    current_task,
)

pytestmark = pytest.mark.anyio


# ------------------------------------------------------------------ bounds


async def test_concurrency_bound() -> None:
    running = peak = 0

    async def work() -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await anyio.sleep(0.02)
        running -= 1

    async with BackgroundTaskManager(max_concurrency=3) as manager:
        handles = [await manager.submit(work) for _ in range(12)]
        for handle in handles:
            await handle
    assert peak == 3


async def test_concurrency_bound_counts_running_in_statistics() -> None:
    gate = anyio.Event()

    async def blocked() -> None:
        await gate.wait()

    async with BackgroundTaskManager(max_concurrency=2) as manager:
        handles = [await manager.submit(blocked) for _ in range(5)]
        await wait_status(manager, handles[1].id, R)
        await anyio.sleep(0.01)
        stats = manager.statistics()
        assert stats.running == 2
        assert stats.pending == 3
        assert stats.queued == 3
        gate.set()
        for handle in handles:
            await handle
        stats = manager.statistics()
        assert (stats.running, stats.pending, stats.queued, stats.completed) == (0, 0, 0, 5)


async def test_queue_limit() -> None:
    running = peak = 0

    async def work() -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await anyio.sleep(0.02)
        running -= 1

    async with BackgroundTaskManager(max_concurrency=4, queues={"emails": 2}) as manager:
        handles = [await manager.submit(work, queue="emails") for _ in range(8)]
        for handle in handles:
            await handle
    assert peak == 2


async def test_a_queue_at_its_limit_never_blocks_another() -> None:
    gate = anyio.Event()
    started: list[str] = []

    async def slow(tag: str) -> None:
        started.append(tag)
        await gate.wait()

    async def fast(tag: str) -> str:
        started.append(tag)
        return tag

    async with BackgroundTaskManager(max_concurrency=3, queues={"slow": 1}) as manager:
        # the slow queue's waiting task has the highest priority and was first in line
        s1 = await manager.submit(slow, "s1", queue="slow", priority=100)
        s2 = await manager.submit(slow, "s2", queue="slow", priority=100)
        f1 = await manager.submit(fast, "f1")
        f2 = await manager.submit(fast, "f2", priority=-5)
        with anyio.fail_after(5):
            assert await f1 == "f1"
            assert await f2 == "f2"
        record = await manager.get(s2.id)
        assert record is not None
        assert record.status is P
        assert started.count("s2") == 0
        gate.set()
        await s1
        await s2
    assert started.index("s1") < started.index("s2")


async def test_queue_limit_slot_is_released_after_failure_and_cancel() -> None:
    async def boom() -> None:
        raise ValueError("boom")

    started = anyio.Event()

    async def forever() -> None:
        started.set()
        await anyio.sleep_forever()

    async with BackgroundTaskManager(max_concurrency=2, queues={"q": 1}) as manager:
        with pytest.raises(TaskFailed):
            await (await manager.submit(boom, queue="q"))
        handle = await manager.submit(forever, queue="q")
        await started.wait()
        await handle.cancel()
        with anyio.fail_after(5):
            assert await (await manager.submit(_value, 3, queue="q")) == 3


async def _value(x: int) -> int:
    return x


# ------------------------------------------------------------------ ordering


async def test_priority_then_fifo() -> None:
    gate = anyio.Event()
    order: list[str] = []

    async def blocker() -> None:
        await gate.wait()

    async def record(tag: str) -> None:
        order.append(tag)

    async with BackgroundTaskManager(max_concurrency=1) as manager:
        first = await manager.submit(blocker)
        await wait_status(manager, first.id, R)
        handles = [
            await manager.submit(record, "low-a", priority=0),
            await manager.submit(record, "high-a", priority=5),
            await manager.submit(record, "low-b", priority=0),
            await manager.submit(record, "neg", priority=-3),
            await manager.submit(record, "high-b", priority=5),
            await manager.submit(record, "mid", priority=1),
            await manager.submit(record, "low-c"),
        ]
        gate.set()
        for handle in handles:
            await handle
    assert order == ["high-a", "high-b", "mid", "low-a", "low-b", "low-c", "neg"]


async def test_priority_across_queues() -> None:
    gate = anyio.Event()
    order: list[str] = []

    async def blocker() -> None:
        await gate.wait()

    async def record(tag: str) -> None:
        order.append(tag)

    async with BackgroundTaskManager(max_concurrency=1, queues={"a": 5, "b": 5}) as manager:
        first = await manager.submit(blocker)
        await wait_status(manager, first.id, R)
        handles = [
            await manager.submit(record, "a0", queue="a"),
            await manager.submit(record, "b9", queue="b", priority=9),
            await manager.submit(record, "d0"),
            await manager.submit(record, "a9", queue="a", priority=9),
        ]
        gate.set()
        for handle in handles:
            await handle
    assert order == ["b9", "a9", "a0", "d0"]


# ------------------------------------------------------------------ delay


@pytest.mark.parametrize("delay", [0.05, timedelta(milliseconds=50)], ids=["float", "timedelta"])
async def test_delay_is_not_started_before(delay: float | timedelta) -> None:
    started_at = 0.0

    async def mark() -> None:
        nonlocal started_at
        started_at = anyio.current_time()

    async with BackgroundTaskManager() as manager:
        before = anyio.current_time()
        handle = await manager.submit(mark, delay=delay)
        record = await manager.get(handle.id)
        assert record is not None
        assert record.status is P
        await handle
        record = await manager.get(handle.id)
    assert started_at - before >= 0.045
    assert record is not None
    assert record.started_at is not None
    assert record.scheduled_at >= record.created_at + timedelta(milliseconds=49)
    assert record.started_at >= record.scheduled_at - timedelta(milliseconds=5)


async def test_ready_work_runs_before_delayed_work() -> None:
    order: list[str] = []

    async def record(tag: str) -> None:
        order.append(tag)

    async with BackgroundTaskManager(max_concurrency=1) as manager:
        later = await manager.submit(record, "delayed", delay=0.03, priority=100)
        now = await manager.submit(record, "now", priority=-100)
        await later
        await now
    assert order == ["now", "delayed"]


async def test_delays_run_in_due_order() -> None:
    order: list[str] = []

    async def record(tag: str) -> None:
        order.append(tag)

    async with BackgroundTaskManager(max_concurrency=1) as manager:
        handles = [
            await manager.submit(record, "third", delay=0.06),
            await manager.submit(record, "first", delay=0.01),
            await manager.submit(record, "second", delay=0.03),
        ]
        for handle in handles:
            await handle
    assert order == ["first", "second", "third"]


async def test_zero_delay_runs_now() -> None:
    async with BackgroundTaskManager() as manager:
        assert await (await manager.submit(_value, 1, delay=0)) == 1
        assert await (await manager.submit(_value, 2, delay=timedelta(0))) == 2


# ------------------------------------------------------------------ idempotency keys


async def test_key_returns_the_unfinished_task() -> None:
    gate = anyio.Event()
    runs = 0

    async def once() -> int:
        nonlocal runs
        runs += 1
        await gate.wait()
        return runs

    async with BackgroundTaskManager() as manager:
        first = await manager.submit(once, key="k")
        again = await manager.submit(once, key="k")
        assert again.id == first.id
        assert again == first
        await wait_status(manager, first.id, R)
        while_running = await manager.submit(once, key="k", priority=3)
        assert while_running.id == first.id
        other = await manager.submit(noop, key="other")
        assert other.id != first.id
        gate.set()
        assert await again == 1
        # finished: the key is free again, a new task runs
        fresh = await manager.submit(once, key="k")
        assert fresh.id != first.id
        assert await fresh == 2
        record = await manager.get(fresh.id)
        assert record is not None
        assert record.key == "k"


async def test_key_is_free_after_cancel_and_failure() -> None:
    async def boom() -> None:
        raise ValueError("boom")

    async with BackgroundTaskManager() as manager:
        pending = await manager.submit(noop, key="k", delay=60)
        await manager.cancel(pending.id)
        failing = await manager.submit(boom, key="k")
        assert failing.id != pending.id
        with pytest.raises(TaskFailed):
            await failing
        ok = await manager.submit(noop, key="k")
        assert ok.id not in (pending.id, failing.id)
        await ok


async def test_key_survives_retries() -> None:
    gate = anyio.Event()

    async def flaky() -> str:
        if current_task().attempt == 1:
            raise ValueError("again")
        await gate.wait()
        return "done"

    async with BackgroundTaskManager() as manager:
        policy = RetryPolicy(max_attempts=3, base_delay=0.01, jitter=False)
        first = await manager.submit(flaky, key="k", retry=policy)
        # after the first failure: RETRYING, then RUNNING again (held by the gate)
        with anyio.fail_after(5):
            while True:
                record = await manager.get(first.id)
                assert record is not None
                if record.error is not None:
                    break
                await anyio.sleep(0.001)
        assert (await manager.submit(flaky, key="k")).id == first.id
        gate.set()
        assert await first == "done"


async def test_requeue_of_a_task_whose_key_is_taken() -> None:
    async def boom() -> None:
        raise ValueError("boom")

    async with BackgroundTaskManager() as manager:
        failed = await manager.submit(boom, key="k")
        with pytest.raises(TaskFailed):
            await failed
        holder = await manager.submit(noop, key="k", delay=60)
        with pytest.raises(InvalidTransition):
            await manager.requeue(failed.id)
        await manager.cancel(holder.id)
        record = await manager.requeue(failed.id)
        assert record.status is P
        # the requeued task holds the key again
        assert (await manager.submit(noop, key="k")).id == failed.id
        with pytest.raises(TaskFailed):
            await failed


# ------------------------------------------------------------------ max_pending


async def test_max_pending_counts_waiting_not_running() -> None:
    gate = anyio.Event()

    async def blocked() -> None:
        await gate.wait()

    async with BackgroundTaskManager(max_concurrency=1, max_pending=2) as manager:
        running = await manager.submit(blocked)
        await wait_status(manager, running.id, R)
        waiting = await manager.submit(blocked)
        delayed = await manager.submit(blocked, delay=60)  # delayed ones count too
        with pytest.raises(QueueFull):
            await manager.submit(blocked)
        # an idempotent resubmit is not a new task: no QueueFull
        keyed_stats = manager.statistics()
        assert keyed_stats.pending == 2
        assert await manager.cancel(delayed.id)
        extra = await manager.submit(blocked, key="x")
        assert (await manager.submit(blocked, key="x")).id == extra.id
        with pytest.raises(QueueFull):
            await manager.submit(blocked)
        gate.set()
        for handle in (running, waiting, extra):
            await handle
        # the manager keeps working
        assert await (await manager.submit(_value, 5)) == 5


async def test_max_pending_counts_retrying() -> None:
    async def boom() -> None:
        raise ValueError("boom")

    async with BackgroundTaskManager(max_pending=1) as manager:
        policy = RetryPolicy(max_attempts=2, base_delay=60, jitter=False)
        handle = await manager.submit(boom, retry=policy)
        await wait_status(manager, handle.id, Y)
        with pytest.raises(QueueFull):
            await manager.submit(noop)
        await handle.cancel()
        await (await manager.submit(noop))


# ------------------------------------------------------------------ get / list


async def test_get_unknown_is_none() -> None:
    async with BackgroundTaskManager() as manager:
        assert await manager.get("nope") is None


async def test_record_fields() -> None:
    async def work(a: int, b: str = "x") -> dict[str, Any]:
        return {"a": a, "b": b}

    async with BackgroundTaskManager() as manager:
        handle = await manager.submit(
            work, 1, kwargs={"b": "y"}, priority=4, key="kk", retry=RetryPolicy(max_attempts=4)
        )
        assert await handle == {"a": 1, "b": "y"}
        record = await manager.get(handle.id)
        assert record == await handle.record()
    assert record is not None
    assert record.id == handle.id
    assert record.name == work.__qualname__
    assert record.queue == "default"
    assert record.status is C
    assert record.priority == 4
    assert record.args == (1,)
    assert record.kwargs == {"b": "y"}
    assert record.key == "kk"
    assert record.attempts == 1
    assert record.max_attempts == 4
    assert record.result == {"a": 1, "b": "y"}
    assert record.error is None
    assert record.progress is None
    for ts in (record.created_at, record.scheduled_at, record.started_at, record.finished_at):
        assert ts is not None
        assert ts.tzinfo is not None
        assert ts.utcoffset() == timedelta(0)
    assert record.started_at is not None
    assert record.finished_at is not None
    assert record.created_at <= record.started_at <= record.finished_at
    with pytest.raises(ValueError, match="frozen"):
        record.status = F
    assert record.created_at.tzinfo is not None


async def test_ids_are_unique_and_sorted_by_creation() -> None:
    async with BackgroundTaskManager() as manager:
        handles = [await manager.submit(noop) for _ in range(50)]
        ids = [h.id for h in handles]
        for handle in handles:
            await handle
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(isinstance(i, str) for i in ids)


async def test_list_newest_first_filters_and_limit() -> None:
    async def boom() -> None:
        raise ValueError("boom")

    async def other() -> None:
        pass

    async with BackgroundTaskManager(queues={"q": 2}) as manager:
        a = await manager.submit(noop)
        b = await manager.submit(boom)
        c = await manager.submit(other, queue="q")
        d = await manager.submit(noop, delay=60)
        for handle in (a, c):
            await handle
        with pytest.raises(TaskFailed):
            await b

        def ids(records: list[Any]) -> list[str]:
            return [r.id for r in records]

        assert ids(await manager.list()) == [d.id, c.id, b.id, a.id]
        assert ids(await manager.list(limit=2)) == [d.id, c.id]
        assert await manager.list(limit=0) == []
        assert ids(await manager.list(status=F)) == [b.id]
        assert ids(await manager.list(status="failed")) == [b.id]
        assert ids(await manager.list(status="FAILED")) == [b.id]
        assert ids(await manager.list(status=P)) == [d.id]
        assert ids(await manager.list(status=C)) == [c.id, a.id]
        assert ids(await manager.list(queue="q")) == [c.id]
        assert ids(await manager.list(queue="default")) == [d.id, b.id, a.id]
        assert ids(await manager.list(name=noop.__qualname__)) == [d.id, a.id]
        assert ids(await manager.list(name=noop.__qualname__, status=C)) == [a.id]
        assert await manager.list(queue="nowhere") == []
        with pytest.raises(ValueError, match="bogus"):
            await manager.list(status="bogus")
        with pytest.raises(ValueError, match="limit"):
            await manager.list(limit=-1)
        await manager.cancel(d.id)


# ------------------------------------------------------------------ cancel


async def test_cancel_outcomes() -> None:
    async with BackgroundTaskManager() as manager:
        done = await manager.submit(noop)
        await done
        assert await manager.cancel(done.id) is False
        assert await manager.cancel("unknown") is False
        pending = await manager.submit(noop, delay=60)
        assert await manager.cancel(pending.id) is True
        assert await manager.cancel(pending.id) is False  # already finished
        record = await manager.get(pending.id)
        assert record is not None
        assert record.status is X
        record = await manager.get(done.id)
        assert record is not None
        assert record.status is C


async def test_cancel_pending_behind_a_full_worker_pool() -> None:
    gate = anyio.Event()
    ran: list[str] = []

    async def blocked() -> None:
        await gate.wait()

    async def work(tag: str) -> None:
        ran.append(tag)

    async with BackgroundTaskManager(max_concurrency=1) as manager:
        first = await manager.submit(blocked)
        await wait_status(manager, first.id, R)
        victim = await manager.submit(work, "victim")
        survivor = await manager.submit(work, "survivor")
        assert await victim.cancel() is True
        assert manager.statistics().queued == 1
        gate.set()
        await survivor
        with pytest.raises(TaskCancelled) as info:
            await victim
    assert ran == ["survivor"]
    assert info.value.task_id == victim.id


async def test_cancel_running_runs_finally_blocks() -> None:
    started = anyio.Event()
    steps: list[str] = []

    async def forever() -> None:
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            steps.append("finally")
            with anyio.CancelScope(shield=True):
                await anyio.sleep(0.001)
            steps.append("cleanup done")

    async with BackgroundTaskManager() as manager:
        handle = await manager.submit(forever)
        await started.wait()
        assert await manager.cancel(handle.id) is True
        # cancel returns once CANCELLED is recorded, after the finally blocks ran
        assert steps == ["finally", "cleanup done"]
        record = await manager.get(handle.id)
        assert record is not None
        assert record.status is X
        assert record.attempts == 1
        assert record.finished_at is not None
        with pytest.raises(TaskCancelled):
            await handle
        # the worker slot is free again
        assert await (await manager.submit(_value, 9)) == 9


async def test_cancel_running_that_raises_while_cancelled_is_cancelled() -> None:
    started = anyio.Event()

    async def messy() -> None:
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            raise RuntimeError("cleanup failed")

    async with BackgroundTaskManager() as manager:
        handle = await manager.submit(messy, retry=RetryPolicy(max_attempts=3, base_delay=0))
        await started.wait()
        assert await handle.cancel() is True
        with pytest.raises(TaskCancelled):
            await handle
        record = await manager.get(handle.id)
        assert record is not None
        assert record.status is X
        assert record.attempts == 1


async def test_cancel_running_that_swallows_cancellation_is_cancelled() -> None:
    started = anyio.Event()

    async def stubborn() -> str:
        started.set()
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            return "ignored you"
        return "unreachable"

    async with BackgroundTaskManager() as manager:
        handle = await manager.submit(stubborn)
        await started.wait()
        assert await handle.cancel() is True
        with pytest.raises(TaskCancelled):
            await handle


async def test_cancel_retrying() -> None:
    calls = 0

    async def boom() -> None:
        nonlocal calls
        calls += 1
        raise ValueError("boom")

    async with BackgroundTaskManager() as manager:
        policy = RetryPolicy(max_attempts=5, base_delay=0.1, jitter=False)
        handle = await manager.submit(boom, retry=policy)
        await wait_status(manager, handle.id, Y)
        assert await manager.cancel(handle.id) is True
        with pytest.raises(TaskCancelled):
            await handle
        await anyio.sleep(0.15)  # past the backoff: it must not run again
        record = await manager.get(handle.id)
    assert calls == 1
    assert record is not None
    assert record.status is X
    assert record.attempts == 1
    assert record.error is not None
    assert record.error.type == "ValueError"


# ------------------------------------------------------------------ requeue


async def test_requeue_errors() -> None:
    gate = anyio.Event()

    async def blocked() -> None:
        await gate.wait()

    async with BackgroundTaskManager(max_concurrency=1) as manager:
        with pytest.raises(TaskNotFound) as info:
            await manager.requeue("missing")
        assert isinstance(info.value, KeyError)
        assert "missing" in str(info.value)
        running = await manager.submit(blocked)
        await wait_status(manager, running.id, R)
        pending = await manager.submit(noop)
        for handle in (running, pending):
            with pytest.raises(InvalidTransition):
                await manager.requeue(handle.id)
        gate.set()
        await running
        await pending
        with pytest.raises(InvalidTransition):
            await manager.requeue(running.id)  # COMPLETED never runs again
        # all of that changed nothing
        record = await manager.get(running.id)
        assert record is not None
        assert record.status is C
        assert record.attempts == 1


async def test_requeue_gives_a_fresh_set_of_attempts() -> None:
    calls = 0

    async def boom() -> None:
        nonlocal calls
        calls += 1
        raise ValueError(f"boom {calls}")

    async with BackgroundTaskManager() as manager:
        policy = RetryPolicy(max_attempts=2, base_delay=0, jitter=False)
        handle = await manager.submit(boom, retry=policy)
        with pytest.raises(TaskFailed):
            await handle
        assert calls == 2
        record = await manager.requeue(handle.id)
        assert record.status is P
        assert record.attempts == 0
        assert record.error is None
        assert record.result is None
        assert record.started_at is None
        assert record.finished_at is None
        with pytest.raises(TaskFailed) as info:
            await handle
        assert calls == 4
        assert info.value.error.message == "boom 4"
        final = await manager.get(handle.id)
        assert final is not None
        assert final.attempts == 2


# ------------------------------------------------------------------ statistics


async def test_statistics() -> None:
    async def boom() -> None:
        raise ValueError("boom")

    async with BackgroundTaskManager() as manager:
        empty = manager.statistics()
        assert (empty.pending, empty.running, empty.retrying, empty.queued) == (0, 0, 0, 0)
        assert (empty.completed, empty.failed, empty.cancelled) == (0, 0, 0)
        ok = [await manager.submit(noop) for _ in range(3)]
        bad = await manager.submit(boom)
        later = await manager.submit(noop, delay=60)
        cancelled = await manager.submit(noop, delay=60)
        await manager.cancel(cancelled.id)
        for handle in ok:
            await handle
        with pytest.raises(TaskFailed):
            await bad
        stats = manager.statistics()
        assert stats.completed == 3
        assert stats.failed == 1
        assert stats.cancelled == 1
        assert stats.pending == 1
        assert stats.queued == 1
        assert stats.running == 0
        assert stats["completed"] == 3
        with pytest.raises(KeyError, match="nope"):
            stats["nope"]
        assert stats[TaskStatus.FAILED] == 1
        assert stats.by_status[TaskStatus.PENDING] == 1
        assert sum(stats.by_status.values()) == 6
        await later.cancel()


# ------------------------------------------------------------------ retention


async def test_keep_finished_evicts_oldest() -> None:
    async with BackgroundTaskManager(keep_finished=3) as manager:
        handles = [await manager.submit(_value, i) for i in range(6)]
        results = [await h for h in handles]
        assert results == list(range(6))
        for old in handles[:3]:
            assert await manager.get(old.id) is None
        for kept in handles[3:]:
            assert await manager.get(kept.id) is not None
        assert [r.id for r in await manager.list()] == [h.id for h in reversed(handles[3:])]
        # a handle always yields its own task's outcome, even once evicted
        assert await handles[0] == 0
        # an evicted id is unknown now
        assert await manager.cancel(handles[0].id) is False
        with pytest.raises(TaskNotFound):
            await manager.requeue(handles[0].id)


async def test_keep_finished_zero_never_evicts_unfinished() -> None:
    async with BackgroundTaskManager(keep_finished=0) as manager:
        waiting = await manager.submit(noop, delay=60)
        done = await manager.submit(_value, 1)
        assert await done == 1
        assert await manager.get(done.id) is None
        assert await manager.get(waiting.id) is not None
        assert await manager.cancel(waiting.id)
        assert await manager.get(waiting.id) is None
        with pytest.raises(TaskCancelled):
            await waiting


# ------------------------------------------------------------------ timeouts


async def test_timeout_fails_with_task_timeout_error() -> None:
    async def sleepy() -> None:
        await anyio.sleep(10)

    async with BackgroundTaskManager() as manager:
        handle = await manager.submit(sleepy, timeout=0.02)
        with pytest.raises(TaskFailed) as info:
            await handle
        record = await manager.get(handle.id)
    assert isinstance(info.value.__cause__, TaskTimeoutError)
    assert isinstance(info.value.__cause__, TimeoutError)
    assert info.value.error.type.endswith("TaskTimeoutError")
    assert record is not None
    assert record.status is F
    assert record.attempts == 1
    assert record.error == info.value.error


async def test_timeout_is_retried_when_retry_on_covers_it() -> None:
    calls = 0

    async def slow_then_fast() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            await anyio.sleep(10)
        return "made it"

    async with BackgroundTaskManager() as manager:
        policy = RetryPolicy(max_attempts=3, base_delay=0, jitter=False, retry_on=(TimeoutError,))
        handle = await manager.submit(slow_then_fast, timeout=0.02, retry=policy)
        assert await handle == "made it"
        record = await manager.get(handle.id)
    assert record is not None
    assert record.attempts == 3


async def test_timeout_not_retried_when_retry_on_does_not_cover_it() -> None:
    async def sleepy() -> None:
        await anyio.sleep(10)

    async with BackgroundTaskManager() as manager:
        policy = RetryPolicy(max_attempts=3, base_delay=0, retry_on=(ValueError,))
        handle = await manager.submit(sleepy, timeout=0.02, retry=policy)
        with pytest.raises(TaskFailed):
            await handle
        record = await manager.get(handle.id)
    assert record is not None
    assert record.attempts == 1


async def test_a_task_raising_timeout_error_itself_is_not_a_task_timeout() -> None:
    async def raises() -> None:
        raise TimeoutError("my own")

    async with BackgroundTaskManager() as manager:
        handle = await manager.submit(raises, timeout=5)
        with pytest.raises(TaskFailed) as info:
            await handle
    assert type(info.value.__cause__) is TimeoutError
    assert info.value.error.type == "TimeoutError"


async def test_timeout_of_an_inner_scope_is_an_ordinary_error() -> None:
    async def inner() -> None:
        with anyio.fail_after(0.001):
            await anyio.sleep(1)

    async with BackgroundTaskManager() as manager:
        handle = await manager.submit(inner, timeout=5)
        with pytest.raises(TaskFailed) as info:
            await handle
    assert isinstance(info.value.__cause__, TimeoutError)
    assert not isinstance(info.value.__cause__, TaskTimeoutError)


# ------------------------------------------------------------------ retries


async def test_retry_waits_at_least_its_backoff() -> None:
    times: list[float] = []

    async def boom() -> None:
        times.append(anyio.current_time())
        raise ValueError("boom")

    async with BackgroundTaskManager() as manager:
        policy = RetryPolicy(max_attempts=3, base_delay=0.02, multiplier=2, jitter=False)
        handle = await manager.submit(boom, retry=policy)
        with pytest.raises(TaskFailed):
            await handle
        record = await manager.get(handle.id)
    assert len(times) == 3
    assert times[1] - times[0] >= 0.019
    assert times[2] - times[1] >= 0.039
    assert record is not None
    assert record.attempts == 3
    assert record.max_attempts == 3


async def test_retry_on_filters_live() -> None:
    calls = 0

    async def boom() -> None:
        nonlocal calls
        calls += 1
        raise KeyError("not retried")

    async with BackgroundTaskManager() as manager:
        policy = RetryPolicy(max_attempts=5, base_delay=0, retry_on=(ValueError,))
        with pytest.raises(TaskFailed) as info:
            await (await manager.submit(boom, retry=policy))
    assert calls == 1
    assert info.value.error.type == "KeyError"


async def test_retrying_record_keeps_the_last_error() -> None:
    async def boom() -> None:
        raise ValueError("first")

    async with BackgroundTaskManager() as manager:
        policy = RetryPolicy(max_attempts=2, base_delay=60, jitter=False)
        handle = await manager.submit(boom, retry=policy)
        await wait_status(manager, handle.id, Y)
        record = await manager.get(handle.id)
        assert record is not None
        assert record.error is not None
        assert record.error.message == "first"
        assert record.scheduled_at > record.created_at + timedelta(seconds=59)
        stats = manager.statistics()
        assert stats.retrying == 1
        assert stats.queued == 1
        await handle.cancel()


# ------------------------------------------------------------------ outcomes and handles


class CustomError(Exception):
    pass


async def test_task_failed_carries_error_and_cause() -> None:
    original = CustomError("it broke")

    async def boom() -> None:
        raise original

    async with BackgroundTaskManager() as manager:
        handle = await manager.submit(boom)
        with pytest.raises(TaskFailed) as info:
            await handle
        # awaiting again gives the same outcome
        with pytest.raises(TaskFailed) as again:
            await handle
    failure = info.value
    assert failure.__cause__ is original
    assert again.value.__cause__ is original
    assert isinstance(failure.error, ErrorInfo)
    assert failure.error.type == f"{__name__}.CustomError"
    assert failure.error.message == "it broke"
    assert failure.error.traceback is not None
    assert "it broke" in failure.error.traceback
    assert failure.task_id == handle.id
    assert handle.id in str(failure)


async def test_result_timeout_leaves_the_task_running() -> None:
    gate = anyio.Event()

    async def slow() -> str:
        await gate.wait()
        return "late"

    async with BackgroundTaskManager() as manager:
        handle = await manager.submit(slow)
        with pytest.raises(TimeoutError):
            await handle.result(timeout=0.02)
        record = await manager.get(handle.id)
        assert record is not None
        assert record.status is R
        gate.set()
        assert await handle.result(timeout=5) == "late"
        assert await handle.result() == "late"


async def test_cancelling_the_awaiter_never_cancels_the_task() -> None:
    gate = anyio.Event()

    async def slow() -> str:
        await gate.wait()
        return "finished"

    async with BackgroundTaskManager() as manager:
        handle = await manager.submit(slow)
        got: list[object] = []

        async def awaiter() -> None:
            got.append(await handle)

        async with anyio.create_task_group() as tg:
            tg.start_soon(awaiter)
            await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
        assert got == []
        with anyio.move_on_after(0.01):
            await handle  # another awaiter, cancelled by a timeout
        record = await manager.get(handle.id)
        assert record is not None
        assert record.status is R
        gate.set()
        assert await handle == "finished"


async def test_many_awaiters_get_the_same_outcome() -> None:
    gate = anyio.Event()

    async def slow() -> int:
        await gate.wait()
        return 11

    async with BackgroundTaskManager() as manager:
        handle = await manager.submit(slow)
        results: list[int] = []

        async def awaiter() -> None:
            results.append(await handle)

        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(awaiter)
            await anyio.sleep(0.01)
            gate.set()
    assert results == [11] * 5


async def test_handle_basics() -> None:
    async with BackgroundTaskManager() as manager:
        handle = await manager.submit(_value, 4)
        assert isinstance(handle, TaskHandle)
        assert handle.id in repr(handle)
        same = manager.handle(handle.id)
        assert same == handle
        assert hash(same) == hash(handle)
        assert same != object()
        assert await same == 4
        with pytest.raises(TaskNotFound):
            await manager.handle("nope")
        assert await manager.handle("nope").record() is None
        assert await manager.handle("nope").cancel() is False


async def test_returns_any_value() -> None:
    sentinel = object()

    async def give() -> object:
        return sentinel

    async with BackgroundTaskManager() as manager:
        # without a journal, results need not be JSON
        assert await (await manager.submit(give)) is sentinel
        assert await (await manager.submit(_value, math.pi)) == math.pi
