"""``bgtasks``: look into a journal and act on it, run a worker, or watch the demo.

Every command but ``demo`` opens an existing journal and goes through the same journal
calls as the library (``cancel`` and ``requeue`` use the same conditional writes, so they
are safe while other processes run tasks on that journal). A user mistake prints one line
on stderr and exits 1; a malformed command line exits 2; an interrupt exits 130.

Built on argparse (standard library) rather than typer: eight small commands do not need
a framework, argparse lets us decide exactly what goes to stderr (one line, no panels),
and the CLI adds no dependency beyond rich, which draws the tables and progress bars.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import logging
import os
import re
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import anyio

from ._errors import BackgroundTasksError, InvalidTransition
from ._extras import DISTRIBUTION, missing_extra
from ._manager import BackgroundTaskManager
from ._states import TaskStatus
from ._writer import cancel_row, requeue_row
from .journal._protocol import InspectableJournal, Journal, PeriodicJournal, PeriodicRow, TaskRow
from .journal._rows import record
from .journal.sqlite import SQLiteJournal

try:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text
except ImportError as exc:  # pragma: no cover - tested in a subprocess without rich
    raise missing_extra("the bgtasks command line", "cli", exc) from exc

__all__ = ["CliError", "distribution_version", "main", "parse_duration"]

PROG = "bgtasks"
#: How many rows ``status`` and bulk ``requeue`` read per status (see ``_scan``).
SCAN_LIMIT = 100_000
STATUS_STYLE = {
    TaskStatus.PENDING: "cyan",
    TaskStatus.RUNNING: "bold blue",
    TaskStatus.RETRYING: "yellow",
    TaskStatus.COMPLETED: "green",
    TaskStatus.FAILED: "bold red",
    TaskStatus.CANCELLED: "magenta",
}
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class CliError(Exception):
    """A user mistake: printed as one line on stderr, exit status 1."""


# ------------------------------------------------------------------ argument types


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """Seconds in ``30s``, ``15m``, ``2h``, ``7d``, ``1w`` or a sum such as ``1h30m``."""
    compact = text.strip().lower().replace(" ", "")
    if not compact or _DURATION_PART.sub("", compact):
        raise ValueError(
            f"invalid duration {text!r}: use a number and a unit (s, m, h, d, w), "
            "e.g. 30s, 15m, 2h, 7d or 1h30m"
        )
    return sum(float(n) * _UNIT[unit] for n, unit in _DURATION_PART.findall(compact))


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _status(text: str) -> TaskStatus:
    try:
        return TaskStatus(text.strip().lower())
    except ValueError:
        names = ", ".join(s.value for s in TaskStatus)
        raise argparse.ArgumentTypeError(f"unknown status {text!r} (choose from {names})") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2), like every other error."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(EXIT_USAGE)


def distribution_version() -> str:
    """The installed distribution's version, as ``pip`` knows it (importlib.metadata);
    for a source tree that is not installed, the package's own ``__version__``, saying so."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        from . import __version__

        return f"{__version__} (not installed: {Path(__file__).resolve().parent})"


# ------------------------------------------------------------------ output helpers


def _console(*, stderr: bool = False) -> Console:
    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal:
        # Piped or captured: whole lines, never a table squeezed or cut to fit 80 columns.
        console = Console(stderr=stderr, highlight=False, width=1000)
    return console


def _span(seconds: float) -> str:
    """A short human duration: 850ms, 12.3s, 4m05s, 2h10m, 3d04h."""
    seconds = abs(seconds)
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def _ago(ts: float | None, now: float) -> str:
    if ts is None:
        return "-"
    return f"{_span(now - ts)} ago" if ts <= now else f"in {_span(ts - now)}"


