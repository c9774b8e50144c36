"""The journal contract: what the manager asks of durable storage, and nothing more.

A journal stores one row per task plus a history of transitions. It never decides a
transition; the manager's state writer does and hands the journal a ``Change``,
which the journal applies only if the row is still at the version the manager saw
(optimistic concurrency). That one rule gives atomic claims across processes, fencing of
late outcomes from owners whose lease expired, and safe cancel/requeue from anywhere.

All times are epoch seconds (``time.time()``); statuses are ``TaskStatus`` values.

``Journal`` is what every journal must do. What a journal may do besides, and the manager
uses when it is there, is a protocol of its own, checked with ``isinstance``:
``ClaimingJournal`` (insert a task already claimed), ``BatchingJournal`` (apply without
waiting for the commit), ``NotifyingJournal`` (wake up when another process writes),
``LivenessJournal`` (tell which owners are dead), ``InspectableJournal`` (the
aggregates ``bgtasks status`` shows) and ``PeriodicJournal`` (the state of periodic
tasks, for ticks fired once over all managers). Each one extends
``Journal``; a journal class may subclass the protocols it implements.
``background_tasks.testing.JournalContract`` tests all of them.
"""

from __future__ import annotations

import builtins
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from .._models import TransitionRecord
from .._states import TaskStatus

__all__ = [
    "BatchingJournal", "Change", "ClaimLimits", "ClaimingJournal", "ClockedJournal",
    "InspectableJournal", "Journal", "LivenessJournal", "NotifyingJournal", "PeriodicJournal",
    "PeriodicRow", "TaskRow",
]  # fmt: skip


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
    lock: str | None = None  # one RUNNING row per lock at most (submit(lock=))
    partition: str | None = None  # its partition of a per_partition queue
    shared: bool = False  # its queue's limits hold journal-wide: its RUNNING row counts


@dataclass(slots=True)
class ClaimLimits:
    """What a claim (PENDING/RETRYING -> RUNNING) must also respect, counted by the
    journal in the same transaction as the claim, so that no two managers can both pass
    a check and then both claim. Each condition is set or not (None):

    * ``limit``: fewer than ``limit`` RUNNING rows of ``queue`` with ``shared`` set;
    * ``per_partition``: fewer than that many of those in ``partition`` (NULL is a
      partition of its own);
    * ``lock``: no RUNNING row with this lock, and no PENDING or RETRYING row of it due
      by ``Change.at`` that comes first (higher priority, or equal priority and a smaller
      id) than the claimed row, whose ``priority`` this is;
    * ``rate``: fewer than ``rate`` starts of ``queue`` recorded after ``Change.at -
      period``; a claim that applies records its own start at ``Change.at`` (and may
      forget starts older than the window).

    When the row was still at the expected version and status but a condition failed,
    the journal leaves the row alone, ``apply`` returns False and the journal sets
    ``refused`` to the first condition that failed, in this order: "lock", "limit",
    "partition", "rate". It stays None when the row itself had moved on.
    """

    queue: str
    limit: int | None = None
    partition: str | None = None
    per_partition: int | None = None
    lock: str | None = None
    priority: int = 0
    rate: int | None = None
    period: float = 0.0
    refused: str | None = None

    def shape(self) -> tuple[bool, bool, bool, bool]:
        """Which conditions are set: (lock, limit, partition, rate)."""
        return (
            self.lock is not None,
            self.limit is not None,
            self.per_partition is not None,
            self.rate is not None,
        )


@dataclass(slots=True)
class PeriodicRow:
    """The state of one periodic task, as a ``PeriodicJournal`` keeps it."""

    name: str  # the periodic (and registered) task's name
    schedule: str  # the schedule as text: "cron */5 * * * * (UTC)", "every 300s"
    last_tick: float  # the latest tick decided: fired, skipped or missed
    next_tick: float  # the tick after it, as the manager that decided it computed it
    task_id: str | None  # the task of the latest fired tick (None before the first)
    version: int  # bumped by every write; the optimistic-concurrency token


