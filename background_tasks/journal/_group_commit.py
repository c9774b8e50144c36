"""Group commit, the half every journal shares: callers queue operations, one of them
leads the batch into a worker thread, everyone else waits on the batch's one event.

Many concurrent writes thus share one transaction (a caller still returns only once its
write is committed) without a writer task of its own: the first operation of a batch
makes its caller the leader, which waits for the previous batch's commit (so batches
commit in order), closes its batch and runs it with the journal's ``write_batch`` in a
worker thread. Operations that arrive meanwhile form the next batch. Two events per
batch, not one per operation: callers of ``first`` operations (a worker recording an
outcome) are woken before the rest (submitters), so a worker is idle again when the
submitters of the same batch look for one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import anyio
import anyio.lowlevel

from .._events import log

__all__ = ["GroupCommit", "Operation", "purge_in_steps"]


class Operation(Protocol):
    """What a batch needs of an operation: where its outcome goes."""

    result: Any
    error: BaseException | None
    awaited: bool  # False: the caller does not wait for the commit (progress rides along)
    first: bool  # True: its caller is woken before the others of its batch

    @property
    def settle(self) -> Callable[[Any], None] | None:
        """Called with the operation once its batch ended (a caller that does not wait)."""


class _Batch:
    __slots__ = ("closed", "done", "done_first", "ops", "prev")

    def __init__(self, prev: _Batch | None) -> None:
        self.ops: list[Any] = []
        self.done = anyio.Event()
        self.done_first = anyio.Event()
        self.prev = prev
        self.closed = False


class GroupCommit:
    __slots__ = ("_newest", "_open", "max_batch", "write_batch")

    def __init__(self, write_batch: Callable[[list[Any]], None], max_batch: int) -> None:
        self.write_batch = write_batch  # runs in a worker thread: one transaction
        self.max_batch = max_batch
        self._open: _Batch | None = None  # the batch that still takes operations
        self._newest: _Batch | None = None  # the last batch led (open or not)

    def add(self, op: Operation) -> bool:
        """Add a non-awaited ``op`` to the open batch without a coroutine; False if there
        is none (the caller must ``write`` it: it leads the next batch)."""
        batch = self._open
        if batch is None or batch.closed or len(batch.ops) >= self.max_batch:
            return False
        batch.ops.append(op)
        return True

    async def write(self, op: Operation) -> Any:
        """Add ``op`` to the open batch, wait until its batch is committed, return its result."""
        batch = self._open
        if batch is None or batch.closed or len(batch.ops) >= self.max_batch:
            batch = _Batch(self._newest)
            self._open = self._newest = batch
            batch.ops.append(op)
            await self._lead(batch)
        else:
            batch.ops.append(op)
            if not op.awaited:
                return None
            await (batch.done_first if op.first else batch.done).wait()
        if op.error is not None:
            raise op.error
        return op.result

    async def _lead(self, batch: _Batch) -> None:
        # Shielded: the batch holds other callers' operations; they must get their results
        # even if this caller is cancelled (the cancellation arrives at its next checkpoint).
        with anyio.CancelScope(shield=True):
            try:
                prev = batch.prev
                if prev is not None:
                    batch.prev = None
                    await prev.done.wait()
                # Let this tick's callers join, including the workers that the previous
                # batch's callers just handed a task (they record its outcome at once).
                await anyio.lowlevel.checkpoint()
                batch.closed = True
                if self._open is batch:
                    self._open = None
                await anyio.to_thread.run_sync(self.write_batch, batch.ops)
            finally:
                batch.closed = True
                for op in batch.ops:  # outcomes nobody waits for, before anyone wakes
                    if op.settle is not None:
                        try:
                            op.settle(op)
                        except Exception:  # a bug there must not strand the batch's waiters
                            log.exception("journal_settle_failed")
                batch.done_first.set()
                batch.done.set()

    async def drain(self) -> None:
        """Wait until every batch led so far is committed (every batch has a leader)."""
        newest = self._newest
        if newest is not None:
            with anyio.CancelScope(shield=True):
                await newest.done.wait()

    def reset(self) -> None:
        self._open = self._newest = None


async def purge_in_steps(step: Callable[[], Awaitable[int]], batch: int) -> int:
    """Run ``step`` (one transaction deleting at most ``batch`` finished tasks) until it
    deletes fewer: a purge never holds the write lock for long. Returns the total."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, not {batch!r}")
    total = 0
    while True:
        n = await step()
        total += n
        if n < batch:
            return total
