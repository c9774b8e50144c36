"""Time: absolute schedules (``submit(at=)``), ``TaskContext.scheduled_at``, rescheduling,
batches (``submit_many``) and backpressure (``when_full="wait"``), in memory and on a
SQLite journal, on asyncio and trio."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anyio
import pytest
from support import P, R, noop

from background_tasks import (
    BackgroundTaskManager,
    InvalidTransition,
    ManagerNotRunning,
    QueueFull,
    RetryPolicy,
    SerializationError,
    SQLiteJournal,
    TaskNotFound,
    TaskStatus,
    current_task,
)

pytestmark = pytest.mark.anyio


# ------------------------------------------------------------------ submit(at=)


async def test_at_is_not_started_before(make_manager: Callable[..., BackgroundTaskManager]) -> None:
    seen: list[tuple[float, datetime]] = []
    manager = make_manager()

    @manager.task(name="stamp")
    async def stamp() -> None:
        seen.append((time.time(), current_task().scheduled_at))

    async with manager:
        at = datetime.now(UTC) + timedelta(seconds=0.15)
        handle = await manager.submit(stamp, at=at)
        record = await manager.get(handle.id)
        assert record is not None
        assert record.status is P
        assert record.scheduled_at == at
        await handle
    ((started, scheduled),) = seen
    assert started >= at.timestamp()
    assert scheduled == at
    assert scheduled.tzinfo is UTC


async def test_at_in_another_time_zone_is_the_same_instant(
    make_manager: Callable[..., BackgroundTaskManager],
) -> None:
    manager = make_manager()

    @manager.task(name="when")
    async def when() -> str:
        return current_task().scheduled_at.isoformat()

    async with manager:
        paris = timezone(timedelta(hours=2))
        at = (datetime.now(UTC) + timedelta(seconds=0.05)).astimezone(paris)
        handle = await when.options(at=at).submit()
        result = await handle
    assert datetime.fromisoformat(result) == at  # the instant, whatever the zone


async def test_at_in_the_past_runs_now(make_manager: Callable[..., BackgroundTaskManager]) -> None:
    manager = make_manager()

    @manager.task(name="past")
    async def past() -> str:
        return current_task().scheduled_at.isoformat()

    async with manager:
        at = datetime(2001, 1, 1, tzinfo=UTC)
        with anyio.fail_after(5):
            assert await (await manager.submit(past, at=at)) == at.isoformat()


async def test_scheduled_at_of_a_plain_submit_is_its_submit_time() -> None:
    async def when() -> datetime:
        return current_task().scheduled_at

    async with BackgroundTaskManager() as manager:
        before = datetime.now(UTC)
        handle = await manager.submit(when)
        record = await manager.get(handle.id)
        result = await handle
    assert record is not None
    assert before <= result == record.scheduled_at == record.created_at


@pytest.mark.parametrize(
    ("at", "error", "match"),
    [
        (datetime(2030, 1, 1), ValueError, "aware"),  # naive
        ("2030-01-01T00:00:00Z", TypeError, "aware datetime"),
        (1893456000.0, TypeError, "aware datetime"),
        (datetime.max.replace(tzinfo=timezone(timedelta(hours=-5))), ValueError, "9999"),
        (datetime.min.replace(tzinfo=timezone(timedelta(hours=5))), ValueError, "9999"),
    ],
    ids=["naive", "str", "float", "past-9999", "before-1"],
)
async def test_bad_at_is_refused_at_submit(at: Any, error: type[Exception], match: str) -> None:
    async with BackgroundTaskManager() as manager:
        with pytest.raises(error, match=match):
            await manager.submit(noop, at=at)
        assert manager.statistics().pending == 0


async def test_at_and_delay_together_is_a_value_error() -> None:
    async with BackgroundTaskManager() as manager:
        with pytest.raises(ValueError, match="delay or at"):
            await manager.submit(noop, at=datetime.now(UTC), delay=1)
        with pytest.raises(ValueError, match="delay or at"):
            await manager.submit(noop, at=datetime.now(UTC), delay=0)


async def test_at_as_late_as_a_datetime_goes_is_stored_and_read_back(tmp_path: Path) -> None:
    manager = BackgroundTaskManager(journal=SQLiteJournal(tmp_path / "t.db"))

    @manager.task(name="never")
    async def never() -> None:
        pass

    at = datetime(9999, 12, 31, 23, 0, tzinfo=UTC)
    async with manager:
        handle = await manager.submit(never, at=at)
        record = await manager.get(handle.id)
        assert record is not None
        assert record.scheduled_at == at
        assert record.status is P
    async with manager:  # recovered: queued again for then, not run
        record = await manager.get(handle.id)
        assert record is not None
        assert (record.status, record.scheduled_at) == (P, at)


async def test_at_orders_like_a_delay() -> None:
    order: list[str] = []

    async def mark(label: str) -> None:
        order.append(label)

    async with BackgroundTaskManager(max_concurrency=1) as manager:
        now = datetime.now(UTC)
        late = await manager.submit(mark, "late", at=now + timedelta(seconds=0.12))
        early = await manager.submit(mark, "early", at=now + timedelta(seconds=0.06))
        await late
        await early
    assert order == ["early", "late"]


# ------------------------------------------------------------------ reschedule


async def test_reschedule_a_delayed_task_to_now(
    make_manager: Callable[..., BackgroundTaskManager],
) -> None:
    manager = make_manager()

    @manager.task(name="later")
    async def later() -> str:
        return current_task().scheduled_at.isoformat()

    async with manager:
        handle = await later.options(delay=3600).submit()
        before = datetime.now(UTC)
        record = await manager.reschedule(handle.id, delay=0)
        assert record.status is P
        assert before <= record.scheduled_at <= datetime.now(UTC)
        with anyio.fail_after(5):
            ran = datetime.fromisoformat(await handle)
        assert ran == record.scheduled_at


async def test_reschedule_later_and_with_at(
    make_manager: Callable[..., BackgroundTaskManager],
) -> None:
    started: list[float] = []
    manager = make_manager()

    @manager.task(name="stamp")
    async def stamp() -> None:
        started.append(time.time())

    async with manager:
        handle = await stamp.options(delay=0.05).submit()
        record = await manager.reschedule(handle.id, delay=timedelta(seconds=0.3))
        assert record.status is P
        await anyio.sleep(0.15)
        assert started == []  # not at the old time
        at = datetime.now(UTC) + timedelta(seconds=0.1)
        record = await manager.reschedule(handle.id, at=at)
        assert record.scheduled_at == at
        with anyio.fail_after(5):
            await handle
        assert started[0] >= at.timestamp()
        assert len(started) == 1


async def test_reschedule_a_retrying_task_keeps_it_retrying(
    make_manager: Callable[..., BackgroundTaskManager],
) -> None:
    runs = 0
    manager = make_manager()

    @manager.task(name="flaky", retry=RetryPolicy(max_attempts=2, base_delay=3600, jitter=False))
    async def flaky() -> int:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise RuntimeError("first run fails")
        return runs

    async with manager:
        handle = await flaky.submit()
        await _wait(manager, handle.id, TaskStatus.RETRYING)
        record = await manager.reschedule(handle.id, delay=0)
        assert record.status is TaskStatus.RETRYING
        assert record.attempts == 1
        with anyio.fail_after(5):
            assert await handle == 2


async def test_reschedule_refuses_other_statuses_and_unknown_ids(
    make_manager: Callable[..., BackgroundTaskManager],
) -> None:
    gate = anyio.Event()
    manager = make_manager()

    @manager.task(name="held")
    async def held() -> None:
        await gate.wait()

    async with manager:
        running = await held.submit()
        await _wait(manager, running.id, R)
        with pytest.raises(InvalidTransition, match="running"):
            await manager.reschedule(running.id, delay=0)
        gate.set()
        await running
        with pytest.raises(InvalidTransition, match="completed"):
            await manager.reschedule(running.id, delay=0)
        with pytest.raises(TaskNotFound):
            await manager.reschedule("no-such-task", delay=0)
        for bad in ({}, {"delay": 1, "at": datetime.now(UTC)}):
            with pytest.raises(ValueError, match="delay or an at"):
                await manager.reschedule(running.id, **bad)
        with pytest.raises(ValueError, match="aware"):
            await manager.reschedule(running.id, at=datetime(2030, 1, 1))  # naive
        with pytest.raises(ValueError, match="delay"):
            await manager.reschedule(running.id, delay=-1)


async def test_reschedule_needs_a_running_manager() -> None:
    manager = BackgroundTaskManager()
    with pytest.raises(ManagerNotRunning):
        await manager.reschedule("x", delay=0)


async def test_reschedule_is_logged_and_journaled_without_a_transition(
    tmp_path: Path, debug_events: list[Any]
) -> None:
    manager = BackgroundTaskManager(journal=SQLiteJournal(tmp_path / "t.db"))

    @manager.task(name="later")
    async def later() -> None:
        pass

    async with manager:
        handle = await later.options(delay=3600).submit()
        await manager.reschedule(handle.id, delay=7200)
        history = await manager.history(handle.id)
        await manager.cancel(handle.id)
    assert [(h.source, h.target) for h in history] == [(None, P), (P, P)]
    rescheduled = [e for e in debug_events if e["event"] == "task_rescheduled"]
    assert [(e["task_id"], e["status"]) for e in rescheduled] == [(handle.id, "pending")]
    moves = [
        e for e in debug_events if e["event"] == "task_transition" and e["task_id"] == handle.id
    ]
    assert [(e["from"], e["to"]) for e in moves] == [("pending", "cancelled")]


async def test_reschedule_from_another_manager_moves_the_task_where_it_is_queued(
    tmp_path: Path,
) -> None:
    """The task is queued in ``runner``; ``front`` (which runs nothing) reschedules it
    through the journal, and ``runner`` sees the change and runs it now."""
    path = tmp_path / "shared.db"
    runner = BackgroundTaskManager(journal=SQLiteJournal(path), poll_interval=0.05)
    front = BackgroundTaskManager(journal=SQLiteJournal(path), run_tasks=False)
    for manager in (runner, front):

        @manager.task(name="later")
        async def later() -> str:
            return current_task().scheduled_at.isoformat()

    async with runner, front:
        handle = await runner.submit("later", delay=3600)
        assert runner.statistics().queued == 1
        record = await front.reschedule(handle.id, delay=0)
        assert record.status is P
        with anyio.fail_after(5):
            ran = await front.handle(handle.id)
        assert datetime.fromisoformat(ran) == record.scheduled_at


async def _wait(manager: BackgroundTaskManager, task_id: str, status: Any) -> None:
    with anyio.fail_after(5):
        while True:
            record = await manager.get(task_id)
            if record is not None and record.status is status:
                return
            await anyio.sleep(0.002)


# ------------------------------------------------------------------ submit_many


async def test_submit_many_runs_one_task_per_item_in_input_order(
    make_manager: Callable[..., BackgroundTaskManager],
) -> None:
    order: list[int] = []
    manager = make_manager(max_concurrency=1)

    @manager.task(name="add")
    async def add(x: int, y: int = 0) -> int:
        order.append(x)
        return x + y

    async with manager:
        items = [{"x": i, "y": 10} for i in range(50)]
        handles = await add.submit_many(items, priority=2)
        assert [h.id for h in handles] == sorted(h.id for h in handles)
        with anyio.fail_after(10):
            assert [await h for h in handles] == [i + 10 for i in range(50)]
        assert order == list(range(50))
        record = await manager.get(handles[7].id)
        assert record is not None
        assert (record.name, record.kwargs, record.priority, record.queue) == (
            "add", {"x": 7, "y": 10}, 2, "default",
        )  # fmt: skip
        same = await manager.submit_many("add", [{"x": 1}], queue="default")
        assert await same[0] == 1
        assert await manager.submit_many(add, []) == []


async def test_submit_many_takes_the_options_of_submit(
    make_manager: Callable[..., BackgroundTaskManager],
) -> None:
    manager = make_manager(queues={"slow": 1})

    @manager.task(name="later", retry=RetryPolicy(max_attempts=4))
    async def later(n: int) -> int:
        return n

    async with manager:
        at = datetime.now(UTC) + timedelta(hours=1)
        handles = await later.options(at=at, queue="slow", timeout=5).submit_many(
            [{"n": 1}, {"n": 2}]
        )
        for handle in handles:
            record = await manager.get(handle.id)
            assert record is not None
            assert (record.status, record.scheduled_at, record.queue) == (P, at, "slow")
            assert (record.max_attempts, record.timeout) == (4, 5)
        delayed = await manager.submit_many(later, [{"n": 3}], delay=3600)
        record = await manager.get(delayed[0].id)
        assert record is not None
        assert record.scheduled_at > datetime.now(UTC) + timedelta(minutes=59)
        for handle in [*handles, *delayed]:
            await handle.cancel()


@pytest.mark.parametrize(
    ("items", "options", "error"),
    [
        ([{"n": 1}, {"n": object()}], {}, "SerializationError"),
        ([{"n": 1}, {3: 1}], {}, TypeError),
        ([{"n": 1}, ["n", 1]], {}, TypeError),
        ({"n": 1}, {}, TypeError),
        ([{"n": 1}], {"delay": -1}, ValueError),
        ([{"n": 1}], {"delay": 1, "at": datetime.now(UTC)}, ValueError),
        ([{"n": 1}], {"at": datetime(2030, 1, 1)}, ValueError),  # naive
        ([{"n": 1}], {"queue": "nope"}, ValueError),
        ([{"n": 1}], {"priority": "high"}, TypeError),
    ],
    ids=["unserialisable", "key-not-str", "not-a-dict", "a-dict", "delay", "both", "naive", "queue",
         "priority"],
)  # fmt: skip
async def test_a_bad_item_or_option_stores_nothing(
    tmp_path: Path, items: Any, options: dict[str, Any], error: Any
) -> None:
    expected = SerializationError if error == "SerializationError" else error
    manager = BackgroundTaskManager(journal=SQLiteJournal(tmp_path / "t.db"), queues={"a": 1})

    @manager.task(name="job")
    async def job(n: Any) -> None:
        pass

    async with manager:
        with pytest.raises(expected):
            await manager.submit_many(job, items, **options)
        assert await manager.list() == []
        assert manager.statistics().pending == 0


async def test_submit_many_needs_a_registered_task_with_a_journal(tmp_path: Path) -> None:
    async def plain(n: int) -> None:
        pass

    async with BackgroundTaskManager(journal=SQLiteJournal(tmp_path / "t.db")) as manager:
        with pytest.raises(TypeError, match="registered"):
            await manager.submit_many(plain, [{"n": 1}])
        with pytest.raises(ValueError, match="no task is registered"):
            await manager.submit_many("missing", [{"n": 1}])
    with pytest.raises(ManagerNotRunning):
        await manager.submit_many(plain, [{"n": 1}])


async def test_submit_many_of_plain_functions_in_memory() -> None:
    async def double(n: int) -> int:
        return 2 * n

    async with BackgroundTaskManager() as manager:
        handles = await manager.submit_many(double, [{"n": i} for i in range(5)])
        assert [await h for h in handles] == [0, 2, 4, 6, 8]


async def test_submit_many_is_one_transaction(tmp_path: Path) -> None:
    journal = SQLiteJournal(tmp_path / "t.db")
    manager = BackgroundTaskManager(journal=journal, run_tasks=False)

    @manager.task(name="job")
    async def job(n: int) -> None:
        pass

    async with manager:
        before = journal.commits
        handles = await job.submit_many([{"n": i} for i in range(1000)])
        assert journal.commits - before == 1
        assert (await journal.counts())[P] == 1000
        assert len({h.id for h in handles}) == 1000


async def test_submit_many_respects_max_pending(
    make_manager: Callable[..., BackgroundTaskManager],
) -> None:
    manager = make_manager(max_pending=5)

    @manager.task(name="job")
    async def job(n: int) -> None:
        pass

    async with manager:
        with pytest.raises(QueueFull, match="cannot fit"):
            await job.submit_many([{"n": i} for i in range(6)], delay=60)
        handles = await job.submit_many([{"n": i} for i in range(4)], delay=60)
        with pytest.raises(QueueFull):
            await job.submit_many([{"n": 1}, {"n": 2}], delay=60)
        assert manager.statistics().pending == 4
        for handle in handles:
            await handle.cancel()


async def test_submit_many_with_a_key_option_is_refused() -> None:
    manager = BackgroundTaskManager()

    @manager.task(name="job")
    async def job(n: int) -> None:
        pass

    async with manager:
        with pytest.raises(ValueError, match="key"):
            await job.options(key="k").submit_many([{"n": 1}])


# ------------------------------------------------------------------ when_full="wait"


async def test_when_full_wait_waits_for_room(
    make_manager: Callable[..., BackgroundTaskManager],
) -> None:
    manager = make_manager(max_pending=2, when_full="wait", max_concurrency=1)
    gate = anyio.Event()

    @manager.task(name="job")
    async def job(n: int) -> int:
        await gate.wait()
        return n

    async with manager:
        first = await job.submit(0)
        await _wait(manager, first.id, R)  # running: not counted
        waiting = [await job.submit(1), await job.submit(2)]
        got: list[Any] = []

        async def third() -> None:
            got.append(await job.submit(3))

        async with anyio.create_task_group() as tg:
            tg.start_soon(third)
            await anyio.sleep(0.1)
            assert got == []  # still waiting for room
            assert manager.statistics().pending == 2
            gate.set()  # the first ends, the second starts: room for the third
        with anyio.fail_after(5):
            assert [await h for h in [first, *waiting, *got]] == [0, 1, 2, 3]


async def test_cancelling_a_waiting_submit_stores_nothing(
    make_manager: Callable[..., BackgroundTaskManager],
) -> None:
    manager = make_manager(max_pending=1, when_full="wait")

    @manager.task(name="job")
    async def job(n: int) -> None:
        pass

    async with manager:
        held = await job.options(delay=3600).submit(0)
        with anyio.move_on_after(0.1) as scope:
            await job.submit(1)
        assert scope.cancelled_caught
        records = await manager.list()
        assert [r.id for r in records] == [held.id]
        assert manager.statistics().pending == 1
        await manager.cancel(held.id)  # room again: the next submit goes straight in
        with anyio.fail_after(5):
            await (await job.submit(2))


async def test_submit_many_waits_for_room_for_all_of_it() -> None:
    manager = BackgroundTaskManager(max_pending=3, when_full="wait")

    @manager.task(name="job")
    async def job(n: int) -> int:
        return n

    async with manager:
        held = [await job.options(delay=3600).submit(i) for i in range(2)]
        done: list[list[Any]] = []

        async def many() -> None:
            done.append(await job.submit_many([{"n": 10}, {"n": 11}]))

        async with anyio.create_task_group() as tg:
            tg.start_soon(many)
            await anyio.sleep(0.05)
            assert done == []
            await manager.cancel(held[0].id)  # room for both now
        with anyio.fail_after(5):
            assert [await h for h in done[0]] == [10, 11]
        with pytest.raises(QueueFull, match="cannot fit"):
            await job.submit_many([{"n": i} for i in range(4)])
        await manager.cancel(held[1].id)


async def test_a_waiting_submit_at_shutdown_raises_manager_not_running() -> None:
    manager = BackgroundTaskManager(max_pending=1, when_full="wait")
    outcome: list[BaseException] = []

    async def job() -> None:
        pass

    async with anyio.create_task_group() as tg, manager:
        await manager.submit(job, delay=3600)

        async def blocked() -> None:
            try:
                await manager.submit(job)
            except ManagerNotRunning as exc:
                outcome.append(exc)

        tg.start_soon(blocked)
        await anyio.sleep(0.05)
    assert len(outcome) == 1


async def test_when_full_raise_is_the_default_and_bad_values_are_refused() -> None:
    assert BackgroundTaskManager().when_full == "raise"
    with pytest.raises(ValueError, match="when_full"):
        BackgroundTaskManager(when_full="block")  # type: ignore[arg-type]
    async with BackgroundTaskManager(max_pending=1) as manager:
        await manager.submit(noop, delay=3600)
        with pytest.raises(QueueFull):
            await manager.submit(noop)


async def test_waiting_submits_never_overshoot_max_pending() -> None:
    """Many submitters waiting at once: the bound holds at every moment."""
    manager = BackgroundTaskManager(max_pending=5, when_full="wait", max_concurrency=2)
    peak = 0

    async def job() -> None:
        nonlocal peak
        stats = manager.statistics()
        peak = max(peak, stats.pending + stats.retrying)
        await anyio.sleep(0.001)

    async with manager:
        handles: list[Any] = []

        async def submitter() -> None:
            for _ in range(20):
                handles.append(await manager.submit(job))
                stats = manager.statistics()
                assert stats.pending + stats.retrying <= 5

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for _ in range(10):
                    tg.start_soon(submitter)
            for handle in handles:
                await handle
    assert len(handles) == 200
    assert peak <= 5


async def test_a_batch_whose_commit_answer_was_lost_still_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """insert_many committed, then raised (a lost answer): the caller gets the error,
    and the manager finds the batch stored (all or none) and runs it."""
    from background_tasks import JournalError

    journal = SQLiteJournal(tmp_path / "t.db")
    manager = BackgroundTaskManager(journal=journal)
    real = journal.insert_many
    calls = 0

    async def lossy(rows: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            await real(rows)
            raise JournalError("the answer of the commit was lost")
        raise JournalError("the journal is away")  # stored nothing

    monkeypatch.setattr(journal, "insert_many", lossy)
    ran: list[int] = []
    done = anyio.Event()

    @manager.task(name="job")
    async def job(n: int) -> None:
        ran.append(n)
        if len(ran) == 3:
            done.set()

    async with manager:
        with pytest.raises(JournalError, match="lost"):
            await job.submit_many([{"n": 1}, {"n": 2}, {"n": 3}])
        with pytest.raises(JournalError, match="away"):
            await job.submit_many([{"n": 4}])
        with anyio.fail_after(5):
            await done.wait()
        await anyio.sleep(0.1)
    assert sorted(ran) == [1, 2, 3]


async def test_reschedule_of_a_task_another_manager_moved_first(tmp_path: Path) -> None:
    """Both managers hold the task queued; ``b`` reschedules it, then ``a`` (which has
    not seen that yet): a's write is refused at its stale version, and a reschedules
    through the row instead. The last reschedule wins; the task runs once."""
    path = tmp_path / "shared.db"
    a = BackgroundTaskManager(journal=SQLiteJournal(path), poll_interval=1.0)
    b = BackgroundTaskManager(journal=SQLiteJournal(path), poll_interval=0.05)
    runs: list[str] = []
    for manager, label in ((a, "a"), (b, "b")):

        @manager.task(name="later")
        async def later(label: str = label) -> None:
            runs.append(label)

    async with a, b:
        handle = await a.submit("later", delay=3600)
        with anyio.fail_after(5):
            while handle.id not in b._table.tasks:  # noqa: ASYNC110 - b's watcher takes it
                await anyio.sleep(0.01)
        await b.reschedule(handle.id, delay=1800)
        at = datetime.now(UTC) + timedelta(seconds=0.1)
        record = await a.reschedule(handle.id, at=at)
        assert (record.status, record.scheduled_at) == (P, at)
        with anyio.fail_after(5):
            await a.handle(handle.id)
        history = await a.history(handle.id)
    assert len(runs) == 1
    assert [(h.source, h.target) for h in history][:3] == [(None, P), (P, P), (P, P)]
