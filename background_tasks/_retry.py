"""RetryPolicy: a pure, frozen description of when and how long to wait before retrying."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

__all__ = ["MAX_SECONDS", "RetryPolicy"]

#: The longest delay or backoff accepted, in seconds (about 3,000 years): any wait from
#: now must end before a ``datetime`` does (year 9999), so every record stays readable.
MAX_SECONDS = 1e11
#: Attempts are counted in a journal's 64-bit integer column.
_MAX_ATTEMPTS = 2**63 - 1


def _number(name: str, value: object, *, minimum: float, allow_equal: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"RetryPolicy {name} must be a number, got {value!r}")
    ok = value >= minimum if allow_equal else value > minimum
    if not ok or math.isnan(value) or math.isinf(value) or value > MAX_SECONDS:
        op = ">=" if allow_equal else ">"
        raise ValueError(
            f"RetryPolicy {name} must be a finite number {op} {minimum} and at most"
            f" {MAX_SECONDS:g} seconds, got {value!r}"
        )
    return float(value)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How many attempts a task gets and how long it waits between them.

    The delay before retry ``n`` (n = 1 after the first failure) is
    ``min(base_delay * multiplier ** (n - 1), max_delay)``; with ``jitter`` the actual
    wait is drawn uniformly from ``[0, delay]`` ("full jitter"), which spreads retries of
    many tasks that failed together.
    """

    max_attempts: int = 3
    base_delay: float = 1.0
    multiplier: float = 2.0
    max_delay: float = 300.0
    jitter: bool = True
    retry_on: tuple[type[BaseException], ...] = field(default=(Exception,))

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
            raise ValueError(f"RetryPolicy max_attempts must be an int, got {self.max_attempts!r}")
        if not 1 <= self.max_attempts <= _MAX_ATTEMPTS:
            raise ValueError(
                f"RetryPolicy max_attempts must be >= 1 and a 64-bit integer,"
                f" got {self.max_attempts}"
            )
        object.__setattr__(self, "base_delay", _number("base_delay", self.base_delay, minimum=0))
        object.__setattr__(self, "multiplier", _number("multiplier", self.multiplier, minimum=1))
        object.__setattr__(self, "max_delay", _number("max_delay", self.max_delay, minimum=0))
        if not isinstance(self.jitter, bool):
            raise ValueError(f"RetryPolicy jitter must be a bool, got {self.jitter!r}")
        retry_on = self.retry_on
        if isinstance(retry_on, type):
            retry_on = (retry_on,)
        if not isinstance(retry_on, tuple | list) or not all(
            isinstance(t, type) and issubclass(t, BaseException) for t in retry_on
        ):
            raise ValueError(
                f"RetryPolicy retry_on must be a tuple of exception classes, got {self.retry_on!r}"
            )
        object.__setattr__(self, "retry_on", tuple(retry_on))

    def delay(self, n: int) -> float:
        """The un-jittered delay before retry ``n`` (1-based), capped at ``max_delay``."""
        if n < 1:
            raise ValueError(f"retry number must be >= 1, got {n}")
        try:
            raw = self.base_delay * self.multiplier ** (n - 1)
        except OverflowError:
            return self.max_delay
        return min(raw, self.max_delay)

    def decide(self, exc: BaseException, attempt: int) -> float | None:
        """Seconds to wait before the next attempt, or None when the task has failed for good.

        ``attempt`` is the number of the attempt that just failed (1 for the first).
        """
        if attempt >= self.max_attempts or not isinstance(exc, self.retry_on):
            return None
        delay = self.delay(attempt)
        return random.uniform(0.0, delay) if self.jitter else delay
