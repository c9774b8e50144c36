"""Periodic tasks in one process: decoration errors, the tick computation (cron in a time
zone across DST changes, intervals), the scheduler's decisions on explicit times (fired,
skipped, missed), and real managers in memory, on SQLite and on PostgreSQL (the last in
``tests/test_journal_postgres.py``), on asyncio and trio. Several processes killed at
random: ``tests/test_periodic_processes.py``."""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Callable, MutableMapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import anyio
import pytest

from background_tasks import (
    BackgroundTaskManager,
    RetryPolicy,
    SQLiteJournal,
    TaskRegistry,
    TaskStatus,
    current_task,
)
from background_tasks._periodic import Cron, Every, Periodic, Scheduler, parse_schedule, tick_of
from background_tasks.cli import main
from background_tasks.testing import opened

PARIS = ZoneInfo("Europe/Paris")
NEW_YORK = ZoneInfo("America/New_York")


def local(t: float, tz: ZoneInfo) -> str:
    return datetime.fromtimestamp(t, tz).strftime("%Y-%m-%d %H:%M %Z")


def ticks(schedule: Cron | Every, start: datetime, n: int) -> list[float]:
    out, t = [], start.timestamp()
    for _ in range(n):
        t = schedule.next_after(t)
        out.append(t)
    return out


# ------------------------------------------------------------------ decoration


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (("61 * * * *",), {}, "bad cron expression"),
        (("* * * *",), {}, "5 fields"),
        (("0 * * * * *",), {}, "5 fields"),  # seconds: not a 5-field expression
        (("@daily",), {}, "5 fields"),
        (("0 0 31 2 *",), {}, "bad cron expression"),
        (("0 3 * * *",), {"timezone": "Mars/Olympus_Mons"}, "unknown time zone"),
        (("0 3 * * *",), {"every": 60}, "one of them"),
        ((), {}, "one of them"),
        ((), {"every": 0}, "at least"),
        ((), {"every": timedelta(milliseconds=1)}, "at least"),
        ((), {"every": float("nan")}, "at least"),
        ((), {"every": 60, "timezone": "Europe/Paris"}, "applies to cron"),
        (("0 3 * * *",), {"missed": "all"}, "missed"),
        (("0 3 * * *",), {"overlap": "yes"}, "overlap"),
        (("0 3 * * *",), {"priority": 2**70}, "priority"),
        (("0 3 * * *",), {"timeout": -1}, "timeout"),
    ],
)
@pytest.mark.parametrize("where", ["manager", "registry"])
def test_bad_periodic_options_raise_at_decoration(
    args: tuple[Any, ...], kwargs: dict[str, Any], match: str, where: str
) -> None:
    target: Any = BackgroundTaskManager() if where == "manager" else TaskRegistry()
    with pytest.raises(ValueError, match=match):
        target.periodic(*args, name="p", **kwargs)
    periodics = target.periodics if where == "registry" else target.registry.periodics
    assert periodics == {}


def test_a_periodic_task_takes_no_arguments() -> None:
    manager = BackgroundTaskManager()

    async def needs(x: int) -> None:
        pass

    with pytest.raises(TypeError, match="takes arguments"):
        manager.periodic(every=60, name="p")(needs)
    with pytest.raises(TypeError, match="async def"):
        manager.periodic(every=60, name="p")(lambda: None)  # type: ignore[arg-type, return-value]
    assert manager.registry.periodics == {}
    with pytest.raises(ValueError, match="unknown queue"):
        BackgroundTaskManager(queues={"a": 1}).periodic(every=60, name="p", queue="b")


def test_a_periodic_task_is_a_registered_task() -> None:
    registry = TaskRegistry()

    @registry.periodic("0 3 * * *", name="nightly", timezone="Europe/Paris", missed="skip")
    async def nightly() -> int:
        return 3

    manager = BackgroundTaskManager()
    manager.include(registry)
    assert manager.registry.tasks["nightly"] is nightly
    periodic = manager.registry.periodics["nightly"]
    assert (periodic.missed, periodic.overlap) == ("skip", False)
    assert periodic.schedule.text == "cron 0 3 * * * (Europe/Paris)"
    assert parse_schedule(None, timedelta(minutes=5), "UTC").text == "every 300s"


@pytest.mark.anyio
async def test_called_directly_it_runs_inline() -> None:
    manager = BackgroundTaskManager()

    @manager.periodic(every=3600, name="hourly")
    async def hourly() -> str:
        return "ran"

    assert await hourly() == "ran"


