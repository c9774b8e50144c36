"""The ready queue: priority then FIFO, per-queue limits, and a heap of not-before times.

Entries are ``(-priority, seq, task)`` tuples; a task's live entry is the one whose seq
equals ``task.seq``, so cancelling or re-queueing never searches a heap (stale entries
are dropped when they reach the top). A queue at its limit is skipped, never blocking
another queue.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Mapping

from ._task import Task

__all__ = ["ReadyQueue"]


class ReadyQueue:
    __slots__ = ("_delayed", "_heaps", "_limits", "_running", "_seq", "size")

    def __init__(self, limits: Mapping[str, int]) -> None:
        self._heaps: dict[str, list[tuple[int, int, Task]]] = {}
        self._delayed: list[tuple[float, int, Task]] = []
        self._limits = dict(limits)
        self._running = dict.fromkeys(self._limits, 0)
        self._seq = itertools.count()
        self.size = 0  # live entries, ready and delayed

    def push(self, task: Task) -> None:
        seq = task.seq = next(self._seq)
        heap = self._heaps.get(task.queue)
        if heap is None:
            heap = self._heaps[task.queue] = []
        heapq.heappush(heap, (-task.priority, seq, task))
        self.size += 1

    def push_delayed(self, task: Task, due: float) -> bool:
        """Queue ``task`` for monotonic time ``due``; True if it is now the earliest."""
        seq = task.seq = next(self._seq)
        task.due = due
        heapq.heappush(self._delayed, (due, seq, task))
        self.size += 1
        return self._delayed[0][1] == seq

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
        """Move delayed tasks that are due into the ready heaps; how many moved."""
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
        best: tuple[int, int, Task] | None = None
        best_heap: list[tuple[int, int, Task]] | None = None
        for name, heap in self._heaps.items():
            while heap and heap[0][2].seq != heap[0][1]:
                heapq.heappop(heap)
            if not heap:
                continue
            limit = self._limits.get(name)
            if limit is not None and self._running[name] >= limit:
                continue
            if best is None or heap[0] < best:
                best, best_heap = heap[0], heap
        if best_heap is None:
            return None
        task = heapq.heappop(best_heap)[2]
        task.seq = -1
        self.size -= 1
        if task.queue in self._running:
            self._running[task.queue] += 1
        return task

    def release(self, queue: str) -> bool:
        """Give back a slot taken by pop; True if that queue has a limit (so waiters may run)."""
        if queue in self._running:
            self._running[queue] -= 1
            return True
        return False
