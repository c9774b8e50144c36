"""Public records (frozen pydantic models) and the JSON codec for arguments and results.

Internal state lives in slotted objects (see ``_task``); these models are built only
when someone asks for a record, so the hot path never pays for validation.
"""

from __future__ import annotations

import json
import traceback as tb
from datetime import UTC, datetime
from typing import Any, overload

from pydantic import BaseModel, ConfigDict, Field

from ._errors import SerializationError
from ._states import TaskStatus

__all__ = ["ErrorInfo", "Progress", "TaskRecord", "TransitionRecord", "dumps", "loads"]

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class ErrorInfo(BaseModel):
    """What went wrong in an attempt, in a form a journal can keep."""

    model_config = _FROZEN

    type: str
    message: str
    traceback: str | None = None

    @classmethod
    def from_exception(cls, exc: BaseException) -> ErrorInfo:
        kind = type(exc)
        module = kind.__module__
        if module.startswith("background_tasks._"):  # our errors by their public name
            module = "background_tasks"
        name = kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"
        try:
            message = str(exc)
        except Exception:  # an exception that cannot print itself still fails its task
            message = f"<unprintable {kind.__qualname__}>"
        try:
            text = "".join(tb.format_exception(exc)) if exc.__traceback__ is not None else None
        except Exception:
            text = None
        return cls.model_construct(type=name, message=message, traceback=text)


class Progress(BaseModel):
    """The latest progress a task reported through ``current_task().report_progress``."""

    model_config = _FROZEN

    fraction: float | None = Field(default=None, ge=0.0, le=1.0)
    message: str | None = None
    updated_at: datetime


class TransitionRecord(BaseModel):
    """One line of a journaled task's history."""

    model_config = _FROZEN

    task_id: str
    source: TaskStatus | None  # None for the row that created the task
    target: TaskStatus
    attempt: int
    at: datetime
    owner: str | None = None
    error: ErrorInfo | None = None


class TaskRecord(BaseModel):
    """A snapshot of one task. Times are aware UTC datetimes."""

    model_config = _FROZEN

    id: str
    name: str
    queue: str
    status: TaskStatus
    priority: int
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    key: str | None
    attempts: int
    max_attempts: int
    created_at: datetime
    scheduled_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    result: Any = None
    error: ErrorInfo | None = None
    progress: Progress | None = None
    timeout: float | None = None
    recoveries: int = 0
    owner: str | None = None


@overload
def utc(ts: float) -> datetime: ...
@overload
def utc(ts: None) -> None: ...
@overload
def utc(ts: float | None) -> datetime | None: ...
def utc(ts: float | None) -> datetime | None:
    """An epoch timestamp as an aware UTC datetime (None stays None)."""
    return None if ts is None else datetime.fromtimestamp(ts, UTC)


#: One encoder for every value: ``json.dumps`` with options builds a new one per call.
_encode = json.JSONEncoder(separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode


def dumps(value: Any, what: str, *about: object) -> str:
    """JSON text for ``value``; SerializationError says what could not be stored
    (``what % about``, formatted only then: this runs three times per journaled task)."""
    if value is None:  # most results
        return "null"
    try:
        text: str = _encode(value)
        if not text.isascii():
            text.encode("utf-8")  # a lone surrogate: JSON holds it, UTF-8 storage cannot
    except (TypeError, ValueError, RecursionError) as exc:  # UnicodeEncodeError included
        raise SerializationError(f"{what % about} cannot be stored as JSON: {exc}") from exc
    return text


def loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)
