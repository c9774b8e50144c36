"""TaskHandle: await a task's outcome, wherever it runs."""

from __future__ import annotations

from collections.abc import Generator
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio

if TYPE_CHECKING:
    from ._manager import BackgroundTaskManager
    from ._task import Task

__all__ = ["TaskHandle"]

T = TypeVar("T")


async def _done(value: T) -> T:
    return value


class TaskHandle(Generic[T]):
    """``await handle`` gives the task's return value or raises TaskFailed/TaskCancelled.

    Waiting is cancellation-safe: cancelling the awaiter (a client that went away) never
    cancels the task; use ``cancel()`` for that.
    """

    __slots__ = ("_manager", "_task", "id")

    def __init__(self, manager: BackgroundTaskManager, task_id: str, task: Task | None) -> None:
        self._manager = manager
        self._task = task
        self.id = task_id

    def __repr__(self) -> str:
        return f"<TaskHandle {self.id}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TaskHandle) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __await__(self) -> Generator[Any, None, T]:
        task = self._task
        if task is not None and task.status.is_terminal and not task.remote:
            return _done(self._manager._result(task)).__await__()  # no wait, no scope
        return self.result().__await__()

    async def result(self, timeout: float | None = None) -> T:
        """The outcome, waiting at most ``timeout`` seconds (TimeoutError past it)."""
        with anyio.fail_after(timeout) if timeout is not None else nullcontext():
            value: T = await self._manager._outcome(self.id, self._task)
            return value

    async def cancel(self) -> bool:
        return await self._manager.cancel(self.id)

    async def record(self) -> Any:
        """The task's current ``TaskRecord`` (or None if it has been purged)."""
        return await self._manager.get(self.id)
