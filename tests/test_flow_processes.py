"""Flow control across real processes, on one SQLite file and on PostgreSQL.

Worker processes (``tests/durability_apps/flow_worker.py``, alternating asyncio and trio)
share one journal with this test's own manager, which only submits (``run_tasks=False``).
Each task appends its start and end to one marker file (O_APPEND, fsynced). What the
journal recorded (each claim's history line) gives the exact start times a rate is
counted by; the markers give intervals that lie inside each task's RUNNING time, so an
overlap of markers is an overlap of running tasks. Times are bounded only loosely.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from background_tasks import TaskStatus

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
from durability_apps.flow_worker import build, parse  # noqa: E402
from test_journal_postgres import fresh_schema, pg_dsn  # noqa: E402, F401

pytestmark = [pytest.mark.slow, pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the children alternate asyncio and trio


@pytest.fixture(params=["sqlite", "postgres"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> list[str]:
    """The journal arguments of every process in the test."""
    if request.param == "sqlite":
        return ["--journal", str(tmp_path / "flow.db")]
    dsn = request.getfixturevalue("pg_dsn")
    return ["--journal", dsn, "--schema", request.getfixturevalue("fresh_schema")]


class Child:
    def __init__(self, tmp: Path, label: str, args: list[str], backend: str) -> None:
        self.label = label
        self.out = tmp / f"{label}.out"
        self.err = tmp / f"{label}.err"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "durability_apps.flow_worker", "--label", label,
                 "--backend", backend, *args],
                stdout=out, stderr=err, env=ENV, cwd=tmp,
            )  # fmt: skip
        self.pid = self.proc.pid

    async def ready(self) -> None:
        with anyio.fail_after(30):
            while b'"ready"' not in self.out.read_bytes():
                assert self.proc.poll() is None, self.err.read_text()
                await anyio.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(10) == -signal.SIGKILL


@pytest.fixture
def children(tmp_path: Path) -> Iterator[list[Child]]:
    started: list[Child] = []
    yield started
    for child in started:  # only the processes this test started, by their own handle
        child.stop()


def start(children: list[Child], tmp: Path, label: str, args: list[str]) -> Child:
    backend = ("asyncio", "trio")[len(children) % 2]
    child = Child(tmp, label, args, backend)
    children.append(child)
    return child


def markers(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def intervals(lines: list[dict[str, Any]], prefix: str) -> list[tuple[float, float, str]]:
    """(start, end, name) of each run of the named tasks (a killed run never ends)."""
    found: dict[tuple[str, int], list[float]] = {}
    for line in lines:
        if line["name"].startswith(prefix):
            found.setdefault((line["name"], line["pid"]), []).append(line["t"])
    return [(ts[0], ts[-1] if len(ts) > 1 else float("inf"), n) for (n, _), ts in found.items()]


def most_at_once(spans: list[tuple[float, float, str]]) -> int:
    edges = sorted([(s, 1) for s, _, _ in spans] + [(e, -1) for _, e, _ in spans])
    now = top = 0
    for _, step in edges:  # an end sorts before a start at the same instant
        now += step
        top = max(top, now)
    return top


async def test_three_managers_keep_locks_limits_rates_partitions_and_run_queues(
    target: list[str], tmp_path: Path, children: list[Child]
) -> None:
    marks = tmp_path / "markers"
    for label, extra in (("A", []), ("B", []), ("C", ["--queue", "a"])):
        start(children, tmp_path, label, [*target, *extra])
    for child in children:
        await child.ready()
    submitter = build(parse([*target, "--label", "T", "--submit-only"]))
    m = str(marks)
    async with submitter:
        submit = submitter.submit
        slow = await submit("step", m, "part-slow", 3.0, queue="parts", partition="slow")
        with anyio.fail_after(20):
            while not marks.exists() or "part-slow" not in marks.read_text():  # noqa: ASYNC110
                await anyio.sleep(0.02)  # another process writes the file
        handles = [slow]
        handles += [await submit("step", m, f"fast{i}", 0.05, queue="parts", partition="fast")
                    for i in range(5)]  # fmt: skip
        for i in range(6):
            for lock in "xy":
                handles.append(await submit("step", m, f"lock-{lock}{i}", 0.1, lock=lock))
        handles += [await submit("step", m, f"shared{i}", 0.2, queue="shared2") for i in range(9)]
        rated = [await submit("step", m, f"rate{i}", 0.0, queue="rate5") for i in range(12)]
        handles += rated
        handles += [await submit("step", m, f"qa{i}", 0.05, queue="a") for i in range(6)]
        handles += [await submit("step", m, f"qb{i}", 0.05, queue="b") for i in range(6)]
        with anyio.fail_after(60):
            for handle in handles:
                await handle
        claims = []
        for handle in rated:
            history = await submitter.history(handle.id)
            claims += [h.at.timestamp() for h in history if h.target is TaskStatus.RUNNING]
    lines = markers(marks)
    by_label = {line["label"] for line in lines}
    assert by_label <= {"A", "B", "C"}

    # a lock is never held twice; different locks overlap
    x, y = intervals(lines, "lock-x"), intervals(lines, "lock-y")
    assert most_at_once(x) == 1
    assert most_at_once(y) == 1
    assert most_at_once(x + y) == 2
    # Queue(limit=2, shared=True): never 3 running across the processes
    assert most_at_once(intervals(lines, "shared")) == 2
    # Queue(rate="5/s", shared=True): never more than 5 claims in any 1 s window
    claims.sort()
    assert len(claims) == 12
    assert all(claims[i + 5] - claims[i] >= 1.0 for i in range(len(claims) - 5)), claims
    # per_partition=1: the slow partition delayed no other
    (slow_span,) = intervals(lines, "part-slow")
    fast = intervals(lines, "fast")
    assert most_at_once(fast) == 1
    assert max(end for _, end, _ in fast) < slow_span[1]
    # C runs only queue "a"; "b" ran elsewhere
    ran_b = {line["label"] for line in lines if line["name"].startswith("qb")}
    assert ran_b
    assert "C" not in ran_b
    assert {line["label"] for line in lines if not line["name"].startswith("qa")} <= {"A", "B"}


async def test_a_killed_lock_holder_lets_the_next_start_only_after_the_takeover(
    target: list[str], tmp_path: Path, children: list[Child]
) -> None:
    marks = tmp_path / "markers"
    for label in "AB":
        start(children, tmp_path, label, [*target, "--lease", "3"])
    for child in children:
        await child.ready()
    submitter = build(parse([*target, "--label", "T", "--submit-only", "--lease", "3"]))
    m = str(marks)
    async with submitter:
        holder = await submitter.submit("step", m, "k-holder", 60.0, kwargs={"then": 0.0}, lock="k")
        with anyio.fail_after(20):
            while not marks.exists() or "k-holder" not in marks.read_text():  # noqa: ASYNC110
                await anyio.sleep(0.02)  # another process writes the file
        nexts = [await submitter.submit("step", m, f"k-next{i}", 0.05, lock="k") for i in range(2)]
        await anyio.sleep(0.5)  # they wait for the lock meanwhile
        (first,) = markers(marks)
        (victim,) = [c for c in children if c.pid == first["pid"]]
        killed_at = time.time()
        victim.kill9()
        try:
            with anyio.fail_after(30):
                for handle in [holder, *nexts]:
                    await handle
        except TimeoutError:  # say what the journal holds: the test's evidence
            rows = [await submitter.get(h.id) for h in [holder, *nexts]]
            seen = [(r.name if r else None, r.status if r else None, r.owner if r else None,
                     r.attempts if r else None) for r in rows]  # fmt: skip
            lines = [(h.source, h.target, h.owner) for h in await submitter.history(holder.id)]
            errs = {c.label: c.err.read_text()[-2000:] for c in children}
            raise AssertionError(f"no takeover: {seen} {lines} {errs}") from None
        history = await submitter.history(holder.id)
    takeover = next(h.at.timestamp() for h in history if h.source is TaskStatus.RUNNING)
    assert takeover >= killed_at
    lines = markers(marks)
    later = [line for line in lines if line["event"] == "start" and line is not lines[0]]
    assert len(later) == 3  # the holder again, and the two that waited
    assert all(line["t"] >= takeover for line in later)
    spans = intervals(lines, "k-")
    spans = [(s, takeover if e == float("inf") else e, n) for s, e, n in spans]
    assert most_at_once(spans) == 1
    assert takeover - killed_at < 10  # loosely: a dead owner is taken over within seconds
