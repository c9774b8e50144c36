"""Tests written as an application's would be, with pytest-asyncio (not anyio's plugin):
its fixtures set up and tear down in different tasks, its loops are per test or wider.

The last tests run user-style test modules with pytest in a subprocess, with the
user's own settings (strict and auto mode), and read what pytest says.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

pytest_asyncio = pytest.importorskip("pytest_asyncio")

from background_tasks import (  # noqa: E402 - after the skip: the marks need the plugin
    BackgroundTaskManager,
    RetryPolicy,
    SQLiteJournal,
    TaskRegistry,
    TaskStatus,
)
from background_tasks.testing import FakeClock  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

registry = TaskRegistry()
calls: list[str] = []


@registry.task(
    name="greet", retry=RetryPolicy(max_attempts=3, base_delay=3600, max_delay=86400, jitter=False)
)
async def greet(who: str) -> str:
    calls.append(who)
    if who == "flaky" and calls.count("flaky") < 3:
        raise ConnectionError("later")
    return f"hello {who}"


@pytest_asyncio.fixture
async def manager() -> AsyncIterator[BackgroundTaskManager]:
    manager = BackgroundTaskManager()
    manager.include(registry)
    async with manager:
        yield manager


@pytest_asyncio.fixture
async def journaled(tmp_path: Path) -> AsyncIterator[tuple[BackgroundTaskManager, FakeClock]]:
    clock = FakeClock(autojump=True)
    manager = BackgroundTaskManager(clock=clock, journal=SQLiteJournal(tmp_path / "t.db"))
    manager.include(registry)
    async with manager:
        yield manager, clock


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def module_manager() -> AsyncIterator[BackgroundTaskManager]:
    manager = BackgroundTaskManager()
    async with manager:
        yield manager


@pytest.mark.asyncio
async def test_a_fixture_manager_runs_tasks(manager: BackgroundTaskManager) -> None:
    assert await (await greet.submit("ada")) == "hello ada"
    await greet.options(delay=0.01).submit("later")
    await manager.join(timeout=5)
    assert manager.statistics().completed == 2


@pytest.mark.asyncio
async def test_a_fake_clock_with_the_sqlite_journal(
    journaled: tuple[BackgroundTaskManager, FakeClock],
) -> None:
    manager, clock = journaled
    calls.clear()
    start = clock.time()
    handle = await greet.submit("flaky")  # retried after 1 h, then 2 h
    reminder = await greet.options(delay=timedelta(days=1)).submit("tomorrow")
    await manager.join(timeout=5)  # the clock jumps to each due moment meanwhile
    assert await handle == "hello flaky"
    assert await reminder == "hello tomorrow"
    record = await handle.record()
    assert record is not None
    assert record.status is TaskStatus.COMPLETED
    assert record.finished_at is not None
    assert record.finished_at.timestamp() == pytest.approx(start + 3 * 3600)
    assert clock.time() == pytest.approx(start + 86400)


@pytest.mark.asyncio
async def test_autojump_in_a_pytest_asyncio_test() -> None:
    clock = FakeClock(autojump=True)
    manager = BackgroundTaskManager(clock=clock)

    async def stamp() -> float:
        return clock.time()

    async with manager:
        start = clock.time()
        handle = await manager.submit(stamp, delay=timedelta(weeks=1))
        assert await handle == start + 7 * 86400


@pytest.mark.asyncio(loop_scope="module")
async def test_a_module_manager_first(module_manager: BackgroundTaskManager) -> None:
    async def one() -> int:
        return 1

    assert await (await module_manager.submit(one)) == 1


@pytest.mark.asyncio(loop_scope="module")
async def test_a_module_manager_second(module_manager: BackgroundTaskManager) -> None:
    async def two() -> int:
        return 2

    assert await (await module_manager.submit(two)) == 2
    assert module_manager.statistics().completed == 2  # the first test's task is there


# ------------------------------------------------------------------ in a subprocess

USER_MODULE = """
import pytest
import pytest_asyncio

from background_tasks import BackgroundTaskManager

m = BackgroundTaskManager()


async def double(x: int) -> int:
    return 2 * x


@pytest_asyncio.fixture
async def manager():
    async with m:
        yield m


@pytest.mark.asyncio
async def test_first(manager):
    assert await (await manager.submit(double, 2)) == 4


@pytest.mark.asyncio
async def test_second(manager):
    handle = await manager.submit(double, 3, delay=0.01)
    await manager.join(timeout=5)
    assert await handle == 6
"""

WRONG_LOOP_MODULE = """
import pytest
import pytest_asyncio

from background_tasks import BackgroundTaskManager


async def double(x: int) -> int:
    return 2 * x


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def manager():
    async with BackgroundTaskManager() as m:
        yield m


@pytest.mark.asyncio  # a loop of its own: not the manager's
async def test_on_another_loop(manager):
    await (await manager.submit(double, 2))
"""

AUTO_MODE_MODULE = """
import pytest

from background_tasks import BackgroundTaskManager


async def double(x: int) -> int:
    return 2 * x


@pytest.fixture
async def manager():
    async with BackgroundTaskManager() as m:
        yield m


async def test_auto_mode(manager):
    assert await (await manager.submit(double, 5)) == 10
"""


def run_user_suite(tmp_path: Path, module: str, ini: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "pytest.ini").write_text(textwrap.dedent(ini))
    (tmp_path / "test_user_app.py").write_text(module)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "timeout=60"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


STRICT = """
    [pytest]
    asyncio_default_fixture_loop_scope = function
"""


@pytest.mark.slow
def test_the_fixture_everyone_writes_first_passes(tmp_path: Path) -> None:
    done = run_user_suite(tmp_path, USER_MODULE, STRICT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout
    assert "different task" not in done.stdout + done.stderr


@pytest.mark.slow
def test_auto_mode_passes_too(tmp_path: Path) -> None:
    ini = """
        [pytest]
        asyncio_mode = auto
        asyncio_default_fixture_loop_scope = function
    """
    done = run_user_suite(tmp_path, AUTO_MODE_MODULE, ini)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout


@pytest.mark.slow
def test_a_module_manager_on_a_test_loop_fails_fast_and_says_why(tmp_path: Path) -> None:
    done = run_user_suite(tmp_path, WRONG_LOOP_MODULE, STRICT)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 failed" in done.stdout
    assert "runs on another event loop" in done.stdout
    assert 'loop_scope=\\"module\\"' in done.stdout or 'loop_scope="module"' in done.stdout
    assert "Timeout" not in done.stdout
