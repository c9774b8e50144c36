"""Run one attempt of a task: its coroutine, under the worker's cancel scope with the
attempt's deadline (set through the manager's clock: with the system clock it is the
scope's own deadline; a test clock cancels the scope when its time passes it).

It changes no task state; it only says how the attempt ended, so the worker can decide
(retry, fail, record) and the state writer can apply the transition. The scope belongs to the
worker and lives across attempts (one per worker until it is cancelled), because creating
and entering a scope per attempt was a fifth of the per-task cost.
"""

from __future__ import annotations

import enum
import math
import sys
from typing import TYPE_CHECKING, Any

import anyio

from ._context import _current
from ._errors import TaskTimeoutError

if TYPE_CHECKING:
    from ._task import Task
    from ._writer import StateWriter

__all__ = ["Ended", "cut_short", "run_attempt"]


class Ended(enum.Enum):
    OK = "ok"
    ERROR = "error"  # the coroutine raised; value is the exception
    TIMEOUT = "timeout"  # value is a TaskTimeoutError
    CANCELLED = "cancelled"  # its scope was cancelled (cancel() or shutdown)


async def run_attempt(
    task: Task, writer: StateWriter, scope: anyio.CancelScope
) -> tuple[Ended, Any]:
    """Await the task's coroutine. A cancellation of ``scope`` propagates to the worker,
    which then asks ``cut_short`` what it meant."""
    fn = task.fn
    assert fn is not None
    timeout = task.timeout
    if timeout is not None:
        clock = writer.clock
        clock.cancel_at(scope, clock.monotonic() + timeout)
    task.scope = scope
    token = _current.set((task, writer))
    try:
        return Ended.OK, await fn(*task.args, **task.kwargs)
    except Exception as exc:
        if scope.cancel_called:  # raised while being cancelled: still a cancellation
            return cut_short(task)
        return Ended.ERROR, exc
    except anyio.get_cancelled_exc_class() as exc:
        # Nobody cancelled this attempt or the manager: the task raised the backend's
        # cancellation exception itself (asyncio.CancelledError). That is its failure,
        # not a reason to tear down the worker and the application around it.
        if scope.cancel_called or _cancel_requested(exc):
            raise
        return Ended.ERROR, exc
    finally:
        task.scope = None
        _current.reset(token)
        if timeout is not None:
            writer.clock.cancel_at(scope, math.inf)


def _cancel_requested(exc: BaseException) -> bool:
    """Whether a cancellation exception came from a real cancel request. Only asyncio lets
    a coroutine raise its cancellation exception by hand; there a real request shows in
    the task's ``cancelling()`` count (anyio cancels through ``Task.cancel``)."""
    asyncio = sys.modules.get("asyncio")
    if asyncio is None or not isinstance(exc, asyncio.CancelledError):
        return True
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def cut_short(task: Task) -> tuple[Ended, Any]:
    """Why an attempt's scope was cancelled: a cancel or shutdown, else its deadline."""
    if task.cancel_requested or task.interrupted:
        return Ended.CANCELLED, None
    return Ended.TIMEOUT, TaskTimeoutError(
        f"attempt {task.attempts} of task {task.id} timed out after {task.timeout or 0:g}s"
    )
