"""The state writer: the one place where a task's status changes, in every backend.

Every transition of every task goes through here: a submit claimed at once, a claim,
an attempt's outcome, a retry, a cancel (local, or of a task held elsewhere), a requeue,
an interruption at shutdown, and the takeover of a dead or expired owner's task. Each
one checks ``TRANSITIONS``, is written to the journal first when there is one (as a
``Change`` the journal applies only if the row is still as this process saw it), then
updates memory and emits the one ``task_transition`` event. The journal executes the
change; it decides nothing.

``start``/``complete`` are ``commit``'s two commonest cases unrolled for the in-memory
worker (they are most of what a task costs); ``tests/test_writer.py`` checks that they
leave a task exactly as ``commit`` does.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Awaitable
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio

from ._clock import Clock, system_clock
from ._errors import (
    InvalidTransition,
    JournalError,
    SerializationError,
    TaskInterrupted,
    TaskNotFound,
)
from ._events import DEBUG, WARNING, is_enabled, log, transition
from ._models import ErrorInfo, dumps, utc
from ._states import TRANSITIONS, TaskStatus, check_transition, reclaim_target
from .journal import _rows
from .journal._protocol import (
    BatchingJournal,
    Change,
    ClaimingJournal,
    ClaimLimits,
    Journal,
    TaskRow,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

    from ._flow import Queue
    from ._queue import ReadyQueue
    from ._retry import RetryPolicy
    from ._table import TaskTable
    from ._task import Task

__all__ = [
    "RoomWriter", "StateWriter", "cancel_row", "requeue_row", "reschedule_row", "take_over",
]  # fmt: skip

PENDING, RUNNING, RETRYING = TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.RETRYING
COMPLETED, FAILED, CANCELLED = TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED
_WAITING = frozenset({PENDING, RETRYING})


class StateWriter:
    """Changes the status of the tasks this process holds (memory, journal, event)."""

    __slots__ = (
        "_apply_soon",
        "_claiming",
        "claims_on_insert",
        "clock",
        "giving_up",
        "journal",
        "lease",
        "max_recoveries",
        "now",
        "owner",
        "park",
        "queue",
        "shared",
        "spawn",
        "table",
        "unknown",
    )

    def __init__(
        self,
        table: TaskTable,
        queue: ReadyQueue,
        journal: Journal | None,
        owner: str,
        max_recoveries: int,
        clock: Clock = system_clock,
    ) -> None:
        self.table = table
        self.queue = queue
        self.journal = journal
        self.owner = owner
        self.max_recoveries = max_recoveries
        #: the manager's one clock; ``now`` is its ``time``, bound once for the hot path
        self.clock = clock
        self.now = clock.time
        self.lease = journal.lease_timeout if journal is not None else 0.0
        #: completions that do not wait for their commit, where the journal can
        self._apply_soon = journal.apply_soon if isinstance(journal, BatchingJournal) else None
        #: the journal, where a submit that finds a worker idle may store its task already
        #: claimed (the isinstance check of a Protocol is slow: made once, here)
        self._claiming = journal if isinstance(journal, ClaimingJournal) else None
        self.claims_on_insert = self._claiming is not None
        #: ids of tasks whose last write failed and whose row is not known yet: their
        #: lease is not renewed, so another manager may take them over meanwhile
        self.unknown: set[str] = set()
        #: set at the end of a shutdown: failed writes are no longer retried
        self.giving_up = False
        #: starts a background task in the manager's task group (set while it runs)
        self.spawn: Callable[..., object] | None = None
        #: queues whose limits hold journal-wide (``Queue(shared=True)``), by name
        self.shared: dict[str, Queue] = {}
        #: (task, why, delay): a claim the journal refused for a limit, tried again later
        self.park: Callable[[Task, str | None, float], None] | None = None

    # ------------------------------------------------------------ accepting a task

    def submitted(self, task: Task) -> None:
        """A new PENDING task, accepted (and stored, with a journal)."""
        self.table.add(task)
        if is_enabled(DEBUG):
            log.debug(
                "task_submitted", task_id=task.id, name=task.name, queue=task.queue, attempt=0
            )

    async def insert_claimed(self, task: Task, row: TaskRow) -> TaskRow:
        """Accept and claim in one journal write (PENDING -> RUNNING folded into the
        insert); returns the stored row, another task's if its key is held elsewhere."""
        journal = self._claiming
        assert journal is not None
        row = _rows.claimed_row(row, self.owner, task.created_at + self.lease)
        stored = await journal.insert_claimed(row)
        if stored.id == task.id:
            self.take_claimed(task)
        return stored

    def take_claimed(self, task: Task) -> None:
        """Hold a task stored as claimed by this process: its PENDING -> RUNNING."""
        self.submitted(task)
        task.version = 1
        self.commit(task, RUNNING, task.created_at)
        self.table.running.add(task)

    def adopt(
        self,
        row: TaskRow,
        name: str,
        fn: Callable[..., Coroutine[Any, Any, Any]],
        base_retry: RetryPolicy | None,
    ) -> Task:
        """Hold a journaled task in memory to run it here (a restart, or work another
        manager submitted); its status is the row's, so no transition happens."""
        task = _rows.task_from_row(row, name, fn, base_retry)
        self.table.add(task)
        return task

    # ------------------------------------------------------------ the in-memory worker

    def start(self, task: Task) -> bool:
        """``commit(task, RUNNING)``, unrolled; False if the task was cancelled while
        queued."""
        source = task.status
        if source is not PENDING and source is not RETRYING:
            return False
        counts = self.table.counts
        counts[source] -= 1
        counts[RUNNING] += 1
        task.status = RUNNING
        task.interrupted = False
        task.attempts += 1
        if task.started_at is None:
            task.started_at = self.now()
        self.table.running.add(task)
        if is_enabled(DEBUG):
            transition(task, source, RUNNING, None)
        return True

    def complete(self, task: Task, result: Any) -> None:
        """``commit(task, COMPLETED, result=...)``, unrolled."""
        if task.status is not RUNNING:
            check_transition(task.status, COMPLETED)
        table = self.table
        table.running.discard(task)
        counts = table.counts
        counts[RUNNING] -= 1
        counts[COMPLETED] += 1
        task.status = COMPLETED
        task.finished_at = self.now()
        task.result = result
        table.settle(task)
        if task.waiters is not None:
            task.waiters.set()
            task.waiters = None
        if is_enabled(DEBUG):
            transition(task, RUNNING, COMPLETED, None)

    def commit(
        self,
        task: Task,
        target: TaskStatus,
        now: float,
        result: Any = None,
        error: BaseException | None = None,
        retry_at: float = 0.0,
        info: ErrorInfo | None = None,
    ) -> None:
        """The in-memory half of a transition, and its event, after any journal write."""
        source = task.status
        if target not in TRANSITIONS[source]:
            check_transition(source, target)  # raises InvalidTransition
        if info is None and error is not None:
            info = ErrorInfo.from_exception(error)
        counts = self.table.counts
        counts[source] -= 1
        counts[target] += 1
        task.status = target
        if target is RUNNING:
            task.interrupted = False
            task.attempts += 1
            if task.started_at is None:
                task.started_at = now
        elif target is RETRYING:
            task.error, task.exc = info, error
            task.scheduled_at = retry_at
        elif target is PENDING:
            if source is RUNNING:  # interrupted: runs again
                task.recoveries += 1
            else:  # requeue: a fresh start
                task.attempts = task.recoveries = 0
                task.result = task.error = task.exc = task.progress = None
                task.started_at = task.finished_at = None
                task.cancel_requested = False
                task.scheduled_at = now
        else:  # terminal
            task.finished_at = now
            if target is COMPLETED:
                task.result = result
            elif target is FAILED:
                task.error, task.exc = info, error
            self.table.settle(task)
        if task.waiters is not None and target is not RUNNING:
            task.waiters.set()
            task.waiters = None
        if target is FAILED or target is RETRYING:
            if is_enabled(WARNING):
                transition(task, source, target, info)
        elif is_enabled(DEBUG):
            transition(task, source, target, None)

    # ------------------------------------------------------------ through the journal

    async def apply(
        self,
        task: Task,
        target: TaskStatus,
        *,
        result: Any = None,
        error: BaseException | None = None,
        retry_at: float = 0.0,
        limits: ClaimLimits | None = None,
    ) -> bool:
        """Change a task's status: the table, then the journal, then memory (``commit``).

        False when the journal refused the change because another manager sharing it got
        there first; the task is then theirs and is dropped from this one. Also False,
        with ``limits.refused`` set and the task still here, when ``limits`` (a claim's)
        held it back.
        """
        check_transition(task.status, target)
        now = self.now()
        journal = self.journal
        info = None if error is None else ErrorInfo.from_exception(error)
        if journal is not None:
            change = _rows.change(
                task, target, now, result, info, retry_at, self.owner, now + self.lease
            )
            if limits is not None:
                change.limits = limits
            task.busy = True
            try:
                applied = await self._write(change)
            finally:
                task.busy = False
            if not applied and limits is not None and limits.refused is not None:
                return False
            if not self._written(task, change, applied):
                return False
        self.commit(task, target, now, result, error, retry_at, info)
        return True

    async def _write(self, change: Change) -> bool:
        """``journal.apply(change)`` until the journal answers, applied or not.

        A write that fails (the database restarts or drops the connection, a lock held
        past the busy timeout, a full disk) is retried with backoff; before each retry
        the row is read again, so that a commit whose answer was lost counts as applied
        instead of being written twice, and a row another manager moved on meanwhile
        counts as refused. While the outcome is unknown the task's lease is not renewed.
        """
        journal = self.journal
        assert journal is not None
        try:
            return await journal.apply(change)
        except JournalError as exc:
            failure: JournalError = exc
        task_id = change.task_id
        self.unknown.add(task_id)
        delay = 0.05
        try:
            while True:
                if is_enabled(WARNING):
                    log.warning(
                        "journal_write_failed", task_id=task_id, to=change.target.value,
                        error=str(failure), retry_in=delay,
                    )  # fmt: skip
                if self.giving_up:
                    raise failure
                await self.clock.sleep(delay)
                delay = min(delay * 2, 1.0)
                try:
                    row = await journal.get(task_id)
                    if row is None or row.version != change.version:
                        return _landed(row, change, self.owner)
                    if row.status is not change.source:
                        return False
                    return await journal.apply(change)
                except JournalError as exc:
                    failure = exc
        finally:
            self.unknown.discard(task_id)

    def _written(self, task: Task, change: Change, applied: bool) -> bool:
        """After a journal write of ``change``: the task's new version, or, if another
        manager got there first, the task is theirs (dropped here). False then."""
        if not applied:
            self.lose(task)
            return False
        task.version = change.version + 1
        return True

    def lose(self, task: Task) -> None:
        """Another manager moved this task on: it is no longer ours to run or finish."""
        self.queue.discard(task)
        self.table.lose(task)

    async def claim(self, task: Task) -> bool:
        """PENDING/RETRYING -> RUNNING through the journal, unless the task moved on
        (cancelled, or claimed by another manager first)."""
        if task.status not in _WAITING or task.remote:
            return False
        limits = None
        if task.lock is not None or (self.shared and task.queue in self.shared):
            limits = self.limits(task)
        if not await self.apply(task, RUNNING, limits=limits):
            if limits is not None and limits.refused is not None and not task.remote:
                await self._refused(task, limits.refused)
            return False
        self.table.running.add(task)
        return True

    def limits(self, task: Task) -> ClaimLimits:
        """What the claim of ``task`` must respect journal-wide: its lock, and its queue's
        figures if they are shared. (The local ones the ready queue already enforced.)"""
        limits = ClaimLimits(task.queue, lock=task.lock, priority=task.priority)
        config = self.shared.get(task.queue)
        if config is not None:
            limits.limit = config.limit
            if config.per_partition is not None:
                limits.partition, limits.per_partition = task.partition, config.per_partition
            rate = config.rate_limit
            if rate is not None:
                limits.rate, limits.period = rate
        return limits

    async def _refused(self, task: Task, why: str) -> None:
        """A claim held back by a journal-wide limit: the task stays PENDING/RETRYING and
        tries again after a short wait, or sooner when another manager frees something
        (the watcher unparks it); a cancel asked for meanwhile wins."""
        if is_enabled(DEBUG):
            log.debug(
                "task_claim_refused", task_id=task.id, name=task.name, queue=task.queue, why=why
            )
        if task.cancel_requested:
            await self.apply(task, CANCELLED)
        elif self.park is not None:
            self.park(task, why, random.uniform(0.05, 0.2))

    async def finish(
        self,
        task: Task,
        target: TaskStatus,
        *,
        result: Any = None,
        error: BaseException | None = None,
        retry_at: float = 0.0,
    ) -> bool:
        """Record how a claimed attempt ended (COMPLETED, FAILED, RETRYING, CANCELLED);
        True if the task now waits for its next attempt (the caller queues it)."""
        self.table.running.discard(task)
        if task.status is RUNNING or (task.status in _WAITING and target is CANCELLED):
            await self.apply(task, target, result=result, error=error, retry_at=retry_at)
        if task.status is RETRYING and not task.remote:
            if not task.cancel_requested:
                return True
            await self.apply(task, CANCELLED)  # asked for while the retry was written
        return False

    def complete_soon(self, task: Task, result: Any) -> Awaitable[None] | bool:
        """RUNNING -> COMPLETED without waiting for the commit, where the journal can
        (``BatchingJournal``): the worker is free at once, and the task is settled in
        memory when its batch commits, before anyone of that batch wakes, so a task
        claimed in the same batch never overlaps it. False: take the waiting path (the
        result does not serialise, or the journal cannot). An awaitable: the write leads
        the next batch, await it. Not a coroutine, and no closure: a worker's every task
        goes through here, and fewer objects in flight mean fewer garbage collections."""
        apply_soon = self._apply_soon
        if apply_soon is None:
            return False
        now = self.now()
        try:
            change = _rows.change(task, COMPLETED, now, result, None, 0.0, self.owner, 0.0)
        except SerializationError:
            return False
        self.table.running.discard(task)
        task.busy = True
        lead = apply_soon(change, partial(self._completed_soon, task, change, now, result))
        return True if lead is None else lead

    def _completed_soon(
        self,
        task: Task,
        change: Change,
        now: float,
        result: Any,
        applied: bool,
        error: BaseException | None,
    ) -> None:
        """The commit of ``complete_soon``'s write (or its failure)."""
        task.busy = False
        if error is not None:  # the batch failed: write it again, waiting this time
            if self.spawn is not None and isinstance(error, JournalError):
                task.busy = True
                self.spawn(self._complete_again, task, change, now, result)
            else:
                log.error("journal_error", task_id=task.id, name=task.name, error=str(error))
        elif self._written(task, change, applied) and task.status is RUNNING:
            self.commit(task, COMPLETED, now, result)

    async def _complete_again(self, task: Task, change: Change, now: float, result: Any) -> None:
        """A completion whose non-waiting write failed: ``_write`` owns it now."""
        try:
            applied = await self._write(change)
        except JournalError as exc:  # shutting down with the journal still away
            log.error("journal_error", task_id=task.id, name=task.name, error=str(exc))
            return
        finally:
            task.busy = False
        if self._written(task, change, applied) and task.status is RUNNING:
            self.commit(task, COMPLETED, now, result)

    async def interrupt(self, task: Task) -> None:
        """An attempt cut short by shutdown. Without a journal the task ends CANCELLED;
        with one, ``reclaim_target`` decides (PENDING to run on the next start)."""
        self.table.running.discard(task)
        if self.journal is None:
            await self.apply(task, CANCELLED)
            return
        target = reclaim_target(task.recoveries + 1, self.max_recoveries, task.cancel_requested)
        error = None
        if target is FAILED:
            error = TaskInterrupted(task.id, task.recoveries + 1, self.max_recoveries)
        await self.apply(task, target, error=error)

    async def cancel_waiting(self, task: Task) -> bool:
        """Cancel a PENDING or RETRYING task held here; False if it moved on meanwhile
        (the caller looks again)."""
        self.queue.discard(task)
        return await self.apply(task, CANCELLED)

    async def requeue(self, task: Task) -> None:
        """A FAILED or CANCELLED task held here back to PENDING, with fresh attempts."""
        if task.key is not None and self.table.keys.get(task.key, task) is not task:
            raise InvalidTransition(f"another unfinished task holds the key {task.key!r}")
        if not await self.apply(task, PENDING):
            raise InvalidTransition(f"task {task.id} changed while being requeued; try again")
        self.table.unsettle(task)

    async def reschedule(self, task: Task, scheduled_at: float) -> bool:
        """Move a PENDING or RETRYING task held here to not-before ``scheduled_at``,
        keeping its status: a change of the row, not a transition (no version of the
        table applies; one ``task_rescheduled`` event). The caller has taken the task out
        of the ready queue and queues it again. False when the journal refused the write
        because another manager moved the task on first: it is theirs now (``lose``)."""
        status = task.status
        if status not in _WAITING:
            raise InvalidTransition(
                f"only pending or retrying tasks can be rescheduled; task {task.id} is"
                f" {status.value}"
            )
        journal = self.journal
        if journal is not None:
            change = _rows.reschedule_change(
                task.id, task.version, status, task.attempts, scheduled_at, self.now(), self.owner
            )
            task.busy = True
            try:
                applied = await self._write(change)
            finally:
                task.busy = False
            if not self._written(task, change, applied):
                return False
        task.scheduled_at = scheduled_at
        _rescheduled(task, status, scheduled_at)
        return True

    async def drop_waiting(self) -> None:
        """At exit: without a journal, tasks that never ran end CANCELLED; with one, they
        stay PENDING on disk for the next start and are only forgotten here."""
        table = self.table
        for task in [t for t in table.tasks.values() if t.status in _WAITING]:
            self.queue.discard(task)
            if self.journal is None:
                await self.apply(task, CANCELLED)
            else:
                table.forget(task)

    async def progress(self, task: Task) -> None:
        """Record a running attempt's progress (no transition: no version, no event)."""
        if self.journal is not None and task.progress is not None:
            fraction, message, at = task.progress
            text = dumps({"fraction": fraction, "message": message, "updated_at": at}, "progress")
            await self.journal.set_progress(task.id, self.owner, task.version, text)

    async def take_over(self, row: TaskRow, lease_before: float | None) -> TaskRow | None:
        """A RUNNING row whose owner is gone (dead, or its lease not renewed in time)."""
        assert self.journal is not None
        return await take_over(
            self.journal, self.owner, row, self.clock.time(), self.max_recoveries, lease_before
        )


