"""Durable throughput, latency, recovery and memory of the journaled manager (issue 3).

Side by side in ONE process, alternating contenders round by round (median of rounds):

* ``manager (memory)``: BackgroundTaskManager without a journal (the ceiling);
* ``manager SQLite FULL`` / ``manager SQLite NORMAL``: the same with
  ``SQLiteJournal(path, synchronous=...)``;
* ``huey SqliteHuey``: the same no-op task on the same disk, ``fsync=True`` (FULL), WAL;
  enqueue rate (one thread, one commit per enqueue) and drain rate (an in-process
  consumer with 10 worker threads) measured separately;
* ``sqlite3 floor``: plain sqlite3, WAL, ``synchronous=FULL``, 100 tasks per commit with
  three writes each (insert PENDING, update RUNNING, update COMPLETED); and, for scale,
  the same with ``synchronous=NORMAL`` (what fsync costs on this disk: the most NORMAL
  can gain) and with one commit per write.

The manager workload: 50 concurrent submitters each ``await noop.submit()`` their share
(a durable acknowledgement per submit), then every handle is awaited; concurrency 100; a
registered no-op task, so three journaled transitions per task (PENDING, RUNNING,
COMPLETED); a submit that finds a worker idle stores the first two in one row write.

Also: durable submit latency (one submitter, idle manager; time until ``submit``
returns), the time to recover 100,000 pending tasks on start (written by a manager whose
task never finishes, then closed; time from ``async with`` to the body, and until all are
queued or running), and bytes per pending task in the journaled manager versus the
in-memory one (tracemalloc, after ``gc.collect()``).

Usage::

    .venv/bin/python benchmarks/compare_durable.py             # full: 5 rounds
    .venv/bin/python benchmarks/compare_durable.py --quick     # smoke: small N, 1 round
    .venv/bin/python benchmarks/compare_durable.py --json out.json --dir /some/disk
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import platform
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

import anyio
from huey import SqliteHuey

from background_tasks import BackgroundTaskManager, SQLiteJournal

CONCURRENCY = 100
SUBMITTERS = 50
perf = time.perf_counter
say: Callable[..., None] = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731


# --------------------------------------------------------------------------- helpers


def _unlink_db(path: str) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path + suffix)
    shutil.rmtree(path + "-owners", ignore_errors=True)  # the owners' lock files


def _journal(path: str | None, sync: str | None) -> Any:
    if path is None:
        return None
    return SQLiteJournal(path, synchronous=sync)


def _manager(path: str | None, sync: str | None, **kw: Any) -> Any:
    kw.setdefault("max_concurrency", CONCURRENCY)
    return BackgroundTaskManager(journal=_journal(path, sync), **kw)


def _queued_and_running(manager: Any) -> int:
    """queued + running from ``manager.statistics()``, whatever shape it has."""
    stats = manager.statistics()

    def get(name: str) -> int:
        if isinstance(stats, dict):
            return int(stats.get(name, 0))
        return int(getattr(stats, name, 0))

    return get("queued") + get("running")


async def _submit_all(submit: Callable[[], Any], n: int, submitters: int) -> list[Any]:
    handles: list[Any] = []
    share, extra = divmod(n, submitters)

    async def submitter(count: int) -> None:
        for _ in range(count):
            handles.append(await submit())

    async with anyio.create_task_group() as tg:
        for i in range(submitters):
            tg.start_soon(submitter, share + (1 if i < extra else 0))
    return handles


# --------------------------------------------------------------------------- throughput


async def _manager_throughput(path: str | None, sync: str | None, n: int) -> float:
    manager = _manager(path, sync)

    @manager.task(name="noop")
    async def noop() -> None:
        return None

    async with manager:
        t0 = perf()
        handles = await _submit_all(noop.submit, n, SUBMITTERS)
        for h in handles:
            await h
        elapsed = perf() - t0
    return n / elapsed


def manager_throughput(workdir: str, sync: str | None, n: int) -> dict[str, float]:
    path = None if sync is None else os.path.join(workdir, f"bench-{sync.lower()}.db")
    if path:
        _unlink_db(path)
    gc.collect()
    try:
        rate = asyncio.run(_manager_throughput(path, sync, n))
    finally:
        if path:
            _unlink_db(path)
    return {"rate": rate}


def huey_throughput(workdir: str, n: int, workers: int = 10) -> dict[str, float]:
    path = os.path.join(workdir, "huey.db")
    _unlink_db(path)
    huey = SqliteHuey(name="bench", filename=path, fsync=True, results=False)
    done = threading.Event()
    lock = threading.Lock()
    count = 0

    @huey.task()
    def noop() -> None:
        nonlocal count
        with lock:
            count += 1
            if count == n:
                done.set()

    gc.collect()
    try:
        t0 = perf()
        for _ in range(n):
            noop()
        enqueue = perf() - t0
        consumer = huey.create_consumer(workers=workers, worker_type="thread", periodic=False)
        consumer._set_signal_handlers = lambda: None  # in-process: leave our signals alone
        t1 = perf()
        consumer.start()
        if not done.wait(timeout=max(60.0, n / 200)):
            raise RuntimeError(f"huey drained only {count} of {n} tasks")
        drain = perf() - t1
        consumer.stop(graceful=True)
    finally:
        huey.storage.close()
        _unlink_db(path)
    return {
        "enqueue_rate": n / enqueue,
        "drain_rate": n / drain,
        "rate": n / (enqueue + drain),  # enqueue everything, then drain it
    }


_SCHEMA = """
create table if not exists tasks (
    id text primary key, name text not null, queue text not null, status text not null,
    priority integer not null, args text not null, kwargs text not null,
    attempts integer not null, created_at real not null, started_at real,
    finished_at real, result text
)"""
_INSERT = (
    "insert into tasks (id, name, queue, status, priority, args, kwargs, attempts,"
    " created_at) values (?, 'noop', 'default', 'pending', 0, '[]', '{}', 0, ?)"
)
_RUN = "update tasks set status = 'running', attempts = 1, started_at = ? where id = ?"
_DONE = "update tasks set status = 'completed', finished_at = ?, result = 'null' where id = ?"


def sqlite_floor(
    workdir: str, n: int, per_commit: int = 100, sync: str = "FULL"
) -> dict[str, float]:
    """Plain sqlite3, WAL + ``sync``: ``per_commit`` tasks (three writes each) per commit.

    ``per_commit=0`` means one commit per write (three commits per task).
    """
    path = os.path.join(workdir, "floor.db")
    _unlink_db(path)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("pragma journal_mode=wal")
        conn.execute(f"pragma synchronous={sync}")
        conn.execute(_SCHEMA)
        ids = [f"{i:020d}" for i in range(n)]
        gc.collect()
        t0 = perf()
        if per_commit:
            for b in range(0, n, per_commit):
                chunk = ids[b : b + per_commit]
                now = time.time()
                conn.execute("begin immediate")
                conn.executemany(_INSERT, [(i, now) for i in chunk])
                conn.executemany(_RUN, [(now, i) for i in chunk])
                conn.executemany(_DONE, [(now, i) for i in chunk])
                conn.execute("commit")
        else:
            for i in ids:
                now = time.time()
                conn.execute(_INSERT, (i, now))
                conn.execute(_RUN, (now, i))
                conn.execute(_DONE, (now, i))
        elapsed = perf() - t0
    finally:
        conn.close()
        _unlink_db(path)
    return {"rate": n / elapsed}


# --------------------------------------------------------------------------- latency


async def _submit_latency(path: str | None, sync: str | None, count: int) -> list[float]:
    manager = _manager(path, sync)

    @manager.task(name="noop")
    async def noop() -> None:
        return None

    out: list[float] = []
    async with manager:
        for _ in range(count):
            t0 = perf()
            h = await noop.submit()
            out.append(perf() - t0)
            await h
    return out


def submit_latency(workdir: str, sync: str | None, count: int) -> dict[str, float]:
    path = None if sync is None else os.path.join(workdir, f"lat-{sync.lower()}.db")
    if path:
        _unlink_db(path)
    try:
        s = sorted(asyncio.run(_submit_latency(path, sync, count))[count // 10 :])
    finally:
        if path:
            _unlink_db(path)
    return {
        "p50_ms": s[len(s) // 2] * 1e3,
        "p99_ms": s[min(len(s) - 1, int(len(s) * 0.99))] * 1e3,
    }


# --------------------------------------------------------------------------- recovery + memory


def _register_blocker(manager: Any) -> Any:
    @manager.task(name="block")
    async def block() -> None:
        await anyio.sleep_forever()

    return block


_RESTART_KW = {"shutdown_timeout": 0.2, "max_recoveries": 1_000}


async def _pending_memory(path: str | None, sync: str | None, n: int) -> float:
    """Submit n never-finishing tasks (100 run, the rest pend); bytes per task held."""
    manager = _manager(path, sync, **_RESTART_KW)
    block = _register_blocker(manager)
    async with manager:
        await anyio.sleep(0.05)
        gc.collect()
        base = tracemalloc.get_traced_memory()[0]
        handles = await _submit_all(block.submit, n, SUBMITTERS)
        await anyio.sleep(0.05)
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - base
        del handles
    return used / n


def pending_memory(path: str | None, sync: str | None, n: int) -> float:
    gc.collect()
    tracemalloc.start()
    try:
        return asyncio.run(_pending_memory(path, sync, n))
    finally:
        tracemalloc.stop()


async def _wait_queued(manager: Any, n: int, limit: float = 120.0) -> None:
    deadline = perf() + limit
    while _queued_and_running(manager) < n:
        if perf() > deadline:
            raise RuntimeError(f"only {_queued_and_running(manager)} of {n} tasks recovered")
        await anyio.sleep(0.005)


async def _recover(path: str, sync: str, n: int, trace: bool) -> dict[str, float]:
    manager = _manager(path, sync, **_RESTART_KW)
    _register_blocker(manager)
    gc.collect()
    base = tracemalloc.get_traced_memory()[0] if trace else 0
    t0 = perf()
    async with manager:
        entered = perf() - t0
        await _wait_queued(manager, n)
        queued = perf() - t0
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - base if trace else 0
    out = {"start_s": entered, "all_queued_s": queued}
    if trace:
        out["bytes_per_pending"] = used / n
    return out


def recover(path: str, sync: str, n: int, trace: bool = False) -> dict[str, float]:
    gc.collect()
    if trace:
        tracemalloc.start()
    try:
        return asyncio.run(_recover(path, sync, n, trace))
    finally:
        if trace:
            tracemalloc.stop()


# --------------------------------------------------------------------------- report


def _med(values: list[dict[str, float]], key: str) -> float:
    return statistics.median(v[key] for v in values)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: small N, 1 round")
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 5; quick 1)")
    p.add_argument("--n", type=int, default=None, help="tasks per manager/floor round")
    p.add_argument("--huey-n", type=int, default=None, help="tasks per huey round")
    p.add_argument("--recover-n", type=int, default=None, help="pending tasks to recover")
    p.add_argument("--lat-n", type=int, default=None, help="sequential submits for latency")
    p.add_argument("--dir", default=None, help="directory for the database files")
    p.add_argument(
        "--skip", action="append", default=[], choices=["throughput", "latency", "recovery"]
    )
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    a = p.parse_args(argv)

    rounds = a.rounds or (1 if a.quick else 5)
    n = a.n or (2_000 if a.quick else 20_000)
    huey_n = a.huey_n or (1_000 if a.quick else 5_000)
    recover_n = a.recover_n or (10_000 if a.quick else 100_000)
    lat_n = a.lat_n or (100 if a.quick else 500)

    workdir = tempfile.mkdtemp(prefix="bgtasks-bench-", dir=a.dir)
    say(
        f"Python {platform.python_version()}, sqlite {sqlite3.sqlite_version}, "
        f"huey {version('huey')}, anyio {version('anyio')}; files in {workdir}"
    )

    contenders: dict[str, Callable[[], dict[str, float]]] = {
        "manager (memory)": lambda: manager_throughput(workdir, None, n),
        "manager SQLite FULL": lambda: manager_throughput(workdir, "FULL", n),
        "manager SQLite NORMAL": lambda: manager_throughput(workdir, "NORMAL", n),
    }
    contenders["huey SqliteHuey"] = lambda: huey_throughput(workdir, huey_n)
    contenders["sqlite3 floor (100/commit)"] = lambda: sqlite_floor(workdir, n, 100)
    contenders["sqlite3 floor NORMAL"] = lambda: sqlite_floor(workdir, n, 100, "NORMAL")
    contenders["sqlite3, commit per write"] = lambda: sqlite_floor(workdir, max(n // 10, 500), 0)

    result: dict[str, Any] = {
        "config": {
            "n": n,
            "huey_n": huey_n,
            "rounds": rounds,
            "submitters": SUBMITTERS,
            "concurrency": CONCURRENCY,
            "recover_n": recover_n,
            "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version,
        }
    }
    try:
        tp: dict[str, list[dict[str, float]]] = {}
        if "throughput" not in a.skip:
            names = list(contenders)
            for r in range(rounds):
                k = r % len(names)
                for name in names[k:] + names[:k]:
                    fig = contenders[name]()
                    tp.setdefault(name, []).append(fig)
                    extra = "".join(
                        f"  {key} {val:,.0f}/s" for key, val in fig.items() if key != "rate"
                    )
                    say(f"  round {r + 1}/{rounds} {name:<28} {fig['rate']:>10,.0f} tasks/s{extra}")

        lat: dict[str, dict[str, float]] = {}
        if "latency" not in a.skip:
            for label, sync in [("memory", None), ("FULL", "FULL"), ("NORMAL", "NORMAL")]:
                lat[label] = submit_latency(workdir, sync, lat_n)
                say(f"  submit latency {label:<7} p50 {lat[label]['p50_ms']:.3f} ms")

        mem: dict[str, float] = {}
        rec: dict[str, Any] = {}
        if "recovery" not in a.skip:
            mem["memory"] = pending_memory(None, None, recover_n)
            say(f"  memory, in-memory manager: {mem['memory']:,.0f} B/pending")
            path = os.path.join(workdir, "recover.db")
            _unlink_db(path)
            t0 = perf()
            mem["FULL"] = pending_memory(path, "FULL", recover_n)
            say(
                f"  memory, journaled (FULL): {mem['FULL']:,.0f} B/pending; wrote "
                f"{recover_n:,} pending in {perf() - t0:.1f} s (with tracemalloc on)"
            )
            runs = [recover(path, "FULL", recover_n) for _ in range(3)]
            for i, run in enumerate(runs):
                say(
                    f"  recovery {i + 1}: start {run['start_s']:.2f} s, "
                    f"all queued {run['all_queued_s']:.2f} s"
                )
            rec = {
                "runs": runs,
                "start_s": _med(runs, "start_s"),
                "all_queued_s": _med(runs, "all_queued_s"),
            }
            after = recover(path, "FULL", recover_n, trace=True)
            mem["FULL after recovery"] = after["bytes_per_pending"]
            _unlink_db(path)
    finally:  # files, and the journals' owner-lock directories (tasks.db-owners/)
        shutil.rmtree(workdir, ignore_errors=True)

    # ---------------------------------------------------------------- tables
    med = {name: _med(v, "rate") for name, v in tp.items()}
    huey = tp.get("huey SqliteHuey")
    # reference series, one figure per round; huey's is the better of enqueue and drain
    refs: dict[str, list[float]] = {
        label: [x["rate"] for x in tp[name]]
        for label, name in (
            ("floor", "sqlite3 floor (100/commit)"),
            ("FULL", "manager SQLite FULL"),
            ("memory", "manager (memory)"),
        )
        if name in tp
    }
    if huey:
        refs["huey"] = [max(x["enqueue_rate"], x["drain_rate"]) for x in huey]
    huey_best = statistics.median(refs["huey"]) if huey else None

    def paired(name: str, ref: str) -> float | None:
        """Median over rounds of the per-round ratio (paired, so load drift cancels)."""
        if name not in tp or ref not in refs:
            return None
        mine = [x["rate"] for x in tp[name]]
        return statistics.median(a / b for a, b in zip(mine, refs[ref], strict=True))

    def ratio(name: str, ref: str) -> str:
        x = paired(name, ref)
        return f"{x:.2f}x" if x is not None else "-"

    if tp:
        print(
            f"\nDurable throughput: {SUBMITTERS} submitters, concurrency {CONCURRENCY}, "
            f"no-op registered task; N={n:,} (huey N={huey_n:,}); median of {rounds} round(s);"
            "\nratios are medians of per-round ratios"
        )
        hdr = (
            f"{'contender':<28} {'median/s':>10} {'min/s':>10} {'max/s':>10} "
            f"{'vs floor':>8} {'vs huey':>8} {'vs FULL':>8} {'vs memory':>9}"
        )
        print(hdr)
        print("-" * len(hdr))
        for name, v in tp.items():
            m = med[name]
            rates = [x["rate"] for x in v]
            print(
                f"{name:<28} {m:>10,.0f} {min(rates):>10,.0f} {max(rates):>10,.0f} "
                f"{ratio(name, 'floor'):>8} {ratio(name, 'huey'):>8} {ratio(name, 'FULL'):>8} "
                f"{ratio(name, 'memory'):>9}"
            )
        if huey:
            print(
                f"  huey: enqueue {_med(huey, 'enqueue_rate'):,.0f}/s (1 thread), drain "
                f"{_med(huey, 'drain_rate'):,.0f}/s (10 threads); its row is enqueue-then-drain;"
                f" 'vs huey' divides by the better of enqueue and drain "
                f"({huey_best:,.0f}/s)"
            )
    if lat:
        print("\nDurable submit latency (one submitter, idle manager; until submit returns)")
        for label, d in lat.items():
            print(f"  {label:<8} p50 {d['p50_ms']:>7.3f} ms   p99 {d['p99_ms']:>7.3f} ms")
    if rec:
        print(f"\nRecovery of {recover_n:,} pending tasks on start (FULL, median of 3)")
        print(f"  async with manager entered after {rec['start_s']:.2f} s")
        print(f"  all queued or running after      {rec['all_queued_s']:.2f} s")
    if mem:
        print(f"\nMemory per pending task ({recover_n:,} pending, tracemalloc, after gc)")
        for label, b in mem.items():
            print(f"  {label:<22} {b:>8,.0f} B")

    targets: list[dict[str, Any]] = []

    def target(label: str, value: float | None, goal: float, higher: bool, unit: str) -> None:
        ok = None if value is None else (value >= goal if higher else value <= goal)
        targets.append({"target": label, "value": value, "goal": goal, "ok": ok})
        shown = "-" if value is None else f"{value:,.2f} {unit}"
        flag = "n/a" if ok is None else ("PASS" if ok else "MISS")
        print(
            f"  [{flag:<4}] {label:<44} {shown:>14}  (target {'>=' if higher else '<='} "
            f"{goal:g} {unit})"
        )

    print("\nTargets (issue 3)")
    target("FULL vs huey SqliteHuey", paired("manager SQLite FULL", "huey"), 4.0, True, "x")
    target(
        "FULL vs sqlite3 floor (100/commit)",
        paired("manager SQLite FULL", "floor"),
        0.15,
        True,
        "x",
    )
    target("NORMAL vs FULL", paired("manager SQLite NORMAL", "FULL"), 1.5, True, "x")
    floor_normal = paired("sqlite3 floor NORMAL", "floor")
    if floor_normal is not None:
        print(
            f"{'':9}(for scale: plain sqlite3, 100 tasks per commit, NORMAL vs FULL"
            f" {floor_normal:.2f}x: what skipping fsync gives a path of ~10 us per task)"
        )
    target("durable submit p50 (FULL)", lat.get("FULL", {}).get("p50_ms"), 5.0, False, "ms")
    target(f"recover {recover_n:,} pending (all queued)", rec.get("all_queued_s"), 3.0, False, "s")
    target(
        "journaled B/pending minus in-memory",
        (mem["FULL"] - mem["memory"]) if "FULL" in mem else None,
        200,
        False,
        "B",
    )

    if a.json:
        result.update(
            throughput={k: {"rounds": v, "median": med[k]} for k, v in tp.items()},
            latency=lat,
            recovery=rec,
            memory_bytes_per_pending=mem,
            targets=targets,
        )
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
