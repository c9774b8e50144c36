"""Journal faults on PostgreSQL, against a server of the test's own: restarted mid-run
(``-m fast`` and ``-m immediate``), its sessions terminated, and stopped for 10 s. Each
asserts what the fault contract promises: nothing accepted is lost, nothing completes
twice, no task is left unfinished in the live manager, and every awaiter returns."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from pgcluster import Cluster, cluster

from background_tasks import BackgroundTaskManager, JournalError, TaskStatus
from background_tasks.postgres import PostgresJournal

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

N = 24  # tasks in flight across the fault


@pytest.fixture(scope="module")
def server() -> Iterator[Cluster]:
    with cluster() as c:
        yield c


def _manager(dsn: str, marks: Path) -> BackgroundTaskManager:
    manager = BackgroundTaskManager(
        max_concurrency=8, journal=PostgresJournal(dsn, lease_timeout=3.0), poll_interval=0.1
    )

    @manager.task(name="work")
    async def work(n: int) -> int:
        await anyio.sleep(0.05 + (n % 5) * 0.05)
        fd = os.open(marks, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(n) + "\n").encode())
        finally:
            os.close(fd)
        return n

    return manager


async def _run_across(server: Cluster, tmp_path: Path, fault: str) -> dict[str, int]:
    """Submit N tasks, inflict ``fault`` while they run, then check everything."""
    marks = tmp_path / f"{fault}.jsonl"
    manager = _manager(server.dsn, marks)
    counts: dict[str, int] = {}
    async with manager:
        handles = [await manager.submit("work", i) for i in range(N)]
        await anyio.sleep(0.15)  # some running, some done, some queued
        if fault.startswith("restart-"):
            await anyio.to_thread.run_sync(server.restart, fault.removeprefix("restart-"))
        elif fault == "terminate":
            counts["terminated"] = await anyio.to_thread.run_sync(server.terminate_backends)
        elif fault == "stop-10s":
            await anyio.to_thread.run_sync(server.stop, "fast")
            with pytest.raises(JournalError), anyio.fail_after(15):  # within a few seconds
                await manager.submit("work", -1)
            await anyio.sleep(10)
            await anyio.to_thread.run_sync(server.start)
        results = []
        with anyio.fail_after(60):  # every awaiter returns
            for h in handles:
                results.append(await h)
        assert sorted(results) == list(range(N))
        with anyio.fail_after(30):
            while True:  # no task left unfinished in the live manager
                stats = manager.statistics()
                if stats.pending + stats.running + stats.retrying == 0:
                    break
                await anyio.sleep(0.05)
        records = {h.id: await manager.get(h.id) for h in handles}
        # the manager carries on by itself: a submit after the fault runs
        assert await (await manager.submit("work", N)) == N
    assert all(r is not None and r.status is TaskStatus.COMPLETED for r in records.values())
    ran = Counter(json.loads(line) for line in marks.read_text().splitlines())
    counts["completed"] = sum(1 for r in records.values() if r is not None)
    counts["ran twice"] = sum(1 for n, c in ran.items() if c > 1 and n < N)
    assert set(ran) >= set(range(N + 1))
    return counts


@pytest.mark.parametrize("fault", ["restart-fast", "restart-immediate", "terminate", "stop-10s"])
async def test_a_fault_strands_no_task(
    server: Cluster, tmp_path: Path, fault: str, anyio_backend: str
) -> None:
    counts = await _run_across(server, tmp_path, fault)
    assert counts["completed"] == N
    # One manager, alive throughout: a completion whose answer was lost is recognised,
    # not run again, and its own expired leases are not taken over.
    assert counts["ran twice"] == 0
    if fault == "terminate":
        assert counts["terminated"] >= 1


async def test_a_dead_owners_task_is_taken_over_within_2_s_not_after_its_lease(
    server: Cluster, tmp_path: Path, anyio_backend: str
) -> None:
    """An owner whose database session is gone (as when its process dies) loses its
    RUNNING task to a live manager within about 2 s, with a 30 s lease."""
    import time

    from background_tasks.testing import claim, make_row

    marks = tmp_path / "takeover.jsonl"
    heir = _manager(server.dsn, marks)
    heir.journal.lease_timeout = 30.0  # type: ignore[union-attr]
    async with heir:
        await anyio.sleep(2.5)  # past the heir's own settling after it connected
        dead = PostgresJournal(server.dsn, lease_timeout=30.0)
        await dead.open("dead-owner")
        row = await dead.insert(make_row(name="work", args_json="[7]", kwargs_json="{}"))
        assert await dead.apply(claim(row, "dead-owner", lease=30.0))
        await dead.close()  # its sessions end, as a crashed process's do
        gone = time.monotonic()
        with anyio.fail_after(20):  # well inside the 30 s lease
            assert await heir.handle(row.id) == 7
        took = time.monotonic() - gone
        history = [(h.source, h.target, h.owner) for h in await heir.history(row.id)]
    print(f"taken over {took:.2f} s after the session ended")  # for the record: pytest -s
    assert history[2] == (TaskStatus.RUNNING, TaskStatus.PENDING, heir.owner)
    assert took < 20


@pytest.mark.parametrize("skew", ["+120s", "-120s"])
def test_a_manager_whose_clock_is_off_starts_no_delayed_task_early(
    server: Cluster, tmp_path: Path, skew: str
) -> None:
    """A worker whose wall clock is two minutes off (``faketime``) runs the tasks another
    manager submits with ``delay=3``: it measures due times on the server's clock, so it
    starts them after about 3 s, neither at once (+120 s) nor two minutes late (-120 s)."""
    import glob
    import subprocess
    import sys
    import time

    from durability_apps.tasks import read_markers, register

    preload = sorted(glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1"))
    assert preload, "Debian's faketime package is needed (apt-get install faketime)"
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": f"{tests.parent}{os.pathsep}{tests}"}
    env.update(LD_PRELOAD=preload[0], FAKETIME=skew)
    markers = tmp_path / "markers.jsonl"
    schema = f"skew{(skew[0] == '+' and 'ahead') or 'behind'}"
    out = open(tmp_path / "worker.out", "wb")  # noqa: SIM115 - closed below
    worker = subprocess.Popen(
        [sys.executable, "-m", "durability_apps.worker", "--journal", server.dsn,
         "--schema", schema, "--label", "skewed", "--lease", "2", "--poll", "0.1"],
        stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while b'"ready"' not in (tmp_path / "worker.out").read_bytes():
            assert worker.poll() is None, (tmp_path / "worker.out").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)

        async def submit() -> tuple[float, str]:
            front = BackgroundTaskManager(
                journal=PostgresJournal(server.dsn, schema=schema), run_tasks=False
            )
            register(front, "front")
            async with front:
                started = time.monotonic()
                handle = await front.submit("mark", str(markers), delay=3)
                with anyio.fail_after(60):
                    label = await handle
                return time.monotonic() - started, label

        waited, label = anyio.run(submit)
    finally:
        worker.send_signal(15)
        worker.wait(30)
        out.close()
    assert label == "skewed"  # the skewed worker ran it
    assert 2.5 <= waited < 30, waited  # at its delay on the server's clock, loosely
    assert len(read_markers(markers)) == 1
