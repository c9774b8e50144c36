"""BackgroundTaskManager: the one public facade; configuration, lifecycle, and the
public verbs (submit, get, list, cancel, requeue, purge, statistics).

It composes the parts along the data flow and hands each the collaborators it needs:
submit -> the task table (``_table``) and dispatch (``_queue``) -> the workers
(``_worker``) -> an attempt (``_attempt``) -> the state writer (``_writer``, the only
code that changes a task's status) -> the journal (``journal/``), kept current by the
journal watcher (``_sync``). Awaiting a handle goes through ``_handle.Outcomes``.
"""

from __future__ import annotations

import asyncio
import builtins
import enum
import math
import os
import socket
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping
from contextlib import asynccontextmanager, nullcontext
from datetime import datetime, timedelta, tzinfo
from inspect import CO_COROUTINE
from types import TracebackType
from typing import Any, Literal, ParamSpec, TypeVar, overload

import anyio

from ._clock import Clock, JournalClock, system_clock
from ._context import _current
from ._errors import InvalidTransition, JournalError, ManagerNotRunning, QueueFull, TaskNotFound
from ._events import log
from ._flow import Queue
from ._handle import Outcomes, TaskHandle
from ._ids import new_id
from ._models import TaskRecord, TransitionRecord
from ._periodic import Scheduler
from ._queue import Dispatch, ReadyQueue, Wakeup
from ._registry import RegisteredTask, TaskRegistry, is_async_callable
from ._retry import RetryPolicy
from ._states import TaskStatus
from ._sync import JournalSync
from ._table import QueueStatistics, Statistics, TaskTable
from ._task import Task
from ._validate import (
    check_at,
    check_delay,
    check_priority,
    check_retry,
    check_task_id,
    check_text,
    check_timeout,
)
from ._worker import wakeup_class, worker_loop
from ._writer import RoomWriter, StateWriter, cancel_row, requeue_row, reschedule_row
from .journal import _rows
from .journal._protocol import ClockedJournal, Journal, PeriodicJournal, TaskRow

__all__ = ["BackgroundTaskManager", "QueueStatistics", "Statistics"]

P = ParamSpec("P")
R = TypeVar("R")

PENDING, RUNNING, RETRYING = TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.RETRYING
COMPLETED, FAILED, CANCELLED = TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED
_NO_DEFAULTS: dict[str, Any] = {"queue": None, "priority": None, "timeout": None, "retry": None}


class _Phase(enum.Enum):
    """The manager's lifecycle: NEW -> RUNNING -> CLOSING -> CLOSED (-> RUNNING again)."""

    NEW = "new"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


