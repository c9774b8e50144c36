"""Structlog events, bound to the standard library logger ``background_tasks``.

The library never configures structlog or logging: events flow through whatever the
application set up, and cost one level check when nobody listens.
"""

from __future__ import annotations

import logging
from typing import Any

import structlog

__all__ = ["debug_enabled", "log", "warning_enabled"]

_stdlib = logging.getLogger("background_tasks")
_stdlib.addHandler(logging.NullHandler())  # a library stays silent unless the app routes it

log: Any = structlog.wrap_logger(_stdlib, wrapper_class=structlog.stdlib.BoundLogger)


def debug_enabled() -> bool:
    return _is_enabled(logging.DEBUG)


def warning_enabled() -> bool:
    return _is_enabled(logging.WARNING)


_is_enabled = _stdlib.isEnabledFor  # logging caches the answer; skip one attribute lookup
