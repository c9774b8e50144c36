"""current_task(): what a running task can learn about itself and report."""

from __future__ import annotations

import math
from contextvars import ContextVar
from typing import TYPE_CHECKING

from ._models import utc
from ._periodic import tick_of

if TYPE_CHECKING:
    from datetime import datetime

    from ._task import Task
    from ._writer import StateWriter

__all__ = ["TaskContext", "current_task"]

_current: ContextVar[tuple[Task, StateWriter]] = ContextVar("background_task")


class TaskContext:
    """The running task, as seen from inside it."""

    __slots__ = ("_task", "_writer")

    def __init__(self, task: Task, writer: StateWriter) -> None:
        self._task = task
        self._writer = writer

    @property
    def id(self) -> str:
        return self._task.id

    @property
    def name(self) -> str:
        return self._task.name

    @property
    def attempt(self) -> int:
        """The number of this attempt, 1 for the first."""
        return self._task.attempts

    @property
    def queue(self) -> str:
        return self._task.queue

    @property
    def scheduled_at(self) -> datetime:
        """The task's not-before time (aware UTC): when it was due, from its ``delay`` or
        ``at``, its submit time otherwise, the end of its backoff in a retry. For the task
        of a periodic tick: the tick, in every attempt."""
        task = self._task
        if task.key is not None:
            tick = tick_of(task.key, task.name)
            if tick is not None:
                return tick
        return utc(task.scheduled_at)

    async def report_progress(
        self, fraction: float | None = None, message: str | None = None
    ) -> None:
        """Publish how far the task has got; shown in ``TaskRecord.progress``."""
        if fraction is not None:
            if isinstance(fraction, bool) or not isinstance(fraction, int | float):
                raise TypeError(f"progress fraction must be a number, got {fraction!r}")
            if math.isnan(fraction) or not 0.0 <= fraction <= 1.0:
                raise ValueError(f"progress fraction must be in [0, 1], got {fraction!r}")
            fraction = float(fraction)
        if message is not None and not isinstance(message, str):
            raise TypeError(f"progress message must be a str, got {message!r}")
        self._task.progress = (fraction, message, self._writer.now())
        await self._writer.progress(self._task)


def current_task() -> TaskContext:
    """The task whose attempt is running in this context; RuntimeError outside a task."""
    try:
        task, writer = _current.get()
    except LookupError:
        raise RuntimeError("current_task() was called outside a background task") from None
    return TaskContext(task, writer)
