"""``async with manager`` entered in one task and exited in another (asyncio), as
pytest-asyncio does with async fixtures; and a caller on another event loop is told so
instead of hanging. On trio the structured rules stay (one task enters and exits)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import anyio
import pytest
from support import C, R, X, wait_status

from background_tasks import BackgroundTaskManager, SQLiteJournal, TaskCancelled

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the only backend where a scope may outlive its task's block


async def value(x: int) -> int:
    return x


@pytest.mark.parametrize("journaled", [False, True], ids=["memory", "sqlite"])
async def test_enter_in_one_task_and_exit_in_another(tmp_path: Path, journaled: bool) -> None:
    journal = SQLiteJournal(tmp_path / "t.db") if journaled else None
    manager = BackgroundTaskManager(journal=journal, shutdown_timeout=5)
    started = anyio.Event()

    @manager.task
    async def slow() -> str:
        started.set()
        await anyio.sleep(0.05)
        return "finished during the shutdown"

    @manager.task
    async def double(x: int) -> int:
        return 2 * x

    await asyncio.create_task(manager.__aenter__())
    assert manager.running
    assert await (await double.submit(21)) == 42
    running = await slow.submit()
    await started.wait()
    await asyncio.create_task(manager.__aexit__(None, None, None))
    assert not manager.running
    assert await running == "finished during the shutdown"  # a graceful exit, as ever

    # and again, the other way round, with a task left waiting at exit
    await manager.__aenter__()
    waiting = await double.options(delay=60).submit(1)
    await asyncio.create_task(manager.__aexit__(None, None, None))
    if journaled:
        async with manager:
            record = await manager.get(waiting.id)
            assert record is not None
            assert record.status is not X
            await manager.cancel(waiting.id)
    else:
        with pytest.raises(TaskCancelled):
            await waiting


async def test_a_fixture_style_setup_and_teardown() -> None:
    """What pytest-asyncio does: the setup of an async generator fixture in one task,
    the test in another, the teardown in a third."""
    manager = BackgroundTaskManager()

    async def fixture():  # type: ignore[no-untyped-def]
        async with manager:
            yield manager

    generator = fixture()
    got = await asyncio.create_task(generator.__anext__())
    handle = await got.submit(value, 5)
    assert await asyncio.create_task(handle.result()) == 5
    with pytest.raises(StopAsyncIteration):
        await asyncio.create_task(generator.__anext__())
    assert not manager.running


async def test_an_outer_cancellation_is_still_a_graceful_shutdown_when_hosted() -> None:
    manager = BackgroundTaskManager(max_concurrency=1, shutdown_timeout=5)
    started = anyio.Event()

    async def work() -> str:
        started.set()
        await anyio.sleep(0.05)
        return "ok"

    with anyio.CancelScope() as outer:
        async with manager:
            handle = await manager.submit(work)
            queued = await manager.submit(work)
            await started.wait()
            outer.cancel()
            await anyio.sleep_forever()
    assert outer.cancelled_caught
    assert await handle == "ok"
    with pytest.raises(TaskCancelled):
        await queued


def test_awaiting_from_another_event_loop_raises_instead_of_hanging() -> None:
    manager = BackgroundTaskManager()
    home = asyncio.new_event_loop()
    try:
        home.run_until_complete(manager.__aenter__())
        handle = home.run_until_complete(manager.submit(asyncio.sleep, 0.01))

        async def elsewhere() -> None:
            with anyio.fail_after(5):
                with pytest.raises(RuntimeError, match="another event loop"):
                    await handle
                with pytest.raises(RuntimeError, match="another event loop"):
                    await manager.join()

        asyncio.run(elsewhere())
        home.run_until_complete(handle.result(timeout=5))  # its own loop runs it
        home.run_until_complete(wait_status(manager, handle.id, C))
    finally:
        home.run_until_complete(manager.aclose())
        home.close()


async def test_tasks_run_between_enter_and_exit_in_different_tasks(tmp_path: Path) -> None:
    manager = BackgroundTaskManager(journal=SQLiteJournal(tmp_path / "t.db"))
    gate = anyio.Event()

    @manager.task
    async def held() -> None:
        await gate.wait()

    enter = asyncio.create_task(manager.__aenter__())
    await enter
    handle = await held.submit()
    await wait_status(manager, handle.id, R)
    gate.set()
    await handle
    await asyncio.create_task(manager.aclose())


class _BuggyJournal(SQLiteJournal):
    """A third-party journal with a bug in one verb (not a JournalError)."""

    async def changes(self, since: int, exclude_owner: str) -> tuple[list[Any], int]:
        raise ZeroDivisionError("a bug in the journal")


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_a_crash_in_the_managers_tasks_is_raised_at_exit(
    tmp_path: Path, anyio_backend: str
) -> None:
    manager = BackgroundTaskManager(journal=_BuggyJournal(tmp_path / "t.db"))
    with pytest.raises(ExceptionGroup) as raised:
        async with manager:
            await anyio.sleep(0.2)  # on trio the crash cancels this; asyncio lets it end
    assert raised.group_contains(ZeroDivisionError)
    assert not manager.running
