"""Starting, stopping, restarting; graceful shutdown; current_task() and progress."""

from __future__ import annotations

import contextlib
import math
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import anyio
import pytest
from support import C, R, X, noop, wait_status

from background_tasks import (
    BackgroundTaskManager,
    ManagerNotRunning,
    RetryPolicy,
    SQLiteJournal,
    TaskCancelled,
    TaskHandle,
    current_task,
)

pytestmark = pytest.mark.anyio


async def value(x: int) -> int:
    return x


# ------------------------------------------------------------------ not running


async def test_submit_before_start_and_after_exit() -> None:
    manager = BackgroundTaskManager()
    assert not manager.running
    with pytest.raises(ManagerNotRunning):
        await manager.submit(noop)
    with pytest.raises(ManagerNotRunning):
        await manager.requeue("x")
    async with manager:
        assert manager.running
        done = await manager.submit(value, 1)
        assert await done == 1
    assert not manager.running
    with pytest.raises(ManagerNotRunning):
        await manager.submit(noop)
    with pytest.raises(ManagerNotRunning):
        await manager.requeue(done.id)
    # what finished stays readable after exit
    record = await manager.get(done.id)
    assert record is not None
    assert record.status is C
    assert [r.id for r in await manager.list()] == [done.id]
    assert await done == 1
    assert await manager.cancel(done.id) is False


async def test_the_message_tells_what_to_do() -> None:
    with pytest.raises(ManagerNotRunning, match="async with"):
        await BackgroundTaskManager().submit(noop)


async def test_restart_after_exit() -> None:
    manager = BackgroundTaskManager(max_concurrency=2)
    async with manager:
        assert await (await manager.submit(value, 1)) == 1
    async with manager:
        assert await (await manager.submit(value, 2)) == 2
        assert manager.statistics().completed == 2


async def test_entering_twice_is_an_error() -> None:
    manager = BackgroundTaskManager()
    async with manager:
        with pytest.raises(RuntimeError, match="already running"):
            await manager.__aenter__()
        assert await (await manager.submit(value, 3)) == 3


async def test_aclose_is_idempotent() -> None:
    manager = BackgroundTaskManager()
    await manager.aclose()  # never started: nothing to do
    async with manager:
        await manager.aclose()
        assert not manager.running
        with pytest.raises(ManagerNotRunning):
            await manager.submit(noop)
    await manager.aclose()


async def test_lifespan() -> None:
    manager = BackgroundTaskManager()
    async with manager.lifespan(object()):
        assert manager.running
        assert await (await manager.submit(value, 5)) == 5
    assert not manager.running
    async with manager.lifespan():
        assert manager.running
    app = SimpleNamespace(state=SimpleNamespace())
    async with manager.lifespan(app):
        assert app.state.background_tasks_manager is manager
        assert manager.running


async def test_exception_in_the_block_propagates_and_shuts_down() -> None:
    manager = BackgroundTaskManager()
    handles: list[TaskHandle[None]] = []
    with pytest.raises(ZeroDivisionError):  # noqa: PT012 - the block is what is tested
        async with manager:
            handles.append(await manager.submit(noop, delay=60))
            raise ZeroDivisionError
    assert not manager.running
    with pytest.raises(TaskCancelled):
        await handles[0]


# ------------------------------------------------------------------ graceful shutdown


async def test_shutdown_lets_running_attempts_finish() -> None:
    started = anyio.Event()
    steps: list[str] = []

    async def short() -> str:
        started.set()
        await anyio.sleep(0.05)
        steps.append("finished")
        return "ok"

    manager = BackgroundTaskManager(shutdown_timeout=5)
    async with manager:
        handle = await manager.submit(short)
        await started.wait()
    assert steps == ["finished"]
    record = await manager.get(handle.id)
    assert record is not None
    assert record.status is C
    assert await handle == "ok"


async def test_shutdown_cancels_attempts_past_the_timeout() -> None:
    started = anyio.Event()
    steps: list[str] = []
    outcome: list[BaseException] = []

    async def forever() -> None:
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            steps.append("finally")

    manager = BackgroundTaskManager(shutdown_timeout=0.05)
    async with anyio.create_task_group() as tg:
        async with manager:
            handle = await manager.submit(forever)

            async def awaiter() -> None:
                try:
                    await handle
                except TaskCancelled as exc:
                    outcome.append(exc)

            tg.start_soon(awaiter)
            await started.wait()
            before = anyio.current_time()
        waited = anyio.current_time() - before
    assert waited >= 0.045  # it got its shutdown_timeout first
    assert steps == ["finally"]
    assert len(outcome) == 1
    record = await manager.get(handle.id)
    assert record is not None
    assert record.status is X
    assert record.finished_at is not None


