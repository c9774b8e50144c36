"""The SQLite journal's set-based writes: how a batch's operations become a handful of
statements.

All plain inserts of a batch, all its changes of one shape (fields, source, target),
and all its history lines go to SQLite as ONE statement each, with the rows as a
multi-row VALUES list of bound parameters, so a batch costs a handful of sqlite3 calls
(each of which hands the GIL back and forth with the event loop) instead of several per
operation, and binds values exactly as the one-operation statements do. A list is
padded to a size class (``_padded``: a few statements to prepare and cache, not one per
length) with rows of zeros; the first column of every row says whether it is real (1)
or padding (0). Zeros, not NULLs: sqlite3 binds None through its adapter lookup, several
times slower than an int (``_NULL_AS``: the stand-ins the SQL turns back into NULL).
UPDATE ... FROM needs SQLite 3.33; older ones run one statement per operation.

``_Shape`` holds the statements of one shape of change, ``_Writer`` what a batch's
operations share while it runs (the collected inserts and groups, the history lines).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Final

from ..._states import TaskStatus
from .._sql import CLEARS_CANCEL, COLUMNS, check_fields
from ._schema import _HISTORY_COLUMNS, _HISTORY_NAMES

if TYPE_CHECKING:
    from ._ops import _Apply, _Insert

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
    "lock": 0,
    "partition": 0,
    # history
    "source": 0,
}
#: (index in a TaskRow's values, stand-in) for its nullable columns.
_ROW_NULLS: Final = tuple((i, _NULL_AS[c]) for i, c in enumerate(COLUMNS) if c in _NULL_AS)
_CANCEL_INDEX: Final = COLUMNS.index("cancel_requested")
_SHARED_INDEX: Final = COLUMNS.index("shared")


def _bound(column: str, value: str) -> str:
    """SQL for a bound ``value`` of ``column``: its stand-in for NULL turned back."""
    null = _NULL_AS.get(column)
    return value if null is None else f"NULLIF({value}, {null!r})"


def _bound_columns(columns: tuple[str, ...], first: int) -> str:
    """``column<first>, ...`` of a VALUES list holding ``columns``, stand-ins turned back."""
    return ", ".join(_bound(c, f"column{first + i}") for i, c in enumerate(columns))


_INSERT: Final = (
    f"INSERT INTO tasks ({', '.join(COLUMNS)}, rev, writer)"
    f" VALUES ({', '.join(_bound(c, '?') for c in COLUMNS)}, ?, ?)"
)
_INSERT_HISTORY: Final = (
    f"INSERT OR REPLACE INTO history ({_HISTORY_COLUMNS})"
    f" VALUES ({', '.join(_bound(c, '?') for c in _HISTORY_NAMES)})"
)

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
        f"INSERT INTO tasks ({', '.join(COLUMNS)}, rev, writer)"
        f" SELECT {_bound_columns(COLUMNS, 2)}, ?, ?"
        f" FROM {_values(rows, len(COLUMNS))} WHERE column1"
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
    "lock": None,  # flow-controlled tasks are never claimed as submitted
    "partition": None,
    "shared": False,
}
assert set(_CLAIM_FIELDS) | set(_CLAIMED) == set(COLUMNS)


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
        for c in COLUMNS
    ]
    return (
        f"INSERT INTO tasks ({', '.join(COLUMNS)}, rev, writer)"
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


class _Shape:
    """The statements for every change with one set of field names, source and target."""

    __slots__ = ("lease_sql", "nulls", "source", "sql", "target", "updates")

    def __init__(self, names: tuple[str, ...], source: TaskStatus, target: TaskStatus) -> None:
        check_fields(names)
        clear = ", cancel_requested = 0" if (
            target in CLEARS_CANCEL and "cancel_requested" not in names
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
                params += _zeros((rows - len(part)) * (1 + len(COLUMNS)))
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
