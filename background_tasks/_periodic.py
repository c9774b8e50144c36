"""Periodic tasks: their schedules (cron expressions in a time zone, fixed intervals) and
the scheduler that turns each due tick into ONE ordinary task.

Who fires a tick is decided by the journal, not by an elected leader. Every manager that
is up runs the same scheduler; when a tick is due, each of them writes the periodic
task's row from the version it read, together with the tick's task
(``PeriodicJournal.advance_periodic``). The first write applies; the others find the row
moved on, read it again and go back to sleep. So a tick is decided once in all, however
many managers are up, and never again after a restart: the row remembers the last tick
decided (fired, skipped or missed). Without a journal the manager keeps the same state in
memory, for itself.

A decided tick is one of:

* fired: its task (an ordinary task of the periodic task's name: record, retries,
  timeout, history) is stored with the row, its not-before time the tick;
* skipped (``periodic_tick_skipped``): the task of an earlier tick is unfinished and
  ``overlap`` is False;
* missed (``periodic_ticks_missed``): found later than its ``grace`` (half the time to
  the next tick, at most a minute), which only happens when no manager was up to fire it
  (or all were stalled). Of the ticks missed in a row, ``missed="latest"`` fires the
  latest once, late; ``missed="skip"`` fires none.

Ticks are wall-clock UTC instants (``now``, ``time.time`` unless given): a cron tick is
a local time in the schedule's zone, found by ``cronsim`` (DST as Debian's cron: a time
that a spring-forward skips runs at the first minute after the gap, a time that a
fall-back repeats runs once); an interval counts whole multiples of itself from the Unix
epoch, so every manager computes the same ticks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import TYPE_CHECKING, Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from ._clock import WORK
from ._errors import JournalError
from ._events import DEBUG, is_enabled, log
from ._ids import new_id
from ._models import utc
from ._task import Task
from .journal import _rows
from .journal._protocol import PeriodicJournal, PeriodicRow, TaskRow

if TYPE_CHECKING:
    from ._queue import Dispatch
    from ._registry import TaskRegistry
    from ._retry import RetryPolicy
    from ._sync import JournalSync
    from ._table import TaskTable
    from ._writer import StateWriter

__all__ = ["Cron", "Every", "Periodic", "Scheduler", "parse_schedule", "tick_key", "tick_of"]

#: A tick found later than this (or half the time to the next tick, if less) was missed.
MAX_GRACE: Final = 60.0
#: The longest the scheduler sleeps at once, so that a wall clock set anew is noticed.
_MAX_SLEEP: Final = 60.0
#: The shortest interval accepted for ``every``.
MIN_EVERY: Final = 0.01
_PREFIX: Final = "periodic:"


def tick_key(name: str, tick: float) -> str:
    """The key of a tick's task, ``periodic:<name>:<tick, ISO 8601 UTC>``: it names the
    tick in records, and gives ``TaskContext.scheduled_at`` the tick in every attempt."""
    return f"{_PREFIX}{name}:{utc(tick).isoformat()}"


def tick_of(key: str | None, name: str) -> datetime | None:
    """The tick a task of ``name`` with ``key`` was fired for; None for other tasks."""
    if key is None or not key.startswith(_PREFIX) or not key.startswith(name, len(_PREFIX)):
        return None
    rest = key[len(_PREFIX) + len(name) :]
    if not rest.startswith(":"):
        return None
    try:
        return datetime.fromisoformat(rest[1:])
    except ValueError:
        return None


# --------------------------------------------------------------------------- schedules


class Cron:
    """A 5-field cron expression in a time zone."""

    __slots__ = ("expr", "text", "tz")

    def __init__(self, expr: str, tz: tzinfo, zone: str) -> None:
        if not isinstance(expr, str):
            raise TypeError(f"a cron schedule is a str, got {expr!r}")
        fields = expr.split()
        if len(fields) != 5:
            raise ValueError(
                f"bad cron expression {expr!r}: it needs 5 fields (minute hour day-of-month"
                f" month day-of-week), not {len(fields)}"
            )
        self.expr = " ".join(fields)
        self.tz = tz
        try:
            next(CronSim(self.expr, datetime.now(tz)))
        except (CronSimError, StopIteration) as exc:
            raise ValueError(f"bad cron expression {expr!r}: {exc}") from None
        self.text = f"cron {self.expr} ({zone})"

    def next_after(self, t: float) -> float:
        """The first tick strictly after epoch time ``t``."""
        return next(CronSim(self.expr, datetime.fromtimestamp(t, self.tz))).timestamp()

    def at_or_before(self, t: float) -> float:
        """The latest tick at or before ``t``."""
        start = datetime.fromtimestamp(t, self.tz) + timedelta(microseconds=1)
        return next(CronSim(self.expr, start, reverse=True)).timestamp()


class Every:
    """A fixed interval: the ticks are the whole multiples of it since the Unix epoch."""

    __slots__ = ("text", "us")

    def __init__(self, every: timedelta | float) -> None:
        if isinstance(every, timedelta):
            seconds = every.total_seconds()
        elif isinstance(every, int | float) and not isinstance(every, bool):
            seconds = float(every)
        else:
            raise TypeError(f"every must be seconds or a timedelta, got {every!r}")
        if not (MIN_EVERY <= seconds < 1e9):  # also refuses NaN
            raise ValueError(
                f"every must be at least {MIN_EVERY} seconds and less than 1e9, got {every!r}"
            )
        self.us = round(seconds * 1_000_000)  # integer microseconds: exact ticks
        self.text = f"every {self.us / 1_000_000:g}s"

    def next_after(self, t: float) -> float:
        return (round(t * 1_000_000) // self.us + 1) * self.us / 1_000_000

    def at_or_before(self, t: float) -> float:
        return (round(t * 1_000_000) // self.us) * self.us / 1_000_000


Schedule = Cron | Every


def _zone(timezone: str | tzinfo) -> tuple[tzinfo, str]:
    if isinstance(timezone, tzinfo):
        return timezone, str(timezone)
    if not isinstance(timezone, str):
        raise TypeError(f"timezone must be a time zone name or a tzinfo, got {timezone!r}")
    if timezone.upper() == "UTC":
        return UTC, "UTC"
    try:
        return ZoneInfo(timezone), timezone
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {timezone!r} ({exc})") from None


def parse_schedule(
    schedule: str | None, every: timedelta | float | None, timezone: str | tzinfo
) -> Schedule:
    """A cron ``schedule`` in ``timezone``, or a fixed interval ``every``: exactly one
    of them; ValueError for a bad expression, an unknown zone, both or neither."""
    if (schedule is None) == (every is None):
        raise ValueError("a periodic task takes a cron schedule or every=..., one of them")
    tz, zone = _zone(timezone)
    if schedule is not None:
        return Cron(schedule, tz, zone)
    if zone != "UTC" and tz.utcoffset(datetime.now(UTC)) != timedelta(0):
        raise ValueError(
            f"timezone={zone!r} applies to cron schedules; an interval counts from the Unix"
            " epoch (for a local time of day, use a cron expression)"
        )
    assert every is not None
    return Every(every)


@dataclass(frozen=True, slots=True)
class Periodic:
    """A periodic task: the registered task of ``name`` runs at every tick of
    ``schedule``."""

    name: str
    schedule: Schedule
    missed: str  # "latest" | "skip"
    overlap: bool


# --------------------------------------------------------------------------- scheduler


class Scheduler:
    """Decides the ticks of a manager's periodic tasks (see the module docstring)."""

    def __init__(
        self,
        periodics: list[Periodic],
        registry: TaskRegistry,
        journal: PeriodicJournal | None,
        writer: StateWriter,
        table: TaskTable,
        dispatch: Dispatch,
        sync: JournalSync | None,
        default_timeout: float | None,
        default_retry: RetryPolicy | None,
        run_tasks: bool,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.periodics = periodics
        self.registry = registry
        self.journal = journal
        self.writer = writer
        self.table = table
        self.dispatch = dispatch
        self.sync = sync
        self.default_timeout = default_timeout
        self.default_retry = default_retry
        self.run_tasks = run_tasks
        self.now = now
        #: the state of each periodic task as last read or written
        self.states: dict[str, PeriodicRow] = {}
        #: tasks of ticks whose write failed: maybe stored (a commit whose answer was lost)
        self.unsure: dict[str, TaskRow] = {}

    async def run(self) -> None:
        """Until cancelled: decide the due ticks, sleep until the next one (on the
        manager's clock: a test clock's ``advance`` fires the ticks it passes)."""
        clock = self.writer.clock
        alarm = clock.alarm(WORK)
        try:
            while not self.dispatch.stopping:
                try:
                    due = await self.step()
                except Exception as exc:  # a journal away, or a bug: keep the manager up
                    log.error(
                        "periodic_scheduler_error", error=str(exc), error_type=type(exc).__name__
                    )
                    due = self.now() + 1.0
                wait = min(max(due - self.now(), 0.0), _MAX_SLEEP)
                await alarm.wait(clock.monotonic() + wait)
        finally:
            alarm.close()

    def _due(self, now: float) -> list[Periodic]:
        states = self.states
        return [
            p
            for p in self.periodics
            if p.name not in states or p.schedule.next_after(states[p.name].last_tick) <= now
        ]

    async def step(self) -> float:
        """Decide every tick due now; return the epoch time the next one is due."""
        for _ in range(10):  # again at once while another manager wrote first
            now = self.now()
            due = self._due(now)
            if not due:
                break
            if self.journal is not None:
                await self._read(due)
            conflict = False
            for periodic in due:
                if self.dispatch.stopping:
                    return now + _MAX_SLEEP
                conflict |= not await self._decide(periodic, now)
            if not conflict:
                break
        states = self.states
        return min(
            (p.schedule.next_after(states[p.name].last_tick) for p in self.periodics
             if p.name in states),
            default=self.now() + 1.0,
        )  # fmt: skip

    async def _read(self, due: list[Periodic]) -> None:
        """The journal's state of the due periodic tasks (another manager may have
        decided their ticks); a tick's task whose write failed but landed is run."""
        assert self.journal is not None
        stored = {state.name: state for state in await self.journal.periodic()}
        for periodic in due:
            state = stored.get(periodic.name)
            if state is None:
                self.states.pop(periodic.name, None)
                continue
            self.states[periodic.name] = state
            unsure = self.unsure.pop(periodic.name, None)
            if unsure is not None and unsure.id == state.task_id and self.sync is not None:
                self.sync.take(unsure)

    async def _decide(self, periodic: Periodic, now: float) -> bool:
        """Decide the due tick of ``periodic``; False if another manager decided first."""
        name, schedule = periodic.name, periodic.schedule
        state = self.states.get(name)
        if state is None:  # first seen on this journal: its ticks start now
            last = schedule.at_or_before(now)
            return await self._write(
                PeriodicRow(name, schedule.text, last, schedule.next_after(last), None, 1), None
            )
        first = schedule.next_after(state.last_tick)
        if first > now:
            return True
        tick = schedule.at_or_before(now)  # the latest due tick (first, or a later one)
        after = schedule.next_after(tick)
        new = PeriodicRow(name, schedule.text, tick, after, state.task_id, state.version + 1)
        late = now - tick > min(MAX_GRACE, (after - tick) / 2)
        if late and periodic.missed == "skip":
            if not await self._write(new, None):
                return False
            log.info("periodic_ticks_missed", name=name, since=_iso(first), until=_iso(tick),
                     ran=None)  # fmt: skip
            return True
        busy = state.task_id if not periodic.overlap else None
        if busy is not None and await self._unfinished(busy):
            if not await self._write(new, None):
                return False
            log.info(
                "periodic_tick_skipped", name=name, tick=_iso(tick), task_id=busy,
                reason="the task of an earlier tick is unfinished (overlap=False)",
            )  # fmt: skip
            return True
        task, row = self._task(periodic, tick, now)
        new.task_id = task.id
        if not await self._write(new, row):
            return False
        if self.journal is None or (self.run_tasks and not self.dispatch.stopping):
            self.writer.submitted(task)
            self.dispatch.enqueue(task, tick)
        if first < tick:
            log.info("periodic_ticks_missed", name=name, since=_iso(first), until=_iso(tick),
                     ran=_iso(tick))  # fmt: skip
        if is_enabled(DEBUG):
            log.debug("periodic_tick_fired", name=name, tick=_iso(tick), task_id=task.id)
        return True

    async def _write(self, state: PeriodicRow, row: TaskRow | None) -> bool:
        journal = self.journal
        if journal is not None:
            try:
                if not await journal.advance_periodic(state, row):
                    self.states.pop(state.name, None)  # read it again
                    return False
            except JournalError:
                self.states.pop(state.name, None)
                if row is not None:
                    self.unsure[state.name] = row
                raise
        self.states[state.name] = state
        return True

    async def _unfinished(self, task_id: str) -> bool:
        if self.journal is not None:
            row = await self.journal.get(task_id)
            return row is not None and not row.status.is_terminal
        task = self.table.tasks.get(task_id)
        return task is not None and not task.status.is_terminal

    def _task(self, periodic: Periodic, tick: float, now: float) -> tuple[Task, TaskRow | None]:
        """The tick's task (and its row, with a journal): an ordinary task of the
        periodic task's registered name and options, not before the tick."""
        registered = self.registry.tasks[periodic.name]
        options = registered.options_
        timeout = options["timeout"]
        if timeout is None:
            timeout = self.default_timeout
        fn: Callable[..., Coroutine[Any, Any, Any]] = registered.fn
        task = Task(
            new_id(),
            registered.name,
            fn,
            (),
            None,
            options["queue"] or "default",
            options["priority"] or 0,
            tick_key(periodic.name, tick),
            None if timeout == math.inf else timeout,
            options["retry"] or self.default_retry,
            now,
            tick,
        )
        return task, None if self.journal is None else _rows.new_row(task)


def _iso(t: float) -> str:
    return utc(t).isoformat()
