"""SQLiteJournal: the journal contract, plus what only SQLite has (group commit, files)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from background_tasks._errors import JournalError
from background_tasks._states import TaskStatus
from background_tasks.journal import sqlite as sqlite_module
from background_tasks.journal._protocol import Change
from background_tasks.journal.sqlite import SCHEMA_VERSION, SQLiteJournal
from background_tasks.testing import OWNER, JournalContract, claim, finish, make_row

pytestmark = pytest.mark.anyio

P, R, C = TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.COMPLETED


class TestSQLiteContract(JournalContract):
    @pytest.fixture
    def journal_factory(self, tmp_path: Path) -> Callable[[], SQLiteJournal]:
        return lambda: SQLiteJournal(tmp_path / "tasks.db")


class TestSQLiteNormalContract(JournalContract):
    """The same contract with synchronous=NORMAL and a str path."""

    @pytest.fixture
    def journal_factory(self, tmp_path: Path) -> Callable[[], SQLiteJournal]:
        return lambda: SQLiteJournal(str(tmp_path / "tasks.db"), synchronous="NORMAL")


@pytest.fixture
async def journal(tmp_path: Path, anyio_backend: object) -> AsyncIterator[SQLiteJournal]:
    journal = SQLiteJournal(tmp_path / "tasks.db")
    await journal.open(OWNER)
    try:
        yield journal
    finally:
        await journal.close()


def _connect(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


# --------------------------------------------------------------------------- construction


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"lease_timeout": 0}, "lease_timeout"),
        ({"lease_timeout": -1.0}, "lease_timeout"),
        ({"lease_timeout": float("inf")}, "lease_timeout"),
        ({"lease_timeout": float("nan")}, "lease_timeout"),
        ({"lease_timeout": "30"}, "lease_timeout"),
        ({"lease_timeout": True}, "lease_timeout"),
        ({"busy_timeout": 0}, "busy_timeout"),
        ({"synchronous": "OFF"}, "synchronous"),
        ({"synchronous": 2}, "synchronous"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(
    tmp_path: Path, kwargs: dict[str, Any], name: str
) -> None:
    with pytest.raises(ValueError, match=name):
        SQLiteJournal(tmp_path / "j.db", **kwargs)


@pytest.mark.parametrize("path", ["", ":memory:", "file:x.db?mode=memory"])
def test_in_memory_paths_are_refused(path: str) -> None:
    with pytest.raises(ValueError, match="path"):
        SQLiteJournal(path)


def test_path_type_is_checked() -> None:
    with pytest.raises(TypeError, match="path"):
        SQLiteJournal(3)  # type: ignore[arg-type]


def test_attributes(tmp_path: Path) -> None:
    journal = SQLiteJournal(tmp_path / "j.db", lease_timeout=5, synchronous="normal")  # type: ignore[arg-type]
    assert journal.lease_timeout == 5.0
    assert journal.synchronous == "NORMAL"
    assert journal.path == str(tmp_path / "j.db")
    assert "closed" in repr(journal)


# --------------------------------------------------------------------------- schema


async def test_schema_on_disk(journal: SQLiteJournal, tmp_path: Path) -> None:
    assert "open" in repr(journal)
    conn = _connect(tmp_path / "tasks.db")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        assert meta["schema_version"] == SCHEMA_VERSION
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert {"tasks_rev", "tasks_status", "tasks_live_key", "tasks_finished"} <= indexes
        columns = [r[1] for r in conn.execute("PRAGMA table_info(tasks)")]
        assert columns[-2:] == ["rev", "writer"]
        history = [r[1] for r in conn.execute("PRAGMA table_info(history)")]
        assert history == [
            "task_id", "seq", "source", "target", "attempt", "at", "owner", "error_json",
        ]  # fmt: skip
    finally:
        conn.close()
    assert journal._wconn is not None
    assert journal._wconn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


async def test_rev_and_writer_columns(journal: SQLiteJournal, tmp_path: Path) -> None:
    row = await journal.insert(make_row())
    await journal.apply(claim(row))
    conn = _connect(tmp_path / "tasks.db")
    try:
        rev, writer = conn.execute("SELECT rev, writer FROM tasks").fetchone()
        assert writer == OWNER
        assert rev == conn.execute("SELECT value FROM meta WHERE key='rev'").fetchone()[0]
        seqs = conn.execute("SELECT seq FROM history ORDER BY seq").fetchall()
        assert seqs == [(0,), (1,)]
    finally:
        conn.close()


async def test_forward_migration_runs_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, anyio_backend: object
) -> None:
    path = tmp_path / "tasks.db"
    journal = SQLiteJournal(path)
    await journal.open(OWNER)
    row = await journal.insert(make_row())
    await journal.close()
    extra = ("ALTER TABLE tasks ADD COLUMN note TEXT", "CREATE INDEX tasks_note ON tasks (note)")
    monkeypatch.setattr(sqlite_module, "MIGRATIONS", (*sqlite_module.MIGRATIONS, extra))
    monkeypatch.setattr(sqlite_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    for _ in range(2):
        journal = SQLiteJournal(path)
        await journal.open(OWNER)
        assert await journal.get(row.id) == row
        await journal.close()
    conn = _connect(path)
    try:
        assert "note" in [r[1] for r in conn.execute("PRAGMA table_info(tasks)")]
        version = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        assert version == (SCHEMA_VERSION + 1,)
    finally:
        conn.close()


# --------------------------------------------------------------------------- group commit


async def test_concurrent_writes_share_commits(journal: SQLiteJournal) -> None:
    rows = [make_row() for _ in range(200)]
    before = journal.commits

    async def run(i: int) -> None:
        stored = await journal.insert(rows[i])
        claimed = await journal.apply(claim(stored))
        assert claimed is not None
        assert await journal.apply(finish(claimed)) is not None

    async with anyio.create_task_group() as tg:
        for i in range(len(rows)):
            tg.start_soon(run, i)
    assert (await journal.counts())[C] == 200
    commits = journal.commits - before
    assert 3 <= commits <= 30, commits  # 600 writes


async def test_one_bad_operation_fails_alone(journal: SQLiteJournal) -> None:
    existing = await journal.insert(make_row())
    good = [make_row() for _ in range(5)]
    outcomes: dict[str, object] = {}

    async def insert(name: str, row: Any) -> None:
        try:
            outcomes[name] = await journal.insert(row)
        except Exception as exc:
            outcomes[name] = exc

    async def apply(name: str, change: Change) -> None:
        try:
            outcomes[name] = await journal.apply(change)
        except Exception as exc:
            outcomes[name] = exc

    bad_value = claim(existing)
    bad_value.fields["progress_json"] = {"not": "bindable"}
    before = journal.commits
    async with anyio.create_task_group() as tg:
        for i, row in enumerate(good):
            tg.start_soon(insert, f"good{i}", row)
        tg.start_soon(insert, "duplicate", make_row(id=existing.id))
        tg.start_soon(insert, "null name", make_row(name=None))
        tg.start_soon(apply, "bad value", bad_value)
    assert isinstance(outcomes["duplicate"], JournalError)
    assert existing.id in str(outcomes["duplicate"])
    assert isinstance(outcomes["duplicate"].__cause__, sqlite3.IntegrityError)
    assert isinstance(outcomes["null name"], JournalError)
    assert isinstance(outcomes["bad value"], JournalError)
    for i, row in enumerate(good):
        assert outcomes[f"good{i}"] == row
        assert await journal.get(row.id) == row
    assert await journal.get(existing.id) == existing
    assert journal.commits - before <= 2
    assert await journal.apply(claim(existing)) is not None  # the failed change left no trace


async def test_requeue_into_a_taken_key_fails_with_journal_error(journal: SQLiteJournal) -> None:
    first = await journal.insert(make_row(key="k"))
    cancelled = await journal.apply(finish(first, TaskStatus.CANCELLED))
    assert cancelled is not None
    second = await journal.insert(make_row(key="k"))
    assert second.id != first.id
    requeue = Change(cancelled.id, cancelled.version, TaskStatus.CANCELLED, P, 0, time.time(), None)
    with pytest.raises(JournalError, match="UNIQUE"):
        await journal.apply(requeue)
    assert await journal.get(cancelled.id) == cancelled


async def test_cancelled_leader_does_not_lose_other_results(journal: SQLiteJournal) -> None:
    rows = [make_row() for _ in range(20)]
    results: list[str] = []

    async def insert(row: Any) -> None:
        results.append((await journal.insert(row)).id)

    async with anyio.create_task_group() as tg:
        with anyio.CancelScope() as scope:
            tg.start_soon(insert, rows[0])
            await anyio.lowlevel.checkpoint()
            for row in rows[1:]:
                tg.start_soon(insert, row)
            await anyio.lowlevel.checkpoint()
            scope.cancel()
    for row in rows:  # every operation that was queued is written, cancelled caller or not
        stored = await journal.get(row.id)
        if row.id in results:
            assert stored == row
    assert len(results) >= len(rows) - 1


async def test_closed_journal_raises(tmp_path: Path, anyio_backend: object) -> None:
    journal = SQLiteJournal(tmp_path / "j.db")
    with pytest.raises(JournalError, match="not open"):
        await journal.get("x")
    await journal.open(OWNER)
    with pytest.raises(RuntimeError, match="already open"):
        await journal.open(OWNER)
    await journal.close()
    with pytest.raises(JournalError, match="not open"):
        await journal.insert(make_row())
    with pytest.raises(JournalError, match="not open"):
        await journal.counts()


async def test_purge_batch_must_be_positive(journal: SQLiteJournal) -> None:
    with pytest.raises(ValueError, match="batch"):
        await journal.purge(time.time(), batch=0)


async def test_purge_takes_one_transaction_per_batch(journal: SQLiteJournal) -> None:
    for _ in range(7):
        claimed = await journal.apply(claim(await journal.insert(make_row())))
        assert claimed is not None
        await journal.apply(finish(claimed))
    before = journal.commits
    assert await journal.purge(time.time() + 1, batch=3) == 7
    assert journal.commits - before == 3
    assert await journal.counts() == dict.fromkeys(TaskStatus, 0)


async def test_data_version_moves_when_another_connection_writes(
    journal: SQLiteJournal, tmp_path: Path
) -> None:
    other = SQLiteJournal(tmp_path / "tasks.db")
    await other.open("other")
    try:
        before = await journal.data_version()
        assert await journal.data_version() == before
        await other.insert(make_row())
        assert await journal.data_version() != before
    finally:
        await other.close()
