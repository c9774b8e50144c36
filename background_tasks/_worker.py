"""The dispatcher: a fixed pool of workers, each taking the best ready task and running it.

take -> run_attempt -> decide (retry policy) -> manager._apply. Workers are started once;
no task group, limiter or event is created per job (an idle worker waits on one event).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import anyio

from ._attempt import Ended, run_attempt
from ._errors import SerializationError
from ._events import log
from ._states import TaskStatus

if TYPE_CHECKING:
    from ._manager import BackgroundTaskManager
    from ._task import Task

__all__ = ["worker_loop"]


async def worker_loop(manager: BackgroundTaskManager) -> None:
    queue = manager._queue
    idle = manager._idle
    while not manager._closing:
        task = queue.pop()
        if task is None:
            event = anyio.Event()
            idle.append(event)
            await event.wait()
            continue
        try:
            await run_task(manager, task)
        except Exception:  # a bug or a journal failure must not take the manager down
            log.exception("worker_error", task_id=task.id, name=task.name)
        finally:
            if queue.release(task.queue):
                manager._wake(1)


async def run_task(manager: BackgroundTaskManager, task: Task) -> None:
    if not await manager._claim(task):
        return
    if task.cancel_requested:  # cancelled while the claim was being written
        await manager._finish(task, TaskStatus.CANCELLED)
        return
    ended, value = await run_attempt(task, manager)
    with anyio.CancelScope(shield=True):  # a computed outcome is never lost to a shutdown
        await _record(manager, task, ended, value)


async def _record(manager: BackgroundTaskManager, task: Task, ended: Ended, value: object) -> None:
    if task.cancel_requested:
        await manager._finish(task, TaskStatus.CANCELLED)
    elif ended is Ended.OK:
        try:
            await manager._finish(task, TaskStatus.COMPLETED, result=value)
        except SerializationError as exc:  # a result the journal cannot hold: fail, no retry
            await manager._finish(task, TaskStatus.FAILED, error=exc)
    elif ended is Ended.CANCELLED:  # interrupted by shutdown: not a failure
        await manager._interrupt(task)
    else:
        assert isinstance(value, BaseException)
        retry = task.retry
        delay = retry.decide(value, task.attempts) if retry is not None else None
        if delay is None:
            await manager._finish(task, TaskStatus.FAILED, error=value)
        else:
            await manager._finish(
                task, TaskStatus.RETRYING, error=value, retry_at=time.time() + delay
            )
