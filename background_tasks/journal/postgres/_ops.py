"""The PostgreSQL journal's operations: one class per kind of write, run in the batch's
worker thread by ``run`` against the batch's transaction (``_Tx``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

import psycopg

from .._protocol import Change, PeriodicRow, TaskRow
from .._sql import (
    STATUS_INDEX,
    Op,
    OpClasses,
    PurgeStep,
    Renew,
    RequestCancel,
    SetProgress,
    row_values,
    to_row,
)

if TYPE_CHECKING:
    from . import PostgresJournal


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


class _Op(Op):
    __slots__ = ()
    #: lock order inside a batch: inserts (0), single rows by id (1), many rows (2)
    rank = 2

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
        values = list(row_values(row))
        values[STATUS_INDEX] = row.status.value
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
                    return to_row(live)
        tx.touched.append(row.id)
        tx.history.append(
            (row.id, row.version, None, row.status.value, row.attempts, row.created_at,
             row.owner, row.error_json)
        )  # fmt: skip
        return row


class _InsertMany(_Op):
    """``insert_many``: all rows in one INSERT from one array per column, and all
    their history lines in one more (two statements, whatever the count)."""

    __slots__ = ("rows",)
    rank = 0

    def __init__(self, rows: list[TaskRow]) -> None:
        super().__init__()
        self.rows = rows

    def describe(self) -> str:
        return f"insert {len(self.rows)} tasks"

    def run(self, tx: _Tx) -> list[TaskRow]:
        tx.flush()
        rows = self.rows
        columns: list[list[Any]] = [list(c) for c in zip(*map(row_values, rows), strict=True)]
        columns[STATUS_INDEX] = [status.value for status in columns[STATUS_INDEX]]
        sql = tx.j._sql
        tx.cur.execute(sql["insert_rows"], (tx.j._owner, *columns))
        history = (
            [r.id for r in rows], [r.version for r in rows], [None] * len(rows),
            [r.status.value for r in rows], [r.attempts for r in rows],
            [r.created_at for r in rows], [r.owner for r in rows], [r.error_json for r in rows],
        )  # fmt: skip
        tx.cur.execute(sql["insert_history_rows"], history)
        tx.touched += [r.id for r in rows]
        return rows


class _AdvancePeriodic(_Op):
    """``advance_periodic``: the periodic row from the version its writer saw, and the
    tick's task with it (a plain insert: a live task holding its key fails it all).
    First in a batch (rank -1, by name): it locks the periodic row before any task's."""

    __slots__ = ("row", "state")
    rank = -1

    def __init__(self, state: PeriodicRow, row: TaskRow | None) -> None:
        super().__init__()
        self.state = state
        self.row = row

    @property
    def order(self) -> tuple[int, str]:
        return (-1, self.state.name)

    def describe(self) -> str:
        return f"advance periodic task {self.state.name}"

    def run(self, tx: _Tx) -> bool:
        tx.flush()
        s, sql = self.state, tx.j._sql
        values = (s.schedule, s.last_tick, s.next_tick, s.task_id)
        if s.version == 1:
            found = tx.cur.execute(sql["periodic_first"], (s.name, *values)).fetchone()
        else:
            params = (*values, s.name, s.version - 1)
            found = tx.cur.execute(sql["periodic_advance"], params).fetchone()
        if found is None:
            return False
        row = self.row
        if row is not None:
            task = list(row_values(row))
            task[STATUS_INDEX] = row.status.value
            task.append(tx.j._owner)
            tx.inserts.append(tuple(task))
            tx.touched.append(row.id)
            tx.history.append(
                (row.id, row.version, None, row.status.value, row.attempts, row.created_at,
                 row.owner, row.error_json)
            )  # fmt: skip
        return True


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
        return to_row(found)


class _LimitedApply(_Apply):
    """A claim with ``Change.limits``: the statement counts what the limits count and,
    if it did not apply while the row was still as expected, returns the row with the
    first condition that failed (its last column). ``keys`` are the advisory locks the
    batch takes first (in one order for every manager), so that no two transactions
    count at once: under READ COMMITTED each would count without the other's claim."""

    __slots__ = ("keys",)

    def __init__(self, change: Change, sql: str, params: list[Any], keys: list[int]) -> None:
        super().__init__(change, sql, params)
        self.keys = keys

    def run(self, tx: _Tx) -> TaskRow | None:
        tx.flush()
        assert self.change.limits is not None
        self.change.limits.refused = None
        if tx.pending is not None:
            cur = tx.cur.connection.cursor()
            cur.execute(self.sql, self.params)
            tx.pending.append((self, cur))
            return None
        return self.done(tx, tx.cur.execute(self.sql, self.params).fetchone())

    def done(self, tx: _Tx, found: Sequence[Any] | None) -> TaskRow | None:
        if found is None:
            return None
        why = found[-1]
        if why is not None:  # not applied; the row still as expected
            if why != "race":
                assert self.change.limits is not None
                self.change.limits.refused = why
            return None
        tx.touched.append(self.change.task_id)
        return to_row(found)


def advisory_key(schema: str, kind: str, name: str | None) -> int:
    """A 64-bit advisory lock key for one queue, partition or lock of one schema."""
    digest = hashlib.blake2b(f"{schema}\0{kind}\0{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class _RequestCancel(_Op, RequestCancel):
    __slots__ = ()
    rank = 1

    @property
    def order(self) -> tuple[int, str]:
        return (1, self.task_id)

    def run(self, tx: _Tx) -> TaskRow | None:
        tx.flush()
        found = tx.cur.execute(tx.j._sql["request_cancel"], (tx.j._owner, self.task_id)).fetchone()
        if found is None:
            return None
        tx.touched.append(self.task_id)
        return to_row(found)


class _SetProgress(_Op, SetProgress):
    __slots__ = ()
    rank = 1

    @property
    def order(self) -> tuple[int, str]:
        return (1, self.params[1])

    def run(self, tx: _Tx) -> None:
        tx.flush()
        tx.cur.execute(tx.j._sql["set_progress"], self.params)


class _Renew(_Op, Renew):
    __slots__ = ()

    def run(self, tx: _Tx) -> int:
        tx.flush()
        params = (self.lease_until, self.owner, list(self.exclude))
        return tx.cur.execute(tx.j._sql["renew"], params).rowcount


class _PurgeStep(_Op, PurgeStep):
    __slots__ = ()

    def run(self, tx: _Tx) -> int:
        tx.flush()
        sql = tx.j._sql
        ids = [r[0] for r in tx.cur.execute(sql["purge"], (self.older_than, self.batch))]
        if ids:
            tx.cur.execute(sql["purge_history"], (ids,))
        return len(ids)


#: The classes ``SQLJournal``'s verbs write with.
OPS: Final = OpClasses(_RequestCancel, _SetProgress, _Renew, _PurgeStep)
