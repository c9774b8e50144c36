"""The SQLite journal's schema: the migrations that make and upgrade a journal file, the
columns a row is read and written with, and the statements that only read them.

``prepare`` runs on the write connection at open: it checks that the file is a journal
(or empty) and not newer than this code, sets it up (WAL, the sync mode, the page
cache) and migrates it, in one ``BEGIN IMMEDIATE`` transaction.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Final

from ..._errors import JournalError
from .._sql import (
    COLUMNS,
    HISTORY_SELECT,
    LIVE_SQL,
    TERMINAL_SQL,
    check_schema,
    waiting_by_queue_sql,
)

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "prepare"]

#: Forward migrations: ``MIGRATIONS[n]`` takes a journal from schema version n to n + 1.
#: Each is a list of statements run in one ``BEGIN IMMEDIATE`` transaction. Never edit a
#: released entry: append a new one (``ALTER TABLE ... ADD COLUMN``, a new index, ...).
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        "CREATE TABLE meta (key TEXT PRIMARY KEY NOT NULL, value) WITHOUT ROWID",
        "INSERT INTO meta (key, value) VALUES ('rev', 0)",
        """CREATE TABLE tasks (
            id TEXT PRIMARY KEY NOT NULL,
            name TEXT NOT NULL,
            queue TEXT NOT NULL,
            status TEXT NOT NULL,
            priority INTEGER NOT NULL,
            args_json TEXT NOT NULL,
            kwargs_json TEXT NOT NULL,
            key TEXT,
            attempts INTEGER NOT NULL,
            max_attempts INTEGER NOT NULL,
            created_at REAL NOT NULL,
            scheduled_at REAL NOT NULL,
            options_json TEXT,
            recoveries INTEGER NOT NULL DEFAULT 0,
            started_at REAL,
            finished_at REAL,
            result_json TEXT,
            error_json TEXT,
            progress_json TEXT,
            owner TEXT,
            lease_until REAL,
            cancel_requested INTEGER NOT NULL DEFAULT 0,
            version INTEGER NOT NULL DEFAULT 0,
            rev INTEGER NOT NULL,
            writer TEXT
        )""",
        "CREATE INDEX tasks_rev ON tasks (rev)",
        "CREATE INDEX tasks_status ON tasks (status, id)",
        "CREATE UNIQUE INDEX tasks_live_key ON tasks (key)"
        " WHERE key IS NOT NULL AND status IN ('pending', 'running', 'retrying')",
        "CREATE INDEX tasks_finished ON tasks (finished_at) WHERE finished_at IS NOT NULL",
        """CREATE TABLE history (
            task_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            source TEXT,
            target TEXT NOT NULL,
            attempt INTEGER NOT NULL,
            at REAL NOT NULL,
            owner TEXT,
            error_json TEXT,
            PRIMARY KEY (task_id, seq)
        ) WITHOUT ROWID""",
    ),
    # 1 -> 2, flow control: a task's lock and partition, whether its queue's limits are
    # journal-wide, the recent starts of rate-limited shared queues. The indexes hold
    # only flow-controlled rows (partial), so a plain task's writes never touch them.
    (
        "ALTER TABLE tasks ADD COLUMN lock TEXT",
        "ALTER TABLE tasks ADD COLUMN partition TEXT",
        "ALTER TABLE tasks ADD COLUMN shared INTEGER NOT NULL DEFAULT 0",
        "CREATE INDEX tasks_shared_running ON tasks (queue, partition)"
        " WHERE shared = 1 AND status = 'running'",
        "CREATE INDEX tasks_lock ON tasks (lock, status, priority, id) WHERE lock IS NOT NULL",
        "CREATE TABLE starts (queue TEXT NOT NULL, at REAL NOT NULL)",
        "CREATE INDEX starts_queue_at ON starts (queue, at)",
    ),
    # 2 -> 3, periodic tasks: one row per name, advanced by a conditional UPDATE (on
    # version) in the same transaction as the task of the tick it fires.
    (
        """CREATE TABLE periodic (
            name TEXT PRIMARY KEY NOT NULL,
            schedule TEXT NOT NULL,
            last_tick REAL NOT NULL,
            next_tick REAL NOT NULL,
            task_id TEXT,
            version INTEGER NOT NULL
        ) WITHOUT ROWID""",
    ),
)

#: The schema version this code writes; a journal with a newer one is refused at open.
SCHEMA_VERSION: Final = len(MIGRATIONS)

_SELECT: Final = "SELECT " + ", ".join(COLUMNS) + " FROM tasks"
_RETURNING: Final = " RETURNING " + ", ".join(COLUMNS)

_HISTORY_NAMES: Final = (
    "task_id",
    "seq",
    "source",
    "target",
    "attempt",
    "at",
    "owner",
    "error_json",
)
_HISTORY_COLUMNS: Final = ", ".join(_HISTORY_NAMES)
_LIVE_KEY: Final = _SELECT + f" WHERE key = ? AND status IN {LIVE_SQL}"
_BUMP_REV: Final = "UPDATE meta SET value = value + 1 WHERE key = 'rev' RETURNING value"
_READ_REV: Final = "SELECT value FROM meta WHERE key = 'rev'"

#: The reads ``SQLJournal`` runs (see there). None needs an index of its own.
_SQL: Final = {
    "select": _SELECT,
    "get": _SELECT + " WHERE id = ?",
    "history": HISTORY_SELECT + " FROM history WHERE task_id = ? ORDER BY seq",
    "expired": _SELECT + " WHERE status = 'running' AND lease_until < ? ORDER BY id",
    "counts": "SELECT status, count(*) FROM tasks GROUP BY status",
    "counts_by_queue": "SELECT queue, status, count(*) FROM tasks GROUP BY queue, status",
    "finished_since": "SELECT status, count(*) FROM tasks INDEXED BY tasks_finished"
    f" WHERE finished_at >= ? AND finished_at IS NOT NULL AND status IN {TERMINAL_SQL}"
    " GROUP BY status",
    "oldest": _SELECT + " WHERE status = ? ORDER BY id LIMIT 1",
    "waiting_by_queue": waiting_by_queue_sql("tasks", "?"),
    "periodic": "SELECT name, schedule, last_tick, next_tick, task_id, version FROM periodic"
    " ORDER BY name",
}

#: Page cache per connection, in KiB (negative: SQLite's unit for "KiB, not pages").
_CACHE_KIB: Final = -16384


#: Bytes the WAL keeps after a checkpoint (``journal_size_limit``).
_WAL_LIMIT: Final = 8 * 1024 * 1024


def prepare(
    conn: sqlite3.Connection,
    *,
    where: str,
    synchronous: str,
    begin: Callable[[sqlite3.Connection], None],
) -> None:
    """Check, then (only if it is ours and not newer) configure and migrate."""
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    check_schema(
        where, _schema_version(conn, tables), tables, known=SCHEMA_VERSION, holder="the file"
    )
    if tables:  # read all of it before the first write: a damaged file is left as it was
        found = [r[0] for r in conn.execute("PRAGMA quick_check(5)")]
        if found != ["ok"]:
            raise JournalError(
                f"cannot open journal {where}: the database file is corrupt"
                f" ({'; '.join(map(str, found))})"
            )
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise JournalError(f"cannot open journal {where}: WAL mode is not available ({mode})")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    conn.execute(f"PRAGMA cache_size = {_CACHE_KIB}")
    # The WAL shrinks back to this after each checkpoint, so that it cannot keep the
    # space of a burst (on a small disk, a WAL that kept it filled the disk for good).
    conn.execute(f"PRAGMA journal_size_limit = {_WAL_LIMIT}")
    # A write transaction even when there is nothing to migrate: it proves now, and
    # not at the first submit, that this file can be written. Rolled back if unused.
    begin(conn)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        version = _schema_version(conn, tables)
        # again: another process may have upgraded (or written) it meanwhile
        check_schema(where, version, tables, known=SCHEMA_VERSION, holder="the file")
        version = version or 0
        if version == SCHEMA_VERSION:
            conn.execute("UPDATE meta SET value = value WHERE key = 'rev'")
            conn.execute("ROLLBACK")
            return
        for script in MIGRATIONS[version:]:
            for statement in script:
                conn.execute(statement)
        conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
            (SCHEMA_VERSION,),
        )
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _schema_version(conn: sqlite3.Connection, tables: set[str]) -> int | None:
    if "meta" not in tables:
        return None
    found = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return None if found is None else int(found[0])
