"""Every async test runs on asyncio and on trio, through anyio's pytest plugin (the
few written with pytest-asyncio, as an application's would be, say so)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog

from background_tasks import BackgroundTaskManager, SQLiteJournal


def pytest_addoption(parser: pytest.Parser, pluginmanager: pytest.PytestPluginManager) -> None:
    """pytest-asyncio's settings in pyproject.toml are unknown keys without it (not
    installed, or ``-p no:asyncio``), which --strict-config refuses: declare them then,
    so the suite runs either way."""
    if not pluginmanager.has_plugin("asyncio"):
        parser.addini("asyncio_mode", "pytest-asyncio's (not installed)")
        parser.addini("asyncio_default_fixture_loop_scope", "pytest-asyncio's (not installed)")


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """The tests written with pytest-asyncio need it (installed, and not ``-p no:asyncio``)."""
    if collection_path.name == "test_user_pytest_asyncio.py":
        return not config.pluginmanager.has_plugin("asyncio") or None
    return None


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


@pytest.fixture(params=["memory", "sqlite"])
def make_manager(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Callable[..., BackgroundTaskManager]:
    """A manager in memory or on a SQLite journal of this test (same file every call)."""

    def make(**options: Any) -> BackgroundTaskManager:
        if request.param == "sqlite":
            options.setdefault("journal", SQLiteJournal(tmp_path / "tasks.db"))
        return BackgroundTaskManager(**options)

    return make
