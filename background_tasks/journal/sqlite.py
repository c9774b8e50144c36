"""The SQLite journal: durable tasks in one file, shared by every process that opens it.

How a write travels (DESIGN.md §2, "durable acknowledgement"):

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
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import os
import sqlite3
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from operator import attrgetter
from typing import Any, Final, Literal, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread

from .._errors import InvalidTransition, JournalError
from .._models import ErrorInfo, TransitionRecord, utc
from .._states import TaskStatus
from ._group_commit import GroupCommit, purge_in_steps
from ._protocol import BatchingJournal, Change, ClaimingJournal, InspectableJournal, TaskRow

__all__ = ["SCHEMA_VERSION", "SQLiteJournal"]

_T = TypeVar("_T")

# --------------------------------------------------------------------------- schema

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

#: What the hot paths bind instead of None (and ``False``): sqlite3 binds those through
#: its adapter lookup, ~250 ns more per value than an int or a str, and a task writes
#: about ten of them. The SQL turns a stand-in back into NULL (``NULLIF``; None itself
#: still works everywhere). A text column's stand-in is the integer 0, a real column's
#: the text '': bound values have no affinity, so a stand-in never equals a real value.
_NULL_AS: Final[dict[str, int | str]] = {
    "key": 0,
    "options_json": 0,
    "started_at": "",
    "finished_at": "",
    "result_json": 0,
    "error_json": 0,
    "progress_json": 0,
    "owner": 0,
    "lease_until": "",
    # history
    "source": 0,
}
#: (index in a TaskRow's values, stand-in) for its nullable columns.
_ROW_NULLS: Final = tuple((i, _NULL_AS[c]) for i, c in enumerate(_COLUMNS) if c in _NULL_AS)
_CANCEL_INDEX: Final = _COLUMNS.index("cancel_requested")


def _bound(column: str, value: str) -> str:
    """SQL for a bound ``value`` of ``column``: its stand-in for NULL turned back."""
    null = _NULL_AS.get(column)
    return value if null is None else f"NULLIF({value}, {null!r})"


def _bound_columns(columns: tuple[str, ...], first: int) -> str:
    """``column<first>, ...`` of a VALUES list holding ``columns``, stand-ins turned back."""
    return ", ".join(_bound(c, f"column{first + i}") for i, c in enumerate(columns))


_INSERT: Final = (
    f"INSERT INTO tasks ({', '.join(_COLUMNS)}, rev, writer)"
    f" VALUES ({', '.join(_bound(c, '?') for c in _COLUMNS)}, ?, ?)"
)
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
_INSERT_HISTORY: Final = (
    f"INSERT OR REPLACE INTO history ({_HISTORY_COLUMNS})"
    f" VALUES ({', '.join(_bound(c, '?') for c in _HISTORY_NAMES)})"
)
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

# Set-based writes (DESIGN.md §2): all inserts of a batch, all its changes of one shape,
# and all its history lines go to SQLite as ONE statement each, with the rows as a
# multi-row VALUES list of bound parameters, so a batch costs a handful of sqlite3 calls
# (each of which hands the GIL back and forth with the event loop) instead of several per
# operation, and binds values exactly as the one-operation statements do. A list is
# padded to a size class (``_padded``: a few statements to prepare and cache, not one per
# length) with rows of zeros; the first column of every row says whether it is real
# (1) or padding (0). Zeros, not NULLs: sqlite3 binds None through its adapter lookup,
# several times slower than an int. UPDATE ... FROM needs SQLite 3.33; older ones run
# one statement per operation.
_SET_BASED: Final = sqlite3.sqlite_version_info >= (3, 33, 0)
#: Rows per set-based statement at most (a size class of ``_padded``; fewer if SQLite
#: takes fewer parameters).
_MAX_ROWS: Final = 256
#: In a change's row: id, version, then the field values (after the "real row" flag).
_AT_FIELDS: Final = 2


def _values(rows: int, width: int) -> str:
    """A VALUES list of ``rows`` rows: the flag (column1), then ``width`` values."""
    row = "(" + ", ".join("?" * (width + 1)) + ")"
    return "(VALUES " + ", ".join([row] * rows) + ")"


def _insert_sql(rows: int) -> str:
    return (
        f"INSERT INTO tasks ({', '.join(_COLUMNS)}, rev, writer)"
        f" SELECT {_bound_columns(_COLUMNS, 2)}, ?, ?"
        f" FROM {_values(rows, len(_COLUMNS))} WHERE column1"
    )


#: What a row claimed as it was submitted (``_Insert.claim``) binds: the flag, these
#: columns, then options_json, owner and lease_until (or their stand-ins for NULL).
#: Every other column is the same for all such rows (``_CLAIMED``).
_CLAIM_FIELDS: Final = (
    "id", "name", "queue", "priority", "args_json", "kwargs_json", "max_attempts",
    "created_at", "scheduled_at", "started_at", "options_json", "owner", "lease_until",
)  # fmt: skip
_claim_values: Final = attrgetter(*_CLAIM_FIELDS[:-3])
_CLAIMED: Final[dict[str, Any]] = {
    "status": TaskStatus.RUNNING,
    "key": None,
    "attempts": 1,
    "recoveries": 0,
    "finished_at": None,
    "result_json": None,
    "error_json": None,
    "progress_json": None,
    "cancel_requested": False,
    "version": 1,
}
assert set(_CLAIM_FIELDS) | set(_CLAIMED) == set(_COLUMNS)


def _sql_literal(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, str):  # a TaskStatus too
        return f"'{value}'"
    return str(int(value))


def _claims_sql(rows: int) -> str:
    values = [
        _sql_literal(_CLAIMED[c])
        if c in _CLAIMED
        else _bound(c, f"column{2 + _CLAIM_FIELDS.index(c)}")
        for c in _COLUMNS
    ]
    return (
        f"INSERT INTO tasks ({', '.join(_COLUMNS)}, rev, writer)"
        f" SELECT {', '.join(values)}, ?, ? FROM {_values(rows, len(_CLAIM_FIELDS))}"
        " WHERE column1"
    )


#: The two history lines of each row claimed as submitted, from the rows themselves:
#: (rowid from, rowid to, rev).
_CLAIM_HISTORY: Final = (
    f"INSERT OR REPLACE INTO history ({_HISTORY_COLUMNS})"
    " SELECT t.id, s.column1, s.column2, s.column3, s.column1,"
    " CASE s.column1 WHEN 0 THEN t.created_at ELSE t.started_at END, t.owner, NULL"
    " FROM tasks AS t CROSS JOIN (VALUES (0, NULL, 'pending'), (1, 'pending', 'running')) AS s"
    " WHERE t.rowid BETWEEN ? AND ? AND t.rev = ?"
)


def _history_sql(rows: int) -> str:
    return (
        f"INSERT OR REPLACE INTO history ({_HISTORY_COLUMNS})"
        f" SELECT {_bound_columns(_HISTORY_NAMES, 2)}"
        f" FROM {_values(rows, 8)} WHERE column1"
    )


def _applied_sql(rows: int) -> str:
    """The ids of (id, version) rows that this transaction (its rev, its writer) moved to
    version + 1. Another process may have moved a row to version + 1 before this batch
    began (a claim that won the race): that row carries the other transaction's rev."""
    return (
        f"SELECT j.column2 FROM {_values(rows, 2)} AS j CROSS JOIN tasks"
        " ON tasks.id = j.column2 AND +tasks.version = j.column3 + 1"
        " AND +tasks.rev = ? AND +tasks.writer = ? WHERE j.column1"
    )


