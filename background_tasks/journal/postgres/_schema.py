"""The PostgreSQL journal's schema: the migrations that make and upgrade it, the columns
a row is read and written with, and every statement of the journal but ``apply``'s
(``statements``, for one schema name).

``prepare`` runs on the writer connection at open, under an advisory lock so that
concurrent openers migrate once: it checks that the schema is a journal's (or empty)
and not newer than this code, and migrates it.
"""

from __future__ import annotations

import contextlib
from typing import Any, Final

import psycopg

from .._sql import (
    COLUMNS,
    HISTORY_SELECT,
    LIVE_SQL,
    TERMINAL_SQL,
    check_schema,
    waiting_by_queue_sql,
)

__all__ = ["CHANNEL", "MIGRATIONS", "SCHEMA_VERSION", "prepare", "statements"]

#: The LISTEN/NOTIFY channel; the payload is ``"<schema> <owner>"``.
CHANNEL: Final = "background_tasks"

#: Forward migrations: ``MIGRATIONS[n]`` takes a schema from version n to n + 1. ``@``
#: stands for the quoted schema name. Each runs in one transaction, under an advisory
#: lock, so concurrent openers migrate once. Never edit a released entry: append.
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        "CREATE TABLE @.meta (key text PRIMARY KEY, value bigint NOT NULL)",
        "INSERT INTO @.meta (key, value) VALUES ('rev', 0)",
        """CREATE TABLE @.tasks (
            id text COLLATE "C" PRIMARY KEY,
            name text NOT NULL,
            queue text NOT NULL,
            status text NOT NULL,
            priority bigint NOT NULL,
            args_json text NOT NULL,
            kwargs_json text NOT NULL,
            key text,
            attempts bigint NOT NULL,
            max_attempts bigint NOT NULL,
            created_at double precision NOT NULL,
            scheduled_at double precision NOT NULL,
            options_json text,
            recoveries bigint NOT NULL DEFAULT 0,
            started_at double precision,
            finished_at double precision,
            result_json text,
            error_json text,
            progress_json text,
            owner text,
            lease_until double precision,
            cancel_requested boolean NOT NULL DEFAULT false,
            version bigint NOT NULL DEFAULT 0,
            rev bigint NOT NULL,
            writer text
        )""",
        "CREATE INDEX tasks_rev ON @.tasks (rev)",
        "CREATE INDEX tasks_status ON @.tasks (status, id)",
        "CREATE UNIQUE INDEX tasks_live_key ON @.tasks (key)"
        " WHERE key IS NOT NULL AND status IN ('pending', 'running', 'retrying')",
        "CREATE INDEX tasks_finished ON @.tasks (finished_at) WHERE finished_at IS NOT NULL",
        # tasks_ready served claim_next, which is gone; dropping it takes a migration.
        "CREATE INDEX tasks_ready ON @.tasks (priority DESC, id)"
        " WHERE status IN ('pending', 'retrying')",
        "CREATE INDEX tasks_running ON @.tasks (owner, lease_until) WHERE status = 'running'",
        """CREATE TABLE @.history (
            task_id text COLLATE "C" NOT NULL,
            seq bigint NOT NULL,
            source text,
            target text NOT NULL,
            attempt bigint NOT NULL,
            at double precision NOT NULL,
            owner text,
            error_json text,
            PRIMARY KEY (task_id, seq)
        )""",
    ),
    # 1 -> 2, flow control (see the SQLite journal's migration 2).
    (
        "ALTER TABLE @.tasks ADD COLUMN lock text",
        "ALTER TABLE @.tasks ADD COLUMN partition text",
        "ALTER TABLE @.tasks ADD COLUMN shared boolean NOT NULL DEFAULT false",
        "CREATE INDEX tasks_shared_running ON @.tasks (queue, partition)"
        " WHERE shared AND status = 'running'",
        "CREATE INDEX tasks_lock ON @.tasks (lock, status, priority, id) WHERE lock IS NOT NULL",
        "CREATE TABLE @.starts (queue text NOT NULL, at double precision NOT NULL)",
        "CREATE INDEX starts_queue_at ON @.starts (queue, at)",
    ),
    # 2 -> 3, periodic tasks (see the SQLite journal's migration 3).
    (
        """CREATE TABLE @.periodic (
            name text COLLATE "C" PRIMARY KEY,
            schedule text NOT NULL,
            last_tick double precision NOT NULL,
            next_tick double precision NOT NULL,
            task_id text,
            version bigint NOT NULL
        )""",
    ),
)

