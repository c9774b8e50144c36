"""Flow control in memory: Queue(limit, rate, per_partition), partitions, locks,
run_queues and the per-queue statistics (asyncio and trio)."""

from __future__ import annotations

import time
from typing import Any

import anyio
import pytest

from background_tasks import BackgroundTaskManager, Queue, RetryPolicy

pytestmark = pytest.mark.anyio


class Log:
    """Start and end times of tasks by name (monotonic)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, float]] = []

    def job(self) -> Any:
        async def job(name: str, seconds: float = 0.0, gate: anyio.Event | None = None) -> str:
            self.events.append(("start", name, time.monotonic()))
            try:
                if gate is not None:
                    await gate.wait()
                await anyio.sleep(seconds)
            finally:
                self.events.append(("end", name, time.monotonic()))
            return name

        return job

    def starts(self) -> list[str]:
        return [name for kind, name, _ in self.events if kind == "start"]

    def intervals(self) -> dict[str, tuple[float, float]]:
        out: dict[str, list[float]] = {}
        for _, name, at in self.events:
            out.setdefault(name, []).append(at)
        return {name: (ts[0], ts[-1]) for name, ts in out.items()}

    def max_overlap(self, names: list[str]) -> int:
        """The most of these tasks running at one moment."""
        edges = sorted(
            (at, 1 if kind == "start" else -1) for kind, name, at in self.events if name in names
        )
        edges.sort(key=lambda e: (e[0], e[1]))  # an end before a start at the same instant
        most = now = 0
        for _, step in edges:
            now += step
            most = max(most, now)
        return most


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "kwargs",
    [
        {"limit": 0},
        {"limit": True},
        {"per_partition": 0},
        {"per_partition": 1.5},
        {"rate": "5"},
        {"rate": "0/s"},
        {"rate": "5/week"},
        {"rate": (5, 0)},
        {"rate": (5, float("inf"))},
        {"rate": (0, 1)},
        {"rate": 5},
        {"shared": "yes"},
    ],
)
def test_bad_queue_values_are_value_errors(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"Queue|rate"):
        Queue(**kwargs)


@pytest.mark.parametrize(
    ("rate", "parsed"),
    [("5/s", (5, 1.0)), ("100/min", (100, 60.0)), ("7/h", (7, 3600.0)), ((3, 0.5), (3, 0.5))],
)
def test_rates_are_spelled_four_ways(rate: Any, parsed: tuple[int, float]) -> None:
    assert Queue(rate=rate).rate_limit == parsed


def test_an_int_is_a_limit_and_shared_needs_a_journal() -> None:
    manager = BackgroundTaskManager(queues={"a": 4, "b": Queue(rate="5/s")})
    assert manager.queues == {"a": Queue(limit=4), "b": Queue(rate="5/s")}
    with pytest.raises(ValueError, match="journal"):
        BackgroundTaskManager(queues={"a": Queue(limit=2, shared=True)})
    with pytest.raises(ValueError, match="limit of queue"):
        BackgroundTaskManager(queues={"a": "four"})  # type: ignore[dict-item]


def test_run_queues_must_name_known_queues() -> None:
    with pytest.raises(ValueError, match="unknown queue"):
        BackgroundTaskManager(queues={"a": 1}, run_queues=["b"])
    with pytest.raises(ValueError, match="list of queue names"):
        BackgroundTaskManager(run_queues="a")
    with pytest.raises(ValueError, match="at least one"):
        BackgroundTaskManager(run_queues=[])
    assert BackgroundTaskManager(queues={"a": 1}, run_queues=["a", "default"]).run_queues == {
        "a",
        "default",
    }


async def test_submit_checks_partition_lock_and_run_queues() -> None:
    manager = BackgroundTaskManager(
        queues={"plain": 2, "parts": Queue(per_partition=1)}, run_queues=["plain", "parts"]
    )

    async def job() -> None:
        return None

    async with manager:
        with pytest.raises(ValueError, match="per_partition"):
            await manager.submit(job, queue="plain", partition="p")
        with pytest.raises(ValueError, match="per_partition"):
            await manager.submit(job, partition="p")  # the default queue
        with pytest.raises(ValueError, match="unknown queue"):
            await manager.submit(job, queue="nowhere", partition="p")
        with pytest.raises(ValueError, match="run_queues"):
            await manager.submit(job)  # "default" is not run here, and no journal
        with pytest.raises(TypeError):
            await manager.submit(job, queue="plain", lock=3)  # type: ignore[arg-type]
        await (await manager.submit(job, queue="parts", partition="p"))
        await (await manager.submit(job, queue="parts"))  # no partition: the None one


# ---------------------------------------------------------------- locks


async def test_a_lock_runs_one_at_a_time_in_priority_then_submission_order() -> None:
    log = Log()
    job = log.job()
    gate = anyio.Event()
    async with BackgroundTaskManager(max_concurrency=8, queues={"a": 4, "b": 4}) as manager:
        first = await manager.submit(job, "first", kwargs={"gate": gate}, lock="L", queue="a")
        await anyio.sleep(0.01)  # it holds the lock now
        handles = [first]
        for name, priority, queue in [
            ("lo1", 0, "a"), ("hi1", 5, "b"), ("lo2", 0, "b"), ("hi2", 5, "a"), ("mid", 2, "a"),
        ]:  # fmt: skip
            handles.append(
                await manager.submit(job, name, lock="L", priority=priority, queue=queue)
            )
        stats = manager.statistics().queues
        assert stats["a"].waiting_on_lock + stats["b"].waiting_on_lock == 5
        assert stats["a"].running == 1
        gate.set()
        for handle in handles:
            await handle
    assert log.starts() == ["first", "hi1", "hi2", "mid", "lo1", "lo2"]
    assert log.max_overlap(log.starts()) == 1


async def test_a_task_waiting_for_its_lock_holds_no_worker_and_different_locks_overlap() -> None:
    log = Log()
    job = log.job()
    gate = anyio.Event()
    async with BackgroundTaskManager(max_concurrency=2) as manager:
        holder = await manager.submit(job, "holder", kwargs={"gate": gate}, lock="x")
        waiters = [await manager.submit(job, f"x{i}", lock="x") for i in range(5)]
        other = await manager.submit(job, "y", lock="y")
        plain = await manager.submit(job, "plain")
        await other
        await plain  # with one of two workers held, the waiters of x blocked neither
        assert "x0" not in log.starts()
        gate.set()
        await holder
        for waiter in waiters:
            await waiter
    assert log.max_overlap(["holder", *[f"x{i}" for i in range(5)]]) == 1
    assert log.max_overlap(["holder", "y"]) == 2


async def test_cancelling_waiters_and_a_waiting_head_passes_the_lock_on() -> None:
    log = Log()
    job = log.job()
    gate = anyio.Event()
    async with BackgroundTaskManager(max_concurrency=1) as manager:
        blocker = await manager.submit(job, "blocker", kwargs={"gate": gate})  # the only worker
        head = await manager.submit(job, "head", lock="L")  # in its lane, not started
        waiter = await manager.submit(job, "waiter", lock="L")
        last = await manager.submit(job, "last", lock="L")
        assert await manager.cancel(waiter.id)
        assert await manager.cancel(head.id)
        gate.set()
        await blocker
        assert await last == "last"
    assert log.starts() == ["blocker", "last"]
    assert manager.statistics().queued == 0


async def test_a_lock_is_free_while_its_task_waits_for_a_retry() -> None:
    log = Log()
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        log.events.append(("start", f"flaky{calls}", time.monotonic()))
        log.events.append(("end", f"flaky{calls}", time.monotonic()))
        if calls == 1:
            raise RuntimeError("once")
        return "ok"

    job = log.job()
    retry = RetryPolicy(max_attempts=2, base_delay=0.2, jitter=False)
    async with BackgroundTaskManager(max_concurrency=2) as manager:
        first = await manager.submit(flaky, lock="L", retry=retry)
        await anyio.sleep(0.05)
        second = await manager.submit(job, "second", lock="L")
        assert await second == "second"  # ran during the backoff
        assert await first == "ok"
    assert log.starts() == ["flaky1", "second", "flaky2"]


# ---------------------------------------------------------------- partitions


async def test_per_partition_bounds_each_partition_and_a_slow_one_delays_no_other() -> None:
    log = Log()
    job = log.job()
    gate = anyio.Event()
    queues = {"t": Queue(per_partition=1)}
    async with BackgroundTaskManager(max_concurrency=4, queues=queues) as manager:
        slow = [
            await manager.submit(job, "slow0", kwargs={"gate": gate}, queue="t", partition="slow")
        ]
        slow += [await manager.submit(job, f"slow{i}", queue="t", partition="slow") for i in (1, 2)]
        fast = [
            await manager.submit(job, f"fast{i}", 0.01, queue="t", partition="fast")
            for i in range(5)
        ]
        for handle in fast:
            await handle  # while the slow partition's first task is still held
        stats = manager.statistics().queues["t"]
        assert (stats.running, stats.waiting_on_limit) == (1, 2)
        gate.set()
        for handle in slow:
            await handle
    assert log.max_overlap([f"slow{i}" for i in range(3)]) == 1
    assert log.max_overlap([f"fast{i}" for i in range(5)]) == 1
    assert log.starts()[:2] == ["slow0", "fast0"]


async def test_queue_limit_and_partition_limit_both_bind() -> None:
    log = Log()
    job = log.job()
    queues = {"t": Queue(limit=3, per_partition=2)}
    names = [f"{p}{i}" for p in "abc" for i in range(4)]
    async with BackgroundTaskManager(max_concurrency=10, queues=queues) as manager:
        handles = [
            await manager.submit(job, name, 0.02, queue="t", partition=name[0]) for name in names
        ]
        for handle in handles:
            await handle
    assert log.max_overlap(names) == 3
    for p in "abc":
        assert log.max_overlap([n for n in names if n[0] == p]) == 2


async def test_partitions_take_turns_oldest_first() -> None:
    """A partition with a backlog does not starve one whose tasks came later."""
    log = Log()
    job = log.job()
    queues = {"t": Queue(per_partition=1)}
    async with BackgroundTaskManager(max_concurrency=1, queues=queues) as manager:
        gate = anyio.Event()
        blocker = await manager.submit(job, "blocker", kwargs={"gate": gate})
        handles = [
            await manager.submit(job, f"big{i}", queue="t", partition="big") for i in range(4)
        ]
        handles += [
            await manager.submit(job, f"small{i}", queue="t", partition="s") for i in range(2)
        ]
        gate.set()
        await blocker
        for handle in handles:
            await handle
    # with one worker: the oldest ready task first, whatever its partition
    assert log.starts() == ["blocker", "big0", "big1", "big2", "big3", "small0", "small1"]


async def test_partitions_run_side_by_side_up_to_the_workers() -> None:
    log = Log()
    job = log.job()
    queues = {"t": Queue(per_partition=1)}
    names = [f"p{p}-{i}" for i in range(3) for p in range(6)]
    async with BackgroundTaskManager(max_concurrency=6, queues=queues) as manager:
        handles = [
            await manager.submit(job, name, 0.02, queue="t", partition=name.split("-")[0])
            for name in names
        ]
        for handle in handles:
            await handle
    assert log.max_overlap(names) == 6
    for p in range(6):
        assert log.max_overlap([n for n in names if n.startswith(f"p{p}-")]) == 1


# ---------------------------------------------------------------- rates and limits


async def test_a_rate_never_starts_more_than_n_in_any_window() -> None:
    log = Log()
    job = log.job()
    n, period = 3, 0.25
    async with BackgroundTaskManager(max_concurrency=8, queues={"r": Queue(rate=(n, period))}) as m:
        handles = [await m.submit(job, f"r{i}", queue="r") for i in range(10)]
        await anyio.sleep(0.05)
        stats = m.statistics().queues["r"]
        assert stats.waiting_on_limit == 7
        for handle in handles:
            await handle
    starts = sorted(at for kind, _, at in log.events if kind == "start")
    assert len(starts) == 10
    for i in range(len(starts) - n):
        assert starts[i + n] - starts[i] >= period * 0.99  # n + 1 starts span a period
    assert starts[-1] - starts[0] < 10 * period  # and it keeps going (loosely)


async def test_a_rate_limited_queue_blocks_no_other_queue() -> None:
    log = Log()
    job = log.job()
    queues = {"r": Queue(rate=(1, 10.0)), "limited": Queue(limit=1)}
    async with BackgroundTaskManager(max_concurrency=2, queues=queues) as manager:
        first = await manager.submit(job, "r0", queue="r")
        second = await manager.submit(job, "r1", queue="r")  # waits ~10 s
        plain = [await manager.submit(job, f"p{i}", queue="limited") for i in range(3)]
        await first
        for handle in plain:
            await handle
        assert manager.statistics().queues["r"].waiting_on_limit == 1
        await second.cancel()
    assert "r1" not in log.starts()


async def test_partitions_keep_priority_and_skip_cancelled_tasks() -> None:
    log = Log()
    job = log.job()
    queues = {"t": Queue(per_partition=1)}
    async with BackgroundTaskManager(max_concurrency=2, queues=queues) as manager:
        gate = anyio.Event()
        held = [
            await manager.submit(job, f"hold{p}", kwargs={"gate": gate}, queue="t", partition=p)
            for p in "ab"
        ]  # both workers, and both partitions, busy
        await anyio.sleep(0.02)
        spec = [("a1", "a", 0), ("b1", "b", 0), ("a2", "a", 5), ("b2", "b", 9), ("a3", "a", 0)]
        handles = {
            name: await manager.submit(job, name, queue="t", partition=p, priority=priority)
            for name, p, priority in spec
        }
        assert await manager.cancel(handles.pop("a1").id)
        stats = manager.statistics().queues["t"]
        assert (stats.running, stats.waiting_on_limit, stats.ready) == (2, 4, 0)
        gate.set()
        for handle in [*held, *handles.values()]:
            await handle
    order = [name for name in log.starts() if not name.startswith("hold")]
    assert order.index("b2") < order.index("b1")  # priority within a partition
    assert order.index("a2") < order.index("a3")
    assert "a1" not in order
    assert manager.statistics().queued == 0


def test_a_refused_lock_head_yields_to_a_task_that_came_first_meanwhile() -> None:
    """The head of a lock is being claimed when a task of the same lock that comes first
    arrives (a dead owner's task taken over, say): the journal refuses the head's claim
    for the lock, and the first task must become the head, or neither is ever claimed."""
    from background_tasks._queue import LOCK, ReadyQueue
    from background_tasks._task import Task

    def task(task_id: str) -> Task:
        t = Task(task_id, "t", None, (), None, "default", 0, None, None, None, 1.0, 1.0)
        t.lock = "k"
        return t

    queue = ReadyQueue({})
    later, first = task("b"), task("a")  # "a" was submitted first (ids sort by creation)
    queue.push(later)
    assert queue.pop() is later  # its claim is in flight
    queue.push(first)  # waits for the lock meanwhile
    assert queue.pop() is None
    queue.park(later, LOCK, due=10.0**9)  # the journal refused it: "a" comes first
    queue.release(later)
    assert queue.pop() is first
    assert queue.pop() is None  # "b" waits behind it now
    queue.release(first)  # "a" ran and freed the lock
    assert queue.pop() is later
