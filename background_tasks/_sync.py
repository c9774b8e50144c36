"""The journal watcher: recovery on start, then the service loops of a journaled manager:
the lease heartbeat and the takeover of dead owners' tasks (both on the manager's clock),
and the changes other managers sharing the journal make (polled in real time: how soon
this process sees what others wrote is I/O, not a time anything is due).

It changes no status itself: takeovers go through the state writer, and a row another
manager moved on makes the task held here ``lose`` it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import anyio
import anyio.abc

from ._clock import HEARTBEAT, UPKEEP, JournalClock
from ._errors import BackgroundTasksError
from ._events import log
from ._states import TaskStatus
from .journal._protocol import (
    ClockedJournal,
    Journal,
    LivenessJournal,
    NotifyingJournal,
    TaskRow,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from ._queue import Dispatch
    from ._registry import TaskRegistry
    from ._retry import RetryPolicy
    from ._table import TaskTable
    from ._task import Task
    from ._writer import StateWriter

__all__ = ["JournalSync"]

RUNNING = TaskStatus.RUNNING
#: How often a manager asks the journal for tasks of dead owners (the 2 s takeover).
_ORPHANS_EVERY = 0.5
#: A takeover applies only while the lease is the one watched (not renewed since).
_SAME_LEASE = 1e-6


class JournalSync:
    """Keeps this process's view of a shared journal current."""

    __slots__ = (
        "_liveness",
        "cursor",
        "default_retry",
        "dispatch",
        "journal",
        "leases",
        "poll_interval",
        "registry",
        "run_queues",
        "run_tasks",
        "suspects",
        "table",
        "unregistered",
        "writer",
    )

    def __init__(
        self,
        journal: Journal,
        writer: StateWriter,
        table: TaskTable,
        dispatch: Dispatch,
        registry: TaskRegistry,
        default_retry: RetryPolicy | None,
        run_tasks: bool,
        poll_interval: float,
    ) -> None:
        self.journal = journal
        self.writer = writer
        self.table = table
        self.dispatch = dispatch
        self.registry = registry
        self.default_retry = default_retry
        self.run_tasks = run_tasks
        #: the queues this manager runs (None: all); rows of others are left to others
        self.run_queues: frozenset[str] | None = None
        self.poll_interval = poll_interval
        self.cursor = 0
        self._liveness = journal if isinstance(journal, LivenessJournal) else None
        #: other owners' RUNNING rows: (lease_until seen, our monotonic time first seen)
        self.leases: dict[str, tuple[float, float]] = {}
        #: rows the journal reported orphaned: our monotonic time first reported
        self.suspects: dict[str, float] = {}
        #: names of journaled tasks seen that this manager does not register (logged once)
        self.unregistered: set[str] = set()

    def take(self, row: TaskRow) -> Task | None:
        """Hold and queue a runnable row here; None if this process does not run it (its
        name is not registered here, or this manager runs no tasks)."""
        if row.id in self.table.tasks or not self.run_tasks:
            return None
        if self.run_queues is not None and row.queue not in self.run_queues:
            return None
        registered = self.registry.tasks.get(row.name)
        if registered is None:  # another process may run it; say so once per name
            if row.name not in self.unregistered:
                self.unregistered.add(row.name)
                log.warning(
                    "task_name_not_registered", task_id=row.id, name=row.name,
                    reason="no task of this name is registered in this manager: it waits"
                    " for a manager that registers it (renamed in a deploy?)",
                )  # fmt: skip
            return None
        base = registered.options_["retry"] or self.default_retry
        task = self.writer.adopt(row, registered.name, registered.fn, base)
        self.dispatch.enqueue(task, row.scheduled_at)
        return task

    async def take_over_expired(self) -> None:
        """RUNNING rows whose owner stopped renewing its lease: taken over by the writer,
        and run here if they go back to PENDING.

        Expiry is measured on this process's monotonic clock, never by comparing a lease
        (another process's wall clock) with ours: a row counts as expired once its
        ``lease_until`` has not changed for ``lease_timeout`` seconds of our watching,
        and the takeover applies only if it still has not (``Change.lease_before``). A
        manager whose clock is off can then neither take live tasks nor lose its own.
        Never this manager's own rows: it is alive (their lease ran out while the
        journal was away), and it finishes what it holds.
        """
        now = self.writer.clock.monotonic()
        owner = self.writer.owner
        lease = self.journal.lease_timeout
        watched, self.leases = self.leases, {}
        for row in await self.journal.expired(math.inf):  # every lease, to watch
            if row.owner == owner or row.lease_until is None:
                continue
            seen = watched.get(row.id)
            if seen is None or seen[0] != row.lease_until:
                self.leases[row.id] = (row.lease_until, now)
            elif now - seen[1] < lease:
                self.leases[row.id] = seen
            else:
                await self._take_over(row, row.lease_until + _SAME_LEASE)

    async def take_over_orphaned(self) -> None:
        """RUNNING rows whose owner the journal knows to be dead (``LivenessJournal``):
        taken over at once, or after the journal's ``orphan_grace`` of our watching."""
        journal = self._liveness
        if journal is None:
            return
        now = self.writer.clock.monotonic()
        owner = self.writer.owner
        suspects, self.suspects = self.suspects, {}
        for row in await journal.orphaned():
            if row.owner == owner:
                continue
            since = suspects.get(row.id, now)
            if now - since >= journal.orphan_grace:
                await self._take_over(row, None)
            else:
                self.suspects[row.id] = since

    async def _take_over(self, row: TaskRow, lease_before: float | None) -> None:
        taken = await self.writer.take_over(row, lease_before)
        if taken is not None:
            self.leases.pop(row.id, None)
            self.seen(taken)

    async def read_clock(self) -> None:
        """Set a ``JournalClock`` to the journal's clock (at start, then every heartbeat)."""
        clock, journal = self.writer.clock, self.journal
        if isinstance(clock, JournalClock) and isinstance(journal, ClockedJournal):
            await clock.calibrate(journal.now)

    async def recover(self) -> None:
        """On start: the journal's clock read, dead owners' tasks taken over, then every
        runnable row queued here."""
        await self.read_clock()
        await self.take_over_orphaned()
        await self.take_over_expired()
        rows, self.cursor = await self.journal.runnable()
        for row in rows:
            self.take(row)

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """The heartbeat (every lease/3), the takeover of dead owners' tasks (every 0.5 s)
        and of expired leases (every lease/2), and others' changes. Started once the
        loops did their first round and wait on the clock."""
        async with anyio.create_task_group() as tg:
            lease = self.journal.lease_timeout
            await tg.start(self._every, self.renew, lease / 3, HEARTBEAT)
            await tg.start(self._every, self.take_over_orphaned, _ORPHANS_EVERY, UPKEEP)
            await tg.start(self._every, self.take_over_expired, lease / 2, UPKEEP)
            task_status.started()
            await self._watch()

    async def renew(self) -> None:
        """Extend the lease of every task this manager runs (the heartbeat), but those
        whose state is unknown after a failed write: their lease runs out."""
        await self.read_clock()
        writer = self.writer
        lease_until = writer.now() + self.journal.lease_timeout
        await self.journal.renew(writer.owner, lease_until, writer.unknown)

    async def _every(
        self,
        step: Callable[[], Awaitable[None]],
        interval: float,
        phase: int,
        *,
        task_status: anyio.abc.TaskStatus[None],
    ) -> None:
        """``step`` every ``interval`` seconds of the clock (a failed one again after
        ``poll_interval``); ``phase`` orders it on a test clock's jump (``_clock``)."""
        clock = self.writer.clock
        alarm = clock.alarm(phase)
        deadline = clock.monotonic()
        started = False
        try:
            while True:
                try:
                    await step()
                    wait = interval
                except BackgroundTasksError as exc:
                    log.error("journal_error", error=str(exc))
                    wait = min(interval, self.poll_interval)
                # On a fixed cadence; a round missed (a long step, a test clock's jump) is
                # not made up for: the next one is a full interval from now.
                deadline += wait
                now = clock.monotonic()
                if deadline <= now:
                    deadline = now + wait
                if not started:
                    started = True
                    task_status.started()
                await alarm.wait(deadline)
        finally:
            alarm.close()

    async def _watch(self) -> None:
        """What other managers wrote: polled every ``poll_interval`` (real time), or woken
        by a journal that pushes changes (PostgreSQL's LISTEN/NOTIFY)."""
        journal = self.journal
        owner = self.writer.owner
        notifying = journal if isinstance(journal, NotifyingJournal) else None
        while True:
            try:
                rows, self.cursor = await journal.changes(self.cursor, owner)
                freed = False
                for row in rows:
                    self.seen(row)
                    freed = freed or row.status is not RUNNING
                if freed and self.dispatch.ready.parked:
                    self.dispatch.unpark()  # a slot, lock or partition may be free now
                if notifying is None:
                    await anyio.sleep(self.poll_interval)
                else:  # at most 1 s, so a cancel from elsewhere still lands within a second
                    await notifying.wait_for_changes(1.0)
            except BackgroundTasksError as exc:
                log.error("journal_error", error=str(exc))
                await anyio.sleep(self.poll_interval)

    def seen(self, row: TaskRow) -> None:
        """React to a row another manager wrote (or a takeover this one wrote)."""
        table = self.table
        if row.status.is_terminal and table.elsewhere:
            table.finished_elsewhere(row.id)
        task = table.tasks.get(row.id)
        if task is not None and task.busy:
            return  # our own write for it is in flight; its outcome decides
        if row.status is RUNNING and row.owner == self.writer.owner:
            if task is not None and row.cancel_requested and not task.cancel_requested:
                task.cancel_requested = True
                if task.scope is not None:
                    task.scope.cancel()
            return
        if task is not None and row.version > task.version and task.status is not RUNNING:
            self.writer.lose(task)  # someone else moved it on
            task = None
        if row.status.is_terminal:
            table.wake(row.id)
        elif row.status is not RUNNING and task is None and not self.dispatch.stopping:
            self.take(row)