class _Statements:
    """SQL text by padded row count, built when first needed."""

    __slots__ = ("build", "by_rows")

    def __init__(self, build: Callable[[int], str]) -> None:
        self.build = build
        self.by_rows: dict[int, str] = {}

    def __call__(self, rows: int) -> str:
        sql = self.by_rows.get(rows)
        if sql is None:
            sql = self.by_rows[rows] = self.build(rows)
        return sql


_INSERTS: Final = _Statements(_insert_sql)
_CLAIMS: Final = _Statements(_claims_sql)
_HISTORIES: Final = _Statements(_history_sql)
_APPLIED: Final = _Statements(_applied_sql)


def _zeros(n: int) -> list[int]:
    return [0] * n


def _padded(n: int) -> int:
    """The row count to send ``n`` rows as: exact up to 8, then a multiple of 8 up to 64,
    then of 32: at most 12.5% padding, and 21 statements per kind to prepare (a few ms
    each for the wide ones) and cache. Exact lengths would prepare a statement for nearly
    every batch; powers of two measured no faster and take more calls."""
    if n <= 8:
        return n
    if n <= 64:
        return (n + 7) & ~7
    return (n + 31) & ~31


_SYNC: Final[dict[str, Literal["FULL", "NORMAL"]]] = {"FULL": "FULL", "NORMAL": "NORMAL"}

