"""Edge cases of the in-memory manager: odd task behaviour, shutdown races, purge."""

from __future__ import annotations

import contextlib
import sys
from datetime import timedelta

import anyio
import pytest
from support import C, R, X, noop, wait_status

from background_tasks import (
    BackgroundTaskManager,
    ManagerNotRunning,
    TaskCancelled,
    TaskFailed,
    TaskRegistry,
    current_task,
)

pytestmark = pytest.mark.anyio


async def stopped(manager: BackgroundTaskManager) -> None:
    """Wait until the manager has begun shutting down."""
    with anyio.fail_after(5):
        while True:
            if not manager.running:
                return
            await anyio.sleep(0.001)


async def value(x: int) -> int:
    return x


# ------------------------------------------------------------------ odd tasks


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str for you")


async def test_an_unprintable_exception_still_fails_the_task() -> None:
    async def boom() -> None:
        raise Unprintable()

    async with BackgroundTaskManager(max_concurrency=1) as manager:
        handle = await manager.submit(boom)
        with anyio.fail_after(0.5), pytest.raises(TaskFailed) as info:
            await handle
        assert info.value.error.type.endswith("Unprintable")
        assert await (await manager.submit(value, 1)) == 1


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio only")
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_task_raising_cancelled_error_itself(anyio_backend: str) -> None:
    import asyncio

    async def rogue() -> None:
        raise asyncio.CancelledError()

    manager = BackgroundTaskManager(max_concurrency=1)
    escaped: list[BaseException] = []
    try:
        async with manager:
            handle = await manager.submit(rogue)
            with anyio.fail_after(2), contextlib.suppress(TaskFailed, TaskCancelled):
                await handle
            assert await (await manager.submit(value, 1)) == 1
    except BaseException as exc:
        escaped.append(exc)
        current = asyncio.current_task()
        assert current is not None
        current.uncancel()
    assert escaped == []
    record = await manager.get(handle.id)
    assert record is not None
    assert record.status.is_terminal


async def test_a_task_cancelling_itself() -> None:
    manager = BackgroundTaskManager()

    async def self_cancel() -> None:
        await manager.cancel(current_task().id)
        raise AssertionError("not reached")

    async with manager:
        handle = await manager.submit(self_cancel)
        with pytest.raises(TaskCancelled):
            await handle
        assert await (await manager.submit(value, 2)) == 2


async def test_a_task_submitting_tasks() -> None:
    manager = BackgroundTaskManager(max_concurrency=2)

    async def parent(n: int) -> int:
        children = [await manager.submit(value, i) for i in range(n)]
        return sum([await child for child in children])

    async with manager:
        assert await (await manager.submit(parent, 5)) == 10


async def test_cancel_while_awaited_resolves_every_awaiter() -> None:
    started = anyio.Event()

    async def forever() -> None:
        started.set()
        await anyio.sleep_forever()

    outcomes: list[str] = []
    async with BackgroundTaskManager() as manager:
        handle = await manager.submit(forever)
        await started.wait()

        async def awaiter() -> None:
            try:
                await handle
            except TaskCancelled:
                outcomes.append("cancelled")

        async with anyio.create_task_group() as tg:
            tg.start_soon(awaiter)
            tg.start_soon(awaiter)
            await anyio.sleep(0.01)
            assert await manager.cancel(handle.id) is True
    assert outcomes == ["cancelled", "cancelled"]


async def test_concurrent_cancels_of_one_running_task() -> None:
    started = anyio.Event()

    async def forever() -> None:
        started.set()
        await anyio.sleep_forever()

    results: list[bool] = []
    async with BackgroundTaskManager() as manager:
        handle = await manager.submit(forever)
        await started.wait()

        async def cancel() -> None:
            results.append(await manager.cancel(handle.id))

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(cancel)
        record = await manager.get(handle.id)
    assert True in results
    assert record is not None
    assert record.status is X


async def test_a_timeout_swallowed_then_raising_is_a_timeout() -> None:
    async def stubborn() -> None:
        try:
            await anyio.sleep(10)
        except anyio.get_cancelled_exc_class():
            raise ValueError("cleanup noise") from None

    async with BackgroundTaskManager() as manager:
        handle = await manager.submit(stubborn, timeout=0.01)
        with pytest.raises(TaskFailed) as info:
            await handle
    assert info.value.error.type.endswith("TaskTimeoutError")


async def test_worker_survives_many_timeouts_and_cancels() -> None:
    # each timeout or cancel uses up a worker's cancel scope: the pool must keep its size
    running = peak = 0

    async def sleepy() -> None:
        await anyio.sleep(10)

    async def work() -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await anyio.sleep(0.02)
        running -= 1

    async with BackgroundTaskManager(max_concurrency=2) as manager:
        for _ in range(4):
            await manager.submit(sleepy, timeout=0.005)
        started = [await manager.submit(sleepy) for _ in range(2)]
        for handle in started:
            await wait_status(manager, handle.id, R, within=5)
            await handle.cancel()
        handles = [await manager.submit(work) for _ in range(6)]
        with anyio.fail_after(5):
            for handle in handles:
                await handle
    assert peak == 2


# ------------------------------------------------------------------ shutdown races


