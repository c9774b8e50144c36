"""``bgtasks demo``: a realistic mix of tasks on a fresh SQLite journal, watched live.

Fast thumbnails (and an urgent batch that jumps the queue by priority), e-mails that fail
now and then and retry with backoff, slow reports that report progress, partner API
calls that sometimes time out, invoices with bad data that fail at once, delayed
reminders, and exports that get cancelled, some while running, some while waiting.
Every random choice comes from ``--seed``, so two runs make the same decisions.

``bgtasks worker background_tasks._demo:worker`` serves a demo journal after the demo
(``$BGTASKS_DEMO_JOURNAL``, default ``bgtasks-demo.db``): it runs what was requeued there.
"""

from __future__ import annotations

import math
import os
import random
import shlex
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn
from rich.table import Table
from rich.text import Text

from ._context import current_task
from ._errors import JournalError
from ._handle import TaskHandle
from ._manager import BackgroundTaskManager
from ._models import TaskRecord
from ._retry import RetryPolicy
from ._states import TaskStatus
from .journal._protocol import Journal
from .journal.sqlite import SQLiteJournal

__all__ = ["DEFAULT_JOURNAL", "JOURNAL_ENV", "prepare_journal", "run", "worker_manager"]

PREFIX = "demo."
DEFAULT_JOURNAL = "bgtasks-demo.db"
#: The journal that ``background_tasks._demo:worker`` serves.
JOURNAL_ENV = "BGTASKS_DEMO_JOURNAL"
WORKER = "background_tasks._demo:worker"
QUEUES = {"images": 8, "emails": 4, "reports": 4}
RUNNING, COMPLETED = TaskStatus.RUNNING, TaskStatus.COMPLETED
FAILED, CANCELLED = TaskStatus.FAILED, TaskStatus.CANCELLED


# ------------------------------------------------------------------ the tasks


#: 0 in the demo, 1 in its worker: there a requeued task rolls new dice for the steps
#: that depend on the attempt (an e-mail may now get through, a partner answer in time);
#: what does not (a bad invoice) comes out the same.
_round = 0


def _dice(seed: int, attempt: int | None = None) -> random.Random:
    """The same random decisions for the same task (and attempt), run after run."""
    if attempt is None:
        return random.Random(seed * 1_000 + 1)
    return random.Random(seed * 1_000 + attempt + 1_000_003 * _round)


async def resize_image(image_id: int, seed: int) -> dict[str, Any]:
    await anyio.sleep(_dice(seed).uniform(0.02, 0.15))
    return {"image": image_id, "thumbnail": f"thumbs/{image_id}.webp"}


async def send_email(to: str, seed: int) -> str:
    attempt = current_task().attempt
    dice = _dice(seed, attempt)
    await anyio.sleep(dice.uniform(0.02, 0.08))
    if dice.random() < 0.45:
        raise ConnectionError(f"SMTP server refused the connection (attempt {attempt})")
    return f"queued for {to}"


async def build_report(report_id: int, seed: int) -> dict[str, Any]:
    dice = _dice(seed)
    steps = 6
    for step in range(1, steps + 1):
        await anyio.sleep(dice.uniform(0.1, 0.25))
        await current_task().report_progress(step / steps, f"section {step} of {steps}")
    return {"report": report_id, "pages": dice.randint(4, 40)}


async def call_partner_api(order_id: int, seed: int) -> str:
    await anyio.sleep(_dice(seed, current_task().attempt).uniform(0.05, 0.8))  # timeout: 0.4s
    return f"order {order_id} accepted"


async def parse_invoice(invoice_id: int, seed: int) -> dict[str, Any]:
    dice = _dice(seed)
    await anyio.sleep(dice.uniform(0.01, 0.05))
    if dice.random() < 0.4:
        raise ValueError(f"invoice {invoice_id}: the total does not match its lines")
    return {"invoice": invoice_id, "total": round(dice.uniform(10, 5_000), 2)}


