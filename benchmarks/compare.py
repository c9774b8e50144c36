"""Side-by-side throughput, memory and latency of BackgroundTaskManager (issue 2).

Runs, in ONE process and alternating between contenders round by round:

* raw asyncio: ``create_task`` per job, each job inside ``async with Semaphore(100)``;
* ``aiojobs.Scheduler(limit=100, pending_limit=0)``: ``spawn`` then ``job.wait()``;
* a bare pool of 100 worker tasks pulling coroutines from an ``asyncio.Queue``
  (the practical floor: no handles, no records, no results);
* ``background_tasks.BackgroundTaskManager(max_concurrency=100)``: ``await
  manager.submit(fn)`` for every job, then ``await handle`` for every handle.

Workloads: ``noop`` (``async def`` that returns at once, never yields) and ``sleepy``
(awaits one ``asyncio.sleep(0)``). The manager runs the sleepy workload twice: with the
same ``asyncio.sleep(0)`` body as everyone else (the row the targets use) and with
``anyio.sleep(0)`` (what a library user writing backend-neutral code would await).

Also measured: bytes per pending task with 100,000 pending (tracemalloc, after
``gc.collect()``; 100 jobs hold the slots waiting on an event, the rest are queued) and
submit-to-start latency p50/p99 on an idle runner (time from just before submit to the
first line of the job, over sequential submit-then-await pairs).

Usage::

    .venv/bin/python benchmarks/compare.py            # full: N = 20k, 100k; 5 rounds
    .venv/bin/python benchmarks/compare.py --quick    # smoke: small N, 1 round
    .venv/bin/python benchmarks/compare.py --json out.json

Numbers on a shared machine are noisy: read the ratios (same run, medians of rounds).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import platform
import statistics
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Coroutine
from importlib.metadata import version
from typing import Any

import aiojobs
import anyio

from background_tasks import BackgroundTaskManager

CONCURRENCY = 100
perf = time.perf_counter

# --------------------------------------------------------------------------- workloads


async def noop() -> None:
    return None


async def sleepy() -> None:
    await asyncio.sleep(0)


async def sleepy_anyio() -> None:
    await anyio.sleep(0)  # noqa: ASYNC115 - the zero-length sleep is the workload


WORKLOADS: dict[str, Callable[[], Coroutine[Any, Any, None]]] = {
    "noop": noop,
    "sleepy": sleepy,
}

# --------------------------------------------------------------------------- throughput
# Each runner takes (n, fn) and returns elapsed seconds for "submit all, then await all".
# Setup (scheduler, workers, manager start) and teardown are outside the timed region.


async def run_raw(n: int, fn: Callable[[], Awaitable[None]]) -> float:
    sem = asyncio.Semaphore(CONCURRENCY)

    async def job() -> None:
        async with sem:
            await fn()

    t0 = perf()
    tasks = [asyncio.create_task(job()) for _ in range(n)]
    for t in tasks:
        await t
    return perf() - t0


async def run_aiojobs(n: int, fn: Callable[[], Coroutine[Any, Any, None]]) -> float:
    # pending_limit=0: an unbounded pending queue, so "submit all" never blocks.
    scheduler = aiojobs.Scheduler(limit=CONCURRENCY, pending_limit=0)
    try:
        t0 = perf()
        jobs = [await scheduler.spawn(fn()) for _ in range(n)]
        for job in jobs:
            await job.wait()
        return perf() - t0
    finally:
        await scheduler.close()


class _Pool:
    """The floor: CONCURRENCY long-lived tasks awaiting coroutines from one asyncio.Queue."""

    def __init__(self, n: int) -> None:
        self.queue: asyncio.Queue[Coroutine[Any, Any, Any]] = asyncio.Queue()
        self.done = asyncio.Event()
        self.remaining = n
        self.workers = [asyncio.create_task(self._worker()) for _ in range(CONCURRENCY)]

    async def _worker(self) -> None:
        while True:
            coro = await self.queue.get()
            await coro
            self.remaining -= 1
            if self.remaining == 0:
                self.done.set()

    async def close(self) -> None:
        for w in self.workers:
            w.cancel()
        await asyncio.gather(*self.workers, return_exceptions=True)


async def run_pool(n: int, fn: Callable[[], Coroutine[Any, Any, None]]) -> float:
    pool = _Pool(n)
    await asyncio.sleep(0)
    try:
        t0 = perf()
        for _ in range(n):
            pool.queue.put_nowait(fn())
        await pool.done.wait()
        return perf() - t0
    finally:
        await pool.close()


async def run_manager(n: int, fn: Callable[[], Coroutine[Any, Any, None]]) -> float:
    manager = BackgroundTaskManager(max_concurrency=CONCURRENCY)
    async with manager:
        t0 = perf()
        handles = [await manager.submit(fn) for _ in range(n)]
        for h in handles:
            await h
        elapsed = perf() - t0
    return elapsed


# contender name -> (runner, workload name -> job function or None when not run)
CONTENDERS: dict[str, tuple[Callable[..., Awaitable[float]], dict[str, Any]]] = {
    "raw asyncio": (run_raw, {"noop": noop, "sleepy": sleepy}),
    "aiojobs": (run_aiojobs, {"noop": noop, "sleepy": sleepy}),
    "queue pool": (run_pool, {"noop": noop, "sleepy": sleepy}),
    "manager": (run_manager, {"noop": noop, "sleepy": sleepy}),
    "manager (anyio.sleep)": (run_manager, {"sleepy": sleepy_anyio}),
}


def _measure(runner: Callable[..., Awaitable[float]], n: int, fn: Any) -> float:
    gc.collect()
    elapsed = asyncio.run(runner(n, fn))
    return n / elapsed


def throughput(ns: list[int], rounds: int, names: list[str]) -> dict[str, Any]:
    rates: dict[tuple[int, str, str], list[float]] = {}
    for r in range(rounds):
        for n in ns:
            for workload in WORKLOADS:
                runnable = [c for c in names if workload in CONTENDERS[c][1]]
                # alternate: rotate the order every round so no one always goes first
                k = r % len(runnable)
                order = runnable[k:] + runnable[:k]
                for name in order:
                    runner, fns = CONTENDERS[name]
                    rate = _measure(runner, n, fns[workload])
                    rates.setdefault((n, workload, name), []).append(rate)
                    print(
                        f"  round {r + 1}/{rounds} N={n:>7,} {workload:<6} {name:<22}"
                        f" {rate:>11,.0f} tasks/s",
                        file=sys.stderr,
                        flush=True,
                    )
    return {
        f"{n}/{w}/{c}": {
            "n": n,
            "workload": w,
            "contender": c,
            "rounds": v,
            "median": statistics.median(v),
        }
        for (n, w, c), v in rates.items()
    }


# --------------------------------------------------------------------------- memory


async def _settle() -> None:
    # let every created task reach its first suspension point
    for _ in range(5):
        await asyncio.sleep(0)


async def mem_raw(n: int) -> float:
    sem = asyncio.Semaphore(CONCURRENCY)
    ev = asyncio.Event()

    async def job() -> None:
        async with sem:
            await ev.wait()

    gc.collect()
    base = tracemalloc.get_traced_memory()[0]
    tasks = [asyncio.create_task(job()) for _ in range(n)]
    await _settle()
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - base
    ev.set()
    for t in tasks:
        await t
    return used / n


async def mem_aiojobs(n: int) -> float:
    ev = asyncio.Event()
    scheduler = aiojobs.Scheduler(limit=CONCURRENCY, pending_limit=0)
    await scheduler.spawn(asyncio.sleep(0))  # creates its internal helper task up front
    gc.collect()
    base = tracemalloc.get_traced_memory()[0]
    jobs = [await scheduler.spawn(ev.wait()) for _ in range(n)]
    await _settle()
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - base
    ev.set()
    for job in jobs:
        await job.wait()
    await scheduler.close()
    return used / n


async def mem_pool(n: int) -> float:
    ev = asyncio.Event()
    pool = _Pool(n)
    await _settle()
    gc.collect()
    base = tracemalloc.get_traced_memory()[0]
    for _ in range(n):
        pool.queue.put_nowait(ev.wait())
    await _settle()
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - base
    ev.set()
    await pool.done.wait()
    await pool.close()
    return used / n


async def mem_manager(n: int) -> float:
    ev = anyio.Event()

    async def blocker() -> None:
        await ev.wait()

    manager = BackgroundTaskManager(max_concurrency=CONCURRENCY)
    async with manager:
        await _settle()
        gc.collect()
        base = tracemalloc.get_traced_memory()[0]
        handles = [await manager.submit(blocker) for _ in range(n)]
        await _settle()
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - base
        ev.set()
        for h in handles:
            await h
    return used / n


MEMORY = {
    "raw asyncio": mem_raw,
    "aiojobs": mem_aiojobs,
    "queue pool": mem_pool,
    "manager": mem_manager,
}


def memory(n: int, names: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name in names:
        if name not in MEMORY:
            continue
        gc.collect()
        tracemalloc.start()
        try:
            out[name] = asyncio.run(MEMORY[name](n))
        finally:
            tracemalloc.stop()
        print(f"  memory {name:<22} {out[name]:>8,.0f} B/pending", file=sys.stderr, flush=True)
    return out


# --------------------------------------------------------------------------- latency


def _pcts(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {
        "p50_us": s[len(s) // 2] * 1e6,
        "p99_us": s[min(len(s) - 1, int(len(s) * 0.99))] * 1e6,
        "mean_us": statistics.fmean(s) * 1e6,
    }


async def lat_raw(count: int) -> list[float]:
    sem = asyncio.Semaphore(CONCURRENCY)
    out: list[float] = []
    started = [0.0]

    async def job() -> None:
        async with sem:
            started[0] = perf()

    for _ in range(count):
        t0 = perf()
        await asyncio.create_task(job())
        out.append(started[0] - t0)
    return out


async def lat_aiojobs(count: int) -> list[float]:
    out: list[float] = []
    started = [0.0]

    async def job() -> None:
        started[0] = perf()

    scheduler = aiojobs.Scheduler(limit=CONCURRENCY, pending_limit=0)
    for _ in range(count):
        t0 = perf()
        j = await scheduler.spawn(job())
        await j.wait()
        out.append(started[0] - t0)
    await scheduler.close()
    return out


async def lat_pool(count: int) -> list[float]:
    queue: asyncio.Queue[Coroutine[Any, Any, Any]] = asyncio.Queue()
    out: list[float] = []
    started = [0.0]

    async def job(ev: asyncio.Event) -> None:
        started[0] = perf()
        ev.set()

    async def worker() -> None:
        while True:
            coro = await queue.get()
            await coro

    workers = [asyncio.create_task(worker()) for _ in range(CONCURRENCY)]
    await _settle()
    for _ in range(count):
        ev = asyncio.Event()
        t0 = perf()
        queue.put_nowait(job(ev))
        await ev.wait()
        out.append(started[0] - t0)
    for w in workers:
        w.cancel()
    await asyncio.gather(*workers, return_exceptions=True)
    return out


async def lat_manager(count: int) -> list[float]:
    out: list[float] = []
    started = [0.0]

    async def job() -> None:
        started[0] = perf()

    manager = BackgroundTaskManager(max_concurrency=CONCURRENCY)
    async with manager:
        await _settle()
        for _ in range(count):
            t0 = perf()
            h = await manager.submit(job)
            await h
            out.append(started[0] - t0)
    return out


LATENCY = {
    "raw asyncio": lat_raw,
    "aiojobs": lat_aiojobs,
    "queue pool": lat_pool,
    "manager": lat_manager,
}


def latency(count: int, names: list[str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name in names:
        if name not in LATENCY:
            continue
        gc.collect()
        samples = asyncio.run(LATENCY[name](count))
        out[name] = _pcts(samples[count // 10 :])  # drop the warm-up tenth
        print(
            f"  latency {name:<22} p50 {out[name]['p50_us']:>7.1f} us"
            f"  p99 {out[name]['p99_us']:>7.1f} us",
            file=sys.stderr,
            flush=True,
        )
    return out


# --------------------------------------------------------------------------- report


def _fmt_ratio(x: float | None) -> str:
    return f"{x:.2f}x" if x is not None else "-"


def report(
    tp: dict[str, Any],
    mem: dict[str, float],
    lat: dict[str, dict[str, float]],
    ns: list[int],
    rounds: int,
) -> dict[str, Any]:
    def rr(n: int, w: str, c: str, ref: str) -> float | None:
        """Median over rounds of the per-round ratio c/ref (paired, so load drift cancels)."""
        a, b = tp.get(f"{n}/{w}/{c}"), tp.get(f"{n}/{w}/{ref}")
        if not a or not b:
            return None
        return statistics.median(x / y for x, y in zip(a["rounds"], b["rounds"], strict=True))

    print()
    print(
        f"Throughput: submit all, then await all; concurrency {CONCURRENCY}; "
        f"median of {rounds} alternating round(s);\n"
        "ratios are medians of per-round ratios (each round runs every contender back to back)"
    )
    hdr = (
        f"{'N':>8}  {'workload':<8} {'contender':<22} {'median/s':>11} {'min/s':>10} "
        f"{'max/s':>10} {'vs raw':>7} {'vs aiojobs':>10} {'vs pool':>7}"
    )
    print(hdr)
    print("-" * len(hdr))
    for n in ns:
        for w in WORKLOADS:
            for c in CONTENDERS:
                e = tp.get(f"{n}/{w}/{c}")
                if not e:
                    continue
                m = e["median"]
                e["vs_raw"] = rr(n, w, c, "raw asyncio")
                e["vs_aiojobs"] = rr(n, w, c, "aiojobs")
                e["vs_pool"] = rr(n, w, c, "queue pool")
                print(
                    f"{n:>8,}  {w:<8} {c:<22} {m:>11,.0f} {min(e['rounds']):>10,.0f} "
                    f"{max(e['rounds']):>10,.0f} {_fmt_ratio(e['vs_raw']):>7} "
                    f"{_fmt_ratio(e['vs_aiojobs']):>10} {_fmt_ratio(e['vs_pool']):>7}"
                )
        print()

    if mem:
        print(f"Memory per pending task ({MEM_N_LABEL} pending, tracemalloc, after gc)")
        for c, b in mem.items():
            print(f"  {c:<22} {b:>8,.0f} B")
        print()
    if lat:
        print("Submit-to-start latency, idle runner (sequential submit-then-await)")
        for c, d in lat.items():
            print(f"  {c:<22} p50 {d['p50_us']:>8.1f} us   p99 {d['p99_us']:>8.1f} us")
        print()

    big = max(ns)
    targets: list[dict[str, Any]] = []

    def target(label: str, value: float | None, goal: float, higher: bool, unit: str) -> None:
        ok = None if value is None else (value >= goal if higher else value <= goal)
        targets.append({"target": label, "value": value, "goal": goal, "ok": ok})
        v = (
            "-"
            if value is None
            else (f"{value:.2f}{unit}" if unit == "x" else f"{value:,.1f} {unit}")
        )
        op = ">=" if higher else "<="
        g = f"{goal:.2f}x" if unit == "x" else f"{goal:,.0f} {unit}"
        flag = "n/a" if ok is None else ("PASS" if ok else "MISS")
        print(f"  [{flag:<4}] {label:<52} {v:>12}  (target {op} {g})")

    print("Targets (issue 2)")
    target(
        f"sleepy N={big:,}: manager vs raw asyncio",
        rr(big, "sleepy", "manager", "raw asyncio"),
        1.5,
        True,
        "x",
    )
    target(
        f"sleepy N={big:,}: manager vs aiojobs",
        rr(big, "sleepy", "manager", "aiojobs"),
        1.0,
        True,
        "x",
    )
    target(
        f"sleepy N={big:,}: manager (anyio.sleep) vs raw asyncio",
        rr(big, "sleepy", "manager (anyio.sleep)", "raw asyncio"),
        1.5,
        True,
        "x",
    )
    for n in ns:
        target(
            f"no-op N={n:,}: manager vs raw asyncio",
            rr(n, "noop", "manager", "raw asyncio"),
            1.0,
            True,
            "x",
        )
    target("bytes per pending task (manager)", mem.get("manager"), 800, False, "B")
    target(
        "submit-to-start p50, idle manager", lat.get("manager", {}).get("p50_us"), 100, False, "us"
    )
    return {
        "throughput": list(tp.values()),
        "memory_bytes_per_pending": mem,
        "latency": lat,
        "targets": targets,
    }


MEM_N_LABEL = ""


def main(argv: list[str] | None = None) -> int:
    global MEM_N_LABEL
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: small N, 1 round")
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 5; quick 1)")
    p.add_argument(
        "--n",
        type=int,
        action="append",
        default=None,
        help="task counts (repeatable; default 20000 and 100000)",
    )
    p.add_argument("--mem-n", type=int, default=None, help="pending tasks for memory")
    p.add_argument("--lat-n", type=int, default=None, help="sequential submits for latency")
    p.add_argument(
        "--only",
        action="append",
        default=None,
        choices=list(CONTENDERS),
        help="run only these contenders (repeatable)",
    )
    p.add_argument(
        "--skip", action="append", default=[], choices=["throughput", "memory", "latency"]
    )
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    a = p.parse_args(argv)

    rounds = a.rounds or (1 if a.quick else 5)
    ns = a.n or ([2_000, 10_000] if a.quick else [20_000, 100_000])
    mem_n = a.mem_n or (10_000 if a.quick else 100_000)
    lat_n = a.lat_n or (200 if a.quick else 2_000)
    MEM_N_LABEL = f"{mem_n:,}"
    names = a.only or list(CONTENDERS)

    print(
        f"Python {platform.python_version()} on {platform.machine()}; aiojobs "
        f"{version('aiojobs')}, anyio {version('anyio')}",
        file=sys.stderr,
    )
    tp = throughput(ns, rounds, names) if "throughput" not in a.skip else {}
    mem = memory(mem_n, names) if "memory" not in a.skip else {}
    lat = latency(lat_n, names) if "latency" not in a.skip else {}
    result = report(tp, mem, lat, ns, rounds)
    if a.json:
        result["config"] = {
            "ns": ns,
            "rounds": rounds,
            "mem_n": mem_n,
            "lat_n": lat_n,
            "concurrency": CONCURRENCY,
            "python": platform.python_version(),
        }
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
