"""manager.join(): until every task the manager accepted or recovered has finished."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest
from support import C, F, P, X, noop

from background_tasks import (
    BackgroundTaskManager,
    ManagerNotRunning,
    RetryPolicy,
    SQLiteJournal,
    current_task,
)
from background_tasks.testing import FakeClock

pytestmark = pytest.mark.anyio


async def test_join_with_nothing_to_wait_for_returns_at_once() -> None:
    manager = BackgroundTaskManager()
    await manager.join()  # not started: nothing unfinished
    async with manager:
        with anyio.fail_after(1):
            await manager.join()
            await manager.join(timeout=0)


async def test_join_waits_for_delayed_retrying_and_newly_submitted_tasks() -> None:
    manager = BackgroundTaskManager(max_concurrency=2)
    done: list[str] = []

    async def child(name: str) -> None:
        await anyio.sleep(0.01)
        done.append(name)

    async def parent() -> None:
        await anyio.sleep(0.02)
        # submitted while the test joins: it counts
        await manager.submit(child, "grandchild", delay=0.05)
        done.append("parent")

    async def flaky() -> None:
        if current_task().attempt < 3:
            raise ValueError("again")
        done.append("flaky")

    async with manager:
        await manager.submit(child, "delayed", delay=0.03)
        await manager.submit(parent)
        await manager.submit(flaky, retry=RetryPolicy(base_delay=0.01, jitter=False))
        failing = await manager.submit(flaky, retry=RetryPolicy(max_attempts=1))
        with anyio.fail_after(5):
            await manager.join()
        statistics = manager.statistics()
    assert sorted(done) == ["delayed", "flaky", "grandchild", "parent"]
    assert statistics.pending == statistics.running == statistics.retrying == 0
    assert statistics.completed == 4
    assert statistics.failed == 1
    record = await manager.get(failing.id)
    assert record is not None
    assert record.status is F


async def test_join_timeout_is_real_time_even_on_a_frozen_clock() -> None:
    clock = FakeClock()
    manager = BackgroundTaskManager(clock=clock)
    async with manager:
        handle = await manager.submit(noop, delay=10)
        began = time.monotonic()
        with pytest.raises(TimeoutError):
            await manager.join(timeout=0.1)
        assert 0.05 < time.monotonic() - began < 5
        async with anyio.create_task_group() as tg:
            tg.start_soon(manager.join)
            await clock.advance(10)  # now the joiner can return
        record = await handle.record()
        assert record is not None
        assert record.status is C


async def test_join_refuses_bad_timeouts_and_its_own_tasks() -> None:
    manager = BackgroundTaskManager()
    for bad in (-1, float("nan"), "1", True):
        with pytest.raises(ValueError, match="timeout"):
            await manager.join(timeout=bad)  # type: ignore[arg-type]

    async def joins_itself() -> None:
        await manager.join()

    async with manager:
        handle = await manager.submit(joins_itself)
        with pytest.raises(Exception, match="inside a task") as raised:
            await handle
    assert "RuntimeError" in str(raised.value)


async def _joined(manager: BackgroundTaskManager, outcome: list[object]) -> None:
    try:
        await manager.join()
        outcome.append("joined")
    except ManagerNotRunning as exc:
        outcome.append(exc)


async def test_join_in_memory_when_the_manager_stops() -> None:
    manager = BackgroundTaskManager()
    outcome: list[object] = []
    async with anyio.create_task_group() as tg, manager:
        waiting = await manager.submit(noop, delay=60)
        tg.start_soon(_joined, manager, outcome)
        await anyio.sleep(0.01)
        # pending tasks end cancelled at exit: finished, so the joiner returns
    assert outcome == ["joined"]
    record = await manager.get(waiting.id)
    assert record is not None
    assert record.status is X
    await manager.join()


async def test_join_with_a_journal_when_the_manager_stops_with_work_left(tmp_path: Path) -> None:
    manager = BackgroundTaskManager(journal=SQLiteJournal(tmp_path / "t.db"))

    @manager.task
    async def later() -> None:
        pass

    outcome: list[object] = []
    async with anyio.create_task_group() as tg, manager:
        await later.options(delay=60).submit()
        tg.start_soon(_joined, manager, outcome)
        await anyio.sleep(0.05)
    assert len(outcome) == 1
    assert isinstance(outcome[0], ManagerNotRunning)
    assert "1 tasks unfinished" in str(outcome[0])
    with pytest.raises(ManagerNotRunning, match="stay in the journal"):
        await manager.join()
    async with manager:  # the next start holds it again
        record = (await manager.list())[0]
        assert record.status is P
        await manager.cancel(record.id)
        await manager.join(timeout=5)


async def test_a_submit_only_manager_joins_what_other_managers_run(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    ran: list[int] = []

    def make(run_tasks: bool) -> BackgroundTaskManager:
        manager = BackgroundTaskManager(
            journal=SQLiteJournal(path), run_tasks=run_tasks, poll_interval=0.02
        )

        @manager.task(name="work")
        async def work(n: int) -> None:
            await anyio.sleep(0.01)
            ran.append(n)

        return manager

    front, worker = make(run_tasks=False), make(run_tasks=True)
    async with front, worker:
        for n in range(5):
            await front.submit("work", n, delay=0.05 if n == 4 else None)
        with anyio.fail_after(10):
            await front.join()
        assert sorted(ran) == [0, 1, 2, 3, 4]
        await worker.join(timeout=5)