async def send_reminder(user_id: int) -> str:
    await anyio.sleep(0.01)
    return f"reminded user {user_id}"


async def export_archive(account_id: int) -> str:
    for second in range(1, 601):  # ten minutes, unless cancelled (which the demo does)
        await anyio.sleep(1)
        await current_task().report_progress(second / 600, f"{second * 5} MB written")
    return f"archive of account {account_id}"


@dataclass(frozen=True, slots=True)
class Kind:
    key: str
    label: str
    weight: float
    fn: Callable[..., Coroutine[Any, Any, Any]]
    options: dict[str, Any] = field(default_factory=dict)


KINDS = (
    Kind("image", "resize_image   fast", 0.50, resize_image, {"queue": "images"}),
    Kind("urgent", "resize_image   priority 10", 0.05, resize_image, {"queue": "images"}),
    Kind(
        "email",
        "send_email     flaky, retried",
        0.15,
        send_email,
        {
            "queue": "emails",
            "retry": RetryPolicy(
                max_attempts=4, base_delay=0.1, max_delay=1.0, retry_on=(ConnectionError,)
            ),
        },
    ),
    Kind("report", "build_report   slow, progress", 0.06, build_report, {"queue": "reports"}),
    Kind(
        "partner",
        "call_partner   times out",
        0.10,
        call_partner_api,
        {
            "timeout": 0.4,
            "retry": RetryPolicy(
                max_attempts=2, base_delay=0.2, jitter=False, retry_on=(TimeoutError,)
            ),
        },
    ),
    Kind(
        "invoice",
        "parse_invoice  bad input",
        0.05,
        parse_invoice,
        {
            "retry": RetryPolicy(max_attempts=3, base_delay=0.1, retry_on=(ConnectionError,)),
        },
    ),
    Kind("reminder", "send_reminder  delayed", 0.05, send_reminder, {"queue": "emails"}),
    Kind("export", "export_archive cancelled", 0.04, export_archive, {}),
)
_BY_FN: dict[str, Kind] = {}
for _kind in KINDS:
    _BY_FN.setdefault(_kind.fn.__name__, _kind)


def allocate(total: int) -> dict[str, int]:
    """How many tasks of each kind: at least one each, the fast ones take the remainder."""
    counts = {k.key: max(1, math.floor(k.weight * total)) for k in KINDS}
    counts["image"] += total - sum(counts.values())
    return counts


# ------------------------------------------------------------------ the journal


async def prepare_journal(path: Path, owner: str, make: Callable[[Path], Journal]) -> None:
    """Make room for a fresh demo journal: replace an earlier one, refuse anything else."""
    from .cli import CliError

    where = anyio.Path(path)
    if not await where.exists():
        return
    refuse = f"{path} exists and is not a journal made by 'bgtasks demo'"
    if not await where.is_file() or (await where.stat()).st_size == 0:
        raise CliError(f"{refuse}; choose another --journal")
    journal = make(path)
    try:
        await journal.open(owner)
    except JournalError as exc:
        raise CliError(f"{refuse} ({exc}); choose another --journal") from None
    try:
        rows = await journal.list(limit=1_000_000)
    finally:
        await journal.close()
    foreign = sorted({row.name for row in rows if not row.name.startswith(PREFIX)})
    if foreign:
        raise CliError(
            f"{refuse}: it holds tasks named {', '.join(foreign[:3])}; choose another --journal"
        )
    for suffix in ("", "-wal", "-shm", "-journal"):
        await anyio.Path(f"{path}{suffix}").unlink(missing_ok=True)


def _manager(journal: Journal) -> BackgroundTaskManager:
    """The demo's manager, with every kind of task registered."""
    manager = BackgroundTaskManager(
        max_concurrency=24, queues=QUEUES, journal=journal, shutdown_timeout=2.0
    )
    for kind in KINDS:
        if PREFIX + kind.fn.__name__ not in manager.registry.tasks:
            manager.task(name=PREFIX + kind.fn.__name__, **kind.options)(kind.fn)
    return manager