def _iso(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


def _styled(status: TaskStatus) -> Text:
    return Text(status.value, style=STATUS_STYLE[status])


def _one_line(text: str, width: int = 80) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


#: The statuses in which a record's error is the current one: the attempt that failed the
#: task, or the one it is waiting to retry. In any other status (completed, running again,
#: pending after an interruption, cancelled) it is an earlier attempt's.
_ERROR_IS_CURRENT = frozenset({TaskStatus.FAILED, TaskStatus.RETRYING})


def _info(row: TaskRow) -> str:
    """What is most worth seeing about a task in one cell: its error, progress or result."""
    if row.error_json is not None and row.status in _ERROR_IS_CURRENT:
        error = json.loads(row.error_json)
        return _one_line(f"{error.get('type')}: {error.get('message')}")
    if row.progress_json is not None and not row.status.is_terminal:
        progress = json.loads(row.progress_json)
        fraction = progress.get("fraction")
        text = "" if fraction is None else f"{fraction:.0%} "
        return _one_line(text + (progress.get("message") or ""))
    if row.result_json is not None:
        return _one_line(f"-> {row.result_json}")
    return ""


@dataclass(slots=True)
class _Column:
    """A column of a table that must fit the terminal without cutting a task id."""

    header: str
    cells: list[Text] = field(default_factory=list)
    #: 0: always shown; otherwise hidden when the terminal is too narrow, highest first
    drop: int = 0
    #: None: never shrinks (ids, statuses, counts); else it may shrink to this width,
    #: folding its text (names) or cutting it with an ellipsis (free text: make its cells
    #: ``Text(..., no_wrap=True, overflow="ellipsis")``)
    shrink_to: int | None = None

    def width(self) -> int:
        return max([len(self.header), *(cell.cell_len for cell in self.cells)])

    def least(self) -> int:
        return self.width() if self.shrink_to is None else min(self.width(), self.shrink_to)


def _widths(columns: list[_Column], room: int) -> list[int]:
    """Each column's width, the padding between them left out of ``room``: the fixed ones
    as wide as their cells; the shrinkable ones at least ``shrink_to`` and then, left to
    right, as wide as their cells while there is room; below ``shrink_to`` (to 4 at
    least, the widest first) only if the fixed ones leave less."""
    widths = [c.least() for c in columns]
    spare = room - sum(widths)
    for i, column in enumerate(columns):
        if column.shrink_to is not None and spare > 0:
            grow = min(spare, column.width() - widths[i])
            widths[i] += grow
            spare -= grow
    while spare < 0:
        narrower = [i for i, c in enumerate(columns) if c.shrink_to is not None and widths[i] > 4]
        if not narrower:
            break
        widths[max(narrower, key=widths.__getitem__)] -= 1
        spare += 1
    return widths


def _fit(console: Console, columns: list[_Column]) -> None:
    """Print ``columns`` as one table whose ids are never cut.

    rich squeezes a table that is wider than the terminal by cutting its cells, ids
    included, which then cannot be pasted into ``bgtasks show``. Here only the columns
    given ``shrink_to`` shrink (they fold, or end in an ellipsis); while that is not
    enough, the optional columns are left out (a note says which); and a terminal that
    is narrower still gets lines that wrap, never ids that are cut.
    """
    shown = list(columns)

    def room() -> int:
        return console.width - 2 * (len(shown) - 1)  # one space each side between columns

    hidden: list[_Column] = []
    for column in sorted((c for c in columns if c.drop), key=lambda c: -c.drop):
        if sum(c.least() for c in shown) <= room():
            break
        shown.remove(column)
        hidden.append(column)
    widths = _widths(shown, room())
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column, width in zip(shown, widths, strict=True):
        table.add_column(
            column.header, width=width, no_wrap=column.shrink_to is None, overflow="fold"
        )
    for cells in zip(*(column.cells for column in shown), strict=True):
        table.add_row(*cells)
    terminal = console.width
    try:
        console.width = max(terminal, sum(widths) + 2 * (len(shown) - 1))
        console.print(table)
    finally:
        console.width = terminal
    if hidden:
        names = ", ".join(c.header for c in columns if c in hidden)
        console.print(f"[dim]too narrow for {names}; --json shows every field[/dim]")


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def _record_json(row: TaskRow) -> dict[str, Any]:
    data: dict[str, Any] = record(row).model_dump(mode="json")
    return data


# ------------------------------------------------------------------ journals


def _owner() -> str:
    return f"cli:{socket.gethostname()}:{os.getpid()}"


def _sqlite_journal(path: Path, **options: Any) -> SQLiteJournal:
    return SQLiteJournal(path, **options)


def _is_postgres(path: str) -> bool:
    """A PostgreSQL connection string (URI or libpq key=value) rather than a file path."""
    return path.startswith(("postgresql://", "postgres://")) or (
        "=" in path and any(k in path for k in ("host=", "dbname=", "user="))
    )


def _postgres_journal(dsn: str, schema: str) -> InspectableJournal:
    """An existing PostgreSQL journal (its tables in ``schema``); never creates one."""
    try:
        import psycopg

        from .journal.postgres import PostgresJournal
    except ImportError as exc:
        raise CliError(str(missing_extra("bgtasks on PostgreSQL", "postgres", exc))) from None
    try:
        journal = PostgresJournal(dsn, schema=schema)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    try:
        with psycopg.connect(dsn, connect_timeout=10) as conn:
            found = conn.execute("SELECT to_regclass(%s)", (f'"{journal.schema}".tasks',))
            exists = found.fetchone()
    except psycopg.Error as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]  # no DSN in it
        raise CliError(f"cannot open journal {journal.where}: {reason}") from None
    if exists is None or exists[0] is None:
        raise CliError(f"no journal in {journal.where} (only a manager creates one)")
    return journal


