"""The task state machine: the statuses and the one table of allowed transitions."""

from __future__ import annotations

import enum
from typing import Final

from ._errors import InvalidTransition

__all__ = ["TRANSITIONS", "TaskStatus", "check_transition"]


class TaskStatus(enum.StrEnum):
    """Where a task is in its life; the values are what journals and JSON hold."""

    PENDING = "pending"
    RUNNING = "running"
    RETRYING = "retrying"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL: Final = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED})

P, R, Y = TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.RETRYING
C, F, X = TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED

#: Every allowed status change; anything else is a bug or a race and raises.
TRANSITIONS: Final[dict[TaskStatus, frozenset[TaskStatus]]] = {
    P: frozenset({R, X}),  # claimed by a worker; cancelled while waiting
    R: frozenset({C, F, Y, P, X}),  # outcome; retry; interrupted (shutdown, crash); cancelled
    Y: frozenset({R, X}),  # next attempt; cancelled during backoff
    C: frozenset(),
    F: frozenset({P}),  # requeue
    X: frozenset({P}),  # requeue
}
del P, R, Y, C, F, X


def check_transition(source: TaskStatus, target: TaskStatus) -> None:
    """Raise InvalidTransition unless the table allows source -> target."""
    if target not in TRANSITIONS[source]:
        raise InvalidTransition(f"a task cannot go from {source.value} to {target.value}")
