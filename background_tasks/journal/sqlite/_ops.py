"""The SQLite journal's operations: one class per kind of write, built on the event loop
and run in the batch's worker thread, either by itself (``run``) or collected by the
batch's ``_Writer`` for a set-based statement (``add``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any, Final

from ..._errors import InvalidTransition
from .._protocol import Change, PeriodicRow, TaskRow
from .._sql import (
    LIVE,
    STATUS_INDEX,
    TERMINAL_SQL,
    Op,
    OpClasses,
    PurgeStep,
    Renew,
    RequestCancel,
    SetProgress,
    limit_conditions,
    row_values,
    to_row,
)
from ._batch import (
    _AT_FIELDS,
    _CANCEL_INDEX,
    _INSERT,
    _ROW_NULLS,
    _SHARED_INDEX,
    _claim_values,
    _Shape,
    _Writer,
)
from ._schema import _LIVE_KEY, _RETURNING


class _Op(Op):
    __slots__ = ()
    #: whether the operation bumps the change cursor (so the batch reads the counter)
    bumps = True

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
        values = list(row_values(row))
        values[STATUS_INDEX] = row.status.value
        values[_CANCEL_INDEX] = int(row.cancel_requested)
        values[_SHARED_INDEX] = int(row.shared)
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
                return to_row(live[0])
        w.conn.execute(_INSERT, (*self.values(), w.rev, w.owner))
        self.history(w.history)
        return row


class _InsertMany(_Op):
    """``insert_many``: every row goes with the batch's other plain inserts (one
    set-based INSERT per ``_MAX_ROWS`` rows, ``_Writer.flush``); a failure of any row
    fails the whole operation alone (the careful replay's SAVEPOINT undoes them all)."""

    __slots__ = ("inserts",)

    def __init__(self, rows: list[TaskRow]) -> None:
        super().__init__()
        self.inserts = [_Insert(row) for row in rows]

    def add(self, w: _Writer) -> None:
        inserts = self.inserts
        w.touched.update(op.row.id for op in inserts)
        w.inserts += inserts
        self.result = [op.row for op in inserts]

    def run(self, w: _Writer) -> list[TaskRow]:
        if w.grouped:
            w.inserts += self.inserts
            w.flush()
        else:
            for op in self.inserts:
                op.run(w)
        return [op.row for op in self.inserts]


class _AdvancePeriodic(_Op):
    """``advance_periodic``: the periodic row from the version its writer saw, and the
    tick's task with it (a plain insert: a live task holding its key fails it all)."""

    __slots__ = ("row", "state")
    _insert = (
        "INSERT INTO periodic (name, schedule, last_tick, next_tick, task_id, version)"
        " VALUES (?, ?, ?, ?, ?, 1) ON CONFLICT (name) DO NOTHING"
    )
    _update = (
        "UPDATE periodic SET schedule = ?, last_tick = ?, next_tick = ?, task_id = ?,"
        " version = version + 1 WHERE name = ? AND version = ?"
    )

    def __init__(self, state: PeriodicRow, row: TaskRow | None) -> None:
        super().__init__()
        self.state = state
        self.row = row

    def run(self, w: _Writer) -> bool:
        s = self.state
        values = (s.schedule, s.last_tick, s.next_tick, s.task_id)
        if s.version == 1:
            done = w.conn.execute(self._insert, (s.name, *values)).rowcount
        else:
            done = w.conn.execute(self._update, (*values, s.name, s.version - 1)).rowcount
        if not done:
            return False
        if self.row is not None:
            insert = _Insert(self.row)
            w.conn.execute(_INSERT, (*insert.values(), w.rev, w.owner))
            insert.history(w.history)
        return True


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
        # A change with lease_before (a takeover, rare) or limits (a flow-controlled
        # claim, counted against the rows as this batch left them) runs by itself.
        c = self.change
        if c.lease_before is None and c.limits is None and not w.alone(c.task_id):
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
        conditions = None
        if c.limits is not None:
            c.limits.refused = None
            conditions = limit_conditions(
                c.limits, c.task_id, c.at, tasks="tasks", starts="starts", mark="?",
                true="1", same="IS",
            )  # fmt: skip
            sql += "".join(f" AND {cond}" for _, cond, _ in conditions)
            params = (*params, *(p for _, _, values in conditions for p in values))
        try:
            applied = w.conn.execute(sql, params).rowcount > 0
        except sqlite3.IntegrityError as exc:
            if c.target in LIVE and "tasks.key" in str(exc):
                found = w.conn.execute("SELECT key FROM tasks WHERE id = ?", (c.task_id,))
                key = (found.fetchone() or (None,))[0]
                raise InvalidTransition(
                    f"another unfinished task holds the key {key!r}; task {c.task_id} cannot"
                    f" go back to {self.shape.target}"
                ) from exc
            raise
        if applied:
            w.history.append(self.history())
        if conditions is not None:
            self._limited(w, applied, conditions)
        return applied

    def _limited(self, w: _Writer, applied: bool, conditions: list[tuple[str, str, Any]]) -> None:
        """After a claim with limits: record its start (a rate), or say what refused it."""
        c = self.change
        limits = c.limits
        assert limits is not None
        if applied:
            if limits.rate is not None:
                w.conn.execute("INSERT INTO starts (queue, at) VALUES (?, ?)", (limits.queue, c.at))
                w.conn.execute(
                    "DELETE FROM starts WHERE queue = ? AND at <= ?",
                    (limits.queue, c.at - limits.period),
                )
            return
        still = w.conn.execute(
            "SELECT 1 FROM tasks WHERE id = ? AND version = ? AND status = ?",
            (c.task_id, c.version, self.shape.source),
        ).fetchone()
        if still is None:
            return  # the row moved on: lost, not refused
        for reason, condition, values in conditions:
            if not w.conn.execute(f"SELECT {condition}", values).fetchone()[0]:
                limits.refused = reason
                return


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


class _RequestCancel(_Op, RequestCancel):
    __slots__ = ()
    _sql = (
        "UPDATE tasks SET cancel_requested = 1, rev = ?, writer = ?"
        " WHERE id = ? AND status = 'running'" + _RETURNING
    )

    def run(self, w: _Writer) -> TaskRow | None:
        found = w.conn.execute(self._sql, (w.rev, w.owner, self.task_id)).fetchall()
        return to_row(found[0]) if found else None


class _SetProgress(_Op, SetProgress):
    __slots__ = ()
    bumps = False
    _sql = (
        "UPDATE tasks SET progress_json = ?"
        " WHERE id = ? AND status = 'running' AND owner = ? AND version = ?"
    )

    def run(self, w: _Writer) -> None:
        w.conn.execute(self._sql, self.params)


class _Renew(_Op, Renew):
    __slots__ = ()
    bumps = False
    _sql = "UPDATE tasks SET lease_until = ? WHERE status = 'running' AND owner = ?"

    def run(self, w: _Writer) -> int:
        if not self.exclude:
            return w.conn.execute(self._sql, (self.lease_until, self.owner)).rowcount
        marks = ", ".join("?" * len(self.exclude))
        sql = f"{self._sql} AND id NOT IN ({marks})"
        return w.conn.execute(sql, (self.lease_until, self.owner, *self.exclude)).rowcount


class _PurgeStep(_Op, PurgeStep):
    __slots__ = ()
    bumps = False
    _select = f"SELECT id FROM tasks WHERE finished_at < ? AND status IN {TERMINAL_SQL} LIMIT ?"

    def run(self, w: _Writer) -> int:
        ids = w.conn.execute(self._select, (self.older_than, self.batch)).fetchall()
        if ids:
            w.conn.executemany("DELETE FROM history WHERE task_id = ?", ids)
            w.conn.executemany("DELETE FROM tasks WHERE id = ?", ids)
        return len(ids)


#: The classes ``SQLJournal``'s verbs write with.
OPS: Final = OpClasses(_RequestCancel, _SetProgress, _Renew, _PurgeStep)
