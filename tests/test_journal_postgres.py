"""PostgresJournal: the journal contract, plus what only PostgreSQL has (several machines'
managers on one database, SKIP LOCKED, LISTEN/NOTIFY, DSNs and schemas).

The server: ``BGTASKS_TEST_POSTGRES_DSN`` when set; else ``postgresql://postgres@127.0.0.1:
5432/test`` when it answers; else a throwaway cluster started with Debian's ``initdb`` and
``pg_ctl`` for this session. Without any of them every test here fails, saying so: none is
skipped. Each test gets its own schema, dropped at its end.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import psycopg
import pytest

from background_tasks import BackgroundTaskManager
from background_tasks._errors import JournalError
from background_tasks._states import TaskStatus
from background_tasks._writer import take_over
from background_tasks.journal._protocol import Journal, TaskRow
from background_tasks.postgres import CHANNEL, SCHEMA_VERSION, PostgresJournal
from background_tasks.testing import (
    OWNER,
    PEER,
    JournalContract,
    applied,
    claim,
    make_row,
    opened,
)

pytestmark = pytest.mark.anyio

P, R, Y, C, F = (
    TaskStatus.PENDING,
    TaskStatus.RUNNING,
    TaskStatus.RETRYING,
    TaskStatus.COMPLETED,
    TaskStatus.FAILED,
)
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"


# --------------------------------------------------------------------------- the server


def _reachable(dsn: str) -> str | None:
    """None if a connection works, else why not."""
    try:
        with psycopg.connect(dsn, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return str(exc).strip().splitlines()[0]
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _throwaway_cluster() -> Iterator[str]:
    """A PostgreSQL cluster in a temporary directory, stopped and removed at the end."""
    initdbs = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not initdbs:
        raise RuntimeError("no /usr/lib/postgresql/*/bin/initdb (apt-get install postgresql)")
    bindir = os.path.dirname(initdbs[-1])
    tmp = tempfile.mkdtemp(prefix="bgtasks-pg-")
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        shutil.chown(tmp, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = os.path.join(tmp, "data"), _free_port()
    run = lambda *cmd: subprocess.run(  # noqa: E731
        [*as_user, *cmd], check=True, capture_output=True, text=True, timeout=60
    )
    try:
        run(f"{bindir}/initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync")
        options = f"-k {tmp} -c listen_addresses=127.0.0.1 -p {port} -c fsync=off"
        run(f"{bindir}/pg_ctl", "-D", data, "-o", options, "-l", f"{tmp}/log", "-w", "start")
    except (OSError, subprocess.SubprocessError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        detail = getattr(exc, "stderr", "") or ""
        raise RuntimeError(f"cannot start a throwaway PostgreSQL: {exc} {detail}") from exc
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            run(f"{bindir}/pg_ctl", "-D", data, "-m", "fast", "-w", "stop")
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    env = os.environ.get("BGTASKS_TEST_POSTGRES_DSN")
    if env:
        why = _reachable(env)
        if why is not None:
            pytest.fail(f"BGTASKS_TEST_POSTGRES_DSN is set but unusable: {why}", pytrace=False)
        yield env
        return
    if _reachable(DEFAULT_DSN) is None:
        yield DEFAULT_DSN
        return
    try:
        cluster = _throwaway_cluster()
        dsn = cluster.__enter__()
    except RuntimeError as exc:
        pytest.fail(
            f"no PostgreSQL for the tests: {DEFAULT_DSN} does not answer and {exc}; set"
            " BGTASKS_TEST_POSTGRES_DSN",
            pytrace=False,
        )
    try:
        yield dsn
    finally:
        cluster.__exit__(None, None, None)


def _admin(dsn: str) -> psycopg.Connection[Any]:
    return psycopg.connect(dsn, autocommit=True)


@pytest.fixture(scope="session")
def _schemas(pg_dsn: str) -> Iterator[tuple[psycopg.Connection[Any], list[str], set[str]]]:
    """Journal schemas of this session: emptied after a test and reused by the next (a
    DELETE takes 3 ms; creating and dropping a schema about 150 ms, too slow here)."""
    conn = _admin(pg_dsn)
    conn.execute("SET lock_timeout = '2s'")
    free: list[str] = []
    made: set[str] = set()
    try:
        yield conn, free, made
    finally:
        with conn:
            for name in made:
                conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@pytest.fixture
def schema(_schemas: tuple[psycopg.Connection[Any], list[str], set[str]]) -> Iterator[str]:
    """A schema for this test alone, empty (tables and all, or not created yet)."""
    conn, free, made = _schemas
    name = free.pop() if free else f"t_{uuid.uuid4().hex[:16]}"
    made.add(name)
    yield name
    s = f'"{name}"'
    try:
        found = conn.execute(f"SELECT value FROM {s}.meta WHERE key = 'schema_version'").fetchone()
        assert found == (SCHEMA_VERSION,)
        conn.execute(
            f"BEGIN; DELETE FROM {s}.tasks; DELETE FROM {s}.history; DELETE FROM {s}.starts;"
            f" DELETE FROM {s}.periodic;"
            f" UPDATE {s}.meta SET value = 0 WHERE key = 'rev'; COMMIT"
        )
        free.append(name)
    except (psycopg.Error, AssertionError):  # not created, altered or still locked: drop it
        conn.execute("ROLLBACK")
        conn.execute(f"DROP SCHEMA IF EXISTS {s} CASCADE")
        made.discard(name)


@pytest.fixture
def fresh_schema(pg_dsn: str) -> Iterator[str]:
    """A schema name no one has used; dropped at the end of the test."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    yield name
    with _admin(pg_dsn) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@pytest.fixture
