"""SQLiteJournal: the journal contract, plus what only SQLite has (group commit, files)."""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from background_tasks._errors import InvalidTransition, JournalError
from background_tasks._states import TaskStatus
from background_tasks._writer import take_over
from background_tasks.journal._protocol import Change, TaskRow
from background_tasks.journal.sqlite import SCHEMA_VERSION, SQLiteJournal, _schema
from background_tasks.journal.sqlite._batch import _Shape
from background_tasks.journal.sqlite._ops import _Apply, _Insert
from background_tasks.testing import (
    OWNER,
    JournalContract,
    applied,
    claim,
    finish,
    make_row,
    opened,
)

pytestmark = pytest.mark.anyio

P, R, C = TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.COMPLETED
Y = TaskStatus.RETRYING


class TestSQLiteContract(JournalContract):
    @pytest.fixture
    def journal_factory(self, tmp_path: Path) -> Callable[[], SQLiteJournal]:
        return lambda: SQLiteJournal(tmp_path / "tasks.db")


class TestSQLiteNormalContract(JournalContract):
    """The same contract with synchronous=NORMAL and a str path."""

    @pytest.fixture
    def journal_factory(self, tmp_path: Path) -> Callable[[], SQLiteJournal]:
        return lambda: SQLiteJournal(str(tmp_path / "tasks.db"), synchronous="NORMAL")


class TestSQLiteOneByOneContract(JournalContract):
    """The contract on the path for SQLite older than 3.33 (no UPDATE ... FROM): one
    statement per operation, as the careful replay of a batch also runs."""

    @pytest.fixture
    def journal_factory(self, tmp_path: Path) -> Callable[[], SQLiteJournal]:
        def make() -> SQLiteJournal:
            journal = SQLiteJournal(tmp_path / "tasks.db")
            journal._grouped = False
            return journal

        return make


