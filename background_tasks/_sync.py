"""The journal watcher: recovery on start, then the service loops of a journaled manager:
the lease heartbeat and the takeover of dead owners' tasks (both on the manager's clock),
and the changes other managers sharing the journal make (polled in real time: how soon
this process sees what others wrote is I/O, not a time anything is due).

It changes no status itself: takeovers go through the state writer, and a row another
manager moved on makes the task held here ``lose`` it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio
import anyio.abc

from ._clock import HEARTBEAT, UPKEEP
from ._errors import BackgroundTasksError
from ._events import log
from ._states import TaskStatus
from .journal._protocol import Journal, NotifyingJournal, TaskRow

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


class JournalSync:
    """Keeps this process's view of a shared journal current."""

    __slots__ = (
        "cursor",
        "default_retry",
        "dispatch",
        "journal",
        "poll_interval",
        "registry",
        "run_tasks",
        "table",
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
        self.poll_interval = poll_interval
        self.cursor = 0

    def take(self, row: TaskRow) -> Task | None:
        """Hold and queue a runnable row here; None if this process does not run it (its
        name is not registered here, or this manager runs no tasks)."""
        if row.id in self.table.tasks or not self.run_tasks:
            return None
        registered = self.registry.tasks.get(row.name)
        if registered is None:
            return None  # another process may run it
        base = registered.options_["retry"] or self.default_retry
        task = self.writer.adopt(row, registered.name, registered.fn, base)
        self.dispatch.enqueue(task, row.scheduled_at)
        return task

    async def take_over_expired(self) -> None:
        """RUNNING rows whose lease ended: each taken over by the writer, and run here
        if it goes back to PENDING."""
        now = self.writer.now()
        for row in await self.journal.expired(now):
            taken = await self.writer.take_over(row, now)
            if taken is not None:
                self.seen(taken)

    async def recover(self) -> None:
        """On start: dead owners' tasks taken over, then every runnable row queued here."""
        await self.take_over_expired()
        rows, self.cursor = await self.journal.runnable()
        for row in rows:
            self.take(row)

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """The heartbeat (every lease/3), the takeover (every lease/2), and others' changes.
        Started once both loops did their first round and wait on the clock."""
        async with anyio.create_task_group() as tg:
            lease = self.journal.lease_timeout
            await tg.start(self._every, self.renew, lease / 3, HEARTBEAT)
            await tg.start(self._every, self.take_over_expired, lease / 2, UPKEEP)
            task_status.started()
            await self._watch()

    async def renew(self) -> None:
        """Extend the lease of every task this manager runs (the heartbeat)."""
        await self.journal.renew(self.writer.owner, self.writer.now() + self.journal.lease_timeout)

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
                for row in rows:
                    self.seen(row)
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
