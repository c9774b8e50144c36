"""Every async test runs on asyncio and on trio, through anyio's pytest plugin (the
few written with pytest-asyncio, as an application's would be, say so)."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator, MutableMapping
from typing import Any

import pytest
import structlog


def pytest_addoption(parser: pytest.Parser) -> None:
    """pyproject sets pytest-asyncio's options (for when it is installed, as the test
    extra does); without it they are declared here, so that --strict-config does not
    refuse them as unknown in an environment that lacks it."""
    if importlib.util.find_spec("pytest_asyncio") is None:
        parser.addini("asyncio_mode", "pytest-asyncio's mode (not installed: unused)")
        parser.addini("asyncio_default_fixture_loop_scope", "(pytest-asyncio not installed)")


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