def _where(journal: Journal) -> str:
    """The journal as messages name it: a file's path, a database without its password."""
    if isinstance(journal, SQLiteJournal):
        return journal.path
    return str(getattr(journal, "where", "the journal"))  # PostgresJournal.where: redacted


@asynccontextmanager
async def open_journal(
    path: str, schema: str = "background_tasks"
) -> AsyncIterator[InspectableJournal]:
    """An existing journal, opened for reading and conditional writes; never creates one:
    a SQLite file, or a PostgreSQL database given by its connection string."""
    journal: InspectableJournal
    if _is_postgres(path):
        journal = await anyio.to_thread.run_sync(_postgres_journal, path, schema)
    else:
        where = anyio.Path(path)
        if not await where.exists():
            raise CliError(f"no journal at {path} (only 'bgtasks demo' creates one)")
        if not await where.is_file():
            raise CliError(f"{path} is not a journal file")
        journal = _sqlite_journal(Path(path), create=False)
    await journal.open(_owner())
    try:
        yield journal
    finally:
        with anyio.CancelScope(shield=True):
            await journal.close()


async def _scan(journal: Journal, status: TaskStatus, **filters: Any) -> list[TaskRow]:
    """Every row with this status (up to SCAN_LIMIT), newest first: the running and
    retrying tasks ``status`` lists, the tasks a bulk ``requeue`` acts on. (The counts
    ``status`` shows come from the journal: ``counts`` and ``InspectableJournal``.)
    """
    return await journal.list(status=status, limit=SCAN_LIMIT, **filters)


async def _get(journal: Journal, task_id: str, path: str) -> TaskRow:
    row = await journal.get(task_id)
    if row is None:
        raise CliError(f"no task with id {task_id!r} in {path}")
    return row


# ------------------------------------------------------------------ reading commands


async def cmd_list(args: argparse.Namespace) -> int:
    async with open_journal(args.journal, args.schema) as journal:
        rows = await journal.list(
            status=args.status, queue=args.queue, name=args.name, limit=args.limit
        )
    if args.json:
        _print_json([_record_json(row) for row in rows])
        return EXIT_OK
    console = _console()
    if not rows:
        console.print("no tasks match")
        return EXIT_OK
    now = time.time()
    ids, names, queues = _Column("ID"), _Column("NAME", shrink_to=20), _Column("QUEUE", drop=3)
    statuses, priorities, tries = (
        _Column("STATUS"),
        _Column("PRI", drop=5),
        _Column("TRIES", drop=1),
    )
    created, took, info = (
        _Column("CREATED", drop=2),
        _Column("TOOK", drop=4),
        _Column("INFO", shrink_to=12),
    )
    for row in rows:
        ids.cells.append(Text(row.id))
        names.cells.append(Text(row.name))
        queues.cells.append(Text(row.queue))
        statuses.cells.append(_styled(row.status))
        priorities.cells.append(Text(str(row.priority)))
        tries.cells.append(Text(f"{row.attempts}/{row.max_attempts}"))
        created.cells.append(Text(_ago(row.created_at, now)))
        begun, ended = row.started_at, row.finished_at
        took.cells.append(Text("-" if begun is None or ended is None else _span(ended - begun)))
        info.cells.append(Text(_info(row), no_wrap=True, overflow="ellipsis"))
    _fit(console, [ids, names, queues, statuses, priorities, tries, created, took, info])
    if len(rows) == args.limit:
        console.print(f"[dim]the {len(rows)} newest; --limit shows more[/dim]")
    return EXIT_OK


