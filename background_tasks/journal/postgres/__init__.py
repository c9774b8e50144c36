"""The PostgreSQL journal: one database shared by managers on many machines.

``PostgresJournal`` implements the same contract as ``SQLiteJournal`` (the reference:
``background_tasks.journal.sqlite``) with psycopg 3, which this package needs: install
the extra ``anyio-background-tasks[postgres]`` (without psycopg, importing it raises
ImportError saying so). ``background_tasks.postgres`` re-exports it.

This module is the journal (connections, batches, reads); ``_schema`` holds the
migrations, the columns and the statements, ``_ops`` the write operations, and
``_listen`` the LISTEN/NOTIFY wake-ups.

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

from ..._extras import missing_extra

try:
    import psycopg
except ImportError as exc:  # pragma: no cover (psycopg is installed for the tests)
    raise missing_extra("background_tasks.postgres", "postgres", exc) from exc

import builtins
import contextlib
import re
import time
from collections.abc import Callable, Sequence
from operator import attrgetter
from typing import Any, Final, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread
import psycopg.errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ..._errors import InvalidTransition, JournalError
from .._group_commit import GroupCommit
from .._protocol import (
    Change,
    ClockedJournal,
    InspectableJournal,
    LivenessJournal,
    NotifyingJournal,
    PeriodicJournal,
    PeriodicRow,
    TaskRow,
)
from .._sql import (
    CLEARS_CANCEL,
    COLUMNS,
    Op,
    SQLJournal,
    check_batch,
    check_fields,
    check_seconds,
    close_all,
    limit_conditions,
    not_open,
    to_row,
)
from ._listen import Listener
from ._ops import (
    OPS,
    _AdvancePeriodic,
    _Apply,
    _Insert,
    _InsertMany,
    _LimitedApply,
    _Op,
    _Tx,
    advisory_key,
)
from ._schema import (
    _COLS,
    _HISTORY_CONFLICT,
    CHANNEL,
    MIGRATIONS,
    SCHEMA_VERSION,
    prepare,
    statements,
)

__all__ = ["CHANNEL", "MAX_BATCH", "MIGRATIONS", "SCHEMA_VERSION", "PostgresJournal"]

_T = TypeVar("_T")

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


#: The advisory-lock namespace of owners' presence locks ("bg"); the other key is a hash
#: of the owner id.
_PRESENCE: Final = 0x6267
#: Seconds this journal's own presence lock must have been held before it judges other
#: owners: after a server restart every session is gone at once, and the live owners
#: need a moment to take their locks again.
_SETTLE: Final = 2.0


class PostgresJournal(
    SQLJournal,
    NotifyingJournal,
    InspectableJournal,
    LivenessJournal,
    ClockedJournal,
    PeriodicJournal,
):
    """A journal in a PostgreSQL schema, shared by every manager that opens it.

    ``dsn`` is a libpq connection string or URI (``postgresql://user:pw@host/db``);
    ``schema`` is the schema holding the tables (created on first open; one schema = one
    journal). ``connect_timeout`` bounds each connection attempt and ``lock_timeout``
    how long a write waits for a row another transaction holds before ``JournalError``.
    Errors name the DSN without its password.
    """

    lease_timeout: float
    _mark = "%s"
    _ops = OPS

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
        check_seconds(
            lease_timeout=lease_timeout, connect_timeout=connect_timeout, lock_timeout=lock_timeout
        )
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
        self._sql = statements('"' + schema + '"')
        self._owner = ""
        self._wconn: psycopg.Connection[Any] | None = None
        self._rconn: psycopg.Connection[Any] | None = None
        self._read_lock: anyio.Lock | None = None
        self._commits = GroupCommit(self._write_batch, MAX_BATCH)
        #: apply's statements by (field names, clears the cancel request, lease_before)
        self._sql_cache: dict[tuple[tuple[str, ...], bool, bool], str] = {}
        self._listener: Listener | None = None  # LISTEN, on a connection of its own
        #: a session that holds this owner's advisory lock while the journal is open
        self._pconn: psycopg.Connection[Any] | None = None
        self._present_since = 0.0  # monotonic time the lock was (last) taken
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

    def _connect(self, setup: str | None = None) -> psycopg.Connection[Any]:
        """A new autocommit connection that ran ``setup`` (worker thread)."""
        conn = psycopg.connect(
            self.dsn,
            autocommit=True,
            connect_timeout=max(2, round(self.connect_timeout)),
            application_name="background_tasks",
        )
        if setup is not None:
            try:
                conn.execute(setup)
            except BaseException:
                conn.close()
                raise
        return conn

    def _connect_writer(self) -> psycopg.Connection[Any]:
        return self._connect(f"SET lock_timeout = {round(self.lock_timeout * 1000)}")

    def _writer(self) -> psycopg.Connection[Any]:
        """The writer connection, connected again if it broke (worker thread)."""
        conn = self._wconn
        if conn is None:
            raise not_open(self.where)
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
        self._listener = Listener(lambda: self._connect(f"LISTEN {CHANNEL}"), self.schema, owner)

    def _open_sync(self) -> tuple[psycopg.Connection[Any], psycopg.Connection[Any]]:
        wconn: psycopg.Connection[Any] | None = None
        rconn: psycopg.Connection[Any] | None = None
        try:
            wconn = self._connect_writer()
            prepare(wconn, self.schema, self.where)
            rconn = self._connect()
            self._hold_presence()
            return wconn, rconn
        except BaseException as exc:
            close_all((rconn, wconn), psycopg.Error)
            if isinstance(exc, psycopg.Error):
                raise JournalError(
                    f"cannot open journal {self.where}: {self._reason(exc)}"
                ) from exc
            raise

    async def close(self) -> None:
        listener, self._listener = self._listener, None
        lconn = None if listener is None else await listener.stop()  # ends a wait first
        await self._commits.drain()
        conns = (lconn, self._rconn, self._wconn, self._pconn)
        self._wconn = self._rconn = self._pconn = None
        self._commits.reset()
        if all(c is None for c in conns):
            return
        read_lock = self._read_lock
        with anyio.CancelScope(shield=True):
            if read_lock is not None:
                await read_lock.acquire()
            try:
                await anyio.to_thread.run_sync(close_all, conns, psycopg.Error)
            finally:
                if read_lock is not None:
                    read_lock.release()

    # ------------------------------------------------------------------ the server's clock

    async def now(self) -> float:
        """The server's clock: what every manager on this database measures due times
        and record times on, whatever its own machine's clock says."""
        [(value,)] = await self._fetch("SELECT extract(epoch FROM clock_timestamp())::float8")
        return float(value)

    # ------------------------------------------------------------------ liveness

    #: no grace beyond ``_SETTLE``: a session that is gone is a dead owner
    orphan_grace = 0.5

    def _hold_presence(self) -> None:
        """This owner's advisory lock, on a session of its own, taken again on a new
        session if the old one is gone (worker thread)."""
        conn = self._pconn
        if conn is not None and not (conn.broken or conn.closed):
            try:
                conn.execute("SELECT 1")
                return
            except psycopg.Error:
                pass
        if conn is not None:
            conn.close()
        self._pconn = None
        conn = self._connect()
        try:
            conn.execute(self._sql["presence"], (_PRESENCE, self._owner))
        except BaseException:
            conn.close()
            raise
        self._pconn = conn
        self._present_since = time.monotonic()

    async def orphaned(self) -> builtins.list[TaskRow]:
        """RUNNING rows whose owner's session no longer holds its advisory lock. Nothing
        until this journal's own lock has been held for ``_SETTLE`` seconds."""
        self._require_open()
        try:
            await anyio.to_thread.run_sync(self._hold_presence)
        except psycopg.Error as exc:
            raise JournalError(f"cannot read journal {self.where}: {self._reason(exc)}") from exc
        if time.monotonic() - self._present_since < _SETTLE:
            return []
        found = await self._fetch(self._sql["orphaned"], (self._owner, _PRESENCE))
        return [to_row(r) for r in found]

    # ------------------------------------------------------------------ writing

    def _require_open(self) -> None:
        if self._wconn is None:
            raise not_open(self.where)

    async def _write(self, op: Op) -> Any:
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
                    self._lock_counts(conn, ops)
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
        self._lock_counts(conn, ops)
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

    @staticmethod
    def _lock_counts(conn: psycopg.Connection[Any], ops: list[_Op]) -> None:
        """First in a transaction with counted claims: their advisory locks, in one
        order for every manager (no deadlock), held until the commit."""
        keys = sorted({k for op in ops if isinstance(op, _LimitedApply) for k in op.keys})
        for key in keys:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (key,))

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

    async def insert_many(self, rows: Sequence[TaskRow]) -> builtins.list[TaskRow]:
        """``Journal.insert_many``: one operation of a batch (so of one transaction), two
        statements (the rows from one array per column, then their history lines)."""
        batch = check_batch(rows)
        if not batch:
            return []
        result: list[TaskRow] = await self._write(_InsertMany(batch))
        return result

    async def advance_periodic(self, state: PeriodicRow, row: TaskRow | None) -> bool:
        """``PeriodicJournal.advance_periodic``: a conditional UPDATE (or the first
        INSERT) of the periodic row, then the tick's task, in the batch's transaction."""
        result: bool = await self._write(_AdvancePeriodic(state, row))
        return result

    async def apply(self, change: Change) -> bool:
        if change.limits is not None:
            return await self._apply_limited(change)
        fields = change.fields
        names = tuple(fields)
        clear = change.target in CLEARS_CANCEL and "cancel_requested" not in fields
        key = (names, clear, change.lease_before is not None)
        sql = self._sql_cache.get(key)
        if sql is None:
            check_fields(names)
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

    async def _apply_limited(self, change: Change) -> bool:
        """A claim with ``ClaimLimits``: one statement that claims only if the limits
        hold, records a rate's start, and otherwise says which limit refused it."""
        fields, limits, c = change.fields, change.limits, change
        assert limits is not None
        check_fields(tuple(fields))
        t, s = f'"{self.schema}".tasks', f'"{self.schema}".starts'
        conditions = limit_conditions(
            limits, c.task_id, c.at, tasks=t, starts=s, mark="%s", true="true",
            same="IS NOT DISTINCT FROM",
        )  # fmt: skip
        clear = c.target in CLEARS_CANCEL and "cancel_requested" not in fields
        sets = "".join(f", {n} = %s" for n in fields)
        lease = c.lease_before is not None
        where = "".join(f" AND {cond}" for _, cond, _ in conditions)
        whens = "".join(f" WHEN NOT ({cond}) THEN '{why}'" for why, cond, _ in conditions)
        cond_params = [p for _, _, values in conditions for p in values]
        source = c.source.value
        rate = limits.rate is not None
        sql = (
            f"WITH u AS (UPDATE {t} SET status = %s, version = version + 1, writer = %s{sets}"
            + (", cancel_requested = false" if clear else "")
            + " WHERE id = %s AND version = %s AND status = %s"
            + (" AND lease_until < %s" if lease else "")
            + f"{where} RETURNING {_COLS}),"
            f' h AS (INSERT INTO "{self.schema}".history SELECT id, version, %s, status,'
            f" %s, %s, %s, %s FROM u{_HISTORY_CONFLICT})"
            + (
                f", r AS (INSERT INTO {s} (queue, at) SELECT %s, %s FROM u),"
                f" d AS (DELETE FROM {s} WHERE queue = %s AND at <= %s)"
                if rate
                else ""
            )
            + f" SELECT {_COLS}, NULL::text FROM u UNION ALL"
            + f" SELECT {', '.join('t.' + n for n in COLUMNS)}, CASE{whens} ELSE 'race' END"
            f" FROM {t} t WHERE t.id = %s AND t.version = %s AND t.status = %s"
            " AND NOT EXISTS (SELECT 1 FROM u)"
        )
        params: list[Any] = [c.target.value, self._owner, *fields.values(), c.task_id, c.version]
        params.append(source)
        if lease:
            params.append(c.lease_before)
        params += cond_params
        params += [source, c.attempt, c.at, c.owner, fields.get("error_json")]
        if rate:
            params += [limits.queue, c.at, limits.queue, c.at - limits.period]
        params += cond_params
        params += [c.task_id, c.version, source]
        keys = []
        if limits.lock is not None:
            keys.append(advisory_key(self.schema, "lock", limits.lock))
        if limits.limit is not None or rate:
            keys.append(advisory_key(self.schema, "queue", limits.queue))
        elif limits.per_partition is not None:
            keys.append(advisory_key(self.schema, f"partition:{limits.queue}", limits.partition))
        result: TaskRow | None = await self._write(_LimitedApply(change, sql, params, keys))
        return result is not None

    # ------------------------------------------------------------------ reading

    async def _read(self, fn: Callable[[psycopg.Cursor[Any]], _T]) -> _T:
        self._require_open()
        assert self._read_lock is not None
        async with self._read_lock:
            if self._rconn is None:
                raise not_open(self.where)
            return await anyio.to_thread.run_sync(self._read_sync, fn)

    def _read_sync(self, fn: Callable[[psycopg.Cursor[Any]], _T]) -> _T:
        for attempt in (1, 2):
            conn = self._rconn
            try:
                if conn is None:
                    raise not_open(self.where)
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

    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> builtins.list[Any]:
        return await self._read(lambda cur: cur.execute(sql, params).fetchall())

    def _rows_and_rev(
        self, cur: psycopg.Cursor[Any], sql: str, params: Callable[[int], Sequence[Any]]
    ) -> tuple[builtins.list[TaskRow], int]:
        """The counter first, then the rows: every rev up to it is visible (docstring)."""
        found = cur.execute(self._sql["read_rev"]).fetchone()
        rev = 0 if found is None else int(found[0])
        return [to_row(r) for r in cur.execute(sql, params(rev))], rev

    async def runnable(self) -> tuple[builtins.list[TaskRow], int]:
        sql = self._sql["runnable"]
        return await self._read(lambda cur: self._rows_and_rev(cur, sql, lambda rev: ()))

    async def changes(self, since: int, exclude_owner: str) -> tuple[builtins.list[TaskRow], int]:
        sql = self._sql["changes"]

        def read(cur: psycopg.Cursor[Any]) -> tuple[builtins.list[TaskRow], int]:
            rows, rev = self._rows_and_rev(cur, sql, lambda rev: (since, rev, exclude_owner))
            return rows, max(rev, since)

        return await self._read(read)

    # ------------------------------------------------------------------ NotifyingJournal

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
        assert self._listener is not None
        await self._listener.wait(timeout)


def _rollback(conn: psycopg.Connection[Any] | None) -> None:
    if conn is not None and not conn.broken and not conn.closed:
        with contextlib.suppress(psycopg.Error):
            conn.execute("ROLLBACK")
