"""SQLiteJournal on files it cannot use: a clear JournalError, and the file left as it was.

Tests run as root, which ignores file modes, so "read-only" is a read-only bind mount in a
private mount namespace (``unshare -m``), and "disk full" is ``RLIMIT_FSIZE`` in a child.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import pytest

from background_tasks import (
    BackgroundTaskManager,
    ManagerNotRunning,
    RetryPolicy,
    TaskFailed,
    TaskHandle,
    TaskStatus,
)
from background_tasks._errors import JournalError
from background_tasks.journal.sqlite import SCHEMA_VERSION, SQLiteJournal
from background_tasks.testing import OWNER, make_row

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[1]


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


async def _open_fails(path: Path | str, match: str) -> JournalError:
    journal = SQLiteJournal(path)
    with pytest.raises(JournalError, match=match) as info:
        await journal.open(OWNER)
    assert str(path) in str(info.value)
    await journal.close()  # still safe
    return info.value


async def _make_journal(path: Path, rows: int = 3) -> list[str]:
    journal = SQLiteJournal(path)
    await journal.open(OWNER)
    ids = [(await journal.insert(make_row())).id for _ in range(rows)]
    await journal.close()
    return ids


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # a subprocess test: the child's
# loop is what is tested, so one backend for the parent is enough
async def test_garbage_file_is_not_a_database(tmp_path: Path, anyio_backend: object) -> None:
    path = tmp_path / "tasks.db"
    path.write_bytes(os.urandom(8192))
    before = _snapshot(tmp_path)
    error = await _open_fails(path, "not an SQLite database")
    assert isinstance(error.__cause__, sqlite3.DatabaseError)
    assert _snapshot(tmp_path) == before


async def test_text_file_is_not_a_database(tmp_path: Path, anyio_backend: object) -> None:
    path = tmp_path / "tasks.db"
    path.write_text("name,queue\nsend,default\n" * 100)
    before = _snapshot(tmp_path)
    await _open_fails(path, "not an SQLite database")
    assert _snapshot(tmp_path) == before


async def test_corrupt_pages_raise_journal_error(tmp_path: Path, anyio_backend: object) -> None:
    path = tmp_path / "tasks.db"
    await _make_journal(path, rows=50)
    data = bytearray(path.read_bytes())
    data[4096:] = os.urandom(len(data) - 4096)  # keep the header page, ruin the rest
    path.write_bytes(bytes(data))
    journal = SQLiteJournal(path)

    async def use() -> None:
        try:
            await journal.open(OWNER)
            await journal.list()
            await journal.runnable()
        finally:
            await journal.close()

    with pytest.raises(JournalError, match=str(path)):
        await use()


async def test_newer_schema_is_refused_untouched(tmp_path: Path, anyio_backend: object) -> None:
    path = tmp_path / "tasks.db"
    await _make_journal(path)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (SCHEMA_VERSION + 1,))
    conn.close()
    before = _snapshot(tmp_path)
    await _open_fails(path, f"schema version {SCHEMA_VERSION + 1} is newer")
    assert _snapshot(tmp_path) == before


async def test_other_sqlite_database_is_left_alone(tmp_path: Path, anyio_backend: object) -> None:
    path = tmp_path / "app.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    conn.close()
    before = _snapshot(tmp_path)
    await _open_fails(path, "not a background_tasks journal")
    assert _snapshot(tmp_path) == before


async def test_directory_is_refused(tmp_path: Path, anyio_backend: object) -> None:
    await _open_fails(tmp_path, "is a directory")


async def test_missing_directory_is_refused(tmp_path: Path, anyio_backend: object) -> None:
    await _open_fails(tmp_path / "nope" / "tasks.db", "does not exist")
    assert not (tmp_path / "nope").exists()


async def test_create_false_refuses_a_missing_file(tmp_path: Path, anyio_backend: object) -> None:
    path = tmp_path / "tasks.db"
    journal = SQLiteJournal(path, create=False)
    with pytest.raises(JournalError, match="no such file"):
        await journal.open(OWNER)
    assert not path.exists()
    ids = await _make_journal(path)
    journal = SQLiteJournal(path, create=False)
    await journal.open(OWNER)
    try:
        assert [r.id for r in await journal.list()] == ids[::-1]
    finally:
        await journal.close()


async def test_empty_file_becomes_a_journal(tmp_path: Path, anyio_backend: object) -> None:
    path = tmp_path / "tasks.db"
    path.touch()
    assert len(await _make_journal(path)) == 3


# --------------------------------------------------------------------------- children


def _child(
    code: str, *args: str, prefix: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [*(prefix or []), sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip


_OPEN_CHILD = """
    import sys, anyio
    from background_tasks.journal.sqlite import SQLiteJournal
    from background_tasks._errors import JournalError

    async def main():
        journal = SQLiteJournal(sys.argv[1])
        try:
            await journal.open("child")
        except JournalError as exc:
            print("JournalError:", exc)
        else:
            print("opened")
        finally:
            await journal.close()

    anyio.run(main)