def worker_manager(path: str | None = None) -> BackgroundTaskManager:
    """A manager for ``bgtasks worker``: the demo's tasks on an existing demo journal
    (``path``, else ``$BGTASKS_DEMO_JOURNAL``, else ``bgtasks-demo.db``), so that tasks
    requeued there after the demo run again."""
    global _round
    _round = 1
    where = path or os.environ.get(JOURNAL_ENV) or DEFAULT_JOURNAL
    return _manager(SQLiteJournal(where, create=False))


def __getattr__(name: str) -> Any:
    """``background_tasks._demo:worker``, built when a worker asks for it."""
    if name == "worker":
        return worker_manager()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------ the run


@dataclass(slots=True)
class Planned:
    kind: Kind
    args: tuple[Any, ...]
    priority: int = 0
    delay: float = 0.0


@dataclass(slots=True)
class Tracked:
    kind: Kind
    delay: float
    handle: TaskHandle[Any]


def plan(total: int, seed: int) -> tuple[list[Planned], list[Planned], list[Planned]]:
    """(the main batch, the urgent batch, the exports), with every random choice made."""
    dice = random.Random(seed)
    counts = allocate(total)
    batch: list[Planned] = []
    urgent: list[Planned] = []
    exports: list[Planned] = []
    serial = 0
    for kind in KINDS:
        for _ in range(counts[kind.key]):
            serial += 1
            task_seed = dice.randrange(1_000_000)
            if kind.key == "email":
                batch.append(Planned(kind, (f"user{serial}@example.com", task_seed)))
            elif kind.key == "reminder":
                batch.append(Planned(kind, (serial,), delay=round(dice.uniform(0.5, 2.5), 2)))
            elif kind.key == "export":
                # Every other export waits a minute first: it is cancelled while pending.
                exports.append(Planned(kind, (serial,), delay=60.0 * (len(exports) % 2)))
            elif kind.key == "urgent":
                urgent.append(Planned(kind, (serial, task_seed), priority=10))
            else:
                batch.append(Planned(kind, (serial, task_seed)))
    dice.shuffle(batch)
    return batch, urgent, exports


class _Board:
    """What the live display shows under the bars: counts by status."""

    def __init__(self, manager: BackgroundTaskManager) -> None:
        self.manager = manager

    def __rich__(self) -> Text:
        s = self.manager.statistics()
        text = Text("  ")
        for label, value, style in (
            ("completed", s.completed, "green"),
            ("failed", s.failed, "red"),
            ("cancelled", s.cancelled, "magenta"),
            ("running", s.running, "blue"),
            ("retrying", s.retrying, "yellow"),
            ("pending", s.pending, "cyan"),
        ):
            text.append(f"{label} ", style="dim").append(str(value), style=style).append("  ")
        return text


