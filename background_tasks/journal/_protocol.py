"""The journal contract: what the manager asks of durable storage, and nothing more.

A journal stores one row per task plus a history of transitions. It never decides a
transition; the manager does (``_manager._apply``) and hands the journal a ``Change``,
which the journal applies only if the row is still at the version the manager saw
(optimistic concurrency). That one rule gives atomic claims across processes, fencing of
late outcomes from owners whose lease expired, and safe cancel/requeue from anywhere.

All times are epoch seconds (``time.time()``); statuses are ``TaskStatus`` values.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from .._models import TransitionRecord
from .._states import TaskStatus

__all__ = ["Change", "Journal", "TaskRow"]


@dataclass(slots=True)
class TaskRow:
    """One task as a journal holds it. JSON columns are text, already encoded."""

    id: str
    name: str
    queue: str
    status: TaskStatus
    priority: int
    args_json: str  # a JSON array
    kwargs_json: str  # a JSON object
    key: str | None
    attempts: int  # attempts started so far
    max_attempts: int
    created_at: float
    scheduled_at: float  # not before
    options_json: str | None = None  # per-submit timeout/retry overrides, JSON object
    recoveries: int = 0  # attempts cut short by shutdown or a crash
    started_at: float | None = None
    finished_at: float | None = None
    result_json: str | None = None
    error_json: str | None = None  # ErrorInfo as JSON
    progress_json: str | None = None  # Progress as JSON
    owner: str | None = None  # who runs it while RUNNING
    lease_until: float | None = None
    cancel_requested: bool = False
    version: int = 0  # bumped by every applied Change; the optimistic-concurrency token


@dataclass(slots=True)
class Change:
    """One transition to write: ``source -> target`` if the row is still at ``version``.

    ``fields`` are TaskRow attribute names and their new values (``status`` and
    ``version`` are set by the journal). The history line records ``attempt``, ``at``,
    ``owner`` and ``fields.get("error_json")``.
    """

    task_id: str
    version: int
    source: TaskStatus
    target: TaskStatus
    attempt: int
    at: float
    owner: str | None
    fields: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Journal(Protocol):
    """Durable storage for tasks. Every method raises JournalError on a storage failure."""

    lease_timeout: float

    async def open(self, owner: str) -> None:
        """Open (creating or migrating the schema); JournalError names the path and reason."""

    async def close(self) -> None:
        """Flush pending writes and release the storage; safe to call twice."""

    async def insert(self, row: TaskRow) -> TaskRow:
        """Store a new PENDING task durably (with its first history line).

        If ``row.key`` is set and a task with that key is not finished, store nothing and
        return that task's row instead (the caller compares ids).

        A journal whose class sets ``claims_on_insert = True`` also takes a row that is
        already claimed (``status`` RUNNING, ``version`` 1, ``attempts`` 1, ``owner``,
        ``lease_until``, ``started_at``): it stores the row as it is, with two history
        lines (submitted, then PENDING -> RUNNING). The manager then claims a task in the
        transaction that accepts it when a worker is idle, one write instead of two.
        """

    async def apply(self, change: Change) -> bool:
        """Apply a change if the row is at ``change.version`` and in ``change.source``;
        the row's version becomes ``change.version + 1``.

        False when the condition did not hold (someone else claimed, cancelled or
        reclaimed the task). Durable before it returns.

        A journal may also offer ``apply_soon(change, settle)``: the same write without
        waiting for it, ``settle(applied, error)`` called on the event loop once it is
        committed (or failed), before any caller waiting on the same commit resumes. It
        is a plain call returning None, or an awaitable that the caller must await when
        its write has to start the next batch. A worker then records a completion and is
        free at once (``_complete_soon``).
        """

    async def request_cancel(self, task_id: str) -> TaskRow | None:
        """Ask the owner of a RUNNING task to cancel it; None if it is not RUNNING."""

    async def set_progress(
        self, task_id: str, owner: str, version: int, progress_json: str
    ) -> None:
        """Record progress of a running attempt (no version bump, no history line)."""

    async def renew(self, owner: str, lease_until: float) -> None:
        """Extend the lease of every RUNNING row this owner holds (the heartbeat)."""

    async def reclaim(self, now: float, max_recoveries: int) -> builtins.list[TaskRow]:
        """RUNNING rows whose lease ended before ``now`` go back to PENDING (recoveries+1),
        or to FAILED once recoveries would exceed ``max_recoveries``, or to CANCELLED when
        a cancel was requested (its owner died before honouring it); returns the new rows."""

    async def get(self, task_id: str) -> TaskRow | None: ...

    async def list(
        self,
        *,
        status: TaskStatus | None = None,
        queue: str | None = None,
        name: str | None = None,
        limit: int = 100,
    ) -> builtins.list[TaskRow]:
        """Newest first (by id, which sorts by creation)."""

    async def history(self, task_id: str) -> builtins.list[TransitionRecord]: ...

    async def runnable(self) -> tuple[builtins.list[TaskRow], int]:
        """Every PENDING and RETRYING row, and the change cursor to poll ``changes`` from."""

    async def changes(self, since: int, exclude_owner: str) -> tuple[builtins.list[TaskRow], int]:
        """Rows written after cursor ``since`` by anyone but ``exclude_owner`` (inserts,
        applied changes, cancel requests, reclaims), and the new cursor."""

    async def counts(self) -> dict[TaskStatus, int]: ...

    async def purge(self, older_than: float, batch: int = 1000) -> int:
        """Delete finished rows (and their history) finished before ``older_than``."""
