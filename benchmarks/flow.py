"""What flow control costs (issue 14), side by side in one run, alternating rounds.

In memory (``max_concurrency=100``, submit all then await all, tasks that await one
``asyncio.sleep(0)``):

* ``plain``: the default queue;
* ``partitioned``: ``Queue(per_partition=1)``, task i in partition ``i % 1000``;
* ``locks``: the default queue, task i with ``lock=i % 100`` (100 locks: at most one
  task of each runs at a time, the others wait in their lock's list).

Journaled claim rate (a backlog stored first by a manager that runs nothing, then
drained by one manager with ``max_concurrency=100``: every task is a claim and a
completion, no claim at submit), on SQLite (``synchronous=NORMAL``) and on PostgreSQL:

* ``plain``: ``Queue()``;
* ``shared``: ``Queue(limit=1000, shared=True)``, a limit that never binds, so what is
  measured is the counted claim (and on PostgreSQL its advisory lock);
* ``shared rate``: ``Queue(rate=(10**6, 1.0), shared=True)``, a window that never fills:
  the claim also counts and records its start.

Usage::

    .venv/bin/python benchmarks/flow.py            # N = 50,000 in memory; 5 rounds
    .venv/bin/python benchmarks/flow.py --quick    # a smoke run
    BGTASKS_BENCH_POSTGRES_DSN=postgresql://... (default: the test server) to choose it

Numbers on a shared machine are noisy: read the ratios (same run, medians of rounds).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from background_tasks import BackgroundTaskManager, Queue, SQLiteJournal
from background_tasks.journal import Journal

CONCURRENCY = 100
PG_DSN = os.environ.get("BGTASKS_BENCH_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
perf = time.perf_counter


async def sleepy() -> None:
    await asyncio.sleep(0)


# --------------------------------------------------------------------------- in memory


async def memory_run(kind: str, n: int) -> float:
    queues = {"parts": Queue(per_partition=1)} if kind == "partitioned" else None
    manager = BackgroundTaskManager(max_concurrency=CONCURRENCY, queues=queues)
    async with manager:
        submit = manager.submit
        names = [str(i % (1000 if kind == "partitioned" else 100)) for i in range(n)]
        t0 = perf()
        if kind == "plain":
            handles = [await submit(sleepy) for _ in names]
        elif kind == "partitioned":
            handles = [await submit(sleepy, queue="parts", partition=p) for p in names]
        else:
            handles = [await submit(sleepy, lock=name) for name in names]
        for handle in handles:
            await handle
        return n / (perf() - t0)


# --------------------------------------------------------------------------- journals

JOURNALED: dict[str, Queue] = {
    "plain": Queue(),
    "shared": Queue(limit=1000, shared=True),
    "shared rate": Queue(rate=(10**6, 1.0), shared=True),
}


def _journal(backend: str, where: str) -> Journal:
    if backend == "sqlite":
        return SQLiteJournal(where, synchronous="NORMAL")
    from background_tasks.postgres import PostgresJournal

    return PostgresJournal(PG_DSN, schema=where)


def _fresh(backend: str, workdir: str, tag: str) -> str:
    if backend == "sqlite":
        path = os.path.join(workdir, f"{tag}.db")
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.remove(path + suffix)
        return path
    import psycopg

    schema = f"bench_flow_{tag}"
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    return schema


def _drop(backend: str, where: str) -> None:
    if backend == "postgres":
        import psycopg

        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{where}" CASCADE')


def _manager(journal: Journal, kind: str, run: bool) -> BackgroundTaskManager:
    manager = BackgroundTaskManager(
        max_concurrency=CONCURRENCY,
        journal=journal,
        queues={"q": JOURNALED[kind]},
        run_tasks=run,
        poll_interval=0.05,
    )

    @manager.task(name="job")
    async def job() -> None:
        return None

    return manager


async def claim_run(backend: str, kind: str, n: int, workdir: str) -> float:
    tag = kind.replace(" ", "_")
    where = _fresh(backend, workdir, tag)
    try:
        async with _manager(_journal(backend, where), kind, run=False) as submitter:
            for start in range(0, n, 500):
                await asyncio.gather(
                    *(submitter.submit("job", queue="q") for _ in range(min(500, n - start)))
                )
        worker = _manager(_journal(backend, where), kind, run=True)
        t0 = perf()
        async with worker:
            while True:  # drained: every stored task completed here
                counts = worker.statistics()
                if counts.completed >= n:
                    break
                await anyio.sleep(0.005)
            elapsed = perf() - t0
        return n / elapsed
    finally:
        _drop(backend, where)


# --------------------------------------------------------------------------- rounds


def rounds(
    cases: list[tuple[str, Callable[[], Awaitable[float]]]], count: int
) -> dict[str, list[float]]:
    rates: dict[str, list[float]] = {name: [] for name, _ in cases}
    for r in range(count):
        k = r % len(cases)
        for name, run in cases[k:] + cases[:k]:  # rotate: no one always goes first
            gc.collect()
            rate = asyncio.run(run())  # type: ignore[arg-type]
            rates[name].append(rate)
            print(f"  round {r + 1}/{count} {name:<28} {rate:>10,.0f} tasks/s", file=sys.stderr)
    return rates


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--n", type=int, default=None, help="tasks per in-memory round")
    p.add_argument("--claims", type=int, default=None, help="tasks per journaled round")
    p.add_argument("--no-postgres", action="store_true")
    p.add_argument("--memory-only", action="store_true")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    count = args.rounds or (1 if args.quick else 5)
    n = args.n or (5_000 if args.quick else 50_000)
    claims = args.claims or (500 if args.quick else 5_000)
    backends = ["sqlite"] if args.no_postgres else ["sqlite", "postgres"]
    if args.memory_only:
        backends = []
    out: dict[str, Any] = {}
    print(f"in memory: N={n:,}, concurrency {CONCURRENCY}, {count} rounds", file=sys.stderr)
    mem = rounds(
        [
            (kind, lambda kind=kind: memory_run(kind, n))  # type: ignore[misc]
            for kind in ("plain", "partitioned", "locks")
        ],
        count,
    )
    out["memory"] = {k: statistics.median(v) for k, v in mem.items()}
    with tempfile.TemporaryDirectory() as workdir:
        for backend in backends:
            print(f"{backend}: claim rate, N={claims:,}, {count} rounds", file=sys.stderr)
            got = rounds(
                [
                    (kind, lambda kind=kind, b=backend: claim_run(b, kind, claims, workdir))  # type: ignore[misc]
                    for kind in JOURNALED
                ],
                count,
            )
            out[backend] = {k: statistics.median(v) for k, v in got.items()}
    print()
    print(f"| in memory (N={n:,}) | tasks/s | vs plain |")
    print("|---|---|---|")
    base = out["memory"]["plain"]
    for kind, rate in out["memory"].items():
        print(f"| {kind} | {rate:,.0f} | {rate / base:.2f}x |")
    for backend in backends:
        print()
        print(f"| {backend} claim rate (N={claims:,}) | tasks/s | vs plain |")
        print("|---|---|---|")
        base = out[backend]["plain"]
        for kind, rate in out[backend].items():
            print(f"| {kind} | {rate:,.0f} | {rate / base:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