"""


def _read_only_prefix(directory: Path) -> list[str]:
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is needed for the read-only mount test")
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
    prefix = ["unshare", "-m", "sh", "-c", script, str(directory)]
    probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=30, check=False)
    if probe.returncode != 0:
        pytest.fail(f"cannot make a read-only mount here: {probe.stderr!r}")
    return prefix


@pytest.mark.slow
async def test_read_only_journal_is_refused_untouched(
    tmp_path: Path, anyio_backend: object
) -> None:
    directory = tmp_path / "ro"
    directory.mkdir()
    path = directory / "tasks.db"
    await _make_journal(path)
    before = _snapshot(directory)
    result = _child(_OPEN_CHILD, str(path), prefix=_read_only_prefix(directory))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("JournalError:"), result.stdout
    assert str(path) in result.stdout
    assert "read-only" in result.stdout or "not writable" in result.stdout
    assert _snapshot(directory) == before
    missing = _child(_OPEN_CHILD, str(directory / "new.db"), prefix=_read_only_prefix(directory))
    assert missing.stdout.startswith("JournalError:"), missing.stdout + missing.stderr
    assert not (directory / "new.db").exists()


_DISK_FULL_CHILD = """
    import json, resource, signal, sys, anyio
    from background_tasks.journal.sqlite import SQLiteJournal
    from background_tasks._errors import JournalError
    from background_tasks.testing import make_row

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    path, limit, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]

    async def main():
        journal = SQLiteJournal(path)
        if mode == "open":
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        try:
            await journal.open("child")
        except JournalError as exc:
            print(json.dumps({"open_error": str(exc)}))
            return
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        acked, errors = [], []

        async def submit():
            while not errors:
                row = make_row(args_json=json.dumps(["x" * 2000]))
                try:
                    acked.append((await journal.insert(row)).id)
                except JournalError as exc:
                    errors.append(str(exc))

        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(submit)
        await journal.close()
        print(json.dumps({"acked": acked, "error": errors[0]}))

    anyio.run(main)
