"""The codec between the manager's tasks and a journal's rows: a new row, the row
update that goes with a transition (a ``Change``), a record from a row, and a task
rebuilt from a row in a restarted process.

It decides nothing: the state writer (``_writer``) chooses each transition and calls
these to spell it for the journal.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import sys
from typing import TYPE_CHECKING, Any

from .._codec import codec_of
from .._errors import SerializationError
from .._events import log
from .._models import ErrorInfo, Progress, TaskRecord, dumps, loads, utc
from .._retry import RetryPolicy
from .._states import TaskStatus
from .._task import Task
from ._protocol import Change, TaskRow

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

__all__ = [
    "change",
    "claimed_row",
    "new_row",
    "record",
    "requeue_fields",
    "reschedule_change",
    "takeover_change",
    "task_from_row",
]

PENDING, RUNNING, RETRYING = TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.RETRYING
COMPLETED, FAILED, CANCELLED = TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED


def _class_path(cls: type, what: str) -> str:
    """``module:qualname`` of a class that a restarted process can import again."""
    path = f"{cls.__module__}:{cls.__qualname__}"
    if _resolve(path) is not cls:
        raise SerializationError(
            f"{what} {cls.__qualname__} cannot be stored: a restarted process finds it by"
            f" its import path, and {path!r} does not lead back to it (define it at the top"
            " level of a module)"
        )
    return path


def _resolve(path: str) -> Any:
    """The object at ``module:qualname``, or None."""
    module, _, qualname = path.partition(":")
    try:
        found: Any = importlib.import_module(module)
        for part in qualname.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError, ValueError):
        return None
    return found


@functools.lru_cache(maxsize=256)
def _options_json(timeout: float | None, retry: RetryPolicy | None) -> str:
    """What a restarted process needs to rebuild a task's timeout and retry policy, all
    of it: every field, the classes of ``retry_on`` and a subclass by import path.
    SerializationError (at submit) for a policy that cannot be rebuilt that way."""
    spec: dict[str, Any] | None = None
    if retry is not None:
        spec = {f.name: getattr(retry, f.name) for f in dataclasses.fields(retry)}
        spec["retry_on"] = [_class_path(t, "the exception class") for t in retry.retry_on]
        if type(retry) is not RetryPolicy:
            spec["class"] = _class_path(type(retry), "the retry policy class")
    return dumps({"timeout": timeout, "retry": spec}, "the retry policy %r", retry)


def new_row(task: Task) -> TaskRow:
    """The PENDING row of a task being submitted (its arguments encoded as the task
    annotates them, where it does: ``_codec``)."""
    args: Any = task.args
    kwargs: Any = task.kwargs
    codec = codec_of(task.fn, task.name)
    if codec is not None:
        args, kwargs = codec.encode_args(args, kwargs)
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
        lock=task.lock,
        partition=task.partition,
    )


def claimed_row(row: TaskRow, owner: str, lease_until: float) -> TaskRow:
    """``row`` as stored claimed by ``owner`` in the write that accepts it (the
    PENDING -> RUNNING transition folded into the insert)."""
    row.status, row.version, row.attempts = RUNNING, 1, 1
    row.owner, row.started_at, row.lease_until = owner, row.created_at, lease_until
    return row


def change(
    task: Task,
    target: TaskStatus,
    now: float,
    result: Any,
    info: ErrorInfo | None,
    retry_at: float,
    owner: str,
    lease_until: float,
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
            "owner": owner,
            "lease_until": lease_until,
        }
    elif target is PENDING and source is RUNNING:  # interrupted: runs again
        fields = {"recoveries": task.recoveries + 1, "owner": None, "lease_until": None}
    elif target is PENDING:  # requeue
        fields = requeue_fields(now)
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
            codec = codec_of(task.fn, task.name) if result is not None else None
            if codec is not None:
                result = codec.encode_result(result)
            fields["result_json"] = dumps(result, "the result of task %s (%s)", task.id, task.name)
        elif target is FAILED:
            fields["error_json"] = _error_json(info)
    return Change(task.id, task.version, source, target, attempt, now, owner, fields)


def takeover_change(
    row: TaskRow,
    target: TaskStatus,
    now: float,
    owner: str,
    info: ErrorInfo | None,
    lease_before: float | None,
) -> Change:
    """The update that takes a dead or expired owner's RUNNING row to ``target``."""
    fields: dict[str, Any] = {"recoveries": row.recoveries + 1, "owner": None, "lease_until": None}
    if target is not PENDING:
        fields["finished_at"] = now
    if info is not None:
        fields["error_json"] = info.model_dump_json()
    return Change(
        row.id, row.version, RUNNING, target, row.attempts, now, owner, fields, lease_before
    )


def reschedule_change(
    task_id: str,
    version: int,
    status: TaskStatus,
    attempts: int,
    scheduled_at: float,
    now: float,
    owner: str,
) -> Change:
    """The update that moves a waiting task's not-before time and keeps its status (a
    change of the row without a transition: ``source`` is ``target``)."""
    return Change(
        task_id, version, status, status, attempts, now, owner, {"scheduled_at": scheduled_at}
    )


def requeue_fields(now: float) -> dict[str, Any]:
    """A requeued task's fresh start: its attempts, outcome and times cleared."""
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
    """A row as the public record."""
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
    """A task's timeout and retry policy from its row, as they were submitted. Rows
    written before ``retry_on`` was stored take it from ``base`` (the registered task's
    or the manager's policy). Cached: a recovery of 100,000 rows shares a handful."""
    options = loads(options_json) or {}
    spec = options.get("retry")
    retry = None
    if spec is not None:
        spec = dict(spec)
        paths = spec.pop("retry_on", None)
        cls: Any = RetryPolicy
        path = spec.pop("class", None)
        if path is not None:
            cls = _resolve(path)
            if not (isinstance(cls, type) and issubclass(cls, RetryPolicy)):
                log.warning("retry_policy_not_restored", what=path, using="RetryPolicy")
                cls = RetryPolicy
        if paths is None:
            retry_on = base.retry_on if base else (Exception,)
        else:
            found = [_resolve(p) for p in paths]
            retry_on = tuple(t for t in found if isinstance(t, type))
            if len(retry_on) < len(found):
                missing = [p for p, t in zip(paths, found, strict=True) if t not in retry_on]
                log.warning("retry_policy_not_restored", what=missing, using=retry_on)
        retry = cls(**spec, retry_on=retry_on)
        if retry == base:
            retry = base
    return options.get("timeout"), retry


def task_from_row(
    row: TaskRow,
    name: str,
    fn: Callable[..., Coroutine[Any, Any, Any]],
    base_retry: RetryPolicy | None,
) -> Task:
    """The in-memory task of a journaled row, for a process that runs it (a restart, or
    a manager picking up another's work); ``name`` is the registered, shared string."""
    timeout, retry = _restore_options(row.options_json, base_retry)
    args: tuple[Any, ...] = tuple(json.loads(row.args_json)) if row.args_json != "[]" else ()
    kwargs: dict[str, Any] | None = json.loads(row.kwargs_json) if row.kwargs_json != "{}" else None
    codec = codec_of(fn, name)
    if codec is not None:
        args, kwargs = codec.decode_args(list(args), kwargs or {})
    task = Task(
        row.id,
        name,
        fn,
        args,
        kwargs,
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
    if row.lock is not None:
        task.lock = row.lock
    if row.partition is not None:
        task.partition = row.partition
    return task
