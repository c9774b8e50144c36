"""BackgroundTaskManager: lifecycle, submit/get/list/cancel/requeue.

Task status changes in one section of this class ("the one writer"): ``_apply`` checks
the transition table, writes the journal (when there is one) before the change takes
effect, then ``_commit`` updates memory and emits the one event. ``_start`` and
``_complete`` are ``_commit``'s two commonest cases, unrolled for the in-memory worker.
"""

from __future__ import annotations

import builtins
import math
import os
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from inspect import CO_COROUTINE
from types import TracebackType
from typing import Any, ParamSpec, TypeVar, cast, overload

import anyio

from . import _durable
from ._errors import (
    InvalidTransition,
    ManagerNotRunning,
    QueueFull,
    SerializationError,
    TaskCancelled,
    TaskFailed,
    TaskNotFound,
)
from ._events import DEBUG, WARNING, is_enabled, log, transition
from ._handle import TaskHandle
from ._ids import new_id
from ._models import ErrorInfo, TaskRecord, TransitionRecord, dumps
from ._queue import ReadyQueue
from ._registry import RegisteredTask, TaskRegistry, is_async_callable
from ._retry import RetryPolicy
from ._states import TRANSITIONS, TaskStatus, check_transition
from ._task import Task
from ._validate import check_delay, check_priority, check_retry, check_timeout
from ._worker import Wakeup, wakeup_class, worker_loop
from .journal._protocol import Change, ClaimingJournal, Journal, TaskRow

__all__ = ["BackgroundTaskManager", "Statistics"]

P = ParamSpec("P")
R = TypeVar("R")

PENDING, RUNNING, RETRYING = TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.RETRYING
COMPLETED, FAILED, CANCELLED = TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED
_WAITING = frozenset({PENDING, RETRYING})
_NO_DEFAULTS: dict[str, Any] = {"queue": None, "priority": None, "timeout": None, "retry": None}


_STAT_FIELDS = frozenset(
    {"pending", "running", "retrying", "completed", "failed", "cancelled", "queued"}
)


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

    def __getitem__(self, name: str | TaskStatus) -> int:
        key = name.value if isinstance(name, TaskStatus) else name
        if key not in _STAT_FIELDS:
            raise KeyError(name)
        return int(getattr(self, key))