async def cmd_show(args: argparse.Namespace) -> int:
    async with open_journal(args.journal, args.schema) as journal:
        row = await _get(journal, args.id, _where(journal))
        history = await journal.history(args.id)
    if args.json:
        data = _record_json(row)
        data["history"] = [line.model_dump(mode="json") for line in history]
        _print_json(data)
        return EXIT_OK
    console = _console()
    now = time.time()
    rec = record(row)
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()

    def field(name: str, value: str | Text) -> None:
        grid.add_row(name, value if isinstance(value, Text) else escape(value))

    field("id", rec.id)
    field("name", rec.name)
    field("status", _styled(rec.status))
    field("queue", rec.queue)
    field("priority", str(rec.priority))
    field(
        "attempts",
        f"{rec.attempts} of {rec.max_attempts}"
        + (f" ({rec.recoveries} interrupted)" if rec.recoveries else ""),
    )
    if rec.key is not None:
        field("key", rec.key)
    if rec.timeout is not None:
        field("timeout", f"{rec.timeout:g}s per attempt")
    field("args", json.dumps(list(rec.args), ensure_ascii=False))
    field("kwargs", json.dumps(rec.kwargs, ensure_ascii=False))
    for name, ts in (
        ("created", row.created_at),
        ("not before", row.scheduled_at),
        ("started", row.started_at),
        ("finished", row.finished_at),
    ):
        if ts is not None:
            field(name, f"{_iso(ts)}  ({_ago(ts, now)})")
    if row.owner is not None and row.status is TaskStatus.RUNNING:
        lease = "" if row.lease_until is None else f", lease {_lease(row.lease_until, now)}"
        field("owner", f"{row.owner}{lease}")
    elif row.owner is not None:
        field("ran on", row.owner)
    if row.cancel_requested and not row.status.is_terminal:
        field("cancel", "requested")
    if rec.progress is not None:
        fraction = "" if rec.progress.fraction is None else f"{rec.progress.fraction:.0%} "
        field("progress", fraction + (rec.progress.message or ""))
    if row.result_json is not None:
        field("result", row.result_json)
    current = rec.error is not None and rec.status in _ERROR_IS_CURRENT
    if rec.error is not None and current:
        field("error", Text(f"{rec.error.type}: {rec.error.message}", style="red"))
    elif rec.error is not None:  # kept from an attempt before the one that counts now
        failed = [line.attempt for line in history if line.error is not None]
        which = f" (attempt {failed[-1]})" if failed else ""
        field(
            "earlier",
            Text(f"an earlier attempt failed{which}: {rec.error.type}: {rec.error.message}"),
        )
    console.print(grid)
    if rec.error is not None and current and rec.error.traceback:
        console.print(Text(rec.error.traceback.rstrip(), style="dim"))
    console.print()
    table = Table(title="history", title_justify="left", box=None, header_style="bold")
    for column in ("AT", "FROM", "TO", "ATTEMPT", "BY", "ERROR"):
        table.add_column(column, no_wrap=column != "ERROR")
    for line in history:
        at = line.at.timestamp()
        table.add_row(
            _iso(at),
            "-" if line.source is None else _styled(line.source),
            _styled(line.target),
            str(line.attempt),
            escape(line.owner or "-"),
            ""
            if line.error is None
            else escape(_one_line(f"{line.error.type}: {line.error.message}")),
        )
    console.print(table)
    return EXIT_OK


