"""TaskHandle, and the outcome wait behind ``await handle``: wherever the task runs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio

from ._codec import codec_of
from ._errors import JournalError, ManagerNotRunning, TaskCancelled, TaskFailed, TaskNotFound
from ._models import ErrorInfo
from ._states import TaskStatus
from .journal import _rows

if TYPE_CHECKING:
    from ._manager import BackgroundTaskManager
    from ._models import TaskRecord
    from ._table import TaskTable
    from ._task import Task
    from .journal._protocol import Journal

__all__ = ["Outcomes", "TaskHandle", "result_of"]

T = TypeVar("T")
RUNNING = TaskStatus.RUNNING

OTHER_LOOP = (
    "this manager runs on another event loop than this caller: it was started in one "
    "event loop and is awaited from another, where its tasks never run. With "
    "pytest-asyncio, a manager fixture of a wider scope (module, session) needs the tests "
    'that use it in the same loop: @pytest.mark.asyncio(loop_scope="module") (see '
    "docs/testing.md)"
)


async def _done(value: T) -> T:
    return value


def result_of(
    task_id: str,
    status: TaskStatus,
    result: Any,
    error: ErrorInfo | None,
    exc: BaseException | None,
) -> Any:
    """A finished task's value, or its TaskFailed (from the original exception, where
    it ran here) or TaskCancelled."""
    if status is TaskStatus.COMPLETED:
        return result
    if status is TaskStatus.CANCELLED:
        raise TaskCancelled(task_id)
    failure = TaskFailed(task_id, error or ErrorInfo(type="unknown", message="unknown error"))
    raise failure from exc


class Outcomes:
    """Waits for tasks to finish: held here (their own event, made only when someone
    waits) or elsewhere on the journal (woken by the journal watcher)."""

    __slots__ = ("event_cls", "journal", "live", "loop", "manager", "table")

    def __init__(
        self, manager: BackgroundTaskManager, table: TaskTable, journal: Journal | None
    ) -> None:
        self.manager = manager  # for the handles' cancel() and record()
        self.table = table
        self.journal = journal
        self.live = False  # started and not yet closed: tasks still finish here
        self.event_cls: Callable[[], anyio.Event] = anyio.Event
        self.loop: asyncio.AbstractEventLoop | None = None  # the manager's, on asyncio

    def check_loop(self) -> None:
        """Refuse to wait from another event loop than the manager's (it would hang)."""
        loop = self.loop
        if loop is not None and asyncio.get_running_loop() is not loop:
            raise RuntimeError(OTHER_LOOP)

    async def wait(self, task_id: str, task: Task | None) -> Any:
        """The result of a task, waiting for it; the body of ``await handle``."""
        table = self.table
        while True:
            if task is None:
                task = table.tasks.get(task_id)
            if task is not None and not task.remote:
                if task.status.is_terminal:
                    return result_of(task_id, task.status, task.result, task.error, task.exc)
                if not self.live:
                    raise ManagerNotRunning(f"the manager stopped before task {task_id} finished")
                event = task.waiters
                if event is None:
                    self.check_loop()
                    event = task.waiters = self.event_cls()
                await event.wait()
                continue
            if self.journal is None:
                raise TaskNotFound(task_id)
            if not self.live:
                raise ManagerNotRunning(
                    f"the manager is not running; cannot wait for task {task_id}"
                )
            self.check_loop()
            event = table.watch(task_id)
            try:
                row = await self.journal.get(task_id)
            except JournalError:  # the task's outcome, not a transient fault, is the answer
                await anyio.sleep(0.2)
                task = None
                continue
            if row is None:
                raise TaskNotFound(task_id)
            if row.status.is_terminal:
                rec = _rows.record(row)
                exc = task.exc if task is not None else None
                value = rec.result
                registered = self.manager.registry.tasks.get(row.name)
                codec = None if registered is None else codec_of(registered.fn, row.name)
                if codec is not None and value is not None:
                    value = codec.decode_result(value)  # as the task annotates it
                return result_of(task_id, rec.status, value, rec.error, exc)
            await event.wait()
            task = None

    async def settled(self, task: Task) -> None:
        """Until a RUNNING task held here has recorded how its attempt ended."""
        while task.status is RUNNING and not task.remote and self.live:
            event = task.waiters
            if event is None:
                event = task.waiters = anyio.Event()
            await event.wait()


class TaskHandle(Generic[T]):
    """``await handle`` gives the task's return value or raises TaskFailed/TaskCancelled.

    Waiting is cancellation-safe: cancelling the awaiter (a client that went away) never
    cancels the task; use ``cancel()`` for that.
    """

    __slots__ = ("_outcomes", "_task", "id")

    def __init__(self, outcomes: Outcomes, task_id: str, task: Task | None) -> None:
        self._outcomes = outcomes
        self._task = task
        self.id = task_id

    def __repr__(self) -> str:
        return f"<TaskHandle {self.id}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TaskHandle) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __await__(self) -> Generator[Any, None, T]:
        task = self._task
        if task is not None and task.status.is_terminal and not task.remote:
            outcome = result_of(task.id, task.status, task.result, task.error, task.exc)
            return _done(outcome).__await__()  # no wait, no scope
        return self.result().__await__()

    async def result(self, timeout: float | None = None) -> T:
        """The outcome, waiting at most ``timeout`` seconds (TimeoutError past it)."""
        with anyio.fail_after(timeout) if timeout is not None else nullcontext():
            value: T = await self._outcomes.wait(self.id, self._task)
            return value

    async def cancel(self) -> bool:
        return await self._outcomes.manager.cancel(self.id)

    async def record(self) -> TaskRecord | None:
        """The task's current ``TaskRecord`` (or None if it has been purged)."""
        return await self._outcomes.manager.get(self.id)
