"""Structlog events: one per transition, the stated keys, nothing printed unless the
application routes them, and no global configuration by the library."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog

from background_tasks import BackgroundTaskManager, RetryPolicy, SQLiteJournal, TaskFailed

Logs = list[MutableMapping[str, Any]]

KEYS = {"task_id", "name", "queue", "from", "to", "attempt"}


@pytest.fixture
def default_level_events() -> Iterator[Logs]:
    logger = logging.getLogger("background_tasks")
    assert logger.getEffectiveLevel() > logging.DEBUG  # nothing configured: WARNING
    with structlog.testing.capture_logs() as logs:
        yield logs


def transitions(logs: Logs) -> Logs:
    return [e for e in logs if e["event"] == "task_transition"]


@pytest.mark.anyio
async def test_one_event_per_transition(debug_events: Logs) -> None:
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ValueError(f"try {calls}")
        return "ok"

    async with BackgroundTaskManager(queues={"q": 1}) as manager:
        policy = RetryPolicy(max_attempts=3, base_delay=0, jitter=False)
        handle = await manager.submit(flaky, queue="q", retry=policy)
        await handle
    events = transitions(debug_events)
    assert [(e["from"], e["to"], e["attempt"]) for e in events] == [
        ("pending", "running", 1),
        ("running", "retrying", 1),
        ("retrying", "running", 2),
        ("running", "retrying", 2),
        ("retrying", "running", 3),
        ("running", "completed", 3),
    ]
    for event in events:
        assert set(event) >= KEYS
        assert (event["task_id"], event["name"], event["queue"]) == (
            handle.id,
            flaky.__qualname__,
            "q",
        )
        # stable names and plain values: a journal or a JSON renderer can take them as is
        assert isinstance(event["from"], str)
        assert isinstance(event["to"], str)
    levels = [e["log_level"] for e in events]
    assert levels == ["debug", "warning", "debug", "warning", "debug", "debug"]
    retry_event = events[1]
    assert retry_event["error_type"] == "ValueError"
    assert retry_event["error"] == "try 1"
    submitted = [e for e in debug_events if e["event"] == "task_submitted"]
    assert len(submitted) == 1
    assert submitted[0]["task_id"] == handle.id


@pytest.mark.anyio
async def test_failures_are_warnings(debug_events: Logs) -> None:
    async def boom() -> None:
        raise KeyError("gone")

    async with BackgroundTaskManager() as manager:
        handle = await manager.submit(boom)
        with pytest.raises(TaskFailed):
            await handle
    last = transitions(debug_events)[-1]
    assert (last["from"], last["to"], last["log_level"]) == ("running", "failed", "warning")
    assert last["error_type"] == "KeyError"


@pytest.mark.anyio
async def test_only_failures_at_the_default_level(
    default_level_events: Logs,
) -> None:
    async def boom() -> None:
        raise ValueError("boom")

    async with BackgroundTaskManager() as manager:
        await (await manager.submit(anyio.sleep, 0))
        with pytest.raises(TaskFailed):
            await (await manager.submit(boom))
    events = transitions(default_level_events)
    assert [(e["from"], e["to"]) for e in events] == [("running", "failed")]
    assert all(e["event"] != "task_submitted" for e in default_level_events)


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


WORKLOAD = """
    import anyio
    from background_tasks import BackgroundTaskManager, RetryPolicy, SQLiteJournal, TaskFailed

    async def ok() -> int:
        return 1

    async def boom() -> None:
        raise ValueError("boom")

    async def main() -> None:
        async with BackgroundTaskManager() as manager:
            await (await manager.submit(ok))
            handle = await manager.submit(
                boom, retry=RetryPolicy(max_attempts=2, base_delay=0)
            )
            try:
                await handle
            except TaskFailed:
                pass

    for backend in ("asyncio", "trio"):
        anyio.run(main, backend=backend)
