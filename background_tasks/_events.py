"""Structlog events, bound to the standard library logger ``background_tasks``.

The library never configures structlog or logging: events flow through whatever the
application set up, and cost one level check when nobody listens.
"""

from __future__ import annotations

import logging
from typing import Any

import structlog

__all__ = ["DEBUG", "WARNING", "is_enabled", "log"]

_stdlib = logging.getLogger("background_tasks")
_stdlib.addHandler(logging.NullHandler())  # a library stays silent unless the app routes it

log: Any = structlog.wrap_logger(_stdlib, wrapper_class=structlog.stdlib.BoundLogger)


DEBUG, WARNING = logging.DEBUG, logging.WARNING
#: ``is_enabled(DEBUG)``: logging caches the answer, so a silent event costs one call.
is_enabled = _stdlib.isEnabledFor
