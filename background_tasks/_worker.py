"""The dispatcher: a fixed pool of workers, each taking the best ready task and running it.

take -> claim -> run_attempt -> decide (retry policy) -> manager transition. Workers are
started once; no task group, limiter or event is created per job (an idle worker waits on
one event), and each worker keeps one cancel scope until a cancel or timeout uses it up.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import anyio

from ._attempt import Ended, cut_short, run_attempt
from ._errors import SerializationError
from ._events import log
from ._states import TaskStatus

if TYPE_CHECKING:
    from ._manager import BackgroundTaskManager
    from ._queue import ReadyQueue
    from ._task import Task

__all__ = ["Wakeup", "decide", "wakeup_class", "worker_loop"]

#: A worker yields to the event loop after this many tasks in a row: tasks that finish
#: without awaiting would otherwise run back to back and starve everything else.
_FAIR_SHARE = 64

PENDING, RUNNING, RETRYING = TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.RETRYING
COMPLETED, FAILED, CANCELLED = TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED


class Wakeup(Protocol):
    """What an idle worker waits on (``manager._idle``): set once, one waiter."""

    def set(self) -> None: ...

    def wait(self) -> Awaitable[Any]: ...


class _FutureWakeup:
    """An idle worker's wake-up on asyncio: one future, where an ``anyio.Event`` costs
    an asyncio.Event, its deque and two coroutines per wait (a worker idles once per
    task when tasks are journaled; the objects add up to garbage collections)."""

    __slots__ = ("_future",)

    def __init__(self) -> None:
        self._future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def set(self) -> None:
        if not self._future.done():
            self._future.set_result(None)

    def wait(self) -> asyncio.Future[None]:
        return self._future


def wakeup_class() -> Callable[[], Wakeup]:
    """The cheapest one-waiter event of the running backend."""
    cancelled = anyio.get_cancelled_exc_class()
    if cancelled is asyncio.CancelledError:
        return _FutureWakeup
    if cancelled.__module__.startswith("trio"):
        import trio  # only when running on it

        return trio.Event  # anyio's wraps one
    return type(anyio.Event())  # pragma: no cover - anyio has no third backend today


async def worker_loop(manager: BackgroundTaskManager) -> None:
    queue = manager._queue
    idle = manager._idle
    claimed = manager._claimed
    event_cls = manager._wakeup_cls
    scope_cls = manager._scope_cls
    in_memory = manager.journal is None
    streak = 0  # tasks run since this worker last let others run
    while not manager._closing:
        scope = scope_cls()
        current: Task | None = None  # the task whose attempt a cancellation would cut short
        try:
            with scope:
                while not manager._closing and not scope.cancel_called:
                    task = claimed.popleft() if claimed else queue.pop()
                    if task is None:
                        event = event_cls()
                        idle.append(event)
                        await event.wait()
                        continue
                    try:
                        current = task
                        if not in_memory:
                            await _run_journaled(manager, task, scope)
                        elif _start(manager, task):  # in memory: no coroutine of our own
                            _end(manager, task, *await run_attempt(task, manager, scope))
                        current = None
                    except Exception:  # a bug or a journal failure must not stop the worker
                        current = None
                        log.exception("worker_error", task_id=task.id, name=task.name)
                    finally:
                        if current is None and queue.release(task.queue):
                            manager._wake(1)
                    if in_memory:  # a journaled task awaited its writes: no streak there
                        streak += 1
                        if streak >= _FAIR_SHARE:  # tasks that never await must not starve
                            streak = 0
                            await anyio.lowlevel.checkpoint()
        except BaseException:  # cancelled from outside (the app's scope): record, then go
            if current is not None:
                current.interrupted = True
                await _cut_short(manager, queue, current)
            raise
        if current is not None:  # this worker's scope was cancelled inside the attempt
            await _cut_short(manager, queue, current)


async def _cut_short(manager: BackgroundTaskManager, queue: ReadyQueue, task: Task) -> None:
    try:
        with anyio.CancelScope(shield=True):
            await _record(manager, task, *cut_short(task))
    finally:
        if queue.release(task.queue):
            manager._wake(1)


def _start(manager: BackgroundTaskManager, task: Task) -> bool:
    status = task.status
    if status is not PENDING and status is not RETRYING:
        return False  # cancelled while queued
    manager._start(task)
    manager._running_tasks.add(task)
    return True


def _end(manager: BackgroundTaskManager, task: Task, ended: Ended, value: Any) -> None:
    manager._running_tasks.discard(task)
    if ended is Ended.OK and not task.cancel_requested:
        manager._complete(task, value)
        return
    target, result, error, retry_at = decide(task, ended, value)
    manager._commit(task, target, time.time(), result, error, retry_at)
    if target is RETRYING:
        manager._enqueue(task, retry_at)


async def _run_journaled(
    manager: BackgroundTaskManager, task: Task, scope: anyio.CancelScope
) -> None:
    if task.status is RUNNING:  # claimed as it was submitted (``_submit_claimed``)
        if task.remote:
            return
    elif not await manager._claim(task):
        return
    if task.cancel_requested:  # cancelled while the claim was being written
        await manager._finish(task, CANCELLED)
        return
    ended, value = await run_attempt(task, manager, scope)
    if ended is Ended.OK and not task.cancel_requested and not scope.cancel_called:
        done = manager._complete_soon(task, value)
        if done is not False:
            if done is not True:
                await done  # it leads the next batch
            return
    # A computed outcome is never lost to a cancellation. Once the attempt is over, no
    # cancel, timeout or shutdown reaches this worker's scope (they go through task.scope,
    # cleared when the attempt ended), unless the task swallowed one: shield only then.
    # (An outer cancellation that interrupts the write is settled by the journal: the
    # leader of the batch still commits it, and this manager's stale copy is fenced.)
    if scope.cancel_called:
        with anyio.CancelScope(shield=True):
            await _record(manager, task, ended, value)
    else:
        await _record(manager, task, ended, value)


async def _record(manager: BackgroundTaskManager, task: Task, ended: Ended, value: Any) -> None:
    """Write how an attempt ended; the slow path, for journals and cut-short attempts."""
    if task.status is not RUNNING:
        return
    if ended is Ended.CANCELLED and not task.cancel_requested:
        await manager._interrupt(task)  # shutdown: not a failure
        return
    target, result, error, retry_at = decide(task, ended, value)
    try:
        await manager._finish(task, target, result=result, error=error, retry_at=retry_at)
    except SerializationError as exc:  # a result the journal cannot hold: fail, no retry
        await manager._finish(task, FAILED, error=exc)


def decide(
    task: Task, ended: Ended, value: Any
) -> tuple[TaskStatus, Any, BaseException | None, float]:
    """How an attempt's end maps to the next status: (target, result, error, retry_at)."""
    if task.cancel_requested or ended is Ended.CANCELLED:
        return CANCELLED, None, None, 0.0
    if ended is Ended.OK:
        return COMPLETED, value, None, 0.0
    retry = task.retry
    # Attempts cut short by shutdown or a crash are not failures: they do not count.
    delay = retry.decide(value, task.attempts - task.recoveries) if retry is not None else None
    if delay is None:
        return FAILED, None, value, 0.0
    return RETRYING, None, value, time.time() + delay