# ------------------------------------------------------------------ ticks


def test_interval_ticks_are_multiples_from_the_epoch() -> None:
    every = Every(timedelta(minutes=5))
    start = datetime(2026, 6, 1, 10, 2, 30, tzinfo=UTC)
    assert [datetime.fromtimestamp(t, UTC).strftime("%H:%M") for t in ticks(every, start, 3)] == [
        "10:05", "10:10", "10:15",
    ]  # fmt: skip
    tick = every.next_after(start.timestamp())
    assert every.next_after(tick) == tick + 300  # strictly after a tick
    assert every.at_or_before(tick) == tick
    assert every.at_or_before(tick - 0.001) == tick - 300
    tenth = Every(0.1)
    t = tenth.next_after(1_800_000_000.05)
    assert t == 1_800_000_000.1
    assert [tenth.next_after(t) for _ in range(1)] == [1_800_000_000.2]


def test_cron_ticks_in_utc_and_in_a_zone() -> None:
    every_5 = Cron("*/5 * * * *", UTC, "UTC")
    start = datetime(2026, 1, 1, 10, 5, tzinfo=UTC)
    assert ticks(every_5, start, 2) == [start.timestamp() + 300, start.timestamp() + 600]
    assert every_5.at_or_before(start.timestamp()) == start.timestamp()
    assert every_5.at_or_before(start.timestamp() + 299) == start.timestamp()
    nightly = Cron("0 3 * * *", NEW_YORK, "America/New_York")
    summer = ticks(nightly, datetime(2026, 7, 1, tzinfo=UTC), 1)[0]
    assert datetime.fromtimestamp(summer, UTC).hour == 7  # 03:00 EDT


def test_a_nightly_cron_over_the_spring_dst_change_fires_at_local_times() -> None:
    """Europe/Paris springs forward on 2026-03-29 at 02:00 -> 03:00."""
    at_three = Cron("0 3 * * *", PARIS, "Europe/Paris")
    fired = ticks(at_three, datetime(2026, 3, 27, 12, tzinfo=PARIS), 4)
    assert [local(t, PARIS) for t in fired] == [
        "2026-03-28 03:00 CET", "2026-03-29 03:00 CEST", "2026-03-30 03:00 CEST",
        "2026-03-31 03:00 CEST",
    ]  # fmt: skip
    assert fired[1] - fired[0] == 23 * 3600  # the short night
    # 02:30 does not exist on the 29th: it runs at the first minute after the gap
    at_half_past_two = Cron("30 2 * * *", PARIS, "Europe/Paris")
    fired = ticks(at_half_past_two, datetime(2026, 3, 27, 12, tzinfo=PARIS), 3)
    assert [local(t, PARIS) for t in fired] == [
        "2026-03-28 02:30 CET", "2026-03-29 03:00 CEST", "2026-03-30 02:30 CEST",
    ]  # fmt: skip


def test_a_nightly_cron_over_the_autumn_dst_change_fires_once_a_night() -> None:
    """Europe/Paris falls back on 2026-10-25 at 03:00 -> 02:00: 02:30 happens twice."""
    at_half_past_two = Cron("30 2 * * *", PARIS, "Europe/Paris")
    fired = ticks(at_half_past_two, datetime(2026, 10, 23, 12, tzinfo=PARIS), 4)
    assert [local(t, PARIS) for t in fired] == [
        "2026-10-24 02:30 CEST", "2026-10-25 02:30 CEST", "2026-10-26 02:30 CET",
        "2026-10-27 02:30 CET",
    ]  # fmt: skip
    assert fired[2] - fired[1] == 25 * 3600  # the long night, and one run in it
    # an hourly schedule runs in both 02:xx hours: they are different instants
    hourly = Cron("15 * * * *", PARIS, "Europe/Paris")
    fired = ticks(hourly, datetime(2026, 10, 25, 1, 30, tzinfo=PARIS), 3)
    assert [local(t, PARIS) for t in fired] == [
        "2026-10-25 02:15 CEST", "2026-10-25 02:15 CET", "2026-10-25 03:15 CET",
    ]  # fmt: skip
    assert fired[1] - fired[0] == 3600
    # going back from after the change finds the same instants
    assert (
        at_half_past_two.at_or_before(fired[2])
        == ticks(at_half_past_two, datetime(2026, 10, 24, 12, tzinfo=PARIS), 1)[0]
    )