def factory(pg_dsn: str, schema: str) -> Callable[..., PostgresJournal]:
    return lambda **kw: PostgresJournal(pg_dsn, schema=schema, **kw)


@pytest.fixture
async def journal(
    factory: Callable[..., PostgresJournal], anyio_backend: object
) -> AsyncIterator[PostgresJournal]:
    async with opened(factory()) as journal:
        yield journal


@pytest.fixture
async def peer(
    journal: PostgresJournal, factory: Callable[..., PostgresJournal]
) -> AsyncIterator[PostgresJournal]:
    async with opened(factory(), PEER) as peer:
        yield peer


class TestPostgresContract(JournalContract):
    @pytest.fixture
    def journal_factory(self, pg_dsn: str, schema: str) -> Callable[[], Journal]:
        return lambda: PostgresJournal(pg_dsn, schema=schema)


# --------------------------------------------------------------------------- construction


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"lease_timeout": 0}, "lease_timeout"),
        ({"lease_timeout": float("nan")}, "lease_timeout"),
        ({"lease_timeout": "30"}, "lease_timeout"),
        ({"lease_timeout": True}, "lease_timeout"),
        ({"connect_timeout": -1}, "connect_timeout"),
        ({"lock_timeout": float("inf")}, "lock_timeout"),
        ({"schema": ""}, "schema"),
        ({"schema": "1abc"}, "schema"),
        ({"schema": 'x"; DROP TABLE y; --'}, "schema"),
        ({"schema": "a" * 64}, "schema"),
        ({"schema": None}, "schema"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        PostgresJournal(DEFAULT_DSN, **kwargs)


def test_both_import_paths_name_one_class() -> None:
    from background_tasks.journal import postgres as package

    assert package.PostgresJournal is PostgresJournal
    assert (package.CHANNEL, package.SCHEMA_VERSION) == (CHANNEL, SCHEMA_VERSION)


@pytest.mark.parametrize(
    "module", ["background_tasks.postgres", "background_tasks.journal.postgres"]
)
def test_without_psycopg_the_import_error_names_the_extra(module: str) -> None:
    code = (
        "import sys\n"
        "sys.modules['psycopg'] = None  # what an interpreter without psycopg does\n"
        "try:\n"
        f"    import {module}\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "pip install 'anyio-background-tasks[postgres]'" in done.stdout
    assert done.stderr == ""


@pytest.mark.parametrize("dsn", ["host=x port", "postgresql://u:pw@h/db?nope=1", 3])
def test_bad_dsn_raises_value_error(dsn: Any) -> None:
    with pytest.raises(ValueError, match="dsn") as info:
        PostgresJournal(dsn)
    assert "pw" not in str(info.value)


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        ("postgresql://bob:s3cr3t-pw@db.example:5433/app", "postgresql://bob@db.example:5433/app"),
        ("postgresql://bob@db/app?password=s3cr3t-pw&sslmode=off", "postgresql://bob@db/app?sslmode=off"),
        ("host=db user=bob password=s3cr3t-pw dbname=app", "host=db user=bob dbname=app"),
        ("host=db password='s3cr3t pw' port=5", "host=db port=5"),
    ],
)  # fmt: skip
def test_the_password_is_never_shown(dsn: str, shown: str) -> None:
    journal = PostgresJournal(dsn, lease_timeout=5)
    assert journal.safe_dsn == shown
    assert "s3cr3t" not in repr(journal)
    assert journal.lease_timeout == 5.0


