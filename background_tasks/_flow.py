"""Flow control's configuration: ``Queue(limit, rate, per_partition, shared)``, how a rate
is spelled, and the one place a rate window reads the time.

The ready queue (``_queue``) enforces a queue's figures in this process; with
``shared=True`` the journal enforces them for every manager on it, in the claim itself
(``journal._protocol.ClaimLimits``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Final

import anyio

__all__ = ["Queue", "monotonic", "parse_rate"]

_PERIODS: Final = {"s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0, "hour": 3600.0}
_RATE: Final = re.compile(r"\s*(\d+)\s*/\s*([a-z]+)\s*")


def monotonic() -> float:
    """The manager's monotonic time: what rate windows are measured on (the same clock
    as the dispatch timer's delays). The one place to change for an injected clock."""
    return anyio.current_time()


def parse_rate(rate: object) -> tuple[int, float]:
    """``"N/s"``, ``"N/min"``, ``"N/h"`` or ``(N, seconds)`` as ``(N, seconds)``;
    ValueError for anything else."""
    if isinstance(rate, str):
        found = _RATE.fullmatch(rate.lower())
        if found is None or found.group(2) not in _PERIODS:
            raise ValueError(f"rate must be 'N/s', 'N/min', 'N/h' or (N, seconds), not {rate!r}")
        n, period = int(found.group(1)), _PERIODS[found.group(2)]
    elif isinstance(rate, tuple) and len(rate) == 2:
        n, period = rate
        if isinstance(period, bool) or not isinstance(period, int | float):
            raise ValueError(f"the period of rate {rate!r} must be a number of seconds")
        period = float(period)
    else:
        raise ValueError(f"rate must be 'N/s', 'N/min', 'N/h' or (N, seconds), not {rate!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the count of rate {rate!r} must be an int >= 1")
    if not (0 < period < math.inf):
        raise ValueError(f"the period of rate {rate!r} must be a positive finite number")
    return n, period


def _check_count(name: str, value: object) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"Queue({name}=...) must be an int >= 1 or None, got {value!r}")


@dataclass(frozen=True, slots=True)
class Queue:
    """A named queue's flow control (``BackgroundTaskManager(queues={"name": Queue(...)})``).

    ``limit``: attempts of this queue running at once. ``rate``: attempt starts per
    period, ``"N/s"``, ``"N/min"``, ``"N/h"`` or ``(N, seconds)``, as a sliding window
    (never more than N starts in any window of that length). ``per_partition``:
    attempts running at once within one ``partition`` (``submit(..., partition=)``);
    partitions never block one another. ``shared=True`` (journal required) makes all
    three hold across every manager on the journal instead of per manager. A plain int
    in ``queues=`` is ``Queue(limit=int)``. Bad values raise ``ValueError``.
    """

    limit: int | None = None
    rate: str | tuple[int, float] | None = None
    per_partition: int | None = None
    shared: bool = False

    def __post_init__(self) -> None:
        _check_count("limit", self.limit)
        _check_count("per_partition", self.per_partition)
        if self.rate is not None:
            parse_rate(self.rate)
        if not isinstance(self.shared, bool):
            raise ValueError(f"Queue(shared=...) must be a bool, got {self.shared!r}")

    @property
    def rate_limit(self) -> tuple[int, float] | None:
        """``rate`` as ``(N, seconds)``, or None."""
        return None if self.rate is None else parse_rate(self.rate)

    @property
    def limited(self) -> bool:
        """Whether the queue bounds anything (a limit, a rate or partitions)."""
        return self.limit is not None or self.rate is not None or self.per_partition is not None
