"""One exception tree for outcomes and the library's own state.

Each class's docstring is its default message, so ``raise QueueFull()`` still says
something useful. Misuse at a call site raises Python's own ``TypeError``/``ValueError``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._models import ErrorInfo

__all__ = [
    "BackgroundTasksError",
    "InvalidTransition",
    "JournalError",
    "ManagerNotRunning",
    "QueueFull",
    "SerializationError",
    "TaskCancelled",
    "TaskFailed",
    "TaskInterrupted",
    "TaskNotFound",
    "TaskTimeoutError",
]


class BackgroundTasksError(Exception):
    """A background task error occurred."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class TaskFailed(BackgroundTasksError):
    """The task failed."""

    def __init__(self, task_id: str, error: ErrorInfo) -> None:
        self.task_id = task_id
        self.error = error
        super().__init__(f"task {task_id} failed: {error.type}: {error.message}")


class TaskCancelled(BackgroundTasksError):
    """The task was cancelled."""

    def __init__(self, task_id: str | None = None) -> None:
        self.task_id = task_id
        super().__init__(f"task {task_id} was cancelled" if task_id else None)


class TaskTimeoutError(BackgroundTasksError, TimeoutError):
    """The attempt ran out of time."""


class TaskNotFound(BackgroundTasksError, KeyError):
    """No task is known by that id."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        super().__init__(f"no task with id {task_id!r}")

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class TaskInterrupted(BackgroundTasksError):
    """The task's attempts were cut short (shutdown or a crash) more than max_recoveries times."""

    def __init__(self, task_id: str, interruptions: int, max_recoveries: int) -> None:
        self.task_id = task_id
        super().__init__(
            f"task {task_id} was interrupted {interruptions} times, more than"
            f" max_recoveries={max_recoveries}: its process stopped or crashed while running it"
        )


class InvalidTransition(BackgroundTasksError):
    """That status change is not in the transition table."""


class ManagerNotRunning(BackgroundTasksError):
    """The manager is not running: use it inside 'async with manager:'."""


class QueueFull(BackgroundTasksError):
    """Too many tasks are waiting (max_pending reached)."""


class SerializationError(BackgroundTasksError, TypeError):
    """A value cannot be stored as JSON."""


class JournalError(BackgroundTasksError):
    """The journal cannot be opened, read or written."""
