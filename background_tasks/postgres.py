"""The PostgreSQL journal: one database shared by managers on many machines.

``PostgresJournal`` implements the same contract as ``SQLiteJournal`` (the reference:
``background_tasks/journal/sqlite.py``) with psycopg 3. Install it with the extra
``background-tasks[postgres]``.

Threads, not psycopg's asyncio API
    psycopg's ``AsyncConnection`` needs asyncio; this library also runs on trio. So every
    statement runs on a *blocking* psycopg connection in a worker thread
    (``anyio.to_thread.run_sync``), which works the same on every anyio backend and never
    blocks the event loop. Each role has its own connection, used by one thread at a
    time: the *writer* (group commits, one batch at a time), the *reader* (one query at
    a time, behind an ``anyio.Lock``) and, opened on first use, the *listener* (LISTEN).
    A thread hop per *batch* (not per operation: a group commit puts many operations in
    one) is small next to a commit's flush, and psycopg's own per-statement cost is the
    same in either API. The listener is the exception: it waits for
    notifications on the event loop (``anyio.wait_readable`` on the connection's socket,
    then libpq's ``consume_input``/``notifies``, exactly what psycopg's own ``notifies()``
    does), so a wait is cancellable at once and parks no thread.

Group commit (as in SQLite)
    Concurrent writes are appended to the open batch; its first caller leads it: it waits
    for the previous batch, then runs the whole batch in one transaction on the writer
    connection. An operation that fails on its own (a constraint, a value PostgreSQL
    cannot hold) does not fail the others: the batch is rolled back and replayed with a
    SAVEPOINT per operation. Inside a batch, operations on single rows run in task-id
    order and multi-row ones last, so two managers' batches lock rows in the same order
    and cannot deadlock on each other; a deadlock or serialization failure reported by
    the server anyway rolls the batch back and runs it again (nothing of it was stored).
    The fast path sends a batch in pipeline mode (``_PIPELINE``): with a database across a
    network, statements do not each wait a round trip. A connection that broke before
    COMMIT was sent is opened again and the batch rerun; broken during COMMIT, the
    outcome is unknown and the callers get ``JournalError``. Reads reconnect and retry.

The change cursor (``rev``), monotonic in commit order
    A plain sequence is not enough: a transaction can take rev 7, another rev 8 and
    commit first; a reader that saw 8 would then skip 7 forever. Here a write transaction
    assigns its rev as its *last* statement before COMMIT, by incrementing the ``rev`` row
    of the ``meta`` table (``UPDATE meta SET value = value + 1 ... RETURNING value``) and
    stamping that value on every row it wrote. The row lock on ``meta`` is held until the
    commit ends, so revs are handed out in commit order: the next writer's increment waits
    for this commit and then reads its value. PostgreSQL makes a transaction visible
    before it releases its locks, so a snapshot that sees rev ``r`` committed also sees
    every rev below ``r``. Readers therefore read the counter first (``c``), then the rows
    with ``since < rev <= c`` in a later statement: every transaction with a rev up to
    ``c`` is visible to it, and rows rewritten since (rev above ``c``) come with the next
    poll. The counter is transactional, so ``runnable`` and ``changes`` never return a
    cursor beyond what they could see, and it keeps growing after ``purge``. The price is
    one short serialized section per commit (the increment, then COMMIT's flush), shared
    by a whole batch of operations.

Notifications
    Every transaction that advances the cursor also runs ``pg_notify('background_tasks',
    '<schema> <owner>')``, delivered at commit. ``wait_for_changes(timeout)`` returns early
    when a notification of *another* owner on *this* schema arrives, so a manager can poll
    ``changes`` rarely and still see a remote cancel or a new task within milliseconds.

Claiming, and ``SKIP LOCKED``
    ``apply`` claims a row with ``UPDATE ... WHERE id AND version AND status`` exactly like
    SQLite: a concurrent claimer waits for the other transaction and then fails the
    version check, so exactly one wins. ``reclaim`` and ``purge`` select with ``FOR UPDATE
    SKIP LOCKED``, so two reclaimers never fight, and a row whose owner is writing it
    right now is left alone.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import re
import time
from collections.abc import Callable, Sequence
from operator import attrgetter
from typing import Any, Final, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread
import psycopg
import psycopg.errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ._errors import InvalidTransition, JournalError
from ._models import ErrorInfo, TransitionRecord, utc
from ._states import TaskStatus
from .journal._group_commit import GroupCommit, purge_in_steps
from .journal._protocol import Change, InspectableJournal, NotifyingJournal, TaskRow

__all__ = ["CHANNEL", "SCHEMA_VERSION", "PostgresJournal"]

_T = TypeVar("_T")

#: The LISTEN/NOTIFY channel; the payload is ``"<schema> <owner>"``.
CHANNEL: Final = "background_tasks"

# --------------------------------------------------------------------------- schema

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
)

#: The schema version this code writes; a schema with a newer one is refused at open.
SCHEMA_VERSION: Final = len(MIGRATIONS)

_COLUMNS: Final = tuple(f.name for f in dataclasses.fields(TaskRow))
_COLS: Final = ", ".join(_COLUMNS)
_STATUS: Final = {s.value: s for s in TaskStatus}
_row_values: Final = attrgetter(*_COLUMNS)
_STATUS_INDEX: Final = _COLUMNS.index("status")
_LIVE: Final = "('pending', 'running', 'retrying')"
_TERMINAL: Final = "('completed', 'failed', 'cancelled')"

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

#: Operations in one transaction at most (the batch is bounded; later ones wait).
MAX_BATCH: Final = 1000
#: Whether the fast path sends a batch's statements in pipeline mode.
_PIPELINE = True
#: Times a batch is run again after a deadlock or serialization failure.
_RETRIES: Final = 5

#: Errors that belong to one operation (its values or a constraint), not to the batch.
_OP_ERRORS: Final = (
    psycopg.IntegrityError,
    psycopg.DataError,
    psycopg.ProgrammingError,
    OverflowError,
    TypeError,
    ValueError,
)

_SCHEMA_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_PASSWORD_KV: Final = re.compile(r"\bpassword\s*=\s*(?:'(?:[^'\\]|\\.)*'|\S*)")


def _to_row(r: Sequence[Any]) -> TaskRow:
    return TaskRow(
        r[0], r[1], r[2], _STATUS[r[3]], r[4], r[5], r[6], r[7], r[8], r[9], r[10], r[11],
        r[12], r[13], r[14], r[15], r[16], r[17], r[18], r[19], r[20], r[21], r[22],
    )  # fmt: skip


def _redact(dsn: str) -> tuple[str, str | None]:
    """The DSN without its password (URI or ``key=value`` form), and the password."""
    params = conninfo_to_dict(dsn)
    password = params.pop("password", None)
    password = None if password is None else str(password)
    if "://" not in dsn:
        shown = _PASSWORD_KV.sub("", dsn).strip()
        shown = re.sub(r"\s+", " ", shown)
        if conninfo_to_dict(shown) != params:  # keep the user's order when that is exact
            shown = make_conninfo(**params)  # type: ignore[arg-type]
        return shown, password
    scheme, _, rest = dsn.partition("://")
    before, question, query = rest.partition("?")
    netloc, slash, path = before.partition("/")
    if "@" in netloc:
        user, _, hosts = netloc.rpartition("@")
        netloc = user.partition(":")[0] + "@" + hosts
    kept = [p for p in query.split("&") if p.partition("=")[0] != "password"]
    query = "&".join(kept)
    return f"{scheme}://{netloc}{slash}{path}{question if query else ''}{query}", password


# --------------------------------------------------------------------------- operations


class _Tx:
    """What operations share while their batch runs (in the worker thread)."""

    __slots__ = ("cur", "history", "inserts", "j", "pending", "touched")

    def __init__(
        self, cur: psycopg.Cursor[Any], journal: PostgresJournal, *, pipelined: bool
    ) -> None:
        self.cur = cur
        self.j = journal
        self.history: list[tuple[Any, ...]] = []
        self.inserts: list[tuple[Any, ...]] = []
        self.touched: list[str] = []  # ids whose rev this transaction sets
        #: applies sent in pipeline mode whose results are not read yet
        self.pending: list[tuple[_Apply, psycopg.Cursor[Any]]] | None = [] if pipelined else None

    def resolve(self) -> None:
        if self.pending:
            for op, cur in self.pending:
                op.result = op.done(self, cur.fetchone())
                cur.close()
            self.pending.clear()

    def flush(self) -> None:
        if self.inserts:
            self.cur.executemany(self.j._sql["insert"], self.inserts)
            self.inserts.clear()

    def flush_history(self) -> None:
        if self.history:
            self.cur.executemany(self.j._sql["insert_history"], self.history)
            self.history.clear()


class _Op:
    __slots__ = ("error", "result")
    #: whether the caller waits for the commit (False: progress, which may ride along)
    awaited = True
    #: whether the caller is woken before the others of the batch (see GroupCommit)
    first = False
    #: what to call once the batch ended, for a caller that does not wait
    settle: Callable[[Any], None] | None = None
    #: lock order inside a batch: inserts (0), single rows by id (1), many rows (2)
    rank = 2

    def __init__(self) -> None:
        self.result: Any = None
        self.error: BaseException | None = None

    @property
    def order(self) -> tuple[int, str]:
        return (self.rank, "")

    def run(self, tx: _Tx) -> Any:
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__.strip("_").lower()


class _Insert(_Op):
    __slots__ = ("row",)
    rank = 0

    def __init__(self, row: TaskRow) -> None:
        super().__init__()
        self.row = row

    @property
    def order(self) -> tuple[int, str]:
        return (0, self.row.key or "")

    def describe(self) -> str:
        return f"insert task {self.row.id}"

    def run(self, tx: _Tx) -> TaskRow:
        row = self.row
        values = list(_row_values(row))
        values[_STATUS_INDEX] = row.status.value
        values.append(tx.j._owner)
        if row.key is None:
            tx.inserts.append(tuple(values))
        else:
            tx.flush()
            sql = tx.j._sql
            while True:  # a live task with the key may finish between the two statements
                if tx.cur.execute(sql["insert_keyed"], values).fetchone() is not None:
                    break
                live = tx.cur.execute(sql["live_key"], (row.key,)).fetchone()
                if live is not None:
                    return _to_row(live)
        tx.touched.append(row.id)
        tx.history.append(
            (row.id, row.version, None, row.status.value, row.attempts, row.created_at,
             row.owner, row.error_json)
        )  # fmt: skip
        return row


class _Apply(_Op):
    __slots__ = ("change", "params", "sql")
    rank = 1
    first = True

    def __init__(self, change: Change, sql: str, params: list[Any]) -> None:
        super().__init__()
        self.change = change
        self.sql = sql
        self.params = params

    @property
    def order(self) -> tuple[int, str]:
        return (1, self.change.task_id)

    def describe(self) -> str:
        c = self.change
        return f"apply {c.source.value}->{c.target.value} to task {c.task_id}"

    def run(self, tx: _Tx) -> TaskRow | None:
        tx.flush()
        c = self.change
        source = c.source.value
        if c.lease_before is None:
            params: tuple[Any, ...] = (
                c.target.value, tx.j._owner, *self.params, c.task_id, c.version, source,
                source, c.attempt, c.at, c.owner, c.fields.get("error_json"),
            )  # fmt: skip
        else:  # the statement has one more condition: lease_until < %s
            params = (
                c.target.value, tx.j._owner, *self.params, c.task_id, c.version, source,
                c.lease_before, source, c.attempt, c.at, c.owner, c.fields.get("error_json"),
            )  # fmt: skip
        if tx.pending is not None:  # pipelined: the result is read by tx.resolve()
            cur = tx.cur.connection.cursor()
            cur.execute(self.sql, params)
            tx.pending.append((self, cur))
            return None
        return self.done(tx, tx.cur.execute(self.sql, params).fetchone())

    def done(self, tx: _Tx, found: Sequence[Any] | None) -> TaskRow | None:
        if found is None:
            return None
        tx.touched.append(self.change.task_id)
        return _to_row(found)


class _RequestCancel(_Op):
    __slots__ = ("task_id",)
    rank = 1

    def __init__(self, task_id: str) -> None:
        super().__init__()
        self.task_id = task_id

    @property
    def order(self) -> tuple[int, str]:
        return (1, self.task_id)

    def run(self, tx: _Tx) -> TaskRow | None:
        tx.flush()
        found = tx.cur.execute(tx.j._sql["request_cancel"], (tx.j._owner, self.task_id)).fetchone()
        if found is None:
            return None
        tx.touched.append(self.task_id)
        return _to_row(found)


class _SetProgress(_Op):
    __slots__ = ("params",)
    awaited = False
    rank = 1

    def __init__(self, params: tuple[Any, ...]) -> None:
        super().__init__()
        self.params = params

    @property
    def order(self) -> tuple[int, str]:
        return (1, self.params[1])

    def run(self, tx: _Tx) -> None:
        tx.flush()
        tx.cur.execute(tx.j._sql["set_progress"], self.params)


class _Renew(_Op):
    __slots__ = ("lease_until", "owner")

    def __init__(self, owner: str, lease_until: float) -> None:
        super().__init__()
        self.owner = owner
        self.lease_until = lease_until

    def run(self, tx: _Tx) -> int:
        tx.flush()
        return tx.cur.execute(tx.j._sql["renew"], (self.lease_until, self.owner)).rowcount


class _Reclaim(_Op):
    __slots__ = ("max_recoveries", "now")

    def __init__(self, now: float, max_recoveries: int) -> None:
        super().__init__()
        self.now = now
        self.max_recoveries = max_recoveries

    def run(self, tx: _Tx) -> list[TaskRow]:
        tx.flush()
        sql, cur, writer = tx.j._sql, tx.cur, tx.j._owner
        rows: list[TaskRow] = []
        for task_id, version, recoveries, owner, cancel_requested in cur.execute(
            sql["expired"], (self.now,)
        ).fetchall():
            error: str | None
            if cancel_requested:  # a cancel asked for before its owner died: honour it
                target, finished_at, error = TaskStatus.CANCELLED, self.now, None
            elif recoveries + 1 > self.max_recoveries:
                target, finished_at = TaskStatus.FAILED, self.now
                error = ErrorInfo(
                    type="background_tasks.TaskInterrupted",
                    message=(
                        f"the task was interrupted {recoveries + 1} times, more than"
                        f" max_recoveries={self.max_recoveries}: its process stopped or"
                        f" crashed while running it (last owner {owner!r})"
                    ),
                ).model_dump_json()
            else:
                target, finished_at, error = TaskStatus.PENDING, None, None
            found = cur.execute(
                sql["reclaim"], (target.value, writer, finished_at, error, task_id, version)
            ).fetchone()
            if found is not None:
                row = _to_row(found)
                rows.append(row)
                tx.touched.append(task_id)
                tx.history.append(
                    (task_id, row.version, TaskStatus.RUNNING.value, target.value,
                     row.attempts, self.now, writer, error)
                )  # fmt: skip
        return rows


class _PurgeStep(_Op):
    __slots__ = ("batch", "older_than")

    def __init__(self, older_than: float, batch: int) -> None:
        super().__init__()
        self.older_than = older_than
        self.batch = batch

    def run(self, tx: _Tx) -> int:
        tx.flush()
        sql = tx.j._sql
        ids = [r[0] for r in tx.cur.execute(sql["purge"], (self.older_than, self.batch))]
        if ids:
            tx.cur.execute(sql["purge_history"], (ids,))
        return len(ids)


_HISTORY_CONFLICT: Final = (
    " ON CONFLICT (task_id, seq) DO UPDATE SET source = excluded.source,"
    " target = excluded.target, attempt = excluded.attempt, at = excluded.at,"
    " owner = excluded.owner, error_json = excluded.error_json"
)


def _statements(s: str) -> dict[str, str]:
    returning = " RETURNING " + _COLS
    sql = {
        "insert": f"INSERT INTO @.tasks ({_COLS}, rev, writer)"
        f" VALUES ({', '.join(['%s'] * len(_COLUMNS))}, 0, %s)",
        "live_key": f"SELECT {_COLS} FROM @.tasks WHERE key = %s AND status IN {_LIVE}",
        "insert_history": "INSERT INTO @.history VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
        + _HISTORY_CONFLICT,
        "request_cancel": "UPDATE @.tasks SET cancel_requested = true, writer = %s"
        " WHERE id = %s AND status = 'running'" + returning,
        "set_progress": "UPDATE @.tasks SET progress_json = %s"
        " WHERE id = %s AND status = 'running' AND owner = %s AND version = %s",
        "renew": "UPDATE @.tasks SET lease_until = %s WHERE status = 'running' AND owner = %s",
        "expired": "SELECT id, version, recoveries, owner, cancel_requested FROM @.tasks"
        " WHERE status = 'running' AND lease_until < %s ORDER BY id FOR UPDATE SKIP LOCKED",
        "reclaim": "UPDATE @.tasks SET status = %s, version = version + 1, writer = %s,"
        " recoveries = recoveries + 1, owner = NULL, lease_until = NULL,"
        " cancel_requested = false, finished_at = coalesce(%s, finished_at),"
        " error_json = coalesce(%s, error_json)"
        " WHERE id = %s AND version = %s AND status = 'running'" + returning,
        "purge": "DELETE FROM @.tasks WHERE id IN (SELECT id FROM @.tasks"
        f" WHERE finished_at < %s AND status IN {_TERMINAL} LIMIT %s FOR UPDATE SKIP LOCKED)"
        " RETURNING id",
        "purge_history": "DELETE FROM @.history WHERE task_id = ANY(%s)",
        # The last statement of a write transaction: see the module docstring.
        "bump": "WITH r AS (UPDATE @.meta SET value = value + 1 WHERE key = 'rev'"
        " RETURNING value), t AS (UPDATE @.tasks SET rev = (SELECT value FROM r)"
        " WHERE id = ANY(%s)) SELECT value, pg_notify(%s, %s) FROM r",
        "read_rev": "SELECT value FROM @.meta WHERE key = 'rev'",
        "get": f"SELECT {_COLS} FROM @.tasks WHERE id = %s",
        "runnable": f"SELECT {_COLS} FROM @.tasks WHERE status IN ('pending', 'retrying')"
        " ORDER BY priority DESC, id",
        "changes": f"SELECT {_COLS} FROM @.tasks WHERE rev > %s AND rev <= %s"
        " AND (writer IS NULL OR writer <> %s) ORDER BY rev, id",
        "history": "SELECT task_id, source, target, attempt, at, owner, error_json"
        " FROM @.history WHERE task_id = %s ORDER BY seq",
        "counts": "SELECT status, count(*) FROM @.tasks GROUP BY status",
        "expired_rows": f"SELECT {_COLS} FROM @.tasks"
        " WHERE status = 'running' AND lease_until < %s ORDER BY id",
        "counts_by_queue": "SELECT queue, status, count(*) FROM @.tasks GROUP BY queue, status",
        "finished_since": "SELECT status, count(*) FROM @.tasks"
        f" WHERE finished_at >= %s AND status IN {_TERMINAL} GROUP BY status",
        "oldest": f"SELECT {_COLS} FROM @.tasks WHERE status = %s ORDER BY id LIMIT 1",
    }
    insert_keyed = sql["insert"] + (
        f" ON CONFLICT (key) WHERE key IS NOT NULL AND status IN {_LIVE} DO NOTHING"
    )
    sql["insert_keyed"] = insert_keyed + " RETURNING id"
    return {k: v.replace("@.", s + ".") for k, v in sql.items()}


# --------------------------------------------------------------------------- the journal


class PostgresJournal(NotifyingJournal, InspectableJournal):
    """A journal in a PostgreSQL schema, shared by every manager that opens it.

    ``dsn`` is a libpq connection string or URI (``postgresql://user:pw@host/db``);
    ``schema`` is the schema holding the tables (created on first open; one schema = one
    journal). ``connect_timeout`` bounds each connection attempt and ``lock_timeout``
    how long a write waits for a row another transaction holds before ``JournalError``.
    Errors name the DSN without its password.
    """

    lease_timeout: float

    def __init__(
        self,
        dsn: str,
        *,
        lease_timeout: float = 30.0,
        schema: str = "background_tasks",
        connect_timeout: float = 10.0,
        lock_timeout: float = 10.0,
    ) -> None:
        if not isinstance(dsn, str):
            raise ValueError(f"dsn must be a str, not {type(dsn).__name__}")
        try:
            safe, password = _redact(dsn)
        except (psycopg.Error, ValueError) as exc:
            raise ValueError(
                "dsn is not a PostgreSQL connection string: expected"
                " 'postgresql://user@host:port/dbname' or 'host=... dbname=...'"
            ) from (None if "password" in dsn else exc)
        for name, value in (
            ("lease_timeout", lease_timeout),
            ("connect_timeout", connect_timeout),
            ("lock_timeout", lock_timeout),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number of seconds, not {value!r}")
            if not (0 < value < float("inf")):
                raise ValueError(f"{name} must be a positive finite number of seconds")
        if not isinstance(schema, str) or not _SCHEMA_NAME.fullmatch(schema):
            raise ValueError(
                f"schema must be a PostgreSQL identifier (letters, digits, underscores,"
                f" at most 63, not starting with a digit), not {schema!r}"
            )
        self.dsn = dsn
        self.safe_dsn = safe
        self._password = password
        self.schema = schema
        self.lease_timeout = float(lease_timeout)
        self.connect_timeout = float(connect_timeout)
        self.lock_timeout = float(lock_timeout)
        #: committed write transactions (group commit puts many operations in one)
        self.commits = 0
        self._sql = _statements('"' + schema + '"')
        self._owner = ""
        self._wconn: psycopg.Connection[Any] | None = None
        self._rconn: psycopg.Connection[Any] | None = None
        self._lconn: psycopg.Connection[Any] | None = None
        self._read_lock: anyio.Lock | None = None
        self._commits = GroupCommit(self._write_batch, MAX_BATCH)
        #: apply's statements by (field names, clears the cancel request, lease_before)
        self._sql_cache: dict[tuple[tuple[str, ...], bool, bool], str] = {}
        self._listening: anyio.CancelScope | None = None
        self._listen_done: anyio.Event | None = None
        self._wake: anyio.Event | None = None
        self._committing = False  # the writer thread sent COMMIT for the current batch

    def __repr__(self) -> str:
        state = "open" if self._wconn is not None else "closed"
        return f"<PostgresJournal {self.safe_dsn!r} schema={self.schema!r} {state}>"

    @property
    def where(self) -> str:
        """The DSN (without password) and schema, as error messages name them."""
        return f"{self.safe_dsn} (schema {self.schema})"

    def _reason(self, exc: BaseException) -> str:
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        text = lines[0] if lines else type(exc).__name__
        if self._password:
            text = text.replace(self._password, "***")
        return text

    # ------------------------------------------------------------------ connections

    def _connect(self) -> psycopg.Connection[Any]:
        """A new autocommit connection (worker thread)."""
        return psycopg.connect(
            self.dsn,
            autocommit=True,
            connect_timeout=max(2, round(self.connect_timeout)),
            application_name="background_tasks",
        )

    def _connect_writer(self) -> psycopg.Connection[Any]:
        conn = self._connect()
        try:
            conn.execute(f"SET lock_timeout = {round(self.lock_timeout * 1000)}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _writer(self) -> psycopg.Connection[Any]:
        """The writer connection, connected again if it broke (worker thread)."""
        conn = self._wconn
        if conn is None:
            raise JournalError(f"journal {self.where} is not open")
        if conn.broken or conn.closed:
            conn.close()
            conn = self._wconn = self._connect_writer()
        return conn

    # ------------------------------------------------------------------ lifecycle

    async def open(self, owner: str) -> None:
        if self._wconn is not None:
            raise RuntimeError(f"journal {self.where} is already open")
        self._owner = owner
        self._wconn, self._rconn = await anyio.to_thread.run_sync(self._open_sync)
        self._read_lock = anyio.Lock()
        self._wake = anyio.Event()

    def _open_sync(self) -> tuple[psycopg.Connection[Any], psycopg.Connection[Any]]:
        wconn: psycopg.Connection[Any] | None = None
        rconn: psycopg.Connection[Any] | None = None
        try:
            wconn = self._connect_writer()
            self._prepare(wconn)
            rconn = self._connect()
            return wconn, rconn
        except BaseException as exc:
            _close_all((rconn, wconn))
            if isinstance(exc, psycopg.Error):
                raise JournalError(
                    f"cannot open journal {self.where}: {self._reason(exc)}"
                ) from exc
            raise

    def _prepare(self, conn: psycopg.Connection[Any]) -> None:
        """Check the schema, then (only if it is ours and not newer) migrate it."""
        s = self.schema
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
            if version is None and tables:
                raise JournalError(
                    f"cannot open journal {self.where}: the schema holds tables of something"
                    f" else ({', '.join(sorted(tables))}), not a background_tasks journal"
                )
            if version is not None and version > SCHEMA_VERSION:
                raise JournalError(
                    f"cannot open journal {self.where}: its schema version {version} is"
                    f" newer than this version of background_tasks knows ({SCHEMA_VERSION});"
                    " upgrade background_tasks"
                )
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

    async def close(self) -> None:
        listening, done = self._listening, self._listen_done
        if listening is not None and done is not None:  # end a wait_for_changes first
            listening.cancel()
            with anyio.CancelScope(shield=True):
                await done.wait()
        await self._commits.drain()
        conns = (self._lconn, self._rconn, self._wconn)
        self._wconn = self._rconn = self._lconn = None
        self._commits.reset()
        if all(c is None for c in conns):
            return
        read_lock = self._read_lock
        with anyio.CancelScope(shield=True):
            if read_lock is not None:
                await read_lock.acquire()
            try:
                await anyio.to_thread.run_sync(_close_all, conns)
            finally:
                if read_lock is not None:
                    read_lock.release()

    # ------------------------------------------------------------------ writing

    def _require_open(self) -> None:
        if self._wconn is None:
            raise JournalError(f"journal {self.where} is not open")

    async def _write(self, op: _Op) -> Any:
        """Add ``op`` to the open batch, wait until its batch is committed, return its result."""
        self._require_open()
        return await self._commits.write(op)

    def _write_batch(self, ops: list[_Op]) -> None:
        """Run one batch in one transaction (worker thread)."""
        ops = sorted(ops, key=attrgetter("order"))  # one lock order for every manager
        conn: psycopg.Connection[Any] | None = None
        reconnected = False
        attempt = 0
        while True:
            self._committing = False
            try:
                conn = self._writer()
                if not self._run_batch(conn, ops, careful=False):
                    self._run_batch(conn, ops, careful=True)
                return
            except psycopg.errors.TransactionRollback as exc:  # deadlock, serialization
                _rollback(conn)
                attempt += 1
                if attempt > _RETRIES:
                    self._fail_all(ops, exc)
                    return
                time.sleep(0.001 * 2**attempt)
            except psycopg.OperationalError as exc:
                # A connection that broke before COMMIT was sent stored nothing: connect
                # again and run the batch once more. Broken during COMMIT, the outcome is
                # unknown, so the callers get the error.
                if conn is not None and conn.broken and not self._committing and not reconnected:
                    reconnected = True
                    continue
                _rollback(conn)
                self._fail_all(ops, exc)
                return
            except Exception as exc:
                _rollback(conn)
                self._fail_all(ops, exc)
                return

    def _fail_all(self, ops: list[_Op], exc: Exception) -> None:
        for op in ops:
            op.result = None
            if isinstance(exc, JournalError):
                op.error = exc
                continue
            error = JournalError(f"cannot write journal {self.where}: {self._reason(exc)}")
            error.__cause__ = exc
            op.error = error

    def _run_batch(self, conn: psycopg.Connection[Any], ops: list[_Op], *, careful: bool) -> bool:
        """One attempt at the batch; False if an operation failed on its own (fast path).

        ``careful`` wraps each operation in a SAVEPOINT so that a failing one is undone
        alone and gets its own error; the others still commit.
        """
        self._committing = False
        for op in ops:
            op.result = op.error = None
        cur = conn.cursor()
        pipelined = _PIPELINE and not careful
        tx = _Tx(cur, self, pipelined=pipelined)
        if not careful:
            # Pipeline mode: the statements of a batch go out without waiting for each
            # other's results: one round trip for them all (fewer if an operation needs a
            # result to go on), one for the rev stamp and COMMIT. Every error of the
            # operations surfaces at the first sync, before COMMIT is sent.
            try:
                with conn.pipeline() if pipelined else contextlib.nullcontext() as pipe:
                    conn.execute("BEGIN")
                    for op in ops:
                        op.result = op.run(tx)
                    tx.flush()
                    tx.flush_history()
                    if pipe is not None:
                        pipe.sync()
                    tx.resolve()
                    self._commit(conn, tx)
            except _OP_ERRORS:
                conn.execute("ROLLBACK")
                return False
            self.commits += 1
            return True
        conn.execute("BEGIN")
        for op in ops:
            conn.execute("SAVEPOINT op")
            touched = len(tx.touched)
            try:
                op.result = op.run(tx)
                tx.flush()
                tx.flush_history()
            except _OP_ERRORS as exc:
                conn.execute("ROLLBACK TO SAVEPOINT op")
                tx.inserts.clear()
                tx.history.clear()
                del tx.touched[touched:]
                op.result = None
                op.error = self._op_error(exc, op)
            conn.execute("RELEASE SAVEPOINT op")
        with conn.pipeline():
            self._commit(conn, tx)
        self.commits += 1
        return True

    def _commit(self, conn: psycopg.Connection[Any], tx: _Tx) -> None:
        if tx.touched:
            tx.cur.execute(self._sql["bump"], (tx.touched, CHANNEL, f"{self.schema} {self._owner}"))
        self._committing = True
        conn.execute("COMMIT")

    def _op_error(self, exc: BaseException, op: _Op) -> BaseException:
        if not isinstance(exc, psycopg.Error):
            return exc
        if isinstance(exc, psycopg.errors.UniqueViolation) and isinstance(op, _Apply):
            # A requeue whose key another unfinished task holds now: the same answer as
            # the in-memory manager and SQLite give.
            error: BaseException = InvalidTransition(
                f"another unfinished task holds the key of task {op.change.task_id}; it"
                f" cannot go back to {op.change.target.value}"
            )
            error.__cause__ = exc
            return error
        error = JournalError(f"cannot {op.describe()} in journal {self.where}: {self._reason(exc)}")
        error.__cause__ = exc
        return error

    async def insert(self, row: TaskRow) -> TaskRow:
        result: TaskRow = await self._write(_Insert(row))
        return result

    async def apply(self, change: Change) -> bool:
        fields = change.fields
        names = tuple(fields)
        clear = change.target in _CLEARS_CANCEL and "cancel_requested" not in fields
        key = (names, clear, change.lease_before is not None)
        sql = self._sql_cache.get(key)
        if sql is None:
            bad = [n for n in names if n not in _SETTABLE]
            if bad:
                raise ValueError(
                    f"Change.fields has names that are not settable TaskRow fields: {bad}"
                )
            sets = "".join(f", {n} = %s" for n in names)
            # One statement: the update and, if it matched, its history line.
            sql = (
                f'WITH u AS (UPDATE "{self.schema}".tasks SET status = %s,'
                " version = version + 1, writer = %s"
                + sets
                + (", cancel_requested = false" if clear else "")
                + " WHERE id = %s AND version = %s AND status = %s"
                + (" AND lease_until < %s" if key[2] else "")
                + f" RETURNING {_COLS}),"
                f' h AS (INSERT INTO "{self.schema}".history SELECT id, version, %s, status,'
                " %s, %s, %s, %s FROM u" + _HISTORY_CONFLICT + f") SELECT {_COLS} FROM u"
            )
            self._sql_cache[key] = sql
        result: TaskRow | None = await self._write(_Apply(change, sql, list(fields.values())))
        return result is not None

    async def request_cancel(self, task_id: str) -> TaskRow | None:
        result: TaskRow | None = await self._write(_RequestCancel(task_id))
        return result

    async def set_progress(
        self, task_id: str, owner: str, version: int, progress_json: str
    ) -> None:
        await self._write(_SetProgress((progress_json, task_id, owner, version)))

    async def renew(self, owner: str, lease_until: float) -> None:
        await self._write(_Renew(owner, lease_until))

    async def reclaim(self, now: float, max_recoveries: int) -> list[TaskRow]:
        """Deprecated, to be removed (see ``Journal.reclaim``)."""
        result: list[TaskRow] = await self._write(_Reclaim(now, max_recoveries))
        return result

    async def purge(self, older_than: float, batch: int = 1000) -> int:
        return await purge_in_steps(lambda: self._write(_PurgeStep(older_than, batch)), batch)

    # ------------------------------------------------------------------ reading

    async def _read(self, fn: Callable[[psycopg.Cursor[Any]], _T]) -> _T:
        self._require_open()
        assert self._read_lock is not None
        async with self._read_lock:
            if self._rconn is None:
                raise JournalError(f"journal {self.where} is not open")
            return await anyio.to_thread.run_sync(self._read_sync, fn)

    def _read_sync(self, fn: Callable[[psycopg.Cursor[Any]], _T]) -> _T:
        for attempt in (1, 2):
            conn = self._rconn
            try:
                if conn is None:
                    raise JournalError(f"journal {self.where} is not open")
                if conn.broken or conn.closed:  # reads are idempotent: reconnect, retry
                    conn.close()
                    conn = self._rconn = self._connect()
                with conn.cursor() as cur:
                    return fn(cur)
            except psycopg.Error as exc:
                if attempt == 1 and conn is not None and conn.broken:
                    continue
                raise JournalError(
                    f"cannot read journal {self.where}: {self._reason(exc)}"
                ) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def get(self, task_id: str) -> TaskRow | None:
        def read(cur: psycopg.Cursor[Any]) -> TaskRow | None:
            found = cur.execute(self._sql["get"], (task_id,)).fetchone()
            return None if found is None else _to_row(found)

        return await self._read(read)

    async def list(
        self,
        *,
        status: TaskStatus | None = None,
        queue: str | None = None,
        name: str | None = None,
        limit: int = 100,
    ) -> builtins.list[TaskRow]:
        where: builtins.list[str] = []
        params: builtins.list[Any] = []
        for column, value in (("status", status), ("queue", queue), ("name", name)):
            if value is not None:
                where.append(f"{column} = %s")
                params.append(value.value if isinstance(value, TaskStatus) else value)
        sql = f'SELECT {_COLS} FROM "{self.schema}".tasks'
        sql += (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id DESC LIMIT %s"
        params.append(limit)

        def read(cur: psycopg.Cursor[Any]) -> builtins.list[TaskRow]:
            return [_to_row(r) for r in cur.execute(sql, params)]

        return await self._read(read)

    async def history(self, task_id: str) -> builtins.list[TransitionRecord]:
        def read(cur: psycopg.Cursor[Any]) -> builtins.list[tuple[Any, ...]]:
            return cur.execute(self._sql["history"], (task_id,)).fetchall()

        return [
            TransitionRecord(
                task_id=tid,
                source=None if source is None else _STATUS[source],
                target=_STATUS[target],
                attempt=attempt,
                at=utc(at),
                owner=owner,
                error=None if error is None else ErrorInfo.model_validate_json(error),
            )
            for tid, source, target, attempt, at, owner, error in await self._read(read)
        ]

    def _rows_and_rev(
        self, cur: psycopg.Cursor[Any], sql: str, params: Callable[[int], Sequence[Any]]
    ) -> tuple[builtins.list[TaskRow], int]:
        """The counter first, then the rows: every rev up to it is visible (docstring)."""
        found = cur.execute(self._sql["read_rev"]).fetchone()
        rev = 0 if found is None else int(found[0])
        return [_to_row(r) for r in cur.execute(sql, params(rev))], rev

    async def expired(self, now: float) -> builtins.list[TaskRow]:
        def read(cur: psycopg.Cursor[Any]) -> builtins.list[TaskRow]:
            return [_to_row(r) for r in cur.execute(self._sql["expired_rows"], (now,))]

        return await self._read(read)

    async def runnable(self) -> tuple[builtins.list[TaskRow], int]:
        sql = self._sql["runnable"]
        return await self._read(lambda cur: self._rows_and_rev(cur, sql, lambda rev: ()))

    async def changes(self, since: int, exclude_owner: str) -> tuple[builtins.list[TaskRow], int]:
        sql = self._sql["changes"]

        def read(cur: psycopg.Cursor[Any]) -> tuple[builtins.list[TaskRow], int]:
            rows, rev = self._rows_and_rev(cur, sql, lambda rev: (since, rev, exclude_owner))
            return rows, max(rev, since)

        return await self._read(read)

    async def counts(self) -> dict[TaskStatus, int]:
        def read(cur: psycopg.Cursor[Any]) -> builtins.list[tuple[str, int]]:
            return cur.execute(self._sql["counts"]).fetchall()

        counts = dict.fromkeys(TaskStatus, 0)
        for status, n in await self._read(read):
            counts[_STATUS[status]] = n
        return counts

    # ------------------------------------------------------------------ InspectableJournal
    # For ``bgtasks status``; the same semantics as SQLite's. counts_by_queue reads the
    # whole table (an index on (queue, status) would cost every status change a write).

    async def counts_by_queue(self) -> dict[tuple[str, TaskStatus], int]:
        def read(cur: psycopg.Cursor[Any]) -> builtins.list[tuple[str, str, int]]:
            return cur.execute(self._sql["counts_by_queue"]).fetchall()

        return {(queue, _STATUS[status]): n for queue, status, n in await self._read(read)}

    async def finished_since(self, since: float) -> dict[TaskStatus, int]:
        def read(cur: psycopg.Cursor[Any]) -> builtins.list[tuple[str, int]]:
            return cur.execute(self._sql["finished_since"], (since,)).fetchall()

        counts = {s: 0 for s in TaskStatus if s.is_terminal}
        for status, n in await self._read(read):
            counts[_STATUS[status]] = n
        return counts

    async def oldest(self, status: TaskStatus) -> TaskRow | None:
        value = TaskStatus(status).value

        def read(cur: psycopg.Cursor[Any]) -> TaskRow | None:
            found = cur.execute(self._sql["oldest"], (value,)).fetchone()
            return None if found is None else _to_row(found)

        return await self._read(read)

    # ------------------------------------------------------------------ notifications

    async def wait_for_changes(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for another owner to write this journal.

        Returns early when a NOTIFY from another owner on this schema arrives (or arrived
        since the last call), and right after (re)establishing LISTEN, since changes made
        before could not be notified. Returning early is always safe: the caller polls
        ``changes`` next. One caller reads the socket; concurrent callers share its wake-up.
        """
        self._require_open()
        if timeout <= 0:
            await anyio.lowlevel.checkpoint()
            return
        with anyio.move_on_after(timeout):
            if self._listening is not None:
                assert self._wake is not None
                await self._wake.wait()
                return
            scope = self._listening = anyio.CancelScope()
            done = self._listen_done = anyio.Event()
            try:
                with scope:
                    await self._listen()
            finally:
                self._listening = self._listen_done = None
                done.set()
                wake, self._wake = self._wake, anyio.Event()
                if wake is not None:
                    wake.set()

    async def _listen(self) -> None:
        conn = self._lconn
        if conn is None or conn.broken or conn.closed:
            self._lconn = None
            try:
                self._lconn = await anyio.to_thread.run_sync(self._connect_listener, conn)
            except psycopg.Error:
                await anyio.sleep_forever()  # the server is away: wait out the timeout
            return
        pgconn, fd = conn.pgconn, conn.fileno()
        mine = f"{self.schema} {self._owner}"
        prefix = f"{self.schema} "
        while True:
            try:
                pgconn.consume_input()
                seen = False
                while (n := pgconn.notifies()) is not None:
                    payload = n.extra.decode()
                    if payload.startswith(prefix) and payload != mine:
                        seen = True
                if seen:
                    return
            except psycopg.Error:
                return  # broken: the next call connects again (and returns at once)
            await anyio.wait_readable(fd)

    def _connect_listener(self, old: psycopg.Connection[Any] | None) -> psycopg.Connection[Any]:
        if old is not None:
            old.close()
        conn = self._connect()
        try:
            conn.execute(f"LISTEN {CHANNEL}")
        except BaseException:
            conn.close()
            raise
        return conn


def _rollback(conn: psycopg.Connection[Any] | None) -> None:
    if conn is not None and not conn.broken and not conn.closed:
        with contextlib.suppress(psycopg.Error):
            conn.execute("ROLLBACK")


def _close_all(conns: Sequence[psycopg.Connection[Any] | None]) -> None:
    for conn in conns:
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()
