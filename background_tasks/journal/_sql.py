"""What the two SQL journals share, written once so that they cannot drift apart.

The SQLite and PostgreSQL journals keep one table of tasks and one of history lines, in
two dialects, and run their writes differently for good reasons (set-based statements
on one file; pipelined statements over a network). Everything else is the same and
lives here:

* the columns of a row and how a row read back becomes a ``TaskRow`` (``to_row``), what
  a ``Change`` may set and which targets clear a cancel request;
* the checks both constructors and both ``open``\\ s make (``check_seconds``,
  ``check_schema``) and ``apply``'s check of ``Change.fields`` (``check_fields``), with
  one message each;
* the base of every write operation (``Op``) and the parameters of the operations both
  journals have (``RequestCancel``, ``SetProgress``, ``Renew``, ``PurgeStep``): a journal
  runs each with a class of its own that also derives from its own ``_Op`` (how its
  batches run an operation), for example ``class _Renew(_Op, Renew)``;
* ``SQLJournal``, the verbs both journals run the same way: every read but
  ``runnable``/``changes`` (whose snapshots differ), and the writes that are one
  operation each. A journal provides ``_write(op)`` (its group commit), ``_fetch(sql,
  params)`` (one read: every row), the statement texts by name (``_sql``), its
  placeholder (``_mark``) and its operation classes (``_ops``, an ``OpClasses``).
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from operator import attrgetter
from typing import Any, ClassVar, Final, NamedTuple, Protocol

from .._errors import JournalError
from .._models import ErrorInfo, TransitionRecord, utc
from .._states import TaskStatus
from ._group_commit import purge_in_steps
from ._protocol import ClaimLimits, PeriodicRow, TaskRow

__all__ = [
    "CLEARS_CANCEL",
    "COLUMNS",
    "HISTORY_SELECT",
    "LIVE",
    "LIVE_SQL",
    "SETTABLE",
    "STATUS",
    "STATUS_INDEX",
    "TERMINAL_SQL",
    "Op",
    "OpClasses",
    "PurgeStep",
    "Renew",
    "RequestCancel",
    "SQLJournal",
    "SetProgress",
    "check_batch",
    "check_fields",
    "check_schema",
    "check_seconds",
    "close_all",
    "limit_conditions",
    "not_open",
    "row_values",
    "to_row",
    "waiting_by_queue_sql",
]  # fmt: skip

P, R, Y = TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.RETRYING
C, F, X = TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED

# --------------------------------------------------------------------------- columns

#: The task table's columns in ``TaskRow`` order (the tables add ``rev`` and ``writer``).
COLUMNS: Final = tuple(f.name for f in dataclasses.fields(TaskRow))
#: A row's values in column order (a status still a ``TaskStatus``: see ``STATUS_INDEX``).
row_values: Final = attrgetter(*COLUMNS)
STATUS_INDEX: Final = COLUMNS.index("status")
#: A stored status text -> its ``TaskStatus``.
STATUS: Final = {s.value: s for s in TaskStatus}
#: Fields a Change may set: every TaskRow attribute but the ones the journal owns.
SETTABLE: Final = frozenset(COLUMNS) - {"id", "status", "version"}
#: Targets that clear a cancel request (every one but RUNNING) unless the change sets it.
CLEARS_CANCEL: Final = frozenset({P, Y, C, F, X})
#: Unfinished statuses: at most one task with a key is in one of them.
LIVE: Final = frozenset({P, R, Y})
LIVE_SQL: Final = "('pending', 'running', 'retrying')"
TERMINAL_SQL: Final = "('completed', 'failed', 'cancelled')"
#: The history columns ``history_records`` reads, in its order.
HISTORY_SELECT: Final = "SELECT task_id, source, target, attempt, at, owner, error_json"


def to_row(r: Sequence[Any]) -> TaskRow:
    """A row read in ``COLUMNS`` order (``cancel_requested`` an int or a bool)."""
    return TaskRow(
        r[0], r[1], r[2], STATUS[r[3]], r[4], r[5], r[6], r[7], r[8], r[9], r[10], r[11],
        r[12], r[13], r[14], r[15], r[16], r[17], r[18], r[19], r[20], bool(r[21]), r[22],
        r[23], r[24], bool(r[25]),
    )  # fmt: skip


def history_records(rows: Iterable[Sequence[Any]]) -> list[TransitionRecord]:
    """History lines read with ``HISTORY_SELECT``, as the records ``history`` returns."""
    return [
        TransitionRecord(
            task_id=tid,
            source=None if source is None else STATUS[source],
            target=STATUS[target],
            attempt=attempt,
            at=utc(at),
            owner=owner,
            error=None if error is None else ErrorInfo.model_validate_json(error),
        )
        for tid, source, target, attempt, at, owner, error in rows
    ]


# --------------------------------------------------------------------------- checks


def check_seconds(**values: object) -> None:
    """ValueError naming the first argument that is not a positive finite number."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{name} must be a number of seconds, not {value!r}")
        if not (0 < value < float("inf")):
            raise ValueError(f"{name} must be a positive finite number of seconds")