def _check_int(name: str, value: Any, minimum: int, *, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class BackgroundTaskManager:
    """Runs ``async def`` functions in the background of this process, within bounds.

    Use it as ``async with manager:`` (or ``FastAPI(lifespan=manager.lifespan)``); leaving
    the block shuts down gracefully: intake stops, running attempts get ``shutdown_timeout``
    seconds, then are cancelled.

    Beyond API.md: ``poll_interval`` is how often a journaled manager looks for changes
    made by others (cancels, finished tasks it awaits, new work) when the journal cannot
    notify it; ``run_tasks=False`` (journal required) makes a manager that only submits,
    queries and waits, leaving the running to other managers on the same journal (a web
    app in front of a fleet of ``bgtasks worker`` processes).
    """

    def __init__(
        self,
        max_concurrency: int = 10,
        queues: Mapping[str, int] | None = None,
        journal: Journal | None = None,
        default_timeout: float | None = None,
        default_retry: RetryPolicy | None = None,
        max_pending: int | None = None,
        shutdown_timeout: float = 10.0,
        keep_finished: int = 10_000,
        max_recoveries: int = 5,
        poll_interval: float = 0.2,
        run_tasks: bool = True,
    ) -> None:
        self.max_concurrency: int = _check_int("max_concurrency", max_concurrency, 1)  # type: ignore[assignment]
        if queues is not None:
            if not isinstance(queues, Mapping):
                raise ValueError(f"queues must be a mapping of queue name to limit, got {queues!r}")
            for name, limit in queues.items():
                if not isinstance(name, str) or not name:
                    raise ValueError(f"queue names must be non-empty strings, got {name!r}")
                _check_int(f"the limit of queue {name!r}", limit, 1)
        self.queues: dict[str, int] | None = dict(queues) if queues is not None else None
        if journal is not None and not isinstance(journal, Journal):
            raise ValueError(f"journal must be a journal (SQLiteJournal, ...), got {journal!r}")
        self.journal = journal
        try:
            self.default_timeout = check_timeout(default_timeout, "default_timeout")
            self.default_retry = check_retry(default_retry, "default_retry")
        except TypeError as exc:  # bad configuration is a ValueError, as API.md says
            raise ValueError(str(exc)) from None
        self.max_pending = _check_int("max_pending", max_pending, 1, optional=True)
        if (
            isinstance(shutdown_timeout, bool)
            or not isinstance(shutdown_timeout, int | float)
            or (math.isnan(shutdown_timeout) or shutdown_timeout < 0)
        ):
            raise ValueError(
                f"shutdown_timeout must be a number of seconds >= 0, got {shutdown_timeout!r}"
            )
        self.shutdown_timeout = float(shutdown_timeout)
        self.keep_finished: int = _check_int("keep_finished", keep_finished, 0)  # type: ignore[assignment]
        self.max_recoveries: int = _check_int("max_recoveries", max_recoveries, 0)  # type: ignore[assignment]
        if not isinstance(poll_interval, int | float) or not 0 < poll_interval <= 1:
            raise ValueError(f"poll_interval must be in (0, 1] seconds, got {poll_interval!r}")
        self.poll_interval = float(poll_interval)
        if not isinstance(run_tasks, bool):
            raise ValueError(f"run_tasks must be a bool, got {run_tasks!r}")
        if not run_tasks and journal is None:
            raise ValueError(
                "run_tasks=False needs a journal: tasks are then run by other managers "
                "(for example `bgtasks worker`) that share it"
            )
        self.run_tasks = run_tasks

        self.registry = TaskRegistry()
        self.registry._manager = self
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{new_id()[-8:]}"
        self._tasks: dict[str, Task] = {}  # live tasks, and finished ones kept for get/list
        self._finished: deque[Task] = deque()  # finished tasks kept, oldest first
        self._keys: dict[str, Task] = {}  # idempotency keys of unfinished tasks
        self._counts = dict.fromkeys(TaskStatus, 0)
        self._queue = ReadyQueue(self.queues or {})
        self._idle: list[Wakeup] = []  # idle workers, each waiting on its own
        self._running_tasks: set[Task] = set()
        self._claimed: deque[Task] = deque()  # claimed at submit, for the next free worker
        self._claims_on_insert = isinstance(journal, ClaimingJournal)
        self._apply_soon: Callable[..., Awaitable[None] | None] | None = getattr(
            journal, "apply_soon", None
        )  # optional on a journal (Journal.apply): completions that do not wait
        self._remote_waiters: dict[str, anyio.Event] = {}
        self._state = "new"  # new -> running -> closing -> closed (-> running again)
        self._closing = False
        self._tg: anyio.abc.TaskGroup | None = None
        self._timer_wake: anyio.Event | None = None
        self._workers_left = 0
        self._workers_started = 0  # workers started since __aenter__
        self._workers_done: anyio.Event | None = None
        self._cursor = 0
        self._event_cls: Callable[[], anyio.Event] = anyio.Event
        self._wakeup_cls: Callable[[], Wakeup] = anyio.Event
        self._scope_cls: Callable[..., anyio.CancelScope] = anyio.CancelScope

    # ---------------------------------------------------------------- registration

    @overload
    def task(self, fn: Callable[P, Coroutine[Any, Any, R]], /) -> RegisteredTask[P, R]: ...

    @overload
    def task(
        self,
        *,
        name: str | None = None,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        queue: str | None = None,
        priority: int | None = None,
    ) -> Callable[[Callable[P, Coroutine[Any, Any, R]]], RegisteredTask[P, R]]: ...

    def task(  # type: ignore[misc]  # mypy mistakes the ParamSpec in overload 2's return
        self,
        fn: Callable[..., Coroutine[Any, Any, Any]] | None = None,
        /,
        *,
        name: str | None = None,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        queue: str | None = None,
        priority: int | None = None,
    ) -> Any:
        """Register an ``async def`` function as a task (needed to journal it)."""
        if queue is not None:
            self._check_queue(queue)
        return self.registry._task(
            fn, name=name, timeout=timeout, retry=retry, queue=queue, priority=priority
        )

    def include(self, registry: TaskRegistry) -> None:
        """Adopt the tasks of a standalone ``TaskRegistry`` (and bind their ``.submit``)."""
        for name, registered in registry.tasks.items():
            if name in self.registry.tasks and self.registry.tasks[name] is not registered:
                raise ValueError(f"a task named {name!r} is already registered")
            if registered.options_["queue"] is not None:
                self._check_queue(registered.options_["queue"])
            self.registry.tasks[name] = registered
        registry._manager = self

    # ---------------------------------------------------------------- lifecycle

    @property
    def running(self) -> bool:
        return self._state == "running"

    @property
    def _live(self) -> bool:
        """Started and not yet closed: tasks still finish and the journal is open."""
        return self._state in ("running", "closing")

    async def __aenter__(self) -> BackgroundTaskManager:
        if self._state in ("running", "closing"):
            raise RuntimeError("this manager is already running")
        self._closing = False
        self._idle.clear()
        # The running backend's own classes: skips anyio's per-call backend lookup.
        self._event_cls = type(anyio.Event())
        self._wakeup_cls = wakeup_class()
        self._scope_cls = type(anyio.CancelScope())
        if self.journal is not None:
            await self.journal.open(self.owner)
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        try:
            if self.journal is not None:
                await _durable.recover(self, self.journal)
                tg.start_soon(_durable.serve, self, self.journal)
        except BaseException:
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)
            await self.journal.close()  # type: ignore[union-attr]
            raise
        self._workers_done = anyio.Event()
        if self.run_tasks:
            self._workers_left = self.max_concurrency
            self._workers_started = 0
            for _ in range(self.max_concurrency):
                tg.start_soon(self._worker)
            tg.start_soon(self._timer)
            while self._workers_started < self.max_concurrency:  # each took work or waits
                await anyio.lowlevel.checkpoint()  # for it: a first submit finds them
        else:  # submit and watch only: the journal's other managers run the tasks
            self._workers_left = 0
            self._workers_done.set()
        self._state = "running"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Shut down gracefully (what leaving ``async with`` does)."""
        if self._state != "running":
            return
        self._state = "closing"
        tg = self._tg
        assert tg is not None
        assert self._workers_done is not None
        try:
            with anyio.CancelScope(shield=True):
                self._closing = True
                self._wake(len(self._idle))
                with anyio.move_on_after(self.shutdown_timeout):
                    await self._workers_done.wait()
                for task in list(self._running_tasks):
                    task.interrupted = True
                    if task.scope is not None:
                        task.scope.cancel()
                await self._workers_done.wait()
                while self._claimed:  # claimed at submit, never started: the next start runs it
                    task = self._claimed.popleft()
                    self._queue.release(task.queue)
                    if task.status is RUNNING and not task.remote:
                        if task.cancel_requested:
                            await self._finish(task, CANCELLED)
                        else:
                            await self._interrupt(task)
                await self._drop_waiting()
        finally:
            tg.cancel_scope.cancel()
            try:
                await tg.__aexit__(None, None, None)
            finally:
                self._tg = None
                self._state = "closed"
                for event in self._remote_waiters.values():
                    event.set()
                self._remote_waiters.clear()
                if self.journal is not None:
                    with anyio.CancelScope(shield=True):
                        await self.journal.close()

    @asynccontextmanager
    async def lifespan(self, app: object = None) -> AsyncIterator[None]:
        """A FastAPI/Starlette lifespan: ``FastAPI(lifespan=manager.lifespan)``.

        It also leaves the manager on ``app.state`` for ``background_tasks.fastapi``'s
        dependencies to find.
        """
        state = getattr(app, "state", None)
        if state is not None:
            state.background_tasks_manager = self
        async with self:
            yield

    async def _worker(self) -> None:
        self._workers_started += 1
        try:
            await worker_loop(self)
        finally:
            self._workers_left -= 1
            if self._workers_left == 0 and self._workers_done is not None:
                self._workers_done.set()

    async def _timer(self) -> None:
        """Move delayed tasks (delays, retry backoff) to the ready heaps when they are due."""
        queue = self._queue
        while True:
            now = anyio.current_time()
            moved = queue.promote(now)
            if moved:
                self._wake(moved)
            due = queue.next_due()
            wake = self._timer_wake = anyio.Event()
            with anyio.move_on_after(math.inf if due is None else due - now):
                await wake.wait()

    def _wake(self, n: int) -> None:
        idle = self._idle
        while n > 0 and idle:
            idle.pop().set()
            n -= 1

    def _enqueue(self, task: Task, scheduled_at: float) -> None:
        wait = scheduled_at - time.time()
        if wait <= 0:
            self._queue.push(task)
            if self._idle:
                self._idle.pop().set()
        elif self._queue.push_delayed(task, anyio.current_time() + wait) and self._timer_wake:
            self._timer_wake.set()

    async def _drop_waiting(self) -> None:
        """At exit: without a journal, tasks that never ran end CANCELLED; with one, they
        stay PENDING on disk for the next start and are only forgotten here."""
        for task in [t for t in self._tasks.values() if t.status in _WAITING]:
            self._queue.discard(task)
            if self.journal is None:
                await self._apply(task, CANCELLED)
            else:
                self._forget(task)

    # ---------------------------------------------------------------- submitting

    @overload
    async def submit(
        self,
        fn: str,
        *args: Any,
        kwargs: dict[str, Any] | None = None,
        queue: str | None = None,
        priority: int | None = None,
        delay: float | timedelta | None = None,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        key: str | None = None,
    ) -> TaskHandle[Any]: ...

    @overload
    async def submit(
        self,
        fn: Callable[..., Coroutine[Any, Any, R]],
        *args: Any,
        kwargs: dict[str, Any] | None = None,
        queue: str | None = None,
        priority: int | None = None,
        delay: float | timedelta | None = None,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        key: str | None = None,
    ) -> TaskHandle[R]: ...

    async def submit(
        self,
        fn: Callable[..., Coroutine[Any, Any, Any]] | str,
        *args: Any,
        kwargs: dict[str, Any] | None = None,
        queue: str | None = None,
        priority: int | None = None,
        delay: float | timedelta | None = None,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        key: str | None = None,
    ) -> TaskHandle[Any]:
        """Queue ``fn(*args, **kwargs)``; returns once accepted (durably, with a journal)."""
        if self._state != "running":
            raise ManagerNotRunning()
        code = getattr(fn, "__code__", None)
        if code is not None and code.co_flags & CO_COROUTINE:  # a plain async def
            registered = None
        else:
            registered = self._resolve(fn)
        if registered is None and self.journal is not None:
            raise TypeError(
                f"{fn!r} is not a registered task: with a journal, register it with "
                "@manager.task so that a restarted process can find it by name"
            )
        defaults = registered.options_ if registered is not None else _NO_DEFAULTS
        if kwargs is not None and (
            not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs)
        ):
            raise TypeError(f"kwargs must be a dict with str keys, got {kwargs!r}")
        if queue is None:
            queue = defaults["queue"] or "default"
        else:
            self._check_queue(queue)
        if priority is None:
            priority = defaults["priority"] or 0
        else:
            check_priority(priority)
        wait = 0.0 if delay is None else check_delay(delay)
        if timeout is None:
            timeout = defaults["timeout"]
            if timeout is None:
                timeout = self.default_timeout
        else:
            timeout = check_timeout(timeout, "timeout")
        if retry is None:
            retry = defaults["retry"] or self.default_retry
        else:
            check_retry(retry, "retry")
        if key is not None:
            if not isinstance(key, str):
                raise TypeError(f"key must be a str, got {key!r}")
            existing = self._keys.get(key)
            if existing is not None:
                return TaskHandle(self, existing.id, existing)
        counts = self._counts
        if self.max_pending is not None and counts[PENDING] + counts[RETRYING] >= self.max_pending:
            raise QueueFull(f"{self.max_pending} tasks are already waiting (max_pending)")

        now = time.time()
        task = Task(
            new_id(),
            registered.name
            if registered is not None
            else getattr(fn, "__qualname__", None) or repr(fn),
            registered.fn if registered is not None else fn,  # type: ignore[arg-type]
            args,
            kwargs,
            queue,
            priority,
            key,
            None if timeout == math.inf else timeout,
            retry,
            now,
            now + wait,
        )
        if self.journal is not None:
            row = _durable.new_row(task)
            if wait <= 0 and self._idle and self._claims_on_insert and self._queue.take(queue):
                return await self._submit_claimed(task, row)
            stored = await self.journal.insert(row)
            if stored.id != task.id:  # an unfinished task with this key exists elsewhere
                return TaskHandle(self, stored.id, self._tasks.get(stored.id))
            if self._state != "running" or not self.run_tasks:  # on disk; run elsewhere/later
                return TaskHandle(self, task.id, None)
        self._register(task)
        if wait > 0:
            self._enqueue(task, task.scheduled_at)
        else:
            self._queue.push(task)
            if self._idle:
                self._idle.pop().set()
        return TaskHandle(self, task.id, task)

    async def _submit_claimed(self, task: Task, row: TaskRow) -> TaskHandle[Any]:
        """Accept and claim in one journal write: a worker is idle, so the task would be
        claimed by the very next write anyway (one write and one wake-up fewer).

        The idle worker and the queue slot are reserved before the write and given back
        if it fails. A submitter cancelled while the write is in flight leaves the task
        to ``_adopt``, so that a stored claim never goes without a worker.
        """
        journal = cast(ClaimingJournal, self.journal)  # _claims_on_insert said so
        worker = self._idle.pop()
        now = task.created_at
        row.status, row.version, row.attempts = RUNNING, 1, 1
        row.owner, row.started_at = self.owner, now
        row.lease_until = now + journal.lease_timeout
        try:
            stored = await journal.insert_claimed(row)
        except BaseException as exc:
            self._unreserve(task, worker)
            if not isinstance(exc, Exception) and self._tg is not None:  # cancelled
                self._tg.start_soon(self._adopt, task)
            raise
        if stored.id != task.id:  # an unfinished task with this key exists elsewhere
            self._unreserve(task, worker)
            return TaskHandle(self, stored.id, self._tasks.get(stored.id))
        self._take_claimed(task)
        worker.set()
        return TaskHandle(self, task.id, task)

    def _unreserve(self, task: Task, worker: Wakeup) -> None:
        """Give back what ``_submit_claimed`` reserved for a task it did not store."""
        self._queue.release(task.queue)
        if self._closing:
            worker.set()  # shutdown already woke the idle ones: this one must see it too
        else:
            self._idle.append(worker)  # still waiting on this event: idle as it was

    def _register(self, task: Task) -> None:
        """A new PENDING task, accepted (and stored, with a journal)."""
        self._tasks[task.id] = task
        self._counts[PENDING] += 1
        if task.key is not None:
            self._keys[task.key] = task
        if is_enabled(DEBUG):
            log.debug(
                "task_submitted", task_id=task.id, name=task.name, queue=task.queue, attempt=0
            )

    def _take_claimed(self, task: Task) -> None:
        """Register a task stored as claimed by this manager and queue it for a worker."""
        self._register(task)
        task.version = 1
        self._commit(task, RUNNING, task.created_at)
        self._running_tasks.add(task)
        self._claimed.append(task)

    async def _adopt(self, task: Task) -> None:
        """A submitter was cancelled while its claiming insert was in flight: once that
        write is settled (a later write of ours commits after it), run the task if it
        was stored."""
        journal = self.journal
        assert journal is not None
        try:
            await journal.renew(self.owner, time.time() + journal.lease_timeout)
            row = await journal.get(task.id)
        except Exception:
            log.exception("task_adopt_failed", task_id=task.id, name=task.name)
            return
        if row is None or row.status is not RUNNING or row.owner != self.owner:
            return
        self._queue.take(task.queue, force=True)  # already claimed: its worker releases it
        self._take_claimed(task)
        self._wake(1)

    def _resolve(self, fn: object) -> RegisteredTask[Any, Any] | None:
        if isinstance(fn, RegisteredTask):
            if self.registry.tasks.get(fn.name) is not fn:
                raise ValueError(
                    f"task {fn.name!r} is registered on another manager or registry; "
                    "include it with manager.include(registry)"
                )
            return fn
        if isinstance(fn, str):
            found = self.registry.tasks.get(fn)
            if found is None:
                names = ", ".join(sorted(self.registry.tasks)) or "none"
                raise ValueError(
                    f"no task is registered under the name {fn!r} (registered: {names})"
                )
            return found
        if not is_async_callable(fn):
            raise TypeError(
                f"{fn!r} is not an async def function (or a registered task, or its name)"
            )
        return None

    def _check_queue(self, queue: object) -> None:
        if not isinstance(queue, str):
            raise TypeError(f"queue must be a str, got {queue!r}")
        if not queue:
            raise ValueError("queue must be a non-empty str")
        if self.queues is not None and queue != "default" and queue not in self.queues:
            names = ", ".join(["default", *sorted(self.queues)])
            raise ValueError(f"unknown queue {queue!r}: this manager has {names}")

    # ---------------------------------------------------------------- queries and actions

    def handle(self, task_id: str) -> TaskHandle[Any]:
        """A handle for any task id (awaiting it raises TaskNotFound if the id is unknown)."""
        return TaskHandle(self, task_id, self._tasks.get(task_id))

    async def get(self, task_id: str) -> TaskRecord | None:
        if self.journal is not None and self._live:  # the source of truth
            row = await self.journal.get(task_id)
            return None if row is None else _durable.record(row)
        task = self._tasks.get(task_id)
        return None if task is None or task.remote else task.record()

    async def list(
        self,
        status: TaskStatus | str | None = None,
        queue: str | None = None,
        name: str | None = None,
        limit: int = 100,
    ) -> builtins.list[TaskRecord]:
        """Records, newest first, filtered by status, queue and name."""
        wanted = (
            None
            if status is None
            else TaskStatus(status.lower() if isinstance(status, str) else status)
        )
        limit_ = _check_int("limit", limit, 0)
        assert limit_ is not None
        if self.journal is not None and self._live:
            rows = await self.journal.list(status=wanted, queue=queue, name=name, limit=limit_)
            return [_durable.record(row) for row in rows]
        out: builtins.list[TaskRecord] = []
        for task in reversed(self._tasks.values()):
            if len(out) >= limit_:
                break
            if (
                (wanted is None or task.status is wanted)
                and (queue is None or task.queue == queue)
                and (name is None or task.name == name)
            ):
                out.append(task.record())
        return out

    async def history(self, task_id: str) -> builtins.list[TransitionRecord]:
        """The journaled transitions of a task, oldest first (empty without a journal)."""
        if self.journal is None or not self._live:
            return []
        return await self.journal.history(task_id)

    async def cancel(self, task_id: str) -> bool:
        """Cancel a pending, retrying or running task; False if finished or unknown."""
        task = self._tasks.get(task_id)
        if task is None or task.remote:
            if self.journal is None or not self._live:
                return False
            return await _durable.cancel_elsewhere(self, self.journal, task_id)
        if task.status.is_terminal:
            return False
        task.cancel_requested = True
        if task.status is RUNNING:
            if task.scope is not None:
                task.scope.cancel()
            await self._outcome_settled(task)
        elif not task.busy:  # else the write in flight sees the flag and cancels after it
            self._queue.discard(task)
            if not await self._apply(task, CANCELLED):
                return await self.cancel(task_id)  # it moved on meanwhile: try again
        return True

    async def requeue(self, task_id: str) -> TaskRecord:
        """Put a FAILED or CANCELLED task back to PENDING with a fresh set of attempts."""
        if self._state != "running":
            raise ManagerNotRunning()
        task = self._tasks.get(task_id)
        if task is None or task.remote:
            if self.journal is None:
                raise TaskNotFound(task_id)
            row = await _durable.requeue_row(self.journal, self.owner, task_id)
            if row.id not in self._tasks and self.run_tasks:
                adopted = _durable.adopt(self, row)
                if adopted is not None:
                    self._enqueue(adopted, row.scheduled_at)
            return _durable.record(row)
        if task.status not in (FAILED, CANCELLED):
            raise InvalidTransition(
                "only failed or cancelled tasks can be requeued; "
                f"task {task_id} is {task.status.value}"
            )
        if task.key is not None and self._keys.get(task.key, task) is not task:
            raise InvalidTransition(f"another unfinished task holds the key {task.key!r}")
        if self.journal is None:
            self._finished.remove(task)  # O(n), but requeue is rare and eviction stays exact
        if not await self._apply(task, PENDING):
            raise InvalidTransition(f"task {task_id} changed while being requeued; try again")
        self._tasks[task.id] = task
        self._enqueue(task, task.scheduled_at)
        return task.record()

    async def purge(self, older_than: float | timedelta) -> int:
        """Delete finished tasks that finished more than ``older_than`` ago."""
        try:
            age = check_delay(older_than)
        except (TypeError, ValueError):
            raise ValueError(
                f"older_than must be seconds >= 0 or a timedelta, got {older_than!r}"
            ) from None
        cutoff = time.time() - age
        if self.journal is not None and self._live:
            return await self.journal.purge(cutoff)
        kept = deque(t for t in self._finished if (t.finished_at or 0) >= cutoff)
        purged = len(self._finished) - len(kept)
        for task in self._finished:
            if (task.finished_at or 0) < cutoff:
                del self._tasks[task.id]
        self._finished = kept
        return purged

    def statistics(self) -> Statistics:
        counts = self._counts
        return Statistics(
            pending=counts[PENDING],
            running=counts[RUNNING],
            retrying=counts[RETRYING],
            completed=counts[COMPLETED],
            failed=counts[FAILED],
            cancelled=counts[CANCELLED],
            queued=self._queue.size,
            by_status=dict(counts),
        )

    # ---------------------------------------------------------------- outcomes

    @staticmethod
    def _result(task: Task) -> Any:
        """The outcome of a finished task held here: its value, or TaskFailed/TaskCancelled."""
        return _result_of(task.id, task.status, task.result, task.error, task.exc)

    async def _outcome(self, task_id: str, task: Task | None) -> Any:
        """The result of a task, waiting for it; the body of ``await handle``."""
        while True:
            if task is None:
                task = self._tasks.get(task_id)
            if task is not None and not task.remote:
                if task.status.is_terminal:
                    return _result_of(task_id, task.status, task.result, task.error, task.exc)
                if not self._live:
                    raise ManagerNotRunning(f"the manager stopped before task {task_id} finished")
                event = task.waiters
                if event is None:
                    event = task.waiters = self._event_cls()
                await event.wait()
                continue
            if self.journal is None:
                raise TaskNotFound(task_id)
            if not self._live:
                raise ManagerNotRunning(
                    f"the manager is not running; cannot wait for task {task_id}"
                )
            event = self._remote_waiters.get(task_id)
            if event is None:
                event = self._remote_waiters[task_id] = anyio.Event()
            row = await self.journal.get(task_id)
            if row is None:
                raise TaskNotFound(task_id)
            if row.status.is_terminal:
                rec = _durable.record(row)
                exc = task.exc if task is not None else None
                return _result_of(task_id, rec.status, rec.result, rec.error, exc)
            await event.wait()
            task = None

    async def _outcome_settled(self, task: Task) -> None:
        while task.status is RUNNING and not task.remote and self._state != "closed":
            event = task.waiters
            if event is None:
                event = task.waiters = anyio.Event()
            await event.wait()

    # ---------------------------------------------------------------- the one writer

    async def _claim(self, task: Task) -> bool:
        """PENDING/RETRYING -> RUNNING through the journal, unless the task moved on
        (cancelled, or claimed by another manager first). In memory, ``_start``."""
        if task.status not in _WAITING or task.remote:
            return False
        if not await self._apply(task, RUNNING):
            return False
        self._running_tasks.add(task)
        return True

    async def _finish(
        self,
        task: Task,
        target: TaskStatus,
        *,
        result: Any = None,
        error: BaseException | None = None,
        retry_at: float = 0.0,
    ) -> None:
        """Record how a claimed attempt ended (COMPLETED, FAILED, RETRYING, CANCELLED)."""
        self._running_tasks.discard(task)
        if task.status is RUNNING or (task.status in _WAITING and target is CANCELLED):
            await self._apply(task, target, result=result, error=error, retry_at=retry_at)
        if task.status is RETRYING and not task.remote:
            if task.cancel_requested:
                await self._apply(task, CANCELLED)
            else:
                self._enqueue(task, task.scheduled_at)

    def _complete_soon(self, task: Task, result: Any) -> Awaitable[None] | bool:
        """RUNNING -> COMPLETED without waiting for the commit, where the journal can
        (``apply_soon``): the worker is free at once, and the task is settled in memory
        when its batch commits, before anyone of that batch wakes, so a task claimed in
        the same batch never overlaps it. False: take the waiting path (the result does
        not serialise, or the journal cannot). An awaitable: the write leads the next
        batch, await it. Not a coroutine, and no closure: a worker's every task goes
        through here, and fewer objects in flight mean fewer garbage collections."""
        apply_soon = self._apply_soon
        if apply_soon is None:
            return False
        now = time.time()
        try:
            change = _durable.change(self, task, COMPLETED, now, result, None, 0.0)
        except SerializationError:
            return False
        self._running_tasks.discard(task)
        task.busy = True
        lead = apply_soon(change, partial(self._completed_soon, task, change, now, result))
        return True if lead is None else lead

    def _completed_soon(
        self,
        task: Task,
        change: Change,
        now: float,
        result: Any,
        applied: bool,
        error: BaseException | None,
    ) -> None:
        """The commit of ``_complete_soon``'s write (or its failure)."""
        task.busy = False
        if error is not None:
            log.error("journal_error", task_id=task.id, name=task.name, error=str(error))
        elif self._written(task, change, applied) and task.status is RUNNING:
            self._commit(task, COMPLETED, now, result)

    async def _interrupt(self, task: Task) -> None:
        """An attempt cut short by shutdown: back to PENDING (journal) or CANCELLED (memory)."""
        self._running_tasks.discard(task)
        if self.journal is None:
            await self._apply(task, CANCELLED)
        elif task.recoveries >= self.max_recoveries:
            error = RuntimeError(
                f"task {task.id} was interrupted more than "
                f"max_recoveries={self.max_recoveries} times"
            )
            await self._apply(task, FAILED, error=error)
        else:
            await self._apply(task, PENDING)

    async def _apply(
        self,
        task: Task,
        target: TaskStatus,
        *,
        result: Any = None,
        error: BaseException | None = None,
        retry_at: float = 0.0,
    ) -> bool:
        """Change a task's status: the table, then the journal, then memory (``_commit``).

        False when the journal refused the change because another manager sharing it got
        there first; the task is then theirs and is dropped from this one.
        """
        check_transition(task.status, target)
        now = time.time()
        journal = self.journal
        info = None if error is None else ErrorInfo.from_exception(error)
        if journal is not None:
            change = _durable.change(self, task, target, now, result, info, retry_at)
            task.busy = True
            try:
                applied = await journal.apply(change)
            finally:
                task.busy = False
            if not self._written(task, change, applied):
                return False
        self._commit(task, target, now, result, error, retry_at, info)
        return True

    def _written(self, task: Task, change: Change, applied: bool) -> bool:
        """After a journal write of ``change``: the task's new version, or, if another
        manager got there first, the task is theirs (dropped here). False then."""
        if not applied:
            self._lose(task)
            return False
        task.version = change.version + 1
        return True

    def _commit(
        self,
        task: Task,
        target: TaskStatus,
        now: float,
        result: Any = None,
        error: BaseException | None = None,
        retry_at: float = 0.0,
        info: ErrorInfo | None = None,
    ) -> None:
        """The in-memory half of a transition, and its event; only ``_claim``, ``_apply``
        and the worker's in-memory fast path call it, after any journal write."""
        source = task.status
        if target not in TRANSITIONS[source]:
            check_transition(source, target)  # raises InvalidTransition
        if info is None and error is not None:
            info = ErrorInfo.from_exception(error)
        counts = self._counts
        counts[source] -= 1
        counts[target] += 1
        task.status = target
        if target is RUNNING:
            task.interrupted = False
            task.attempts += 1
            if task.started_at is None:
                task.started_at = now
        elif target is RETRYING:
            task.error, task.exc = info, error
            task.scheduled_at = retry_at
        elif target is PENDING:
            if source is RUNNING:
                task.recoveries += 1
            else:  # requeue: a fresh start
                task.attempts = task.recoveries = 0
                task.result = task.error = task.exc = task.progress = None
                task.started_at = task.finished_at = None
                task.cancel_requested = False
                task.scheduled_at = now
                if task.key is not None:
                    self._keys[task.key] = task
        else:  # terminal
            task.finished_at = now
            if target is COMPLETED:
                task.result = result
            elif target is FAILED:
                task.error, task.exc = info, error
            self._settle(task)
        if task.waiters is not None and target is not RUNNING:
            task.waiters.set()
            task.waiters = None
        if target is FAILED or target is RETRYING:
            if is_enabled(WARNING):
                transition(task, source, target, info)
        elif is_enabled(DEBUG):
            transition(task, source, target, None)

    def _start(self, task: Task) -> None:
        """``_commit(task, RUNNING)`` for the in-memory worker: the same writes, fewer
        branches (this and ``_complete`` are most of what a task costs)."""
        source = task.status
        if RUNNING not in TRANSITIONS[source]:
            check_transition(source, RUNNING)
        counts = self._counts
        counts[source] -= 1
        counts[RUNNING] += 1
        task.status = RUNNING
        task.interrupted = False
        task.attempts += 1
        if task.started_at is None:
            task.started_at = time.time()
        if is_enabled(DEBUG):
            transition(task, source, RUNNING, None)

    def _complete(self, task: Task, result: Any) -> None:
        """``_commit(task, COMPLETED, result=...)`` for the in-memory worker."""
        if task.status is not RUNNING:
            check_transition(task.status, COMPLETED)
        counts = self._counts
        counts[RUNNING] -= 1
        counts[COMPLETED] += 1
        task.status = COMPLETED
        task.finished_at = time.time()
        task.result = result
        self._settle(task)
        if task.waiters is not None:
            task.waiters.set()
            task.waiters = None
        if is_enabled(DEBUG):
            transition(task, RUNNING, COMPLETED, None)

    def _settle(self, task: Task) -> None:
        """Bookkeeping for a task that just finished: keys, waiters by id, retention."""
        if task.key is not None and self._keys.get(task.key) is task:
            del self._keys[task.key]
        event = self._remote_waiters.pop(task.id, None) if self._remote_waiters else None
        if event is not None:
            event.set()
        if self.journal is not None:
            self._tasks.pop(task.id, None)  # the journal keeps it; handles keep their own
            return
        finished = self._finished
        finished.append(task)
        if len(finished) > self.keep_finished:
            del self._tasks[finished.popleft().id]

    def _forget(self, task: Task) -> None:
        """Drop a journaled task from this process's memory (the journal still has it)."""
        self._tasks.pop(task.id, None)
        self._counts[task.status] -= 1
        if task.key is not None and self._keys.get(task.key) is task:
            del self._keys[task.key]
        if task.waiters is not None:  # awaiters look again (the journal, or stopped)
            task.waiters.set()
            task.waiters = None

    def _lose(self, task: Task) -> None:
        """Another manager changed this task first: it is no longer ours to run or finish."""
        if task.status is RUNNING and is_enabled(WARNING):  # we stalled past our lease
            log.warning(
                "task_outcome_fenced", task_id=task.id, name=task.name, queue=task.queue,
                attempt=task.attempts, reason="the task was reclaimed by another owner",
            )  # fmt: skip
        self._queue.discard(task)
        self._running_tasks.discard(task)
        task.remote = True
        self._forget(task)  # awaiters switch to watching the journal

    async def _progress(self, task: Task) -> None:
        if self.journal is not None and task.progress is not None:
            fraction, message, at = task.progress
            text = dumps({"fraction": fraction, "message": message, "updated_at": at}, "progress")
            await self.journal.set_progress(task.id, self.owner, task.version, text)


def _result_of(
    task_id: str,
    status: TaskStatus,
    result: Any,
    error: ErrorInfo | None,
    exc: BaseException | None,
) -> Any:
    if status is COMPLETED:
        return result
    if status is CANCELLED:
        raise TaskCancelled(task_id)
    failure = TaskFailed(task_id, error or ErrorInfo(type="unknown", message="unknown error"))
    raise failure from exc