async def test_shutdown_cancels_pending_tasks_and_their_awaiters() -> None:
    gate = anyio.Event()
    ran: list[str] = []
    outcomes: dict[str, str] = {}

    async def blocked() -> None:
        await gate.wait()

    async def work(tag: str) -> None:
        ran.append(tag)

    async def boom() -> None:
        raise ValueError("boom")

    manager = BackgroundTaskManager(max_concurrency=1, shutdown_timeout=0.02)
    async with anyio.create_task_group() as tg, manager:
        first = await manager.submit(blocked)
        await wait_status(manager, first.id, R)
        waiting = await manager.submit(work, "waiting")
        delayed = await manager.submit(work, "delayed", delay=timedelta(hours=1))
        retrying = await manager.submit(
            boom, retry=RetryPolicy(max_attempts=3, base_delay=60, jitter=False)
        )
        handles = {"first": first, "waiting": waiting, "delayed": delayed}

        async def awaiter(name: str) -> None:
            try:
                await handles[name]
                outcomes[name] = "result"
            except TaskCancelled:
                outcomes[name] = "cancelled"

        for name in handles:
            tg.start_soon(awaiter, name)
        await anyio.sleep(0.01)
        assert manager.statistics().pending == 3  # waiting, delayed, and boom behind first
    assert ran == []
    assert outcomes == {"first": "cancelled", "waiting": "cancelled", "delayed": "cancelled"}
    for handle in (first, waiting, delayed):
        record = await manager.get(handle.id)
        assert record is not None
        assert record.status is X
    record = await manager.get(waiting.id)
    assert record is not None
    assert record.started_at is None
    assert record.attempts == 0
    with pytest.raises(TaskCancelled):
        await retrying
    stats = manager.statistics()
    assert (stats.pending, stats.running, stats.retrying, stats.queued) == (0, 0, 0, 0)
    assert stats.cancelled == 4


async def test_shutdown_with_zero_timeout() -> None:
    started = anyio.Event()

    async def forever() -> None:
        started.set()
        await anyio.sleep_forever()

    manager = BackgroundTaskManager(shutdown_timeout=0)
    async with manager:
        handle = await manager.submit(forever)
        await started.wait()
    with pytest.raises(TaskCancelled):
        await handle


async def test_outer_cancellation_leaves_no_task_running() -> None:
    started = anyio.Event()

    async def short() -> None:
        started.set()
        await anyio.sleep(0.03)

    manager = BackgroundTaskManager(shutdown_timeout=5, max_concurrency=1)
    with anyio.CancelScope() as scope:
        async with manager:
            handle = await manager.submit(short)
            waiting = await manager.submit(noop)
            await started.wait()
            scope.cancel()
    assert not manager.running
    with pytest.raises(TaskCancelled):
        await waiting
    # the running attempt was cut short (or let finish): either way it is no longer RUNNING,
    # and its awaiters get an outcome rather than ManagerNotRunning
    record = await manager.get(handle.id)
    assert record is not None
    assert record.status in (C, X)
    assert manager.statistics().running == 0
    with anyio.fail_after(1), contextlib.suppress(TaskCancelled):
        await handle


async def test_a_result_computed_during_shutdown_is_kept() -> None:
    started = anyio.Event()

    async def finishes_on_cancel() -> str:
        started.set()
        with anyio.CancelScope(shield=True):
            await anyio.sleep(0.05)
        return "kept"

    manager = BackgroundTaskManager(shutdown_timeout=0.01)
    async with manager:
        handle = await manager.submit(finishes_on_cancel)
        await started.wait()
    # the attempt returned its result although its scope was cancelled: the result is kept
    record = await manager.get(handle.id)
    assert record is not None
    assert record.status is C
    assert await handle == "kept"


# ------------------------------------------------------------------ current_task()


async def test_current_task_outside_raises() -> None:
    with pytest.raises(RuntimeError, match="outside"):
        current_task()


async def test_current_task_inside() -> None:
    seen: list[tuple[str, int, str, str]] = []

    async def me() -> None:
        ctx = current_task()
        seen.append((ctx.id, ctx.attempt, ctx.name, ctx.queue))
        if ctx.attempt < 3:
            raise ValueError("again")

    async with BackgroundTaskManager(queues={"q": 1}) as manager:
        policy = RetryPolicy(max_attempts=3, base_delay=0, jitter=False)
        handle = await manager.submit(me, queue="q", retry=policy)
        await handle
        registered = manager.task(name="named")(me)
        other = await registered.submit()
        with pytest.raises(Exception, match="again"):
            await other
    assert seen[:3] == [(handle.id, n, me.__qualname__, "q") for n in (1, 2, 3)]
    assert seen[3] == (other.id, 1, "named", "default")
    with pytest.raises(RuntimeError):
        current_task()  # the context does not leak out of the task


