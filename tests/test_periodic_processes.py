"""Periodic tasks across real processes: two and three managers with the same periodic
task (a 1 s interval) on one SQLite journal and on one PostgreSQL schema, started and
killed (``kill -9``, by pid) at random over more than 20 ticks, with one stretch where
none of them is up.

What the journal and the marker files must show:

* no tick has two tasks, and no task ran twice unless the journal recorded an attempt
  cut short (a ``kill -9`` inside it: at least once, as every task);
* every tick that a manager was up for (up before it and for 0.7 s after) has its task;
* the ticks of the stretch nobody was up for follow ``missed=``: ``"latest"`` gives one
  run for the latest of them, late; ``"skip"`` none (no task of any tick is ever late);
* every task finished.

And a slow tick (its task outlasts the interval, ``overlap=False``) makes the next tick
be skipped, logged once (``periodic_tick_skipped``) by whichever manager decided it.

The process apps: ``tests/durability_apps/periodic.py``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest

from background_tasks import SQLiteJournal, TaskStatus
from background_tasks._periodic import Every
from background_tasks.journal._protocol import Journal, TaskRow
from background_tasks.testing import opened

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
from durability_apps.tasks import read_markers  # noqa: E402

pytestmark = pytest.mark.slow

EVERY = 1.0
#: How long after a tick a live manager has to fire it, at most (a loaded machine).
FIRE_WITHIN = 0.7
#: A tick found later than this after its time counts as missed (half the interval).
GRACE = EVERY / 2


# ----------------------------------------------------------------------------- servers


@pytest.fixture(scope="module")
def pg_dsn() -> Iterator[str]:
    """``$BGTASKS_TEST_POSTGRES_DSN``, else the local server, else a throwaway cluster."""
    for dsn in (
        os.environ.get("BGTASKS_TEST_POSTGRES_DSN"),
        "postgresql://postgres@127.0.0.1:5432/test",
    ):
        if dsn:
            try:
                with psycopg.connect(dsn, connect_timeout=3):
                    pass
            except psycopg.Error:
                continue
            yield dsn
            return
    from pgcluster import cluster

    with cluster() as c:
        yield c.dsn


@pytest.fixture
def pg_schema(pg_dsn: str) -> Iterator[str]:
    name = f"t_{uuid.uuid4().hex[:16]}"
    yield name
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


# ----------------------------------------------------------------------------- children


@dataclass
class Child:
    """One manager process; its stdout holds its events (JSON lines)."""

    name: str
    proc: subprocess.Popen[bytes]
    out: Path
    started: float
    ended: float = float("inf")
    ready: float | None = None
    killed: bool = False

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        found = []
        for line in self.out.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line cut short by kill -9
                event = json.loads(line)
                if kind is None or event.get("event") == kind:
                    found.append(event)
        return found


@dataclass
class Run:
    tmp: Path
    journal: str
    args: list[str]
    markers: Path
    children: list[Child] = field(default_factory=list)
    backends: Iterator[str] = field(default_factory=lambda: iter(["asyncio", "trio"] * 50))

    def start(self, *extra: str) -> Child:
        name = f"c{len(self.children)}"
        out = self.tmp / f"{name}.out"
        with open(out, "wb") as stdout, open(self.tmp / f"{name}.err", "wb") as stderr:
            proc = subprocess.Popen(
                [
                    sys.executable, "-m", "durability_apps.periodic", "--journal", self.journal,
                    "--markers", str(self.markers), "--label", name,
                    "--backend", next(self.backends), *self.args, *extra,
                ],
                stdout=stdout, stderr=stderr, env=ENV, cwd=self.tmp,
            )  # fmt: skip
        child = Child(name, proc, out, time.time())
        self.children.append(child)
        return child

    def live(self) -> list[Child]:
        return [c for c in self.children if c.ended == float("inf")]

    def kill9(self, child: Child) -> None:
        child.ended = time.time()
        child.killed = True
        child.proc.send_signal(signal.SIGKILL)  # our own child, by its pid
        assert child.proc.wait(10) == -signal.SIGKILL

    def stop_all(self) -> None:
        for child in self.live():
            child.proc.send_signal(signal.SIGTERM)
        for child in self.live():
            try:
                assert child.proc.wait(20) == 0, (self.tmp / f"{child.name}.err").read_text()
            finally:
                child.ended = time.time()

    def wait_ready(self, child: Child, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not child.events("ready"):
            if child.proc.poll() is not None:
                err = (self.tmp / f"{child.name}.err").read_text()
                pytest.fail(f"{child.name} exited before it was ready:\n{err}")
            assert time.monotonic() < deadline, f"{child.name} not ready in {timeout}s"
            time.sleep(0.02)
        child.ready = float(child.events("ready")[0]["t"])

    def cleanup(self) -> None:
        for child in self.live():
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGKILL)
            child.proc.wait(10)
            child.ended = time.time()


def chaos(run: Run, *, seconds: float, seed: int) -> tuple[float, float]:
    """Three managers at first, then kills and starts at random (one to three up), one
    stretch of 3 s or more with none, then one to three up again until the end. Returns
    (when the last manager before the gap was killed, when the first after it started)."""
    rng = random.Random(seed)
    every = Every(EVERY)
    begin = time.time()
    for _ in range(3):
        run.start()
    for child in run.children:
        run.wait_ready(child)
    gap_at = begin + seconds * 0.45
    gap: tuple[float, float] | None = None
    while time.time() < begin + seconds:
        time.sleep(rng.uniform(0.6, 1.8))
        live = run.live()
        if gap is None and time.time() >= gap_at:
            go = run.tmp / "go"
            up = run.start("--go", str(go))  # imports done, waiting to start its manager
            for child in live:
                run.kill9(child)
            down = time.time()
            while not up.events("waiting"):
                time.sleep(0.01)
            # start it 0.65 s after a tick, three ticks or more later: ticks missed, the
            # latest of them found later than its grace (0.5 s)
            at = every.at_or_before(down + 3.0) + 0.65
            time.sleep(max(0.0, at - time.time()))
            go.touch()
            gap = (down, time.time())
            run.wait_ready(up)
            continue
        if len(live) > 1 and (len(live) == 3 or rng.random() < 0.5):
            run.kill9(rng.choice(live))
        else:
            run.wait_ready(run.start())
    assert gap is not None
    return gap


async def journal_rows(journal: Journal) -> list[TaskRow]:
    async with opened(journal, "the-test") as j:
        return await j.list(name="tick", limit=10_000)


def tick_of_row(row: TaskRow) -> float:
    assert row.key is not None
    assert row.key.startswith("periodic:tick:")
    return row.scheduled_at


def check(run: Run, rows: list[TaskRow], gap: tuple[float, float], missed: str) -> dict[str, Any]:
    """The assertions of the module docstring; returns the counts for the report."""
    ticks = Counter(tick_of_row(r) for r in rows)
    assert max(ticks.values()) == 1, [t for t, n in ticks.items() if n > 1]  # never twice
    by_tick = {tick_of_row(r): r for r in rows}
    every = Every(EVERY)
    first = min(c.ready for c in run.children if c.ready is not None)
    last = max(c.ended for c in run.children)
    window = []
    t = every.next_after(first)
    while t < last - FIRE_WITHIN:
        window.append(t)
        t = every.next_after(t)
    assert len(window) >= 20

    def covered(tick: float) -> bool:
        return any(
            c.ready is not None and c.ready <= tick - 0.05 and c.ended >= tick + FIRE_WITHIN
            for c in run.children
        )

    uncovered = [t for t in window if not covered(t)]
    for tick in window:
        if covered(tick):
            assert tick in by_tick, f"tick {tick} had a manager up but no task"
    # The stretch with nobody up: its ticks are missed, and missed= says what runs.
    down, up = gap
    in_gap = [t for t in window if down + FIRE_WITHIN < t < up]
    assert len(in_gap) >= 2
    late = {t: r for t, r in by_tick.items() if r.created_at - t > GRACE}
    first_after = by_tick[min(t for t in by_tick if t > down)]  # the first run after it
    logged = [e for c in run.children for e in c.events("periodic_ticks_missed")]
    gap_logged = [e for e in logged if down < datetime.fromisoformat(e["until"]).timestamp() < up]
    assert len(gap_logged) == 1, logged  # by the manager that decided them, once
    if missed == "skip":
        assert late == {}, f"missed ticks ran: {sorted(late)}"
        assert all(t not in by_tick for t in in_gap)
        assert gap_logged[0]["ran"] is None
    else:
        # one run, late, for the latest tick due when the first manager after the gap
        # decided; no other tick of the gap
        gap_run = tick_of_row(first_after)
        assert gap_run == every.at_or_before(first_after.created_at)
        assert gap_run == max(in_gap)
        assert gap_run in late
        assert all(t not in by_tick for t in in_gap if t != gap_run)
        assert gap_logged[0]["ran"] == datetime.fromtimestamp(gap_run, UTC).isoformat()
    # Every task ran to its end; more than one start only after an attempt cut short.
    markers = read_markers(run.markers)
    starts = Counter(m["id"] for m in markers if m["event"] == "start")
    done = Counter(m["id"] for m in markers if m["event"] == "done")
    reruns = 0
    for row in rows:
        assert row.status is TaskStatus.COMPLETED, row
        assert starts[row.id] >= 1
        assert done[row.id] >= 1
        if starts[row.id] > 1:
            reruns += 1
            assert row.recoveries >= 1, f"{row.id} ran {starts[row.id]} times, none cut short"
    assert set(starts) == {r.id for r in rows}  # no run of a task the journal lacks
    assert all(m["tick"] == by_tick[m["tick"]].scheduled_at for m in markers)
    kills = sum(1 for c in run.children if c.killed)
    return {
        "ticks in window": len(window),
        "ticks run": sum(1 for t in window if t in by_tick),
        "ticks with nobody up": len(uncovered),
        "ticks in the gap": len(in_gap),
        "runs of gap ticks": sum(1 for t in in_gap if t in by_tick),
        "late runs": len(late),
        "processes": len(run.children),
        "kill -9": kills,
        "tasks run twice (cut short)": reruns,
    }


def chaos_test(
    tmp: Path, journal_arg: str, journal: Journal, args: list[str], missed: str, seed: int
) -> dict[str, Any]:
    markers = tmp / "markers.jsonl"
    args = [*args, "--every", str(EVERY), "--missed", missed, "--overlap"]
    run = Run(tmp, journal_arg, args, markers)
    try:
        gap = chaos(run, seconds=20.0, seed=seed)
        time.sleep(2.5)  # the tasks of the last ticks and of the killed owners finish
        run.stop_all()
    finally:
        run.cleanup()
    rows = anyio.run(journal_rows, journal)
    return check(run, rows, gap, missed)


def test_managers_killed_at_random_on_sqlite_run_each_tick_once(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    report = chaos_test(tmp_path, str(path), SQLiteJournal(path), [], "latest", seed=13)
    print(f"\nSQLite, missed=latest: {report}")


def test_managers_killed_at_random_on_postgres_run_each_tick_once(
    tmp_path: Path, pg_dsn: str, pg_schema: str
) -> None:
    from background_tasks.postgres import PostgresJournal

    journal = PostgresJournal(pg_dsn, schema=pg_schema)
    report = chaos_test(tmp_path, pg_dsn, journal, ["--schema", pg_schema], "skip", seed=31)
    print(f"\nPostgreSQL, missed=skip: {report}")


def test_a_slow_tick_skips_the_next_one_and_logs_it(tmp_path: Path) -> None:
    """Two managers; each run of the task takes 1.5 s of a 1 s interval, overlap=False:
    the tick after each run is skipped, logged once, and never run."""
    path = tmp_path / "shared.db"
    markers = tmp_path / "markers.jsonl"
    run = Run(tmp_path, str(path), ["--every", str(EVERY), "--sleep", "1.5"], markers)
    try:
        for _ in range(2):
            run.start()
        for child in run.children:
            run.wait_ready(child)
        time.sleep(5.6)
        run.stop_all()
    finally:
        run.cleanup()
    rows = anyio.run(journal_rows, SQLiteJournal(path))
    ran = sorted(tick_of_row(r) for r in rows)
    skipped = [
        (e["tick"], e["task_id"]) for c in run.children for e in c.events("periodic_tick_skipped")
    ]
    skipped_ticks = sorted(datetime.fromisoformat(t).timestamp() for t, _ in skipped)
    assert len(ran) >= 2
    assert len(skipped_ticks) >= 2
    assert len(set(skipped_ticks)) == len(skipped_ticks)  # each logged once, by one manager
    assert not set(ran) & set(skipped_ticks)  # a skipped tick never ran
    for tick in skipped_ticks:  # the tick after a run, whose task was still running
        assert tick - EVERY in ran
    by_id = {r.id: tick_of_row(r) for r in rows}
    for tick_text, task_id in skipped:  # the unfinished task it named: the tick before
        assert by_id[task_id] == datetime.fromisoformat(tick_text).timestamp() - EVERY
    decided = sorted(ran + skipped_ticks)
    assert all(b - a == EVERY for a, b in itertools.pairwise(decided))