#: Page cache per connection, in KiB (negative: SQLite's unit for "KiB, not pages").
_CACHE_KIB: Final = -16384

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


def _to_row(r: Any) -> TaskRow:
    return TaskRow(
        r[0], r[1], r[2], _STATUS[r[3]], r[4], r[5], r[6], r[7], r[8], r[9], r[10], r[11],
        r[12], r[13], r[14], r[15], r[16], r[17], r[18], r[19], r[20], bool(r[21]), r[22],
    )  # fmt: skip


def _is_busy(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.OperationalError) and (
        (code is not None and code & 0xFF in _BUSY) or "locked" in str(exc)
    )


# --------------------------------------------------------------------------- operations


class _Shape:
    """The statements for every change with one set of field names, source and target."""

    __slots__ = ("lease_sql", "nulls", "source", "sql", "target", "updates")

    def __init__(self, names: tuple[str, ...], source: TaskStatus, target: TaskStatus) -> None:
        bad = [n for n in names if n not in _SETTABLE]
        if bad:
            raise ValueError(f"Change.fields has names that are not settable TaskRow fields: {bad}")
        clear = ", cancel_requested = 0" if (
            target in _CLEARS_CANCEL and "cancel_requested" not in names
        ) else ""  # fmt: skip
        to, where = TaskStatus(target).value, TaskStatus(source).value
        self.source, self.target = where, to  # as stored (a str status works too)
        # One operation: (rev, writer, *field values, id, version).
        sets = "".join(f", {n} = {_bound(n, '?')}" for n in names)
        self.sql = (
            f"UPDATE tasks SET status = '{to}', version = version + 1, rev = ?, writer = ?"
            f"{sets}{clear} WHERE id = ? AND version = ? AND status = '{where}'"
        )
        #: The same for a change with ``lease_before`` (one more parameter, last).
        self.lease_sql = self.sql + " AND lease_until < ?"
        # Many: (rev, writer, then rows of id, version, *field values). The + keeps SQLite
        # from looking rows up by status (every pending row, say) instead of by id.
        sets = "".join(
            f", {n} = {_bound(n, f'j.column{_AT_FIELDS + 2 + i}')}" for i, n in enumerate(names)
        )
        #: (index in an operation's values, stand-in) for the nullable fields
        self.nulls = tuple(
            (_AT_FIELDS + i, _NULL_AS[n]) for i, n in enumerate(names) if n in _NULL_AS
        )
        width = _AT_FIELDS + len(names)
        self.updates = _Statements(
            lambda rows: (
                f"UPDATE tasks SET status = '{to}', version = tasks.version + 1, rev = ?,"
                f" writer = ?{sets}{clear} FROM {_values(rows, width)} AS j"
                f" WHERE tasks.id = j.column2 AND +tasks.version = j.column3"
                f" AND +tasks.status = '{where}' AND j.column1"
            )
        )