"""


def test_silent_and_unconfigured_when_the_app_configures_nothing() -> None:
    proc = _run(
        WORKLOAD
        + """
    import logging, structlog
    print("configured:", structlog.is_configured())
    print("root handlers:", logging.getLogger().handlers)
    """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "configured: False\nroot handlers: []\n"
    assert proc.stderr == ""


def test_an_app_that_routes_logging_gets_every_event() -> None:
    proc = _run(
        """
    import logging, sys
    logging.basicConfig(level=logging.DEBUG, stream=sys.stdout, format="%(name)s %(message)s")
    """
        + WORKLOAD
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if "task_transition" in line]
    # per backend: ok (pending, running, completed) + boom (pending, running, retrying,
    # running, failed)
    assert len(lines) == 2 * (2 + 4)
    assert all(line.startswith("background_tasks ") for line in lines)
    assert sum("failed" in line for line in lines) >= 2


def test_an_app_that_routes_structlog_gets_every_event() -> None:
    # structlog rendering (JSON) on top of standard library routing, the usual setup
    proc = _run(
        """
    import logging, sys, structlog
    structlog.configure(
        processors=[structlog.stdlib.add_log_level, structlog.processors.JSONRenderer()],
    )
    logging.basicConfig(level=logging.DEBUG, stream=sys.stdout, format="%(message)s")
    """
        + WORKLOAD
    )
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    moves = [e for e in events if e["event"] == "task_transition"]
    assert len(moves) == 2 * (2 + 4)
    assert all(set(e) >= KEYS for e in moves)
    assert [e["level"] for e in moves].count("warning") == 2 * 2  # retrying, failed


def test_import_does_not_configure(capsys: pytest.CaptureFixture[str]) -> None:
    proc = _run(
        """
    import logging, structlog
    import background_tasks
    assert not structlog.is_configured()
    assert logging.getLogger().handlers == []
    assert logging.getLogger("background_tasks").level == logging.NOTSET
    """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == proc.stderr == ""


@pytest.mark.anyio
async def test_nothing_on_stdout_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    async def boom() -> None:
        raise ValueError("boom")

    async with BackgroundTaskManager() as manager:
        await (await manager.submit(anyio.sleep, 0))
        with pytest.raises(TaskFailed):
            await (await manager.submit(boom))
    out, err = capsys.readouterr()
    assert "task_transition" not in out
    assert "task_transition" not in err


@pytest.mark.anyio
async def test_no_events_when_the_level_is_above_warning() -> None:
    async def boom() -> None:
        raise ValueError("boom")

    logger = logging.getLogger("background_tasks")
    old = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with structlog.testing.capture_logs() as logs:
            async with BackgroundTaskManager() as manager:
                with pytest.raises(TaskFailed):
                    await (await manager.submit(boom))
    finally:
        logger.setLevel(old)
    assert transitions(logs) == []


@pytest.mark.anyio
async def test_a_failure_event_carries_its_traceback(default_level_events: Logs) -> None:
    async def broken() -> None:
        raise ValueError("no luck")

    async with BackgroundTaskManager() as manager:
        with pytest.raises(TaskFailed):
            await (await manager.submit(broken))
    [failed] = [e for e in transitions(default_level_events) if e["to"] == "failed"]
    assert failed["error_type"] == "ValueError"
    assert "Traceback" in failed["traceback"]
    assert 'raise ValueError("no luck")' in failed["traceback"]


@pytest.mark.anyio
async def test_a_journaled_task_no_manager_registers_is_not_silent(
    default_level_events: Logs, tmp_path: Path
) -> None:
    """After a rename in a deploy, the old name's pending tasks wait for a manager that
    registers it: the manager says so (once per name), at WARNING."""
    path = tmp_path / "t.db"
    old = BackgroundTaskManager(journal=SQLiteJournal(path))

    @old.task(name="old_name")
    async def job() -> None:
        pass

    async with old:
        for _ in range(3):
            await job.options(delay=3600).submit()
    async with BackgroundTaskManager(journal=SQLiteJournal(path)) as new:
        assert len(await new.list(status="pending")) == 3
    events = [e for e in default_level_events if e["event"] == "task_name_not_registered"]
    assert [e["name"] for e in events] == ["old_name"]
    assert events[0]["log_level"] == "warning"