@dataclass(slots=True)
class Change:
    """One transition to write: ``source -> target`` if the row is still at ``version``.
    A change whose ``source`` is its ``target`` changes the row and keeps its status (a
    reschedule moves a waiting task's ``scheduled_at``); it is applied, versioned,
    written to the history and reported by ``changes`` like any other.

    ``fields`` are TaskRow attribute names and their new values (``status`` and
    ``version`` are set by the journal). The history line records ``attempt``, ``at``,
    ``owner`` and ``fields.get("error_json")``.

    ``lease_before``, when set, is one more condition: the row's ``lease_until`` must also
    be before it (a NULL lease is not). A takeover of an expired lease sets it to the time
    it found the lease expired, so that it cannot win against the owner's heartbeat
    renewing the lease meanwhile (``renew`` bumps no version).

    ``limits``, set only on a claim of flow-controlled work (a lock, a shared queue), is
    what the claim must also respect (``ClaimLimits``); None costs a plain claim nothing.
    """

    task_id: str
    version: int
    source: TaskStatus
    target: TaskStatus
    attempt: int
    at: float
    owner: str | None
    fields: dict[str, Any] = field(default_factory=dict)
    lease_before: float | None = None
    limits: ClaimLimits | None = None


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
        """

    async def insert_many(self, rows: Sequence[TaskRow]) -> builtins.list[TaskRow]:
        """Store new PENDING tasks durably in ONE transaction: all of them or none
        (``JournalError`` then, nothing stored), each with its first history line as
        ``insert`` writes it. Returns the rows as stored, in their order. The rows have
        no key (``ValueError`` before anything is written otherwise); no rows, no write.
        """

    async def apply(self, change: Change) -> bool:
        """Apply a change if the row is at ``change.version`` and in ``change.source``;
        the row's version becomes ``change.version + 1``.

        With ``change.lease_before`` set, the row's ``lease_until`` must also be before
        it. False when a condition did not hold (someone else claimed, cancelled or
        reclaimed the task, or its owner renewed the lease). An applied change writes
        one history line. Durable before it returns.

        ``ValueError`` (and nothing written) when ``change.fields`` names a field that is
        not settable (``id``, ``status``, ``version`` or no TaskRow field at all).
        """

    async def request_cancel(self, task_id: str) -> TaskRow | None:
        """Ask the owner of a RUNNING task to cancel it; None if it is not RUNNING."""

    async def set_progress(
        self, task_id: str, owner: str, version: int, progress_json: str
    ) -> None:
        """Record progress of a running attempt (no version bump, no history line)."""

    async def renew(self, owner: str, lease_until: float, exclude: Collection[str] = ()) -> None:
        """Extend the lease of every RUNNING row this owner holds (the heartbeat), but
        the rows in ``exclude``: tasks whose last write failed, whose lease the manager
        lets run out so that another manager may take them over."""

    async def expired(self, now: float) -> builtins.list[TaskRow]:
        """RUNNING rows whose lease ended before ``now``, oldest first (by id).

        The journal decides nothing: the manager chooses each row's target and writes it
        with ``apply``, with ``Change.lease_before`` set so that a lease renewed in
        between is not taken over. (The manager passes ``math.inf`` and watches each
        lease on its own monotonic clock, so that clocks that disagree do not matter.)
        """

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


# --------------------------------------------------------------------------- capabilities


@runtime_checkable
class ClaimingJournal(Journal, Protocol):
    """A journal that stores a new task already claimed by the manager inserting it.

    A manager with an idle worker then accepts and claims a task in one write instead of
    two (an ``insert``, then an ``apply`` PENDING -> RUNNING), and the task starts one
    commit sooner.
    """

    async def insert_claimed(self, row: TaskRow) -> TaskRow:
        """Store a new task that its inserting manager has claimed, durably.

        ``row`` is a new task's row as ``insert`` takes it, but for what the claim sets:
        ``status`` RUNNING, ``version`` 1, ``attempts`` 1, ``owner``, ``lease_until`` and
        ``started_at`` (the other columns are a new task's: no recoveries, result, error,
        progress, finish time or cancel request; a journal may rely on that). Store the
        row as it is, with two history lines: submitted (source None, target PENDING,
        attempt 0, at ``created_at``), then PENDING -> RUNNING (attempt 1, at
        ``started_at``), both with ``row.owner``.

        A key is handled as by ``insert``: if ``row.key`` is set and a task with that key
        is not finished, store nothing and return that task's row (the caller compares
        ids and gives its claim back).
        """


@runtime_checkable
class BatchingJournal(Journal, Protocol):
    """A journal that can apply a change without its caller waiting for the commit.

    A worker then records a completion and is free at once; the manager settles the
    task in memory when the outcome is known.
    """

    def apply_soon(
        self, change: Change, settle: Callable[[bool, BaseException | None], None]
    ) -> Awaitable[None] | None:
        """``apply(change)`` without waiting for it.

        ``settle(applied, error)`` is called on the event loop once the write is
        committed (``applied`` as ``apply`` would return it, ``error`` None) or failed
        (``applied`` False, ``error`` the exception ``apply`` would raise), before any
        caller waiting on the same commit resumes.

        Returns None when the write joined a batch that is already on its way, or an
        awaitable when this call has to start the next batch: the caller must await it.
        Either way ``settle`` gets the outcome exactly once; the awaitable does not
        raise it. What ``apply`` refuses before writing anything (a journal that is not
        open, a field that is not settable) is raised by this call, and ``settle`` is
        then never called.
        """


@runtime_checkable
class NotifyingJournal(Journal, Protocol):
    """A journal that can tell a waiting manager that another process wrote to it
    (PostgreSQL's LISTEN/NOTIFY), so that ``changes`` need not be polled often."""

    async def wait_for_changes(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for another owner to write to this journal.

        Return early when such a write may have happened (returning early is always
        safe: the caller reads ``changes`` next), and at once for ``timeout <= 0``. A
        lost connection to the notifications is not an error: wait out the timeout or
        return early. Raises JournalError only when the journal is not open; cancelling
        the wait ends it at once.
        """


@runtime_checkable
class InspectableJournal(Journal, Protocol):
    """A journal that answers the aggregates an operator asks for (``bgtasks status``)."""

    async def counts_by_queue(self) -> dict[tuple[str, TaskStatus], int]:
        """How many tasks each queue has in each status: only pairs that occur."""

    async def finished_since(self, since: float) -> dict[TaskStatus, int]:
        """How many tasks reached COMPLETED, FAILED or CANCELLED at or after ``since``
        (by ``finished_at``), by status; every one of those three statuses is a key.
        RETRYING rows carry a ``finished_at`` too but are not finished: not counted."""

    async def oldest(self, status: TaskStatus) -> TaskRow | None:
        """The earliest created task in ``status`` (ids sort by creation); None if none."""

    async def waiting_by_queue(self, now: float) -> dict[str, tuple[int, int]]:
        """Per queue, its PENDING and RETRYING tasks due by ``now``: (those waiting for a
        worker or a limit, those waiting on a lock). A task waits on a lock while a
        RUNNING task holds it or a due task of the lock comes first (higher priority, or
        equal and older). Only queues with such tasks are keys."""


@runtime_checkable
class LivenessJournal(Journal, Protocol):
    """A journal that can tell when an owner is dead, not just late: the manager then
    takes its tasks over at once instead of after ``lease_timeout``.

    SQLite: each open journal holds an OS lock that its process's death releases,
    whatever killed it. PostgreSQL: a session advisory lock, released with the owner's
    dropped session.
    """

    #: Seconds an owner must stay reported dead before its tasks are taken over (0 where
    #: death is certain; more where a live owner can look dead for a moment, as every
    #: session of a restarted database server does until it reconnects).
    orphan_grace: float

    async def orphaned(self) -> builtins.list[TaskRow]:
        """RUNNING rows whose owner is dead, as far as the journal can see; never this
        journal's own. The manager takes them over with ``apply`` (the row's version
        fences a late write)."""


@runtime_checkable
class ClockedJournal(Journal, Protocol):
    """A journal with a clock of its own that every manager on it can read (PostgreSQL's
    server clock): the manager then measures due times and record times on it, so that
    managers on machines whose clocks disagree agree on when a task is due."""

    async def now(self) -> float:
        """The journal's clock, in epoch seconds."""


@runtime_checkable
class PeriodicJournal(Journal, Protocol):
    """A journal that keeps the state of periodic tasks, so that managers sharing it
    fire each tick once in all (no leader: the journal's conditional write decides).

    One row per periodic task (``PeriodicRow``), advanced only from the version its
    writer saw, in the same transaction as the task of the tick it fires: two managers
    that decide one tick both write it, and exactly one write applies.
    """

    async def periodic(self) -> builtins.list[PeriodicRow]:
        """Every periodic task's state, by name."""

    async def advance_periodic(self, state: PeriodicRow, row: TaskRow | None) -> bool:
        """Store ``state`` if the periodic row ``state.name`` is at ``state.version - 1``
        (none stored yet, for ``state.version == 1``), and with it, in one transaction,
        ``row`` when given: the tick's new PENDING task, stored as ``insert`` stores a
        task without looking at its key (a live task holding the key fails the whole
        write). False, and nothing written, when the periodic row is at another version
        (another manager decided first). Durable before it returns.
        """