@pytest.fixture
async def journal(tmp_path: Path, anyio_backend: object) -> AsyncIterator[SQLiteJournal]:
    async with opened(SQLiteJournal(tmp_path / "tasks.db")) as journal:
        yield journal


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
    with pytest.raises(TypeError, match=r"str or os\.PathLike, not bytes"):
        SQLiteJournal(b"tasks.db")  # type: ignore[arg-type]

    class BytesPath:  # an os.PathLike[bytes]
        def __fspath__(self) -> bytes:
            return b"tasks.db"

    with pytest.raises(TypeError, match="text path, not bytes"):
        SQLiteJournal(BytesPath())  # type: ignore[arg-type]


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
        assert {
            "tasks_rev", "tasks_status", "tasks_live_key", "tasks_finished",
            "tasks_shared_running", "tasks_lock", "starts_queue_at",
        } <= indexes  # fmt: skip
        columns = [r[1] for r in conn.execute("PRAGMA table_info(tasks)")]
        # version 1's columns, then those migration 2 added (ALTER TABLE appends)
        assert columns[-5:] == ["rev", "writer", "lock", "partition", "shared"]
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
    monkeypatch.setattr(_schema, "MIGRATIONS", (*_schema.MIGRATIONS, extra))
    monkeypatch.setattr(_schema, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
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
        change = claim(stored)
        assert await journal.apply(change) is True
        claimed = dataclasses.replace(stored, status=R, version=1, attempts=1, owner=OWNER)
        assert await journal.apply(finish(claimed)) is True

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
    assert await journal.apply(claim(existing)) is True  # the failed change left no trace


async def test_requeue_into_a_taken_key_is_an_invalid_transition(journal: SQLiteJournal) -> None:
    first = await journal.insert(make_row(key="k"))
    cancelled = await applied(journal, finish(first, TaskStatus.CANCELLED))
    second = await journal.insert(make_row(key="k"))
    assert second.id != first.id
    requeue = Change(cancelled.id, cancelled.version, TaskStatus.CANCELLED, P, 0, time.time(), None)
    with pytest.raises(InvalidTransition, match="another unfinished task holds the key 'k'"):
        await journal.apply(requeue)
    assert await journal.get(cancelled.id) == cancelled
    assert len(await journal.history(cancelled.id)) == 2  # no line for the refused change
    await applied(journal, finish(second, TaskStatus.CANCELLED))
    await applied(journal, requeue)  # the key is free again


async def test_requeue_collision_fails_alone_in_a_shared_batch(journal: SQLiteJournal) -> None:
    """Two requeues into one key in one batch: one applies, the other is refused; the
    other operations of the batch are not affected."""
    a = await applied(journal, finish(await journal.insert(make_row(key="k")), TaskStatus.FAILED))
    b = await applied(journal, finish(await journal.insert(make_row(key="k")), TaskStatus.FAILED))
    others = [make_row() for _ in range(5)]
    outcomes: dict[str, object] = {}

    async def requeue(row: TaskRow) -> None:
        change = Change(row.id, row.version, row.status, P, 0, time.time(), None, {"attempts": 0})
        try:
            outcomes[row.id] = await journal.apply(change)
        except InvalidTransition as exc:
            outcomes[row.id] = exc

    before = journal.commits
    async with anyio.create_task_group() as tg:
        tg.start_soon(requeue, a)
        tg.start_soon(requeue, b)
        for row in others:
            tg.start_soon(journal.insert, row)
    assert journal.commits - before <= 2
    won, lost = (a, b) if outcomes[a.id] is True else (b, a)  # the order is the scheduler's
    assert outcomes[won.id] is True
    assert isinstance(outcomes[lost.id], InvalidTransition)
    assert (await journal.get(lost.id)) == lost
    for row in others:
        assert await journal.get(row.id) == row


async def test_a_takeover_cancels_a_task_whose_cancel_was_requested(
    journal: SQLiteJournal, tmp_path: Path
) -> None:
    """A cancel asked for just before the owner died is not lost: the state writer's
    takeover (``reclaim_target``) ends the task CANCELLED instead of running it again."""
    now = time.time()
    asked = await applied(journal, claim(await journal.insert(make_row()), lease=1, now=now - 10))
    assert await journal.request_cancel(asked.id) is not None
    plain = await applied(journal, claim(await journal.insert(make_row()), lease=1, now=now - 10))
    peer = SQLiteJournal(tmp_path / "tasks.db")
    await peer.open("peer")
    try:
        _, cursor = await journal.changes(0, OWNER)
        back = {}
        for row in await peer.expired(now):
            taken = await take_over(peer, "peer", row, now, 0, now)
            assert taken is not None
            back[row.id] = taken
    finally:
        await peer.close()
    cancelled = back[asked.id]
    assert (cancelled.status, cancelled.finished_at, cancelled.cancel_requested) == (
        TaskStatus.CANCELLED, now, False,
    )  # fmt: skip
    assert (cancelled.owner, cancelled.lease_until, cancelled.error_json) == (None, None, None)
    assert cancelled.version == asked.version + 1
    assert await journal.get(asked.id) == cancelled
    assert back[plain.id].status is TaskStatus.FAILED  # max_recoveries=0: not a cancel
    last = (await journal.history(asked.id))[-1]
    assert (last.source, last.target, last.error) == (R, TaskStatus.CANCELLED, None)
    seen, _ = await journal.changes(cursor, OWNER)
    assert {r.id for r in seen} == {asked.id, plain.id}


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
        claimed = await applied(journal, claim(await journal.insert(make_row())))
        await applied(journal, finish(claimed))
    before = journal.commits
    assert await journal.purge(time.time() + 1, batch=3) == 7
    assert journal.commits - before == 3
    assert await journal.counts() == dict.fromkeys(TaskStatus, 0)


async def test_a_commit_of_another_connection_is_seen_at_once(
    journal: SQLiteJournal, tmp_path: Path
) -> None:
    other = SQLiteJournal(tmp_path / "tasks.db")
    await other.open("other")
    watcher = _connect(tmp_path / "tasks.db")
    try:
        before = watcher.execute("PRAGMA data_version").fetchone()[0]
        assert await journal.get("nope") is None  # a read commits nothing
        assert watcher.execute("PRAGMA data_version").fetchone()[0] == before
        row = await other.insert(make_row())
        assert watcher.execute("PRAGMA data_version").fetchone()[0] != before
        assert await journal.get(row.id) == row
    finally:
        watcher.close()
        await other.close()


# --------------------------------------------------------------------------- set-based writes


async def _together(*calls: Callable[[], Any]) -> list[Any]:
    """Start every call in one tick (so they share a batch); their results or errors."""
    results: list[Any] = [None] * len(calls)

    async def run(i: int) -> None:
        try:
            results[i] = await calls[i]()
        except Exception as exc:
            results[i] = exc

    async with anyio.create_task_group() as tg:
        for i in range(len(calls)):
            tg.start_soon(run, i)
    return results


async def test_a_shared_statement_reports_each_change(journal: SQLiteJournal) -> None:
    """One statement for many changes of one shape, some of which do not apply: each
    caller learns its own outcome, and only applied changes get a history line."""
    rows = [await journal.insert(make_row()) for _ in range(40)]
    changes = [claim(row) for row in rows]
    for change in changes[1::2]:
        change.version += 1  # stale: must not apply
    before = journal.commits
    results = await _together(*(lambda c=c: journal.apply(c) for c in changes))
    assert journal.commits - before == 1
    assert results == [True, False] * 20
    for row, done in zip(rows, results, strict=True):
        stored = await journal.get(row.id)
        assert stored is not None
        assert stored.status is (R if done else P)
        assert len(await journal.history(row.id)) == (2 if done else 1)


async def test_more_operations_than_one_statement_holds(journal: SQLiteJournal) -> None:
    journal._max_rows = 8  # so that 50 operations need several statements (and padding)
    rows = [make_row() for _ in range(50)]
    assert await _together(*(lambda r=r: journal.insert(r) for r in rows)) == rows
    results = await _together(*(lambda r=r: journal.apply(claim(r)) for r in rows[:45]))
    assert results == [True] * 45
    counts = await journal.counts()
    assert (counts[P], counts[R]) == (5, 45)
    for row in rows:
        assert len(await journal.history(row.id)) == (2 if row in rows[:45] else 1)


@pytest.mark.parametrize("size", [1, 3, 9, 13, 65, 70, 300])
async def test_padding_rows_are_never_stored(journal: SQLiteJournal, size: int) -> None:
    rows = [make_row() for _ in range(size)]
    await _together(*(lambda r=r: journal.insert(r) for r in rows))
    done = await _together(
        *(lambda r=r: journal.apply(finish(r, TaskStatus.CANCELLED)) for r in rows)
    )
    assert done == [True] * size
    assert (await journal.counts())[TaskStatus.CANCELLED] == size
    assert await journal.counts_by_queue() == {("default", TaskStatus.CANCELLED): size}
    assert journal._wconn is not None
    lines = journal._wconn.execute("SELECT count(*), count(DISTINCT task_id) FROM history")
    assert lines.fetchone() == (2 * size, size)
    tasks = journal._wconn.execute("SELECT count(*) FROM tasks").fetchone()
    assert tasks == (size,)


async def test_values_reach_sqlite_exactly_on_the_shared_path(journal: SQLiteJournal) -> None:
    odd = [
        make_row(queue="a\x00b", args_json='["\\u0000", "é"]', scheduled_at=1e300),
        make_row(options_json="\u2028", created_at=0.1 + 0.2, priority=-(2**63)),
        make_row(max_attempts=2**63 - 1, scheduled_at=5e-324),
    ]
    assert await _together(*(lambda r=r: journal.insert(r) for r in odd)) == odd
    for row in odd:
        assert await journal.get(row.id) == row
    changes = [claim(row) for row in odd]
    changes[0].fields["lease_until"] = 1.0000000000000002
    changes[1].fields["owner"] = "o\x00wner"
    assert await _together(*(lambda c=c: journal.apply(c) for c in changes)) == [True] * 3
    stored = await journal.get(odd[0].id)
    assert stored is not None
    assert stored.lease_until == 1.0000000000000002
    stored = await journal.get(odd[1].id)
    assert stored is not None
    assert stored.owner == "o\x00wner"


async def test_a_value_sqlite_cannot_bind_fails_only_its_change(journal: SQLiteJournal) -> None:
    rows = [await journal.insert(make_row()) for _ in range(6)]
    changes = [claim(row) for row in rows]
    changes[2].fields["attempts"] = 2**64  # too big for SQLite
    results = await _together(*(lambda c=c: journal.apply(c) for c in changes))
    assert isinstance(results[2], OverflowError)  # as binding it alone raises it
    assert results[:2] + results[3:] == [True] * 5
    assert await journal.get(rows[2].id) == rows[2]


async def test_one_task_twice_in_a_batch(journal: SQLiteJournal) -> None:
    """A second operation on a task the batch already wrote sees the first one's effect
    (the batch is built by hand here: callers started together may join in any order)."""
    row, other = make_row(), make_row()
    running = dataclasses.replace(row, status=R, version=1, attempts=1, owner=OWNER)

    def change(c: Change) -> _Apply:
        return _Apply(c, _Shape(tuple(c.fields), c.source, c.target))

    ops = [
        _Insert(row),
        change(claim(row)),
        _Insert(other),
        change(finish(running)),
        change(claim(other)),
        change(finish(running)),
    ]
    await anyio.to_thread.run_sync(journal._write_batch, ops)
    assert [op.error for op in ops] == [None] * len(ops)
    assert [op.result for op in ops] == [row, True, other, True, True, False]
    stored = await journal.get(row.id)
    assert stored is not None
    assert (stored.status, stored.version) == (C, 2)
    assert [(h.source, h.target) for h in await journal.history(row.id)] == [
        (None, P), (P, R), (R, C),
    ]  # fmt: skip
    assert [(h.source, h.target) for h in await journal.history(other.id)] == [
        (None, P), (P, R),
    ]  # fmt: skip


# --------------------------------------------------------------------------- apply_soon


async def test_apply_soon_settles_before_the_batch_wakes_its_waiters(
    journal: SQLiteJournal,
) -> None:
    """``apply_soon``: the caller does not wait; its outcome is settled on the event loop
    once the batch committed, before any caller waiting on that batch resumes."""
    rows = [await applied(journal, claim(await journal.insert(make_row()))) for _ in range(3)]
    settled: list[tuple[str, bool, BaseException | None]] = []
    order: list[str] = []

    def settle(label: str) -> Callable[[bool, BaseException | None], None]:
        return lambda ok, error: settled.append((label, ok, error)) or order.append(label)

    async def waiter() -> None:
        await journal.insert(make_row())  # a caller that waits on the same batch
        order.append("waiter")

    blocker = sqlite3.connect(journal.path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # holds the batch before ours in its thread
        async with anyio.create_task_group() as tg:
            tg.start_soon(journal.insert, make_row())  # that earlier batch, stuck
            await anyio.sleep(0.05)
            tg.start_soon(waiter)  # leads the next batch, which waits for the earlier one
            await anyio.sleep(0.05)
            # both join the waiter's open batch: no awaitable, nothing to wait for
            assert journal.apply_soon(finish(rows[0], result_json="1"), settle("good")) is None
            stale = dataclasses.replace(rows[1], version=0)  # another writer moved it on
            assert journal.apply_soon(finish(stale, result_json="2"), settle("stale")) is None
            assert settled == []
            blocker.execute("ROLLBACK")
    finally:
        blocker.close()
    assert settled == [("good", True, None), ("stale", False, None)]
    assert order.index("good") < order.index("waiter")
    done = await journal.get(rows[0].id)
    assert done is not None
    assert (done.status, done.result_json) == (TaskStatus.COMPLETED, "1")
    untouched = await journal.get(rows[1].id)
    assert untouched is not None
    assert untouched.status is TaskStatus.RUNNING

    # a call that finds no open batch must lead one: it returns the awaitable that does
    lead = journal.apply_soon(finish(rows[2]), settle("alone"))
    assert lead is not None
    assert settled[-1] != ("alone", True, None)
    await lead
    assert settled[-1] == ("alone", True, None)


async def test_apply_soon_reports_a_failed_batch_to_settle(tmp_path: Path) -> None:
    journal = SQLiteJournal(tmp_path / "j.db", busy_timeout=0.2)
    await journal.open(OWNER)
    try:
        row = await applied(journal, claim(await journal.insert(make_row())))
        outcome: list[tuple[bool, BaseException | None]] = []
        blocker = sqlite3.connect(tmp_path / "j.db", isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            lead = journal.apply_soon(finish(row), lambda ok, error: outcome.append((ok, error)))
            assert lead is not None  # no batch was open: this call leads one
            await lead  # does not raise: the failure goes to settle
        finally:
            blocker.close()
        [(ok, error)] = outcome
        assert ok is False
        assert isinstance(error, JournalError)
        assert "locked" in str(error)
        still = await journal.get(row.id)
        assert still is not None
        assert still.status is TaskStatus.RUNNING  # nothing of the batch was stored
    finally:
        await journal.close()


async def test_values_that_look_like_the_null_stand_ins_are_stored_as_given(
    journal: SQLiteJournal,
) -> None:
    """The hot paths bind 0 (text columns) and '' (real columns) where they mean NULL,
    turned back by NULLIF in the SQL (``sqlite._batch._NULL_AS``): a real "0", 0.0 or "" must
    come back as it went in, on the set-based path (several rows in one batch) and the
    one-by-one path (a keyed insert), and a NULL stays NULL."""
    plain = [make_row(options_json="0") for _ in range(3)]
    keyed = [make_row(key="0"), make_row(key="")]
    async with anyio.create_task_group() as tg:  # one batch
        for row in plain + keyed:
            tg.start_soon(journal.insert, row)
    for row in plain + keyed:
        stored = await journal.get(row.id)
        assert stored is not None
        assert (stored.key, stored.options_json) == (row.key, row.options_json)
        assert (stored.owner, stored.started_at, stored.result_json) == (None, None, None)

    def start(row: TaskRow) -> Change:
        fields = {"attempts": 1, "owner": "0", "lease_until": 0.0, "started_at": 0.0}
        return Change(row.id, 0, P, R, 1, 0.0, "0", fields)

    async with anyio.create_task_group() as tg:
        for row in plain:
            tg.start_soon(journal.apply, start(row))
    running = [await journal.get(row.id) for row in plain]
    for row in running:
        assert row is not None
        assert (row.status, row.owner, row.lease_until, row.started_at) == (R, "0", 0.0, 0.0)
    done = [finish(row, result_json="0", progress_json="") for row in running if row is not None]
    async with anyio.create_task_group() as tg:
        for change in done:
            tg.start_soon(journal.apply, change)
    for row in plain:
        stored = await journal.get(row.id)
        assert stored is not None
        assert (stored.status, stored.result_json, stored.error_json) == (C, "0", None)
        assert (stored.progress_json, stored.owner, stored.lease_until) == ("", None, None)
        lines = await journal.history(row.id)
        assert [(h.source, h.target, h.owner) for h in lines] == [
            (None, P, None),
            (P, R, "0"),
            (R, C, "0"),
        ]


claimed_row = JournalContract.claimed_row  # a row as submit makes it for insert_claimed


@pytest.mark.parametrize("rowids", ["consecutive", "random"])
async def test_rows_claimed_as_submitted_are_stored_with_both_history_lines(
    journal: SQLiteJournal, rowids: str
) -> None:
    """Claimed inserts take a short path: one INSERT binding only what varies, and their
    history lines made by SQLite from the new rows, found by rowid. When SQLite hands out
    random rowids (the table once held the largest one), that lookup no longer finds
    them all: the batch is replayed one operation at a time, with the same result."""
    if rowids == "random":
        first = await journal.insert(make_row())
        with sqlite3.connect(journal.path) as conn:
            conn.execute("UPDATE tasks SET rowid = 9223372036854775807 WHERE id = ?", (first.id,))
    rows = [
        claimed_row(),
        claimed_row(options_json='{"timeout": 5}', owner="0"),
        claimed_row(lease_until=None, args_json="[0]"),
    ]
    async with anyio.create_task_group() as tg:  # one batch
        for row in rows:
            tg.start_soon(journal.insert_claimed, row)
    for row in rows:
        stored = await journal.get(row.id)
        assert stored == row  # every column, NULLs included
        lines = await journal.history(row.id)
        assert [(h.source, h.target, h.attempt, h.owner) for h in lines] == [
            (None, P, 0, row.owner),
            (P, R, 1, row.owner),
        ]
        assert [h.at.timestamp() for h in lines] == pytest.approx([row.created_at, row.started_at])
