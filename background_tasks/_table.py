"""The task table: every task this process holds, by id and by idempotency key, its
counts by status, the finished tasks kept for queries, who waits on tasks by id, and
who waits for all of them (``join``: an event made only when someone joins, set when
nothing is left unfinished).

Only the state writer (``_writer``) and the journal watcher (``_sync``) change it, and
only through these methods; the manager's queries read it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import anyio

from ._events import WARNING, is_enabled, log
from ._states import TaskStatus
from ._task import Task

__all__ = ["QueueStatistics", "Statistics", "TaskTable"]

_STAT_FIELDS = frozenset(
    {"pending", "running", "retrying", "completed", "failed", "cancelled", "queued"}
)


@dataclass(frozen=True, slots=True)
class QueueStatistics:
    """One queue in this manager: attempts ``running`` here, tasks ``ready`` to start,
    tasks ``waiting_on_limit`` (the queue's limit, rate or partition is taken, here or
    journal-wide) and ``waiting_on_lock`` (another task holds their lock)."""

    running: int
    ready: int
    waiting_on_limit: int
    waiting_on_lock: int


@dataclass(frozen=True, slots=True)
class Statistics:
    """Counts by status of the tasks this manager has handled, and its queue right now."""

    pending: int
    running: int
    retrying: int
    completed: int
    failed: int
    cancelled: int
    queued: int  # waiting to run here (ready or delayed)
    by_status: dict[TaskStatus, int] = field(default_factory=dict)
    #: per queue that holds or runs anything here
    queues: dict[str, QueueStatistics] = field(default_factory=dict)

    def __getitem__(self, name: str | TaskStatus) -> int:
        key = name.value if isinstance(name, TaskStatus) else name
        if key not in _STAT_FIELDS:
            raise KeyError(name)
        return int(getattr(self, key))


class TaskTable:
    """Tasks by id, unfinished ones by key, counts by status, and retention.

    With a journal, a finished task leaves the table at once (the journal keeps it; a
    handle keeps its own reference). Without one, the ``keep`` most recent finished
    tasks stay for ``get``/``list``.
    """

    __slots__ = (
        "counts",
        "elsewhere",
        "finished",
        "joined",
        "journaled",
        "keep",
        "keys",
        "running",
        "tasks",
        "watchers",
    )

    def __init__(self, keep: int, journaled: bool) -> None:
        self.tasks: dict[str, Task] = {}
        self.finished: deque[Task] = deque()  # finished tasks kept, oldest first
        self.keys: dict[str, Task] = {}  # idempotency keys of unfinished tasks
        self.counts = dict.fromkeys(TaskStatus, 0)
        self.running: set[Task] = set()  # attempts this process runs right now
        #: awaiters of tasks by id that this process does not hold (they run elsewhere)
        self.watchers: dict[str, anyio.Event] = {}
        #: ids of tasks accepted here that another manager on the journal holds now (this
        #: one runs no tasks, or lost them to another): ``join`` waits for them too
        self.elsewhere: set[str] = set()
        #: set when nothing is left unfinished; made only while someone joins
        self.joined: anyio.Event | None = None
        self.keep = keep
        self.journaled = journaled

    def add(self, task: Task) -> None:
        """Hold a task in whatever status it has (new, or adopted from a journal row)."""
        self.tasks[task.id] = task
        self.counts[task.status] += 1
        if task.key is not None and not task.status.is_terminal:
            self.keys.setdefault(task.key, task)

    def settle(self, task: Task) -> None:
        """Bookkeeping for a task that just finished: keys, watchers, retention."""
        if task.key is not None and self.keys.get(task.key) is task:
            del self.keys[task.key]
        if self.watchers:
            self.wake(task.id)
        if self.joined is not None:
            self.check_joined()
        if self.journaled:
            self.tasks.pop(task.id, None)  # the journal keeps it; handles keep their own
            return
        finished = self.finished
        finished.append(task)
        if len(finished) > self.keep:
            del self.tasks[finished.popleft().id]

    def unsettle(self, task: Task) -> None:
        """A finished task back among the live ones (requeue): the inverse of settle."""
        if not self.journaled:
            self.finished.remove(task)  # O(n), but requeue is rare and eviction stays exact
        self.tasks[task.id] = task
        if task.key is not None:
            self.keys[task.key] = task

    def forget(self, task: Task) -> None:
        """Drop a journaled task from this process's memory (the journal still has it)."""
        self.tasks.pop(task.id, None)
        self.running.discard(task)
        self.counts[task.status] -= 1
        if task.key is not None and self.keys.get(task.key) is task:
            del self.keys[task.key]
        if task.waiters is not None:  # awaiters look again (the journal, or stopped)
            task.waiters.set()
            task.waiters = None
        if self.joined is not None:
            self.check_joined()

    def lose(self, task: Task) -> None:
        """Another manager changed this task first: it is no longer ours to run or finish."""
        if task.status is TaskStatus.RUNNING and is_enabled(WARNING):  # we stalled past our lease
            log.warning(
                "task_outcome_fenced", task_id=task.id, name=task.name, queue=task.queue,
                attempt=task.attempts, reason="the task was reclaimed by another owner",
            )  # fmt: skip
        task.remote = True
        self.elsewhere.add(task.id)  # it was ours: join() waits for it wherever it runs
        self.forget(task)  # awaiters switch to watching the journal

    # ---------------------------------------------------------------- join

    def unfinished(self) -> int:
        """Tasks held here that are not finished, and those accepted here held elsewhere."""
        counts = self.counts
        return (
            counts[TaskStatus.PENDING]
            + counts[TaskStatus.RUNNING]
            + counts[TaskStatus.RETRYING]
            + len(self.elsewhere)
        )

    def check_joined(self) -> None:
        """Wake the joiners if nothing is left unfinished."""
        if self.joined is not None and not self.unfinished():
            self.joined.set()
            self.joined = None

    def wake_joiners(self) -> None:
        """Wake the joiners to look again (the manager stopped)."""
        if self.joined is not None:
            self.joined.set()
            self.joined = None

    def finished_elsewhere(self, task_id: str) -> None:
        """A task accepted here and held elsewhere has finished (or is gone)."""
        if task_id in self.elsewhere:
            self.elsewhere.discard(task_id)
            self.check_joined()

    def watch(self, task_id: str) -> anyio.Event:
        """An event set when the task with this id (held elsewhere) may have finished."""
        event = self.watchers.get(task_id)
        if event is None:
            event = self.watchers[task_id] = anyio.Event()
        return event

    def wake(self, task_id: str) -> None:
        event = self.watchers.pop(task_id, None)
        if event is not None:
            event.set()

    def wake_all(self) -> None:
        for event in self.watchers.values():
            event.set()
        self.watchers.clear()

    def purge(self, cutoff: float) -> int:
        """Without a journal: drop finished tasks that finished before ``cutoff``."""
        kept = deque(t for t in self.finished if (t.finished_at or 0) >= cutoff)
        purged = len(self.finished) - len(kept)
        for task in self.finished:
            if (task.finished_at or 0) < cutoff:
                del self.tasks[task.id]
        self.finished = kept
        return purged

    def statistics(self, queued: int) -> Statistics:
        counts = self.counts
        return Statistics(
            pending=counts[TaskStatus.PENDING],
            running=counts[TaskStatus.RUNNING],
            retrying=counts[TaskStatus.RETRYING],
            completed=counts[TaskStatus.COMPLETED],
            failed=counts[TaskStatus.FAILED],
            cancelled=counts[TaskStatus.CANCELLED],
            queued=queued,
            by_status=dict(counts),
        )