def check_fields(names: Iterable[str]) -> None:
    """ValueError unless every name is a field a ``Change`` may set (``SETTABLE``)."""
    bad = [n for n in names if n not in SETTABLE]
    if bad:
        raise ValueError(f"Change.fields has names that are not settable TaskRow fields: {bad}")


def check_batch(rows: Sequence[TaskRow]) -> builtins.list[TaskRow]:
    """``insert_many``'s rows as a list; ValueError for a row with a key."""
    rows = list(rows)
    keyed = [row.id for row in rows if row.key is not None]
    if keyed:
        raise ValueError(f"insert_many stores tasks without keys; these have one: {keyed[:5]}")
    return rows


def check_schema(
    where: str, version: int | None, tables: Iterable[str], *, known: int, holder: str
) -> None:
    """Refuse to open storage (``holder``: "the file", "the schema") that holds tables but
    no schema version (something else's), or a schema newer than ``known``."""
    tables = sorted(tables)
    if version is None and tables:
        raise JournalError(
            f"cannot open journal {where}: {holder} holds something else (tables"
            f" {', '.join(tables)}), not a background_tasks journal"
        )
    if version is not None and version > known:
        raise JournalError(
            f"cannot open journal {where}: its schema version {version} is newer than this"
            f" version of background_tasks knows ({known}); upgrade background_tasks"
        )


def not_open(where: str) -> JournalError:
    return JournalError(f"journal {where} is not open")


class _Closable(Protocol):
    def close(self) -> None: ...


def close_all(conns: Iterable[_Closable | None], errors: type[Exception]) -> None:
    """Close every connection, ignoring the driver's ``errors`` (closing is best effort)."""
    for conn in conns:
        if conn is not None:
            with contextlib.suppress(errors):
                conn.close()


# --------------------------------------------------------------------------- operations


class Op:
    """One write in a batch; the batch sets ``result`` (or ``error``) and the caller reads
    it (``GroupCommit``)."""

    __slots__ = ("error", "result")
    #: whether the caller waits for the commit (False: progress, which may ride along)
    awaited = True
    #: whether the caller is woken before the others of the batch (see GroupCommit)
    first = False
    #: what to call once the batch ended, for a caller that does not wait (``apply_soon``)
    settle: Callable[[Any], None] | None = None

    def __init__(self) -> None:
        self.result: Any = None
        self.error: BaseException | None = None


class RequestCancel(Op):
    __slots__ = ("task_id",)

    def __init__(self, task_id: str) -> None:
        super().__init__()
        self.task_id = task_id


class SetProgress(Op):
    """``params``: (progress_json, task_id, owner, version), as the statements bind them."""

    __slots__ = ("params",)
    awaited = False

    def __init__(self, params: tuple[Any, ...]) -> None:
        super().__init__()
        self.params = params


class Renew(Op):
    """``exclude``: ids whose lease is left to run out (their state is not known)."""

    __slots__ = ("exclude", "lease_until", "owner")

    def __init__(self, owner: str, lease_until: float, exclude: tuple[str, ...]) -> None:
        super().__init__()
        self.owner = owner
        self.lease_until = lease_until
        self.exclude = exclude


