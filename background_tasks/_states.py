"""The task state machine: the statuses, the one table of allowed transitions, and the
rule that decides where an interrupted attempt's task goes.

Both are data or pure functions; the state writer (``_writer``) is the only code that
consults them to change a task, in memory and in a journal alike.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from ._errors import InvalidTransition

__all__ = ["TRANSITIONS", "TaskStatus", "check_transition", "reclaim_target"]


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

#: Every allowed status change; anything else is a bug or a race and raises. Read-only:
#: the table is the contract, not a setting.
TRANSITIONS: Final[Mapping[TaskStatus, frozenset[TaskStatus]]] = MappingProxyType(
    {
        P: frozenset({R, X}),  # claimed by a worker; cancelled while waiting
        # outcome; retry; interrupted (shutdown, crash, takeover); cancelled
        R: frozenset({C, F, Y, P, X}),
        Y: frozenset({R, X}),  # next attempt; cancelled during backoff
        C: frozenset(),
        F: frozenset({P}),  # requeue
        X: frozenset({P}),  # requeue
    }
)
del P, R, Y, C, F, X


def check_transition(source: TaskStatus, target: TaskStatus) -> None:
    """Raise InvalidTransition unless the table allows source -> target."""
    if target not in TRANSITIONS[source]:
        raise InvalidTransition(f"a task cannot go from {source.value} to {target.value}")


def reclaim_target(interruptions: int, max_recoveries: int, cancel_requested: bool) -> TaskStatus:
    """Where a RUNNING task goes when its attempt is cut short without an outcome (a
    shutdown, or a dead owner's task taken over); ``interruptions`` counts this one.

    A cancel that was asked for is honoured (it must not die with the owner); a task
    interrupted more than ``max_recoveries`` times keeps killing its process and fails;
    anything else runs again.
    """
    if cancel_requested:
        return TaskStatus.CANCELLED
    if interruptions > max_recoveries:
        return TaskStatus.FAILED
    return TaskStatus.PENDING
