"""Flow control enforced by the journals: counted claims (``Change.limits``) on SQLite
and PostgreSQL, the schema migration, and two managers in one process on one journal.
(Real processes: ``tests/test_flow_processes.py``.)"""

from __future__ import annotations

import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from background_tasks import BackgroundTaskManager, Queue, SQLiteJournal, TaskStatus
from background_tasks.journal import ClaimLimits, Journal
from background_tasks.journal.sqlite import MIGRATIONS
from background_tasks.postgres import PostgresJournal
from background_tasks.testing import applied, claim, finish, make_row, opened

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
from test_journal_postgres import _schemas, pg_dsn, schema  # noqa: E402, F401

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["sqlite", "postgres"])
def journal_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Journal]:
    if request.param == "sqlite":
        return lambda: SQLiteJournal(tmp_path / "flow.db", lease_timeout=5)
    dsn = request.getfixturevalue("pg_dsn")
    name = request.getfixturevalue("schema")
    return lambda: PostgresJournal(dsn, schema=name, lease_timeout=5)


@pytest.fixture
async def journal(
    journal_factory: Callable[[], Journal], anyio_backend: object
) -> AsyncIterator[Journal]:
    async with opened(journal_factory()) as j:
        yield j


@pytest.fixture
async def peer(journal: Journal, journal_factory: Callable[[], Journal]) -> AsyncIterator[Journal]:
    async with opened(journal_factory(), "owner-b") as j:
        yield j


async def _pending(journal: Journal, **fields: Any) -> Any:
    row = make_row(**fields)
    await journal.insert(row)
    return row


def _limited(row: Any, limits: ClaimLimits, at: float | None = None) -> Any:
    change = claim(row, now=at)
    change.limits = limits
    return change


async def test_a_lock_admits_one_running_row_and_the_first_due_waiter(journal: Journal) -> None:
    first = await _pending(journal, lock="L", priority=0)
    second = await _pending(journal, lock="L", priority=0)
    urgent = await _pending(journal, lock="L", priority=9)
    other = await _pending(journal, lock="M")
    # the urgent one comes first: the others are refused while it waits
    limits = ClaimLimits("default", lock="L", priority=0)
    assert not await journal.apply(_limited(first, limits))
    assert limits.refused == "lock"
    running = await applied(journal, _limited(urgent, ClaimLimits("default", lock="L", priority=9)))
    limits = ClaimLimits("default", lock="L", priority=0)
    assert not await journal.apply(_limited(first, limits))
    assert limits.refused == "lock"  # held now
    assert await journal.apply(_limited(other, ClaimLimits("default", lock="M")))
    await applied(journal, finish(running))
    row = await journal.get(first.id)
    assert row is not None
    await applied(journal, _limited(row, ClaimLimits("default", lock="L", priority=0)))
    limits = ClaimLimits("default", lock="L", priority=0)
    assert not await journal.apply(_limited(second, limits))
    assert limits.refused == "lock"


async def test_a_moved_row_is_lost_not_refused(journal: Journal, peer: Journal) -> None:
    row = await _pending(journal, lock="L")
    await applied(peer, claim(row, "owner-b"))
    limits = ClaimLimits("default", lock="L")
    assert not await journal.apply(_limited(row, limits))
    assert limits.refused is None


async def test_a_shared_limit_and_partition_count_running_shared_rows(journal: Journal) -> None:
    rows = [await _pending(journal, queue="q", partition=p, shared=True) for p in "aab"]
    extra = await _pending(journal, queue="q", partition="b", shared=True)

    def limits(row: Any) -> ClaimLimits:
        return ClaimLimits("q", limit=2, partition=row.partition, per_partition=1)

    await applied(journal, _limited(rows[0], limits(rows[0])))
    refused = limits(rows[1])
    assert not await journal.apply(_limited(rows[1], refused))
    assert refused.refused == "partition"
    await applied(journal, _limited(rows[2], limits(rows[2])))
    refused = limits(extra)
    assert not await journal.apply(_limited(extra, refused))
    assert refused.refused == "limit"
    unshared = await _pending(journal, queue="q")  # not counted, and not limited here
    assert await journal.apply(claim(unshared))


async def test_a_rate_counts_recorded_starts_in_its_window(journal: Journal) -> None:
    rows = [await _pending(journal, queue="r", shared=True) for _ in range(4)]
    now = time.time()
    for row in rows[:3]:
        await applied(journal, _limited(row, ClaimLimits("r", rate=3, period=10.0), now))
    limits = ClaimLimits("r", rate=3, period=10.0)
    assert not await journal.apply(_limited(rows[3], limits, now + 9))
    assert limits.refused == "rate"
    await applied(journal, _limited(rows[3], ClaimLimits("r", rate=3, period=10.0), now + 10.5))


def test_a_version_1_sqlite_file_opens_and_migrates(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for statement in MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', 1)")
    conn.execute(
        "INSERT INTO tasks (id, name, queue, status, priority, args_json, kwargs_json,"
        " attempts, max_attempts, created_at, scheduled_at, rev)"
        " VALUES ('t1', 'job', 'default', 'pending', 0, '[]', '{}', 0, 1, 1.0, 1.0, 1)"
    )
    conn.close()

    async def main() -> None:
        async with opened(SQLiteJournal(path)) as journal:
            row = await journal.get("t1")
            assert row is not None
            assert (row.lock, row.partition, row.shared) == (None, None, False)
            assert (await journal.counts())[TaskStatus.PENDING] == 1

    anyio.run(main)


# ---------------------------------------------------------------- managers


async def test_two_managers_share_a_lock_a_limit_and_run_queues(
    journal_factory: Callable[[], Journal],
) -> None:
    events: list[tuple[str, str, str, float]] = []
    queues = {"s": Queue(limit=2, shared=True), "b": 4}

    def manager(label: str, **kw: Any) -> BackgroundTaskManager:
        m = BackgroundTaskManager(
            max_concurrency=4, journal=journal_factory(), queues=queues, poll_interval=0.05, **kw
        )

        @m.task(name="job")
        async def job(name: str, seconds: float) -> str:
            events.append(("start", name, label, time.monotonic()))
            await anyio.sleep(seconds)
            events.append(("end", name, label, time.monotonic()))
            return label

        return m

    a, b = manager("A"), manager("B", run_queues=["default", "s"])
    async with a, b:
        handles = [await a.submit("job", f"L{i}", 0.02, lock="L") for i in range(5)]
        handles += [await b.submit("job", f"S{i}", 0.05, queue="s") for i in range(6)]
        handles += [await b.submit("job", f"B{i}", 0.0, queue="b") for i in range(3)]
        for handle in handles:
            await handle.result(timeout=30)

    def most(prefix: str) -> int:
        edges = sorted((t, 1 if k == "start" else -1) for k, n, _, t in events if n[0] == prefix)
        now = top = 0
        for _, step in edges:
            now += step
            top = max(top, now)
        return top

    assert most("L") == 1
    assert most("S") <= 2
    assert {label for _, n, label, _ in events if n[0] == "B"} == {"A"}