class PurgeStep(Op):
    __slots__ = ("batch", "older_than")

    def __init__(self, older_than: float, batch: int) -> None:
        super().__init__()
        self.older_than = older_than
        self.batch = batch


# --------------------------------------------------------------------------- verbs


class OpClasses(NamedTuple):
    """A journal's classes for the operations ``SQLJournal``'s verbs write."""

    request_cancel: type[RequestCancel]
    set_progress: type[SetProgress]
    renew: type[Renew]
    purge_step: type[PurgeStep]


class SQLJournal:
    """The verbs both SQL journals run the same way (see the module docstring)."""

    #: the statements ``SQLJournal`` runs, by name: get, select (a ``list`` without its
    #: WHERE), history, expired, counts, counts_by_queue, finished_since, oldest, periodic
    _sql: dict[str, str]
    #: the driver's placeholder for a bound value
    _mark: ClassVar[str]
    #: the journal's classes for the operations these verbs write
    _ops: ClassVar[OpClasses]

    def _write(self, op: Op) -> Awaitable[Any]:
        """Add ``op`` to the open batch; the awaitable returns its result once committed."""
        raise NotImplementedError

    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> builtins.list[Any]:
        """Every row of one read."""
        raise NotImplementedError

    # ------------------------------------------------------------------ writing

    async def request_cancel(self, task_id: str) -> TaskRow | None:
        result: TaskRow | None = await self._write(self._ops.request_cancel(task_id))
        return result

    async def set_progress(
        self, task_id: str, owner: str, version: int, progress_json: str
    ) -> None:
        await self._write(self._ops.set_progress((progress_json, task_id, owner, version)))

    async def renew(self, owner: str, lease_until: float, exclude: Collection[str] = ()) -> None:
        await self._write(self._ops.renew(owner, lease_until, tuple(exclude)))

    async def purge(self, older_than: float, batch: int = 1000) -> int:
        step = self._ops.purge_step
        return await purge_in_steps(lambda: self._write(step(older_than, batch)), batch)

    # ------------------------------------------------------------------ reading

    async def get(self, task_id: str) -> TaskRow | None:
        found = await self._fetch(self._sql["get"], (task_id,))
        return to_row(found[0]) if found else None

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
                where.append(f"{column} = {self._mark}")
                params.append(value.value if isinstance(value, TaskStatus) else value)
        sql = self._sql["select"] + (" WHERE " + " AND ".join(where) if where else "")
        params.append(limit)
        rows = await self._fetch(sql + f" ORDER BY id DESC LIMIT {self._mark}", params)
        return [to_row(r) for r in rows]

    async def history(self, task_id: str) -> builtins.list[TransitionRecord]:
        return history_records(await self._fetch(self._sql["history"], (task_id,)))

    async def expired(self, now: float) -> builtins.list[TaskRow]:
        return [to_row(r) for r in await self._fetch(self._sql["expired"], (now,))]

    async def counts(self) -> dict[TaskStatus, int]:
        counts = dict.fromkeys(TaskStatus, 0)
        for status, n in await self._fetch(self._sql["counts"]):
            counts[STATUS[status]] = n
        return counts

    # ------------------------------------------------------------------ InspectableJournal

    async def counts_by_queue(self) -> dict[tuple[str, TaskStatus], int]:
        """How many tasks each queue has in each status (only pairs that occur).

        Reads the whole table: linear in the number of rows the journal keeps (an index
        on (queue, status) would cost every status change a b-tree write).
        """
        rows = await self._fetch(self._sql["counts_by_queue"])
        return {(queue, STATUS[status]): n for queue, status, n in rows}

    async def finished_since(self, since: float) -> dict[TaskStatus, int]:
        """How many tasks finished (COMPLETED, FAILED, CANCELLED) at or after ``since``
        (epoch seconds), by status; every finished status is a key."""
        counts = {s: 0 for s in TaskStatus if s.is_terminal}
        for status, n in await self._fetch(self._sql["finished_since"], (since,)):
            counts[STATUS[status]] = n
        return counts

    async def oldest(self, status: TaskStatus) -> TaskRow | None:
        """The earliest created task in ``status`` (ids sort by creation); None if none."""
        found = await self._fetch(self._sql["oldest"], (TaskStatus(status).value,))
        return to_row(found[0]) if found else None

    async def waiting_by_queue(self, now: float) -> dict[str, tuple[int, int]]:
        """Per queue, due waiting tasks: (for a worker or a limit, on a lock). Reads
        every waiting row, like ``counts_by_queue``."""
        rows = await self._fetch(self._sql["waiting_by_queue"], (now, now))
        return {queue: (int(free), int(locked)) for queue, free, locked in rows}

    # ------------------------------------------------------------------ PeriodicJournal

    async def periodic(self) -> builtins.list[PeriodicRow]:
        """Every periodic task's state, by name."""
        return [PeriodicRow(*r) for r in await self._fetch(self._sql["periodic"])]