def test_tick_of_a_key() -> None:
    assert tick_of("periodic:job:2026-01-01T00:00:00+00:00", "job") == datetime(
        2026, 1, 1, tzinfo=UTC
    )
    assert tick_of("periodic:job:2026-01-01T00:00:00+00:00", "jo") is None
    assert tick_of("periodic:job:nonsense", "job") is None
    assert tick_of("job", "job") is None
    assert tick_of(None, "job") is None


# ------------------------------------------------------------------ decisions on explicit times


class FakeNow:
    def __init__(self, at: datetime) -> None:
        self.t = at.timestamp()

    def __call__(self) -> float:
        return self.t


def scheduler_for(
    manager: BackgroundTaskManager, now: FakeNow, *names: str
) -> tuple[Scheduler, list[Periodic]]:
    periodics = [manager.registry.periodics[n] for n in names]
    return (
        Scheduler(
            periodics, manager.registry, None, manager._writer, manager._table,
            manager._dispatch, None, None, None, True, now,
        ),
        periodics,
    )  # fmt: skip


def fired_ticks(manager: BackgroundTaskManager, name: str) -> list[str]:
    tasks = [t for t in manager._table.tasks.values() if t.name == name]
    return sorted(datetime.fromtimestamp(t.scheduled_at, PARIS).isoformat() for t in tasks)