class _Writer:
    """What operations share while their batch runs (in the worker thread).

    On the fast path (``grouped``), plain inserts and changes are not written one by one:
    they are collected (``inserts``, ``groups`` by shape) and written by ``flush`` with
    one statement per group (and per ``max_rows`` of it), and every history line of the
    batch with one more at its end. An operation that must see or change the rows as
    they are (a keyed insert, a cancel request, a reclaim, ...) flushes first.
    ``touched`` holds every id an operation of this batch named so far: a second
    operation on one of them flushes and runs alone, so that no row of a group was
    changed by this batch before the group's statement, and "at ``version + 1`` now"
    means "applied by it" (read back only when the statement changed fewer rows than it
    had operations).
    """

    __slots__ = (
        "claims", "conn", "grouped", "groups", "history", "inserts", "max_rows", "owner", "rev",
        "touched",
    )  # fmt: skip

    def __init__(
        self, conn: sqlite3.Connection, owner: str, *, grouped: bool, max_rows: int
    ) -> None:
        self.conn = conn
        self.owner = owner
        self.grouped = grouped
        self.max_rows = max_rows
        self.rev = 0
        self.history: list[tuple[Any, ...]] = []
        self.inserts: list[_Insert] = []
        self.claims: list[_Insert] = []  # inserts of rows claimed as submitted
        self.groups: dict[_Shape, list[_Apply]] = {}
        self.touched: set[str] = set()

    def alone(self, task_id: str) -> bool:
        """Whether an operation on ``task_id`` must run by itself (see the class doc)."""
        if task_id in self.touched:
            self.flush()
            return True
        self.touched.add(task_id)
        return False

    def flush(self) -> None:
        conn = self.conn
        max_rows = self.max_rows
        if self.claims:
            claims, self.claims = self.claims, []
            for start in range(0, len(claims), max_rows):
                self._claims(claims[start : start + max_rows])
        if self.inserts:
            inserts, self.inserts = self.inserts, []
            history = self.history
            for start in range(0, len(inserts), max_rows):
                part = inserts[start : start + max_rows]
                rows = _padded(len(part))
                params: list[Any] = [self.rev, self.owner]
                for op in part:
                    params.append(1)
                    params += op.values()
                    op.result = op.row
                    op.history(history)
                params += _zeros((rows - len(part)) * (1 + len(_COLUMNS)))
                conn.execute(_INSERTS(rows), params)
        if self.groups:
            groups, self.groups = self.groups, {}
            for shape, ops in groups.items():
                for start in range(0, len(ops), max_rows):
                    self._update(shape, ops[start : start + max_rows])

    def _claims(self, ops: list[_Insert]) -> None:
        """Rows claimed as submitted: one INSERT binding only what varies, then their two
        history lines each, made by SQLite from the rows just inserted (by rowid: a
        statement's new rows get consecutive ones, checked by the line count)."""
        rows = _padded(len(ops))
        params: list[Any] = [self.rev, self.owner]
        for op in ops:
            params += op.claim or ()  # set: add() put it here
            op.result = op.row
        params += _zeros((rows - len(ops)) * (1 + len(_CLAIM_FIELDS)))
        last = self.conn.execute(_CLAIMS(rows), params).lastrowid or 0
        n = len(ops)
        lines = self.conn.execute(_CLAIM_HISTORY, (last - n + 1, last, self.rev)).rowcount
        if lines != 2 * n:  # rowids were not consecutive: the careful replay writes them
            raise sqlite3.DataError(f"wrote {lines} history lines for {n} claimed rows")

    def _update(self, shape: _Shape, ops: list[_Apply]) -> None:
        rows = _padded(len(ops))
        params: list[Any] = [self.rev, self.owner]
        for op in ops:
            params.append(1)
            params += op.values
        params += _zeros((rows - len(ops)) * (1 + len(ops[0].values)))
        applied = self.conn.execute(shape.updates(rows), params).rowcount
        history = self.history
        if applied == len(ops):
            for op in ops:
                op.result = True
                history.append(op.history())
            return
        for op in ops:
            op.result = False
        if applied:
            keys: list[Any] = []
            for op in ops:
                keys.append(1)
                keys += op.values[:_AT_FIELDS]
            keys += _zeros((rows - len(ops)) * (1 + _AT_FIELDS))
            keys += (self.rev, self.owner)
            done = {task_id for (task_id,) in self.conn.execute(_APPLIED(rows), keys)}
            for op in ops:
                if op.change.task_id in done:
                    op.result = True
                    history.append(op.history())

    def write_history(self) -> None:
        history, self.history = self.history, []
        if not self.grouped:
            self.conn.executemany(_INSERT_HISTORY, history)
            return
        for start in range(0, len(history), self.max_rows):
            part = history[start : start + self.max_rows]
            rows = _padded(len(part))
            params: list[Any] = []
            for line in part:
                params.append(1)
                params += line
            params += _zeros((rows - len(part)) * 9)
            self.conn.execute(_HISTORIES(rows), params)


class _Op:
    __slots__ = ("error", "result")
    #: whether the operation bumps the change cursor (so the batch reads the counter)
    bumps = True
    #: whether the caller waits for the commit (False: progress, which may ride along)
    awaited = True
    #: whether the caller is woken before the others of the batch (see GroupCommit)
    first = False
    #: what to call once the batch ended, for a caller that does not wait (``apply_soon``)
    settle: Callable[[Any], None] | None = None

    def __init__(self) -> None:
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self, w: _Writer) -> Any:
        """Write this operation by itself; returns its result."""
        raise NotImplementedError

    def add(self, w: _Writer) -> None:
        """Write (or collect) this operation on the fast path; sets ``result``."""
        w.flush()
        self.result = self.run(w)