class RoomWriter(StateWriter):
    """The state writer of a manager whose ``submit`` waits for room at ``max_pending``
    (``when_full="wait"``): after every change that may leave fewer tasks waiting (a
    start, a transition, a task lost to another manager) it wakes the submits waiting
    for room, which count again. A subclass, so that a manager that raises ``QueueFull``
    instead pays nothing for it on its hot path."""

    # No __slots__ (one writer per manager): the constructor stays StateWriter's.
    _room: anyio.Event | None = None

    def room(self) -> anyio.Event:
        """An event set at the next change that may have made room."""
        if self._room is None:
            self._room = anyio.Event()
        return self._room

    def freed(self) -> None:
        room = self._room
        if room is not None:
            self._room = None
            room.set()

    def start(self, task: Task) -> bool:
        started = super().start(task)
        self.freed()
        return started

    def commit(
        self,
        task: Task,
        target: TaskStatus,
        now: float,
        result: Any = None,
        error: BaseException | None = None,
        retry_at: float = 0.0,
        info: ErrorInfo | None = None,
    ) -> None:
        super().commit(task, target, now, result, error, retry_at, info)
        self.freed()

    def lose(self, task: Task) -> None:
        super().lose(task)
        self.freed()


def _landed(row: TaskRow | None, change: Change, owner: str) -> bool:
    """Whether a row read after a failed write shows that write committed: one version
    on, in the target status, and (for a claim) ours."""
    if row is None or row.version != change.version + 1 or row.status is not change.target:
        return False
    return change.target is not RUNNING or row.owner == owner