class _Host:
    """Where the manager's task group lives. On asyncio, in a task of its own, started
    on enter and told to stop and awaited on exit, so that ``async with manager`` may be
    entered in one task and exited in another (pytest-asyncio runs an async fixture's
    setup and teardown in different tasks). On trio, in the caller's task: the structured
    rules stay. Either way the workers are the group's children as before; only where
    the group is entered differs."""

    __slots__ = ("_done", "_error", "_task", "tg")

    def __init__(self) -> None:
        self.tg: anyio.abc.TaskGroup | None = None
        self._task: asyncio.Task[None] | None = None
        self._done: anyio.Event | None = None
        self._error: BaseException | None = None

    async def open(self) -> anyio.abc.TaskGroup:
        self._error = None
        if anyio.get_cancelled_exc_class() is not asyncio.CancelledError:
            tg = self.tg = anyio.create_task_group()
            await tg.__aenter__()
            return tg
        started, self._done = anyio.Event(), anyio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(started))
        with anyio.CancelScope(shield=True):  # once started, close() is what stops it
            await started.wait()
        assert self.tg is not None
        return self.tg

    async def _run(self, started: anyio.Event) -> None:
        assert self._done is not None
        try:
            async with anyio.create_task_group() as tg:
                self.tg = tg
                started.set()
                await anyio.sleep_forever()
        except Exception as exc:  # a child's crash: raised where the manager is exited
            self._error = exc
        finally:
            self._done.set()

    async def close(self) -> None:
        """Cancel what is left in the group and wait for it to end."""
        tg = self.tg
        assert tg is not None
        tg.cancel_scope.cancel()
        try:
            if self._task is None:
                await tg.__aexit__(None, None, None)
                return
            assert self._done is not None
            with anyio.CancelScope(shield=True):
                await self._done.wait()
            if self._error is not None:
                raise self._error
        finally:
            self.tg = self._task = self._done = self._error = None


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class BackgroundTaskManager:
    """Runs ``async def`` functions in the background of this process, within bounds.

    Use it as ``async with manager:`` (or ``FastAPI(lifespan=manager.lifespan)``); leaving
    the block shuts down gracefully: intake stops, running attempts get ``shutdown_timeout``
    seconds, then are cancelled.

    Beyond the README's contract: ``poll_interval`` is how often a journaled manager looks
    for changes made by others (cancels, finished tasks it awaits, new work) when the
    journal cannot notify it; ``run_tasks=False`` (journal required) makes a manager that
    only submits, queries and waits, leaving the running to other managers on the same
    journal (a web app in front of a fleet of ``bgtasks worker`` processes).

    ``queues`` maps a queue name to its flow control, a ``Queue`` (or an int: its limit);
    ``run_queues`` names the queues this manager claims and runs (default: all). Without
    a journal a submit to a queue it does not run raises ``ValueError`` (nothing else
    would ever run it); with one the task is stored and waits for a manager that runs it.
    """

    def __init__(
        self,
        max_concurrency: int = 10,
        queues: Mapping[str, int | Queue] | None = None,
        journal: Journal | None = None,
        default_timeout: float | None = None,
        default_retry: RetryPolicy | None = None,
        max_pending: int | None = None,
        shutdown_timeout: float = 10.0,
        keep_finished: int = 10_000,
        max_recoveries: int = 5,
        poll_interval: float = 0.2,
        run_tasks: bool = True,
        clock: Clock | None = None,
        run_queues: Iterable[str] | None = None,
        when_full: Literal["raise", "wait"] = "raise",
    ) -> None:
        self.max_concurrency = _check_int("max_concurrency", max_concurrency, 1)
        self.queues: dict[str, Queue] | None = None
        if queues is not None:
            if not isinstance(queues, Mapping):
                raise ValueError(f"queues must be a mapping of queue name to limit, got {queues!r}")
            self.queues = {}
            for name, config in queues.items():
                try:
                    check_text(name, "a queue name")
                except TypeError as exc:  # bad configuration is a ValueError
                    raise ValueError(str(exc)) from None
                if not isinstance(config, Queue):
                    config = Queue(limit=_check_int(f"the limit of queue {name!r}", config, 1))
                if config.shared and journal is None:
                    raise ValueError(
                        f"queue {name!r} is Queue(shared=True), which needs a journal: its"
                        " figures hold across the managers sharing it"
                    )
                self.queues[name] = config
        if journal is not None and not isinstance(journal, Journal):
            raise ValueError(f"journal must be a journal (SQLiteJournal, ...), got {journal!r}")
        self.journal = journal
        try:
            self.default_timeout = check_timeout(default_timeout, "default_timeout")
            self.default_retry = check_retry(default_retry, "default_retry")
        except TypeError as exc:  # bad configuration is a ValueError, as documented
            raise ValueError(str(exc)) from None
        self.max_pending = (
            None if max_pending is None else _check_int("max_pending", max_pending, 1)
        )
        if when_full not in ("raise", "wait"):
            raise ValueError(f"when_full must be 'raise' or 'wait', got {when_full!r}")
        #: at max_pending, submit waits for room (True) or raises QueueFull (False)
        self.when_full = when_full
        self._waits_for_room = when_full == "wait"
        self._admitted = 0  # tasks let past a full max_pending, not yet in the table
        if (
            isinstance(shutdown_timeout, bool)
            or not isinstance(shutdown_timeout, int | float)
            or (math.isnan(shutdown_timeout) or shutdown_timeout < 0)
        ):
            raise ValueError(
                f"shutdown_timeout must be a number of seconds >= 0, got {shutdown_timeout!r}"
            )
        self.shutdown_timeout = float(shutdown_timeout)
        self.keep_finished = _check_int("keep_finished", keep_finished, 0)
        self.max_recoveries = _check_int("max_recoveries", max_recoveries, 0)
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
        if clock is not None and not isinstance(clock, Clock):
            raise ValueError(f"clock must be a Clock (time, monotonic, ...), got {clock!r}")
        #: every time the manager measures comes from here (``background_tasks._clock``)
        self.clock: Clock = system_clock if clock is None else clock
        if clock is None and isinstance(journal, ClockedJournal):
            # one clock for every manager on the journal: its own (PostgreSQL's)
            self.clock = JournalClock(system_clock)
        self._now = self.clock.time
        self._run_queues: frozenset[str] | None = None

        self.registry = TaskRegistry()
        self.registry.bind(self)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{new_id()[-8:]}"
        # The parts, each given what it needs (see the module docstring).
        self._table = TaskTable(self.keep_finished, journal is not None)
        self._queue = ReadyQueue(self.queues or {}, self.clock.monotonic)
        self._dispatch = Dispatch(self._queue, self.clock)
        writer_cls = RoomWriter if self._waits_for_room else StateWriter
        self._writer = writer_cls(
            self._table, self._queue, journal, self.owner, max_recoveries, self.clock
        )
        self._writer.shared = {n: q for n, q in (self.queues or {}).items() if q.shared}
        #: queues that take a partition
        self._partitioned = frozenset(
            n for n, q in (self.queues or {}).items() if q.per_partition is not None
        )
        self._writer.park = self._dispatch.park
        self._outcomes = Outcomes(self, self._table, journal)
        self._sync = (
            None
            if journal is None
            else JournalSync(
                journal,
                self._writer,
                self._table,
                self._dispatch,
                self.registry,
                self.default_retry,
                run_tasks,
                self.poll_interval,
            )
        )
        self._phase = _Phase.NEW
        self._host = _Host()
        self.run_queues = run_queues  # the setter checks it
        self._tg: anyio.abc.TaskGroup | None = None
        #: the event loop it runs on (asyncio), to refuse a caller on another one
        self._loop: asyncio.AbstractEventLoop | None = None
        #: set when a journaled manager stopped with unfinished tasks (join() says so)
        self._left_unfinished = 0
        self._workers_left = 0
        self._workers_started = 0  # workers started since __aenter__
        self._workers_done: anyio.Event | None = None
        self._wakeup_cls: Callable[[], Wakeup] = anyio.Event
        self._scope_cls: Callable[[], anyio.CancelScope] = anyio.CancelScope

    def __repr__(self) -> str:
        counts = self._table.counts
        journal = "memory" if self.journal is None else repr(self.journal)
        return (
            f"<BackgroundTaskManager {self._phase.value} journal={journal}"
            f" max_concurrency={self.max_concurrency} running={counts[RUNNING]}"
            f" waiting={counts[PENDING] + counts[RETRYING]}>"
        )

    @property
    def run_queues(self) -> frozenset[str] | None:
        """The queues this manager claims and runs; None: all of them."""
        return self._run_queues

    @run_queues.setter
    def run_queues(self, names: Iterable[str] | None) -> None:
        if self._live:
            raise RuntimeError("run_queues can only change while the manager is not running")
        if names is not None:
            if isinstance(names, str) or not isinstance(names, Iterable):
                raise ValueError(f"run_queues must be a list of queue names, got {names!r}")
            names = list(names)
            for name in names:
                try:
                    self._check_queue(name)
                except TypeError as exc:
                    raise ValueError(f"run_queues: {exc}") from None
            if not names:
                raise ValueError("run_queues must name at least one queue (or be None: all)")
        self._run_queues = None if names is None else frozenset(names)
        if self._sync is not None:
            self._sync.run_queues = self._run_queues

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
        return self.registry.define(
            fn, name=name, timeout=timeout, retry=retry, queue=queue, priority=priority
        )

    def periodic(
        self,
        schedule: str | None = None,
        *,
        every: timedelta | float | None = None,
        name: str | None = None,
        timezone: str | tzinfo = "UTC",
        missed: Literal["latest", "skip"] = "latest",
        overlap: bool = False,
        queue: str | None = None,
        priority: int | None = None,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
    ) -> Callable[[Callable[[], Coroutine[Any, Any, R]]], RegisteredTask[[], R]]:
        """Register a periodic task (``TaskRegistry.periodic``): each due tick of the cron
        ``schedule`` or of ``every`` becomes one ordinary task, run once in all by the
        managers sharing this manager's journal, whichever of them is up."""
        if queue is not None:
            self._check_queue(queue)
        return self.registry.periodic(
            schedule, every=every, name=name, timezone=timezone, missed=missed,
            overlap=overlap, queue=queue, priority=priority, timeout=timeout, retry=retry,
        )  # fmt: skip

    def include(self, registry: TaskRegistry) -> None:
        """Adopt the tasks of a standalone ``TaskRegistry`` (and bind their ``.submit``),
        its periodic tasks too."""
        for name, registered in registry.tasks.items():
            if name in self.registry.tasks and self.registry.tasks[name] is not registered:
                raise ValueError(f"a task named {name!r} is already registered")
            if registered.options_["queue"] is not None:
                self._check_queue(registered.options_["queue"])
        for name, registered in registry.tasks.items():
            self.registry.tasks[name] = registered
        self.registry.periodics.update(registry.periodics)
        registry.bind(self)

    # ---------------------------------------------------------------- lifecycle

    @property
    def running(self) -> bool:
        return self._phase is _Phase.RUNNING

    @property
    def _live(self) -> bool:
        """Started and not yet closed: tasks still finish and the journal is open."""
        return self._phase is _Phase.RUNNING or self._phase is _Phase.CLOSING

    async def __aenter__(self) -> BackgroundTaskManager:
        if self._live:
            raise RuntimeError("this manager is already running")
        self._dispatch.reset()
        self._writer.giving_up = False
        # The running backend's own classes: skips anyio's per-call backend lookup.
        self._outcomes.event_cls = type(anyio.Event())
        self._wakeup_cls = wakeup_class()
        self._scope_cls = type(anyio.CancelScope())
        journal, sync = self.journal, self._sync
        periodics = builtins.list(self.registry.periodics.values())
        if periodics and journal is not None and not isinstance(journal, PeriodicJournal):
            raise ValueError(
                f"{journal!r} cannot keep periodic tasks (it is no PeriodicJournal), and this"
                f" manager has some: {', '.join(p.name for p in periodics)}"
            )
        if journal is not None:
            await journal.open(self.owner)
        try:
            tg = await self._host.open()
        except BaseException:
            if journal is not None:
                await journal.close()
            raise
        self._tg = tg
        on_asyncio = anyio.get_cancelled_exc_class() is asyncio.CancelledError
        self._loop = self._outcomes.loop = asyncio.get_running_loop() if on_asyncio else None
        self._left_unfinished = 0
        self._writer.spawn = tg.start_soon
        self._outcomes.live = True
        self._workers_done = anyio.Event()
        try:
            if sync is not None:
                await sync.recover()
                await tg.start(sync.serve)
            if self.run_tasks:
                self._workers_left = self.max_concurrency
                self._workers_started = 0
                for _ in range(self.max_concurrency):
                    tg.start_soon(self._worker)
                await tg.start(self._dispatch.timer)
                # Return once each worker took work or waits for it, so a first submit
                # finds them idle.
                while self._workers_started < self.max_concurrency:
                    await anyio.lowlevel.checkpoint()
            else:  # submit and watch only: the journal's other managers run the tasks
                self._workers_left = 0
                self._workers_done.set()
            drive = getattr(self.clock, "drive", None)  # a test clock's own task (FakeClock)
            if drive is not None:
                tg.start_soon(drive, self._quiet, self._untaken)
            if periodics:
                scheduler = Scheduler(
                    periodics,
                    self.registry,
                    journal if isinstance(journal, PeriodicJournal) else None,
                    self._writer,
                    self._table,
                    self._dispatch,
                    sync,
                    self.default_timeout,
                    self.default_retry,
                    self.run_tasks,
                    self._now,
                )
                tg.start_soon(scheduler.run)
        except BaseException:  # cancelled, or a part crashed while starting: undo it all
            await self._abandon_start()
            raise
        self._phase = _Phase.RUNNING
        return self

    async def _abandon_start(self) -> None:
        """Stop what ``__aenter__`` started before it failed: the workers (shielded, they
        stop only when told), the rest of the group, the journal."""
        self._outcomes.live = False
        self._dispatch.stop()
        for task in list(self._table.running):  # recovered tasks a worker already began
            task.interrupted = True
            if task.scope is not None:
                task.scope.cancel()
        try:
            await self._host.close()  # raises what crashed, if anything did
        finally:
            self._tg = None
            self._writer.spawn = None
            if self.journal is not None:
                with anyio.CancelScope(shield=True):
                    await self.journal.close()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Shut down gracefully (what leaving ``async with`` does)."""
        if self._phase is not _Phase.RUNNING:
            return
        self._phase = _Phase.CLOSING
        self._freed()  # submits waiting for room (when_full="wait") see the shutdown
        assert self._workers_done is not None
        writer, dispatch = self._writer, self._dispatch
        try:
            with anyio.CancelScope(shield=True):
                dispatch.stop()
                with anyio.move_on_after(self.shutdown_timeout):
                    await self._workers_done.wait()
                writer.giving_up = True  # a journal still away keeps what it holds
                for task in list(self._table.running):
                    task.interrupted = True
                    if task.scope is not None:
                        task.scope.cancel()
                await self._workers_done.wait()
                while dispatch.claimed:  # claimed at submit, never started: next start runs it
                    task = dispatch.claimed.popleft()
                    self._queue.release(task)
                    if task.status is RUNNING and not task.remote:
                        await writer.interrupt(task)
                if self.journal is not None:  # what stays in the journal for the next start
                    self._left_unfinished = self._table.unfinished()
                await writer.drop_waiting()
        finally:
            try:
                await self._host.close()
            finally:
                self._tg = None
                self._writer.spawn = None
                self._phase = _Phase.CLOSED
                self._outcomes.live = False
                self._table.wake_all()
                self._table.wake_joiners()
                if self.journal is not None:
                    with anyio.CancelScope(shield=True):
                        await self.journal.close()

    async def join(self, timeout: float | None = None) -> None:
        """Wait until every task this manager accepted or recovered has finished,
        delayed and retrying ones too, and those submitted meanwhile.

        ``timeout`` (real seconds, whatever the manager's clock) raises ``TimeoutError``
        past it. Raises ``ManagerNotRunning`` if the manager stops, or has stopped, with
        tasks unfinished (with a journal they stay there for the next start), and
        ``RuntimeError`` when called from inside one of its tasks (it would wait for
        itself).
        """
        if timeout is not None and (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or math.isnan(timeout)
            or timeout < 0
        ):
            raise ValueError(f"timeout must be seconds >= 0 or None, got {timeout!r}")
        context = _current.get(None)
        if context is not None and context[1] is self._writer:
            raise RuntimeError("join() was called from inside a task of the same manager")
        with anyio.fail_after(timeout) if timeout is not None else nullcontext():
            await self._join()

    async def _join(self) -> None:
        table = self._table
        while True:
            left = table.unfinished()
            if not left:
                if self._left_unfinished and not self.running:
                    raise ManagerNotRunning(
                        f"the manager stopped with {self._left_unfinished} tasks unfinished;"
                        " they stay in the journal for its next start"
                    )
                return
            if not self._live:
                raise ManagerNotRunning(f"the manager is not running; {left} tasks are unfinished")
            self._outcomes.check_loop()
            event = table.joined
            if event is None:
                event = table.joined = anyio.Event()
            if not table.elsewhere:
                await event.wait()
                continue
            # Tasks held by other managers finish as the journal watcher sees; look at
            # their rows now and then too, in case it saw them before they were ours to
            # wait for.
            with anyio.move_on_after(1.0):
                await event.wait()
            await self._look_elsewhere()

    async def _look_elsewhere(self) -> None:
        journal, table = self.journal, self._table
        assert journal is not None
        for task_id in list(table.elsewhere):
            try:
                row = await journal.get(task_id)
            except JournalError:
                return  # look again later
            if row is None or row.status.is_terminal or task_id in table.tasks:
                table.finished_elsewhere(task_id)

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

    def _quiet(self) -> bool:
        """Nothing of this manager runs or is about to start (what a test clock's
        autojump asks before it jumps)."""
        return (
            not self._table.running and not self._dispatch.claimed and not self._queue.has_ready()
        )

    def _untaken(self) -> bool:
        """Work is ready here that no worker took yet (a test clock waits for it)."""
        return bool(self._dispatch.claimed) or self._queue.has_ready()

    async def _worker(self) -> None:
        self._workers_started += 1
        try:
            # Only the manager's own shutdown stops a worker: a cancelled scope around
            # ``async with manager`` is a shutdown like any other, and its running attempts
            # get shutdown_timeout too (then they are cancelled).
            with anyio.CancelScope(shield=True):
                await worker_loop(self._dispatch, self._writer, self._wakeup_cls, self._scope_cls)
        finally:
            self._workers_left -= 1
            if self._workers_left == 0 and self._workers_done is not None:
                self._workers_done.set()

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
        at: datetime | None = None,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        key: str | None = None,
        lock: str | None = None,
        partition: str | None = None,
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
        at: datetime | None = None,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        key: str | None = None,
        lock: str | None = None,
        partition: str | None = None,
    ) -> TaskHandle[R]: ...

    async def submit(
        self,
        fn: Callable[..., Coroutine[Any, Any, Any]] | str,
        *args: Any,
        kwargs: dict[str, Any] | None = None,
        queue: str | None = None,
        priority: int | None = None,
        delay: float | timedelta | None = None,
        at: datetime | None = None,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        key: str | None = None,
        lock: str | None = None,
        partition: str | None = None,
    ) -> TaskHandle[Any]:
        """Queue ``fn(*args, **kwargs)``; returns once accepted (durably, with a journal).

        ``lock``: tasks sharing it run one at a time (in priority, then submission order;
        with a journal, across every manager on it). ``partition``: its partition of a
        ``Queue(per_partition=...)``.
        ``delay`` (seconds or a timedelta) or ``at`` (an aware datetime; in the past means
        now) is the time before which the task does not start.
        """
        if self._phase is not _Phase.RUNNING:
            raise ManagerNotRunning()
        code = getattr(fn, "__code__", None)
        if code is not None and code.co_flags & CO_COROUTINE:  # a plain async def
            registered = None
        else:
            registered = self._resolve(fn)
        journal = self.journal
        if registered is None and journal is not None:
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
        if at is None:
            wait = 0.0 if delay is None else check_delay(delay)
        elif delay is not None:
            raise ValueError("give delay or at, not both")
        else:
            wait = check_at(at)  # the epoch time here; relative to now below
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
        if lock is not None:
            check_text(lock, "lock")
        if partition is not None:
            check_text(partition, "partition")
            if queue not in self._partitioned:
                raise ValueError(
                    f"partition={partition!r} needs a queue with per_partition: queue"
                    f" {queue!r} is not Queue(per_partition=...)"
                )
        runs_here = self._run_queues is None or queue in self._run_queues
        if not runs_here and journal is None:
            raise ValueError(
                f"queue {queue!r} is not in run_queues, and without a journal no other"
                " manager could run it"
            )
        table = self._table
        if key is not None:
            check_text(key, "key", empty=True)
            existing = table.keys.get(key)
            if existing is not None:
                return TaskHandle(self._outcomes, existing.id, existing)
        counts = table.counts
        if self.max_pending is not None and counts[PENDING] + counts[RETRYING] >= self.max_pending:
            if not self._waits_for_room:
                raise QueueFull(f"{self.max_pending} tasks are already waiting (max_pending)")
            options = {"queue": queue, "priority": priority, "delay": delay, "at": at}
            options |= {"timeout": timeout, "retry": retry, "key": key}
            return await self._submit_when_room(fn, args, kwargs, options)

        now = self._now()
        due = now + wait
        if at is not None:
            due, wait = wait, wait - now
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
            due,
        )
        if lock is not None:
            task.lock = lock
        if partition is not None:
            task.partition = partition
        dispatch = self._dispatch
        if journal is not None:
            row = _rows.new_row(task)
            if self._writer.shared and queue in self._writer.shared:
                row.shared = True
            if (
                wait <= 0
                and dispatch.idle
                and self._writer.claims_on_insert
                and runs_here
                and self._queue.take(task)
            ):
                return await self._submit_claimed(task, row)
            try:
                stored = await journal.insert(row)
            except BaseException:
                if self._tg is not None:  # the row may be stored although the call failed
                    self._tg.start_soon(self._adopt, task)
                raise
            if stored.id != task.id:  # an unfinished task with this key exists elsewhere
                return TaskHandle(self._outcomes, stored.id, table.tasks.get(stored.id))
            if self._phase is not _Phase.RUNNING or not self.run_tasks or not runs_here:
                table.elsewhere.add(task.id)  # join() waits for it wherever it runs
                return TaskHandle(self._outcomes, task.id, None)  # on disk; runs elsewhere/later
        self._writer.submitted(task)
        if wait > 0:
            dispatch.enqueue(task, task.scheduled_at)
        else:
            dispatch.push(task)
        return TaskHandle(self._outcomes, task.id, task)

    async def _submit_when_room(
        self, fn: Any, args: tuple[Any, ...], kwargs: Any, options: dict[str, Any]
    ) -> TaskHandle[Any]:
        """``submit`` at a full ``max_pending`` with ``when_full="wait"``: wait until
        there is room, then submit. Cancelled while waiting, it has stored nothing."""
        await self._wait_for_room(1)
        self._admitted += 1
        try:
            return await self.submit(fn, *args, kwargs=kwargs, **options)
        finally:
            self._admitted -= 1
            self._freed()

    async def _wait_for_room(self, n: int) -> None:
        """Until ``n`` more tasks fit below ``max_pending`` (counting the ones already
        let through whose rows are being written); ManagerNotRunning at shutdown."""
        assert self.max_pending is not None
        assert isinstance(self._writer, RoomWriter)
        counts = self._table.counts
        while True:
            if self._phase is not _Phase.RUNNING:
                raise ManagerNotRunning()
            if counts[PENDING] + counts[RETRYING] + self._admitted + n <= self.max_pending:
                return
            await self._writer.room().wait()

    def _freed(self) -> None:
        if isinstance(self._writer, RoomWriter):
            self._writer.freed()

    @overload
    async def submit_many(
        self,
        fn: str,
        items: Iterable[dict[str, Any]],
        *,
        queue: str | None = None,
        priority: int | None = None,
        delay: float | timedelta | None = None,
        at: datetime | None = None,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
    ) -> builtins.list[TaskHandle[Any]]: ...

    @overload
    async def submit_many(
        self,
        fn: Callable[..., Coroutine[Any, Any, R]],
        items: Iterable[dict[str, Any]],
        *,
        queue: str | None = None,
        priority: int | None = None,
        delay: float | timedelta | None = None,
        at: datetime | None = None,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
    ) -> builtins.list[TaskHandle[R]]: ...

    async def submit_many(
        self,
        fn: Callable[..., Coroutine[Any, Any, Any]] | str,
        items: Iterable[dict[str, Any]],
        *,
        queue: str | None = None,
        priority: int | None = None,
        delay: float | timedelta | None = None,
        at: datetime | None = None,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
    ) -> builtins.list[TaskHandle[Any]]:
        """Queue one task ``fn(**kwargs)`` per dict of ``items``, with the options of
        ``submit`` (but ``key``: a key names one task). With a journal, every task is
        stored in one transaction or none is: a bad item raises before anything is
        stored. Handles come back in the order of ``items``."""
        if self._phase is not _Phase.RUNNING:
            raise ManagerNotRunning()
        registered = self._resolve(fn)
        journal = self.journal
        if registered is None and journal is not None:
            raise TypeError(
                f"{fn!r} is not a registered task: with a journal, register it with "
                "@manager.task so that a restarted process can find it by name"
            )
        if isinstance(items, dict | str | bytes) or not isinstance(items, Iterable):
            raise TypeError(
                f"items must be an iterable of dicts of keyword arguments, got {items!r}"
            )
        batch = builtins.list(items)
        for i, kwargs in enumerate(batch):
            if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
                raise TypeError(f"items[{i}] must be a dict with str keys, got {kwargs!r}")
        # submit() resolves the same options inline (its hot path); keep the two alike.
        defaults = registered.options_ if registered is not None else _NO_DEFAULTS
        if queue is None:
            queue = defaults["queue"] or "default"
        else:
            self._check_queue(queue)
        if priority is None:
            priority = defaults["priority"] or 0
        else:
            check_priority(priority)
        if at is not None and delay is not None:
            raise ValueError("give delay or at, not both")
        due = check_at(at) if at is not None else None
        wait = check_delay(delay)
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
        if not batch:
            return []
        spec = (registered, fn, batch, queue, priority, timeout, retry, due, wait)
        if self.max_pending is None:
            return await self._submit_batch(*spec)
        n = len(batch)
        if n > self.max_pending:
            raise QueueFull(f"{n} tasks cannot fit below max_pending={self.max_pending}")
        counts = self._table.counts
        if counts[PENDING] + counts[RETRYING] + self._admitted + n > self.max_pending:
            if not self._waits_for_room:
                raise QueueFull(f"{self.max_pending} tasks are already waiting (max_pending)")
            await self._wait_for_room(n)
        self._admitted += n
        try:
            return await self._submit_batch(*spec)
        finally:
            self._admitted -= n
            self._freed()

    async def _submit_batch(
        self,
        registered: RegisteredTask[Any, Any] | None,
        fn: Any,
        batch: builtins.list[dict[str, Any]],
        queue: str,
        priority: int,
        timeout: float | None,
        retry: RetryPolicy | None,
        at: float | None,
        delay: float,
    ) -> builtins.list[TaskHandle[Any]]:
        """``submit_many`` once its arguments are checked and there is room."""
        if registered is not None:
            name, run = registered.name, registered.fn
        else:
            name, run = getattr(fn, "__qualname__", None) or repr(fn), fn
        timeout = None if timeout == math.inf else timeout
        now = self._now()
        due = now + delay if at is None else at
        tasks = [
            Task(
                new_id(), name, run, (), kw or None, queue, priority, None, timeout, retry, now, due
            )
            for kw in batch
        ]
        journal = self.journal
        if journal is not None:
            rows = [_rows.new_row(task) for task in tasks]  # SerializationError: nothing stored
            try:
                await journal.insert_many(rows)
            except BaseException:
                if self._tg is not None:  # the rows may be stored although the call failed
                    self._tg.start_soon(self._adopt_many, rows)
                raise
            if self._phase is not _Phase.RUNNING or not self.run_tasks:
                return [TaskHandle(self._outcomes, task.id, None) for task in tasks]
        dispatch, submitted = self._dispatch, self._writer.submitted
        for task in tasks:
            submitted(task)
            dispatch.enqueue(task, due)
        return [TaskHandle(self._outcomes, task.id, task) for task in tasks]

    async def _adopt_many(self, rows: builtins.list[TaskRow]) -> None:
        """``_adopt`` for a batch whose ``insert_many`` failed: stored all or none, so
        the first row tells; if it is there, queue them all (as they were stored)."""
        journal = self.journal
        assert journal is not None
        delay = 0.05
        while True:
            try:
                first = await journal.get(rows[0].id)
                break
            except JournalError as exc:
                if not self._live or self._writer.giving_up:
                    log.warning("task_adopt_failed", task_id=rows[0].id, error=str(exc))
                    return
                await anyio.sleep(delay)
                delay = min(delay * 2, 1.0)
        if first is None or self._sync is None or not self._live:
            return
        for row in rows:
            self._sync.take(row)

    async def _submit_claimed(self, task: Task, row: TaskRow) -> TaskHandle[Any]:
        """Accept and claim in one journal write: a worker is idle, so the task would be
        claimed by the very next write anyway (one write and one wake-up fewer).

        The idle worker and the queue slot are reserved before the write and given back
        if it fails. A write that failed or whose submitter was cancelled leaves the task
        to ``_adopt``, so that a stored claim never goes without a worker.
        """
        dispatch = self._dispatch
        worker = dispatch.idle.pop()
        try:
            stored = await self._writer.insert_claimed(task, row)
        except BaseException:
            self._unreserve(task, worker)
            if self._tg is not None:
                self._tg.start_soon(self._adopt, task)
            raise
        if stored.id != task.id:  # an unfinished task with this key exists elsewhere
            self._unreserve(task, worker)
            return TaskHandle(self._outcomes, stored.id, self._table.tasks.get(stored.id))
        dispatch.hand_claimed(task)
        worker.set()
        return TaskHandle(self._outcomes, task.id, task)

    def _unreserve(self, task: Task, worker: Wakeup) -> None:
        """Give back what ``_submit_claimed`` reserved for a task it did not store."""
        self._queue.release(task)
        if self._dispatch.stopping:
            worker.set()  # shutdown already woke the idle ones: this one must see it too
        else:
            self._dispatch.idle.append(worker)  # still waiting on this event: idle as it was

    async def _adopt(self, task: Task) -> None:
        """An insert that failed, or whose submitter was cancelled, may still have been
        stored (a commit whose answer was lost, a write still in flight). Once the
        journal answers, and after a write of ours that commits after it, run the task
        if it is there: claimed by us, or pending."""
        journal = self.journal
        assert journal is not None
        delay = 0.05
        while True:
            try:
                await journal.renew(
                    self.owner, self._now() + journal.lease_timeout, self._writer.unknown
                )
                row = await journal.get(task.id)
                break
            except JournalError as exc:
                if not self._live or self._writer.giving_up:
                    log.warning("task_adopt_failed", task_id=task.id, error=str(exc))
                    return
                await self.clock.sleep(delay)
                delay = min(delay * 2, 1.0)
        if row is None or task.id in self._table.tasks or not self._live:
            return
        if row.status is RUNNING and row.owner == self.owner and row.version == 1:
            self._queue.take(task, force=True)  # already claimed: its worker releases it
            self._writer.take_claimed(task)
            self._dispatch.hand_claimed(task)
            self._dispatch.wake(1)
        elif self._sync is not None and not row.status.is_terminal and row.status is not RUNNING:
            self._sync.take(row)

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
        check_text(queue, "queue")
        if self.queues is not None and queue != "default" and queue not in self.queues:
            names = ", ".join(["default", *sorted(self.queues)])
            raise ValueError(f"unknown queue {queue!r}: this manager has {names}")

    # ---------------------------------------------------------------- queries and actions

    def handle(self, task_id: str) -> TaskHandle[Any]:
        """A handle for any task id (awaiting it raises TaskNotFound if the id is unknown)."""
        check_task_id(task_id)
        return TaskHandle(self._outcomes, task_id, self._table.tasks.get(task_id))

    async def get(self, task_id: str) -> TaskRecord | None:
        check_task_id(task_id)
        if self.journal is not None and self._live:  # the source of truth
            row = await self.journal.get(task_id)
            return None if row is None else _rows.record(row)
        task = self._table.tasks.get(task_id)
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
        limit = _check_int("limit", limit, 0)
        if self.journal is not None and self._live:
            rows = await self.journal.list(status=wanted, queue=queue, name=name, limit=limit)
            return [_rows.record(row) for row in rows]
        out: builtins.list[TaskRecord] = []
        for task in reversed(self._table.tasks.values()):
            if len(out) >= limit:
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
        check_task_id(task_id)
        if self.journal is None or not self._live:
            return []
        return await self.journal.history(task_id)

    async def cancel(self, task_id: str) -> bool:
        """Cancel a pending, retrying or running task; False if finished or unknown."""
        check_task_id(task_id)
        task = self._table.tasks.get(task_id)
        if task is None or task.remote:
            if self.journal is None or not self._live:
                return False
            done = await cancel_row(self.journal, self.owner, task_id, self.clock)
            self._table.wake(task_id)
            return done
        if task.status.is_terminal:
            return False
        task.cancel_requested = True
        if task.status is RUNNING:
            if task.scope is not None:
                task.scope.cancel()
            await self._outcomes.settled(task)
        elif not task.busy and not await self._writer.cancel_waiting(task):
            # (a busy task's write in flight sees the flag and cancels after it)
            return await self.cancel(task_id)  # it moved on meanwhile: try again
        return True

    async def requeue(self, task_id: str) -> TaskRecord:
        """Put a FAILED or CANCELLED task back to PENDING with a fresh set of attempts."""
        check_task_id(task_id)
        if self._phase is not _Phase.RUNNING:
            raise ManagerNotRunning()
        task = self._table.tasks.get(task_id)
        if task is None or task.remote:
            if self.journal is None:
                raise TaskNotFound(task_id)
            row = await requeue_row(self.journal, self.owner, task_id, self.clock)
            if self._sync is not None:
                self._sync.take(row)
            return _rows.record(row)
        if task.status not in (FAILED, CANCELLED):
            raise InvalidTransition(
                "only failed or cancelled tasks can be requeued; "
                f"task {task_id} is {task.status.value}"
            )
        await self._writer.requeue(task)
        self._dispatch.enqueue(task, task.scheduled_at)
        return task.record()

    async def reschedule(
        self,
        task_id: str,
        *,
        delay: float | timedelta | None = None,
        at: datetime | None = None,
    ) -> TaskRecord:
        """Move a PENDING or RETRYING task's not-before time (``delay`` from now, 0 =
        now, or ``at``), keeping its status. With a journal, this works on any task of
        the journal, also one queued in another manager (it sees the change through its
        journal watcher). InvalidTransition for a task in another status, TaskNotFound
        for an unknown id."""
        check_task_id(task_id)
        if (delay is None) == (at is None):
            raise ValueError("reschedule takes a delay or an at (one of them)")
        when = self._now() + check_delay(delay) if at is None else check_at(at)
        if self._phase is not _Phase.RUNNING:
            raise ManagerNotRunning()
        task = self._table.tasks.get(task_id)
        if task is not None:
            # A claim or cancel of it is being written: its outcome first. (A flag, not an
            # event: a write in flight for a task being rescheduled is rare.)
            while task.busy:  # noqa: ASYNC110
                await anyio.sleep(0.005)
            if not task.remote:
                if task.status not in (PENDING, RETRYING):
                    raise InvalidTransition(
                        "only pending or retrying tasks can be rescheduled; "
                        f"task {task_id} is {task.status.value}"
                    )
                self._queue.discard(task)  # no worker takes it while the change is written
                if await self._writer.reschedule(task, when):
                    if task.cancel_requested:  # cancelled while the change was written
                        await self._writer.cancel_waiting(task)
                    else:
                        self._dispatch.enqueue(task, when)
                    return task.record()
            # another manager moved it on first: what the journal holds decides
        if self.journal is None:
            raise TaskNotFound(task_id)
        row = await reschedule_row(self.journal, self.owner, task_id, when, self.clock)
        if self._sync is not None:
            self._sync.take(row)
        return _rows.record(row)

    async def purge(self, older_than: float | timedelta) -> int:
        """Delete finished tasks that finished more than ``older_than`` ago."""
        try:
            age = check_delay(older_than)
        except (TypeError, ValueError):
            raise ValueError(
                f"older_than must be seconds >= 0 or a timedelta, got {older_than!r}"
            ) from None
        cutoff = self._now() - age
        if self.journal is not None and self._live:
            return await self.journal.purge(cutoff)
        return self._table.purge(cutoff)

    def statistics(self) -> Statistics:
        """Counts by status, and per queue (``Statistics.queues``): running here, ready,
        waiting on a limit (its limit, rate or partition, here or journal-wide) and
        waiting on a lock. The per-queue figures cost a pass over the queued tasks."""
        stats = self._table.statistics(self._queue.size)
        figures = self._queue.figures()
        running: dict[str, int] = {}
        for task in [*self._table.running, *self._dispatch.claimed]:
            running[task.queue] = running.get(task.queue, 0) + 1
        for name in sorted({*figures, *running}):
            f = figures.get(name)
            stats.queues[name] = QueueStatistics(
                running=running.get(name, 0),
                ready=0 if f is None else f.ready,
                waiting_on_limit=0 if f is None else f.waiting_on_limit,
                waiting_on_lock=0 if f is None else f.waiting_on_lock,
            )
        return stats
