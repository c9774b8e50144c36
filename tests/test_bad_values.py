"""Bad values are refused at the call, with the same error in memory and on a journal,
and nothing is stored: delays past what a datetime holds, NUL and lone surrogates in the
names a journal stores, task ids that are not strings."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from background_tasks import (
    BackgroundTaskManager,
    RetryPolicy,
    SerializationError,
    SQLiteJournal,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["memory", "sqlite"])
async def manager(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[BackgroundTaskManager]:
    journal = SQLiteJournal(tmp_path / "t.db") if request.param == "sqlite" else None
    m = BackgroundTaskManager(journal=journal)

    @m.task(name="job")
    async def job(x: object = None) -> None:
        pass

    async with m:
        yield m


@pytest.mark.parametrize("delay", [1e12, timedelta.max, timedelta(days=10**8)])
async def test_a_delay_past_year_9999_is_a_value_error(
    manager: BackgroundTaskManager, delay: object
) -> None:
    with pytest.raises(ValueError, match="year 9999"):
        await manager.submit("job", delay=delay)  # type: ignore[arg-type]
    assert await manager.list() == []


@pytest.mark.parametrize(
    "kwargs",
    [{"max_delay": 1e12}, {"base_delay": timedelta.max.total_seconds()}, {"max_attempts": 2**63}],
)
def test_a_retry_policy_past_what_a_journal_holds_is_a_value_error(
    kwargs: dict[str, float],
) -> None:
    with pytest.raises(ValueError, match="RetryPolicy"):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("field", ["key", "queue"])
async def test_nul_and_lone_surrogates_in_stored_names(
    manager: BackgroundTaskManager, field: str
) -> None:
    with pytest.raises(ValueError, match="NUL"):
        await manager.submit("job", **{field: "a\x00b"})  # type: ignore[arg-type]
    with pytest.raises(SerializationError, match="cannot be stored"):
        await manager.submit("job", **{field: "a\udc80b"})  # type: ignore[arg-type]
    assert await manager.list() == []


async def test_a_lone_surrogate_in_an_argument_on_a_journal(tmp_path: Path) -> None:
    m = BackgroundTaskManager(journal=SQLiteJournal(tmp_path / "t.db"))

    @m.task(name="job")
    async def job(x: object = None) -> None:
        pass

    async with m:
        with pytest.raises(SerializationError, match="cannot be stored as JSON"):
            await m.submit("job", "a\udc80b")
        assert await m.list() == []


@pytest.mark.parametrize("task_id", [2**70, [1], None])
async def test_a_task_id_must_be_a_str(manager: BackgroundTaskManager, task_id: object) -> None:
    for call in (manager.get, manager.cancel, manager.requeue, manager.history):
        with pytest.raises(TypeError, match="task id is a str"):
            await call(task_id)  # type: ignore[arg-type]