# ---------------------------------------------------------------- tasks known by their row


def _rescheduled(task: Task | TaskRow, status: TaskStatus, scheduled_at: float) -> None:
    if is_enabled(DEBUG):
        log.debug(
            "task_rescheduled", task_id=task.id, name=task.name, queue=task.queue,
            status=status.value, scheduled_at=utc(scheduled_at).isoformat(),
        )  # fmt: skip


def _row_transition(row: TaskRow, change: Change) -> None:
    """The event of a transition written for a task known only by its row."""
    error_json = change.fields.get("error_json")
    if error_json is not None or change.target is FAILED:
        if is_enabled(WARNING):
            info = ErrorInfo.model_validate_json(error_json) if error_json else None
            transition(row, change.source, change.target, info)
    elif is_enabled(DEBUG):
        transition(row, change.source, change.target, None)


def _row_change(
    row: TaskRow, target: TaskStatus, fields: dict[str, Any], owner: str, now: float
) -> Change:
    check_transition(row.status, target)
    return Change(row.id, row.version, row.status, target, row.attempts, now, owner, fields)


async def take_over(
    journal: Journal,
    owner: str,
    row: TaskRow,
    now: float,
    max_recoveries: int,
    lease_before: float | None,
) -> TaskRow | None:
    """Take a dead or expired owner's RUNNING task: ``reclaim_target`` decides where it
    goes; with ``lease_before`` the change applies only while the row's lease is still
    before it (not if the owner renewed it meanwhile). Returns the row as written, or
    None."""
    interruptions = row.recoveries + 1
    target = reclaim_target(interruptions, max_recoveries, row.cancel_requested)
    check_transition(row.status, target)
    info = None
    if target is FAILED:
        why = ErrorInfo.from_exception(TaskInterrupted(row.id, interruptions, max_recoveries))
        info = why.model_copy(update={"message": f"{why.message} (last owner {row.owner!r})"})
    change = _rows.takeover_change(row, target, now, owner, info, lease_before)
    if not await journal.apply(change):
        return None
    _row_transition(row, change)
    return dataclasses.replace(
        row, status=target, version=row.version + 1, cancel_requested=False, **change.fields
    )


