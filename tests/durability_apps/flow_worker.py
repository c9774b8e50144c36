"""A process with a BackgroundTaskManager on a shared journal, for the flow-control tests.

    python -m durability_apps.flow_worker --journal tasks.db --label A [--queue a ...]
    python -m durability_apps.flow_worker --journal postgresql://... --schema s --label B

Its queues (the same in every process): "a" and "b" (plain), "shared2" =
``Queue(limit=2, shared=True)``, "rate5" = ``Queue(rate="5/s", shared=True)``, "parts" =
``Queue(per_partition=1, shared=True)``. Its one task, ``step(markers, name, seconds)``,
appends a "start" and an "end" line (JSON, one ``write`` on an O_APPEND descriptor,
fsynced) with its name, pid, label and ``time.time()``; on a later attempt it sleeps
``then`` seconds instead (a task whose first run is killed). Prints ``ready`` (JSON)
once the manager runs; SIGTERM or SIGINT shut it down gracefully.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time

import anyio

from background_tasks import BackgroundTaskManager, Queue, SQLiteJournal, current_task
from background_tasks.journal import Journal

from .tasks import append

QUEUES = {
    "a": Queue(),
    "b": Queue(),
    "shared2": Queue(limit=2, shared=True),
    "rate5": Queue(rate="5/s", shared=True),
    "parts": Queue(per_partition=1, shared=True),
}


def journal(target: str, schema: str | None, lease: float) -> Journal:
    if target.startswith("postgresql://"):
        from background_tasks.postgres import PostgresJournal

        return PostgresJournal(target, schema=schema or "background_tasks", lease_timeout=lease)
    return SQLiteJournal(target, lease_timeout=lease)


def build(args: argparse.Namespace) -> BackgroundTaskManager:
    manager = BackgroundTaskManager(
        max_concurrency=args.concurrency,
        queues=QUEUES,
        journal=journal(args.journal, args.schema, args.lease),
        poll_interval=0.05,
        shutdown_timeout=2.0,
        run_queues=args.queue,
        run_tasks=not args.submit_only,
    )
    label, pid = args.label, os.getpid()

    @manager.task(name="step")
    async def step(markers: str, name: str, seconds: float, then: float | None = None) -> str:
        ctx = current_task()
        append(markers, event="start", name=name, pid=pid, label=label, t=time.time(), id=ctx.id)
        await anyio.sleep(seconds if then is None or ctx.attempt == 1 else then)
        append(markers, event="end", name=name, pid=pid, label=label, t=time.time(), id=ctx.id)
        return label

    return manager


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="durability_apps.flow_worker")
    p.add_argument("--journal", required=True)
    p.add_argument("--schema", default=None)
    p.add_argument("--label", default=f"p{os.getpid()}")
    p.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    p.add_argument("--concurrency", type=int, default=6)
    p.add_argument("--lease", type=float, default=5.0)
    p.add_argument("--queue", action="append", default=None)
    p.add_argument("--submit-only", action="store_true")
    return p.parse_args(argv)


async def main(args: argparse.Namespace) -> None:
    manager = build(args)
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with manager:
            print(json.dumps({"event": "ready", "pid": os.getpid()}), flush=True)
            async for _ in signals:
                break


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    parsed = parse()
    anyio.run(main, parsed, backend=parsed.backend)
