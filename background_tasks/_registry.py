"""Registered tasks: a name a journal can store, defaults, and typed ``.submit``.

``@manager.task`` registers on a manager directly; a ``TaskRegistry`` collects tasks at
import time without a manager (like FastAPI's ``APIRouter``) and is bound later with
``manager.include(registry)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine, Iterable
from datetime import datetime, timedelta, tzinfo
from typing import TYPE_CHECKING, Any, Generic, Literal, ParamSpec, TypeVar, overload

from ._periodic import Periodic, parse_schedule
from ._validate import check_priority, check_retry, check_text, check_timeout

if TYPE_CHECKING:
    from ._handle import TaskHandle
    from ._manager import BackgroundTaskManager
    from ._retry import RetryPolicy

__all__ = ["RegisteredTask", "TaskOptions", "TaskRegistry", "is_async_callable"]

P = ParamSpec("P")
R = TypeVar("R")


def is_async_callable(fn: object) -> bool:
    code = getattr(fn, "__code__", None)  # the common case, a plain async def: no inspect
    if code is not None and code.co_flags & inspect.CO_COROUTINE:
        return True
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - an object with an async __call__
    )


class RegisteredTask(Generic[P, R]):
    """An ``async def`` function registered under a name; call it to run it inline."""

    __slots__ = ("__wrapped__", "fn", "name", "options_", "registry")

    def __init__(
        self,
        fn: Callable[P, Coroutine[Any, Any, R]],
        name: str,
        registry: TaskRegistry,
        options: dict[str, Any],
    ) -> None:
        self.fn = fn
        self.__wrapped__ = fn
        self.name = name
        self.registry = registry
        self.options_ = options  # timeout, retry, queue, priority defaults

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R]:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<RegisteredTask {self.name!r}>"

    async def submit(self, *args: P.args, **kwargs: P.kwargs) -> TaskHandle[R]:
        """Submit with the task's defaults; use ``.options(...)`` to set submit options."""
        return await self.registry.manager.submit(self, *args, kwargs=kwargs)

    async def submit_many(
        self,
        items: Iterable[dict[str, Any]],
        *,
        queue: str | None = None,
        priority: int | None = None,
        delay: float | timedelta | None = None,
        at: datetime | None = None,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
    ) -> list[TaskHandle[R]]:
        """One task per dict of keyword arguments, all stored in one journal transaction
        or none; handles in the order of ``items`` (``BackgroundTaskManager.submit_many``)."""
        return await self.registry.manager.submit_many(
            self, items, queue=queue, priority=priority, delay=delay, at=at, timeout=timeout,
            retry=retry,
        )  # fmt: skip

    def options(
        self,
        *,
        queue: str | None = None,
        priority: int | None = None,
        delay: float | timedelta | None = None,
        at: datetime | None = None,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        key: str | None = None,
    ) -> TaskOptions[P, R]:
        return TaskOptions(
            self,
            {
                "queue": queue,
                "priority": priority,
                "delay": delay,
                "at": at,
                "timeout": timeout,
                "retry": retry,
                "key": key,
            },
        )


class TaskOptions(Generic[P, R]):
    """A registered task with submit options bound: ``task.options(priority=5).submit(...)``."""

    __slots__ = ("_options", "_task")

    def __init__(self, task: RegisteredTask[P, R], options: dict[str, Any]) -> None:
        self._task = task
        self._options = options

    async def submit(self, *args: P.args, **kwargs: P.kwargs) -> TaskHandle[R]:
        return await self._task.registry.manager.submit(
            self._task, *args, kwargs=kwargs, **self._options
        )

    async def submit_many(self, items: Iterable[dict[str, Any]]) -> list[TaskHandle[R]]:
        """``RegisteredTask.submit_many`` with these options (``key`` names one task, so
        it is refused here)."""
        options = dict(self._options)
        if options.pop("key") is not None:
            raise ValueError("a key names one task: submit_many takes none")
        return await self._task.registry.manager.submit_many(self._task, items, **options)