async def test_unreachable_server_is_a_journal_error_without_the_password(
    anyio_backend: object,
) -> None:
    port = _free_port()
    journal = PostgresJournal(f"postgresql://postgres:hunter2pw@127.0.0.1:{port}/test")
    with pytest.raises(JournalError) as info:
        await journal.open(OWNER)
    message = str(info.value)
    assert "hunter2pw" not in message
    assert f"postgresql://postgres@127.0.0.1:{port}/test" in message
    assert isinstance(info.value.__cause__, psycopg.Error)
    await journal.close()  # nothing was opened; still fine


async def test_unknown_database_is_a_journal_error(pg_dsn: str, anyio_backend: object) -> None:
    params = psycopg.conninfo.conninfo_to_dict(pg_dsn)
    params.update(dbname="no_such_db_bgtasks", password="hunter2pw")
    journal = PostgresJournal(psycopg.conninfo.make_conninfo(**params))  # type: ignore[arg-type]
    with pytest.raises(JournalError, match="no_such_db_bgtasks") as info:
        await journal.open(OWNER)
    assert "hunter2pw" not in str(info.value)


async def test_use_before_open_is_a_journal_error(
    factory: Callable[..., PostgresJournal], anyio_backend: object
) -> None:
    journal = factory()
    with pytest.raises(JournalError, match="not open"):
        await journal.insert(make_row())
    with pytest.raises(JournalError, match="not open"):
        await journal.get("x")


# --------------------------------------------------------------------------- schema


async def test_schema_tables_and_version(journal: PostgresJournal, pg_dsn: str) -> None:
    with _admin(pg_dsn) as conn:
        tables = {
            r[0]
            for r in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = %s", (journal.schema,)
            )
        }
        version = conn.execute(
            f"SELECT value FROM \"{journal.schema}\".meta WHERE key = 'schema_version'"
        ).fetchone()
    assert tables == {"meta", "tasks", "history", "starts", "periodic"}
    assert version == (SCHEMA_VERSION,)


async def test_a_newer_schema_version_is_refused_and_left_alone(
    pg_dsn: str, fresh_schema: str, anyio_backend: object
) -> None:
    first = PostgresJournal(pg_dsn, schema=fresh_schema)
    await first.open(OWNER)
    row = await first.insert(make_row())
    await first.close()
    with _admin(pg_dsn) as conn:
        conn.execute(
            f"UPDATE \"{fresh_schema}\".meta SET value = %s WHERE key = 'schema_version'",
            (SCHEMA_VERSION + 1,),
        )
    journal = PostgresJournal(pg_dsn, schema=fresh_schema)
    with pytest.raises(JournalError, match=rf"schema version {SCHEMA_VERSION + 1} is newer"):
        await journal.open(OWNER)
    with _admin(pg_dsn) as conn:
        meta = dict(conn.execute(f'SELECT key, value FROM "{fresh_schema}".meta').fetchall())
        ids = [r[0] for r in conn.execute(f'SELECT id FROM "{fresh_schema}".tasks')]
    assert meta["schema_version"] == SCHEMA_VERSION + 1
    assert ids == [row.id]


