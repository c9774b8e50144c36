"""A contract suite for journals: every backend's tests reuse it.

Subclass ``JournalContract`` in a test module and give it one fixture, ``journal_factory``:
a callable that returns a new, *unopened* journal on the test's storage (every call in one
test must reach the same storage, so that two journals can share it)::

    from background_tasks.testing import JournalContract

    class TestSQLiteContract(JournalContract):
        @pytest.fixture
        def journal_factory(self, tmp_path):
            return lambda: SQLiteJournal(tmp_path / "tasks.db")

The suite needs only pytest and anyio's pytest plugin (it marks its tests ``anyio``; the
``anyio_backend`` fixture of the test session picks asyncio and/or trio). Fixtures:
``journal`` is opened with owner ``OWNER``; ``peer`` is a second journal on the same
storage opened with owner ``PEER`` (another process, as far as the contract can tell).
``make_row`` and ``claim`` build rows and changes for tests of your own; ``applied``
applies a change that must apply and returns the row as stored after it.

The tests of an optional capability (``ClaimingJournal``, ``BatchingJournal``,
``NotifyingJournal``, ``InspectableJournal``) run when the journal is an instance of it,
and are skipped, saying so, when it is not.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
import anyio.lowlevel
import pytest

from ._errors import InvalidTransition, JournalError
from ._fakeclock import FakeClock
from ._states import TaskStatus
from .journal._protocol import (
    BatchingJournal,
    Change,
    ClaimingJournal,
    ClockedJournal,
    InspectableJournal,
    Journal,
    LivenessJournal,
    NotifyingJournal,
    PeriodicJournal,
    PeriodicRow,
    TaskRow,
)

__all__ = [
    "OWNER", "PEER", "FakeClock",
    "JournalContract", "applied", "claim", "finish", "make_row", "opened", "takeover",
]  # fmt: skip

OWNER = "owner-a"
PEER = "owner-b"

_ids = itertools.count()
P, R, Y = TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.RETRYING
C, F, X = TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED


_J = TypeVar("_J", bound=Journal)


@asynccontextmanager
async def opened(journal: _J, owner: str = OWNER) -> AsyncIterator[_J]:
    """``journal``, open as ``owner`` for the block, closed after it."""
    await journal.open(owner)
    try:
        yield journal
    finally:
        await journal.close()


def make_row(**overrides: Any) -> TaskRow:
    """A new PENDING row with a fresh id (ids sort by creation, like the manager's)."""
    now = time.time()
    values: dict[str, Any] = {
        "id": f"t{time.time_ns():020d}{next(_ids):08d}",
        "name": "tests.job",
        "queue": "default",
        "status": P,
        "priority": 0,
        "args_json": "[1, 2]",
        "kwargs_json": '{"x": "y"}',
        "key": None,
        "attempts": 0,
        "max_attempts": 3,
        "created_at": now,
        "scheduled_at": now,
    }
    values.update(overrides)
    return TaskRow(**values)


def claim(
    row: TaskRow, owner: str = OWNER, *, lease: float = 30.0, now: float | None = None
) -> Change:
    """The change that starts the next attempt of ``row`` (PENDING/RETRYING -> RUNNING)."""
    at = time.time() if now is None else now
    return Change(
        task_id=row.id,
        version=row.version,
        source=row.status,
        target=R,
        attempt=row.attempts + 1,
        at=at,
        owner=owner,
        fields={
            "attempts": row.attempts + 1,
            "owner": owner,
            "lease_until": at + lease,
            "started_at": row.started_at if row.started_at is not None else at,
        },
    )


def finish(row: TaskRow, target: TaskStatus = C, **fields: Any) -> Change:
    """The change that ends ``row``'s attempt (or cancels it while it waits)."""
    at = time.time()
    values: dict[str, Any] = {"finished_at": at, "owner": None, "lease_until": None}
    values.update(fields)
    return Change(row.id, row.version, row.status, target, row.attempts, at, row.owner, values)


def takeover(row: TaskRow, owner: str, now: float) -> Change:
    """The change that puts ``row``, RUNNING with a lease that ended before ``now``, back
    to PENDING for ``owner``: only if the lease did not move past ``now`` meanwhile."""
    fields = {"recoveries": row.recoveries + 1, "owner": None, "lease_until": None}
    return Change(row.id, row.version, R, P, row.attempts, now, owner, fields, lease_before=now)


#: The verb each optional capability adds (what ``isinstance`` looks for).
_VERBS: dict[type[Any], str] = {
    ClaimingJournal: "insert_claimed",
    ClockedJournal: "now",
    BatchingJournal: "apply_soon",
    NotifyingJournal: "wait_for_changes",
    LivenessJournal: "orphaned",
    InspectableJournal: "counts_by_queue",
    PeriodicJournal: "advance_periodic",
}


def _capable(journal: Journal, capability: type[Any]) -> bool:
    """Whether ``journal`` offers ``capability``; one that does not must not offer half
    of it either (the manager decides with ``isinstance``, and uses all of it)."""
    if isinstance(journal, capability):
        return True
    assert not hasattr(journal, _VERBS[capability]), (
        f"{type(journal).__name__} has {_VERBS[capability]} but is not a {capability.__name__}"
    )
    return False


async def applied(journal: Journal, change: Change) -> TaskRow:
    """Apply ``change``, which must apply (``apply`` returns exactly True), and return the
    row as the journal now holds it (at ``change.version + 1``)."""
    result = await journal.apply(change)
    assert result is True, f"{change} did not apply ({result!r})"
    row = await journal.get(change.task_id)
    assert row is not None
    assert (row.status, row.version) == (change.target, change.version + 1)
    return row


class JournalContract:
    """What the manager relies on from any journal. See the module docstring."""

    pytestmark = pytest.mark.anyio

    # ------------------------------------------------------------------ fixtures

    @pytest.fixture
    def journal_factory(self) -> Callable[[], Journal]:
        raise NotImplementedError("a JournalContract subclass defines journal_factory")

    @pytest.fixture
    async def journal(
        self, journal_factory: Callable[[], Journal], anyio_backend: object
    ) -> AsyncIterator[Journal]:
        async with opened(journal_factory()) as journal:
            yield journal

    @pytest.fixture
    async def peer(
        self, journal: Journal, journal_factory: Callable[[], Journal], anyio_backend: object
    ) -> AsyncIterator[Journal]:
        async with opened(journal_factory(), PEER) as peer:
            yield peer

    async def running(
        self,
        journal: Journal,
        owner: str = OWNER,
        *,
        lease: float = 30.0,
        now: float | None = None,
        **kw: Any,
    ) -> TaskRow:
        """Insert a row and claim it for ``owner`` (at ``now``, for ``lease`` seconds);
        returns the RUNNING row."""
        row = await journal.insert(make_row(**kw))
        return await applied(journal, claim(row, owner, lease=lease, now=now))

    # ------------------------------------------------------------------ lifecycle

    async def test_is_a_journal(self, journal: Journal) -> None:
        assert isinstance(journal, Journal)
        assert journal.lease_timeout > 0

    async def test_close_twice_and_reopen_keeps_rows(
        self, journal_factory: Callable[[], Journal], anyio_backend: object
    ) -> None:
        first = journal_factory()
        await first.open(OWNER)
        row = await first.insert(make_row())
        await first.close()
        await first.close()
        second = journal_factory()
        await second.open(OWNER)
        try:
            assert await second.get(row.id) == row
        finally:
            await second.close()

    # ------------------------------------------------------------------ insert / get

    async def test_insert_round_trips_every_field(self, journal: Journal) -> None:
        row = make_row(
            queue="emails",
            priority=-7,
            key="k1",
            max_attempts=5,
            scheduled_at=time.time() + 60.5,
            options_json='{"timeout": 1.5}',
            args_json='["é", null, 1.25]',
            kwargs_json="{}",
        )
        assert await journal.insert(row) == row
        assert await journal.get(row.id) == row

    async def test_get_and_history_of_unknown_id(self, journal: Journal) -> None:
        assert await journal.get("nope") is None
        assert await journal.history("nope") == []

    async def test_insert_writes_the_first_history_line(self, journal: Journal) -> None:
        row = await journal.insert(make_row())
        [line] = await journal.history(row.id)
        assert (line.task_id, line.source, line.target, line.attempt) == (row.id, None, P, 0)
        assert abs(line.at.timestamp() - row.created_at) < 1e-3

    async def test_key_of_a_live_task_returns_that_task(self, journal: Journal) -> None:
        first = await journal.insert(make_row(key="once"))
        again = await journal.insert(make_row(key="once"))
        assert again.id == first.id
        running = await applied(journal, claim(first))
        assert (await journal.insert(make_row(key="once"))).id == first.id
        other = await journal.insert(make_row(key="other"))
        assert other.id != first.id
        await applied(journal, finish(running))
        fresh = make_row(key="once")
        assert (await journal.insert(fresh)).id == fresh.id
        assert await journal.get(fresh.id) == fresh

    async def test_concurrent_inserts_with_one_key_store_one_task(self, journal: Journal) -> None:
        got: list[str] = []

        async def submit() -> None:
            got.append((await journal.insert(make_row(key="same"))).id)

        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(submit)
        assert len(set(got)) == 1
        assert (await journal.counts())[P] == 1

    # ------------------------------------------------------------------ insert_many

    async def test_insert_many_stores_every_row_with_its_history(
        self, journal: Journal, peer: Journal
    ) -> None:
        _, cursor = await peer.changes(0, PEER)
        rows = [make_row(priority=i % 3, args_json=f"[{i}]") for i in range(600)]
        stored = await journal.insert_many(rows)
        assert stored == rows
        for row in (rows[0], rows[299], rows[-1]):
            assert await journal.get(row.id) == row
            lines = await journal.history(row.id)
            assert [(h.source, h.target, h.attempt) for h in lines] == [(None, P, 0)]
        assert (await journal.counts())[P] == 600
        runnable, _ = await journal.runnable()
        assert {r.id for r in runnable} == {r.id for r in rows}
        seen, _ = await peer.changes(cursor, PEER)
        assert [r.id for r in seen] == sorted(r.id for r in rows)
        assert await journal.insert_many([]) == []

    async def test_insert_many_stores_all_or_none(self, journal: Journal) -> None:
        """One bad row (here an id already stored) fails the whole call and stores
        nothing of it; a write sharing its transaction is not affected."""
        taken = await journal.insert(make_row())
        batch = [make_row() for _ in range(10)]
        batch.insert(5, dataclasses.replace(make_row(), id=taken.id))
        alone = make_row()
        outcome: dict[str, Any] = {}

        async def many() -> None:
            try:
                outcome["many"] = await journal.insert_many(batch)
            except Exception as exc:
                outcome["many"] = exc

        async def one() -> None:
            outcome["one"] = await journal.insert(alone)

        async with anyio.create_task_group() as tg:
            tg.start_soon(many)
            tg.start_soon(one)
        assert isinstance(outcome["many"], JournalError)
        assert outcome["one"] == alone
        for row in batch:
            if row.id != taken.id:
                assert await journal.get(row.id) is None
        assert await journal.get(taken.id) == taken
        assert (await journal.counts())[P] == 2

    async def test_insert_many_refuses_keyed_rows(self, journal: Journal) -> None:
        rows = [make_row(), make_row(key="k")]
        with pytest.raises(ValueError, match="key"):
            await journal.insert_many(rows)
        assert await journal.get(rows[0].id) is None

    # ------------------------------------------------------------------ apply

    async def test_apply_claims_and_bumps_the_version(self, journal: Journal) -> None:
        row = await journal.insert(make_row())
        change = claim(row)
        assert await journal.apply(change) is True
        claimed = await journal.get(row.id)
        assert claimed is not None
        assert claimed.status is R
        assert (claimed.version, claimed.attempts, claimed.owner) == (1, 1, OWNER)
        assert claimed.lease_until == change.fields["lease_until"]
        assert claimed.args_json == row.args_json
        lines = await journal.history(row.id)
        assert [(h.source, h.target, h.attempt, h.owner) for h in lines] == [
            (None, P, 0, None),
            (P, R, 1, OWNER),
        ]

    async def test_apply_needs_the_version_and_the_source(self, journal: Journal) -> None:
        row = await journal.insert(make_row())
        stale = claim(row)
        stale.version = 5
        assert await journal.apply(stale) is False
        wrong = claim(row)
        wrong.source = Y
        assert await journal.apply(wrong) is False
        unknown = claim(make_row())
        assert await journal.apply(unknown) is False
        assert await journal.get(row.id) == row
        assert len(await journal.history(row.id)) == 1

    async def test_a_change_that_keeps_the_status_applies_at_its_version(
        self, journal: Journal, peer: Journal
    ) -> None:
        """A reschedule: ``source`` is ``target``; versioned, in the history, and among
        the ``changes`` other owners read, like a transition."""
        row = await journal.insert(make_row())
        _, cursor = await peer.changes(0, PEER)
        later = row.scheduled_at + 3600
        move = Change(row.id, 0, P, P, 0, time.time(), OWNER, {"scheduled_at": later})
        moved = await applied(journal, move)
        assert (moved.status, moved.scheduled_at, moved.attempts) == (P, later, 0)
        assert await journal.apply(move) is False  # stale now
        wrong = dataclasses.replace(move, version=1, source=Y, target=Y)
        assert await journal.apply(wrong) is False
        lines = await journal.history(row.id)
        assert [(h.source, h.target) for h in lines] == [(None, P), (P, P)]
        seen, _ = await peer.changes(cursor, PEER)
        assert seen == [moved]
        assert (await journal.runnable())[0] == [moved]

    async def test_a_change_applies_once(self, journal: Journal) -> None:
        row = await journal.insert(make_row())
        change = claim(row)
        assert await journal.apply(change) is True
        assert await journal.apply(change) is False
        assert len(await journal.history(row.id)) == 2

    async def test_one_change_twice_at_once_applies_once(self, journal: Journal) -> None:
        rows = [await journal.insert(make_row()) for _ in range(5)]
        changes = [claim(row) for row in rows for _ in range(2)]
        results: dict[int, bool] = {}

        async def apply(i: int) -> None:
            results[i] = await journal.apply(changes[i])

        async with anyio.create_task_group() as tg:  # both copies may share one write
            for i in range(len(changes)):
                tg.start_soon(apply, i)
        for n, row in enumerate(rows):
            assert sorted([results[2 * n], results[2 * n + 1]]) == [False, True]
            assert [(h.source, h.target) for h in await journal.history(row.id)] == [
                (None, P),
                (P, R),
            ]

    async def test_failure_is_recorded_with_its_error(self, journal: Journal) -> None:
        running = await self.running(journal)
        error = json.dumps({"type": "ValueError", "message": "bad", "traceback": None})
        failed = await applied(journal, finish(running, F, error_json=error))
        assert (failed.status, failed.error_json, failed.owner) == (F, error, None)
        last = (await journal.history(running.id))[-1]
        assert (last.source, last.target) == (R, F)
        assert last.error is not None
        assert (last.error.type, last.error.message) == ("ValueError", "bad")

    async def test_requeue_resets_a_finished_task(self, journal: Journal) -> None:
        running = await self.running(journal, key="k")
        failed = await applied(journal, finish(running, F, error_json='{"type":"E","message":"m"}'))
        requeue = Change(
            failed.id, failed.version, F, P, 0, time.time(), None,
            {"attempts": 0, "error_json": None, "result_json": None, "finished_at": None},
        )  # fmt: skip
        again = await applied(journal, requeue)
        assert (again.status, again.attempts, again.error_json, again.finished_at) == (
            P, 0, None, None,
        )  # fmt: skip
        assert (await journal.insert(make_row(key="k"))).id == again.id

    @pytest.mark.parametrize("name", ["status", "version", "id", "rev", "nope", "x = 1; --"])
    async def test_apply_refuses_fields_that_are_not_settable(
        self, journal: Journal, name: str
    ) -> None:
        row = await journal.insert(make_row())
        change = claim(row)
        change.fields[name] = 1
        with pytest.raises(ValueError, match="field"):
            await journal.apply(change)
        assert await journal.get(row.id) == row

    async def test_fencing_rejects_a_late_outcome(self, journal: Journal, peer: Journal) -> None:
        now = time.time()
        row = await journal.insert(make_row())
        mine = await applied(journal, claim(row, OWNER, lease=1.0, now=now - 10))
        back = await applied(peer, takeover(mine, PEER, now))
        assert (back.status, back.recoveries, back.owner, back.lease_until) == (P, 1, None, None)
        theirs = await applied(peer, claim(back, PEER))
        assert await journal.apply(finish(mine)) is False  # the stalled owner comes back
        done = await applied(peer, finish(theirs))
        assert done.status is C
        targets = [(h.source, h.target) for h in await journal.history(row.id)]
        assert targets == [(None, P), (P, R), (R, P), (P, R), (R, C)]

    async def test_two_journals_claim_one_row_exactly_once(
        self, journal: Journal, peer: Journal
    ) -> None:
        rows = [await journal.insert(make_row()) for _ in range(10)]
        wins: list[tuple[str, str]] = []

        async def take(j: Journal, owner: str, row: TaskRow) -> None:
            if await j.apply(claim(row, owner)):
                wins.append((row.id, owner))

        async with anyio.create_task_group() as tg:
            for row in rows:
                for _ in range(3):
                    tg.start_soon(take, journal, OWNER, row)
                    tg.start_soon(take, peer, PEER, row)
        assert sorted(w[0] for w in wins) == sorted(r.id for r in rows)
        for row in rows:
            stored = await peer.get(row.id)
            assert stored is not None
            assert (stored.status, stored.version) == (R, 1)
            assert (row.id, stored.owner) in wins

    async def test_many_concurrent_applies(self, journal: Journal) -> None:
        rows = [await journal.insert(make_row()) for _ in range(50)]

        async def run(row: TaskRow) -> None:
            assert await journal.apply(claim(row)) is True
            claimed = dataclasses.replace(row, status=R, version=1, attempts=1, owner=OWNER)
            assert await journal.apply(finish(claimed, result_json="42")) is True
            done = await journal.get(row.id)
            assert done is not None
            assert (done.status, done.result_json, done.version) == (C, "42", 2)

        async with anyio.create_task_group() as tg:
            for row in rows:
                tg.start_soon(run, row)
        assert (await journal.counts())[C] == 50

    async def test_a_claim_another_journal_won_does_not_apply_beside_others(
        self, journal: Journal, peer: Journal
    ) -> None:
        """A stale claim sharing a write batch with a good one: only the good one applies,
        and the winner's history line stays (a set-based write must not mistake a row
        another process moved to ``version + 1`` for its own)."""
        taken = await journal.insert(make_row())
        free = await journal.insert(make_row())
        await applied(peer, claim(taken, PEER))
        results: dict[str, bool] = {}

        async def attempt(row: TaskRow) -> None:
            results[row.id] = await journal.apply(claim(row))

        async with anyio.create_task_group() as tg:  # one batch: both wait on one commit
            tg.start_soon(attempt, taken)
            tg.start_soon(attempt, free)
        assert results == {taken.id: False, free.id: True}
        stored = await journal.get(taken.id)
        assert stored is not None
        assert (stored.owner, stored.version) == (PEER, 1)
        lines = await journal.history(taken.id)
        assert [(line.target, line.owner) for line in lines][-1] == (R, PEER)

    # ------------------------------------------------------------------ cancel / progress

    async def test_request_cancel_reaches_only_running_rows(
        self, journal: Journal, peer: Journal
    ) -> None:
        pending = await journal.insert(make_row())
        assert await peer.request_cancel(pending.id) is None
        assert await peer.request_cancel("nope") is None
        running = await self.running(journal)
        _, cursor = await journal.changes(0, OWNER)
        asked = await peer.request_cancel(running.id)
        assert asked is not None
        assert asked.cancel_requested is True
        assert asked.version == running.version  # not a transition
        seen, _ = await journal.changes(cursor, OWNER)
        assert [(r.id, r.cancel_requested) for r in seen] == [(running.id, True)]
        cancelled = await applied(journal, finish(asked, X))
        assert cancelled.cancel_requested is False
        assert await peer.request_cancel(running.id) is None

    @pytest.mark.parametrize("target", [C, F, Y, P, X])
    async def test_leaving_running_clears_the_cancel_request(
        self, journal: Journal, target: TaskStatus
    ) -> None:
        running = await self.running(journal)
        asked = await journal.request_cancel(running.id)
        assert asked is not None
        after = await applied(journal, finish(asked, target))
        assert (after.status, after.cancel_requested) == (target, False)

    async def test_progress_of_the_current_attempt_only(self, journal: Journal) -> None:
        running = await self.running(journal)
        await journal.set_progress(running.id, PEER, running.version, '{"fraction": 0.1}')
        await journal.set_progress(running.id, OWNER, running.version - 1, '{"fraction": 0.2}')
        await journal.set_progress(running.id, OWNER, running.version, '{"fraction": 0.5}')
        await journal.renew(OWNER, time.time() + 30)  # an awaited write after the progress
        stored = await journal.get(running.id)
        assert stored is not None
        assert stored.progress_json == '{"fraction": 0.5}'
        assert stored.version == running.version
        pending = await journal.insert(make_row())
        await journal.set_progress(pending.id, OWNER, pending.version, "{}")
        await journal.renew(OWNER, time.time() + 30)
        assert await journal.get(pending.id) == pending

    async def test_close_flushes_progress(
        self, journal_factory: Callable[[], Journal], anyio_backend: object
    ) -> None:
        journal = journal_factory()
        await journal.open(OWNER)
        running = await self.running(journal)
        async with anyio.create_task_group() as tg:
            tg.start_soon(journal.renew, OWNER, time.time() + 30)
            await anyio.lowlevel.checkpoint()
            await journal.set_progress(running.id, OWNER, running.version, '"p"')
        await journal.close()
        again = journal_factory()
        await again.open(OWNER)
        try:
            stored = await again.get(running.id)
            assert stored is not None
            assert stored.progress_json == '"p"'
        finally:
            await again.close()

    # ------------------------------------------------------------------ leases

    async def test_renew_extends_own_running_rows(self, journal: Journal, peer: Journal) -> None:
        mine = await self.running(journal, OWNER)
        theirs = await self.running(peer, PEER)
        pending = await journal.insert(make_row())
        _, cursor = await peer.changes(0, PEER)
        until = time.time() + 1000
        await journal.renew(OWNER, until)
        got_mine, got_theirs = await journal.get(mine.id), await journal.get(theirs.id)
        assert got_mine is not None
        assert got_theirs is not None
        assert (got_mine.lease_until, got_mine.version) == (until, mine.version)
        assert got_theirs.lease_until == theirs.lease_until
        assert await journal.get(pending.id) == pending
        assert (await peer.changes(cursor, PEER))[0] == []  # a heartbeat is not a change

    async def test_now_is_the_journals_own_clock(self, journal: Journal) -> None:
        """``ClockedJournal``: epoch seconds that go forward (here, on one machine, close
        to this process's clock)."""
        if not _capable(journal, ClockedJournal):
            return  # checked: it offers none of it
        assert isinstance(journal, ClockedJournal)
        first = await journal.now()
        await anyio.sleep(0.01)
        second = await journal.now()
        assert first < second
        assert abs(second - time.time()) < 60

    async def test_orphaned_lists_the_running_rows_of_a_dead_owner(
        self, journal: Journal, peer: Journal
    ) -> None:
        """``LivenessJournal``: while an owner's journal is open its rows are not
        orphaned, whatever their lease; once it is closed (its process or session gone)
        they are, for the others, and never for the owner itself."""
        if not _capable(peer, LivenessJournal):
            return  # checked: it offers none of it
        assert isinstance(peer, LivenessJournal)
        assert isinstance(journal, LivenessJournal)
        mine = await self.running(journal, OWNER, lease=1, now=time.time() - 100)
        theirs = await self.running(peer, PEER)
        assert await peer.orphaned() == []
        assert await journal.orphaned() == []  # its own are never orphaned
        await journal.close()  # the owner goes away
        with anyio.fail_after(10):  # a journal may wait for its own view to settle
            while True:
                found = await peer.orphaned()
                if found:
                    break
                await anyio.sleep(0.1)
        assert [r.id for r in found] == [mine.id]
        assert await peer.get(theirs.id) == theirs  # a read: nothing changed
        assert peer.orphan_grace >= 0

    async def test_expired_lists_running_rows_whose_lease_ended(
        self, journal: Journal, peer: Journal
    ) -> None:
        now = time.time()
        stale = await self.running(journal, lease=1, now=now - 100)
        older = await self.running(journal, lease=1, now=now - 100)
        ends_now = await self.running(journal, lease=0, now=now)
        live = await self.running(journal)
        await journal.insert(make_row())
        assert await peer.expired(now) == [stale, older]  # oldest first; "before": not at
        assert await journal.expired(now + 1) == [stale, older, ends_now]
        assert await journal.expired(now - 1000) == []
        assert await journal.get(live.id) == live  # a read: nothing changed
        assert await journal.get(stale.id) == stale

    async def test_a_takeover_applies_only_to_a_lease_not_renewed(
        self, journal: Journal, peer: Journal
    ) -> None:
        now = time.time()
        stale = await self.running(journal, lease=1, now=now - 100)
        [seen] = await peer.expired(now)
        await journal.renew(OWNER, now + 30)  # the owner's heartbeat comes first
        assert await peer.apply(takeover(seen, PEER, now)) is False
        renewed = await journal.get(stale.id)
        assert renewed is not None
        assert (renewed.status, renewed.version, renewed.lease_until) == (R, 1, now + 30)
        assert len(await journal.history(stale.id)) == 2
        assert await peer.expired(now) == []
        back = await applied(peer, takeover(renewed, PEER, now + 31))
        assert (back.status, back.recoveries, back.owner, back.lease_until) == (P, 1, None, None)
        lines = await journal.history(stale.id)
        assert [(h.source, h.target, h.attempt, h.owner) for h in lines] == [
            (None, P, 0, None), (P, R, 1, OWNER), (R, P, 1, PEER),
        ]  # fmt: skip
        assert abs(lines[-1].at.timestamp() - (now + 31)) < 1e-3

    async def test_takeovers_share_a_batch_with_other_changes(
        self, journal: Journal, peer: Journal
    ) -> None:
        """Started together, so that a journal that batches writes puts them in one."""
        now = time.time()
        dead = [await self.running(journal, lease=1, now=now - 9) for _ in range(3)]
        pending = [await journal.insert(make_row()) for _ in range(3)]
        alive = await self.running(journal, lease=60, now=now)
        changes = [takeover(row, PEER, now) for row in dead]
        changes.append(takeover(alive, PEER, now))  # its lease has not ended: refused
        changes += [claim(row, PEER) for row in pending[1:]]
        stale = claim(pending[0], PEER)
        stale.version += 1  # refused
        changes.append(stale)
        results: dict[int, bool] = {}

        async def apply(i: int) -> None:
            results[i] = await peer.apply(changes[i])

        async with anyio.create_task_group() as tg:
            for i in range(len(changes)):
                tg.start_soon(apply, i)
        expected = [True, True, True, False, True, True, False]
        assert [results[i] for i in range(len(changes))] == expected
        for row in dead:
            stored = await journal.get(row.id)
            assert stored is not None
            assert (stored.status, stored.version, stored.recoveries) == (P, 2, 1)
            assert len(await journal.history(row.id)) == 3
        assert await journal.get(alive.id) == alive
        assert await journal.get(pending[0].id) == pending[0]

    async def test_requeue_into_a_key_another_task_holds_is_an_invalid_transition(
        self, journal: Journal
    ) -> None:
        first = await journal.insert(make_row(key="k"))
        cancelled = await applied(journal, finish(first, X))
        second = await journal.insert(make_row(key="k"))
        assert second.id != first.id
        requeue = Change(cancelled.id, cancelled.version, X, P, 0, time.time(), None)
        with pytest.raises(InvalidTransition, match="another unfinished task holds the key"):
            await journal.apply(requeue)
        assert await journal.get(cancelled.id) == cancelled
        await applied(journal, finish(second, X))
        await applied(journal, requeue)  # the key is free again

    # ------------------------------------------------------------------ ClaimingJournal

    @staticmethod
    def claimed_row(owner: str = OWNER, **overrides: Any) -> TaskRow:
        """A new row as a manager with an idle worker makes it before ``insert_claimed``."""
        now = time.time()
        values: dict[str, Any] = {
            "status": R, "version": 1, "attempts": 1, "owner": owner, "started_at": now,
            "lease_until": now + 30,
        }  # fmt: skip
        values.update(overrides)
        return make_row(**values)

    async def test_insert_claimed_stores_the_row_with_two_history_lines(
        self, journal: Journal, peer: Journal
    ) -> None:
        if not _capable(journal, ClaimingJournal):
            return  # checked: it offers none of it
        assert isinstance(journal, ClaimingJournal)
        _, cursor = await peer.changes(0, PEER)
        rows = [
            self.claimed_row(),
            self.claimed_row(options_json='{"timeout": 5}', priority=3, queue="q"),
            self.claimed_row(lease_until=None, args_json="[0]"),
        ]
        stored: dict[str, TaskRow] = {}

        async def insert(row: TaskRow) -> None:
            stored[row.id] = await journal.insert_claimed(row)

        async with anyio.create_task_group() as tg:  # a batching journal: one batch
            for row in rows:
                tg.start_soon(insert, row)
        for row in rows:
            assert stored[row.id] == row
            assert await peer.get(row.id) == row  # every column, NULLs included
            lines = await peer.history(row.id)
            assert [(h.source, h.target, h.attempt, h.owner) for h in lines] == [
                (None, P, 0, OWNER),
                (P, R, 1, OWNER),
            ]
            assert [h.at.timestamp() for h in lines] == pytest.approx(
                [row.created_at, row.started_at]
            )
        seen, _ = await peer.changes(cursor, PEER)
        assert {r.id for r in seen} == {r.id for r in rows}
        done = await applied(journal, finish(rows[0], result_json="1"))  # at version 1
        assert (done.status, done.version) == (C, 2)

    async def test_insert_claimed_with_the_key_of_a_live_task_stores_nothing(
        self, journal: Journal
    ) -> None:
        if not _capable(journal, ClaimingJournal):
            return  # checked: it offers none of it
        assert isinstance(journal, ClaimingJournal)
        live = await journal.insert(make_row(key="k"))
        again = self.claimed_row(key="k")
        assert (await journal.insert_claimed(again)).id == live.id
        assert await journal.get(again.id) is None
        assert await journal.history(again.id) == []
        fresh = self.claimed_row(key="other")
        assert await journal.insert_claimed(fresh) == fresh
        assert await journal.get(fresh.id) == fresh
        assert len(await journal.history(fresh.id)) == 2
        assert (await journal.insert(make_row(key="other"))).id == fresh.id  # RUNNING: live

    # ------------------------------------------------------------------ BatchingJournal

    async def test_apply_soon_settles_each_change_once(self, journal: Journal) -> None:
        if not _capable(journal, BatchingJournal):
            return  # checked: it offers none of it
        assert isinstance(journal, BatchingJournal)
        rows = [await self.running(journal) for _ in range(3)]
        first = await journal.insert(make_row(key="k"))
        cancelled = await applied(journal, finish(first, X))
        await journal.insert(make_row(key="k"))
        settled: dict[str, list[tuple[bool, BaseException | None]]] = {}
        all_settled = anyio.Event()

        def settle(label: str) -> Callable[[bool, BaseException | None], None]:
            def record(ok: bool, error: BaseException | None) -> None:
                settled.setdefault(label, []).append((ok, error))
                if len(settled) == 4:
                    all_settled.set()

            return record

        stale = dataclasses.replace(rows[1], version=0)
        calls = [
            (finish(rows[0], result_json="1"), "good"),
            (finish(stale), "stale"),
            (Change(cancelled.id, cancelled.version, X, P, 0, time.time(), None), "key taken"),
            (finish(rows[2], F, error_json=None), "also good"),
        ]
        leads = [journal.apply_soon(change, settle(label)) for change, label in calls]
        async with anyio.create_task_group() as tg:
            for lead in leads:
                if lead is not None:
                    tg.start_soon(_wait, lead)
        with anyio.fail_after(10):
            await all_settled.wait()
        await anyio.sleep(0.05)  # nothing is settled twice
        assert settled["good"] == [(True, None)]
        assert settled["stale"] == [(False, None)]
        assert settled["also good"] == [(True, None)]
        [(ok, error)] = settled["key taken"]
        assert ok is False
        assert isinstance(error, InvalidTransition)
        done = await journal.get(rows[0].id)
        assert done is not None
        assert (done.status, done.result_json) == (C, "1")
        untouched = await journal.get(rows[1].id)
        assert untouched == rows[1]
        assert await journal.get(cancelled.id) == cancelled

        bad = finish(rows[1])
        bad.fields["nope"] = 1
        with pytest.raises(ValueError, match="field"):
            journal.apply_soon(bad, settle("bad"))
        await anyio.sleep(0.05)
        assert "bad" not in settled

    # ------------------------------------------------------------------ NotifyingJournal

    async def test_wait_for_changes_wakes_on_another_owners_write(
        self, journal: Journal, peer: Journal
    ) -> None:
        if not _capable(journal, NotifyingJournal):
            return  # checked: it offers none of it
        assert isinstance(journal, NotifyingJournal)
        with anyio.fail_after(1):
            await journal.wait_for_changes(0)
            await journal.wait_for_changes(-1)
        with anyio.fail_after(5):  # may return early (while it sets up), never late
            await journal.wait_for_changes(0.2)
        with anyio.fail_after(5):  # until a wait really waits: its notifications are on
            while True:
                started = time.monotonic()
                await journal.wait_for_changes(0.2)
                if time.monotonic() - started >= 0.15:
                    break
        woke: list[float] = []

        async def wait() -> None:
            started = time.monotonic()
            await journal.wait_for_changes(30)
            woke.append(time.monotonic() - started)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(wait)
                await anyio.sleep(0.1)
                await peer.insert(make_row())
        assert len(woke) == 1
        with anyio.fail_after(5):  # cancelling a wait ends it at once
            with anyio.move_on_after(0.1):
                await journal.wait_for_changes(30)

    # ------------------------------------------------------------------ InspectableJournal

    async def test_periodic_state_advances_from_the_version_seen(
        self, journal: Journal, peer: Journal
    ) -> None:
        if not _capable(journal, PeriodicJournal):
            return  # checked: it offers none of it
        assert isinstance(journal, PeriodicJournal)
        assert isinstance(peer, PeriodicJournal)
        assert await journal.periodic() == []
        first = PeriodicRow("nightly", "cron 0 3 * * * (UTC)", 100.0, 200.0, None, 1)
        assert await journal.advance_periodic(first, None) is True
        assert await peer.advance_periodic(first, None) is False  # created once
        assert await peer.periodic() == [first]
        _, cursor = await peer.changes(0, PEER)
        task = make_row(name="nightly", key="periodic:nightly:200", scheduled_at=200.0)
        fired = PeriodicRow("nightly", first.schedule, 200.0, 300.0, task.id, 2)
        assert await journal.advance_periodic(fired, task) is True
        assert await journal.advance_periodic(fired, make_row()) is False  # stale now
        assert await journal.get(task.id) == task
        assert [(h.source, h.target) for h in await journal.history(task.id)] == [(None, P)]
        seen, _ = await peer.changes(cursor, PEER)
        assert [r.id for r in seen] == [task.id]  # others see the tick's task
        skipped = PeriodicRow("nightly", first.schedule, 300.0, 400.0, task.id, 3)
        assert await peer.advance_periodic(skipped, None) is True  # no task: a skipped tick
        other = PeriodicRow("hourly", "every 3600s", 0.0, 3600.0, None, 1)
        assert await peer.advance_periodic(other, None) is True
        assert await journal.periodic() == [other, skipped]
        assert (await journal.counts())[P] == 1

    async def test_one_tick_decided_by_two_journals_fires_once(
        self, journal: Journal, peer: Journal
    ) -> None:
        if not _capable(journal, PeriodicJournal):
            return
        assert isinstance(journal, PeriodicJournal)
        assert isinstance(peer, PeriodicJournal)
        base = PeriodicRow("poll", "every 1s", 10.0, 11.0, None, 1)
        assert await journal.advance_periodic(base, None)
        results: list[bool] = []

        async def fire(j: PeriodicJournal, row: TaskRow, v: int) -> None:
            state = PeriodicRow("poll", "every 1s", 10.0 + v, 11.0 + v, row.id, v)
            results.append(await j.advance_periodic(state, row))

        for version in range(2, 12):  # ten ticks, each written by both at once
            rows = [make_row(name="poll"), make_row(name="poll")]
            results.clear()

            async with anyio.create_task_group() as tg:
                tg.start_soon(fire, journal, rows[0], version)
                tg.start_soon(fire, peer, rows[1], version)
            assert sorted(results) == [False, True]
            stored = [r for r in rows if await journal.get(r.id) is not None]
            assert len(stored) == 1
            (state,) = await journal.periodic()
            assert (state.version, state.task_id) == (version, stored[0].id)
        assert (await journal.counts())[P] == 10

    async def test_a_tick_whose_task_fails_to_store_advances_nothing(
        self, journal: Journal
    ) -> None:
        if not _capable(journal, PeriodicJournal):
            return
        assert isinstance(journal, PeriodicJournal)
        base = PeriodicRow("job", "every 1s", 10.0, 11.0, None, 1)
        assert await journal.advance_periodic(base, None)
        taken = await journal.insert(make_row())
        clash = dataclasses.replace(make_row(), id=taken.id)  # the id of a stored task
        with pytest.raises(JournalError):
            await journal.advance_periodic(
                PeriodicRow("job", "every 1s", 11, 12, clash.id, 2), clash
            )
        assert await journal.periodic() == [base]

    async def test_counts_by_queue_finished_since_and_oldest(self, journal: Journal) -> None:
        if not _capable(journal, InspectableJournal):
            return  # checked: it offers none of it
        assert isinstance(journal, InspectableJournal)
        assert await journal.counts_by_queue() == {}
        assert await journal.finished_since(0) == {C: 0, F: 0, X: 0}
        assert await journal.oldest(P) is None
        first = await journal.insert(make_row(queue="mail"))
        second = await journal.insert(make_row(queue="mail"))
        await journal.insert(make_row(queue="img"))
        running = await applied(journal, claim(await journal.insert(make_row(queue="img"))))
        early = await applied(journal, finish(running))
        cut = time.time()
        await anyio.sleep(0.01)
        late = await applied(journal, finish(await applied(journal, claim(second)), F))
        retrying = await applied(
            journal, finish(await applied(journal, claim(await journal.insert(make_row()))), Y)
        )
        assert retrying.finished_at is not None  # RETRYING rows have one, but are not finished
        assert await journal.counts_by_queue() == {
            ("mail", P): 1, ("mail", F): 1, ("img", P): 1, ("img", C): 1, ("default", Y): 1,
        }  # fmt: skip
        assert await journal.finished_since(cut) == {C: 0, F: 1, X: 0}
        assert await journal.finished_since(0) == {C: 1, F: 1, X: 0}
        assert early.finished_at is not None
        assert late.finished_at is not None
        assert await journal.finished_since(late.finished_at + 1) == {C: 0, F: 0, X: 0}
        assert await journal.oldest(P) == first
        assert await journal.oldest(C) == early
        assert await journal.oldest(R) is None

    async def test_waiting_by_queue_tells_lock_waits_from_the_others(
        self, journal: Journal
    ) -> None:
        if not _capable(journal, InspectableJournal):
            return
        assert isinstance(journal, InspectableJournal)
        now = time.time()
        assert await journal.waiting_by_queue(now) == {}
        holder = await journal.insert(make_row(queue="q", lock="L"))
        await applied(journal, claim(holder))
        await journal.insert(make_row(queue="q", lock="L"))  # the lock is held
        await journal.insert(make_row(queue="q", lock="M"))  # free: first of its lock
        await journal.insert(make_row(queue="q", lock="M"))  # behind the one before
        await journal.insert(make_row(queue="q"))
        await journal.insert(make_row(queue="late", scheduled_at=now + 3600))  # not due
        assert await journal.waiting_by_queue(now + 1) == {"q": (2, 2)}

    # ------------------------------------------------------------------ queries

    async def test_list_newest_first_with_filters(self, journal: Journal) -> None:
        a = await journal.insert(make_row(queue="q1", name="n1"))
        b = await journal.insert(make_row(queue="q2", name="n1"))
        c = await journal.insert(make_row(queue="q1", name="n2"))
        d = await self.running(journal, queue="q1", name="n1")

        def ids(rows: list[TaskRow]) -> list[str]:
            return [r.id for r in rows]

        assert ids(await journal.list()) == [d.id, c.id, b.id, a.id]
        assert ids(await journal.list(limit=2)) == [d.id, c.id]
        assert ids(await journal.list(status=P)) == [c.id, b.id, a.id]
        assert ids(await journal.list(status=R)) == [d.id]
        assert ids(await journal.list(queue="q1")) == [d.id, c.id, a.id]
        assert ids(await journal.list(name="n1", queue="q1", status=P)) == [a.id]
        assert await journal.list(status=C) == []

    async def test_runnable_in_priority_order_with_a_cursor(
        self, journal: Journal, peer: Journal
    ) -> None:
        low = await journal.insert(make_row(priority=-1))
        first = await journal.insert(make_row(priority=5))
        second = await journal.insert(make_row(priority=5))
        mid = await journal.insert(make_row())
        await self.running(journal)
        retrying = await self.running(journal, priority=1)
        retrying = await applied(journal, finish(retrying, Y, finished_at=None))
        rows, cursor = await journal.runnable()
        assert [r.id for r in rows] == [first.id, second.id, retrying.id, mid.id, low.id]
        assert await journal.changes(cursor, "nobody") == ([], cursor)
        new = await peer.insert(make_row())
        seen, after = await journal.changes(cursor, OWNER)
        assert [r.id for r in seen] == [new.id]
        assert after > cursor

    async def test_changes_skip_the_caller_and_advance(
        self, journal: Journal, peer: Journal
    ) -> None:
        _, start = await journal.changes(0, OWNER)
        mine = await journal.insert(make_row())
        theirs = await peer.insert(make_row())
        seen, cursor = await journal.changes(start, OWNER)
        assert [r.id for r in seen] == [theirs.id]
        assert cursor > start
        assert await journal.changes(cursor, OWNER) == ([], cursor)
        claimed = await applied(peer, claim(mine, PEER))
        seen, cursor2 = await journal.changes(cursor, OWNER)
        assert seen == [claimed]
        assert cursor2 > cursor
        everything, _ = await journal.changes(start, "nobody")
        assert {r.id for r in everything} == {mine.id, theirs.id}
        assert (await peer.changes(start, PEER))[0] == []  # peer wrote both last

    async def test_counts_every_status(self, journal: Journal) -> None:
        assert await journal.counts() == dict.fromkeys(TaskStatus, 0)
        await journal.insert(make_row())
        await journal.insert(make_row())
        running = await self.running(journal)
        await applied(journal, finish(running))
        counts = await journal.counts()
        assert set(counts) == set(TaskStatus)
        assert (counts[P], counts[R], counts[C], counts[F]) == (2, 0, 1, 0)

    # ------------------------------------------------------------------ purge

    async def test_purge_deletes_old_finished_rows_in_batches(self, journal: Journal) -> None:
        old: list[str] = []
        for target in (C, F, X, C, C):
            running = await self.running(journal)
            done = await applied(journal, finish(running, target))
            old.append(done.id)
        cutoff = time.time() + 0.001
        await anyio.sleep(0.01)
        recent = await applied(journal, finish(await self.running(journal)))
        pending = await journal.insert(make_row())
        retrying = await self.running(journal)
        retrying = await applied(journal, finish(retrying, Y))  # finished_at set
        assert await journal.purge(cutoff, batch=2) == 5
        for task_id in old:
            assert await journal.get(task_id) is None
            assert await journal.history(task_id) == []
        for keep in (recent, pending, retrying):
            assert await journal.get(keep.id) is not None
            assert await journal.history(keep.id) != []
        assert await journal.purge(cutoff) == 0

    async def test_cursor_keeps_growing_after_purge(self, journal: Journal, peer: Journal) -> None:
        await applied(journal, finish(await self.running(journal)))
        _, cursor = await journal.changes(0, OWNER)
        assert await journal.purge(time.time() + 1) == 1
        new = await peer.insert(make_row())
        seen, after = await journal.changes(cursor, OWNER)
        assert [r.id for r in seen] == [new.id]
        assert after > cursor


async def _wait(awaitable: Awaitable[None]) -> None:
    await awaitable
