"""A process with a BackgroundTaskManager on a SQLite journal, for the durability tests.

    python -m durability_apps.worker --journal tasks.db --label A [options]

It registers the tasks of ``durability_apps.tasks``, starts the manager (which recovers the
journal), and reports on stdout, one JSON object a line, flushed at once (so the lines
written before a ``kill -9`` are still there): ``ready`` once the manager runs,
``accepted`` after each ``submit`` returned, ``scenario`` with what a scenario set up,
``drained`` and ``stopped``. SIGTERM or SIGINT leave ``async with manager`` (a graceful
shutdown), then the process exits 0. Warnings and errors of the library go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sqlite3
import sys
import time
from datetime import timedelta
from typing import Any

import anyio
import anyio.abc

from background_tasks import (
    BackgroundTaskManager,
    RetryPolicy,
    SQLiteJournal,
    TaskFailed,
    TaskStatus,
)

from .tasks import register

_LIVE = ("pending", "running", "retrying")


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="durability_apps.worker")
    p.add_argument("--journal", required=True, help="a SQLite file or postgresql://...")
    p.add_argument("--schema", default="background_tasks", help="PostgreSQL only")
    p.add_argument("--label", default=f"p{os.getpid()}")
    p.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--lease", type=float, default=1.0)
    p.add_argument("--poll", type=float, default=0.2)
    p.add_argument("--shutdown-timeout", type=float, default=5.0)
    p.add_argument("--max-recoveries", type=int, default=5)
    p.add_argument("--submit", default=None, help="a JSON list of submissions to make at start")
    p.add_argument(
        "--submit-marks",
        type=int,
        default=0,
        help="submit mark tasks until the journal holds this many (the crash loop's backlog)",
    )
    p.add_argument("--markers", default=None, help="the marker file of --submit-marks tasks")
    p.add_argument("--mark-sleep", type=float, default=0.02)
    p.add_argument("--scenario", choices=("recovery",), default=None)
    p.add_argument(
        "--exit-when-drained",
        action="store_true",
        help="stop once no task of a name registered here is pending, running "
        "or retrying in the journal",
    )
    p.add_argument("--go", default=None, help="wait for this file before starting the manager")
    return p.parse_args(argv)


def live_count(path: str, names: list[str]) -> int:
    conn = sqlite3.connect(path, timeout=30)
    try:
        marks = ",".join("?" * len(names))
        sql = f"SELECT count(*) FROM tasks WHERE status IN {_LIVE!r} AND name IN ({marks})"
        return int(conn.execute(sql, names).fetchone()[0])
    finally:
        conn.close()


def mark_count(path: str) -> int:
    conn = sqlite3.connect(path, timeout=30)
    try:
        return int(conn.execute("SELECT count(*) FROM tasks WHERE name = 'mark'").fetchone()[0])
    finally:
        conn.close()


def _retry(spec: dict[str, Any] | None) -> RetryPolicy | None:
    return None if spec is None else RetryPolicy(**spec)


async def submit_specs(manager: BackgroundTaskManager, specs: list[dict[str, Any]]) -> None:
    for i, spec in enumerate(specs):
        handle = await manager.submit(
            spec["name"],
            *spec.get("args", ()),
            kwargs=spec.get("kwargs"),
            priority=spec.get("priority"),
            delay=spec.get("delay"),
            retry=_retry(spec.get("retry")),
        )
        emit("accepted", id=handle.id, ref=spec.get("ref", i))


async def submit_marks(manager: BackgroundTaskManager, args: argparse.Namespace) -> None:
    have = await anyio.to_thread.run_sync(mark_count, args.journal)
    for _ in range(args.submit_marks - have):
        handle = await manager.submit("mark", args.markers, args.mark_sleep)
        emit("accepted", id=handle.id)


async def wait_status(manager: BackgroundTaskManager, task_id: str, status: TaskStatus) -> Any:
    with anyio.fail_after(30):
        while True:
            record = await manager.get(task_id)
            if record is not None and record.status is status:
                return record
            await anyio.sleep(0.02)


async def recovery_scenario(manager: BackgroundTaskManager, markers: str) -> None:
    """Finished tasks, a task waiting for its retry, one running, queued ones of three
    priorities and a delayed one; then report them and wait for the kill."""
    ok = await manager.submit("mark", markers)
    await ok
    bad = await manager.submit("scripted", markers, ["fail", "ok"])
    with contextlib.suppress(TaskFailed):
        await bad
    flaky = await manager.submit(
        "scripted",
        markers,
        ["fail", "ok"],
        retry=RetryPolicy(max_attempts=2, base_delay=3.0, jitter=False),
    )
    retrying = await wait_status(manager, flaky.id, TaskStatus.RETRYING)
    hold = await manager.submit("scripted", markers, ["sleep:60", "ok"])
    await wait_status(manager, hold.id, TaskStatus.RUNNING)
    lo = await manager.submit("mark", markers, priority=0)
    mid = await manager.submit("mark", markers, priority=3)
    hi = await manager.submit("mark", markers, priority=7)
    delayed = await manager.submit("mark", markers, delay=timedelta(seconds=2))
    delayed_record = await manager.get(delayed.id)
    assert delayed_record is not None
    emit(
        "scenario",
        ok=ok.id,
        bad=bad.id,
        flaky=flaky.id,
        flaky_due=retrying.scheduled_at.timestamp(),
        hold=hold.id,
        lo=lo.id,
        mid=mid.id,
        hi=hi.id,
        delayed=delayed.id,
        delayed_due=delayed_record.scheduled_at.timestamp(),
    )
    await anyio.sleep_forever()


async def wait_drained(
    manager: BackgroundTaskManager, path: str, submitting: anyio.Event | None
) -> None:
    if submitting is not None:
        await submitting.wait()
    names = sorted(manager.registry.tasks)
    while await anyio.to_thread.run_sync(live_count, path, names):  # noqa: ASYNC110
        await anyio.sleep(0.1)  # another process's journal: polling is the only way
    emit("drained")


async def watch_signals(
    stop: anyio.Event, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for signum in signals:
            emit("signal", signum=int(signum))
            stop.set()


async def main(args: argparse.Namespace) -> None:
    journal: Any
    if args.journal.startswith("postgresql://"):  # the PostgreSQL fault tests
        from background_tasks.postgres import PostgresJournal

        journal = PostgresJournal(args.journal, lease_timeout=args.lease, schema=args.schema)
    else:
        journal = SQLiteJournal(args.journal, lease_timeout=args.lease)
    manager = BackgroundTaskManager(
        max_concurrency=args.concurrency,
        journal=journal,
        poll_interval=args.poll,
        shutdown_timeout=args.shutdown_timeout,
        max_recoveries=args.max_recoveries,
    )
    register(manager, args.label)
    stop = anyio.Event()
    async with anyio.create_task_group() as outer:
        await outer.start(watch_signals, stop)
        if args.go:
            emit("waiting", pid=os.getpid())
            go = anyio.Path(args.go)
            while not await go.exists() and not stop.is_set():  # noqa: ASYNC110
                await anyio.sleep(0.005)  # a file another process creates
        async with manager:
            emit("ready", pid=os.getpid(), owner=manager.owner, backend=args.backend)
            async with anyio.create_task_group() as tg:

                async def stop_when(fn: Any, *fargs: Any) -> None:
                    await fn(*fargs)
                    stop.set()

                submitted: anyio.Event | None = None
                if args.submit:
                    await submit_specs(manager, json.loads(args.submit))
                if args.submit_marks:
                    submitted = anyio.Event()

                    async def marks() -> None:
                        await submit_marks(manager, args)
                        submitted.set()  # type: ignore[union-attr]

                    tg.start_soon(marks)
                if args.scenario == "recovery":
                    tg.start_soon(recovery_scenario, manager, args.markers)
                if args.exit_when_drained:
                    tg.start_soon(stop_when, wait_drained, manager, args.journal, submitted)
                await stop.wait()
                tg.cancel_scope.cancel()
            emit("stopping", at=time.time())
        emit("stopped", at=time.time())
        outer.cancel_scope.cancel()


def run(argv: list[str] | None = None) -> None:
    args = parse(argv)
    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format="%(levelname)s %(name)s %(message)s",
    )
    anyio.run(main, args, backend=args.backend)


if __name__ == "__main__":
    run()
