"""The SQLite journal: durable tasks in one file, shared by every process that opens it.

How a write travels (a submit returns once its row is committed; the README's
"Performance" section measures what this costs):

* A caller builds an operation object (``_Insert``, ``_Apply``, ...) on the event loop and
  appends it to the open *batch*. The first operation of a batch makes its caller the
  batch's *leader*; everyone else just waits on the batch's one ``anyio.Event``.
* The leader waits (shielded) until the previous batch is written, closes its batch (later
  operations open the next one, which is how many callers share one commit), and runs the
  whole batch in a worker thread on the write connection: ``BEGIN IMMEDIATE``, the
  operations, ``COMMIT``. Then it sets the batch's event and every waiter reads its own
  result from its operation.
* The operations are not written one statement each: all plain inserts of the batch go
  in one ``INSERT ... SELECT FROM (VALUES ...)``, all changes of one shape (fields,
  source, target) in one ``UPDATE ... FROM (VALUES ...)``, and every history line in one
  more INSERT (``_Writer``): a handful of sqlite3 calls per batch, each of which hands
  the GIL to the event loop and back, instead of several per operation. Rows claimed as
  they were submitted bind only the columns that vary, and SQLite makes their history
  lines from the new rows; NULLs go as cheaper stand-ins (``_NULL_AS``). Operations that
  must see the rows as they are (a keyed insert, a cancel request, a reclaim) first write
  what was collected.
* An operation that fails on its own (a constraint, a value SQLite cannot bind) must not
  fail the others: the batch is rolled back and replayed with one SAVEPOINT per
  operation, so only the guilty one gets the error. A failure of the transaction itself
  (disk full, I/O error, a lock held for longer than ``busy_timeout``) fails every
  operation of the batch with ``JournalError``; nothing of it was stored.

sqlite3 never runs on the event loop thread. Reads use a second connection, one at a time
(``anyio.Lock``), in a worker thread. The database is in WAL mode, so readers never wait
for the writer and the writer never waits for readers; writers of several processes take
turns through ``BEGIN IMMEDIATE`` and the busy timeout.

The change cursor (``rev``) is a counter kept in ``meta``, bumped once per write
transaction that needs it, under the write lock, so it only grows, across processes, and
even after ``purge`` deleted the newest rows. Every row written by that transaction gets
the new value: a reader's snapshot holds either all of a transaction's rows or none.

This module is the journal (connections, batches, reads); ``_schema`` holds the
migrations and the columns, ``_batch`` the set-based statements and the ``_Writer`` a
batch runs with, ``_ops`` the write operations.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import sqlite3
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from typing import Any, Final, Literal, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread

from ..._errors import InvalidTransition, JournalError
from ..._states import TaskStatus
from .._group_commit import GroupCommit
from .._protocol import (
    BatchingJournal,
    Change,
    ClaimingJournal,
    InspectableJournal,
    LivenessJournal,
    PeriodicJournal,
    PeriodicRow,
    TaskRow,
)
from .._sql import (
    COLUMNS,
    Op,
    SQLJournal,
    check_batch,
    check_seconds,
    close_all,
    not_open,
    to_row,
)
from ._batch import _MAX_ROWS, _SET_BASED, _Shape, _Writer
from ._ops import (
    OPS,
    _AdvancePeriodic,
    _Apply,
    _ApplySoon,
    _Insert,
    _InsertMany,
    _Op,
)
from ._owners import OwnerLocks
from ._schema import _BUMP_REV, _CACHE_KIB, _READ_REV, _SQL, MIGRATIONS, SCHEMA_VERSION, prepare

__all__ = ["MAX_BATCH", "MIGRATIONS", "SCHEMA_VERSION", "SQLiteJournal"]

_T = TypeVar("_T")

_SYNC: Final[dict[str, Literal["FULL", "NORMAL"]]] = {"FULL": "FULL", "NORMAL": "NORMAL"}

#: Operations in one transaction at most (the batch is bounded; later ones wait).
MAX_BATCH: Final = 2000

#: Errors that belong to one operation (its values or a constraint), not to the batch.
_OP_ERRORS: Final = (
    sqlite3.IntegrityError,
    sqlite3.InterfaceError,
    sqlite3.ProgrammingError,
    sqlite3.DataError,
    OverflowError,
    TypeError,
    ValueError,
)
_BUSY: Final = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})
_RUNNING_OWNERS: Final = (
    "SELECT DISTINCT owner FROM tasks WHERE status = 'running' AND owner IS NOT NULL AND owner != ?"
)


def _is_busy(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.OperationalError) and (
        (code is not None and code & 0xFF in _BUSY) or "locked" in str(exc)
    )


class SQLiteJournal(
    SQLJournal,
    ClaimingJournal,
    BatchingJournal,
    InspectableJournal,
    LivenessJournal,
    PeriodicJournal,
):
    """A journal in one SQLite file (WAL mode), safe to share between processes.

    ``synchronous="FULL"`` (the default) makes every acknowledged write survive a power
    loss; ``"NORMAL"`` is faster and still survives a crash of the process, but the last
    transactions before a power loss or OS crash may be lost. ``busy_timeout`` is how
    long a write waits for another process's transaction before ``JournalError``.
    ``create=False`` refuses a path that does not exist yet (for tools that only read).
    """

    lease_timeout: float
    #: an owner whose OS lock is free is dead: no grace (see ``_owners``)
    orphan_grace = 0.0
    _sql = _SQL
    _mark = "?"
    _ops = OPS

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        lease_timeout: float = 30.0,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
        busy_timeout: float = 10.0,
        create: bool = True,
    ) -> None:
        if not isinstance(path, str | os.PathLike):
            raise TypeError(f"path must be a str or os.PathLike, not {type(path).__name__}")
        text = os.fspath(path)
        if not isinstance(text, str):
            raise TypeError("path must be a text path, not bytes")
        if "\x00" in text:
            raise ValueError(f"path must not contain NUL characters, got {text!r}")
        if text in ("", ":memory:") or text.startswith("file:"):
            raise ValueError(
                f"path: {text!r} is not a file path; an in-memory database cannot be shared"
                " (use journal=None for an in-memory manager)"
            )
        check_seconds(lease_timeout=lease_timeout, busy_timeout=busy_timeout)
        checked = _SYNC.get(synchronous.upper()) if isinstance(synchronous, str) else None
        if checked is None:
            raise ValueError(f"synchronous must be 'FULL' or 'NORMAL', not {synchronous!r}")
        self.path = text
        self.lease_timeout = float(lease_timeout)
        self.synchronous = checked
        self.busy_timeout = float(busy_timeout)
        self.create = bool(create)
        #: committed write transactions (group commit puts many operations in one)
        self.commits = 0
        self._owner = ""
        self._wconn: sqlite3.Connection | None = None
        self._rconn: sqlite3.Connection | None = None
        self._read_lock: anyio.Lock | None = None
        self._closing = False
        self._commits = GroupCommit(self._write_batch, MAX_BATCH)
        self._shapes: dict[tuple[tuple[str, ...], TaskStatus, TaskStatus], _Shape] = {}
        self._grouped = _SET_BASED
        self._max_rows = _MAX_ROWS
        self._owners = OwnerLocks(text)

    def __repr__(self) -> str:
        state = "open" if self._wconn is not None else "closed"
        return f"<SQLiteJournal {self.path!r} {state}>"

    # ------------------------------------------------------------------ lifecycle

    async def open(self, owner: str) -> None:
        if self._wconn is not None:
            raise RuntimeError(f"journal {self.path} is already open")
        self._owner = owner
        self._wconn, self._rconn = await anyio.to_thread.run_sync(self._open_sync)
        self._read_lock = anyio.Lock()

    async def close(self) -> None:
        if self._wconn is None or self._closing:
            return
        self._closing = True  # new operations now raise; queued ones still get written
        try:
            with anyio.CancelScope(shield=True):
                await self._commits.drain()
                read_lock = self._read_lock
                assert read_lock is not None
                async with read_lock:  # let a read in flight finish
                    wconn, rconn = self._wconn, self._rconn
                    self._wconn = self._rconn = None
                    self._commits.reset()
                    await anyio.to_thread.run_sync(self._close_sync, rconn, wconn)
                    self._owners.release()
        finally:
            self._closing = False

    @staticmethod
    def _close_sync(rconn: sqlite3.Connection | None, wconn: sqlite3.Connection | None) -> None:
        """Leave the WAL empty (truncated to 0 bytes) where no other process reads it."""
        if wconn is not None:
            with contextlib.suppress(sqlite3.Error):
                wconn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        close_all((rconn, wconn), sqlite3.Error)

    def _connect(self, *, first: bool) -> sqlite3.Connection:
        if first and not self.create:
            target = "file:" + urllib.parse.quote(os.path.abspath(self.path)) + "?mode=rw"
            conn = sqlite3.connect(
                target, uri=True, isolation_level=None, check_same_thread=False,
                timeout=self.busy_timeout, cached_statements=512,
            )  # fmt: skip
        else:
            conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False,
                timeout=self.busy_timeout, cached_statements=512,
            )  # fmt: skip
        return conn

    def _open_sync(self) -> tuple[sqlite3.Connection, sqlite3.Connection]:
        self._check_path()
        wconn: sqlite3.Connection | None = None
        rconn: sqlite3.Connection | None = None
        try:
            wconn = self._connect(first=True)
            self._retry_busy(
                lambda: prepare(
                    wconn, where=self.path, synchronous=self.synchronous, begin=self._begin
                )
            )
            # The widest set-based row is an insert's (the flag, every column); keep
            # within the number of parameters this SQLite build takes in one statement.
            limit = wconn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
            rows = _MAX_ROWS
            while rows > 1 and rows * (1 + len(COLUMNS)) + 2 > limit:
                rows = rows - 32 if rows > 64 else rows - 8 if rows > 8 else rows - 1
            self._max_rows = rows
            rconn = self._connect(first=False)
            rconn.execute("PRAGMA query_only = 1")
            rconn.execute(f"PRAGMA cache_size = {_CACHE_KIB}")
            self._owners.hold(self._owner)
            self._sweep(rconn)
            return wconn, rconn
        except BaseException as exc:
            close_all((rconn, wconn), sqlite3.Error)
            self._owners.release()
            if isinstance(exc, JournalError):
                raise
            if isinstance(exc, sqlite3.Error):
                raise JournalError(f"cannot open journal {self.path}: {self._reason(exc)}") from exc
            raise

    def _check_path(self) -> None:
        path = self.path
        if os.path.isdir(path):
            raise JournalError(f"cannot open journal {path}: it is a directory, not a file")
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise JournalError(f"cannot open journal {path}: its directory {parent} does not exist")
        if not self.create and not os.path.exists(path):
            raise JournalError(f"cannot open journal {path}: no such file")

    def _reason(self, exc: BaseException) -> str:
        text = str(exc)
        code = getattr(exc, "sqlite_errorcode", None)
        primary = None if code is None else code & 0xFF
        if primary == sqlite3.SQLITE_NOTADB or "not a database" in text:
            return f"the file is not an SQLite database ({text})"
        if primary == sqlite3.SQLITE_CORRUPT:
            return f"the database file is corrupt ({text})"
        if primary == sqlite3.SQLITE_READONLY or "readonly" in text:
            return f"the file or its directory is read-only ({text})"
        if primary == sqlite3.SQLITE_FULL or "disk is full" in text:
            return f"the disk is full ({text})"
        if primary == sqlite3.SQLITE_CANTOPEN:
            if not os.access(os.path.dirname(os.path.abspath(self.path)), os.W_OK):
                return f"the file or its directory is read-only ({text})"
            return f"the file cannot be opened ({text})"
        if primary == sqlite3.SQLITE_IOERR:
            return f"an I/O error occurred, maybe the disk is full ({text})"
        if _is_busy(exc):
            return (
                f"the database stayed locked by another connection for more than"
                f" {self.busy_timeout:g} s ({text})"
            )
        return text

    def _retry_busy(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn``, retrying with backoff while another connection holds a lock.

        SQLite's own busy handler already waits ``busy_timeout``; this covers the cases it
        does not (WAL recovery, a lock upgrade) and bounds the total wait.
        """
        deadline = time.monotonic() + self.busy_timeout
        delay = 0.001
        while True:
            try:
                return fn()
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or time.monotonic() >= deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def _begin(self, conn: sqlite3.Connection) -> None:
        self._retry_busy(lambda: conn.execute("BEGIN IMMEDIATE"))

    # ------------------------------------------------------------------ writing

    def _require_open(self) -> None:
        if self._wconn is None or self._closing:
            raise not_open(self.path)

    def _write(self, op: Op) -> Coroutine[Any, Any, Any]:
        """Add ``op`` to the open batch; the coroutine waits until its batch is committed
        and returns its result. (Not itself a coroutine: one frame fewer per write.)"""
        self._require_open()
        return self._commits.write(op)

    def _write_batch(self, ops: list[_Op]) -> None:
        """Run one batch in one transaction (worker thread)."""
        conn = self._wconn
        if conn is None:  # closed underneath (only after a failed close)
            for op in ops:
                op.error = not_open(self.path)
            return
        try:
            if self._run_batch(conn, ops, careful=False):
                return
            self._run_batch(conn, ops, careful=True)
        except BaseException as exc:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            for op in ops:
                op.result = None
                error = JournalError(f"cannot write journal {self.path}: {self._reason(exc)}")
                error.__cause__ = exc
                op.error = error
            if not isinstance(exc, Exception):
                raise

    def _run_batch(self, conn: sqlite3.Connection, ops: list[_Op], *, careful: bool) -> bool:
        """One attempt at the batch; False if an operation failed on its own (fast path).

        ``careful`` runs each operation by itself in a SAVEPOINT, so that a failing one is
        undone alone and gets its own error; the others still commit.
        """
        self._begin(conn)
        w = _Writer(
            conn, self._owner, grouped=self._grouped and not careful, max_rows=self._max_rows
        )
        if any(op.bumps for op in ops):
            w.rev = conn.execute(_BUMP_REV).fetchone()[0]
        if not careful:
            try:
                if w.grouped:
                    for op in ops:
                        op.add(w)
                    w.flush()
                else:
                    for op in ops:
                        op.result = op.run(w)
                if w.history:
                    w.write_history()
            except (*_OP_ERRORS, InvalidTransition):
                conn.execute("ROLLBACK")
                return False
        else:
            for op in ops:
                conn.execute("SAVEPOINT op")
                w.history.clear()
                op.error = None
                try:
                    op.result = op.run(w)
                    if w.history:
                        w.write_history()
                except (*_OP_ERRORS, InvalidTransition) as exc:
                    conn.execute("ROLLBACK TO op")
                    op.result = None
                    op.error = self._op_error(exc, op)
                conn.execute("RELEASE op")
        conn.execute("COMMIT")
        self.commits += 1
        return True

    def _op_error(self, exc: BaseException, op: _Op) -> BaseException:
        if not isinstance(exc, sqlite3.Error):
            return exc
        what = type(op).__name__.strip("_").lower()
        if isinstance(op, _Apply):
            what = f"apply {op.shape.source}->{op.shape.target} to task {op.change.task_id}"
        elif isinstance(op, _Insert):
            what = f"insert task {op.row.id}"
        elif isinstance(op, _InsertMany):
            what = f"insert {len(op.inserts)} tasks"
        error = JournalError(f"cannot {what} in journal {self.path}: {exc}")
        error.__cause__ = exc
        return error

    def insert(self, row: TaskRow) -> Coroutine[Any, Any, TaskRow]:
        return self._write(_Insert(row))

    async def insert_many(self, rows: Sequence[TaskRow]) -> builtins.list[TaskRow]:
        """``Journal.insert_many``: one operation, so one transaction (of the batch it
        joins); its rows are written set-based with the batch's other inserts."""
        batch = check_batch(rows)
        if not batch:
            return []
        result: list[TaskRow] = await self._write(_InsertMany(batch))
        return result

    async def advance_periodic(self, state: PeriodicRow, row: TaskRow | None) -> bool:
        """``PeriodicJournal.advance_periodic``: one operation (a conditional UPDATE, or
        the first INSERT, then the tick's task) in the batch's transaction."""
        result: bool = await self._write(_AdvancePeriodic(state, row))
        return result

    def insert_claimed(self, row: TaskRow) -> Coroutine[Any, Any, TaskRow]:
        """``ClaimingJournal.insert_claimed``: without a key, one set-based INSERT for all
        such rows of a batch, binding only the columns that vary, and their history lines
        made by SQLite from the new rows (``_Writer._claims``)."""
        return self._write(_Insert(row, claimed=True))

    def _shape(self, change: Change) -> _Shape:
        key = (tuple(change.fields), change.source, change.target)
        shape = self._shapes.get(key)
        if shape is None:
            shape = self._shapes[key] = _Shape(*key)
        return shape

    def apply(self, change: Change) -> Coroutine[Any, Any, bool]:
        return self._write(_Apply(change, self._shape(change)))

    def apply_soon(
        self, change: Change, settle: Callable[[bool, BaseException | None], None]
    ) -> Awaitable[None] | None:
        """``BatchingJournal.apply_soon``: the change joins the open batch if there is one
        (no coroutine: None), or this call leads the next batch (the awaitable)."""
        op = _ApplySoon(change, self._shape(change), settle)
        self._require_open()
        if self._commits.add(op):
            return None
        return self._lead_soon(op)

    async def _lead_soon(self, op: _ApplySoon) -> None:
        with contextlib.suppress(Exception):  # settle has the outcome
            await self._commits.write(op)

    # ------------------------------------------------------------------ reading

    async def _read(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        self._require_open()
        assert self._read_lock is not None
        async with self._read_lock:
            conn = self._rconn
            if conn is None:
                raise not_open(self.path)
            return await anyio.to_thread.run_sync(self._read_sync, conn, fn)

    def _read_sync(self, conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        try:
            return self._retry_busy(lambda: fn(conn))
        except sqlite3.Error as exc:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise JournalError(f"cannot read journal {self.path}: {self._reason(exc)}") from exc

    @staticmethod
    def _snapshot(
        conn: sqlite3.Connection, sql: str, params: Iterable[Any]
    ) -> tuple[list[TaskRow], int]:
        """Rows of ``sql`` and the change counter, from one read transaction."""
        conn.execute("BEGIN")
        try:
            rows = [to_row(r) for r in conn.execute(sql, tuple(params))]
            rev = int(conn.execute(_READ_REV).fetchone()[0])
        finally:
            conn.execute("COMMIT")
        return rows, rev

    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> builtins.list[Any]:
        return await self._read(lambda conn: conn.execute(sql, params).fetchall())

    async def orphaned(self) -> builtins.list[TaskRow]:
        def read(conn: sqlite3.Connection) -> builtins.list[TaskRow]:
            owners = {o for (o,) in conn.execute(_RUNNING_OWNERS, (self._owner,))}
            dead = sorted(self._owners.dead(owners))
            if not dead:
                return []
            sql = f"{_SQL['select']} WHERE status = 'running' AND owner IN"
            sql += f" ({', '.join('?' * len(dead))}) ORDER BY id"
            return [to_row(r) for r in conn.execute(sql, dead)]

        return await self._read(read)

    def _sweep(self, conn: sqlite3.Connection) -> None:
        """At open: forget the lock files of dead owners that hold no task any more."""
        try:
            files = os.listdir(self._owners.directory)
        except OSError:
            return
        running = {o for (o,) in conn.execute(_RUNNING_OWNERS, (self._owner,))}
        owners = set()
        for name in files:
            if name.endswith(".lock"):
                with (
                    contextlib.suppress(OSError),
                    open(os.path.join(self._owners.directory, name)) as f,
                ):
                    owners.add(f.readline().strip())
        self._owners.forget(self._owners.dead(owners - running - {self._owner}))

    async def runnable(self) -> tuple[builtins.list[TaskRow], int]:
        sql = _SQL["select"] + " WHERE status IN ('pending', 'retrying') ORDER BY priority DESC, id"
        return await self._read(lambda conn: self._snapshot(conn, sql, ()))

    async def changes(self, since: int, exclude_owner: str) -> tuple[builtins.list[TaskRow], int]:
        sql = _SQL["select"] + " WHERE rev > ? AND (writer IS NULL OR writer != ?) ORDER BY rev, id"

        def read(conn: sqlite3.Connection) -> tuple[builtins.list[TaskRow], int]:
            rows, rev = self._snapshot(conn, sql, (since, exclude_owner))
            return rows, max(rev, since)

        return await self._read(read)