async def run(journal: Journal, path: Path, total: int, *, seed: int, console: Console) -> int:
    """Run the demo on ``journal`` (fresh); print the summary; return the exit status."""
    manager = _manager(journal)
    batch, urgent, exports = plan(total, seed)
    tracked: dict[str, Tracked] = {}
    live_bars = console.is_terminal
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[count]}", justify="right"),
        TextColumn("[dim]{task.fields[note]}"),
        console=console,
    )
    overall = progress.add_task("tasks", total=total, note="", count="")
    report_bars: dict[str, TaskID | None] = {}  # None: finished, its bar removed
    interrupted = False
    console.print(
        f"[bold]bgtasks demo[/bold]: {total} tasks on the SQLite journal {escape(str(path))} "
        f"(queues {', '.join(f'{q}={n}' for q, n in QUEUES.items())}, concurrency 24)"
    )

    async def submit(items: list[Planned]) -> None:
        async def one(item: Planned) -> None:
            handle = await manager.submit(
                PREFIX + item.kind.fn.__name__,
                *item.args,
                priority=item.priority,
                delay=item.delay or None,
            )
            tracked[handle.id] = Tracked(item.kind, item.delay, handle)

        async with anyio.create_task_group() as tg:  # concurrent submits share commits
            for item in items:
                tg.start_soon(one, item)

    async def cancel_exports(handles: list[TaskHandle[Any]]) -> None:
        # Let the exports that do not wait get going, then cancel every export.
        immediate = [h for h in handles if not tracked[h.id].delay]
        with anyio.move_on_after(3):
            while True:
                records = [await manager.get(h.id) for h in immediate]
                if all(r is not None and r.status is RUNNING for r in records):
                    break
                await anyio.sleep(0.05)
        await anyio.sleep(0.3)
        for handle in handles:
            await handle.cancel()

    async def drive() -> None:
        await submit(batch)
        async with anyio.create_task_group() as tg:
            export_handles: list[TaskHandle[Any]] = []

            async def start_exports() -> None:
                await submit(exports)
                export_handles.extend(t.handle for t in tracked.values() if t.kind.key == "export")
                await cancel_exports(export_handles)

            tg.start_soon(start_exports)
            await anyio.sleep(0.3)  # the urgent batch arrives late and still runs first
            await submit(urgent)

    async def watch() -> None:
        last_line = 0.0
        started = time.monotonic()
        while True:
            s = manager.statistics()
            finished = s.completed + s.failed + s.cancelled
            progress.update(
                overall,
                completed=finished,
                count=f"{finished}/{total}",
                note=f"{s.running} running, {s.retrying} retrying",
            )
            if live_bars:
                await _report_bars(manager, tracked, progress, report_bars)
            elif time.monotonic() - last_line >= 2 or finished >= total:
                last_line = time.monotonic()
                console.print(
                    f"{time.monotonic() - started:5.1f}s  {finished}/{total} finished: "
                    f"{s.completed} completed, {s.failed} failed, {s.cancelled} cancelled; "
                    f"{s.running} running, {s.retrying} retrying, {s.pending} pending"
                )
            if finished >= total and len(tracked) == total:
                return
            await anyio.sleep(0.1)

    async def stop_on_signal(scope: anyio.CancelScope) -> None:
        nonlocal interrupted
        import signal

        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                interrupted = True
                scope.cancel()
                return

    began = manager.clock.time()
    async with manager:
        live = Live(
            Group(progress, _Board(manager)),
            console=console,
            refresh_per_second=10,
            transient=False,
        )
        if live_bars:
            live.start()
        try:
            with anyio.CancelScope() as scope, anyio.move_on_after(240) as guard:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(stop_on_signal, scope)
                    tg.start_soon(drive)
                    await watch()
                    tg.cancel_scope.cancel()
        finally:
            if live_bars:
                live.stop()
        if interrupted or guard.cancelled_caught:
            why = "interrupted" if interrupted else "still not finished after 240s"
            console.print(
                f"[bold red]demo {why}[/bold red]: tasks left pending stay in {escape(str(path))}"
            )
            return 130 if interrupted else 1
        records = {r.id: r for r in await manager.list(limit=total + 10)}
    ended = manager.clock.time()
    _summary(console, tracked, records, began, ended, path)
    return 0