async def test_current_task_in_a_child_task() -> None:
    seen: list[str] = []

    async def parent() -> None:
        async def child() -> None:
            seen.append(current_task().id)

        async with anyio.create_task_group() as tg:
            tg.start_soon(child)

    async with BackgroundTaskManager() as manager:
        handle = await manager.submit(parent)
        await handle
    assert seen == [handle.id]


async def test_report_progress() -> None:
    reported = anyio.Event()
    gate = anyio.Event()

    async def copy() -> None:
        ctx = current_task()
        await ctx.report_progress(0.4, "copied 4 of 10")
        reported.set()
        await gate.wait()
        await ctx.report_progress(1)
        await ctx.report_progress(message="only a message")

    async with BackgroundTaskManager() as manager:
        handle = await manager.submit(copy)
        await reported.wait()
        record = await manager.get(handle.id)
        assert record is not None
        assert record.progress is not None
        assert record.progress.fraction == 0.4
        assert record.progress.message == "copied 4 of 10"
        assert record.progress.updated_at.utcoffset() == timedelta(0)
        assert record.progress.updated_at >= record.created_at
        gate.set()
        await handle
        record = await manager.get(handle.id)
    assert record is not None
    assert record.progress is not None
    assert record.progress.fraction is None
    assert record.progress.message == "only a message"


@pytest.mark.parametrize(
    ("fraction", "message", "error"),
    [
        (1.5, None, ValueError),
        (-0.1, None, ValueError),
        (math.nan, None, ValueError),
        (math.inf, None, ValueError),
        (True, None, TypeError),
        ("half", None, TypeError),
        (0.5, 42, TypeError),
    ],
)
async def test_report_progress_bad_values(
    fraction: object, message: object, error: type[Exception]
) -> None:
    caught: list[BaseException] = []

    async def bad() -> str:
        ctx = current_task()
        try:
            await ctx.report_progress(fraction, message)  # type: ignore[arg-type]
        except Exception as exc:
            caught.append(exc)
        await ctx.report_progress(0.5, "still fine")
        return "ok"

    async with BackgroundTaskManager() as manager:
        handle = await manager.submit(bad)
        assert await handle == "ok"
        record = await manager.get(handle.id)
    assert len(caught) == 1
    assert isinstance(caught[0], error)
    assert record is not None
    assert record.progress is not None
    assert record.progress.fraction == 0.5


async def test_requeue_clears_progress() -> None:
    async def half_then_fail() -> None:
        await current_task().report_progress(0.5)
        raise ValueError("boom")

    async with BackgroundTaskManager() as manager:
        handle = await manager.submit(half_then_fail)
        with pytest.raises(Exception, match="boom"):
            await handle
        record = await manager.get(handle.id)
        assert record is not None
        assert record.progress is not None
        record = await manager.requeue(handle.id)
        assert record.progress is None
        await manager.cancel(handle.id)


@pytest.mark.parametrize(("shutdown_timeout", "finished"), [(5.0, True), (0.0, False)])
async def test_cancelling_the_scope_around_the_manager_is_a_graceful_shutdown(
    shutdown_timeout: float, finished: bool
) -> None:
    """The host's cancellation reaches ``async with manager`` as a shutdown: a running
    attempt gets ``shutdown_timeout`` (it finishes), or is cut off with 0."""
    started = anyio.Event()
    done: list[str] = []

    async def work() -> str:
        started.set()
        await anyio.sleep(0.2)
        done.append("done")
        return "ok"

    manager = BackgroundTaskManager(shutdown_timeout=shutdown_timeout)
    with anyio.CancelScope() as outer:
        async with manager:
            handle = await manager.submit(work)
            await started.wait()
            outer.cancel()
            await anyio.sleep_forever()
    assert outer.cancelled_caught
    record = await manager.get(handle.id)
    assert record is not None
    if finished:
        assert done == ["done"]
        assert record.status is C
        assert await handle == "ok"
    else:
        assert done == []
        assert record.status is X


async def test_repr_says_what_the_manager_is_doing(tmp_path: Path) -> None:
    manager = BackgroundTaskManager(max_concurrency=3)
    assert repr(manager) == (
        "<BackgroundTaskManager new journal=memory max_concurrency=3 running=0 waiting=0>"
    )
    gate = anyio.Event()

    async def wait() -> None:
        await gate.wait()

    async with manager:
        running = await manager.submit(wait)
        await manager.submit(wait, delay=60)
        await wait_status(manager, running.id, R)
        text = repr(manager)
        assert text.startswith("<BackgroundTaskManager running journal=memory")
        assert text.endswith("running=1 waiting=1>")
        gate.set()
    assert repr(manager).startswith("<BackgroundTaskManager closed")
    journaled = BackgroundTaskManager(journal=SQLiteJournal(tmp_path / "t.db"))
    assert f"journal=<SQLiteJournal {str(tmp_path / 't.db')!r} closed>" in repr(journaled)
