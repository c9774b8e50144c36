"""FastAPI integration: a status router, a manager dependency and lifespan glue.

The pattern this module makes short is "accept the request, answer 202 with a status
URL, let the client poll or wait":

```python
from fastapi import FastAPI
from background_tasks import BackgroundTaskManager
from background_tasks.fastapi import tasks_router

manager = BackgroundTaskManager()
app = FastAPI(lifespan=manager.lifespan)
app.include_router(tasks_router(manager), prefix="/tasks")
```

The router serves (paths relative to its prefix):

- ``GET ""``: records, newest first; filters ``status`` (any case), ``queue``, ``name``;
  ``limit`` from 1 to ``max_limit``.
- ``GET /{id}``: one record; ``?wait=S`` waits up to S seconds (at most ``max_wait``) for
  the task to finish, then answers with the record as it is; a client that goes away
  never cancels the task.
- ``POST /{id}/cancel``: 202 and the record when the task was cancelled (a running task
  is being cancelled and is CANCELLED shortly after); 409 when it had already finished.
- ``POST /{id}/requeue``: 200 and the record of a FAILED or CANCELLED task sent back to
  PENDING; 409 for any other status.

Every route answers 404 for an unknown id and 503 while the manager is not running
(its lifespan never ran, or it has shut down). Authentication is the application's:
pass ``dependencies=[Depends(...)]`` and they guard every route.

This module needs the ``fastapi`` extra: ``pip install "anyio-background-tasks[fastapi]"``.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations
# at run time, and those built inside tasks_router refer to its arguments (max_limit, ...).
import json
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager, suppress
from datetime import datetime
from typing import Annotated, Any, Final, TypeVar

import anyio
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import to_jsonable_python

from ._errors import BackgroundTasksError, InvalidTransition, TaskNotFound
from ._extras import missing_extra
from ._manager import BackgroundTaskManager
from ._models import ErrorInfo, Progress, TaskRecord
from ._states import TaskStatus

try:
    from fastapi import APIRouter, Depends, HTTPException, Query, Request
    from fastapi import params as fastapi_params
except ImportError as exc:  # pragma: no cover - tested in a subprocess without fastapi
    raise missing_extra("background_tasks.fastapi", "fastapi", exc) from exc

__all__ = [
    "MANAGER_STATE_KEY",
    "ErrorResponse",
    "RedactedTaskRecordOut",
    "TaskRecordOut",
    "combine_lifespans",
    "get_manager",
    "manager_dependency",
    "tasks_router",
]

AppT = TypeVar("AppT")

#: The name ``get_manager`` looks up: a key of the lifespan state (``request.state``),
#: then an attribute of ``app.state`` (where ``manager.lifespan`` attaches its manager).
MANAGER_STATE_KEY: Final = "background_tasks_manager"

_NOT_RUNNING: Final = (
    "the background task manager is not running: create the app with "
    "FastAPI(lifespan=manager.lifespan) (or combine_lifespans(..., manager.lifespan)) "
    "and serve it with a server that runs the lifespan"
)


# --- response models -------------------------------------------------------------------


class RedactedTaskRecordOut(BaseModel):
    """A task as the router serves it with ``include_args=False``: no args or kwargs."""

    model_config = ConfigDict(frozen=True)

    id: str
    name: str
    queue: str
    status: TaskStatus
    priority: int
    key: str | None
    attempts: int = Field(description="attempts started so far")
    max_attempts: int
    created_at: datetime
    scheduled_at: datetime = Field(description="not started before this time")
    started_at: datetime | None = Field(default=None, description="the first attempt")
    finished_at: datetime | None = None
    result: Any = Field(
        default=None,
        description="the return value as JSON (the repr() of a value JSON cannot hold)",
    )
    error: ErrorInfo | None = None
    progress: Progress | None = None
    timeout: float | None = Field(default=None, description="seconds per attempt")
    recoveries: int = Field(default=0, description="attempts cut short by shutdown or a crash")
    owner: str | None = Field(default=None, description="the manager running it, if any")


class TaskRecordOut(RedactedTaskRecordOut):
    """A task as the router serves it: the fields of ``TaskRecord``, as JSON."""

    args: list[Any] = Field(description="positional arguments (repr() where JSON cannot)")
    kwargs: dict[str, Any] = Field(description="keyword arguments (repr() where JSON cannot)")


class QueueStatisticsOut(BaseModel):
    """One queue in this manager (``Statistics.queues``)."""

    running: int = Field(description="attempts of this queue running in this manager")
    ready: int = Field(description="tasks that may start now")
    waiting_on_limit: int = Field(description="held back by the queue's limit, rate or partition")
    waiting_on_lock: int = Field(description="waiting for another task to release their lock")


class StatisticsOut(BaseModel):
    """``manager.statistics()``: counts by status of the tasks this manager handled,
    what waits to run here, and per queue."""

    pending: int
    running: int
    retrying: int
    completed: int
    failed: int
    cancelled: int
    queued: int = Field(description="waiting to run here (ready, delayed or on a lock)")
    queues: dict[str, QueueStatisticsOut]


class ErrorResponse(BaseModel):
    """The body of a 404, 409 or 503 answer."""

    detail: str


def _jsonable(value: Any) -> Any:
    # A manager without a journal accepts any Python value as an argument or a result;
    # the router must still answer with JSON, so what JSON cannot hold is shown as repr()
    # (bytes that are not UTF-8, a lone surrogate: the whole value, then, as its repr).
    try:
        found = to_jsonable_python(value, fallback=repr)
        json.dumps(found, ensure_ascii=False).encode("utf-8")
    except (ValueError, TypeError):  # UnicodeDecodeError and UnicodeEncodeError included
        return repr(value)
    return found


def _to_out(record: TaskRecord, model: type[RedactedTaskRecordOut]) -> RedactedTaskRecordOut:
    data = {name: getattr(record, name, None) for name in model.model_fields}
    data["result"] = _jsonable(record.result)
    if "args" in data:
        data["args"] = [_jsonable(a) for a in record.args]
        data["kwargs"] = {str(_jsonable(k)): _jsonable(v) for k, v in record.kwargs.items()}
    return model.model_validate(data)


# --- the manager as a dependency -------------------------------------------------------


def _running(manager: BackgroundTaskManager | None) -> BackgroundTaskManager:
    if manager is None or not manager.running:
        raise HTTPException(status_code=503, detail=_NOT_RUNNING)
    return manager


def get_manager(request: Request) -> BackgroundTaskManager:
    """The app's running manager, for ``Depends(get_manager)`` in your endpoints.

    ``manager.lifespan`` attaches the manager to the app it starts
    (``app.state.background_tasks_manager``); a lifespan of your own that starts a
    manager can instead yield it as lifespan state: ``yield {MANAGER_STATE_KEY: manager}``.
    When no lifespan ran (or the manager has already shut down), the request fails with
    503 and a message saying what to fix, instead of an error deep in an endpoint.
    """
    manager = getattr(request.state, MANAGER_STATE_KEY, None)
    if manager is None:
        manager = getattr(request.app.state, MANAGER_STATE_KEY, None)
    return _running(manager)


def manager_dependency(
    manager: BackgroundTaskManager,
) -> Callable[[], BackgroundTaskManager]:
    """A dependency that hands out this ``manager`` (503 while it is not running).

    For apps that hold the manager in a module rather than find it through the request:
    ``Depends(manager_dependency(manager))``. Tests can replace it with
    ``app.dependency_overrides``.
    """

    def dependency() -> BackgroundTaskManager:
        return _running(manager)

    return dependency


# --- lifespans -------------------------------------------------------------------------


def combine_lifespans(
    *lifespans: Callable[[AppT], AbstractAsyncContextManager[Mapping[str, Any] | None]],
) -> Callable[[AppT], AbstractAsyncContextManager[Any]]:
    """One lifespan that runs several: entered in order, exited in reverse order.

    ``FastAPI(lifespan=combine_lifespans(app_lifespan, manager.lifespan))``. Put the
    lifespans that open what your tasks use (a database pool, an HTTP client) *before*
    ``manager.lifespan``: then the manager starts after them and, at shutdown, lets its
    running tasks finish before they are closed. If one fails to start, those already
    started are exited. State yielded by the lifespans (mappings) is merged, later ones
    winning, and becomes the lifespan state (``request.state``).
    """
    if not lifespans:
        raise ValueError("combine_lifespans needs at least one lifespan")
    for lifespan in lifespans:
        if not callable(lifespan):
            raise TypeError(f"a lifespan must be callable, not {lifespan!r}")

    @asynccontextmanager
    async def combined(app: AppT) -> AsyncIterator[dict[str, Any] | None]:
        state: dict[str, Any] = {}
        stateful = False
        async with AsyncExitStack() as stack:
            for lifespan in lifespans:
                value = await stack.enter_async_context(lifespan(app))
                if value is not None:
                    state.update(value)
                    stateful = True
            yield state if stateful else None

    return combined


# --- the router ------------------------------------------------------------------------


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


#: A status query parameter matched case-insensitively ("FAILED" = "failed").
_StatusQuery = Annotated[TaskStatus | None, BeforeValidator(_lower)]

_NOT_FOUND: Final[dict[int | str, dict[str, Any]]] = {
    404: {"model": ErrorResponse, "description": "No task is known by that id"},
}
_CONFLICT: Final[dict[int | str, dict[str, Any]]] = {
    409: {"model": ErrorResponse, "description": "The task is not in a status that allows it"},
}
_UNAVAILABLE: Final[dict[int | str, dict[str, Any]]] = {
    503: {"model": ErrorResponse, "description": "The manager is not running"},
}


def _not_found(task_id: str) -> HTTPException:
    return HTTPException(status_code=404, detail=f"no task with id {task_id!r}")


async def _wait_until_finished(
    manager: BackgroundTaskManager, task_id: str, seconds: float, request: Request
) -> None:
    """Wait up to ``seconds`` for the task to finish, or until the client goes away.

    Only this request's wait is cancelled, never the task: awaiting a handle is an
    observer, and the handle is not shared with anything else.
    """
    handle = manager.handle(task_id)
    async with anyio.create_task_group() as tg:

        async def until_disconnected() -> None:
            # ASGI sends "http.disconnect" once the client has gone (or the response is
            # complete); any body message before it is of no use to a GET.
            while (await request.receive())["type"] != "http.disconnect":
                pass
            tg.cancel_scope.cancel()

        tg.start_soon(until_disconnected)
        with anyio.move_on_after(seconds):
            # Failed, cancelled or purged: the record the endpoint reads next says so.
            with suppress(BackgroundTasksError):
                await handle
        tg.cancel_scope.cancel()


def tasks_router(
    manager: BackgroundTaskManager,
    *,
    dependencies: Sequence[fastapi_params.Depends] | None = None,
    include_args: bool = True,
    max_limit: int = 1000,
    max_wait: float = 60.0,
) -> APIRouter:
    """An ``APIRouter`` that lists, shows, waits for, cancels and requeues tasks.

    ``dependencies`` run before every route (authentication: a dependency that raises
    401/403 guards the whole router). ``include_args=False`` leaves ``args`` and
    ``kwargs`` out of every response and of the OpenAPI schema, since arguments may hold
    secrets. ``max_limit`` bounds ``?limit=`` (past it: 422), ``max_wait`` bounds
    ``?wait=`` in seconds (past it: 422). Route names, for ``request.url_for``:
    ``list_tasks``, ``task_statistics`` (``GET /stats``: ``manager.statistics()``, per
    queue too), ``get_task``, ``cancel_task``, ``requeue_task``.
    """
    if isinstance(max_limit, bool) or not isinstance(max_limit, int) or max_limit < 1:
        raise ValueError(f"max_limit must be an int >= 1, not {max_limit!r}")
    if not 0 <= max_wait < float("inf"):
        raise ValueError(f"max_wait must be a finite number of seconds >= 0, not {max_wait!r}")

    model: type[RedactedTaskRecordOut] = TaskRecordOut if include_args else RedactedTaskRecordOut

    def require_running() -> None:
        _running(manager)

    router = APIRouter(
        # The app's own dependencies (authentication) first: a client that may not see
        # the tasks learns nothing, not even whether the manager runs.
        dependencies=[*(dependencies or ()), Depends(require_running)],
        responses=_UNAVAILABLE,
    )

    async def record_or_404(task_id: str) -> TaskRecord:
        record = await manager.get(task_id)
        if record is None:
            raise _not_found(task_id)
        return record

    @router.get(
        "",
        name="list_tasks",
        summary="List tasks, newest first",
        response_model=list[model],  # type: ignore[valid-type]
    )
    async def list_tasks(
        status: Annotated[
            _StatusQuery,
            Query(description="only tasks in this status (matched in any case)"),
        ] = None,
        queue: Annotated[str | None, Query(description="only tasks in this queue")] = None,
        name: Annotated[str | None, Query(description="only tasks with this name")] = None,
        limit: Annotated[
            int, Query(ge=1, le=max_limit, description="at most this many records")
        ] = min(100, max_limit),
    ) -> list[RedactedTaskRecordOut]:
        records = await manager.list(status=status, queue=queue, name=name, limit=limit)
        return [_to_out(record, model) for record in records]

    @router.get(
        "/stats",
        name="task_statistics",
        summary="Counts by status, and per queue: running, ready, waiting on a limit or a lock",
        response_model=StatisticsOut,
    )
    async def task_statistics() -> StatisticsOut:
        stats = manager.statistics()
        return StatisticsOut(
            pending=stats.pending,
            running=stats.running,
            retrying=stats.retrying,
            completed=stats.completed,
            failed=stats.failed,
            cancelled=stats.cancelled,
            queued=stats.queued,
            queues={
                name: QueueStatisticsOut(
                    running=q.running,
                    ready=q.ready,
                    waiting_on_limit=q.waiting_on_limit,
                    waiting_on_lock=q.waiting_on_lock,
                )
                for name, q in stats.queues.items()
            },
        )

    @router.get(
        "/{task_id}",
        name="get_task",
        summary="One task; optionally wait for it to finish",
        response_model=model,
        responses=_NOT_FOUND,
    )
    async def get_task(
        task_id: str,
        request: Request,
        wait: Annotated[
            float | None,
            Query(
                ge=0,
                le=max_wait,
                description=(
                    "seconds to wait for the task to finish before answering; the answer "
                    "is the record as it is then, finished or not"
                ),
            ),
        ] = None,
    ) -> RedactedTaskRecordOut:
        record = await record_or_404(task_id)
        if wait and not record.status.is_terminal:
            await _wait_until_finished(manager, task_id, wait, request)
            record = await record_or_404(task_id)
        return _to_out(record, model)

    @router.post(
        "/{task_id}/cancel",
        name="cancel_task",
        summary="Cancel a pending, retrying or running task",
        status_code=202,
        response_model=model,
        responses={**_NOT_FOUND, **_CONFLICT},
    )
    async def cancel_task(task_id: str) -> RedactedTaskRecordOut:
        await record_or_404(task_id)
        cancelled = await manager.cancel(task_id)
        record = await record_or_404(task_id)
        if not cancelled:
            raise HTTPException(
                status_code=409,
                detail=f"task {task_id!r} has already finished ({record.status.value})",
            )
        return _to_out(record, model)

    @router.post(
        "/{task_id}/requeue",
        name="requeue_task",
        summary="Send a failed or cancelled task back to pending",
        response_model=model,
        responses={**_NOT_FOUND, **_CONFLICT},
    )
    async def requeue_task(task_id: str) -> RedactedTaskRecordOut:
        try:
            record = await manager.requeue(task_id)
        except TaskNotFound:
            raise _not_found(task_id) from None
        except InvalidTransition as exc:
            raise HTTPException(status_code=409, detail=str(exc)) from None
        return _to_out(record, model)

    return router
