"""The ready queue (priority then FIFO, per-queue flow control, locks, a heap of
not-before times) and the dispatch around it: idle workers' wake-ups, tasks claimed at
submit, and the timer that promotes delayed tasks when they are due.

Each named queue holds one deque of tasks per priority (most work uses one priority, so a
push and a pop are a deque append and popleft: no tuple per task, nothing for the garbage
collector to track). A task is live in the queue while ``task.seq >= 0`` (``<= -2``:
waiting for its lock, in that lock's wait list); cancelling
just marks it, and a stale entry is dropped when it reaches the front. A queue at its
limit is skipped, never blocking another queue.

Flow control (``Queue``) lives in ``_Gate``, the lane of a queue that bounds something:
its running count, a sliding window of its recent starts (``rate``), and with
``per_partition`` one lane per partition plus a heap of the partitions that may start
a task now, keyed by their first task (priority, then the order it became ready): the
queue's next task is the oldest ready one among the partitions with room, so no
partition waits behind another and none is starved. A queue without any of that is a
plain ``_Lane`` and pays nothing for it.

Locks (``submit(lock=)``) keep, per lock name, one *head*, the only task of the lock in
a lane (ready, running, or parked after the journal refused its claim), and a wait
list (a heap by priority, then id, which sorts by submission) of the others: a task
waiting for its lock holds no worker and no queue slot and is skipped by nothing. When
the head's attempt ends, the best waiter becomes the head.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import anyio.abc

from ._flow import Queue, monotonic
from ._task import Task

if TYPE_CHECKING:
    from ._clock import Alarm, Clock

__all__ = ["Dispatch", "QueueFigures", "ReadyQueue", "Wakeup"]

#: Why the journal refused a claim (``ClaimLimits.refused``), as ``ReadyQueue.park`` takes it.
LOCK, PARTITION = "lock", "partition"
_NOTHING: Callable[..., None] = lambda *_: None  # noqa: E731


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

    def live(self) -> list[Task]:
        return [t for lane in self.by_priority.values() for t in lane if t.seq >= 0]


def _key(task: Task) -> int:
    """(-priority, seq) as one int (seq < 2**52): heap entries then differ in their first
    item, one comparison each."""
    return task.seq - (task.priority << 52)


class _Part(_Lane):
    """The tasks of one partition that wait for it (reached while it was full or held),
    in a ``_Gate`` with ``per_partition``."""

    __slots__ = ("held", "key", "token")

    def __init__(self, key: str | None) -> None:
        super().__init__()
        self.key = key
        self.token = 0  # the heap entry with this token is the partition's one live entry
        self.held: Task | None = None  # parked after a journal-wide refusal: not ready


class _Gate(_Lane):
    """The lane of a queue with flow control, in this process (see the module doc).

    With ``per_partition``, every task goes through the queue's own lanes first, and is
    taken from there while its partition has room (the common case costs a dict lookup
    and no allocation). A task reached while its partition is full moves to that
    partition's ``_Part``, and so does every later task of it while any waits there; a
    partition with room and waiting tasks has one entry in ``heap``, keyed by its first
    task. The next task is the older of the lanes' first and the heap's first.
    """

    __slots__ = (
        "_from_part", "blocked_until", "busy", "config", "heap", "held", "limit", "notify",
        "now", "parts", "per_partition", "period", "rate", "running", "starts",
    )  # fmt: skip

    def __init__(
        self, config: Queue, now: Callable[[], float], notify: Callable[[_Gate, float], None]
    ) -> None:
        super().__init__()
        self.config = config
        self.limit = config.limit
        rate = config.rate_limit
        self.rate: int | None = None if rate is None else rate[0]
        self.period = 0.0 if rate is None else rate[1]
        self.starts: deque[float] = deque(maxlen=self.rate)  # the window: recent starts
        self.per_partition: int = config.per_partition or 0
        #: partitions with waiting (or held) tasks; None: the queue has no partitions
        self.parts: dict[str | None, _Part] | None = None if not self.per_partition else {}
        self.busy: dict[str | None, int] = {}  # running tasks per partition (no zeros)
        #: ready partitions: (key of the first task, its seq, the entry's token, partition)
        self.heap: list[tuple[int, int, int, _Part]] = []
        self._from_part = False  # front() returned a partition's deque, not a lane's
        self.running = 0
        self.held: Task | None = None  # parked after a journal-wide refusal: queue waits
        self.blocked_until = math.inf  # the rate window opens again then (timer knows)
        self.now = now
        self.notify = notify

    def _offer(self, part: _Part, head: Task) -> None:
        part.token += 1
        heapq.heappush(self.heap, (_key(head), head.seq, part.token, part))

    def blocked(self) -> bool:
        """Whether the whole queue may start nothing now (held, at its limit, rate)."""
        if self.held is not None:
            return True
        if self.limit is not None and self.running >= self.limit:
            return True
        starts = self.starts
        if self.rate is not None and len(starts) >= self.rate:
            reopen = starts[0] + self.period
            if reopen > self.now():
                self.notify(self, reopen)
                return True
        return False

    def front(self) -> deque[Task] | None:
        if self.held is not None or (self.limit is not None and self.running >= self.limit):
            return None
        if self.rate is not None and self.blocked():
            return None
        parts = self.parts
        if parts is None:
            return _Lane.front(self)
        busy, per = self.busy, self.per_partition
        lane = _Lane.front(self)
        while lane is not None:  # the lanes' first task, unless its partition must wait
            task = lane[0]
            key = task.partition
            part = parts.get(key)
            if part is None:
                if busy.get(key, 0) < per:
                    break
                part = parts[key] = _Part(key)
            lane.popleft()  # to its partition (seq kept: still live, not twice)
            order = part.order
            leads = not order or task.priority > -order[0]
            part.push(task)
            if leads and part.held is None and busy.get(key, 0) < per:
                self._offer(part, task)
            lane = _Lane.front(self)
        heap = self.heap
        while heap:  # the first task of the partitions with room and waiting tasks
            first, seq, token, part = heap[0]
            if token != part.token or part.held is not None or busy.get(part.key, 0) >= per:
                heapq.heappop(heap)  # stale, or not ready: offered again when it is
                continue
            waiting = part.front()
            if waiting is None:
                heapq.heappop(heap)
                if parts.get(part.key) is part:
                    del parts[part.key]
                continue
            head = waiting[0]
            if head.seq != seq:  # its first task changed (cancelled): key it anew
                heapq.heapreplace(heap, (_key(head), head.seq, token, part))
                continue
            if lane is None or first < _key(lane[0]):
                self._from_part = True
                return waiting
            break
        self._from_part = False
        return lane

    def took(self, task: Task) -> None:
        """Bookkeeping once ``task``, from ``front()``, was taken to run."""
        self.running += 1
        if self.rate is not None:
            starts = self.starts
            starts.append(self.now())
            if len(starts) >= self.rate:  # full: the timer must know when it opens
                self.notify(self, starts[0] + self.period)
        parts = self.parts
        if parts is not None:
            key = task.partition
            busy = self.busy
            n = busy[key] = busy.get(key, 0) + 1
            if self._from_part:
                self._from_part = False
                heapq.heappop(self.heap)  # the entry front() returned
                part = parts[key]
                waiting = part.front()
                if waiting is None:
                    if part.held is None:
                        del parts[key]
                elif n < self.per_partition:
                    self._offer(part, waiting[0])

    def release(self, task: Task) -> None:
        self.running -= 1
        parts = self.parts
        if parts is not None:
            key = task.partition
            busy = self.busy
            n = busy.get(key, 0) - 1
            if n > 0:
                busy[key] = n
            else:
                busy.pop(key, None)
            part = parts.get(key)
            if part is not None:
                self.ready_again(part)

    def ready_again(self, part: _Part) -> None:
        """Offer a partition that may have room again, or forget an empty one."""
        if part.held is not None:
            return
        waiting = part.front()
        if waiting is None:
            if self.parts is not None and self.parts.get(part.key) is part:
                del self.parts[part.key]
        elif self.busy.get(part.key, 0) < self.per_partition:
            self._offer(part, waiting[0])

    def full(self, key: str | None) -> bool:
        """Whether partition ``key`` may start nothing now (at its limit, or held)."""
        part = None if self.parts is None else self.parts.get(key)
        return (part is not None and part.held is not None) or self.busy.get(
            key, 0
        ) >= self.per_partition

    def take(self) -> bool:
        """A slot for a task claimed as it was submitted (only a plain local limit)."""
        if self.rate is not None or self.parts is not None or self.config.shared:
            return False
        if self.held is not None or (self.limit is not None and self.running >= self.limit):
            return False
        self.running += 1
        return True

    def live(self) -> list[Task]:
        tasks = _Lane.live(self)
        if self.parts is not None:
            tasks += [t for part in self.parts.values() for t in part.live()]
        return tasks


class _Lock:
    """One lock name: its head (the one task of the lock that may be in a lane) and the
    wait list of the others, best first: (-priority, id, seq, task)."""

    __slots__ = ("head", "name", "parked", "running", "waiting")

    def __init__(self, name: str) -> None:
        self.name = name
        self.head: Task | None = None
        self.running = False  # the head was taken to run (its attempt, or its claim)
        self.parked = False  # the journal refused the head's claim: it keeps its place
        self.waiting: list[tuple[int, str, int, Task]] = []


class QueueFigures:
    """What one named queue holds here: ``ready`` (may start now), ``waiting_on_limit``
    (held back by the queue's limit, rate or partition), ``waiting_on_lock``."""

    __slots__ = ("ready", "waiting_on_limit", "waiting_on_lock")

    def __init__(self) -> None:
        self.ready = self.waiting_on_limit = self.waiting_on_lock = 0


class ReadyQueue:
    __slots__ = (
        "_delayed", "_gates", "_lanes", "_locks", "_now", "_parked", "_rated", "_reopen",
        "_seq", "size", "wake_timer", "wake_workers",
    )  # fmt: skip

    def __init__(self, queues: Mapping[str, Queue], now: Callable[[], float] = monotonic) -> None:
        self._lanes: dict[str, _Lane] = {}
        self._delayed: list[tuple[float, int, Task]] = []
        self._now = now
        #: the lanes of queues that bound something, by name
        self._gates: dict[str, _Gate] = {}
        for name, config in queues.items():
            if config.limited:
                self._gates[name] = self._lanes[name] = _Gate(config, now, self._blocked)
        self._rated = [g for g in self._gates.values() if g.rate is not None]
        self._reopen = math.inf  # the earliest time a rate window opens again
        self._locks: dict[str, _Lock] = {}
        #: tasks parked after the journal refused their claim, and why (LOCK, ...)
        self._parked: dict[Task, str] = {}
        self._seq = itertools.count()
        self.size = 0  # live entries, ready, delayed and waiting for their lock
        #: set by the dispatch: wake the timer (an earlier due time), and n idle workers
        self.wake_timer: Callable[[], None] = _NOTHING
        self.wake_workers: Callable[[int], None] = _NOTHING

    # ------------------------------------------------------------------ in

    def push(self, task: Task) -> None:
        if (task.lock is not None or self._parked) and not self._admit(task):
            return  # it waits for its lock
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
        if task.seq != -1:  # queued (>= 0), or waiting for its lock (<= -2)
            task.seq = -1
            self.size -= 1
        if self._parked and task in self._parked:
            self._unpark(task)
        if task.lock is not None:
            lock = self._locks.get(task.lock)
            if lock is not None and lock.head is task and not lock.running:
                lock.head = None
                if self._next_head(lock):
                    self.wake_workers(1)

    # ------------------------------------------------------------------ locks

    def _admit(self, task: Task) -> bool:
        """Whether ``task`` may go to its lane now; if not, it waits for its lock."""
        if self._parked and task in self._parked:
            self._unpark(task)
        name = task.lock
        if name is None:
            return True
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = _Lock(name)
        head = lock.head
        if head is None:
            lock.head = task
            return True
        if head is task and not lock.running:
            return True  # a parked head back from its wait
        if (
            head is not task
            and not lock.running
            and head.seq >= 0
            and (-task.priority, task.id) < (-head.priority, head.id)
        ):  # the head has not started: a better task takes its place
            head.seq = -1
            self.size -= 1
            if self._parked and head in self._parked:
                self._unpark(head)
            self._wait(lock, head)
            lock.head = task
            return True
        self._wait(lock, task)
        return False

    def _wait(self, lock: _Lock, task: Task) -> None:
        # A negative token: live in the wait list, but not in a lane (whose entries count
        # as live while seq >= 0), so a demoted head's old lane entry stays dead.
        seq = task.seq = -2 - next(self._seq)
        heapq.heappush(lock.waiting, (-task.priority, task.id, seq, task))
        self.size += 1

    def _next_head(self, lock: _Lock) -> bool:
        """The best live waiter of a free lock becomes its head (into its lane)."""
        waiting = lock.waiting
        while waiting:
            _, _, seq, task = heapq.heappop(waiting)
            if task.seq == seq:
                task.seq = -1
                self.size -= 1
                lock.head = task
                self.push(task)
                return True
        if lock.head is None:
            del self._locks[lock.name]
        return False

    # ------------------------------------------------------------------ refused claims

    def park(self, task: Task, why: str | None, due: float) -> bool:
        """A claim the journal refused for a journal-wide limit (``why``: LOCK,
        PARTITION, or the queue's limit or rate): the task waits until monotonic ``due``
        (or ``unpark_all``) and holds back its lock, partition or queue meanwhile, so
        that this process does not claim the next task only to be refused again. True
        if ``due`` is now the earliest."""
        gate = self._gates.get(task.queue)
        lock = None if task.lock is None else self._locks.get(task.lock)
        if why == LOCK and lock is not None and lock.head is task:
            lock.parked = True
        elif why == PARTITION and gate is not None and gate.parts is not None:
            part = gate.parts.get(task.partition)
            if part is None:
                part = gate.parts[task.partition] = _Part(task.partition)
            part.held = task
        elif gate is not None:
            gate.held = task
        else:
            why = None
        if lock is not None and lock.head is task:
            lock.parked = True  # whatever refused it, it keeps its lock's place
        self._parked[task] = why or ""
        return self.push_delayed(task, due)

    def _unpark(self, task: Task) -> None:
        why = self._parked.pop(task)
        if task.lock is not None:
            lock = self._locks.get(task.lock)
            if lock is not None and lock.head is task:
                lock.parked = False
        gate = self._gates.get(task.queue)
        if gate is None:
            return
        if why == PARTITION and gate.parts is not None:
            part = gate.parts.get(task.partition)
            if part is not None and part.held is task:
                part.held = None
                gate.ready_again(part)
        elif gate.held is task:
            gate.held = None

    @property
    def parked(self) -> bool:
        """Whether a task waits after a refused claim."""
        return bool(self._parked)

    def unpark_all(self) -> int:
        """Every parked task ready again now (another manager freed something); how many."""
        parked = [t for t in self._parked if t.seq >= 0]
        for task in parked:
            task.seq = -1
            self.size -= 1
            self.push(task)
        self._parked.clear()  # (a parked task no longer live was discarded)
        return len(parked)

    # ------------------------------------------------------------------ time

    def _blocked(self, gate: _Gate, reopen: float) -> None:
        """A rate window is full until ``reopen``: the timer must wake then."""
        gate.blocked_until = reopen
        if reopen < self._reopen:
            self._reopen = reopen
            self.wake_timer()

    def next_due(self) -> float | None:
        delayed = self._delayed
        while delayed and delayed[0][2].seq != delayed[0][1]:
            heapq.heappop(delayed)
        due = delayed[0][0] if delayed else math.inf
        due = min(due, self._reopen)
        return None if due == math.inf else due

    def promote(self, now: float) -> int:
        """Move delayed tasks that are due into the ready lanes; how many moved (and how
        many rate windows opened again)."""
        delayed = self._delayed
        moved = 0
        while delayed and delayed[0][0] <= now:
            _, seq, task = heapq.heappop(delayed)
            if task.seq == seq:
                self.size -= 1
                task.seq = -1
                self.push(task)
                moved += 1
        if self._reopen <= now:
            self._reopen = math.inf
            for gate in self._rated:
                if gate.blocked_until <= now:
                    gate.blocked_until = math.inf
                    moved += 1
                elif gate.blocked_until < self._reopen:
                    self._reopen = gate.blocked_until
        return moved

    # ------------------------------------------------------------------ out

    def pop(self) -> Task | None:
        """The best ready task whose queue has room, or None; takes a slot of its queue."""
        best: deque[Task] | None = None
        best_lane: _Lane | None = None
        for lane in self._lanes.values():
            head = lane.front()
            if head is None:
                continue
            if best is None:
                best, best_lane = head, lane
            else:
                task, other = head[0], best[0]
                if (-task.priority, task.seq) < (-other.priority, other.seq):
                    best, best_lane = head, lane
        if best is None:
            return None
        task = best.popleft()
        task.seq = -1
        self.size -= 1
        if best_lane.__class__ is _Gate:
            best_lane.took(task)
        if task.lock is not None:
            self._locks[task.lock].running = True
        return task

    def take(self, task: Task, *, force: bool = False) -> bool:
        """Take a slot for a task that skips the ready queue (claimed when it was
        submitted); False if it may not (its queue at its limit, unless ``force``, or
        flow control beyond a plain local limit: a lock, a rate, partitions, shared)."""
        if task.lock is not None or task.partition is not None:
            return False
        gate = self._gates.get(task.queue)
        if gate is None:
            return True
        if force:
            gate.running += 1
            return True
        return gate.take()

    def release(self, task: Task) -> bool:
        """Give back what pop (or take) took for ``task``; True if that may let another
        task start (the caller wakes a worker)."""
        freed = False
        gates = self._gates
        if gates:
            gate = gates.get(task.queue)
            if gate is not None:
                gate.release(task)
                freed = True
        if task.lock is not None:
            lock = self._locks.get(task.lock)
            if lock is not None and lock.head is task and lock.running:
                lock.running = False
                if lock.parked and self._comes_first(lock, task):
                    # The journal refused the head because a task of the lock comes
                    # first, and that task waits here (it arrived while the head's claim
                    # was in flight, say, a dead owner's task taken over): it becomes the
                    # head, or neither would ever be claimed.
                    self._unpark(task)
                    task.seq = -1
                    self.size -= 1
                    self._wait(lock, task)
                    lock.head = None
                    freed = self._next_head(lock) or freed
                elif not lock.parked:  # a refused head keeps its place
                    lock.head = None
                    freed = self._next_head(lock) or freed
        return freed

    @staticmethod
    def _comes_first(lock: _Lock, head: Task) -> bool:
        """Whether a live task waiting for ``lock`` comes before its ``head`` (priority,
        then submission order)."""
        waiting = lock.waiting
        while waiting and waiting[0][3].seq != waiting[0][2]:
            heapq.heappop(waiting)  # stale: discarded, or already moved on
        return bool(waiting) and waiting[0][:2] < (-head.priority, head.id)

    # ------------------------------------------------------------------ figures

    def figures(self) -> dict[str, QueueFigures]:
        """What each queue holds here now, by reason (``statistics()``; O(tasks))."""
        out: dict[str, QueueFigures] = {}

        def of(name: str) -> QueueFigures:
            found = out.get(name)
            if found is None:
                found = out[name] = QueueFigures()
            return found

        for name, lane in self._lanes.items():
            figures = of(name)
            if lane.__class__ is not _Gate:
                figures.ready += len(lane.live())
                continue
            gate: _Gate = lane
            if gate.blocked():
                figures.waiting_on_limit += len(gate.live())
            elif gate.parts is None:
                figures.ready += len(gate.live())
            else:
                for task in gate.live():
                    if gate.full(task.partition):
                        figures.waiting_on_limit += 1
                    else:
                        figures.ready += 1
        for lock in self._locks.values():
            for _, _, seq, task in lock.waiting:
                if task.seq == seq:
                    of(task.queue).waiting_on_lock += 1
        for task, why in self._parked.items():
            if task.seq >= 0:
                if why == LOCK:
                    of(task.queue).waiting_on_lock += 1
                else:
                    of(task.queue).waiting_on_limit += 1
        return out


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
        ready.wake_timer = self._wake_timer
        ready.wake_workers = self.wake

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

    def _wake_timer(self) -> None:
        if self._alarm is not None:
            self._alarm.wake()

    def park(self, task: Task, why: str | None, delay: float) -> None:
        """A task whose claim the journal refused for a journal-wide limit: tried again
        after ``delay`` seconds, or sooner if another manager frees something."""
        if self.ready.park(task, why, self.clock.monotonic() + delay):
            self._wake_timer()

    def unpark(self) -> None:
        """Another manager freed a slot, a lock or a rate: parked tasks try again now."""
        moved = self.ready.unpark_all()
        if moved:
            self.wake(moved)

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
