"""FakeClock: a clock for the tests of an application that uses the manager.

``BackgroundTaskManager(clock=FakeClock())`` runs every time the manager measures on a
clock that stands still until the test moves it: delays, ``at``, retry backoff, attempt
timeouts, leases and heartbeats, and the times in records, in memory and with a journal.

How it works (``_clock`` has the protocol): everything waiting on the clock is an entry
in one of three heaps, by phase, of monotonic deadlines: a cancel scope to cancel (an
attempt's timeout), a one-off sleep, or a loop's alarm. ``advance`` moves the time, then
rings what is due phase by phase (heartbeats, then the takeover of expired leases, then
the work), and after each phase waits until every loop it rang has reacted, which a loop
shows by waiting on its alarm again (the dispatch timer has handed the due tasks to the
workers, the heartbeat has renewed the leases).

With ``autojump=True``, a driver task (the manager starts it beside its workers) jumps
the clock to the next due moment of work whenever nothing is going on: no attempt is
running or ready to start in any manager on the clock, no journal call is in a worker
thread, no loop is reacting, and the event loop has nothing else to run.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread

from ._clock import HEARTBEAT, UPKEEP, WORK, Alarm, system_clock

__all__ = ["FakeClock"]

_PHASES = (HEARTBEAT, UPKEEP, WORK)
_IDLE, _SLEEPING, _REACTING, _CLOSED = range(4)


class _Entry:
    """Something waiting on the clock: live until it fires or is dropped."""

    __slots__ = ()

    def live(self, seq: int) -> bool:
        raise NotImplementedError

    def fire(self, clock: FakeClock) -> None:
        raise NotImplementedError


class _Deadline(_Entry):
    """A cancel scope to cancel at its deadline (an attempt's timeout)."""

    __slots__ = ("clock", "scope")

    def __init__(self, clock: FakeClock, scope: anyio.CancelScope) -> None:
        self.clock = clock
        self.scope = scope

    def live(self, seq: int) -> bool:
        return self.clock._scopes.get(self.scope) == seq

    def fire(self, clock: FakeClock) -> None:
        del clock._scopes[self.scope]
        self.scope.cancel()


class _Sleep(_Entry):
    __slots__ = ("done", "event")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.done = False

    def live(self, seq: int) -> bool:
        return not self.done

    def fire(self, clock: FakeClock) -> None:
        self.done = True
        self.event.set()


class _FakeAlarm(_Entry):
    """A loop's alarm on the fake clock; ``state`` tells whether the loop sleeps on it
    or is reacting to it having rung (until it waits again)."""

    __slots__ = ("armed", "clock", "event", "phase", "state", "woken")

    def __init__(self, clock: FakeClock, phase: int) -> None:
        self.clock = clock
        self.phase = phase
        self.state = _IDLE
        self.event: anyio.Event | None = None
        self.armed = -1  # the seq of its live heap entry
        self.woken = False

    def live(self, seq: int) -> bool:
        return self.state == _SLEEPING and self.armed == seq

    def fire(self, clock: FakeClock) -> None:
        self.state = _REACTING
        clock._reacting += 1
        assert self.event is not None
        self.event.set()

    def _reacted(self) -> None:
        if self.state == _REACTING:
            self.state = _IDLE
            self.clock._reacted()

    async def wait(self, deadline: float) -> None:
        self._reacted()
        clock = self.clock
        if self.woken:
            self.woken = False
            await anyio.lowlevel.checkpoint()
            return
        if deadline <= clock._now:  # due already: the loop reacts at once
            self.state = _REACTING
            clock._reacting += 1
            await anyio.lowlevel.checkpoint()
            return
        event = self.event = anyio.Event()
        self.state = _SLEEPING
        self.armed = -1 if deadline == math.inf else clock._push(deadline, self, self.phase)
        try:
            await event.wait()
        finally:
            self.event = None
            if self.state == _SLEEPING:  # woken, or cancelled
                self.state = _IDLE

    def wake(self) -> None:
        if self.state == _SLEEPING:
            self.state = _IDLE
            assert self.event is not None
            self.event.set()
        else:
            self.woken = True

    def close(self) -> None:
        self._reacted()
        self.state = _CLOSED


def _on_trio() -> bool:
    return anyio.get_cancelled_exc_class().__module__.startswith("trio")


def _others_ready() -> bool:
    """Whether the event loop has anything else to run right now (asyncio: its ready
    queue; a loop without one, such as uvloop, is taken as idle)."""
    loop = asyncio.get_running_loop()
    ready = getattr(loop, "_ready", None)
    return bool(ready)


class FakeClock:
    """A clock that stands still until the test moves it.

    ``FakeClock()`` starts at the real time (or at ``start``: epoch seconds or an aware
    datetime) and then is frozen. ``await clock.advance(seconds)`` moves it and returns
    once the manager has reacted to the new time: due tasks taken by the free workers,
    attempts past their timeout cancelled, leases renewed. It does not wait for those
    tasks to finish (in memory, one that ends without awaiting anything has ended; with
    a journal, its claim may still be being written). ``FakeClock(autojump=True)``
    also jumps to the next moment something is due whenever nothing is going on (no
    attempt running, no journal call in flight, the event loop idle). A running attempt
    holds the clock: autojump never cuts one short by jumping past its timeout;
    ``advance`` does.

    The waits of the caller stay real time: ``join(timeout=)``, ``handle.result(
    timeout=)``, ``shutdown_timeout``, and how often a journal is polled for what other
    processes wrote. Use one clock per test; managers sharing it share its time.
    """

    def __init__(self, start: float | datetime | None = None, *, autojump: bool = False) -> None:
        if start is None:
            wall = system_clock.time()  # the real time, once
        elif isinstance(start, datetime):
            if start.tzinfo is None:
                raise ValueError("start must be an aware datetime (with tzinfo)")
            wall = start.timestamp()
        elif isinstance(start, int | float) and not isinstance(start, bool):
            wall = float(start)
        else:
            raise TypeError(f"start must be epoch seconds or an aware datetime, got {start!r}")
        if not isinstance(autojump, bool):
            raise TypeError(f"autojump must be a bool, got {autojump!r}")
        self._wall0 = wall
        self._now = 0.0  # monotonic: seconds since the clock was made
        self._heaps: tuple[list[tuple[float, int, _Entry]], ...] = ([], [], [])
        self._seq = itertools.count()
        self._scopes: dict[anyio.CancelScope, int] = {}  # scope -> seq of its deadline
        self._reacting = 0  # loops rung and not waiting again yet
        self._settled: anyio.Event | None = None
        self._jumping = False
        self._jumped: anyio.Event | None = None
        self._pushed: anyio.Event | None = None
        self._autojump = autojump
        self._probes: list[Callable[[], bool]] = []  # each manager's "nothing going on"
        self._waiting: list[Callable[[], bool]] = []  # each manager's "work not taken yet"
        self._driving = False
        self._driver_gone: anyio.Event | None = None

    def __repr__(self) -> str:
        at = datetime.fromtimestamp(self.time(), UTC).isoformat()
        return f"<FakeClock {at} autojump={self._autojump}>"

    @property
    def autojump(self) -> bool:
        return self._autojump

    # ------------------------------------------------------------ the Clock protocol

    def time(self) -> float:
        return self._wall0 + self._now

    def monotonic(self) -> float:
        return self._now

    def cancel_at(self, scope: anyio.CancelScope, deadline: float) -> None:
        if deadline == math.inf:
            self._scopes.pop(scope, None)
        elif deadline <= self._now:
            self._scopes.pop(scope, None)
            scope.cancel()
        else:
            self._scopes[scope] = self._push(deadline, _Deadline(self, scope), WORK)

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await anyio.lowlevel.checkpoint()
            return
        entry = _Sleep()
        self._push(self._now + seconds, entry, WORK)
        try:
            await entry.event.wait()
        finally:
            entry.done = True

    def alarm(self, phase: int = WORK) -> Alarm:
        if phase not in _PHASES:
            raise ValueError(f"unknown phase {phase!r}")
        return _FakeAlarm(self, phase)

    # ------------------------------------------------------------ moving the time

    async def advance(self, seconds: float | timedelta) -> None:
        """Move the clock ``seconds`` forward at once, then return when the manager has
        reacted to the new time (everything due by then happens as of then)."""
        if isinstance(seconds, timedelta):
            seconds = seconds.total_seconds()
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            raise TypeError(f"seconds must be a number or a timedelta, got {seconds!r}")
        if not 0 <= seconds < math.inf:
            raise ValueError(f"seconds must be finite and >= 0, got {seconds!r}")
        while self._jumping:  # an automatic jump in progress finishes first
            event = self._jumped = self._jumped or anyio.Event()
            await event.wait()
        await self._jump(self._now + seconds)

    def next_due(self) -> float | None:
        """Seconds until the next moment something is due (a delayed task, a retry, a
        timeout, a back-off), or None; heartbeats and lease checks do not count."""
        deadline = self._next(WORK)
        return None if deadline is None else deadline - self._now

    async def _jump(self, target: float) -> None:
        self._jumping = True
        try:
            await self._hand_over()  # what is ready now starts now, not after the jump
            self._now = max(self._now, target)
            rang = True
            while rang:
                rang = False
                for phase in _PHASES:
                    heap = self._heaps[phase]
                    due: list[tuple[float, int, _Entry]] = []
                    while heap and heap[0][0] <= self._now:
                        due.append(heapq.heappop(heap))
                    for _, seq, entry in due:
                        if entry.live(seq):
                            entry.fire(self)
                            rang = True
                    while self._reacting:
                        event = self._settled = anyio.Event()
                        await event.wait()
            await self._hand_over()
        finally:
            self._jumping = False
            if self._jumped is not None:
                self._jumped.set()
                self._jumped = None

    async def _hand_over(self) -> None:
        """Let the workers take the tasks that are ready (a queue whose workers are all
        busy keeps its tasks: look a bounded number of times)."""
        for _ in range(100):
            await anyio.lowlevel.checkpoint()
            if not any(waiting() for waiting in self._waiting):
                break

    # ------------------------------------------------------------ bookkeeping

    def _push(self, deadline: float, entry: _Entry, phase: int) -> int:
        seq = next(self._seq)
        heapq.heappush(self._heaps[phase], (deadline, seq, entry))
        if self._pushed is not None:
            self._pushed.set()
            self._pushed = None
        return seq

    def _next(self, phase: int) -> float | None:
        heap = self._heaps[phase]
        while heap and not heap[0][2].live(heap[0][1]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def _reacted(self) -> None:
        self._reacting -= 1
        if self._reacting == 0 and self._settled is not None:
            self._settled.set()
            self._settled = None

    # ------------------------------------------------------------ autojump

    async def drive(self, idle: Callable[[], bool], waiting: Callable[[], bool]) -> None:
        """Run beside a manager that uses this clock (the manager starts it, and its exit
        ends it). ``idle``: the manager has nothing running or ready to start;
        ``waiting``: it has ready work no worker took yet. One of the managers on an
        auto-jumping clock does the jumps."""
        self._waiting.append(waiting)
        self._probes.append(idle)
        try:
            while True:
                if self._autojump and not self._driving:
                    self._driving = True
                    try:
                        await self._autojump_loop()
                    finally:
                        self._driving = False
                        if self._driver_gone is not None:
                            self._driver_gone.set()
                            self._driver_gone = None
                event = self._driver_gone = self._driver_gone or anyio.Event()
                await event.wait()
        finally:
            self._probes.remove(idle)
            self._waiting.remove(waiting)
            if not self._probes:  # events of this event loop: the next run may be another
                self._driver_gone = self._pushed = None

    async def _autojump_loop(self) -> None:
        on_trio = _on_trio()
        if on_trio:
            import trio.testing  # only when running on it

            blocked: Callable[[], Any] = trio.testing.wait_all_tasks_blocked
        limiter = anyio.to_thread.current_default_thread_limiter()
        while True:
            if on_trio:
                await blocked()
            else:
                await anyio.lowlevel.checkpoint()
            target = self._next(WORK)
            if (
                not self._jumping
                and not self._reacting
                and not limiter.borrowed_tokens
                and all(idle() for idle in self._probes)
                and (on_trio or not _others_ready())
            ):
                if target is not None:
                    await self._jump(target)
                    continue
                event = self._pushed = self._pushed or anyio.Event()
                await event.wait()  # nothing due at all: until something is
                continue
            await anyio.sleep(0.001)  # busy: look again in a moment (real time)
