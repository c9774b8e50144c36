"""A process with one periodic task on a shared journal, for
``tests/test_periodic_processes.py``::

    python -m durability_apps.periodic --journal PATH | postgresql://... [--schema S]
        --markers FILE [--every 1] [--missed latest|skip] [--overlap] [--sleep SECONDS]
        [--go FILE]

The periodic task ``tick`` appends one fsynced line to the marker file when it starts
(``{"event": "start", "id", "tick", "attempt", "pid", "label", "t"}``), sleeps
``--sleep`` seconds, and appends a ``done`` line. On stdout, one JSON object a line,
flushed: ``{"event": "ready", "pid", "t"}`` once the manager runs, then every event of
the library at INFO and above (``periodic_tick_skipped``, ``periodic_ticks_missed``,
...), rendered as JSON by this app's own structlog configuration. SIGTERM or SIGINT
stop the manager gracefully.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from typing import Any

import anyio
import structlog

from background_tasks import BackgroundTaskManager, SQLiteJournal, current_task

from .tasks import append


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="durability_apps.periodic")
    p.add_argument("--journal", required=True)
    p.add_argument("--schema", default="background_tasks")
    p.add_argument("--markers", required=True)
    p.add_argument("--label", default=f"p{os.getpid()}")
    p.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    p.add_argument("--every", type=float, default=1.0)
    p.add_argument("--missed", choices=("latest", "skip"), default="latest")
    p.add_argument("--overlap", action="store_true")
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--lease", type=float, default=1.0)
    p.add_argument("--go", default=None, help="wait for this file before starting the manager")
    return p.parse_args(argv)


def journal_of(args: argparse.Namespace) -> Any:
    if args.journal.startswith("postgresql://"):
        from background_tasks.postgres import PostgresJournal

        return PostgresJournal(args.journal, schema=args.schema, lease_timeout=args.lease)
    return SQLiteJournal(args.journal, lease_timeout=args.lease)


async def main(args: argparse.Namespace) -> None:
    manager = BackgroundTaskManager(
        max_concurrency=4, journal=journal_of(args), poll_interval=0.1, shutdown_timeout=2.0
    )
    pid = os.getpid()

    @manager.periodic(every=args.every, name="tick", missed=args.missed, overlap=args.overlap)
    async def tick() -> None:
        ctx = current_task()
        mark = {"id": ctx.id, "tick": ctx.scheduled_at.timestamp(), "attempt": ctx.attempt}
        append(args.markers, event="start", pid=pid, label=args.label, t=time.time(), **mark)
        if args.sleep:
            await anyio.sleep(args.sleep)
        append(args.markers, event="done", pid=pid, label=args.label, t=time.time(), **mark)

    stop = anyio.Event()
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    stop.set()
                    return

        tg.start_soon(watch)
        if args.go:  # started ahead, so that the manager starts at a moment of the test's
            emit("waiting", pid=pid)
            go = anyio.Path(args.go)
            while not await go.exists():  # noqa: ASYNC110 - a file another process makes
                await anyio.sleep(0.005)
        async with manager:
            emit("ready", pid=pid, label=args.label, t=time.time())
            await stop.wait()
        emit("stopped", pid=pid, t=time.time())
        tg.cancel_scope.cancel()


def run(argv: list[str] | None = None) -> None:
    args = parse(argv)
    # The application's own logging: the library's events as JSON lines on stdout.
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("background_tasks")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    anyio.run(main, args, backend=args.backend)


if __name__ == "__main__":
    run()
