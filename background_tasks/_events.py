"""Structlog events, bound to the standard library logger ``background_tasks``.

The library never configures structlog or logging: events flow through whatever the
application set up, and cost one level check when nobody listens.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol

import structlog

if TYPE_CHECKING:
    from ._models import ErrorInfo
    from ._states import TaskStatus

__all__ = ["DEBUG", "WARNING", "is_enabled", "log", "transition"]

_stdlib = logging.getLogger("background_tasks")
_stdlib.addHandler(logging.NullHandler())  # a library stays silent unless the app routes it

log: Any = structlog.wrap_logger(_stdlib, wrapper_class=structlog.stdlib.BoundLogger)


DEBUG, WARNING = logging.DEBUG, logging.WARNING
#: ``is_enabled(DEBUG)``: logging caches the answer, so a silent event costs one call.
is_enabled = _stdlib.isEnabledFor


class _Subject(Protocol):
    """What a transition event names: a task in memory or a journal row."""

    @property
    def id(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def queue(self) -> str: ...
    @property
    def attempts(self) -> int: ...


def transition(
    task: _Subject, source: TaskStatus, target: TaskStatus, info: ErrorInfo | None
) -> None:
    """The one structlog event of a transition (failures at WARNING, with their error and,
    where the attempt ran here, its traceback)."""
    fields = {"from": source.value, "to": target.value}
    if info is None:
        log.debug(
            "task_transition",
            task_id=task.id,
            name=task.name,
            queue=task.queue,
            attempt=task.attempts,
            **fields,
        )
    else:
        log.warning(
            "task_transition", task_id=task.id, name=task.name, queue=task.queue,
            attempt=task.attempts, error=info.message, error_type=info.type,
            traceback=info.traceback, **fields,
        )  # fmt: skip