async def test_a_schema_of_something_else_is_refused(
    pg_dsn: str, fresh_schema: str, anyio_backend: object
) -> None:
    with _admin(pg_dsn) as conn:
        conn.execute(f'CREATE SCHEMA "{fresh_schema}"')
        conn.execute(f'CREATE TABLE "{fresh_schema}".orders (id int)')
    with pytest.raises(JournalError, match="something else"):
        await PostgresJournal(pg_dsn, schema=fresh_schema).open(OWNER)
    with _admin(pg_dsn) as conn:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = %s", (fresh_schema,)
            )
        ]
    assert tables == ["orders"]


async def test_concurrent_first_opens_migrate_once(
    pg_dsn: str, fresh_schema: str, anyio_backend: object
) -> None:
    journals = [PostgresJournal(pg_dsn, schema=fresh_schema) for _ in range(3)]
    try:
        async with anyio.create_task_group() as tg:
            for i, j in enumerate(journals):
                tg.start_soon(j.open, f"o{i}")
        row = await journals[0].insert(make_row())
        assert await journals[2].get(row.id) == row
    finally:
        for j in journals:
            await j.close()


# --------------------------------------------------------------------------- writing


async def test_group_commit_shares_transactions(journal: PostgresJournal) -> None:
    before = journal.commits

    async def insert() -> None:
        await journal.insert(make_row())

    async with anyio.create_task_group() as tg:
        for _ in range(200):
            tg.start_soon(insert)
    assert (await journal.counts())[P] == 200
    assert journal.commits - before < 50


async def test_a_failing_operation_fails_alone(journal: PostgresJournal) -> None:
    good = [make_row() for _ in range(5)]
    bad = make_row(name="nul\x00byte")
    huge = make_row(priority=2**70)
    errors: dict[str, BaseException] = {}

    async def insert(row: TaskRow) -> None:
        try:
            await journal.insert(row)
        except Exception as exc:
            errors[row.id] = exc

    before = journal.commits
    async with anyio.create_task_group() as tg:
        for row in [good[0], bad, *good[1:3], huge, *good[3:]]:
            tg.start_soon(insert, row)
    assert set(errors) == {bad.id, huge.id}
    assert isinstance(errors[huge.id], JournalError)
    assert f"insert task {huge.id}" in str(errors[huge.id])
    assert journal.commits - before == 1  # one transaction, replayed with savepoints
    for row in good:
        assert await journal.get(row.id) == row
    assert await journal.get(bad.id) is None
    assert await journal.get(huge.id) is None


async def test_a_broken_writer_or_reader_connection_reconnects(
    journal: PostgresJournal, pg_dsn: str
) -> None:
    row = await journal.insert(make_row())
    assert journal._wconn is not None
    assert journal._rconn is not None
    pids = [journal._wconn.info.backend_pid, journal._rconn.info.backend_pid]
    with _admin(pg_dsn) as conn:
        for pid in pids:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    claimed = await applied(journal, claim(row))  # broken before COMMIT: run again
    assert claimed.status is R
    assert journal._wconn.info.backend_pid not in pids
    with _admin(pg_dsn) as conn:  # again, under a batch of inserts only
        conn.execute("SELECT pg_terminate_backend(%s)", (journal._wconn.info.backend_pid,))
    new = await journal.insert(make_row())
    assert await journal.get(new.id) == new