class _Insert(_Op):
    __slots__ = ("claim", "row")

    def __init__(self, row: TaskRow, *, claimed: bool = False) -> None:
        super().__init__()
        self.row = row
        #: A row claimed as it was submitted (``insert_claimed``) goes as its flag,
        #: ``_claim_values`` and three nullable columns only (``_Writer._claims``); the
        #: other columns are ``_CLAIMED``'s.
        self.claim: tuple[Any, ...] | None = None
        if claimed:
            options, owner, lease = row.options_json, row.owner, row.lease_until
            self.claim = (
                1,
                *_claim_values(row),
                0 if options is None else options,  # stand-ins for NULL: _NULL_AS
                0 if owner is None else owner,
                "" if lease is None else lease,
            )

    def values(self) -> list[Any]:
        """Every column's value, stand-ins for NULL (``_NULL_AS``)."""
        row = self.row
        values = list(_row_values(row))
        values[_STATUS_INDEX] = row.status.value
        values[_CANCEL_INDEX] = int(row.cancel_requested)
        for i, null in _ROW_NULLS:
            if values[i] is None:
                values[i] = null
        return values

    def history(self, lines: list[tuple[Any, ...]]) -> None:
        row = self.row
        owner = 0 if row.owner is None else row.owner  # 0: NULL (_NULL_AS)
        if self.claim is not None:  # claimed as submitted
            # (the fast path writes these two with _CLAIM_HISTORY instead)
            lines.append((row.id, 0, 0, "pending", 0, row.created_at, owner, 0))
            lines.append((row.id, 1, "pending", "running", 1, row.started_at, owner, 0))
            return
        error = 0 if row.error_json is None else row.error_json
        status, created = row.status.value, row.created_at
        lines.append((row.id, row.version, 0, status, row.attempts, created, owner, error))

    def add(self, w: _Writer) -> None:
        if self.row.key is None and not w.alone(self.row.id):
            (w.inserts if self.claim is None else w.claims).append(self)
        else:
            w.touched.add(self.row.id)
            _Op.add(self, w)

    def run(self, w: _Writer) -> TaskRow:
        row = self.row
        if row.key is not None:
            live = w.conn.execute(_LIVE_KEY, (row.key,)).fetchall()
            if live:
                return _to_row(live[0])
        w.conn.execute(_INSERT, (*self.values(), w.rev, w.owner))
        self.history(w.history)
        return row


class _Apply(_Op):
    __slots__ = ("change", "shape", "values")
    first = True

    def __init__(self, change: Change, shape: _Shape) -> None:
        super().__init__()
        self.change = change
        self.shape = shape
        values = [change.task_id, change.version, *change.fields.values()]
        for i, null in shape.nulls:
            if values[i] is None:
                values[i] = null
        self.values = values

    def history(self) -> tuple[Any, ...]:
        c, shape = self.change, self.shape
        owner = 0 if c.owner is None else c.owner  # 0: NULL (_NULL_AS)
        error = c.fields.get("error_json")
        error = 0 if error is None else error
        return (c.task_id, c.version + 1, shape.source, shape.target, c.attempt, c.at, owner, error)

    def add(self, w: _Writer) -> None:
        # A change with lease_before (a takeover, rare) runs by itself.
        if self.change.lease_before is None and not w.alone(self.change.task_id):
            group = w.groups.get(self.shape)
            if group is None:
                w.groups[self.shape] = [self]
            else:
                group.append(self)
        else:
            w.touched.add(self.change.task_id)
            _Op.add(self, w)

    def run(self, w: _Writer) -> bool:
        c = self.change
        params: tuple[Any, ...] = (w.rev, w.owner, *self.values[_AT_FIELDS:], c.task_id, c.version)
        sql = self.shape.sql
        if c.lease_before is not None:
            params, sql = (*params, c.lease_before), self.shape.lease_sql
        try:
            applied = w.conn.execute(sql, params).rowcount > 0
        except sqlite3.IntegrityError as exc:
            if c.target in _LIVE and "tasks.key" in str(exc):
                found = w.conn.execute("SELECT key FROM tasks WHERE id = ?", (c.task_id,))
                key = (found.fetchone() or (None,))[0]
                raise InvalidTransition(
                    f"another unfinished task holds the key {key!r}; task {c.task_id} cannot"
                    f" go back to {self.shape.target}"
                ) from exc
            raise
        if applied:
            w.history.append(self.history())
        return applied


class _ApplySoon(_Apply):
    """An ``_Apply`` whose caller does not wait: ``callback(applied, error)`` gets the
    outcome (through a method, not a closure per operation: fewer objects in flight)."""

    __slots__ = ("callback",)
    awaited = False
    first = False

    def __init__(
        self, change: Change, shape: _Shape, callback: Callable[[bool, BaseException | None], None]
    ) -> None:
        super().__init__(change, shape)
        self.callback = callback

    def settle(self, _op: Any) -> None:  # _op is self (GroupCommit passes the operation)
        self.callback(bool(self.result), self.error)


