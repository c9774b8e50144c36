"""The SQLite journal's schema: the migrations that make and upgrade a journal file, the
columns a row is read and written with, and the statements that only read them.

``prepare`` runs on the write connection at open: it checks that the file is a journal
(or empty) and not newer than this code, sets it up (WAL, the sync mode, the page
cache) and migrates it, in one ``BEGIN IMMEDIATE`` transaction.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Callable
from operator import attrgetter
from typing import Any, Final

from ..._errors import JournalError
from ..._states import TaskStatus
from .._protocol import TaskRow

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
)

#: The schema version this code writes; a journal with a newer one is refused at open.
SCHEMA_VERSION: Final = len(MIGRATIONS)

_COLUMNS: Final = tuple(f.name for f in dataclasses.fields(TaskRow))
_SELECT: Final = "SELECT " + ", ".join(_COLUMNS) + " FROM tasks"
_RETURNING: Final = " RETURNING " + ", ".join(_COLUMNS)

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
_LIVE_KEY: Final = _SELECT + " WHERE key = ? AND status IN ('pending', 'running', 'retrying')"
_EXPIRED: Final = _SELECT + " WHERE status = 'running' AND lease_until < ? ORDER BY id"
_BUMP_REV: Final = "UPDATE meta SET value = value + 1 WHERE key = 'rev' RETURNING value"
_READ_REV: Final = "SELECT value FROM meta WHERE key = 'rev'"
_TERMINAL: Final = "('completed', 'failed', 'cancelled')"
_LIVE: Final = frozenset({TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.RETRYING})

#: Fields a Change may set: every TaskRow attribute but the ones the journal owns.
_SETTABLE: Final = frozenset(_COLUMNS) - {"id", "status", "version"}
_CLEARS_CANCEL: Final = frozenset(
    {
        TaskStatus.PENDING,
        TaskStatus.RETRYING,
        TaskStatus.COMPLETED,
        TaskStatus.FAILED,
        TaskStatus.CANCELLED,
    }
)
_STATUS: Final = {s.value: s for s in TaskStatus}
_row_values: Final = attrgetter(*_COLUMNS)
_STATUS_INDEX: Final = _COLUMNS.index("status")

#: Page cache per connection, in KiB (negative: SQLite's unit for "KiB, not pages").
_CACHE_KIB: Final = -16384


def _to_row(r: Any) -> TaskRow:
    return TaskRow(
        r[0], r[1], r[2], _STATUS[r[3]], r[4], r[5], r[6], r[7], r[8], r[9], r[10], r[11],
        r[12], r[13], r[14], r[15], r[16], r[17], r[18], r[19], r[20], bool(r[21]), r[22],
    )  # fmt: skip


def prepare(
    conn: sqlite3.Connection,
    *,
    where: str,
    synchronous: str,
    begin: Callable[[sqlite3.Connection], None],
) -> None:
    """Check, then (only if it is ours and not newer) configure and migrate."""
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    version = _schema_version(conn, tables)
    if version is None and tables:
        raise JournalError(
            f"cannot open journal {where}: it is an SQLite database of something"
            f" else (tables {', '.join(sorted(tables))}), not a background_tasks journal"
        )
    if version is not None and version > SCHEMA_VERSION:
        raise JournalError(
            f"cannot open journal {where}: its schema version {version} is newer than"
            f" this version of background_tasks knows ({SCHEMA_VERSION}); upgrade"
            " background_tasks"
        )
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise JournalError(f"cannot open journal {where}: WAL mode is not available ({mode})")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    conn.execute(f"PRAGMA cache_size = {_CACHE_KIB}")
    # A write transaction even when there is nothing to migrate: it proves now, and
    # not at the first submit, that this file can be written. Rolled back if unused.
    begin(conn)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        version = _schema_version(conn, tables) or 0
        if version > SCHEMA_VERSION:  # another process upgraded meanwhile
            raise JournalError(
                f"cannot open journal {where}: its schema version {version} is newer"
                f" than this version of background_tasks knows ({SCHEMA_VERSION})"
            )
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
