"""The typed codec's cost on the durable path (SQLite FULL), in one run, alternating.

Three registered tasks, the same no-op body: unannotated ``noop(n)``, ``noop(n: int)``
(JSON's own type: no codec, nothing to pay) and ``noop(n: datetime)`` (a pydantic
TypeAdapter encodes the argument at submit). 50 submitters, concurrency 100, N tasks per
round, as ``compare_durable.py``; prints tasks/s per round, medians and the ratios.

    python benchmarks/compare_codec.py [--n 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import tempfile
import time
from datetime import UTC, datetime
from typing import Any

import anyio

from background_tasks import BackgroundTaskManager, SQLiteJournal

SUBMITTERS = 50


def _register(manager: BackgroundTaskManager) -> dict[str, Any]:
    @manager.task(name="plain")
    async def plain(n):  # type: ignore[no-untyped-def]
        return None

    @manager.task(name="int")
    async def as_int(n: int) -> None:
        return None

    @manager.task(name="datetime")
    async def as_datetime(n: datetime) -> None:
        return None

    when = datetime(2026, 12, 1, tzinfo=UTC)
    return {"plain": (plain, 1), "int": (as_int, 1), "datetime": (as_datetime, when)}


async def _round(kind: str, n: int, workdir: str) -> float:
    path = os.path.join(workdir, f"{kind}.db")  # removed by the caller after the round
    manager = BackgroundTaskManager(max_concurrency=100, journal=SQLiteJournal(path))
    task, arg = _register(manager)[kind]
    async with manager:
        handles = []

        async def submit() -> None:
            for _ in range(n // SUBMITTERS):
                handles.append(await task.submit(arg))

        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(SUBMITTERS):
                tg.start_soon(submit)
        for h in handles:
            await h
        elapsed = time.perf_counter() - started
    return n / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    kinds = ["plain", "int", "datetime"]
    rates: dict[str, list[float]] = {k: [] for k in kinds}
    workdir = tempfile.mkdtemp(prefix="bgtasks-codec-")
    try:
        for r in range(a.rounds):
            order = kinds[r % 3 :] + kinds[: r % 3]  # rotate who goes first
            for kind in order:
                rates[kind].append(anyio.run(_round, kind, a.n, workdir))
                for leftover in os.listdir(workdir):  # a fresh file per round
                    shutil.rmtree(os.path.join(workdir, leftover), ignore_errors=True)
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(workdir, leftover))
                print(f"  round {r + 1}/{a.rounds} {kind:9} {rates[kind][-1]:10,.0f} tasks/s")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"\nSQLite FULL, {a.n} no-op tasks, {SUBMITTERS} submitters, medians of {a.rounds}:")
    for k in kinds:
        print(f"  {k:9} {med[k]:10,.0f} tasks/s   {med[k] / med['plain']:.2f}x unannotated")


if __name__ == "__main__":
    main()
