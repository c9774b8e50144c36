"""A per-submit retry policy survives a restart exactly (its ``retry_on`` classes and a
subclass included), or is refused at submit when a restarted process could not rebuild it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import anyio
import pytest

from background_tasks import (
    BackgroundTaskManager,
    RetryPolicy,
    SerializationError,
    SQLiteJournal,
    TaskFailed,
    TaskStatus,
)

pytestmark = pytest.mark.anyio


class Flaky(Exception):
    pass


@dataclasses.dataclass(frozen=True, slots=True)
class NoJitter(RetryPolicy):
    """A subclass a user might write: another default, and the same fields."""

    jitter: bool = False


def _manager(path: Path, calls: list[str]) -> BackgroundTaskManager:
    manager = BackgroundTaskManager(journal=SQLiteJournal(path), shutdown_timeout=0)

    @manager.task(name="fails", retry=RetryPolicy(max_attempts=5, base_delay=0))
    async def fails(kind: str) -> None:
        calls.append(kind)
        raise (Flaky if kind == "flaky" else ValueError)(kind)

    return manager


async def test_retry_on_and_subclass_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    calls: list[str] = []
    only_flaky = RetryPolicy(max_attempts=3, base_delay=0, jitter=False, retry_on=(Flaky,))
    async with _manager(path, calls) as first:  # delayed: they run after the restart
        fatal = await first.submit("fails", "value", delay=0.3, retry=only_flaky)
        flaky = await first.submit("fails", "flaky", delay=0.3, retry=only_flaky)
        sub = await first.submit("fails", "flaky", delay=0.3, retry=NoJitter(2, base_delay=0))
    assert calls == []
    async with _manager(path, calls) as second:
        for handle in (fatal, flaky, sub):
            with pytest.raises(TaskFailed), anyio.fail_after(10):
                await second.handle(handle.id)
        records = {h.id: await second.get(h.id) for h in (fatal, flaky, sub)}
    # ValueError is not in retry_on: one attempt (the registered task's policy would retry it)
    assert records[fatal.id] is not None
    assert records[fatal.id].attempts == 1  # type: ignore[union-attr]
    assert records[flaky.id].attempts == 3  # type: ignore[union-attr]
    assert records[sub.id].attempts == 2  # type: ignore[union-attr]
    assert all(r is not None and r.status is TaskStatus.FAILED for r in records.values())


async def test_a_policy_a_restart_cannot_rebuild_is_refused_at_submit(tmp_path: Path) -> None:
    class Local(Exception):  # no import path leads back to it
        pass

    @dataclasses.dataclass(frozen=True, slots=True)
    class LocalPolicy(RetryPolicy):
        pass

    path = tmp_path / "t.db"
    async with _manager(path, []) as manager:
        with pytest.raises(SerializationError, match=r"exception class .*Local cannot be stored"):
            await manager.submit("fails", "x", retry=RetryPolicy(retry_on=(Local,)))
        with pytest.raises(SerializationError, match="retry policy class"):
            await manager.submit("fails", "x", retry=LocalPolicy())
        assert await manager.list() == []  # nothing was stored