def _lease(lease_until: float, now: float) -> str:
    if lease_until >= now:
        return f"expires in {_span(lease_until - now)}"
    return f"EXPIRED {_span(now - lease_until)} ago"


def _print_periodic(console: Console, rows: list[PeriodicRow], now: float) -> None:
    """The periodic tasks the journal knows, with their next tick as the manager that
    decided the last one computed it (in the past: no manager has been up since)."""
    if not rows:
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("PERIODIC", "SCHEDULE", "NEXT TICK", "", "LAST TICK", "LAST TASK"):
        table.add_column(column, no_wrap=True)
    for row in rows:
        table.add_row(
            escape(row.name), escape(row.schedule), _iso(row.next_tick),
            _ago(row.next_tick, now), _iso(row.last_tick), row.task_id or "-",
        )  # fmt: skip
    console.print(table)
    console.print()


async def cmd_status(args: argparse.Namespace) -> int:
    now = time.time()
    async with open_journal(args.journal, args.schema) as journal:
        counts = await journal.counts()
        per_queue = await journal.counts_by_queue()
        waiting = await journal.waiting_by_queue(now)
        oldest = await journal.oldest(TaskStatus.PENDING)
        retrying = (
            await _scan(journal, TaskStatus.RETRYING) if counts.get(TaskStatus.RETRYING) else []
        )
        running = await _scan(journal, TaskStatus.RUNNING) if counts.get(TaskStatus.RUNNING) else []
        window = 60.0
        done = await journal.finished_since(now - window)
        periodic = await journal.periodic() if isinstance(journal, PeriodicJournal) else []
    console = _console()
    total = sum(counts.values())
    console.print(f"[bold]journal[/bold] {escape(_where(journal))}: {total} tasks")
    _print_periodic(console, periodic, now)
    if total == 0:
        return EXIT_OK

    by_queue: dict[str, Counter[TaskStatus]] = {}
    for (queue, status), n in per_queue.items():
        by_queue.setdefault(queue, Counter())[status] += n
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("QUEUE")
    for status in TaskStatus:
        table.add_column(status.value.upper(), justify="right", style=STATUS_STYLE[status])
    table.add_column("TOTAL", justify="right", style="bold")
    # of the pending and retrying tasks that are due: waiting for a worker or a limit
    # (a queue's limit, rate, partition), and waiting on a lock another task holds
    table.add_column("DUE", justify="right")
    table.add_column("ON LOCK", justify="right")
    for queue in sorted(by_queue):
        c = by_queue[queue]
        free, locked = waiting.get(queue, (0, 0))
        table.add_row(
            escape(queue), *(str(c[s]) for s in TaskStatus), str(sum(c.values())),
            str(free), str(locked),
        )  # fmt: skip
    table.add_row(
        Text("all", style="bold"),
        *(str(counts.get(s, 0)) for s in TaskStatus),
        str(total),
        str(sum(d for d, _ in waiting.values())),
        str(sum(locked for _, locked in waiting.values())),
        end_section=True,
    )
    console.print(table)
    console.print()

    if oldest is not None:
        due = "" if oldest.scheduled_at <= now else f", not before {_ago(oldest.scheduled_at, now)}"
        console.print(
            f"[bold]oldest pending[/bold] {oldest.id} {escape(oldest.name)} "
            f"(queue {escape(oldest.queue)}), created {_ago(oldest.created_at, now)}{due}"
        )
    if retrying:
        soonest = min(retrying, key=lambda r: r.scheduled_at)
        console.print(
            f"[bold]next retry[/bold] {soonest.id} {escape(soonest.name)} "
            f"{_ago(soonest.scheduled_at, now)} (attempt {soonest.attempts + 1} of "
            f"{soonest.max_attempts})"
        )

    console.print(f"[bold]running[/bold] {len(running)}")
    if running:
        ids, names, queues = _Column("ID"), _Column("NAME", shrink_to=20), _Column("QUEUE", drop=2)
        owners, attempts = _Column("OWNER", shrink_to=12), _Column("ATTEMPT", drop=1)
        since, leases = _Column("SINCE", drop=3), _Column("LEASE", shrink_to=12)
        progress = _Column("PROGRESS", shrink_to=12)
        for row in sorted(running, key=lambda r: r.started_at or r.created_at):
            lease = "-" if row.lease_until is None else _lease(row.lease_until, now)
            ids.cells.append(Text(row.id))
            names.cells.append(Text(row.name))
            queues.cells.append(Text(row.queue))
            owners.cells.append(Text(row.owner or "-"))
            attempts.cells.append(Text(f"{row.attempts}/{row.max_attempts}"))
            since.cells.append(Text(_ago(row.started_at, now)))
            leases.cells.append(Text(lease, style="bold red" if "EXPIRED" in lease else ""))
            progress.cells.append(Text(_info(row), no_wrap=True, overflow="ellipsis"))
        _fit(console, [ids, names, queues, owners, attempts, since, leases, progress])

    console.print(
        f"[bold]last minute[/bold] {done[TaskStatus.COMPLETED]} completed "
        f"({done[TaskStatus.COMPLETED] / window:.2f}/s), {done[TaskStatus.FAILED]} failed, "
        f"{done[TaskStatus.CANCELLED]} cancelled"
    )
    return EXIT_OK


