"""Every async test runs on asyncio and on trio, through anyio's pytest plugin."""

from __future__ import annotations

import logging
from collections.abc import Iterator, MutableMapping
from typing import Any

import pytest
import structlog


@pytest.fixture(params=[pytest.param("asyncio", id="asyncio"), pytest.param("trio", id="trio")])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def debug_events() -> Iterator[list[MutableMapping[str, Any]]]:
    """Every structlog event of the library, the logger ``background_tasks`` at DEBUG."""
    logger = logging.getLogger("background_tasks")
    old = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        with structlog.testing.capture_logs() as logs:
            yield logs
    finally:
        logger.setLevel(old)