# --------------------------------------------------------------------------- flow control


def waiting_by_queue_sql(tasks: str, mark: str) -> str:
    """``waiting_by_queue``'s statement (parameters: now, now)."""
    waiting = "('pending', 'retrying')"
    locked = (
        f"t.lock IS NOT NULL AND (EXISTS (SELECT 1 FROM {tasks} o WHERE o.lock = t.lock"
        f" AND o.status = 'running') OR EXISTS (SELECT 1 FROM {tasks} o WHERE o.lock = t.lock"
        f" AND o.status IN {waiting} AND o.scheduled_at <= {mark}"
        " AND (o.priority > t.priority OR (o.priority = t.priority AND o.id < t.id))))"
    )
    return (
        f"SELECT queue, sum(CASE WHEN locked THEN 0 ELSE 1 END),"
        f" sum(CASE WHEN locked THEN 1 ELSE 0 END) FROM (SELECT t.queue AS queue,"
        f" ({locked}) AS locked FROM {tasks} t WHERE t.status IN {waiting}"
        f" AND t.scheduled_at <= {mark}) w GROUP BY queue"
    )


def limit_conditions(
    limits: ClaimLimits,
    task_id: str,
    at: float,
    *,
    tasks: str,
    starts: str,
    mark: str,
    true: str,
    same: str,
) -> list[tuple[str, str, list[Any]]]:
    """The conditions of a claim's ``ClaimLimits``, in the order ``refused`` reports
    them: (reason, SQL that must be true, its parameters). ``tasks`` and ``starts`` are
    the tables, ``true`` the dialect's true, ``same`` its NULL-safe equality."""
    m = mark
    out: list[tuple[str, str, list[Any]]] = []
    if limits.lock is not None:
        p = limits.priority
        out.append((
            "lock",
            f"NOT EXISTS (SELECT 1 FROM {tasks} o WHERE o.lock = {m} AND o.status = 'running')"
            f" AND NOT EXISTS (SELECT 1 FROM {tasks} o WHERE o.lock = {m}"
            f" AND o.status IN ('pending', 'retrying') AND o.scheduled_at <= {m}"
            f" AND (o.priority > {m} OR (o.priority = {m} AND o.id < {m})))",
            [limits.lock, limits.lock, at, p, p, task_id],
        ))  # fmt: skip
    running = f"o.shared = {true} AND o.status = 'running'"
    if limits.limit is not None:
        out.append((
            "limit",
            f"(SELECT count(*) FROM {tasks} o WHERE o.queue = {m} AND {running}) < {m}",
            [limits.queue, limits.limit],
        ))  # fmt: skip
    if limits.per_partition is not None:
        out.append((
            "partition",
            f"(SELECT count(*) FROM {tasks} o WHERE o.queue = {m} AND o.partition {same} {m}"
            f" AND {running}) < {m}",
            [limits.queue, limits.partition, limits.per_partition],
        ))  # fmt: skip
    if limits.rate is not None:
        out.append((
            "rate",
            f"(SELECT count(*) FROM {starts} s WHERE s.queue = {m} AND s.at > {m}) < {m}",
            [limits.queue, at - limits.period, limits.rate],
        ))  # fmt: skip
    return out
