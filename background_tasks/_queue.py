"""The ready queue (priority then FIFO, per-queue limits, a heap of not-before times) and
the dispatch around it: idle workers' wake-ups, tasks claimed at submit, and the timer
that promotes delayed tasks when they are due.

Each named queue holds one deque of tasks per priority (most work uses one priority, so a
push and a pop are a deque append and popleft: no tuple per task, nothing for the garbage
collector to track). A task is live in the queue while ``task.seq >= 0``; cancelling
just marks it, and a stale entry is dropped when it reaches the front. A queue at its
limit is skipped, never blocking another queue.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
from collections import deque
from collections.abc import Awaitable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import anyio.abc

from ._task import Task

if TYPE_CHECKING:
    from ._clock import Alarm, Clock

__all__ = ["Dispatch", "ReadyQueue", "Wakeup"]


class _Lane:
    """One named queue: a deque per priority, and those priorities, highest first."""

    __slots__ = ("by_priority", "order")

    def __init__(self) -> None:
        self.by_priority: dict[int, deque[Task]] = {}
        self.order: list[int] = []  # negated priorities, ascending: highest priority first

    def push(self, task: Task) -> None:
        lane = self.by_priority.get(task.priority)
        if lane is None:
            lane = self.by_priority[task.priority] = deque()
            bisect.insort(self.order, -task.priority)
        lane.append(task)

    def front(self) -> deque[Task] | None:
        """The deque whose first task runs next, dropping stale entries and emptied
        priorities on the way; None when the lane is empty."""
        order = self.order
        while order:
            negated = order[0]
            lane = self.by_priority[-negated]
            while lane:
                if lane[0].seq >= 0:
                    return lane
                lane.popleft()
            del self.by_priority[-negated]
            del order[0]
        return None


class ReadyQueue:
    __slots__ = ("_delayed", "_lanes", "_limits", "_running", "_seq", "size")

    def __init__(self, limits: Mapping[str, int]) -> None:
        self._lanes: dict[str, _Lane] = {}
        self._delayed: list[tuple[float, int, Task]] = []
        self._limits = dict(limits)
        self._running = dict.fromkeys(self._limits, 0)
        self._seq = itertools.count()
        self.size = 0  # live entries, ready and delayed

    def push(self, task: Task) -> None:
        task.seq = next(self._seq)
        lane = self._lanes.get(task.queue)
        if lane is None:
            lane = self._lanes[task.queue] = _Lane()
        lane.push(task)
        self.size += 1

    def push_delayed(self, task: Task, due: float) -> bool:
        """Queue ``task`` for monotonic time ``due``; True if it is now the earliest."""
        seq = task.seq = next(self._seq)
        heapq.heappush(self._delayed, (due, seq, task))
        self.size += 1
        return self._delayed[0][1] == seq

    def has_ready(self) -> bool:
        """Whether a task is ready to run now (delayed ones are not)."""
        return any(lane.front() is not None for lane in self._lanes.values())

    def discard(self, task: Task) -> None:
        if task.seq >= 0:
            task.seq = -1
            self.size -= 1

    def next_due(self) -> float | None:
        delayed = self._delayed
        while delayed and delayed[0][2].seq != delayed[0][1]:
            heapq.heappop(delayed)
        return delayed[0][0] if delayed else None

    def promote(self, now: float) -> int:
        """Move delayed tasks that are due into the ready lanes; how many moved."""
        delayed = self._delayed
        moved = 0
        while delayed and delayed[0][0] <= now:
            _, seq, task = heapq.heappop(delayed)
            if task.seq == seq:
                self.size -= 1
                self.push(task)
                moved += 1
        return moved

    def pop(self) -> Task | None:
        """The best ready task whose queue has room, or None; takes a slot of its queue."""
        best: deque[Task] | None = None
        limits = self._limits
        for name, lane in self._lanes.items():
            head = lane.front()
            if head is None:
                continue
            if limits and name in limits and self._running[name] >= limits[name]:
                continue
            if best is None:
                best = head
            else:
                task, other = head[0], best[0]
                if (-task.priority, task.seq) < (-other.priority, other.seq):
                    best = head
        if best is None:
            return None
        task = best.popleft()
        task.seq = -1
        self.size -= 1
        if limits and task.queue in self._running:
            self._running[task.queue] += 1
        return task

    def take(self, queue: str, *, force: bool = False) -> bool:
        """Take a slot of ``queue`` for a task that skips the ready queue (claimed when it
        was submitted); False if the queue is at its limit, unless ``force``."""
        running = self._running
        if queue not in running:
            return True
        if running[queue] >= self._limits[queue] and not force:
            return False
        running[queue] += 1
        return True

    def release(self, queue: str) -> bool:
        """Give back a slot taken by pop; True if that queue has a limit (so waiters may run)."""
        if queue in self._running:
            self._running[queue] -= 1
            return True
        return False


class Wakeup(Protocol):
    """What an idle worker waits on: set once, one waiter."""

    def set(self) -> None: ...

    def wait(self) -> Awaitable[Any]: ...


class Dispatch:
    """Hands ready work to the worker pool: the ready queue, the idle workers (each waits
    on its own ``Wakeup``), tasks claimed as they were submitted, and the timer (on the
    manager's clock)."""

    __slots__ = ("_alarm", "claimed", "clock", "idle", "ready", "stopping")

    def __init__(self, ready: ReadyQueue, clock: Clock) -> None:
        self.ready = ready
        self.clock = clock
        self.idle: list[Wakeup] = []  # idle workers, most recent last
        self.claimed: deque[Task] = deque()  # claimed at submit, for the next free worker
        self.stopping = False  # set at shutdown: workers take no new work
        self._alarm: Alarm | None = None  # the timer's, while it runs

    def reset(self) -> None:
        self.stopping = False
        self.idle.clear()

    def stop(self) -> None:
        self.stopping = True
        self.wake(len(self.idle))

    def wake(self, n: int) -> None:
        idle = self.idle
        while n > 0 and idle:
            idle.pop().set()
            n -= 1

    def push(self, task: Task) -> None:
        """A task ready now."""
        self.ready.push(task)
        if self.idle:
            self.idle.pop().set()

    def enqueue(self, task: Task, scheduled_at: float) -> None:
        """A task not to start before epoch time ``scheduled_at`` (on the clock)."""
        clock = self.clock
        wait = scheduled_at - clock.time()
        if wait <= 0:
            self.push(task)
        elif self.ready.push_delayed(task, clock.monotonic() + wait) and self._alarm is not None:
            self._alarm.wake()

    def hand_claimed(self, task: Task) -> None:
        """A task claimed as it was submitted, for the worker reserved for it."""
        self.claimed.append(task)

    async def timer(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Move delayed tasks (delays, retry backoff) to the ready lanes when they are due.
        Started once its alarm exists (a delayed submit from then on wakes it)."""
        queue, clock = self.ready, self.clock
        alarm = self._alarm = clock.alarm()
        task_status.started()
        try:
            while True:
                moved = queue.promote(clock.monotonic())
                if moved:
                    self.wake(moved)
                due = queue.next_due()
                await alarm.wait(math.inf if due is None else due)
        finally:
            self._alarm = None
            alarm.close()