class _RequestCancel(_Op):
    __slots__ = ("task_id",)
    _sql = (
        "UPDATE tasks SET cancel_requested = 1, rev = ?, writer = ?"
        " WHERE id = ? AND status = 'running'" + _RETURNING
    )

    def __init__(self, task_id: str) -> None:
        super().__init__()
        self.task_id = task_id

    def run(self, w: _Writer) -> TaskRow | None:
        found = w.conn.execute(self._sql, (w.rev, w.owner, self.task_id)).fetchall()
        return _to_row(found[0]) if found else None


class _SetProgress(_Op):
    __slots__ = ("params",)
    bumps = False
    awaited = False
    _sql = (
        "UPDATE tasks SET progress_json = ?"
        " WHERE id = ? AND status = 'running' AND owner = ? AND version = ?"
    )

    def __init__(self, params: tuple[Any, ...]) -> None:
        super().__init__()
        self.params = params

    def run(self, w: _Writer) -> None:
        w.conn.execute(self._sql, self.params)


class _Renew(_Op):
    __slots__ = ("lease_until", "owner")
    bumps = False
    _sql = "UPDATE tasks SET lease_until = ? WHERE status = 'running' AND owner = ?"

    def __init__(self, owner: str, lease_until: float) -> None:
        super().__init__()
        self.owner = owner
        self.lease_until = lease_until

    def run(self, w: _Writer) -> int:
        return w.conn.execute(self._sql, (self.lease_until, self.owner)).rowcount


class _Reclaim(_Op):
    """Expired leases: back to PENDING, or FAILED after too many recoveries, or CANCELLED
    if a cancel was asked for (it must not be lost with the owner that died)."""

    __slots__ = ("max_recoveries", "now")
    _expired = (
        "SELECT id, version, recoveries, owner, cancel_requested FROM tasks"
        " WHERE status = 'running' AND lease_until < ?"
    )
    _sql = (
        "UPDATE tasks SET status = ?, version = version + 1, rev = ?, writer = ?,"
        " recoveries = recoveries + 1, owner = NULL, lease_until = NULL,"
        " cancel_requested = 0, finished_at = coalesce(?, finished_at),"
        " error_json = coalesce(?, error_json)"
        " WHERE id = ? AND version = ? AND status = 'running'" + _RETURNING
    )

    def __init__(self, now: float, max_recoveries: int) -> None:
        super().__init__()
        self.now = now
        self.max_recoveries = max_recoveries

    def run(self, w: _Writer) -> list[TaskRow]:
        rows: list[TaskRow] = []
        for task_id, version, recoveries, owner, cancel in w.conn.execute(
            self._expired, (self.now,)
        ).fetchall():
            error: str | None = None
            finished_at: float | None = None
            if cancel:
                target, finished_at = TaskStatus.CANCELLED, self.now
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
                target = TaskStatus.PENDING
            found = w.conn.execute(
                self._sql,
                (target.value, w.rev, w.owner, finished_at, error, task_id, version),
            ).fetchall()
            w.touched.add(task_id)
            if found:
                row = _to_row(found[0])
                rows.append(row)
                w.history.append(
                    (task_id, row.version, TaskStatus.RUNNING.value, target.value,
                     row.attempts, self.now, w.owner, error)
                )  # fmt: skip
        return rows


class _PurgeStep(_Op):
    __slots__ = ("batch", "older_than")
    bumps = False
    _select = f"SELECT id FROM tasks WHERE finished_at < ? AND status IN {_TERMINAL} LIMIT ?"

    def __init__(self, older_than: float, batch: int) -> None:
        super().__init__()
        self.older_than = older_than
        self.batch = batch

    def run(self, w: _Writer) -> int:
        ids = w.conn.execute(self._select, (self.older_than, self.batch)).fetchall()
        if ids:
            w.conn.executemany("DELETE FROM history WHERE task_id = ?", ids)
            w.conn.executemany("DELETE FROM tasks WHERE id = ?", ids)
        return len(ids)


# --------------------------------------------------------------------------- the journal


