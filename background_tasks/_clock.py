"""The manager's one source of time: every time it measures goes through one ``Clock``.

Two kinds of time, both from the same object:

* ``time()``, epoch seconds: what records say (created, started, finished), when a
  task is due (``scheduled_at``, a retry's backoff) and until when a lease holds.
* ``monotonic()``, seconds on a clock that never goes back: what waits are measured
  on (the dispatch timer, the journal heartbeat and takeover cadence, an attempt's
  timeout, the back-off between retries of a failed journal write).

And three ways to wait on it:

* ``cancel_at(scope, deadline)``: cancel a cancel scope at a monotonic deadline
  (``math.inf``: never). An attempt's timeout is the worker's own scope with a
  deadline; with the system clock this is just ``scope.deadline = deadline``, so an
  attempt costs no extra object or task.
* ``await sleep(seconds)``: a one-off wait (a retry's back-off).
* ``alarm(phase)``: what a loop sleeps on between rounds (the dispatch timer, the
  heartbeat, periodic schedules): ``await alarm.wait(deadline)`` until the monotonic
  ``deadline`` or until ``alarm.wake()``. A test clock knows the manager has reacted to
  a new time when every alarm it rang is waited on again. The phase orders the loops
  when a test clock jumps: ``HEARTBEAT`` loops (lease renewals) react first, then
  ``UPKEEP`` (the takeover of expired leases), then ``WORK`` (everything due: delayed
  tasks, retries, periodic ticks). A live manager thus renews its leases before anyone
  looks for expired ones, and an auto-jumping clock jumps only to ``WORK`` moments.

``SystemClock`` is the default: ``time.time`` and the event loop's clock (what anyio's
deadlines use). ``background_tasks.testing.FakeClock`` is the test clock.

The bounds of a caller's own waits (``join(timeout=)``, ``handle.result(timeout=)``,
``shutdown_timeout``) and how often a journal is polled for what other processes wrote
are not on the clock: they are real time, whatever the clock says.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Protocol, runtime_checkable

import anyio
import anyio.abc

__all__ = [
    "HEARTBEAT",
    "UPKEEP",
    "WORK",
    "Alarm",
    "Clock",
    "JournalClock",
    "SystemClock",
    "system_clock",
]

#: The phases of ``Clock.alarm``: on a test clock's jump, lower phases react first.
HEARTBEAT, UPKEEP, WORK = 0, 1, 2


class Alarm(Protocol):
    """What a loop of the manager sleeps on between its rounds (one loop per alarm)."""

    async def wait(self, deadline: float) -> None:
        """Return at the monotonic ``deadline`` (``math.inf``: only on ``wake``), or as
        soon as ``wake`` is called; a ``wake`` while not waiting makes the next wait
        return at once."""

    def wake(self) -> None:
        """End the current (or next) ``wait`` now: the loop has something new to see."""

    def close(self) -> None:
        """The loop is done with this alarm (it ended, or was cancelled)."""


@runtime_checkable
class Clock(Protocol):
    """Where the manager gets every time it measures (``BackgroundTaskManager(clock=)``)."""

    def time(self) -> float:
        """Epoch seconds now: record times, due times, leases."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back: deadlines of waits."""

    def cancel_at(self, scope: anyio.CancelScope, deadline: float) -> None:
        """Cancel ``scope`` once monotonic time reaches ``deadline``; ``math.inf`` takes
        a deadline set before back."""

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` on this clock."""

    def alarm(self, phase: int = WORK) -> Alarm:
        """A new alarm for one loop; ``phase`` orders the loops on a test clock's jump
        (``HEARTBEAT``, ``UPKEEP``, ``WORK``: see the module docstring)."""


class _SystemAlarm:
    """An alarm on the event loop's clock: an ``anyio.Event`` under a deadline."""

    __slots__ = ("_event", "_woken")

    def __init__(self) -> None:
        self._event: anyio.Event | None = None
        self._woken = False

    async def wait(self, deadline: float) -> None:
        if self._woken:
            self._woken = False
            await anyio.lowlevel.checkpoint()
            return
        event = self._event = anyio.Event()
        try:
            with anyio.CancelScope(deadline=deadline):
                await event.wait()
        finally:
            self._event = None
            self._woken = False

    def wake(self) -> None:
        event = self._event
        if event is None:
            self._woken = True
        else:
            event.set()

    def close(self) -> None:
        self._event = None


class SystemClock:
    """The real time: ``time.time()`` for epoch seconds, the event loop's clock (the one
    anyio's deadlines are on) for waits."""

    __slots__ = ()

    #: the bare functions, no wrapper: the hot path reads the time once or twice a task
    time = staticmethod(time.time)
    monotonic = staticmethod(anyio.current_time)

    def __repr__(self) -> str:
        return "SystemClock()"

    def cancel_at(self, scope: anyio.CancelScope, deadline: float) -> None:
        scope.deadline = deadline

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)

    def alarm(self, phase: int = WORK) -> Alarm:
        return _SystemAlarm()


#: the default clock of every manager (it holds no state: one is enough)
system_clock = SystemClock()


class JournalClock:
    """The system clock set to a journal's own clock (PostgreSQL's server clock): epoch
    seconds are the server's, measured as an offset from this host's clock at start and
    at every heartbeat, so that managers whose wall clocks disagree still agree on when
    a task is due and on the times in records. Waits stay on this host's monotonic
    clock."""

    __slots__ = ("_base", "offset")

    def __init__(self, base: SystemClock) -> None:
        self._base = base
        self.offset = 0.0  # the journal's clock minus this host's

    def __repr__(self) -> str:
        return f"JournalClock(offset={self.offset:+.3f}s)"

    def time(self) -> float:
        return time.time() + self.offset

    monotonic = staticmethod(anyio.current_time)

    def cancel_at(self, scope: anyio.CancelScope, deadline: float) -> None:
        scope.deadline = deadline

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)

    def alarm(self, phase: int = WORK) -> Alarm:
        return self._base.alarm(phase)

    async def calibrate(self, read: Callable[[], Awaitable[float]]) -> None:
        """Set the offset from one reading of the journal's clock (``read``), taken
        between two of this host's (the round trip's midpoint)."""
        before = time.time()
        journal_now = await read()
        self.offset = journal_now - (before + time.time()) / 2
