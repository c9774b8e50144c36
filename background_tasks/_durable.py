"""The manager's side of a journal: rows <-> tasks, recovery on start, and the service
loop (lease heartbeat, reclaiming expired leases, watching changes made by others).

Journal writes for tasks this process holds go through ``BackgroundTaskManager._apply``;
``apply_row`` is the same table check and event for a task known only from its row (a
cancel or requeue of a task held elsewhere, also used by the CLI).
"""

from __future__ import annotations

import functools
import json
import sys
import time
from typing import TYPE_CHECKING, Any

import anyio

from ._errors import BackgroundTasksError, InvalidTransition, TaskNotFound
from ._events import DEBUG, is_enabled, log, transition
from ._models import ErrorInfo, Progress, TaskRecord, dumps, loads, utc
from ._retry import RetryPolicy
from ._states import TaskStatus, check_transition
from ._task import Task
from .journal._protocol import Change, Journal, TaskRow

if TYPE_CHECKING:
    from ._manager import BackgroundTaskManager

__all__ = ["apply_row", "cancel_row", "record", "recover", "requeue_row", "serve"]

PENDING, RUNNING, RETRYING = TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.RETRYING
COMPLETED, FAILED, CANCELLED = TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED
_RETRY_FIELDS = ("max_attempts", "base_delay", "multiplier", "max_delay", "jitter")


@functools.lru_cache(maxsize=256)
def _options_json(timeout: float | None, retry: RetryPolicy | None) -> str:
    """What a restarted process needs to rebuild a task's timeout and retry policy."""
    options = {
        "timeout": timeout,
        "retry": None if retry is None else {f: getattr(retry, f) for f in _RETRY_FIELDS},
    }
    return json.dumps(options)


def new_row(task: Task) -> TaskRow:
    args, kwargs = task.args, task.kwargs
    return TaskRow(
        id=task.id,
        name=task.name,
        queue=task.queue,
        status=PENDING,
        priority=task.priority,
        args_json=dumps(list(args), "the arguments of task %r", task.name) if args else "[]",
        kwargs_json=(
            dumps(kwargs, "the keyword arguments of task %r", task.name) if kwargs else "{}"
        ),
        key=task.key,
        attempts=0,
        max_attempts=task.max_attempts,
        created_at=task.created_at,
        scheduled_at=task.scheduled_at,
        options_json=_options_json(task.timeout, task.retry),
    )


def change(
    manager: BackgroundTaskManager,
    task: Task,
    target: TaskStatus,
    now: float,
    result: Any,
    info: ErrorInfo | None,
    retry_at: float,
) -> Change:
    """The journal row update that goes with ``task.status -> target``."""
    source = task.status
    fields: dict[str, Any]
    attempt = task.attempts
    if target is RUNNING:
        attempt += 1
        fields = {
            "attempts": attempt,
            "started_at": task.started_at or now,
            "owner": manager.owner,
            "lease_until": now + manager.journal.lease_timeout,  # type: ignore[union-attr]
        }
    elif target is PENDING and source is RUNNING:
        fields = {"recoveries": task.recoveries + 1, "owner": None, "lease_until": None}
    elif target is PENDING:
        fields = _requeue_fields(now)
    elif target is RETRYING:
        fields = {
            "error_json": _error_json(info),
            "scheduled_at": retry_at,
            "owner": None,
            "lease_until": None,
        }
    else:
        fields = {"finished_at": now, "lease_until": None}
        if target is COMPLETED:
            fields["result_json"] = dumps(result, "the result of task %s (%s)", task.id, task.name)
        elif target is FAILED:
            fields["error_json"] = _error_json(info)
    return Change(task.id, task.version, source, target, attempt, now, manager.owner, fields)


def _requeue_fields(now: float) -> dict[str, Any]:
    return {
        "attempts": 0,
        "recoveries": 0,
        "error_json": None,
        "result_json": None,
        "started_at": None,
        "finished_at": None,
        "scheduled_at": now,
        "progress_json": None,
        "owner": None,
        "lease_until": None,
    }


