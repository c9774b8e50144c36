"""run_tasks=False: a manager that submits and waits while others on the journal run."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from background_tasks import (
    BackgroundTaskManager,
    SQLiteJournal,
    TaskCancelled,
    TaskStatus,
)

pytestmark = pytest.mark.anyio


def test_needs_a_journal() -> None:
    with pytest.raises(ValueError, match="run_tasks=False needs a journal"):
        BackgroundTaskManager(run_tasks=False)
    with pytest.raises(ValueError, match="run_tasks must be a bool"):
        BackgroundTaskManager(run_tasks="no")  # type: ignore[arg-type]


async def test_a_submit_only_manager_never_runs_what_it_submits(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    front = BackgroundTaskManager(journal=SQLiteJournal(path), run_tasks=False)
    worker = BackgroundTaskManager(journal=SQLiteJournal(path), max_concurrency=4)
    started = anyio.Event()

    @front.task(name="work")
    async def work_front(n: int) -> str:
        raise AssertionError("the submit-only manager ran a task")

    @front.task(name="block")
    async def block_front() -> None:
        raise AssertionError("the submit-only manager ran a task")

    @worker.task(name="work")
    async def work(n: int) -> str:
        return f"done {n}"

    @worker.task(name="block")
    async def block() -> None:
        started.set()
        await anyio.sleep_forever()

    async with worker, front:
        handles = [await work_front.submit(n) for n in range(20)]
        with anyio.fail_after(20):
            assert [await h for h in handles] == [f"done {n}" for n in range(20)]
        assert front.statistics().completed == 0  # nothing ran here
        record = await front.get(handles[0].id)
        assert record is not None
        assert (record.status, record.owner) == (TaskStatus.COMPLETED, worker.owner)

        blocked = await block_front.submit()
        with anyio.fail_after(10):
            await started.wait()
        assert await front.cancel(blocked.id)  # reaches the worker through the journal
        with anyio.fail_after(10), pytest.raises(TaskCancelled):
            await blocked
