"""Run one attempt of a task: its coroutine under a cancel scope with the attempt's deadline.

It changes no task state; it only says how the attempt ended, so the worker can decide
(retry, fail, record) and the manager can apply the transition.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any

import anyio

from ._context import _current
from ._errors import TaskTimeoutError

if TYPE_CHECKING:
    from ._manager import BackgroundTaskManager
    from ._task import Task

__all__ = ["Ended", "run_attempt"]


class Ended(enum.Enum):
    OK = "ok"
    ERROR = "error"  # the coroutine raised; value is the exception
    TIMEOUT = "timeout"  # value is a TaskTimeoutError
    CANCELLED = "cancelled"  # its scope was cancelled (cancel() or shutdown)


async def run_attempt(task: Task, manager: BackgroundTaskManager) -> tuple[Ended, Any]:
    fn = task.fn
    assert fn is not None
    timeout = task.timeout
    scope = task.scope = anyio.CancelScope(
        deadline=anyio.current_time() + timeout if timeout is not None else float("inf")
    )
    token = _current.set((task, manager))
    try:
        with scope:
            return Ended.OK, await fn(*task.args, **task.kwargs)
    except Exception as exc:
        # An error raised while being cancelled is still a cancellation.
        if scope.cancel_called and (task.cancel_requested or task.interrupted):
            return Ended.CANCELLED, None
        return Ended.ERROR, exc
    finally:
        task.scope = None
        _current.reset(token)
    # Only reached when the scope swallowed its own cancellation.
    if task.cancel_requested or task.interrupted:
        return Ended.CANCELLED, None
    return Ended.TIMEOUT, TaskTimeoutError(
        f"attempt {task.attempts} of task {task.id} timed out after {timeout or 0:g}s"
    )