#: The schema version this code writes; a schema with a newer one is refused at open.
SCHEMA_VERSION: Final = len(MIGRATIONS)

_COLS: Final = ", ".join(COLUMNS)


_HISTORY_CONFLICT: Final = (
    " ON CONFLICT (task_id, seq) DO UPDATE SET source = excluded.source,"
    " target = excluded.target, attempt = excluded.attempt, at = excluded.at,"
    " owner = excluded.owner, error_json = excluded.error_json"
)


#: Each column's type, for the arrays ``insert_many`` sends (one per column).
_TYPES: Final = {
    "priority": "bigint", "attempts": "bigint", "max_attempts": "bigint",
    "recoveries": "bigint", "version": "bigint", "created_at": "float8",
    "scheduled_at": "float8", "started_at": "float8", "finished_at": "float8",
    "lease_until": "float8", "cancel_requested": "boolean", "shared": "boolean",
}  # fmt: skip
_HISTORY_TYPES: Final = ("text", "bigint", "text", "text", "bigint", "float8", "text", "text")


def statements(s: str) -> dict[str, str]:
    """Every statement of the journal but ``apply``'s, by name, for the schema ``s`` (quoted)."""
    returning = " RETURNING " + _COLS
    sql = {
        "insert": f"INSERT INTO @.tasks ({_COLS}, rev, writer)"
        f" VALUES ({', '.join(['%s'] * len(COLUMNS))}, 0, %s)",
        # insert_many: every row in one statement, from one array per column.
        "insert_rows": f"INSERT INTO @.tasks ({_COLS}, rev, writer) SELECT u.*, 0, %s FROM"
        " unnest(" + ", ".join(f"%s::{_TYPES.get(c, 'text')}[]" for c in COLUMNS) + ") AS u",
        "insert_history_rows": "INSERT INTO @.history SELECT * FROM unnest("
        + ", ".join(f"%s::{t}[]" for t in _HISTORY_TYPES)
        + ")",
        "live_key": f"SELECT {_COLS} FROM @.tasks WHERE key = %s AND status IN {LIVE_SQL}",
        "insert_history": "INSERT INTO @.history VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
        + _HISTORY_CONFLICT,
        "request_cancel": "UPDATE @.tasks SET cancel_requested = true, writer = %s"
        " WHERE id = %s AND status = 'running'" + returning,
        "set_progress": "UPDATE @.tasks SET progress_json = %s"
        " WHERE id = %s AND status = 'running' AND owner = %s AND version = %s",
        "renew": "UPDATE @.tasks SET lease_until = %s WHERE status = 'running' AND owner = %s"
        " AND NOT (id = ANY(%s))",
        "purge": "DELETE FROM @.tasks WHERE id IN (SELECT id FROM @.tasks"
        f" WHERE finished_at < %s AND status IN {TERMINAL_SQL} LIMIT %s FOR UPDATE SKIP LOCKED)"
        " RETURNING id",
        "purge_history": "DELETE FROM @.history WHERE task_id = ANY(%s)",
        # The last statement of a write transaction: see the module docstring.
        "bump": "WITH r AS (UPDATE @.meta SET value = value + 1 WHERE key = 'rev'"
        " RETURNING value), t AS (UPDATE @.tasks SET rev = (SELECT value FROM r)"
        " WHERE id = ANY(%s)) SELECT value, pg_notify(%s, %s) FROM r",
        "read_rev": "SELECT value FROM @.meta WHERE key = 'rev'",
        "select": f"SELECT {_COLS} FROM @.tasks",
        "get": f"SELECT {_COLS} FROM @.tasks WHERE id = %s",
        "runnable": f"SELECT {_COLS} FROM @.tasks WHERE status IN ('pending', 'retrying')"
        " ORDER BY priority DESC, id",
        "changes": f"SELECT {_COLS} FROM @.tasks WHERE rev > %s AND rev <= %s"
        " AND (writer IS NULL OR writer <> %s) ORDER BY rev, id",
        "history": HISTORY_SELECT + " FROM @.history WHERE task_id = %s ORDER BY seq",
        "counts": "SELECT status, count(*) FROM @.tasks GROUP BY status",
        "expired": f"SELECT {_COLS} FROM @.tasks"
        " WHERE status = 'running' AND lease_until < %s ORDER BY id",
        # An owner is alive while its session holds its advisory lock (``presence``).
        "presence": "SELECT pg_try_advisory_lock(%s, hashtext(%s) & 2147483647)",
        "orphaned": f"SELECT {_COLS} FROM @.tasks t"
        " WHERE status = 'running' AND owner IS NOT NULL AND owner <> %s AND NOT EXISTS"
        " (SELECT 1 FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted"
        " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        " AND l.classid = %s::oid AND l.objid = (hashtext(t.owner) & 2147483647)::oid"
        " AND l.objsubid = 2) ORDER BY id",
        "counts_by_queue": "SELECT queue, status, count(*) FROM @.tasks GROUP BY queue, status",
        "finished_since": "SELECT status, count(*) FROM @.tasks"
        f" WHERE finished_at >= %s AND status IN {TERMINAL_SQL} GROUP BY status",
        "oldest": f"SELECT {_COLS} FROM @.tasks WHERE status = %s ORDER BY id LIMIT 1",
        "waiting_by_queue": waiting_by_queue_sql("@.tasks", "%s"),
        "periodic": "SELECT name, schedule, last_tick, next_tick, task_id, version"
        " FROM @.periodic ORDER BY name",
        "periodic_first": "INSERT INTO @.periodic"
        " (name, schedule, last_tick, next_tick, task_id, version)"
        " VALUES (%s, %s, %s, %s, %s, 1) ON CONFLICT (name) DO NOTHING RETURNING version",
        "periodic_advance": "UPDATE @.periodic SET schedule = %s, last_tick = %s,"
        " next_tick = %s, task_id = %s, version = version + 1"
        " WHERE name = %s AND version = %s RETURNING version",
    }
    insert_keyed = sql["insert"] + (
        f" ON CONFLICT (key) WHERE key IS NOT NULL AND status IN {LIVE_SQL} DO NOTHING"
    )
    sql["insert_keyed"] = insert_keyed + " RETURNING id"
    return {k: v.replace("@.", s + ".") for k, v in sql.items()}