def _error_json(info: ErrorInfo | None) -> str | None:
    return None if info is None else info.model_dump_json()


def record(row: TaskRow) -> TaskRecord:
    progress = None
    if row.progress_json is not None:
        p = json.loads(row.progress_json)
        progress = Progress.model_construct(
            fraction=p.get("fraction"),
            message=p.get("message"),
            updated_at=utc(p.get("updated_at")),
        )
    options = loads(row.options_json) or {}
    return TaskRecord.model_construct(
        id=row.id,
        name=row.name,
        queue=row.queue,
        status=TaskStatus(row.status),
        priority=row.priority,
        args=tuple(json.loads(row.args_json)),
        kwargs=json.loads(row.kwargs_json),
        key=row.key,
        attempts=row.attempts,
        max_attempts=row.max_attempts,
        created_at=utc(row.created_at),
        scheduled_at=utc(row.scheduled_at),
        started_at=utc(row.started_at),
        finished_at=utc(row.finished_at),
        result=loads(row.result_json),
        error=None if row.error_json is None else ErrorInfo.model_validate_json(row.error_json),
        progress=progress,
        timeout=options.get("timeout"),
        recoveries=row.recoveries,
        owner=row.owner,
    )


@functools.lru_cache(maxsize=256)
def _restore_options(
    options_json: str | None, base: RetryPolicy | None
) -> tuple[float | None, RetryPolicy | None]:
    """A task's timeout and retry policy from its row; ``retry_on`` (exception classes,
    which JSON cannot hold) comes from the registered task's or the manager's policy.
    Cached: a recovery of 100,000 rows shares a handful of policies."""
    options = loads(options_json) or {}
    retry = None
    if options.get("retry") is not None:
        retry = RetryPolicy(**options["retry"], retry_on=base.retry_on if base else (Exception,))
        if retry == base:
            retry = base
    return options.get("timeout"), retry


def adopt(manager: BackgroundTaskManager, row: TaskRow) -> Task | None:
    """Hold a journaled task in memory so this process can run it; None if its name is
    not registered here (another process may run it)."""
    registered = manager.registry.tasks.get(row.name)
    if registered is None:
        return None
    base = registered.options_["retry"] or manager.default_retry
    timeout, retry = _restore_options(row.options_json, base)
    task = Task(
        row.id,
        registered.name,  # shared strings, not one copy per recovered row
        registered.fn,
        tuple(json.loads(row.args_json)) if row.args_json != "[]" else (),
        json.loads(row.kwargs_json) if row.kwargs_json != "{}" else None,
        sys.intern(row.queue),
        row.priority,
        row.key,
        timeout,
        retry,
        row.created_at,
        row.scheduled_at,
    )
    task.max_attempts = row.max_attempts
    task.status = TaskStatus(row.status)
    task.attempts = row.attempts
    task.recoveries = row.recoveries
    task.version = row.version
    task.started_at, task.finished_at = row.started_at, row.finished_at
    manager._tasks[task.id] = task
    manager._counts[task.status] += 1
    if task.key is not None and not task.status.is_terminal:
        manager._keys.setdefault(task.key, task)
    return task


def _take(manager: BackgroundTaskManager, row: TaskRow) -> None:
    if row.id in manager._tasks or not manager.run_tasks:
        return
    task = adopt(manager, row)
    if task is not None:
        manager._enqueue(task, row.scheduled_at)


async def recover(manager: BackgroundTaskManager, journal: Journal) -> None:
    """On start: expired leases back to PENDING, then every runnable row queued here."""
    await journal.reclaim(time.time(), manager.max_recoveries)
    rows, manager._cursor = await journal.runnable()
    for row in rows:
        _take(manager, row)