async def test_keyed_inserts_from_two_journals_store_one_task(
    journal: PostgresJournal, peer: PostgresJournal
) -> None:
    got: list[str] = []

    async def submit(j: PostgresJournal) -> None:
        got.append((await j.insert(make_row(key="same"))).id)

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(submit, journal)
            tg.start_soon(submit, peer)
    assert len(set(got)) == 1
    assert (await journal.counts())[P] == 1


async def test_three_journals_claim_each_row_once(
    journal: PostgresJournal, peer: PostgresJournal, factory: Callable[..., PostgresJournal]
) -> None:
    third = factory()
    await third.open("owner-c")
    try:
        rows = [await journal.insert(make_row()) for _ in range(60)]
        wins: list[tuple[str, str]] = []

        async def take(j: PostgresJournal, owner: str, order: list[TaskRow]) -> None:
            for row in order:  # each journal walks the rows in its own order
                if await j.apply(claim(row, owner)):
                    wins.append((row.id, owner))

        async with anyio.create_task_group() as tg:
            for k in range(4):
                tg.start_soon(take, journal, OWNER, rows[k::4])
                tg.start_soon(take, peer, PEER, rows[::-1][k::4])
                tg.start_soon(take, third, "owner-c", rows[k * 15 :] + rows[: k * 15])
        assert sorted(w[0] for w in wins) == sorted(r.id for r in rows)
        owners = dict(wins)
        for row in rows:
            stored = await peer.get(row.id)
            assert stored is not None
            assert (stored.status, stored.version, stored.owner) == (R, 1, owners[row.id])
    finally:
        await third.close()


# --------------------------------------------------------------------------- takeover


async def test_two_managers_take_each_expired_row_over_once(
    journal: PostgresJournal, peer: PostgresJournal
) -> None:
    now = time.time()
    ids = set()
    for _ in range(40):
        row = await journal.insert(make_row())
        await applied(journal, claim(row, lease=1, now=now - 10))
        ids.add(row.id)
    got: list[str] = []

    async def reclaim(j: PostgresJournal) -> None:
        for row in await j.expired(now):
            if await take_over(j, "taker", row, now, 5, now) is not None:
                got.append(row.id)

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(reclaim, journal)
            tg.start_soon(reclaim, peer)
    assert sorted(got) == sorted(ids)
    for task_id in list(ids)[:5]:
        stored = await journal.get(task_id)
        assert stored is not None
        assert (stored.status, stored.recoveries, stored.version) == (P, 1, 2)


# --------------------------------------------------------------------------- the cursor


async def test_changes_miss_nothing_under_concurrent_writers(
    journal: PostgresJournal, peer: PostgresJournal, factory: Callable[..., PostgresJournal]
) -> None:
    reader = factory()
    await reader.open("reader")
    try:
        _, cursor = await reader.runnable()
        written: set[str] = set()
        seen: set[str] = set()
        writing = True

        async def write(j: PostgresJournal) -> None:
            for _ in range(15):
                async with anyio.create_task_group() as tg:
                    for _ in range(8):
                        tg.start_soon(insert_claim, j)

        async def insert_claim(j: PostgresJournal) -> None:
            row = await j.insert(make_row())
            written.add(row.id)
            await j.apply(claim(row, "someone"))

        async def poll() -> None:
            nonlocal cursor
            while writing:
                rows, after = await reader.changes(cursor, "reader")
                assert after >= cursor
                cursor = after
                seen.update(r.id for r in rows)

        async with anyio.create_task_group() as tg:
            tg.start_soon(poll)
            async with anyio.create_task_group() as writers:
                for j in (journal, peer, journal, peer):
                    writers.start_soon(write, j)
            writing = False
        rows, cursor = await reader.changes(cursor, "reader")
        seen.update(r.id for r in rows)
        assert seen == written
        assert len(written) == 4 * 15 * 8
    finally:
        await reader.close()


# --------------------------------------------------------------------------- notifications


