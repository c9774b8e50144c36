"""The manager's one clock, and FakeClock: delays, ``at``-times, backoff, attempt
timeouts, leases and heartbeats, and the times in records, in memory and on SQLite."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest
from support import C, F, P, R, Y, wait_status

from background_tasks import (
    BackgroundTaskManager,
    RetryPolicy,
    SQLiteJournal,
    TaskFailed,
    TaskTimeoutError,
    current_task,
)
from background_tasks._clock import HEARTBEAT, SystemClock, system_clock
from background_tasks.journal._protocol import Journal
from background_tasks.testing import FakeClock, claim, make_row, opened

pytestmark = pytest.mark.anyio

START = datetime(2030, 1, 1, tzinfo=UTC)
HOUR, DAY = 3600.0, 86400.0


@pytest.fixture(params=["memory", "sqlite"])
def journal_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Journal | None]:
    if request.param == "memory":
        return lambda: None
    return lambda: SQLiteJournal(tmp_path / "tasks.db")


@pytest.fixture
def clocked(
    journal_factory: Callable[[], Journal | None],
) -> tuple[BackgroundTaskManager, FakeClock]:
    clock = FakeClock(START)
    return BackgroundTaskManager(clock=clock, journal=journal_factory()), clock


def at(seconds: float) -> datetime:
    return START + timedelta(seconds=seconds)


async def wait_attempts(manager: BackgroundTaskManager, task_id: str, attempts: int) -> None:
    """Until attempt number ``attempts`` of the task ended and its retry waits (with a
    journal, advance() returns before a due task's claim is written)."""
    with anyio.fail_after(5):
        while True:
            record = await manager.get(task_id)
            if record is not None and record.attempts == attempts and record.status is Y:
                return
            await anyio.sleep(0.001)


# ------------------------------------------------------------------ the protocol


def test_the_system_clock_is_the_default() -> None:
    manager = BackgroundTaskManager()
    assert manager.clock is system_clock
    assert isinstance(system_clock, SystemClock)
    assert abs(system_clock.time() - time.time()) < 1
    assert repr(system_clock) == "SystemClock()"


def test_a_clock_must_be_a_clock() -> None:
    with pytest.raises(ValueError, match="clock must be a Clock"):
        BackgroundTaskManager(clock=time)  # type: ignore[arg-type]


def test_fake_clock_arguments() -> None:
    assert abs(FakeClock().time() - time.time()) < 1  # starts at the real time
    assert FakeClock(1000.0).time() == 1000.0
    assert FakeClock(START).time() == START.timestamp()
    assert not FakeClock().autojump
    assert FakeClock(autojump=True).autojump
    with pytest.raises(ValueError, match="aware"):
        FakeClock(datetime(2030, 1, 1))
    with pytest.raises(TypeError):
        FakeClock("now")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        FakeClock(autojump=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="phase"):
        FakeClock().alarm(7)
    assert "2030-01-01T00:00:00+00:00" in repr(FakeClock(START))


async def test_the_fake_clock_stands_still_until_moved() -> None:
    clock = FakeClock(START)
    await anyio.sleep(0.01)
    assert clock.time() == START.timestamp()
    assert clock.monotonic() == 0
    await clock.advance(1.5)
    await clock.advance(timedelta(minutes=1))
    assert clock.time() == START.timestamp() + 61.5
    assert clock.monotonic() == 61.5
    for bad in (-1, math.inf, math.nan):
        with pytest.raises(ValueError, match="finite"):
            await clock.advance(bad)
    with pytest.raises(TypeError):
        await clock.advance("1")  # type: ignore[arg-type]


async def test_sleep_alarm_and_deadline_on_the_fake_clock() -> None:
    clock = FakeClock(START)
    woke: list[str] = []

    async def sleeper() -> None:
        await clock.sleep(10)
        woke.append(f"sleep@{clock.monotonic():g}")

    async def looper() -> None:
        alarm = clock.alarm(HEARTBEAT)
        try:
            for deadline in (5.0, 20.0):
                await alarm.wait(deadline)
                woke.append(f"alarm@{clock.monotonic():g}")
        finally:
            alarm.close()

    async with anyio.create_task_group() as tg:
        tg.start_soon(sleeper)
        tg.start_soon(looper)
        await anyio.wait_all_tasks_blocked()
        with anyio.CancelScope() as scope:
            clock.cancel_at(scope, 7.0)
            assert clock.next_due() == 7.0
            await clock.advance(6)  # the alarm (a heartbeat: no jump target) reacted
            assert woke == ["alarm@6"]
            await clock.advance(4)  # the scope is cancelled at once, the sleep woken
            await anyio.sleep_forever()
        assert scope.cancelled_caught
        await clock.advance(10)
    assert woke == ["alarm@6", "sleep@10", "alarm@20"]
    assert clock.next_due() is None


# ------------------------------------------------------------------ delays and retries


async def test_a_day_long_delay_and_an_hour_long_backoff_take_no_real_time(
    clocked: tuple[BackgroundTaskManager, FakeClock],
) -> None:
    manager, clock = clocked
    attempts: list[float] = []

    @manager.task(retry=RetryPolicy(max_attempts=3, base_delay=HOUR, max_delay=HOUR, jitter=False))
    async def flaky() -> str:
        attempts.append(clock.time() - START.timestamp())
        if len(attempts) < 3:
            raise ValueError("not yet")
        return "done"

    @manager.task
    async def tomorrow() -> str:
        return "tomorrow"

    began = time.monotonic()
    async with manager:
        retried = await flaky.submit()
        delayed = await manager.submit(tomorrow, delay=DAY)
        await wait_attempts(manager, retried.id, 1)
        await clock.advance(HOUR)
        await wait_attempts(manager, retried.id, 2)
        await clock.advance(2 * HOUR)
        assert await retried.result(timeout=5) == "done"
        record = await delayed.record()
        assert record is not None
        assert record.status is P
        await clock.advance(DAY - 3 * HOUR)
        assert await delayed.result(timeout=5) == "tomorrow"
        await manager.join(timeout=5)
        record = await delayed.record()
    took = time.monotonic() - began
    assert attempts == [0, HOUR, 3 * HOUR]  # the backoff: 1 h, then 2 h after the second
    assert record is not None
    assert record.created_at == at(0)
    assert record.scheduled_at == at(DAY)
    assert record.started_at == record.finished_at == at(DAY)
    assert took < 5, took  # loosely: under a second on a quiet machine


async def test_at_and_delay_follow_the_fake_clock_in_memory() -> None:
    clock = FakeClock(START)
    manager = BackgroundTaskManager(clock=clock)
    ran: list[datetime] = []

    async def job() -> None:
        ran.append(datetime.fromtimestamp(clock.time(), UTC))

    async with manager:
        handle = await manager.submit(job, delay=timedelta(minutes=10))
        await clock.advance(599)
        record = await handle.record()
        assert record is not None
        assert record.status is P
        await clock.advance(1)
        record = await handle.record()  # handed to a worker before advance returned
        assert record is not None
        assert record.status is C
    assert ran == [at(600)]


async def test_advance_returns_once_due_tasks_are_handed_to_workers() -> None:
    clock = FakeClock(START)
    manager = BackgroundTaskManager(clock=clock, max_concurrency=3)
    release = anyio.Event()

    async def held() -> None:
        await release.wait()

    async with manager:
        handles = [await manager.submit(held, delay=60) for _ in range(3)]
        await clock.advance(60)
        for handle in handles:
            record = await handle.record()
            assert record is not None
            assert record.status is R
            assert record.started_at == at(60)
        release.set()
        await manager.join()


# ------------------------------------------------------------------ attempt timeouts


async def test_an_attempt_timeout_fires_on_advance(
    clocked: tuple[BackgroundTaskManager, FakeClock],
) -> None:
    manager, clock = clocked
    cleaned: list[float] = []

    @manager.task(timeout=30, retry=RetryPolicy(max_attempts=2, base_delay=60, jitter=False))
    async def hangs() -> None:
        try:
            await anyio.sleep_forever()
        finally:
            cleaned.append(clock.time() - START.timestamp())

    async with manager:
        handle = await hangs.submit()
        await wait_status(manager, handle.id, R)
        await clock.advance(29)
        await anyio.sleep(0.05)  # real time passes: the attempt is not timed out by it
        record = await handle.record()
        assert record is not None
        assert record.status is R
        await clock.advance(1)  # cancelled before advance returned
        await wait_attempts(manager, handle.id, 1)
        await clock.advance(60)  # the retry starts, and times out 30 s later
        await wait_status(manager, handle.id, R)
        await clock.advance(30)
        with pytest.raises(TaskFailed) as failed:
            await handle.result(timeout=5)
        record = await handle.record()
    assert failed.value.error.type.endswith("TaskTimeoutError")
    assert isinstance(failed.value.__cause__, TaskTimeoutError)
    assert cleaned == [30, 120]
    assert record is not None
    assert record.status is F
    assert record.attempts == 2
    assert record.finished_at == at(120)


async def test_an_attempt_that_ends_before_its_timeout_leaves_no_deadline() -> None:
    clock = FakeClock(START)
    manager = BackgroundTaskManager(clock=clock, max_concurrency=1, default_timeout=10)

    async def quick() -> int:
        return 1

    async def slow() -> None:
        await anyio.sleep_forever()

    async with manager:
        assert await (await manager.submit(quick)) == 1
        assert clock.next_due() is None  # its deadline was taken back
        handle = await manager.submit(slow, timeout=math.inf)  # no timeout at all
        await wait_status(manager, handle.id, R)
        await clock.advance(DAY)
        record = await handle.record()
        assert record is not None
        assert record.status is R
        await handle.cancel()


# ------------------------------------------------------------------ autojump


async def test_autojump_runs_retries_and_delays_at_once(
    journal_factory: Callable[[], Journal | None],
) -> None:
    clock = FakeClock(START, autojump=True)
    manager = BackgroundTaskManager(clock=clock, journal=journal_factory())
    seen: list[tuple[str, float]] = []

    @manager.task(retry=RetryPolicy(max_attempts=4, base_delay=HOUR, max_delay=DAY, jitter=False))
    async def flaky() -> None:
        seen.append(("flaky", clock.time() - START.timestamp()))
        await anyio.sleep(0.01)  # real work in between: the clock waits for it
        if current_task().attempt < 4:
            raise ValueError("again")

    @manager.task
    async def later(n: int) -> None:
        seen.append((f"later{n}", clock.time() - START.timestamp()))

    began = time.monotonic()
    async with manager:
        await flaky.submit()
        for n in (3, 1, 2):
            await manager.submit(later, n, delay=n * DAY)
        await manager.join()
    took = time.monotonic() - began
    assert sorted(seen, key=lambda item: item[1]) == [
        ("flaky", 0),
        ("flaky", HOUR),
        ("flaky", 3 * HOUR),
        ("flaky", 7 * HOUR),
        ("later1", DAY),
        ("later2", 2 * DAY),
        ("later3", 3 * DAY),
    ]
    assert took < 5, took


async def test_autojump_never_cuts_a_running_attempt_short() -> None:
    clock = FakeClock(START, autojump=True)
    manager = BackgroundTaskManager(clock=clock, default_timeout=5)

    async def works() -> str:
        await anyio.sleep(0.1)  # real time, longer than the autojump's look
        return "finished"

    async with manager:
        await manager.submit(works, delay=DAY * 365)  # something to jump to
        handle = await manager.submit(works)
        assert await handle == "finished"
        assert clock.time() == START.timestamp()  # no jump while it ran
        await manager.join()
        assert clock.time() == START.timestamp() + DAY * 365


async def test_autojump_with_nothing_due_waits_for_something() -> None:
    clock = FakeClock(START, autojump=True)
    manager = BackgroundTaskManager(clock=clock)

    async def job() -> float:
        return clock.time()

    async with manager:
        await anyio.sleep(0.05)  # idle, nothing due: the clock stays
        assert clock.time() == START.timestamp()
        assert await (await manager.submit(job, delay=42)) == START.timestamp() + 42


async def test_autojump_is_shared_by_the_managers_on_the_clock() -> None:
    clock = FakeClock(START, autojump=True)
    first, second = BackgroundTaskManager(clock=clock), BackgroundTaskManager(clock=clock)

    async def job() -> float:
        return clock.time() - START.timestamp()

    async with first:
        async with second:
            assert await (await second.submit(job, delay=10)) == 10
        # the manager that drove the clock may be gone: another one takes over
        assert await (await first.submit(job, delay=10)) == 20


# ------------------------------------------------------------------ times in records


async def test_records_take_their_times_from_the_clock(
    clocked: tuple[BackgroundTaskManager, FakeClock],
) -> None:
    manager, clock = clocked
    step = anyio.Event()

    @manager.task
    async def reports() -> None:
        await current_task().report_progress(0.5, "half")
        await step.wait()

    async with manager:
        handle = await reports.submit()
        await wait_status(manager, handle.id, R)
        await clock.advance(90)
        step.set()
        await handle
        record = await handle.record()
        assert record is not None
        assert record.created_at == record.scheduled_at == record.started_at == at(0)
        assert record.finished_at == at(90)
        assert record.progress is not None
        assert record.progress.updated_at == at(0)
        # purge measures the age on the clock too
        assert await manager.purge(older_than=100) == 0
        await clock.advance(100.5)  # finished 100.5 s ago now
        assert await manager.purge(older_than=100) == 1


# ------------------------------------------------------------------ leases and heartbeats


async def test_live_managers_keep_their_leases_across_a_jump(tmp_path: Path) -> None:
    clock = FakeClock(START)
    release = anyio.Event()

    def make() -> BackgroundTaskManager:
        manager = BackgroundTaskManager(
            clock=clock, journal=SQLiteJournal(tmp_path / "t.db", lease_timeout=30)
        )

        @manager.task(name="held")
        async def held() -> str:
            await release.wait()
            return "mine"

        return manager

    runner, other = make(), make()
    async with runner, other:
        handle = await runner.submit("held")
        await wait_status(runner, handle.id, R)
        for _ in range(3):  # far past the lease: each jump renews before anyone looks
            await clock.advance(DAY)
        assert runner.journal is not None
        row = await runner.journal.get(handle.id)
        assert row is not None
        assert row.status is R
        assert row.owner == runner.owner
        assert row.recoveries == 0
        assert row.lease_until == pytest.approx(clock.time() + 30)  # renewed on the clock
        release.set()
        assert await handle == "mine"


async def test_a_hung_owners_task_is_taken_over_once_its_lease_ends_on_the_clock(
    tmp_path: Path,
) -> None:
    """An owner whose journal stays open (it looks alive: its OS lock is held) but that
    no longer renews its lease: taken over once the lease has not changed for
    lease_timeout on the manager's clock. (A dead owner is taken over at once.)"""
    path = tmp_path / "t.db"
    now = START.timestamp()
    async with opened(SQLiteJournal(path), owner="hung-host:1:x") as hung:
        row = await hung.insert(make_row(name="job", args_json="[]", kwargs_json="{}"))
        assert await hung.apply(claim(row, "hung-host:1:x", lease=30, now=now))
        await _take_over_on_the_clock(path, row.id)


async def _take_over_on_the_clock(path: Path, task_id: str) -> None:
    clock = FakeClock(START)
    manager = BackgroundTaskManager(clock=clock, journal=SQLiteJournal(path, lease_timeout=30))

    @manager.task(name="job")
    async def job() -> str:
        return "taken over"

    row_id = task_id
    async with manager:
        await clock.advance(29)
        record = await manager.get(row_id)
        assert record is not None
        assert record.status is R
        await clock.advance(2)  # the takeover check reacted before advance returned
        assert await manager.handle(row_id).result(timeout=10) == "taken over"
        record = await manager.get(row_id)
    assert record is not None
    assert record.recoveries == 1
    assert record.finished_at == at(31)


# ------------------------------------------------------------------ alarms, in detail


async def test_system_alarms() -> None:
    alarm = system_clock.alarm()
    alarm.wake()  # before a wait: the next wait returns at once
    with anyio.fail_after(1):
        await alarm.wait(math.inf)
    with anyio.fail_after(1):
        await alarm.wait(system_clock.monotonic() + 0.01)  # its deadline
    async with anyio.create_task_group() as tg:
        tg.start_soon(alarm.wait, math.inf)
        await anyio.wait_all_tasks_blocked()
        alarm.wake()  # during a wait
    alarm.close()
    await system_clock.sleep(0)


async def test_fake_alarm_corners() -> None:
    clock = FakeClock(START)
    alarm = clock.alarm()
    await alarm.wait(0)  # due already: the loop reacts at once ...
    assert clock._reacting == 1
    alarm.wake()  # ... and a wake meanwhile makes its next wait return at once
    with anyio.fail_after(1):
        await alarm.wait(math.inf)
    assert clock._reacting == 0
    alarm.close()
    with anyio.CancelScope() as scope:
        clock.cancel_at(scope, 0)  # a deadline already past cancels at once
        await anyio.sleep_forever()
    assert scope.cancelled_caught
    await clock.sleep(0)
    assert clock.monotonic() == 0


async def test_advance_waits_for_an_automatic_jump_in_progress() -> None:
    clock = FakeClock(START, autojump=True)
    manager = BackgroundTaskManager(clock=clock)
    ran: list[float] = []

    async def job() -> None:
        ran.append(clock.monotonic())

    async with manager, anyio.create_task_group() as tg:
        for n in range(1, 21):
            await manager.submit(job, delay=n)
        for _ in range(20):  # interleaved with the automatic jumps
            tg.start_soon(clock.advance, 0.5)
        await manager.join(timeout=10)
    assert len(ran) == 20
    assert ran == sorted(ran)


def test_one_fake_clock_across_event_loops() -> None:
    """A clock made once (a module-level fixture) serves managers on successive loops,
    as pytest-asyncio's function-scoped loops are."""
    clock = FakeClock(START, autojump=True)

    async def job() -> float:
        return clock.monotonic()

    async def one_test(delay: float) -> float:
        async with BackgroundTaskManager(clock=clock) as manager:
            value = await (await manager.submit(job, delay=delay)).result(timeout=5)
            await anyio.sleep(0.05)  # the clock idles, waiting for something to be due
            return value

    assert anyio.run(one_test, 10.0) == 10
    assert anyio.run(one_test, 5.0) == 15
    assert anyio.run(one_test, 5.0, backend="trio") == 20
