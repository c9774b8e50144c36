"""Journal faults on SQLite, with real processes and a real small disk: another process
holding the write lock past ``busy_timeout``, a full disk (a small tmpfs of the test's
own, filled and freed mid-run), and managers whose wall clock is two minutes off
(Debian's ``faketime``). Each asserts: nothing accepted is lost, nothing completes
twice, no task is left unfinished in the live manager, every awaiter returns."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from durability_apps.tasks import read_markers, register
from test_durability import Spawn, histories, spawn, steps

from background_tasks import BackgroundTaskManager, JournalError, SQLiteJournal

pytestmark = pytest.mark.slow
__all__ = ["spawn"]  # the fixture, shared with test_durability

N = 16


def _manager(path: Path, markers: Path, *, busy_timeout: float = 10.0) -> BackgroundTaskManager:
    manager = BackgroundTaskManager(
        max_concurrency=4,
        journal=SQLiteJournal(path, lease_timeout=2.0, busy_timeout=busy_timeout),
        poll_interval=0.1,
    )
    register(manager, "main")
    return manager


async def _all_done(manager: BackgroundTaskManager, handles: list[object]) -> list[object]:
    results = []
    with anyio.fail_after(60):  # every awaiter returns
        for h in handles:
            results.append(await h)  # type: ignore[misc]
        while True:  # no task left unfinished in the live manager
            stats = manager.statistics()
            if stats.pending + stats.running + stats.retrying == 0:
                return results
            await anyio.sleep(0.05)


def _ran_once(markers: Path, ids: list[str]) -> Counter[str]:
    starts = Counter(m["id"] for m in read_markers(markers) if m["event"] == "start")
    return Counter({i: starts[i] for i in ids})


def test_a_lock_held_past_the_busy_timeout_strands_no_task(tmp_path: Path) -> None:
    """Another process holds the write lock for 3 s, six times the busy timeout, while
    16 tasks are in flight: submit fails within seconds meanwhile, and afterwards every
    task has completed exactly once."""
    path, markers = tmp_path / "tasks.db", tmp_path / "markers.jsonl"
    holder = tmp_path / "hold.py"
    holder.write_text(
        "import sqlite3, sys, time\n"
        f"c = sqlite3.connect({str(path)!r}, isolation_level=None)\n"
        "c.execute('BEGIN IMMEDIATE')\n"
        "print('locked', flush=True)\n"
        "time.sleep(3)\n"
        "c.execute('COMMIT')\n"
    )

    async def main() -> tuple[list[str], list[object], bool]:
        manager = _manager(path, markers, busy_timeout=0.5)
        async with manager:
            handles = [await manager.submit("slow", str(markers), 0.3) for _ in range(N)]
            proc = await anyio.open_process(["python3", str(holder)])
            try:
                assert proc.stdout is not None
                assert (await proc.stdout.receive()).strip() == b"locked"
                refused = False
                with anyio.fail_after(10):  # within seconds, not for ever
                    try:
                        await manager.submit("slow", str(markers), 0.0)
                    except JournalError:
                        refused = True
                results = await _all_done(manager, handles)
            finally:
                with anyio.fail_after(10):
                    await proc.wait()
            return [h.id for h in handles], results, refused  # type: ignore[attr-defined]

    ids, results, refused = anyio.run(main)
    assert refused
    assert results == ["main"] * N
    assert set(_ran_once(markers, ids).values()) == {1}


@contextlib.contextmanager
def _small_disk(size: str = "3m") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted for the test, unmounted and removed after it."""
    where = Path(tempfile.mkdtemp(prefix="bgtasks-disk-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                   check=True, capture_output=True)  # fmt: skip
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True)
        shutil.rmtree(where, ignore_errors=True)


def _fill(disk: Path) -> Path:
    filler = disk / "filler"
    with open(filler, "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
    return filler


def test_a_full_disk_strands_no_task_and_the_next_start_works(tmp_path: Path) -> None:
    """The journal's disk fills while tasks run: submit fails with JournalError, the
    tasks in flight wait for their writes; once space is freed every task completes
    exactly once, and a restart opens the journal (the WAL did not keep the space)."""
    markers = tmp_path / "markers.jsonl"  # on the big disk: the evidence must survive
    with _small_disk() as disk:
        path = disk / "tasks.db"

        async def main() -> tuple[list[str], list[object], bool]:
            manager = _manager(path, markers)
            async with manager:
                handles = [await manager.submit("slow", str(markers), 0.2) for _ in range(N)]
                filler = await anyio.to_thread.run_sync(_fill, disk)
                refused = False
                with anyio.fail_after(30):
                    while not refused:  # a write that needs a new page meets the full disk
                        try:
                            await manager.submit("slow", str(markers), 0.0, key="x" * 2000)
                        except JournalError:
                            refused = True
                await anyio.sleep(1.0)  # tasks in flight meet it too
                filler.unlink()
                results = await _all_done(manager, handles)
            async with _manager(path, markers) as again:  # the next start
                assert (await again.get(handles[0].id)) is not None
            return [h.id for h in handles], results, refused

        ids, results, refused = anyio.run(main)
    assert refused
    assert results == ["main"] * N
    assert set(_ran_once(markers, ids).values()) == {1}


@pytest.mark.parametrize("skew", ["+120s", "-120s"])
def test_a_manager_whose_clock_is_off_takes_no_live_task(
    tmp_path: Path, spawn: Spawn, skew: str
) -> None:
    """A manager in a process whose wall clock is two minutes off (``faketime``) shares
    the journal with one whose clock is right, both with 1 s leases: neither takes the
    other's heart-beating tasks; each task runs once, where it was claimed."""
    path, markers = tmp_path / "tasks.db", tmp_path / "markers.jsonl"
    preload = sorted(glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1"))
    assert preload, "Debian's faketime package is needed (apt-get install faketime)"
    # env(1) execs: the worker itself gets the signals (faketime(1) would fork)
    clock = ["env", f"LD_PRELOAD={preload[0]}", f"FAKETIME={skew}"]
    theirs = json.dumps([{"name": "slow", "args": [str(markers), 3.0]}] * 2)
    skewed = spawn(
        path, "--lease", 1.0, "--poll", 0.1, "--submit", theirs, name="skewed", prefix=clock
    )
    skewed.wait_event("ready")
    their_ids = [e["id"] for e in skewed.wait_event_all("accepted", 2)]

    async def main() -> list[str]:
        manager = BackgroundTaskManager(
            max_concurrency=2, journal=SQLiteJournal(path, lease_timeout=1.0), poll_interval=0.1
        )
        register(manager, "right")
        async with manager:
            handles = [await manager.submit("slow", str(markers), 3.0) for _ in range(4)]
            with anyio.fail_after(30):  # the skewed owner's lease says how far off it is
                while True:
                    row = await manager.journal.get(their_ids[0])  # type: ignore[union-attr]
                    if row is not None and row.lease_until is not None:
                        break
                    await anyio.sleep(0.05)
            off.append(row.lease_until - 1.0 - time.time())  # its lease: its clock + 1 s
            with anyio.fail_after(60):
                for h in handles:
                    await h
                for task_id in their_ids:
                    await manager.handle(task_id)
            return [h.id for h in handles]

    off: list[float] = []
    ids = anyio.run(main)
    assert abs(off[0]) > 100  # the other process's clock really is two minutes off
    ids += their_ids
    skewed.send(15)
    assert skewed.wait() == 0
    assert set(_ran_once(markers, ids).values()) == {1}
    for task_id in ids:  # claimed once, completed by that owner: no takeover line
        assert ("running", "pending") not in steps(histories(path)[task_id])
