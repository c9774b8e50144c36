"""``bgtasks worker``: a real worker process serving a journal that this test feeds.

The test process submits through its own manager on the same journal; that manager's only
worker slot is held by a task the worker process does not know (``hold``), so every
``work`` task runs in the worker process (the test's own ``work`` would fail loudly). While
the worker runs, the other commands read the journal and cancel a running task; SIGTERM
then stops the worker gracefully, and nothing is lost: every task is COMPLETED or still
PENDING, and a second worker (stopped with SIGINT) finishes the rest.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from subprocess import PIPE

import anyio
import anyio.abc
import pytest

from background_tasks import BackgroundTaskManager, TaskRecord, TaskStatus
from background_tasks.journal.sqlite import SQLiteJournal

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

WORKER_MODULE = """
import os

import anyio

from background_tasks import BackgroundTaskManager
from background_tasks.journal.sqlite import SQLiteJournal

manager = BackgroundTaskManager(
    max_concurrency=8,
    journal=SQLiteJournal(os.environ["BGTASKS_TEST_JOURNAL"]),
    shutdown_timeout=5,
    poll_interval=0.05,
)


@manager.task(name="work")
async def work(n: int, seconds: float) -> dict[str, int]:
    await anyio.sleep(seconds)
    return {"n": n, "pid": os.getpid()}
"""


class Worker:
    def __init__(self, process: anyio.abc.Process) -> None:
        self.process = process
        self.stderr = b""

    async def drain(self) -> None:
        assert self.process.stderr is not None
        async for chunk in self.process.stderr:
            self.stderr += chunk

    async def wait_for(self, text: str) -> None:
        with anyio.fail_after(20):
            while text.encode() not in self.stderr:
                if self.process.returncode is not None:
                    raise AssertionError(f"the worker exited: {self.stderr.decode()}")
                await anyio.sleep(0.02)


@asynccontextmanager
async def worker(tmp_path: Path, journal: Path, backend: str) -> AsyncIterator[Worker]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
        "BGTASKS_TEST_JOURNAL": str(journal),
    }
    command = [
        sys.executable,
        "-m",
        "background_tasks",
        "worker",
        "cli_worker_app:manager",
        "--concurrency",
        "2",
        "--backend",
        backend,
    ]
    process = await anyio.open_process(command, env=env, stdout=PIPE, stderr=PIPE)
    running = Worker(process)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(running.drain)
            await running.wait_for("stop with Ctrl-C or SIGTERM")
            yield running
    finally:
        if process.returncode is None:
            process.kill()
        with anyio.CancelScope(shield=True):
            await process.wait()
            await process.aclose()


async def bgtasks(*args: str) -> tuple[int, str, str]:
    done = await anyio.run_process([sys.executable, "-m", "background_tasks", *args], check=False)
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def until(manager: BackgroundTaskManager, task_id: str, *wanted: TaskStatus) -> TaskRecord:
    with anyio.fail_after(20):
        while True:
            record = await manager.get(task_id)
            if record is not None and record.status in wanted:
                return record
            await anyio.sleep(0.05)


async def test_worker_serves_the_journal_and_stops_gracefully(
    tmp_path: Path, anyio_backend: str
) -> None:
    (tmp_path / "cli_worker_app.py").write_text(WORKER_MODULE)
    path = tmp_path / "tasks.db"
    j = str(path)
    manager = BackgroundTaskManager(
        max_concurrency=1, journal=SQLiteJournal(path), shutdown_timeout=0, poll_interval=0.05
    )
    held = anyio.Event()

    @manager.task(name="work")
    async def work(n: int, seconds: float) -> dict[str, int]:
        raise AssertionError("work must run in the worker process, not here")

    @manager.task(name="hold")
    async def hold() -> None:
        held.set()
        await anyio.sleep_forever()

    async with manager:
        await hold.submit()
        await held.wait()  # this manager's only slot is taken from now on

        async with worker(tmp_path, path, anyio_backend) as first:
            assert b"concurrency 2" in first.stderr
            pid = first.process.pid
            long = await work.submit(0, 60)
            ids = [(await work.submit(n, 0.3)).id for n in range(1, 11)]
            running = await until(manager, long.id, TaskStatus.RUNNING)
            assert running.owner is not None
            assert f":{pid}:" in running.owner

            # The other commands, while another process runs tasks on the journal.
            code, out, err = await bgtasks("status", "--journal", j)
            assert code == 0, err
            assert running.owner in out
            assert "expires in" in out
            code, out, err = await bgtasks("list", "-j", j, "--status", "running", "--json")
            assert code == 0
            assert long.id in {item["id"] for item in json.loads(out)}
            code, out, err = await bgtasks("cancel", long.id, "--journal", j)
            assert code == 0, err
            assert "cancel requested" in out, (out, err)
            await until(manager, long.id, TaskStatus.CANCELLED)

            await until(manager, ids[1], TaskStatus.COMPLETED)
            first.process.send_signal(signal.SIGTERM)
            with anyio.fail_after(20):
                assert await first.process.wait() == 0
        assert b"SIGTERM: stopping" in first.stderr
        assert b"worker stopped" in first.stderr
        assert b"Traceback" not in first.stderr

        # Nothing lost: each task finished in the worker or is still pending for the next.
        records = [await manager.get(task_id) for task_id in ids]
        statuses = [r.status for r in records if r is not None]
        assert len(statuses) == len(ids)
        assert set(statuses) <= {TaskStatus.COMPLETED, TaskStatus.PENDING}, statuses
        done = [r for r in records if r is not None and r.status is TaskStatus.COMPLETED]
        assert len(done) >= 2
        assert all(r.result == {"n": r.args[0], "pid": pid} for r in done)

        async with worker(tmp_path, path, anyio_backend) as second:
            for task_id in ids:
                await until(manager, task_id, TaskStatus.COMPLETED)
            second.process.send_signal(signal.SIGINT)
            with anyio.fail_after(20):
                assert await second.process.wait() == 0
        assert b"SIGINT: stopping" in second.stderr
