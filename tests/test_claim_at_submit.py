"""A journaled submit that finds a worker idle claims its task in the same write.

What must not change with it: a task that cannot start now (no idle worker, its queue at
its limit, a delay) is stored PENDING; a cancel right after submit still means the
function never runs; shutdown leaves a claimed but unstarted task PENDING for the next
start; a submitter cancelled while its write is in flight still gets its task run.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest

from background_tasks import (
    BackgroundTaskManager,
    JournalError,
    SQLiteJournal,
    TaskCancelled,
    TaskStatus,
)

pytestmark = pytest.mark.anyio

P, R, C = TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.COMPLETED


def record_time(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def _manager(path: Path, **kw: object) -> BackgroundTaskManager:
    kw.setdefault("max_concurrency", 2)
    return BackgroundTaskManager(journal=SQLiteJournal(path), **kw)  # type: ignore[arg-type]


async def test_a_submit_with_an_idle_worker_is_claimed_in_its_own_write(tmp_path: Path) -> None:
    manager = _manager(tmp_path / "tasks.db")
    journal = manager.journal
    assert isinstance(journal, SQLiteJournal)
    go = anyio.Event()

    @manager.task(name="wait")
    async def wait() -> str:
        await go.wait()
        return "done"

    async with manager:
        handle = await wait.submit()
        stored = await journal.get(handle.id)
        assert stored is not None
        assert (stored.status, stored.version, stored.attempts) == (R, 1, 1)
        assert stored.owner == manager.owner
        assert stored.lease_until is not None
        assert stored.started_at == stored.created_at
        lines = await manager.history(handle.id)
        assert [(h.source, h.target, h.attempt) for h in lines] == [(None, P, 0), (P, R, 1)]
        # one write: a claim of its own would carry its own (later) time
        assert lines[0].at == lines[1].at == record_time(stored.created_at)
        assert manager.statistics().running == 1
        go.set()
        with anyio.fail_after(10):
            assert await handle == "done"
        lines = await manager.history(handle.id)
        assert [(h.source, h.target) for h in lines] == [(None, P), (P, R), (R, C)]
        record = await manager.get(handle.id)
        assert record is not None
        assert (record.status, record.attempts) == (C, 1)


async def test_what_cannot_start_now_is_stored_pending(tmp_path: Path) -> None:
    manager = _manager(tmp_path / "tasks.db", max_concurrency=2, queues={"narrow": 1})
    go = anyio.Event()

    @manager.task(name="wait")
    async def wait() -> None:
        await go.wait()

    async with manager:
        first = await wait.options(queue="narrow").submit()
        second = await wait.options(queue="narrow").submit()  # its queue is at its limit
        later = await wait.options(delay=30).submit()  # not due yet
        other = await wait.submit()  # another queue, a worker idle: claimed
        statuses = [(await manager.get(h.id)).status for h in (first, second, later, other)]  # type: ignore[union-attr]
        assert statuses == [R, P, P, R]
        crowd = await wait.submit()  # every worker busy or reserved now
        assert (await manager.get(crowd.id)).status is P  # type: ignore[union-attr]
        await later.cancel()
        go.set()
        with anyio.fail_after(10):
            for h in (first, second, other, crowd):
                await h
        stats = manager.statistics()
        assert (stats.completed, stats.cancelled, stats.running) == (4, 1, 0)


async def test_a_cancel_right_after_submit_never_runs_the_function(tmp_path: Path) -> None:
    manager = _manager(tmp_path / "tasks.db")
    ran: list[int] = []

    @manager.task(name="work")
    async def work(n: int) -> None:
        ran.append(n)

    async with manager:
        handle = await work.submit(1)
        assert manager.statistics().running == 1  # claimed; its worker has not run yet
        assert await handle.cancel() is True
        with pytest.raises(TaskCancelled):
            await handle
        lines = await manager.history(handle.id)
        await (await work.submit(2))
    assert ran == [2]
    assert [(h.source, h.target) for h in lines] == [(None, P), (P, R), (R, TaskStatus.CANCELLED)]


async def test_shutdown_leaves_a_claimed_unstarted_task_pending_for_the_next_start(
    tmp_path: Path,
) -> None:
    path = tmp_path / "tasks.db"
    ran: list[str] = []

    def make() -> BackgroundTaskManager:
        manager = _manager(path)

        @manager.task(name="work")
        async def work() -> str:
            ran.append(manager.owner)
            return "done"

        return manager

    first = make()
    async with first:
        handle = await first.submit("work")
        assert first.statistics().running == 1  # claimed, and its worker has not run yet
        # leaving now, with no checkpoint between: the task must not be lost
    assert ran == []
    second = make()
    async with second:
        record = await second.get(handle.id)
        assert record is not None
        assert record.status in (P, R, C)
        with anyio.fail_after(10):
            assert await second.handle(handle.id) == "done"
        lines = await second.history(handle.id)
    assert [(h.source, h.target) for h in lines] == [(None, P), (P, R), (R, P), (P, R), (R, C)]
    assert ran == [second.owner]


async def test_a_submitter_cancelled_during_its_write_still_gets_its_task_run(
    tmp_path: Path,
) -> None:
    path = tmp_path / "tasks.db"
    manager = _manager(path, max_concurrency=4)
    ran: list[str] = []
    three_ran = anyio.Event()

    @manager.task(name="work")
    async def work(label: str) -> str:
        ran.append(label)
        if len(ran) == 3:
            three_ran.set()
        return label

    async with manager:
        blocker = sqlite3.connect(path, isolation_level=None)
        try:
            with anyio.fail_after(10):
                blocker.execute("BEGIN IMMEDIATE")  # holds the first batch in its thread
                async with anyio.create_task_group() as tg:
                    tg.start_soon(work.submit, "first")  # its batch: stuck on the lock
                    await anyio.sleep(0.05)
                    tg.start_soon(work.submit, "second")  # leads the next batch, waiting
                    await anyio.sleep(0.05)
                    with anyio.CancelScope() as scope:  # joins that batch, then is cancelled
                        scope.cancel()
                        await work.submit("cancelled submitter")
                    assert scope.cancelled_caught
                    blocker.execute("ROLLBACK")
                await three_ran.wait()  # the cancelled submitter's task ran all the same
                # and every worker is still there: as many tasks as workers run at once
                many = [await work.submit(f"n{i}") for i in range(8)]
                assert [await h for h in many] == [f"n{i}" for i in range(8)]
        finally:
            blocker.close()
        records = await manager.list(name="work", limit=20)
    assert sorted(ran[:3]) == ["cancelled submitter", "first", "second"]
    assert {r.status for r in records} == {C}
    assert len(records) == 11


async def test_a_failed_claiming_write_gives_the_worker_back(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    manager = BackgroundTaskManager(
        journal=SQLiteJournal(path, busy_timeout=0.2), max_concurrency=1, queues={"q": 1}
    )

    @manager.task(name="work")
    async def work(n: int) -> int:
        return n

    async with manager:
        blocker = sqlite3.connect(path, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
            with pytest.raises(JournalError, match="locked"):
                await work.options(queue="q").submit(1)
            assert manager.statistics().running == 0
        finally:
            blocker.close()
        # the one worker and the one slot of "q" are free again: this is claimed and runs
        handle = await work.options(queue="q").submit(2)
        assert manager.statistics().running == 1
        with anyio.fail_after(10):
            assert await handle == 2
        assert [r.args for r in await manager.list()] == [(2,)]  # nothing else stored


async def test_a_key_held_in_another_process_is_not_claimed_here(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    holder, other = _manager(path, max_concurrency=1), _manager(path, max_concurrency=1)
    go = anyio.Event()

    @holder.task(name="wait")
    async def wait() -> str:
        await go.wait()
        return "held"

    @other.task(name="wait")
    async def wait_other() -> str:
        raise AssertionError("the key's task ran twice")

    @other.task(name="quick")
    async def quick() -> str:
        return "quick"

    async with holder, other:
        first = await wait.options(key="k").submit()
        again = await wait_other.options(key="k").submit()
        assert again.id == first.id  # the live task with that key, not a new one
        assert other.statistics().running == 0
        with anyio.fail_after(10):
            assert await (await quick.submit()) == "quick"  # its one worker is free
            go.set()
            assert await first == "held"
            assert await again == "held"


async def test_a_cancel_during_shutdown_of_a_claimed_unstarted_task_sticks(
    tmp_path: Path,
) -> None:
    path = tmp_path / "tasks.db"
    manager = _manager(path)
    ran: list[int] = []

    @manager.task(name="work")
    async def work() -> None:
        ran.append(1)

    async with anyio.create_task_group() as tg:
        await manager.__aenter__()
        handle = await work.submit()
        tg.start_soon(handle.cancel)  # asks first, then waits for the outcome
        await manager.aclose()  # the handed-over worker leaves without running it
    record = await _manager(path).__aenter__()
    assert ran == []
    try:
        found = await record.get(handle.id)
        assert found is not None
        assert found.status is TaskStatus.CANCELLED
    finally:
        await record.aclose()


async def test_workers_that_move_on_before_their_completion_commits_keep_the_bound(
    tmp_path: Path,
) -> None:
    """A worker is free as soon as its completion is queued for the journal; the task
    turns COMPLETED in memory when that write commits. At no point may more than
    max_concurrency tasks be RUNNING, in memory or on disk."""
    path = tmp_path / "tasks.db"
    manager = _manager(path, max_concurrency=3)
    seen: list[int] = []
    stop = anyio.Event()

    @manager.task(name="work")
    async def work(n: int) -> int:
        return n

    async def sample() -> None:
        while not stop.is_set():
            seen.append(manager.statistics().running)
            await anyio.lowlevel.checkpoint()

    async with manager:
        handles: list[Any] = []

        async def submitter(start: int) -> None:
            for n in range(start, start + 40):
                handles.append(await work.submit(n))

        async with anyio.create_task_group() as tg:
            tg.start_soon(sample)
            async with anyio.create_task_group() as submitters:
                for i in range(10):
                    submitters.start_soon(submitter, i * 40)
            with anyio.fail_after(30):
                assert sorted([await h for h in handles]) == list(range(400))
            stop.set()
        assert manager.statistics().completed == 400
    assert max(seen) <= 3
    assert len(seen) > 100
    with sqlite3.connect(path) as db:
        lines = db.execute(
            "SELECT target, count(*), count(DISTINCT task_id) FROM history"
            " GROUP BY target ORDER BY target"
        ).fetchall()
    # each task: submitted, claimed once (at submit or by a worker), completed once
    assert lines == [("completed", 400, 400), ("pending", 400, 400), ("running", 400, 400)]