async def test_notify_wakes_wait_for_changes(
    journal: PostgresJournal, peer: PostgresJournal, factory: Callable[..., PostgresJournal]
) -> None:
    with anyio.fail_after(2):
        await journal.wait_for_changes(5)  # returns as soon as LISTEN is set up
    woke: list[float] = []

    async def wait() -> None:
        started = time.monotonic()
        await journal.wait_for_changes(10)
        woke.append(time.monotonic() - started)

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait)
        tg.start_soon(wait)  # a second waiter shares the first one's wake-up
        await anyio.sleep(0.1)
        await peer.insert(make_row())
    assert len(woke) == 2
    assert max(woke) < 2

    # Neither its own writes nor another schema's wake a journal.
    other = PostgresJournal(journal.dsn, schema=journal.schema + "_x")
    await other.open(PEER)
    try:
        await journal.insert(make_row())
        await other.insert(make_row())
        started = time.monotonic()
        await journal.wait_for_changes(0.3)
        assert time.monotonic() - started >= 0.25
    finally:
        await other.close()
        with _admin(journal.dsn) as conn:
            conn.execute(f'DROP SCHEMA "{other.schema}" CASCADE')


async def test_a_notification_sent_between_waits_is_not_lost(
    journal: PostgresJournal, peer: PostgresJournal
) -> None:
    await journal.wait_for_changes(5)
    row = await peer.insert(make_row())
    assert await peer.request_cancel(row.id) is None  # a write that touched nothing
    with anyio.fail_after(2):
        await journal.wait_for_changes(10)


async def test_close_ends_a_wait(
    factory: Callable[..., PostgresJournal], pg_dsn: str, anyio_backend: object
) -> None:
    journal = factory()
    await journal.open(OWNER)
    await journal.wait_for_changes(1)
    with anyio.fail_after(3):
        async with anyio.create_task_group() as tg:
            tg.start_soon(journal.wait_for_changes, 30)
            await anyio.sleep(0.05)
            await journal.close()
    assert journal._listener is None


async def test_a_broken_listener_connects_again(journal: PostgresJournal, pg_dsn: str) -> None:
    await journal.wait_for_changes(1)
    assert journal._listener is not None
    listening = journal._listener.conn
    assert listening is not None
    with _admin(pg_dsn) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (listening.info.backend_pid,))
        with anyio.fail_after(3):
            await journal.wait_for_changes(10)  # the socket closes: it returns
            await journal.wait_for_changes(10)  # connects again and returns
        conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"{journal.schema} someone"))
    with anyio.fail_after(3):
        await journal.wait_for_changes(10)


# --------------------------------------------------------------------------- end to end


async def test_two_managers_drain_one_backlog_running_each_task_once(
    pg_dsn: str, schema: str, anyio_backend: object
) -> None:
    runs: list[tuple[str, str]] = []

    def manager(label: str) -> BackgroundTaskManager:
        m = BackgroundTaskManager(
            max_concurrency=3,
            journal=PostgresJournal(pg_dsn, schema=schema, lease_timeout=10),
            poll_interval=0.05,
            shutdown_timeout=5,
        )

        @m.task(name="work")
        async def work(n: int) -> int:
            from background_tasks import current_task

            runs.append((current_task().id, label))
            await anyio.sleep(0.01)
            return n * 2

        return m

    a, b = manager("a"), manager("b")
    async with a, b:
        handles = [await a.submit("work", i, delay=0.3) for i in range(30)]
        handles += [await b.submit("work", i, delay=0.3) for i in range(30, 60)]
        with anyio.fail_after(20):
            results = [await h for h in handles]
    assert results == [i * 2 for i in range(60)]
    ran = [task_id for task_id, _ in runs]
    assert len(ran) == len(set(ran)) == 60
    assert {label for _, label in runs} == {"a", "b"}  # they really shared it
    check = PostgresJournal(pg_dsn, schema=schema)
    await check.open("check")
    try:
        counts = await check.counts()
        assert counts[C] == 60
        for task_id in ran[:10]:
            targets = [h.target for h in await check.history(task_id)]
            assert targets == [P, R, C]
    finally:
        await check.close()