class TaskRegistry:
    """Tasks by name. Every manager has one; standalone ones are bound with ``include``."""

    def __init__(self) -> None:
        self.tasks: dict[str, RegisteredTask[Any, Any]] = {}
        #: the periodic ones among them, by name
        self.periodics: dict[str, Periodic] = {}
        self._manager: BackgroundTaskManager | None = None

    def bind(self, manager: BackgroundTaskManager) -> None:
        """Make ``.submit`` of this registry's tasks go to ``manager``."""
        self._manager = manager

    @property
    def manager(self) -> BackgroundTaskManager:
        if self._manager is None:
            raise RuntimeError(
                "this task registry is not bound to a manager: call manager.include(registry)"
            )
        return self._manager

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
        """Register an ``async def`` function: ``@registry.task`` or ``@registry.task(...)``."""
        return self.define(
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
        """Register an ``async def`` function without arguments as a periodic task: one
        ordinary task of its ``name`` per tick of a cron ``schedule`` (5 fields, in
        ``timezone``) or of a fixed interval ``every`` (seconds or a timedelta, counted
        from the Unix epoch). ``missed``: what ticks missed while no manager ran give,
        one run for the latest of them (``"latest"``) or none (``"skip"``). While a
        tick's task is unfinished, later ticks are skipped unless ``overlap``. The other
        options are those of ``task``. A bad schedule or zone, both or neither of
        ``schedule`` and ``every``: ValueError here, at decoration."""
        spec = parse_schedule(schedule, every, timezone)
        if missed not in ("latest", "skip"):
            raise ValueError(f"missed must be 'latest' or 'skip', got {missed!r}")
        if not isinstance(overlap, bool):
            raise ValueError(f"overlap must be a bool, got {overlap!r}")
        define = self.define(
            None, name=name, timeout=timeout, retry=retry, queue=queue, priority=priority
        )

        def register(f: Callable[[], Coroutine[Any, Any, R]]) -> RegisteredTask[[], R]:
            if is_async_callable(f):
                try:
                    inspect.signature(f).bind()
                except TypeError:
                    raise TypeError(
                        f"{f!r} takes arguments: a periodic task is called without any"
                    ) from None
                except ValueError:  # no signature to inspect: let it be
                    pass
            registered: RegisteredTask[[], R] = define(f)
            self.periodics[registered.name] = Periodic(registered.name, spec, missed, overlap)
            return registered

        return register

    def define(
        self,
        fn: Callable[..., Coroutine[Any, Any, Any]] | None,
        *,
        name: str | None,
        timeout: float | None,
        retry: RetryPolicy | None,
        queue: str | None,
        priority: int | None,
    ) -> Any:
        """``task``'s untyped body (the manager's ``task`` shares it)."""
        options = {
            "timeout": check_timeout(timeout, "timeout"),
            "retry": check_retry(retry, "retry"),
            "queue": queue,
            "priority": None if priority is None else check_priority(priority),
        }
        if queue is not None:
            try:
                check_text(queue, "queue")
            except TypeError as exc:
                raise ValueError(str(exc)) from None

        def register(f: Callable[..., Coroutine[Any, Any, Any]]) -> RegisteredTask[Any, Any]:
            if not is_async_callable(f):
                raise TypeError(f"{f!r} is not an async def function; only those can be tasks")
            task_name = name if name is not None else getattr(f, "__qualname__", repr(f))
            try:
                check_text(task_name, "task name")
            except TypeError as exc:
                raise ValueError(str(exc)) from None
            if task_name in self.tasks and self.tasks[task_name].fn is not f:
                raise ValueError(f"a task named {task_name!r} is already registered")
            registered = RegisteredTask(f, task_name, self, options)
            self.tasks[task_name] = registered
            return registered

        return register if fn is None else register(fn)
