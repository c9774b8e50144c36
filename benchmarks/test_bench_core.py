"""Small pytest-benchmark runs of the core hot paths (each test takes a second or two).

Run with ``pytest benchmarks/ --benchmark-only``. These are for spotting regressions
between commits (``--benchmark-autosave`` / ``--benchmark-compare``); the side-by-side
ratios against raw asyncio and aiojobs come from ``benchmarks/compare.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import pytest

from background_tasks import BackgroundTaskManager, RetryPolicy

N = 2_000
CONCURRENCY = 100
ROUNDS = 8


async def _noop() -> None:
    return None


async def _sleepy() -> None:
    await anyio.sleep(0)  # noqa: ASYNC115 - the zero-length sleep is the workload


async def _submit_and_await(fn: Callable[[], Coroutine[Any, Any, None]], n: int) -> int:
    manager = BackgroundTaskManager(max_concurrency=CONCURRENCY)
    async with manager:
        handles = [await manager.submit(fn) for _ in range(n)]
        for h in handles:
            await h
    return n


async def _registered(n: int) -> int:
    manager = BackgroundTaskManager(max_concurrency=CONCURRENCY)

    @manager.task(name="noop")
    async def noop() -> None:
        return None

    async with manager:
        handles = [await noop.submit() for _ in range(n)]
        for h in handles:
            await h
    return n


async def _raw_asyncio(n: int) -> int:
    sem = asyncio.Semaphore(CONCURRENCY)

    async def job() -> None:
        async with sem:
            await asyncio.sleep(0)

    tasks = [asyncio.create_task(job()) for _ in range(n)]
    for t in tasks:
        await t
    return n


def _rate(benchmark: Any, n: int) -> None:
    stats = benchmark.stats.stats if benchmark.stats else None
    if stats is not None and stats.median:
        benchmark.extra_info["tasks_per_s"] = round(n / stats.median)


@pytest.mark.parametrize("fn", [_noop, _sleepy], ids=["noop", "sleepy"])
def test_submit_await_asyncio(benchmark: Any, fn: Any) -> None:
    benchmark.group = "submit+await 2,000 tasks"
    result = benchmark.pedantic(
        lambda: anyio.run(_submit_and_await, fn, N, backend="asyncio"),
        rounds=ROUNDS,
        warmup_rounds=1,
    )
    assert result == N
    _rate(benchmark, N)


def test_submit_await_trio(benchmark: Any) -> None:
    benchmark.group = "submit+await 2,000 tasks"
    result = benchmark.pedantic(
        lambda: anyio.run(_submit_and_await, _sleepy, N, backend="trio"),
        rounds=ROUNDS,
        warmup_rounds=1,
    )
    assert result == N
    _rate(benchmark, N)


def test_submit_await_registered(benchmark: Any) -> None:
    benchmark.group = "submit+await 2,000 tasks"
    result = benchmark.pedantic(
        lambda: anyio.run(_registered, N, backend="asyncio"), rounds=ROUNDS, warmup_rounds=1
    )
    assert result == N
    _rate(benchmark, N)


def test_raw_asyncio_baseline(benchmark: Any) -> None:
    """The same sleepy workload on raw asyncio, for scale in the same table."""
    benchmark.group = "submit+await 2,000 tasks"
    result = benchmark.pedantic(lambda: asyncio.run(_raw_asyncio(N)), rounds=ROUNDS)
    assert result == N
    _rate(benchmark, N)


def test_retry_delay(benchmark: Any) -> None:
    benchmark.group = "RetryPolicy"
    policy = RetryPolicy(max_attempts=10, base_delay=0.5, multiplier=2.0, max_delay=60.0)

    def delays() -> list[float]:
        return [policy.delay(n) for n in range(1, 21)]

    result = benchmark(delays)
    assert result[0] == 0.5
    assert result[-1] == 60.0


def test_retry_decide(benchmark: Any) -> None:
    benchmark.group = "RetryPolicy"
    policy = RetryPolicy(max_attempts=5, base_delay=1.0, retry_on=(ValueError,))
    exc = ValueError("boom")

    def decide() -> list[float | None]:
        return [policy.decide(exc, attempt) for attempt in range(1, 6)]

    result = benchmark(decide)
    assert result[-1] is None
    assert all(d is not None and 0.0 <= d <= policy.delay(i + 1) for i, d in enumerate(result[:-1]))
