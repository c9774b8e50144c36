"""background_tasks: a background task manager inside your async application.

Submit ``async def`` functions, await their results, query their status, and trust that
they run within a concurrency bound, time out, retry with backoff, can be cancelled and,
with a journal, survive a crash. Runs on asyncio and trio (via anyio).
"""

from ._context import TaskContext as TaskContext
from ._context import current_task as current_task
from ._errors import BackgroundTasksError as BackgroundTasksError
from ._errors import InvalidTransition as InvalidTransition
from ._errors import JournalError as JournalError
from ._errors import ManagerNotRunning as ManagerNotRunning
from ._errors import QueueFull as QueueFull
from ._errors import SerializationError as SerializationError
from ._errors import TaskCancelled as TaskCancelled
from ._errors import TaskFailed as TaskFailed
from ._errors import TaskInterrupted as TaskInterrupted
from ._errors import TaskNotFound as TaskNotFound
from ._errors import TaskTimeoutError as TaskTimeoutError
from ._flow import Queue as Queue
from ._handle import TaskHandle as TaskHandle
from ._manager import BackgroundTaskManager as BackgroundTaskManager
from ._manager import QueueStatistics as QueueStatistics
from ._manager import Statistics as Statistics
from ._models import ErrorInfo as ErrorInfo
from ._models import Progress as Progress
from ._models import TaskRecord as TaskRecord
from ._models import TransitionRecord as TransitionRecord
from ._registry import RegisteredTask as RegisteredTask
from ._registry import TaskRegistry as TaskRegistry
from ._retry import RetryPolicy as RetryPolicy
from ._states import TRANSITIONS as TRANSITIONS
from ._states import TaskStatus as TaskStatus
from .journal.sqlite import SQLiteJournal as SQLiteJournal

__version__ = "0.1.0"

__all__ = (
    "TRANSITIONS",
    "BackgroundTaskManager",
    "BackgroundTasksError",
    "ErrorInfo",
    "InvalidTransition",
    "JournalError",
    "ManagerNotRunning",
    "Progress",
    "Queue",
    "QueueFull",
    "QueueStatistics",
    "RegisteredTask",
    "RetryPolicy",
    "SQLiteJournal",
    "SerializationError",
    "Statistics",
    "TaskCancelled",
    "TaskContext",
    "TaskFailed",
    "TaskHandle",
    "TaskInterrupted",
    "TaskNotFound",
    "TaskRecord",
    "TaskRegistry",
    "TaskStatus",
    "TaskTimeoutError",
    "TransitionRecord",
    "current_task",
)