async def cancel_row(
    journal: Journal, owner: str, task_id: str, clock: Clock = system_clock
) -> bool:
    """Cancel a task through the journal alone: pending ones at once, running ones by
    asking their owner (who sees the request within a poll interval)."""
    for _ in range(20):
        row = await journal.get(task_id)
        if row is None or row.status.is_terminal:
            return False
        if row.status is RUNNING:
            if await journal.request_cancel(task_id) is not None:
                return True
            continue
        now = clock.time()
        fields = {"finished_at": now, "owner": None, "lease_until": None}
        change = _row_change(row, CANCELLED, fields, owner, now)
        if await journal.apply(change):
            _row_transition(row, change)
            return True
    return False


async def requeue_row(
    journal: Journal, owner: str, task_id: str, clock: Clock = system_clock
) -> TaskRow:
    """Requeue a FAILED or CANCELLED task through the journal alone."""
    for _ in range(20):
        row = await journal.get(task_id)
        if row is None:
            raise TaskNotFound(task_id)
        if row.status not in (FAILED, CANCELLED):
            raise InvalidTransition(
                "only failed or cancelled tasks can be requeued; "
                f"task {task_id} is {row.status.value}"
            )
        now = clock.time()
        change = _row_change(row, PENDING, _rows.requeue_fields(now), owner, now)
        if await journal.apply(change):
            _row_transition(row, change)
            new = await journal.get(task_id)
            assert new is not None
            return new
    raise InvalidTransition(f"task {task_id} kept changing while being requeued")


async def reschedule_row(
    journal: Journal, owner: str, task_id: str, scheduled_at: float, clock: Clock = system_clock
) -> TaskRow:
    """Reschedule a PENDING or RETRYING task through the journal alone (it may be
    queued in another manager, which sees the change among the journal's ``changes``)."""
    for _ in range(20):
        row = await journal.get(task_id)
        if row is None:
            raise TaskNotFound(task_id)
        if row.status not in _WAITING:
            raise InvalidTransition(
                "only pending or retrying tasks can be rescheduled; "
                f"task {task_id} is {row.status.value}"
            )
        change = _rows.reschedule_change(
            row.id, row.version, row.status, row.attempts, scheduled_at, clock.time(), owner
        )
        if await journal.apply(change):
            _rescheduled(row, row.status, scheduled_at)
            return dataclasses.replace(
                row, version=row.version + 1, scheduled_at=scheduled_at, cancel_requested=False
            )
    raise InvalidTransition(f"task {task_id} kept changing while being rescheduled")