class SQLiteJournal(ClaimingJournal, BatchingJournal, InspectableJournal):
    """A journal in one SQLite file (WAL mode), safe to share between processes.

    ``synchronous="FULL"`` (the default) makes every acknowledged write survive a power
    loss; ``"NORMAL"`` is faster and still survives a crash of the process, but the last
    transactions before a power loss or OS crash may be lost. ``busy_timeout`` is how
    long a write waits for another process's transaction before ``JournalError``.
    ``create=False`` refuses a path that does not exist yet (for tools that only read).
    """

    lease_timeout: float

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
        if text in ("", ":memory:") or text.startswith("file:"):
            raise ValueError(
                f"path: {text!r} is not a file path; an in-memory database cannot be shared"
                " (use journal=None for an in-memory manager)"
            )
        for name, value in (("lease_timeout", lease_timeout), ("busy_timeout", busy_timeout)):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number of seconds, not {value!r}")
            if not (0 < value < float("inf")):
                raise ValueError(f"{name} must be a positive finite number of seconds")
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
                    await anyio.to_thread.run_sync(_close_all, (rconn, wconn))
        finally:
            self._closing = False

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
            self._retry_busy(lambda: self._prepare(wconn))
            # The widest set-based row is an insert's (the flag, every column); keep
            # within the number of parameters this SQLite build takes in one statement.
            limit = wconn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
            rows = _MAX_ROWS
            while rows > 1 and rows * (1 + len(_COLUMNS)) + 2 > limit:
                rows = rows - 32 if rows > 64 else rows - 8 if rows > 8 else rows - 1
            self._max_rows = rows
            rconn = self._connect(first=False)
            rconn.execute("PRAGMA query_only = 1")
            rconn.execute(f"PRAGMA cache_size = {_CACHE_KIB}")
            return wconn, rconn
        except BaseException as exc:
            _close_all((rconn, wconn))
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

    def _prepare(self, conn: sqlite3.Connection) -> None:
        """Check, then (only if it is ours and not newer) configure and migrate."""
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        version = self._schema_version(conn, tables)
        if version is None and tables:
            raise JournalError(
                f"cannot open journal {self.path}: it is an SQLite database of something"
                f" else (tables {', '.join(sorted(tables))}), not a background_tasks journal"
            )
        if version is not None and version > SCHEMA_VERSION:
            raise JournalError(
                f"cannot open journal {self.path}: its schema version {version} is newer than"
                f" this version of background_tasks knows ({SCHEMA_VERSION}); upgrade"
                " background_tasks"
            )
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise JournalError(
                f"cannot open journal {self.path}: WAL mode is not available ({mode})"
            )
        conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        conn.execute(f"PRAGMA cache_size = {_CACHE_KIB}")
        # A write transaction even when there is nothing to migrate: it proves now, and
        # not at the first submit, that this file can be written. Rolled back if unused.
        self._begin(conn)
        try:
            tables = {
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
            version = self._schema_version(conn, tables) or 0
            if version > SCHEMA_VERSION:  # another process upgraded meanwhile
                raise JournalError(
                    f"cannot open journal {self.path}: its schema version {version} is newer"
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

    @staticmethod
    def _schema_version(conn: sqlite3.Connection, tables: set[str]) -> int | None:
        if "meta" not in tables:
            return None
        found = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return None if found is None else int(found[0])

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
            raise JournalError(f"journal {self.path} is not open")

    def _write(self, op: _Op) -> Coroutine[Any, Any, Any]:
        """Add ``op`` to the open batch; the coroutine waits until its batch is committed
        and returns its result. (Not itself a coroutine: one frame fewer per write.)"""
        self._require_open()
        return self._commits.write(op)

    def _write_batch(self, ops: list[_Op]) -> None:
        """Run one batch in one transaction (worker thread)."""
        conn = self._wconn
        if conn is None:  # closed underneath (only after a failed close)
            for op in ops:
                op.error = JournalError(f"journal {self.path} is not open")
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
        error = JournalError(f"cannot {what} in journal {self.path}: {exc}")
        error.__cause__ = exc
        return error

    def insert(self, row: TaskRow) -> Coroutine[Any, Any, TaskRow]:
        return self._write(_Insert(row))

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

    async def _read(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        self._require_open()
        assert self._read_lock is not None
        async with self._read_lock:
            conn = self._rconn
            if conn is None:
                raise JournalError(f"journal {self.path} is not open")
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
            rows = [_to_row(r) for r in conn.execute(sql, tuple(params))]
            rev = int(conn.execute(_READ_REV).fetchone()[0])
        finally:
            conn.execute("COMMIT")
        return rows, rev

    async def get(self, task_id: str) -> TaskRow | None:
        def read(conn: sqlite3.Connection) -> TaskRow | None:
            found = conn.execute(_SELECT + " WHERE id = ?", (task_id,)).fetchall()
            return _to_row(found[0]) if found else None

        return await self._read(read)

    async def list(
        self,
        *,
        status: TaskStatus | None = None,
        queue: str | None = None,
        name: str | None = None,
        limit: int = 100,
    ) -> list[TaskRow]:
        where: list[str] = []
        params: list[Any] = []
        for column, value in (("status", status), ("queue", queue), ("name", name)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value.value if isinstance(value, TaskStatus) else value)
        sql = _SELECT + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY id DESC LIMIT ?"
        params.append(limit)

        def read(conn: sqlite3.Connection) -> list[TaskRow]:
            return [_to_row(r) for r in conn.execute(sql, params)]

        return await self._read(read)

    async def history(self, task_id: str) -> builtins.list[TransitionRecord]:
        def read(conn: sqlite3.Connection) -> builtins.list[tuple[Any, ...]]:
            return conn.execute(
                "SELECT task_id, source, target, attempt, at, owner, error_json FROM history"
                " WHERE task_id = ? ORDER BY seq",
                (task_id,),
            ).fetchall()

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

    async def expired(self, now: float) -> builtins.list[TaskRow]:
        def read(conn: sqlite3.Connection) -> builtins.list[TaskRow]:
            return [_to_row(r) for r in conn.execute(_EXPIRED, (now,))]

        return await self._read(read)

    async def runnable(self) -> tuple[builtins.list[TaskRow], int]:
        sql = _SELECT + " WHERE status IN ('pending', 'retrying') ORDER BY priority DESC, id"
        return await self._read(lambda conn: self._snapshot(conn, sql, ()))

    async def changes(self, since: int, exclude_owner: str) -> tuple[builtins.list[TaskRow], int]:
        sql = _SELECT + " WHERE rev > ? AND (writer IS NULL OR writer != ?) ORDER BY rev, id"

        def read(conn: sqlite3.Connection) -> tuple[builtins.list[TaskRow], int]:
            rows, rev = self._snapshot(conn, sql, (since, exclude_owner))
            return rows, max(rev, since)

        return await self._read(read)

    async def counts(self) -> dict[TaskStatus, int]:
        def read(conn: sqlite3.Connection) -> builtins.list[tuple[str, int]]:
            return conn.execute("SELECT status, count(*) FROM tasks GROUP BY status").fetchall()

        counts = dict.fromkeys(TaskStatus, 0)
        for status, n in await self._read(read):
            counts[_STATUS[status]] = n
        return counts

    # ------------------------------------------------------------------ InspectableJournal
    # For ``bgtasks status``. None needs an index of its own: an index on (queue, status)
    # would cost every status change a b-tree write.

    async def counts_by_queue(self) -> dict[tuple[str, TaskStatus], int]:
        """How many tasks each queue has in each status (only pairs that occur).

        Reads the whole table: linear in the number of rows the journal keeps.
        """

        def read(conn: sqlite3.Connection) -> builtins.list[tuple[str, str, int]]:
            return conn.execute(
                "SELECT queue, status, count(*) FROM tasks GROUP BY queue, status"
            ).fetchall()

        return {(queue, _STATUS[status]): n for queue, status, n in await self._read(read)}

    async def finished_since(self, since: float) -> dict[TaskStatus, int]:
        """How many tasks finished (COMPLETED, FAILED, CANCELLED) at or after ``since``
        (epoch seconds), by status; every finished status is a key."""

        def read(conn: sqlite3.Connection) -> builtins.list[tuple[str, int]]:
            return conn.execute(
                "SELECT status, count(*) FROM tasks INDEXED BY tasks_finished"
                f" WHERE finished_at >= ? AND finished_at IS NOT NULL AND status IN {_TERMINAL}"
                " GROUP BY status",
                (since,),
            ).fetchall()

        counts = {s: 0 for s in TaskStatus if s.is_terminal}
        for status, n in await self._read(read):
            counts[_STATUS[status]] = n
        return counts

    async def oldest(self, status: TaskStatus) -> TaskRow | None:
        """The earliest created task in ``status`` (ids sort by creation); None if none."""
        value = TaskStatus(status).value

        def read(conn: sqlite3.Connection) -> TaskRow | None:
            found = conn.execute(
                _SELECT + " WHERE status = ? ORDER BY id LIMIT 1", (value,)
            ).fetchall()
            return _to_row(found[0]) if found else None

        return await self._read(read)


def _close_all(conns: Iterable[sqlite3.Connection | None]) -> None:
    for conn in conns:
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