"""


@pytest.mark.slow
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # a subprocess test: the child's
# loop is what is tested, so one backend for the parent is enough
async def test_disk_full_loses_nothing_acknowledged(tmp_path: Path, anyio_backend: object) -> None:
    path = tmp_path / "tasks.db"
    earlier = await _make_journal(path, rows=5)
    result = _child(_DISK_FULL_CHILD, str(path), str(512 * 1024), "write")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert str(path) in report["error"]
    assert len(report["acked"]) > 20
    journal = SQLiteJournal(path)
    await journal.open(OWNER)
    try:
        stored = {r.id for r in await journal.list(limit=100_000)}
        assert set(earlier) <= stored
        assert set(report["acked"]) <= stored
        await journal.insert(make_row())  # and the journal is usable again
    finally:
        await journal.close()


@pytest.mark.slow
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # a subprocess test: the child's
# loop is what is tested, so one backend for the parent is enough
async def test_disk_full_at_open(tmp_path: Path, anyio_backend: object) -> None:
    path = tmp_path / "tasks.db"
    result = _child(_DISK_FULL_CHILD, str(path), "0", "open")
    assert result.returncode == 0, result.stderr
    error = json.loads(result.stdout)["open_error"]
    assert str(path) in error
    assert "disk" in error


async def test_a_result_that_json_cannot_hold_fails_its_task_and_nothing_else(
    tmp_path: Path,
) -> None:
    """A registered task whose return value JSON cannot hold: its task FAILED with a
    SerializationError naming it, not retried, kept across a restart; the writer and the
    other tasks of the same batches carry on."""
    path = tmp_path / "tasks.db"
    manager = BackgroundTaskManager(journal=SQLiteJournal(path), max_concurrency=4)
    retry = RetryPolicy(max_attempts=3, base_delay=0.01)

    @manager.task(name="gives_a_set", retry=retry)
    async def gives_a_set() -> object:
        return {1, 2}

    @manager.task(name="fine")
    async def fine(i: int) -> int:
        return i

    async with manager:
        bad = await gives_a_set.submit()
        good = [await fine.submit(i) for i in range(20)]
        with pytest.raises(TaskFailed) as failed:
            await bad
        assert failed.value.error.type.endswith("SerializationError")
        assert "gives_a_set" in failed.value.error.message
        assert [await h for h in good] == list(range(20))
        record = await manager.get(bad.id)
        assert record is not None
        assert (record.status, record.attempts) == (TaskStatus.FAILED, 1)

    async with BackgroundTaskManager(journal=SQLiteJournal(path)) as again:
        record = await again.get(bad.id)
        assert record is not None
        assert (record.status, record.attempts) == (TaskStatus.FAILED, 1)
        assert record.error is not None
        assert record.error.type.endswith("SerializationError")
        assert [h.target for h in await again.history(bad.id)] == [
            TaskStatus.PENDING,
            TaskStatus.RUNNING,
            TaskStatus.FAILED,
        ]


async def _stopped_while_running(manager: BackgroundTaskManager) -> TaskHandle[None]:
    """Run a task that never ends on ``manager``, then stop the manager under it."""
    started = anyio.Event()

    @manager.task(name="forever")
    async def forever() -> None:
        started.set()
        await anyio.sleep_forever()

    async with manager:
        handle = await forever.submit()
        await started.wait()
    return handle


async def test_shutdown_fails_a_task_that_used_up_max_recoveries(tmp_path: Path) -> None:
    """An attempt cut short by shutdown goes back to PENDING only while the task has
    recoveries left; with max_recoveries=0 it is FAILED, saying why, and stays so."""
    path = tmp_path / "tasks.db"
    handle = await _stopped_while_running(
        BackgroundTaskManager(journal=SQLiteJournal(path), max_recoveries=0, shutdown_timeout=0.05)
    )

    async with BackgroundTaskManager(journal=SQLiteJournal(path)) as again:
        record = await again.get(handle.id)
        assert record is not None
        assert record.status is TaskStatus.FAILED
        assert record.error is not None
        assert "max_recoveries=0" in record.error.message


async def test_awaiting_a_journaled_task_after_the_manager_stopped(tmp_path: Path) -> None:
    """Shutdown leaves an unfinished journaled task PENDING for the next start: awaiting
    its handle afterwards (or any id this manager did not hold) cannot wait for it and
    says so, instead of hanging."""
    manager = BackgroundTaskManager(
        journal=SQLiteJournal(tmp_path / "tasks.db"), shutdown_timeout=0.05
    )
    handle = await _stopped_while_running(manager)
    with pytest.raises(ManagerNotRunning, match=handle.id):
        await handle
    with pytest.raises(ManagerNotRunning, match="not running"):
        await manager.handle("some-other-id")


async def test_random_bytes_in_the_middle_are_refused_before_any_write(
    tmp_path: Path, anyio_backend: object
) -> None:
    """A few pages of a journal overwritten with random bytes (the schema page intact):
    refused at open, naming the damage, and not one byte of the file written first."""
    path = tmp_path / "tasks.db"
    await _make_journal(path, rows=400)
    data = bytearray(path.read_bytes())
    assert len(data) > 8 * 4096
    middle = len(data) // 2 // 4096 * 4096
    data[middle : middle + 2 * 4096] = os.urandom(2 * 4096)
    path.write_bytes(bytes(data))
    before = _snapshot(tmp_path)
    await _open_fails(path, "corrupt")
    assert _snapshot(tmp_path) == before