async def serve(manager: BackgroundTaskManager, journal: Journal) -> None:
    """Heartbeat (every lease/3), reclaim (every lease/2), and watch others' changes."""
    lease = journal.lease_timeout
    next_renew = next_reclaim = anyio.current_time()
    # A journal that can push changes (PostgreSQL's LISTEN/NOTIFY) wakes this loop early;
    # the others are polled every poll_interval.
    wait_for_changes = getattr(journal, "wait_for_changes", None)
    while True:
        try:
            now = anyio.current_time()
            if now >= next_renew:
                next_renew = now + lease / 3
                await journal.renew(manager.owner, time.time() + lease)
            if now >= next_reclaim:
                next_reclaim = now + lease / 2
                for row in await journal.reclaim(time.time(), manager.max_recoveries):
                    _seen(manager, row)
            rows, manager._cursor = await journal.changes(manager._cursor, manager.owner)
            for row in rows:
                _seen(manager, row)
            if wait_for_changes is None:
                await anyio.sleep(manager.poll_interval)
            else:  # at most 1 s, so a cancel from elsewhere still lands within a second
                now = anyio.current_time()
                await wait_for_changes(max(0.01, min(1.0, next_renew - now, next_reclaim - now)))
        except BackgroundTasksError as exc:
            log.error("journal_error", error=str(exc))
            await anyio.sleep(manager.poll_interval)


def _seen(manager: BackgroundTaskManager, row: TaskRow) -> None:
    """React to a row another manager wrote."""
    task = manager._tasks.get(row.id)
    if task is not None and task.busy:
        return  # our own write for it is in flight; its outcome decides
    if row.status is RUNNING and row.owner == manager.owner:
        if task is not None and row.cancel_requested and not task.cancel_requested:
            task.cancel_requested = True
            if task.scope is not None:
                task.scope.cancel()
        return
    if task is not None and row.version > task.version and task.status is not RUNNING:
        manager._lose(task)  # someone else moved it on
        task = None
    if row.status.is_terminal:
        event = manager._remote_waiters.pop(row.id, None)
        if event is not None:
            event.set()
    elif row.status is not RUNNING and task is None and manager.running:
        _take(manager, row)


def apply_row(
    journal_owner: str, row: TaskRow, target: TaskStatus, fields: dict[str, Any]
) -> Change:
    """The change for a task known only by its row (checked against the table)."""
    check_transition(row.status, target)
    if is_enabled(DEBUG):
        transition(row, row.status, target, None)
    return Change(
        row.id, row.version, row.status, target, row.attempts, time.time(), journal_owner, fields
    )


async def cancel_row(journal: Journal, owner: str, task_id: str) -> bool:
    """Cancel a task through the journal alone: pending ones at once, running ones by
    asking their owner (who sees the request within a poll interval)."""
    for _ in range(20):
        row = await journal.get(task_id)
        if row is None or row.status.is_terminal:
            return False
        if row.status is RUNNING:
            if await journal.request_cancel(task_id) is not None:
                return True
            continue
        now = time.time()
        fields = {"finished_at": now, "owner": None, "lease_until": None}
        if await journal.apply(apply_row(owner, row, CANCELLED, fields)):
            return True
    return False


async def requeue_row(journal: Journal, owner: str, task_id: str) -> TaskRow:
    for _ in range(20):
        row = await journal.get(task_id)
        if row is None:
            raise TaskNotFound(task_id)
        if row.status not in (FAILED, CANCELLED):
            raise InvalidTransition(
                "only failed or cancelled tasks can be requeued; "
                f"task {task_id} is {row.status.value}"
            )
        if await journal.apply(apply_row(owner, row, PENDING, _requeue_fields(time.time()))):
            new = await journal.get(task_id)
            assert new is not None
            return new
    raise InvalidTransition(f"task {task_id} kept changing while being requeued")


async def cancel_elsewhere(manager: BackgroundTaskManager, journal: Journal, task_id: str) -> bool:
    done = await cancel_row(journal, manager.owner, task_id)
    event = manager._remote_waiters.pop(task_id, None)
    if event is not None:
        event.set()
    return done