# ------------------------------------------------------------------ acting commands


async def cmd_cancel(args: argparse.Namespace) -> int:
    async with open_journal(args.journal, args.schema) as journal:
        await _get(journal, args.id, _where(journal))
        done = await cancel_row(journal, _owner(), args.id)
        row = await _get(journal, args.id, _where(journal))
    if not done:
        raise CliError(f"task {args.id} is already {row.status.value}; nothing to cancel")
    if row.status is TaskStatus.RUNNING:
        print(
            f"cancel requested: task {args.id} ({row.name}) is running on {row.owner}, "
            "which stops it within a second"
        )
    else:
        print(f"cancelled task {args.id} ({row.name})")
    return EXIT_OK


async def cmd_requeue(args: argparse.Namespace) -> int:
    if (args.id is None) == (args.status is None):
        raise CliError("give either a task id or --status failed|cancelled")
    if args.id is None and args.status not in (TaskStatus.FAILED, TaskStatus.CANCELLED):
        raise CliError(f"only failed or cancelled tasks can be requeued, not {args.status.value}")
    if args.id is not None and (args.queue is not None or args.name is not None):
        raise CliError("--queue and --name select tasks with --status, not with an id")
    owner = _owner()
    async with open_journal(args.journal, args.schema) as journal:
        if args.id is not None:
            await _get(journal, args.id, _where(journal))
            row = await requeue_row(journal, owner, args.id)
            print(
                f"requeued task {row.id} ({row.name}): pending, with {row.max_attempts} "
                "fresh attempts; a worker serving this journal runs it"
            )
            return EXIT_OK
        rows = await _scan(journal, args.status, queue=args.queue, name=args.name)
        requeued = skipped = 0
        for row in reversed(rows):  # oldest first, so they run in their original order
            try:
                await requeue_row(journal, owner, row.id)
            except InvalidTransition:  # it changed meanwhile (requeued or purged elsewhere)
                skipped += 1
            else:
                requeued += 1
    note = f" ({skipped} changed meanwhile and were left alone)" if skipped else ""
    print(f"requeued {requeued} {args.status.value} task{'s' * (requeued != 1)}{note}")
    return EXIT_OK


async def cmd_purge(args: argparse.Namespace) -> int:
    cutoff = time.time() - args.older_than
    async with open_journal(args.journal, args.schema) as journal:
        purged = await journal.purge(cutoff)
    print(f"purged {purged} finished task{'s' * (purged != 1)} that finished before {_iso(cutoff)}")
    return EXIT_OK


# ------------------------------------------------------------------ worker