@pytest.fixture
def events(debug_events: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return debug_events  # conftest's: every library event, at DEBUG


@pytest.mark.anyio
async def test_a_nightly_schedule_fires_at_local_times_across_dst_changes() -> None:
    """The scheduler on a fake wall clock, stepped every 10 minutes over 40 days that
    span both of Paris's DST changes: one task a night, each at 03:00 local."""
    manager = BackgroundTaskManager()

    @manager.periodic("0 3 * * *", name="nightly", timezone="Europe/Paris", overlap=True)
    async def nightly() -> None:
        pass

    now = FakeNow(datetime(2026, 3, 20, 12, tzinfo=PARIS))
    scheduler, _ = scheduler_for(manager, now, "nightly")
    while now.t < datetime(2026, 4, 5, tzinfo=PARIS).timestamp():
        due = await scheduler.step()
        assert due > now.t
        now.t += 600
    now.t = datetime(2026, 10, 20, 12, tzinfo=PARIS).timestamp()
    await scheduler.step()  # months missed: one run for the latest, as missed="latest" says
    while now.t < datetime(2026, 11, 1, tzinfo=PARIS).timestamp():
        await scheduler.step()
        now.t += 600
    got = fired_ticks(manager, "nightly")
    spring = [f"2026-03-{d:02d}T03:00:00+01:00" for d in range(21, 29)]
    spring += [f"2026-03-{d:02d}T03:00:00+02:00" for d in range(29, 32)]
    spring += [f"2026-04-{d:02d}T03:00:00+02:00" for d in range(1, 5)]
    # the clocks go back at 03:00 CEST on the 25th: that night's 03:00 is already CET
    autumn = [f"2026-10-{d:02d}T03:00:00+02:00" for d in range(20, 25)]
    autumn += [f"2026-10-{d:02d}T03:00:00+01:00" for d in range(25, 32)]
    assert got == spring + autumn
    assert len(got) == len(set(got))


@pytest.mark.anyio
async def test_missed_ticks_give_one_run_for_the_latest_or_none(
    events: list[MutableMapping[str, Any]],
) -> None:
    manager = BackgroundTaskManager()
    for name, missed in (("latest", "latest"), ("skip", "skip")):

        @manager.periodic(every=60, name=name, missed=missed, overlap=True)  # type: ignore[arg-type]
        async def job() -> None:
            pass

    start = datetime(2026, 5, 1, 12, 0, 10, tzinfo=UTC)
    now = FakeNow(start)
    scheduler, _ = scheduler_for(manager, now, "latest", "skip")
    assert await scheduler.step() == start.timestamp() + 50  # first seen: from the next tick
    now.t += 50.2  # 12:01:00.2: on time for both
    await scheduler.step()
    now.t = datetime(2026, 5, 1, 12, 7, 40, tzinfo=UTC).timestamp()  # 12:02..12:07 missed
    await scheduler.step()
    runs = {
        name: sorted(
            datetime.fromtimestamp(t.scheduled_at, UTC).strftime("%H:%M")
            for t in manager._table.tasks.values()
            if t.name == name
        )
        for name in ("latest", "skip")
    }
    assert runs == {"latest": ["12:01", "12:07"], "skip": ["12:01"]}
    missed = [(e["name"], e["since"][11:16], e["until"][11:16], e["ran"]) for e in events
              if e["event"] == "periodic_ticks_missed"]  # fmt: skip
    assert missed == [
        ("latest", "12:02", "12:07", "2026-05-01T12:07:00+00:00"),
        ("skip", "12:02", "12:07", None),
    ]
    # within half an interval of its time, a tick is on time even for missed="skip"
    now.t = datetime(2026, 5, 1, 12, 8, 29, tzinfo=UTC).timestamp()
    await scheduler.step()
    assert sum(1 for t in manager._table.tasks.values() if t.name == "skip") == 2


@pytest.mark.anyio
async def test_while_a_ticks_task_is_unfinished_later_ticks_are_skipped(
    events: list[MutableMapping[str, Any]],
) -> None:
    manager = BackgroundTaskManager()

    @manager.periodic(every=60, name="serial")
    async def serial() -> None:
        pass

    @manager.periodic(every=60, name="parallel", overlap=True)
    async def parallel() -> None:
        pass

    now = FakeNow(datetime(2026, 5, 1, 12, 0, 1, tzinfo=UTC))
    scheduler, _ = scheduler_for(manager, now, "serial", "parallel")
    for _ in range(4):  # no worker runs them: every tick's task stays pending
        await scheduler.step()
        now.t += 60
    counts = Counter(t.name for t in manager._table.tasks.values())
    assert counts == {"serial": 1, "parallel": 3}
    skipped = [e for e in events if e["event"] == "periodic_tick_skipped"]
    assert [(e["name"], e["tick"][11:16]) for e in skipped] == [
        ("serial", "12:02"), ("serial", "12:03"),
    ]  # fmt: skip
    first = next(t for t in manager._table.tasks.values() if t.name == "serial")
    assert all(e["task_id"] == first.id for e in skipped)


# ------------------------------------------------------------------ real managers


def consecutive(tick_times: list[float], step: float) -> bool:
    return all(abs(b - a - step) < 1e-6 for a, b in itertools.pairwise(tick_times))


@pytest.mark.anyio
async def test_each_tick_runs_once_as_an_ordinary_task(
    make_manager: Callable[..., BackgroundTaskManager],
) -> None:
    manager = make_manager()
    seen: list[tuple[str, float, int]] = []

    @manager.periodic(every=0.1, name="tick", priority=3, timeout=5)
    async def tick() -> float:
        ctx = current_task()
        seen.append((ctx.id, ctx.scheduled_at.timestamp(), ctx.attempt))
        return ctx.scheduled_at.timestamp()

    async with manager:
        await anyio.sleep(0.65)
        ids = [task_id for task_id, _, _ in seen]
        records = [await manager.get(i) for i in ids[:3]]
    times = [t for _, t, _ in seen]
    assert 4 <= len(seen) <= 8
    assert len(set(times)) == len(times)
    assert consecutive(times, 0.1)
    assert all(round(t * 10) == t * 10 or abs(round(t * 10) - t * 10) < 1e-6 for t in times)
    for record in records:
        if record is None:  # in memory, finished records are kept; with a journal too
            continue
        assert record.name == "tick"
        assert record.priority == 3
        assert record.timeout == 5
        assert record.key is not None
        assert record.key.startswith("periodic:tick:")
        assert record.status is TaskStatus.COMPLETED
        assert record.scheduled_at.timestamp() == pytest.approx(record.result)


@pytest.mark.anyio
async def test_a_retried_tick_keeps_its_tick_as_scheduled_at(
    make_manager: Callable[..., BackgroundTaskManager],
) -> None:
    manager = make_manager()
    attempts: list[tuple[str, int, float]] = []
    done = anyio.Event()

    @manager.periodic(
        every=0.2, name="flaky", retry=RetryPolicy(max_attempts=2, base_delay=0.05, jitter=False)
    )
    async def flaky() -> None:
        ctx = current_task()
        attempts.append((ctx.id, ctx.attempt, ctx.scheduled_at.timestamp()))
        if ctx.attempt == 1:
            raise RuntimeError("first attempt fails")
        done.set()

    async with manager:
        with anyio.fail_after(5):
            await done.wait()
        first = attempts[0][0]
        record = await manager.get(first)
    mine = [(attempt, tick) for task_id, attempt, tick in attempts if task_id == first]
    assert [attempt for attempt, _ in mine] == [1, 2]
    assert mine[0][1] == mine[1][1]  # the tick, in both attempts
    assert record is not None
    assert record.scheduled_at.timestamp() > mine[0][1]  # the record: its backoff's end


@pytest.mark.anyio
async def test_a_slow_tick_skips_the_next_ones_without_piling_up(
    make_manager: Callable[..., BackgroundTaskManager],
    events: list[MutableMapping[str, Any]],
) -> None:
    manager = make_manager()
    runs: list[float] = []

    @manager.periodic(every=0.1, name="slow")
    async def slow() -> None:
        runs.append(current_task().scheduled_at.timestamp())
        await anyio.sleep(0.25)

    async with manager:
        await anyio.sleep(0.9)
    skipped = [e["tick"] for e in events if e["event"] == "periodic_tick_skipped"]
    assert len(runs) >= 2
    assert len(skipped) >= len(runs)  # two or so skipped after every run
    assert all(b - a >= 0.29 for a, b in itertools.pairwise(runs))


@pytest.mark.anyio
async def test_two_managers_on_one_journal_fire_each_tick_once(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    seen: list[tuple[str, float]] = []

    def make(label: str) -> BackgroundTaskManager:
        m = BackgroundTaskManager(journal=SQLiteJournal(path), poll_interval=0.05)

        @m.periodic(every=0.1, name="tick", overlap=True)
        async def tick() -> None:
            seen.append((label, current_task().scheduled_at.timestamp()))

        return m

    a, b = make("a"), make("b")
    async with a, b:
        await anyio.sleep(1.25)
        journal = a.journal
        assert isinstance(journal, SQLiteJournal)
        (state,) = await journal.periodic()
        stored = await journal.list(name="tick", limit=1000)
    times = sorted(t for _, t in seen)
    assert len(times) >= 9
    assert len(set(times)) == len(times)  # never twice
    assert consecutive(times, 0.1)  # never a gap while a manager is up
    assert len({r.key for r in stored}) == len(stored) >= len(times)
    assert state.name == "tick"
    assert state.schedule == "every 0.1s"


@pytest.mark.anyio
@pytest.mark.parametrize("missed", ["latest", "skip"])
async def test_a_restart_after_missed_ticks_runs_the_documented_number(
    tmp_path: Path, missed: str
) -> None:
    """Ticks of 0.4 s; the manager stops, and starts again 0.27 s after a tick (later
    than its grace, 0.2 s) with ticks missed in between: "latest" runs that latest tick
    once, late; "skip" runs none of them. (Should the start take past the next tick,
    that one is on time and runs either way.) ``overlap=True``: the task of a tick
    decided as the first manager stopped may still be pending at the restart, which
    with ``overlap=False`` skips the missed tick (another test's subject)."""
    path = tmp_path / "t.db"
    every = Every(0.4)
    seen: list[float] = []

    def make() -> BackgroundTaskManager:
        m = BackgroundTaskManager(journal=SQLiteJournal(path))

        @m.periodic(every=0.4, name="tick", missed=missed, overlap=True)  # type: ignore[arg-type]
        async def tick() -> None:
            seen.append(current_task().scheduled_at.timestamp())

        return m

    async with make():
        await anyio.sleep(0.5)
    assert seen
    async with opened(SQLiteJournal(path)) as journal:
        (state,) = await journal.periodic()
    last = state.last_tick  # the last tick decided (its task may run after the restart)
    restart = every.at_or_before(time.time() + 1.0) + 0.27  # two ticks missed at least
    await anyio.sleep(restart - time.time())
    missed_tick = every.at_or_before(time.time())
    async with make():
        await anyio.sleep(0.02)
        after = [t for t in seen if t > last]
    assert missed_tick - last > 0.79
    if missed == "latest":
        assert len(after) == 1
        assert after[0] in (missed_tick, missed_tick + 0.4)
    else:
        assert all(t > missed_tick for t in after)  # none of the missed ones


def test_bgtasks_status_lists_periodic_tasks(tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / "t.db"

    async def make() -> None:
        m = BackgroundTaskManager(journal=SQLiteJournal(path))

        @m.periodic("*/5 * * * *", name="cleanup", timezone="Europe/Paris")
        async def cleanup() -> None:
            pass

        async with m:
            await anyio.sleep(0.05)

    anyio.run(make)
    assert main(["status", "--journal", str(path)]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("cleanup"))
    assert "cron */5 * * * * (Europe/Paris)" in line
    assert "in " in line  # the next tick is ahead


def test_bad_types_of_schedule_interval_and_zone_are_type_errors() -> None:
    from datetime import timezone as fixed

    with pytest.raises(TypeError, match="cron schedule is a str"):
        Cron(5, UTC, "UTC")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="seconds or a timedelta"):
        Every("60")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="time zone name or a tzinfo"):
        parse_schedule("0 3 * * *", None, 2)  # type: ignore[arg-type]
    plus_two = fixed(timedelta(hours=2))
    cron = parse_schedule("0 3 * * *", None, plus_two)
    assert isinstance(cron, Cron)
    tick = cron.next_after(datetime(2026, 1, 1, tzinfo=UTC).timestamp())
    assert datetime.fromtimestamp(tick, UTC).hour == 1
    assert isinstance(parse_schedule(None, 60, fixed(timedelta(0))), Every)


@pytest.mark.anyio
async def test_a_journal_without_periodic_state_is_refused_at_start(tmp_path: Path) -> None:
    class Plain:
        """A journal with everything but the PeriodicJournal verbs."""

        def __init__(self, inner: SQLiteJournal) -> None:
            self._inner = inner
            self.lease_timeout = inner.lease_timeout

        def __getattr__(self, name: str) -> Any:
            if name in ("periodic", "advance_periodic"):
                raise AttributeError(name)
            return getattr(self._inner, name)

    manager = BackgroundTaskManager(journal=Plain(SQLiteJournal(tmp_path / "t.db")))  # type: ignore[arg-type]

    @manager.periodic(every=60, name="p")
    async def p() -> None:
        pass

    with pytest.raises(ValueError, match="cannot keep periodic tasks"):
        await manager.__aenter__()
    assert not (tmp_path / "t.db").exists()  # refused before the journal was opened


@pytest.mark.anyio
async def test_a_tick_whose_write_failed_but_landed_still_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, events: list[MutableMapping[str, Any]]
) -> None:
    """The commit of a tick lands but its answer is lost (JournalError): the scheduler
    logs it, reads the state again, finds its own task there and runs it."""
    from background_tasks import JournalError

    journal = SQLiteJournal(tmp_path / "t.db")
    manager = BackgroundTaskManager(journal=journal)
    ran: list[float] = []
    real = journal.advance_periodic
    lost: list[float] = []
    two = anyio.Event()

    async def lossy(state: Any, row: Any) -> bool:
        applied = await real(state, row)
        if row is not None and not lost:
            lost.append(row.scheduled_at)
            raise JournalError("the answer of the commit was lost")
        return applied

    monkeypatch.setattr(journal, "advance_periodic", lossy)

    @manager.periodic(every=0.2, name="tick")
    async def tick() -> None:
        ran.append(current_task().scheduled_at.timestamp())
        if len(ran) >= 2:
            two.set()

    async with manager:
        with anyio.fail_after(5):
            await two.wait()
    assert ran[0] == lost[0]  # the tick whose answer was lost ran, once
    assert ran.count(lost[0]) == 1
    errors = [e for e in events if e["event"] == "periodic_scheduler_error"]
    assert len(errors) == 1


@pytest.mark.anyio
async def test_a_manager_that_runs_no_tasks_fires_ticks_that_another_runs(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    front = BackgroundTaskManager(journal=SQLiteJournal(path), run_tasks=False)
    runner = BackgroundTaskManager(journal=SQLiteJournal(path), poll_interval=0.05)
    ran: list[tuple[float, str | None]] = []
    three = anyio.Event()

    @front.periodic(every=0.1, name="tick")
    async def tick() -> None:
        pass

    @runner.task(name="tick")  # the same task, not periodic here: only front fires it
    async def run_tick() -> None:
        ctx = current_task()
        ran.append((ctx.scheduled_at.timestamp(), ctx.name))
        if len(ran) >= 3:
            three.set()

    async with front, runner:
        with anyio.fail_after(5):
            await three.wait()
    assert {name for _, name in ran} == {"tick"}
    assert len({t for t, _ in ran}) == len(ran)