# --------------------------------------------------------------------------- the CLI


def test_the_cli_reads_a_postgresql_journal(pg_dsn: str, fresh_schema: str) -> None:
    """``bgtasks status/list/show --journal postgresql://...`` against a real server; a
    database without a journal is refused in one line, and nothing is created."""
    import json as _json

    from background_tasks import BackgroundTaskManager

    dsn, schema = pg_dsn, fresh_schema

    async def fill() -> str:
        manager = BackgroundTaskManager(journal=PostgresJournal(dsn, schema=schema))

        @manager.task(name="cli_pg")
        async def job(n: int) -> int:
            return n * 2

        async with manager:
            handle = await job.submit(21)
            assert await handle == 42
            return handle.id

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "background_tasks", *args],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    task_id = anyio.run(fill)
    status = run("status", "--journal", dsn, "--schema", schema)
    assert status.returncode == 0, status.stderr
    assert "completed" in status.stdout
    listed = run("list", "--journal", dsn, "--schema", schema, "--json")
    assert listed.returncode == 0, listed.stderr
    assert task_id in {r["id"] for r in _json.loads(listed.stdout)}
    shown = run("show", task_id, "--journal", dsn, "--schema", schema, "--json")
    assert shown.returncode == 0, shown.stderr
    assert _json.loads(shown.stdout)["result"] == 42
    refused = run("status", "--journal", dsn, "--schema", schema + "_none")
    assert refused.returncode != 0
    assert "no journal in" in refused.stderr
    assert "Traceback" not in refused.stderr


async def test_reschedule_from_another_manager_moves_the_task_where_it_is_queued(
    pg_dsn: str, schema: str, anyio_backend: object
) -> None:
    """A task queued in ``runner`` is rescheduled to now by ``front`` (which runs
    nothing): ``runner`` hears of it (LISTEN/NOTIFY) and runs it."""
    from background_tasks import current_task

    runner = BackgroundTaskManager(journal=PostgresJournal(pg_dsn, schema=schema))
    front = BackgroundTaskManager(journal=PostgresJournal(pg_dsn, schema=schema), run_tasks=False)
    for m in (runner, front):

        @m.task(name="later")
        async def later() -> float:
            return current_task().scheduled_at.timestamp()

    async with runner, front:
        handle = await runner.submit("later", delay=3600)
        assert runner.statistics().queued == 1
        record = await front.reschedule(handle.id, delay=0)
        assert record.status is P
        with anyio.fail_after(5):
            assert await front.handle(handle.id) == record.scheduled_at.timestamp()
        history = [(h.source, h.target) for h in await front.history(handle.id)]
    assert history == [(None, P), (P, P), (P, R), (R, C)]


async def test_three_managers_fire_each_periodic_tick_once(
    pg_dsn: str, schema: str, anyio_backend: object
) -> None:
    from background_tasks import current_task

    seen: list[tuple[str, float]] = []

    def make(label: str) -> BackgroundTaskManager:
        m = BackgroundTaskManager(journal=PostgresJournal(pg_dsn, schema=schema))

        @m.periodic(every=0.1, name="tick", overlap=True)
        async def tick() -> None:
            seen.append((label, current_task().scheduled_at.timestamp()))

        return m

    a, b, c = make("a"), make("b"), make("c")
    async with a, b, c:
        await anyio.sleep(1.25)
        assert isinstance(a.journal, PostgresJournal)
        (state,) = await a.journal.periodic()
    times = sorted(t for _, t in seen)
    assert len(times) >= 9
    assert len(set(times)) == len(times)  # never twice
    assert all(abs(y - x - 0.1) < 1e-6 for x, y in itertools.pairwise(times))
    assert state.schedule == "every 0.1s"