def load_manager(target: str) -> BackgroundTaskManager:
    """The BackgroundTaskManager at ``module:attribute`` (the attribute may be dotted)."""
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise CliError(
            f"bad worker target {target!r}: expected module:manager, e.g. myapp.tasks:manager"
        )
    if os.getcwd() not in sys.path:  # like 'python -m': the current directory is importable
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise CliError(f"cannot import module {module_name!r}: {exc}") from None
        raise CliError(f"importing {module_name!r} failed: ModuleNotFoundError: {exc}") from None
    except Exception as exc:
        raise CliError(
            f"importing {module_name!r} failed: {type(exc).__name__}: {_one_line(str(exc), 200)}"
        ) from None
    found: Any = module
    for part in attribute.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise CliError(f"module {module_name!r} has no attribute {attribute!r}") from None
    if not isinstance(found, BackgroundTaskManager):
        raise CliError(f"{target} is a {type(found).__name__}, not a BackgroundTaskManager")
    return found


async def cmd_worker(args: argparse.Namespace) -> int:
    manager = load_manager(args.target)
    if manager.journal is None:
        raise CliError(
            f"{args.target} has no journal: a worker serves a shared journal "
            "(BackgroundTaskManager(journal=SQLiteJournal(...)))"
        )
    if args.concurrency is not None:
        manager.max_concurrency = args.concurrency
    if args.queue:
        try:
            manager.run_queues = args.queue
        except ValueError as exc:
            raise CliError(f"--queue: {exc}") from None
    logging.basicConfig(
        stream=sys.stderr,
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    err = _console(stderr=True)
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with manager:
            names = ", ".join(sorted(manager.registry.tasks)) or "none"
            queues = "" if manager.run_queues is None else ", ".join(sorted(manager.run_queues))
            err.print(
                f"worker {escape(manager.owner)}: concurrency {manager.max_concurrency}, "
                f"tasks: {escape(names)}{'; queues: ' + escape(queues) if queues else ''}; "
                "stop with Ctrl-C or SIGTERM"
            )
            async for signum in signals:
                running = manager.statistics().running
                err.print(
                    f"{signal.Signals(signum).name}: stopping; {running} running "
                    f"task{'s' * (running != 1)} get up to {manager.shutdown_timeout:g}s "
                    "to finish, the rest stay pending in the journal"
                )
                break
    err.print("worker stopped")
    return EXIT_OK


# ------------------------------------------------------------------ demo


async def cmd_demo(args: argparse.Namespace) -> int:
    from . import _demo

    path = Path(args.journal)
    await _demo.prepare_journal(path, _owner(), _sqlite_journal)
    journal = _sqlite_journal(path)
    return await _demo.run(journal, path, args.tasks, seed=args.seed, console=_console())


# ------------------------------------------------------------------ parser and main


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Look into a background_tasks journal, act on it, run a worker, "
        "or watch the demo.",
        epilog="Start with 'bgtasks demo', then 'bgtasks status --journal bgtasks-demo.db'.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {distribution_version()}",
        help="print the version of bgtasks and exit",
    )
    commands = parser.add_subparsers(
        title="commands", metavar="COMMAND", required=True, parser_class=_Parser
    )

    def command(
        name: str,
        func: Callable[[argparse.Namespace], Awaitable[int]],
        help: str,
        *,
        journal: bool = True,
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(func=func)
        if journal:
            sub.add_argument(
                "--journal",
                "-j",
                required=True,
                metavar="PATH",
                help="the SQLite journal file (must exist), or a PostgreSQL connection"
                " string (postgresql://...)",
            )
            sub.add_argument(
                "--schema",
                default="background_tasks",
                help="the PostgreSQL journal's schema (default: %(default)s)",
            )
        return sub

    sub = command(
        "demo", cmd_demo, "run a realistic workload on a fresh SQLite journal", journal=False
    )
    sub.add_argument(
        "--journal",
        "-j",
        default="bgtasks-demo.db",  # _demo.DEFAULT_JOURNAL (not imported for other commands)
        metavar="PATH",
        help="where to create the journal; replaces an earlier demo journal only "
        "(default: %(default)s)",
    )
    sub.add_argument(
        "--tasks",
        "-n",
        type=_positive_int,
        default=300,
        metavar="N",
        help="how many tasks to submit, at least 10 (default: %(default)s)",
    )
    sub.add_argument("--seed", type=int, default=7, help="random seed (default: %(default)s)")

    command("status", cmd_status, "counts by status and queue, running tasks, throughput")

    sub = command("list", cmd_list, "list tasks, newest first")
    sub.add_argument("--status", "-s", type=_status, help="only tasks with this status")
    sub.add_argument("--queue", "-q", help="only tasks in this queue")
    sub.add_argument("--name", help="only tasks with this registered name")
    sub.add_argument(
        "--limit",
        "-l",
        type=_positive_int,
        default=50,
        metavar="N",
        help="at most N tasks (default: %(default)s)",
    )
    sub.add_argument("--json", action="store_true", help="print a JSON array of records")

    sub = command("show", cmd_show, "one task: its record and its transition history")
    sub.add_argument("id", help="the task id")
    sub.add_argument("--json", action="store_true", help="print the record as JSON")

    sub = command("cancel", cmd_cancel, "cancel a pending, retrying or running task")
    sub.add_argument("id", help="the task id")

    sub = command(
        "requeue", cmd_requeue, "put a failed or cancelled task (or all of them) back to pending"
    )
    sub.add_argument("id", nargs="?", help="the task id")
    sub.add_argument(
        "--status",
        "-s",
        type=_status,
        help="requeue every task with this status (failed or cancelled)",
    )
    sub.add_argument("--queue", "-q", help="with --status: only tasks in this queue")
    sub.add_argument("--name", help="with --status: only tasks with this name")

    sub = command("purge", cmd_purge, "delete finished tasks and their history")
    sub.add_argument(
        "--older-than",
        required=True,
        type=_duration,
        metavar="AGE",
        help="finished more than AGE ago: 30s, 15m, 2h, 7d, 1h30m, ...",
    )

    sub = command(
        "worker",
        cmd_worker,
        "serve a shared journal with the manager at module:manager until SIGINT or SIGTERM",
        journal=False,
    )
    sub.add_argument(
        "target",
        metavar="module:manager",
        help="where the BackgroundTaskManager is, e.g. myapp.tasks:manager",
    )
    sub.add_argument(
        "--concurrency",
        "-c",
        type=_positive_int,
        metavar="N",
        help="override the manager's max_concurrency",
    )
    sub.add_argument(
        "--queue",
        "-q",
        action="append",
        metavar="NAME",
        help="run only tasks of this queue (repeatable; default: every queue); tasks of"
        " other queues wait for a worker that runs them",
    )
    sub.add_argument(
        "--backend",
        choices=("asyncio", "trio"),
        default="asyncio",
        help="the event loop (default: %(default)s)",
    )
    sub.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="warning",
        help="library events shown on stderr (debug shows every transition; default: %(default)s)",
    )
    return parser


def _user_error(exc: BaseException) -> BaseException | None:
    """The user-facing error in ``exc`` (unwrapping exception groups), or None for a bug."""
    if isinstance(exc, BaseExceptionGroup):
        found = [_user_error(e) for e in exc.exceptions]
        known = [e for e in found if e is not None]
        return known[0] if known and len(known) == len(found) else None
    if isinstance(exc, CliError | BackgroundTasksError):
        return exc
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """The command line in this process; returns the exit status. (The ``bgtasks``
    command runs ``background_tasks.__main__.main``, which says what to install when
    rich is missing.)"""
    args = build_parser().parse_args(argv)
    if args.func is cmd_demo and args.tasks < 10:
        sys.stderr.write(f"{PROG}: error: --tasks must be at least 10\n")
        return EXIT_USAGE
    try:
        backend = getattr(args, "backend", "asyncio")
        code: int = anyio.run(args.func, args, backend=backend)
        return code
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # 'bgtasks list | head': stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_ERROR
    except (Exception, BaseExceptionGroup) as exc:
        error = _user_error(exc)
        if error is None:
            raise
        sys.stderr.write(f"{PROG}: error: {_one_line(str(error), 400)}\n")
        return EXIT_ERROR