async def test_no_new_work_starts_during_the_shutdown_window() -> None:
    started = anyio.Event()
    ran: list[str] = []

    async def short() -> None:
        started.set()
        await anyio.sleep(0.03)

    async def later() -> None:
        ran.append("later")

    manager = BackgroundTaskManager(max_concurrency=1, shutdown_timeout=5)
    async with manager:
        first = await manager.submit(short)
        queued = await manager.submit(later)
        await started.wait()
    assert ran == []
    await first
    record = await manager.get(first.id)
    assert record is not None
    assert record.status is C
    with pytest.raises(TaskCancelled):
        await queued


async def test_submit_while_closing_is_refused() -> None:
    started = anyio.Event()
    outcome: list[str] = []
    manager = BackgroundTaskManager(shutdown_timeout=5)

    async def submitter() -> None:
        started.set()
        await stopped(manager)
        try:
            await manager.submit(noop)
            outcome.append("accepted")
        except ManagerNotRunning:
            outcome.append("refused")

    async with manager:
        handle = await manager.submit(submitter)
        await started.wait()
    assert outcome == ["refused"]
    record = await manager.get(handle.id)
    assert record is not None
    assert record.status is C


async def test_awaiting_during_the_shutdown_window_gets_the_outcome() -> None:
    started = anyio.Event()
    results: list[object] = []

    async def short() -> str:
        started.set()
        await anyio.sleep(0.05)
        return "done"

    manager = BackgroundTaskManager(shutdown_timeout=5)
    async with anyio.create_task_group() as tg, manager:
        handle = await manager.submit(short)
        await started.wait()

        async def late_awaiter() -> None:
            await stopped(manager)
            try:
                results.append(await handle)
            except ManagerNotRunning as exc:
                results.append(exc)

        tg.start_soon(late_awaiter)
        await anyio.sleep(0.005)
    assert results == ["done"]


# ------------------------------------------------------------------ purge, history


async def test_purge_in_memory() -> None:
    async with BackgroundTaskManager() as manager:
        done = [await manager.submit(value, i) for i in range(3)]
        for handle in done:
            await handle
        waiting = await manager.submit(noop, delay=60)
        assert await manager.purge(timedelta(hours=1)) == 0
        assert await manager.purge(3600) == 0
        assert len(await manager.list()) == 4
        await anyio.sleep(0.01)
        assert await manager.purge(0.005) == 3
        assert [r.id for r in await manager.list()] == [waiting.id]
        assert await manager.get(done[0].id) is None
        await manager.cancel(waiting.id)
        assert await manager.purge(None) == 1  # type: ignore[arg-type]
        assert await manager.list() == []
        with pytest.raises(ValueError, match="older_than must be seconds >= 0"):
            await manager.purge(-1)


async def test_history_is_empty_without_a_journal() -> None:
    async with BackgroundTaskManager() as manager:
        handle = await manager.submit(noop)
        await handle
        assert await manager.history(handle.id) == []
    assert await manager.history(handle.id) == []


# ------------------------------------------------------------------ odd configuration


@pytest.mark.parametrize("poll_interval", [0, -1, 2, "0.1"])
def test_bad_poll_interval(poll_interval: object) -> None:
    with pytest.raises(ValueError, match="poll_interval"):
        BackgroundTaskManager(poll_interval=poll_interval)  # type: ignore[arg-type]


def test_registry_queue_validation() -> None:
    registry = TaskRegistry()
    with pytest.raises(ValueError, match="non-empty"):
        registry.task(name="x", queue="")
    with pytest.raises(ValueError, match="non-empty"):
        registry.task(name="x", queue=5)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="include"):
        _ = registry.manager


async def test_requeue_after_restart_of_a_task_cut_short_by_shutdown() -> None:
    started = anyio.Event()

    async def slow() -> None:
        started.set()
        await anyio.sleep(10)

    manager = BackgroundTaskManager(shutdown_timeout=0.01)
    async with manager:
        handle = await manager.submit(slow, timeout=0.05)
        await started.wait()
    record = await manager.get(handle.id)
    assert record is not None
    assert record.status is X
    async with manager:
        await manager.requeue(handle.id)
        with pytest.raises(TaskFailed) as info:
            await handle
    assert info.value.error.type.endswith("TaskTimeoutError")


async def test_default_timeout_infinite_means_none() -> None:
    async with BackgroundTaskManager(default_timeout=float("inf")) as manager:
        handle = await manager.submit(value, 1)
        assert await handle == 1
        record = await manager.get(handle.id)
    assert record is not None
    assert record.timeout is None


async def test_a_worker_wakeup_set_twice_or_after_its_waiter_left() -> None:
    """An idle worker's wake-up (one future on asyncio, a trio.Event on trio): shutdown
    and a submit can both set it, and a worker cancelled while idle leaves it behind."""
    from background_tasks._worker import wakeup_class

    make = wakeup_class()
    wakeup = make()
    wakeup.set()
    wakeup.set()
    await wakeup.wait()  # already set: returns at once

    left = make()
    with anyio.move_on_after(0.01) as scope:
        await left.wait()
    assert scope.cancelled_caught
    left.set()  # nobody waits any more: no error
