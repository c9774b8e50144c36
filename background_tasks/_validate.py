"""Argument checks shared by the manager, registered tasks and submit, so every bad value
gets the same clear error at the earliest point."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

from ._errors import SerializationError
from ._retry import MAX_SECONDS, RetryPolicy

__all__ = [
    "check_at",
    "check_delay",
    "check_priority",
    "check_retry",
    "check_task_id",
    "check_text",
    "check_timeout",
]


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_timeout(value: Any, what: str) -> float | None:
    """None, or seconds > 0 (math.inf means no timeout)."""
    if value is None:
        return None
    if not _is_number(value):
        raise TypeError(f"{what} must be a number of seconds > 0 (or None), got {value!r}")
    if math.isnan(value) or value <= 0:
        raise ValueError(f"{what} must be a number of seconds > 0 (or None), got {value!r}")
    return float(value)


def check_retry(value: Any, what: str) -> RetryPolicy | None:
    if value is not None and not isinstance(value, RetryPolicy):
        raise TypeError(f"{what} must be a RetryPolicy or None, got {value!r}")
    return value


#: Priorities are 64-bit signed integers: what a journal column holds.
_PRIORITY_RANGE = range(-(2**63), 2**63)


def check_priority(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"priority must be an int, got {value!r}")
    if value not in _PRIORITY_RANGE:
        raise ValueError(f"priority must be a 64-bit signed integer, got {value!r}")
    return value


def check_delay(value: Any) -> float:
    if value is None:
        return 0.0
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif _is_number(value):
        seconds = float(value)
    else:
        raise TypeError(f"delay must be seconds or a timedelta, got {value!r}")
    if seconds < 0 or math.isinf(seconds) or math.isnan(seconds):
        raise ValueError(f"delay must be finite and >= 0, got {value!r}")
    if seconds > MAX_SECONDS:
        raise ValueError(
            f"delay must be at most {MAX_SECONDS:g} seconds (a datetime ends in year 9999),"
            f" got {value!r}"
        )
    return seconds


def check_at(value: Any) -> float:
    """An aware datetime as epoch seconds: a naive one, or one whose UTC time a
    ``datetime`` cannot hold (past year 9999, before year 1), is a ValueError."""
    if not isinstance(value, datetime):
        raise TypeError(f"at must be an aware datetime, got {value!r}")
    if value.utcoffset() is None:
        raise ValueError(
            f"at must be an aware datetime (with a tzinfo, e.g. datetime(..., tzinfo=UTC)),"
            f" got the naive {value!r}"
        )
    try:
        seconds = value.timestamp()
        datetime.fromtimestamp(seconds, UTC)  # what a record of it will read back
    except (OverflowError, ValueError, OSError):
        raise ValueError(
            f"at must be a time a datetime can hold in UTC (years 1 to 9999), got {value!r}"
        ) from None
    return seconds


def check_text(value: Any, what: str, *, empty: bool = False) -> str:
    """A name a journal stores and indexes (a queue, a key, a task name): a non-empty str
    without NUL (PostgreSQL cannot hold one) that UTF-8 can encode (no lone surrogate)."""
    if not isinstance(value, str):
        kind = "a str" if empty else "a non-empty str"
        raise TypeError(f"{what} must be {kind}, got {value!r}")
    if not value and not empty:
        raise ValueError(f"{what} must be a non-empty str")
    if "\x00" in value:
        raise ValueError(f"{what} must not contain NUL characters, got {value!r}")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise SerializationError(f"{what} {value!r} cannot be stored: {exc}") from None
    return value


def check_task_id(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"a task id is a str, got {value!r}")
    return value
