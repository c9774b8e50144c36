"""The dispatcher's workers: a fixed pool, each taking the best ready task and running it.

take -> claim -> run_attempt -> decide (retry policy) -> the state writer. Workers are
started once; no task group, limiter or event is created per job (an idle worker waits on
one wake-up), and each worker keeps one cancel scope until a cancel or timeout uses it
up. A worker sees only its collaborators: the dispatch (work and wake-ups) and the
writer (every status change).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio

from ._attempt import Ended, cut_short, run_attempt
from ._errors import SerializationError
from ._events import log
from ._states import TaskStatus

if TYPE_CHECKING:
    from ._queue import Dispatch, Wakeup
    from ._task import Task
    from ._writer import StateWriter

__all__ = ["decide", "wakeup_class", "worker_loop"]

#: A worker yields to the event loop after this many tasks in a row: tasks that finish
#: without awaiting would otherwise run back to back and starve everything else.
_FAIR_SHARE = 64

PENDING, RUNNING, RETRYING = TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.RETRYING
COMPLETED, FAILED, CANCELLED = TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED


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


async def worker_loop(
    dispatch: Dispatch,
    writer: StateWriter,
    wakeup_cls: Callable[[], Wakeup],
    scope_cls: Callable[[], anyio.CancelScope],
) -> None:
    queue = dispatch.ready
    idle = dispatch.idle
    claimed = dispatch.claimed
    in_memory = writer.journal is None
    streak = 0  # tasks run since this worker last let others run
    while not dispatch.stopping:
        scope = scope_cls()
        current: Task | None = None  # the task whose attempt a cancellation would cut short
        try:
            with scope:
                while not dispatch.stopping and not scope.cancel_called:
                    task = claimed.popleft() if claimed else queue.pop()
                    if task is None:
                        event = wakeup_cls()
                        idle.append(event)
                        await event.wait()
                        continue
                    try:
                        current = task
                        if not in_memory:
                            await _run_journaled(dispatch, writer, task, scope)
                        elif writer.start(task):  # in memory: no coroutine of our own
                            _end(dispatch, writer, task, *await run_attempt(task, writer, scope))
                        current = None
                    except Exception:  # a bug or a journal failure must not stop the worker
                        current = None
                        log.exception("worker_error", task_id=task.id, name=task.name)
                    finally:
                        if current is None and queue.release(task):
                            dispatch.wake(1)
                    if in_memory:  # a journaled task awaited its writes: no streak there
                        streak += 1
                        if streak >= _FAIR_SHARE:  # tasks that never await must not starve
                            streak = 0
                            await anyio.lowlevel.checkpoint()
        except BaseException:  # cancelled from outside (the app's scope): record, then go
            if current is not None:
                current.interrupted = True
                await _cut_short(dispatch, writer, current)
            raise
        if current is not None:  # this worker's scope was cancelled inside the attempt
            await _cut_short(dispatch, writer, current)


async def _cut_short(dispatch: Dispatch, writer: StateWriter, task: Task) -> None:
    try:
        with anyio.CancelScope(shield=True):
            await _record(dispatch, writer, task, *cut_short(task))
    finally:
        if dispatch.ready.release(task):
            dispatch.wake(1)


def _end(dispatch: Dispatch, writer: StateWriter, task: Task, ended: Ended, value: Any) -> None:
    if ended is Ended.OK and not task.cancel_requested:
        writer.complete(task, value)
        return
    writer.table.running.discard(task)
    now = writer.now()
    target, result, error, retry_at = decide(task, ended, value, now)
    writer.commit(task, target, now, result, error, retry_at)
    if target is RETRYING:
        dispatch.enqueue(task, retry_at)


async def _run_journaled(
    dispatch: Dispatch, writer: StateWriter, task: Task, scope: anyio.CancelScope
) -> None:
    if task.status is RUNNING:  # claimed as it was submitted
        if task.remote:
            return
    elif not await writer.claim(task):
        return
    if task.cancel_requested:  # cancelled while the claim was being written
        await writer.finish(task, CANCELLED)
        return
    ended, value = await run_attempt(task, writer, scope)
    if ended is Ended.OK and not task.cancel_requested and not scope.cancel_called:
        done = writer.complete_soon(task, value)
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
            await _record(dispatch, writer, task, ended, value)
    else:
        await _record(dispatch, writer, task, ended, value)


async def _record(
    dispatch: Dispatch, writer: StateWriter, task: Task, ended: Ended, value: Any
) -> None:
    """Write how an attempt ended; the slow path, for journals and cut-short attempts."""
    if task.status is not RUNNING:
        return
    if ended is Ended.CANCELLED and not task.cancel_requested:
        await writer.interrupt(task)  # shutdown: not a failure
        return
    target, result, error, retry_at = decide(task, ended, value, writer.now())
    try:
        again = await writer.finish(task, target, result=result, error=error, retry_at=retry_at)
    except SerializationError as exc:  # a result the journal cannot hold: fail, no retry
        again = await writer.finish(task, FAILED, error=exc)
    if again:
        dispatch.enqueue(task, task.scheduled_at)


def decide(
    task: Task, ended: Ended, value: Any, now: float
) -> tuple[TaskStatus, Any, BaseException | None, float]:
    """How an attempt's end maps to the next status: (target, result, error, retry_at),
    a retry being due its backoff after epoch time ``now``."""
    if task.cancel_requested or ended is Ended.CANCELLED:
        return CANCELLED, None, None, 0.0
    if ended is Ended.OK:
        return COMPLETED, value, None, 0.0
    retry = task.retry
    # Attempts cut short by shutdown or a crash are not failures: they do not count.
    delay = retry.decide(value, task.attempts - task.recoveries) if retry is not None else None
    if delay is None:
        return FAILED, None, value, 0.0
    return RETRYING, None, value, now + delay
