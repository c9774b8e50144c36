"""Batch submit (issue 13): ``submit_many`` of N tasks vs N single submits, on the SQLite
journal (``synchronous=FULL``) and on the PostgreSQL journal, side by side in ONE run.

Contenders, each in a fresh journal (a new SQLite file; a new PostgreSQL schema), with a
manager that only submits (``run_tasks=False``: what is measured is accepting tasks
durably, not running them), a registered task and one small kwargs dict per task:

* ``submit_many``: ``await job.submit_many([{"n": 0}, ..., {"n": N - 1}])``: every task
  in one transaction;
* ``single submits``: ``for i in range(N): await job.submit(n=i)``: what a caller writes
  without ``submit_many``, one durable acknowledgement (one commit) per task;
* ``50 concurrent submitters`` (for scale): the same N single submits from 50 tasks at
  once, which group commit folds into shared transactions.

Rounds alternate the contenders' order; the table shows medians, and the ratio
``submit_many`` / ``single submits`` (the target: at least 5x on both journals).

Usage::

    .venv/bin/python benchmarks/compare_batch.py              # N=10,000, 3 rounds
    .venv/bin/python benchmarks/compare_batch.py --quick      # N=2,000, 1 round
    .venv/bin/python benchmarks/compare_batch.py --dsn postgresql://... --json out.json

The PostgreSQL journal is ``--dsn``, else ``$BGTASKS_TEST_POSTGRES_DSN``, else
``postgresql://postgres@127.0.0.1:5432/test``; ``--no-postgres`` skips it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from background_tasks import BackgroundTaskManager, SQLiteJournal

SUBMITTERS = 50
TARGET = 5.0
perf = time.perf_counter
say: Callable[..., None] = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731


def _manager(journal: Any) -> BackgroundTaskManager:
    manager = BackgroundTaskManager(journal=journal, run_tasks=False)

    @manager.task(name="job")
    async def job(n: int) -> int:
        return n

    return manager


async def _many(manager: BackgroundTaskManager, n: int) -> None:
    handles = await manager.submit_many("job", [{"n": i} for i in range(n)])
    assert len(handles) == n


async def _single(manager: BackgroundTaskManager, n: int) -> None:
    for i in range(n):
        await manager.submit("job", kwargs={"n": i})


async def _concurrent(manager: BackgroundTaskManager, n: int) -> None:
    async def submitter(k: int) -> None:
        for i in range(k, n, SUBMITTERS):
            await manager.submit("job", kwargs={"n": i})

    async with anyio.create_task_group() as tg:
        for k in range(SUBMITTERS):
            tg.start_soon(submitter, k)


CONTENDERS: dict[str, Callable[[BackgroundTaskManager, int], Awaitable[None]]] = {
    "submit_many": _many,
    "single submits": _single,
    f"{SUBMITTERS} concurrent submitters": _concurrent,
}


class _SQLite:
    name = "SQLite FULL"

    def __init__(self, directory: str) -> None:
        self.directory = directory

    @contextlib.asynccontextmanager
    async def journal(self) -> Any:
        path = os.path.join(self.directory, f"batch-{uuid.uuid4().hex[:8]}.db")
        try:
            yield SQLiteJournal(path, synchronous="FULL")
        finally:
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path + suffix)

    async def count(self, journal: Any) -> int:
        counts = await journal.counts()
        return int(sum(counts.values()))


class _Postgres:
    name = "PostgreSQL"

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    @contextlib.asynccontextmanager
    async def journal(self) -> Any:
        import psycopg

        from background_tasks.postgres import PostgresJournal

        schema = f"bench_{uuid.uuid4().hex[:12]}"
        try:
            yield PostgresJournal(self.dsn, schema=schema)
        finally:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

    async def count(self, journal: Any) -> int:
        counts = await journal.counts()
        return int(sum(counts.values()))


async def _round(backend: Any, name: str, n: int) -> float:
    """Seconds for one contender to submit ``n`` tasks into a fresh journal (the
    manager's start and stop are outside the timed region)."""
    async with backend.journal() as journal:
        manager = _manager(journal)
        async with manager:
            start = perf()
            await CONTENDERS[name](manager, n)
            elapsed = perf() - start
            stored = await backend.count(journal)
        assert stored == n, f"{name}: {stored} of {n} stored"
    return elapsed


async def run(args: argparse.Namespace) -> dict[str, Any]:
    backends: list[Any] = [_SQLite(args.dir)]
    if not args.no_postgres:
        backends.append(_Postgres(args.dsn))
    names = list(CONTENDERS)
    results: dict[str, Any] = {}
    for backend in backends:
        rounds: dict[str, list[float]] = {name: [] for name in names}
        for r in range(args.rounds):
            order = names if r % 2 == 0 else names[::-1]
            for name in order:
                seconds = await _round(backend, name, args.n)
                rounds[name].append(args.n / seconds)
                say(f"{backend.name} round {r + 1}: {name}: {args.n / seconds:,.0f} tasks/s")
        medians = {name: statistics.median(rates) for name, rates in rounds.items()}
        ratio = medians["submit_many"] / medians["single submits"]
        results[backend.name] = {
            "rounds": rounds,
            "median": medians,
            "ratio": ratio,
            "ratio_vs_concurrent": medians["submit_many"] / medians[names[2]],
            "target": TARGET,
            "met": ratio >= TARGET,
        }
    return results


def report(results: dict[str, Any], n: int) -> None:
    names = list(CONTENDERS)
    print(f"\nN={n:,} tasks per contender; tasks/s, median of rounds\n")
    header = f"| journal | {' | '.join(names)} | submit_many / single | vs concurrent |"
    print(header)
    print("|" + "---|" * (len(names) + 3))
    for backend, r in results.items():
        rates = " | ".join(f"{r['median'][name]:,.0f}" for name in names)
        met = "ok" if r["met"] else f"MISS (target {TARGET:g}x)"
        print(
            f"| {backend} | {rates} | {r['ratio']:.1f}x {met} | {r['ratio_vs_concurrent']:.1f}x |"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: N=2,000, 1 round")
    p.add_argument("--n", type=int, default=None, help="tasks per contender (default 10,000)")
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 3; quick 1)")
    p.add_argument("--dir", default=None, help="directory for the SQLite files")
    p.add_argument("--dsn", default=None, help="the PostgreSQL server")
    p.add_argument("--no-postgres", action="store_true", help="SQLite only")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = p.parse_args(argv)
    args.n = args.n or (2_000 if args.quick else 10_000)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.dsn = (
        args.dsn
        or os.environ.get("BGTASKS_TEST_POSTGRES_DSN")
        or "postgresql://postgres@127.0.0.1:5432/test"
    )
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        args.dir = tmp
        results = anyio.run(run, args)
    report(results, args.n)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"n": args.n, "python": platform.python_version(), "results": results}, f, indent=2
            )
    return 0 if all(r["met"] for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