def prepare(conn: psycopg.Connection[Any], schema: str, where: str) -> None:
    """Check the schema, then (only if it is ours and not newer) migrate it."""
    s = schema
    conn.execute("BEGIN")
    try:
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"{CHANNEL}:schema:{s}",))
        found = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (s,)).fetchone()
        tables = {
            r[0]
            for r in conn.execute(
                "SELECT c.relname FROM pg_class c JOIN pg_namespace n"
                " ON n.oid = c.relnamespace WHERE n.nspname = %s"
                " AND c.relkind IN ('r', 'p', 'v', 'm', 'f')",
                (s,),
            )
        }
        version: int | None = None
        if "meta" in tables:
            got = conn.execute(
                f"SELECT value FROM \"{s}\".meta WHERE key = 'schema_version'"
            ).fetchone()
            version = None if got is None else int(got[0])
        check_schema(where, version, tables, known=SCHEMA_VERSION, holder="the schema")
        if version == SCHEMA_VERSION:
            conn.execute("ROLLBACK")
            return
        if found is None:
            conn.execute(f'CREATE SCHEMA "{s}"')
        for script in MIGRATIONS[version or 0 :]:
            for statement in script:
                conn.execute(statement.replace("@.", f'"{s}".'))
        conn.execute(
            f"INSERT INTO \"{s}\".meta (key, value) VALUES ('schema_version', %s)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (SCHEMA_VERSION,),
        )
        conn.execute("COMMIT")
    except BaseException:
        if not conn.broken and not conn.closed:
            with contextlib.suppress(psycopg.Error):
                conn.execute("ROLLBACK")
        raise