async def _report_bars(
    manager: BackgroundTaskManager,
    tracked: dict[str, Tracked],
    progress: Progress,
    bars: dict[str, TaskID | None],
) -> None:
    """A bar for each running report, fed by what it reports through report_progress."""
    for task_id, item in list(tracked.items()):
        if item.kind.key != "report" or (task_id in bars and bars[task_id] is None):
            continue
        rec = await manager.get(task_id)
        bar = bars.get(task_id)
        if rec is None or rec.status.is_terminal:
            if bar is not None:
                progress.remove_task(bar)
            bars[task_id] = None
        elif rec.status is RUNNING and rec.progress is not None:
            note = rec.progress.message or ""
            if bar is None:
                bar = bars[task_id] = progress.add_task(
                    f"  report {rec.args[0]}", total=1.0, note=note, count=""
                )
            fraction = rec.progress.fraction or 0.0
            progress.update(bar, completed=fraction, note=note, count=f"{fraction:.0%}")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in (0, 1]); nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:,.0f} ms"


def _summary(
    console: Console,
    tracked: dict[str, Tracked],
    records: dict[str, TaskRecord],
    began: float,
    ended: float,
    path: Path,
) -> None:
    table = Table(
        title=f"{len(tracked)} tasks in {ended - began:.1f}s",
        title_justify="left",
        header_style="bold",
    )
    table.add_column("kind")
    for column in ("tasks", "completed", "failed", "cancelled", "retries", "p50", "p99"):
        table.add_column(column, justify="right")
    everything: list[float] = []
    totals = dict.fromkeys(("tasks", "completed", "failed", "cancelled", "retries"), 0)
    example_failure: TaskRecord | None = None
    for kind in KINDS:
        rows = [(records[i], t) for i, t in tracked.items() if t.kind is kind and i in records]
        latencies = [
            (rec.finished_at - rec.created_at).total_seconds() - t.delay
            for rec, t in rows
            if rec.status is COMPLETED and rec.finished_at is not None
        ]
        everything += latencies
        line = {
            "tasks": len(rows),
            "completed": sum(rec.status is COMPLETED for rec, _ in rows),
            "failed": sum(rec.status is FAILED for rec, _ in rows),
            "cancelled": sum(rec.status is CANCELLED for rec, _ in rows),
            "retries": sum(max(0, rec.attempts - 1) for rec, _ in rows),
        }
        for key, value in line.items():
            totals[key] += value
        if example_failure is None and kind.key == "email":
            example_failure = next((r for r, _ in rows if r.status is FAILED), None)
        table.add_row(
            kind.label,
            *(str(v) if v else "[dim]0[/dim]" for v in line.values()),
            _ms(percentile(latencies, 0.5)),
            _ms(percentile(latencies, 0.99)),
        )
    table.add_section()
    table.add_row(
        "[bold]all[/bold]",
        *(f"[bold]{v}[/bold]" for v in totals.values()),
        _ms(percentile(everything, 0.5)),
        _ms(percentile(everything, 0.99)),
    )
    console.print(table)
    finished = totals["completed"] + totals["failed"] + totals["cancelled"]
    attempts = sum(rec.attempts for rec in records.values())
    console.print(
        f"throughput: {finished / (ended - began):.1f} tasks/s, {attempts} attempts "
        f"({totals['retries']} retries)\n"
        "latency: from submit (or the end of a requested delay) to completion, completed tasks"
    )
    if example_failure is None:  # no e-mail ran out of attempts: any failed task will do
        example_failure = next((r for r in records.values() if r.status is FAILED), None)
    where = escape(shlex.quote(str(path)))
    show = example_failure.id if example_failure is not None else "<task id>"
    env = "" if str(path) == DEFAULT_JOURNAL else f"{JOURNAL_ENV}={where} "
    console.print(
        f"\nThe journal stays in [bold]{where}[/bold]. Look inside it:\n"
        f"  bgtasks status --journal {where}\n"
        f"  bgtasks list --journal {where} --status failed\n"
        f"  bgtasks show {show} --journal {where}\n"
        "Give the failed tasks another try: requeue them, then run a worker with the demo's\n"
        "tasks (requeued tasks wait, pending, for a process that runs them; stop it with Ctrl-C):\n"
        f"  bgtasks requeue --status failed --journal {where}\n"
        f"  {env}bgtasks worker {WORKER}"
    )
