"""The tasks of the durability tests, registered alike in every process.

Each task leaves evidence in a marker file: one JSON line per event, appended with
``O_APPEND`` and fsynced before the task goes on, so that a line survives ``kill -9`` of
the process right after it. A line is ``{"id", "pid", "label", "event", "t", ...}``.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import anyio

from background_tasks import BackgroundTaskManager, current_task

__all__ = ["append", "read_markers", "register"]


def append(path: str, **fields: Any) -> None:
    """Append one JSON line to ``path`` durably (one ``write`` on an O_APPEND descriptor)."""
    line = (json.dumps(fields, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_markers(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every line of a marker file, in the order it was written (missing file: none)."""
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def _runs_so_far(path: str, task_id: str) -> int:
    return sum(1 for m in read_markers(path) if m["id"] == task_id and m["event"] == "start")


def register(manager: BackgroundTaskManager, label: str) -> None:
    """Register the shared tasks on ``manager``; ``label`` names this process in markers."""
    pid = os.getpid()

    def mark_event(path: str, event: str, **extra: Any) -> None:
        ctx = current_task()
        append(path, id=ctx.id, pid=pid, label=label, event=event, t=time.time(), **extra)

    @manager.task(name="mark")
    async def mark(path: str, sleep: float = 0.0) -> str:
        """One "start" line, a nap, the process's label as the result."""
        mark_event(path, "start")
        if sleep:
            await anyio.sleep(sleep)
        return label

    @manager.task(name="exclusive")
    async def exclusive(directory: str, sleep: float = 0.0) -> int:
        """Create ``directory/<task id>`` with O_EXCL: a second run of one task fails loudly."""
        ctx = current_task()
        try:
            fd = os.open(os.path.join(directory, ctx.id), os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except FileExistsError:  # leave evidence: a fenced outcome would hide the failure
            append(os.path.join(directory, "..", "duplicates.jsonl"), id=ctx.id, pid=pid)
            raise
        try:
            os.write(fd, f"{pid} {label}\n".encode())
        finally:
            os.close(fd)
        if sleep:
            await anyio.sleep(sleep)
        return pid

    @manager.task(name="slow")
    async def slow(path: str, seconds: float) -> str:
        """A long attempt with a "start" and a "done" line; returns the label of its process."""
        mark_event(path, "start")
        await anyio.sleep(seconds)
        mark_event(path, "done")
        return label

    @manager.task(name="blocker")
    async def blocker(path: str) -> str:
        """Runs until cancelled; its ``finally`` leaves a line."""
        mark_event(path, "start")
        try:
            await anyio.sleep(120)
        finally:
            mark_event(path, "finally")
        return label

    @manager.task(name="scripted")
    async def scripted(path: str, plan: list[str]) -> str:
        """Run n of this task (counted in its marker file) does ``plan[n - 1]``: "ok",
        "fail" (raise), "kill" (SIGKILL its own process) or "sleep:SECONDS" (then ok)."""
        ctx = current_task()
        run = _runs_so_far(path, ctx.id) + 1
        step = plan[min(run, len(plan)) - 1]
        mark_event(path, "start", run=run, step=step, attempt=ctx.attempt)
        if step == "kill":
            os.kill(pid, signal.SIGKILL)
            await anyio.sleep(60)  # not reached
        if step == "fail":
            raise RuntimeError(f"planned failure of run {run}")
        if step.startswith("sleep:"):
            await anyio.sleep(float(step.split(":", 1)[1]))
        mark_event(path, "done", run=run)
        return f"{label}:{run}"
