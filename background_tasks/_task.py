"""The manager's internal, slotted view of one task.

Records (``TaskRecord``) are built from it only when asked for; everything on the hot
path reads and writes these slots directly. Times are epoch floats until a record is built.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from ._models import ErrorInfo, Progress, TaskRecord, utc
from ._states import TaskStatus

if TYPE_CHECKING:
    import anyio

    from ._retry import RetryPolicy

__all__ = ["Task"]

_EMPTY: dict[str, Any] = {}


class Task:
    __slots__ = (
        "args",
        "attempts",
        "busy",
        "cancel_requested",
        "created_at",
        "error",
        "exc",
        "finished_at",
        "fn",
        "id",
        "interrupted",
        "key",
        "kwargs",
        "lock",
        "max_attempts",
        "name",
        "partition",
        "priority",
        "progress",
        "queue",
        "recoveries",
        "remote",
        "result",
        "retry",
        "scheduled_at",
        "scope",
        "seq",
        "started_at",
        "status",
        "timeout",
        "version",
        "waiters",
    )

    def __init__(
        self,
        id: str,
        name: str,
        fn: Callable[..., Coroutine[Any, Any, Any]] | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None,
        queue: str,
        priority: int,
        key: str | None,
        timeout: float | None,
        retry: RetryPolicy | None,
        created_at: float,
        scheduled_at: float,
    ) -> None:
        self.id = id
        self.name = name
        self.fn = fn
        self.args = args
        self.kwargs = kwargs or _EMPTY
        self.queue = queue
        self.priority = priority
        self.key = key
        self.timeout = timeout
        self.retry = retry
        self.max_attempts = retry.max_attempts if retry is not None else 1
        self.created_at = created_at
        self.scheduled_at = scheduled_at
        self.status = TaskStatus.PENDING
        self.attempts = 0
        self.recoveries = 0
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.result: Any = None
        self.error: ErrorInfo | None = None
        self.exc: BaseException | None = None  # the original exception, in this process only
        self.progress: tuple[float | None, str | None, float] | None = None
        self.seq = -1  # the ready queue's token for this task's live entry; -1 = not queued
        self.scope: anyio.CancelScope | None = None  # the running attempt's scope
        self.waiters: anyio.Event | None = None  # made only when someone awaits
        self.cancel_requested = False
        self.interrupted = False  # the running attempt is being cut short by shutdown
        self.busy = False  # a journal write for this task is in flight
        self.remote = False  # another manager sharing the journal owns its fate now
        self.version = 0  # the journal row's version this process last saw
        self.lock: str | None = None  # one task of a lock runs at a time (submit(lock=))
        self.partition: str | None = None  # its partition of a per_partition queue

    def record(self) -> TaskRecord:
        progress = None
        if self.progress is not None:
            fraction, message, at = self.progress
            progress = Progress.model_construct(
                fraction=fraction, message=message, updated_at=utc(at)
            )
        return TaskRecord.model_construct(
            id=self.id,
            name=self.name,
            queue=self.queue,
            status=self.status,
            priority=self.priority,
            args=tuple(self.args),
            kwargs=dict(self.kwargs),
            key=self.key,
            attempts=self.attempts,
            max_attempts=self.max_attempts,
            created_at=utc(self.created_at),
            scheduled_at=utc(self.scheduled_at),
            started_at=utc(self.started_at),
            finished_at=utc(self.finished_at),
            result=self.result,
            error=self.error,
            progress=progress,
            timeout=self.timeout,
            recoveries=self.recoveries,
            owner=None,
        )
