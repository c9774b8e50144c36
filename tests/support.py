"""Small helpers the manager tests share (imported as ``support``: pytest puts tests/ on
sys.path)."""

from __future__ import annotations

import anyio

from background_tasks import BackgroundTaskManager, TaskStatus

P, R, Y = TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.RETRYING
C, F, X = TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED


async def wait_status(
    manager: BackgroundTaskManager, task_id: str, status: TaskStatus, within: float = 5
) -> None:
    """Poll until the task has ``status`` (tests wait on outcomes, never on sleeps)."""
    with anyio.fail_after(within):
        while True:
            record = await manager.get(task_id)
            if record is not None and record.status is status:
                return
            await anyio.sleep(0.001)


async def noop() -> None:
    pass
