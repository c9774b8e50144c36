"""Several processes on one SQLite journal: each row is claimed by exactly one of them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from background_tasks._states import TaskStatus
from background_tasks.journal.sqlite import SQLiteJournal
from background_tasks.testing import OWNER, make_row

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]

_WORKER = """
    import glob, json, sys, anyio
    from background_tasks.journal.sqlite import SQLiteJournal
    from background_tasks.testing import claim, finish

    path, owner, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])

    async def main():
        journal = SQLiteJournal(path, lease_timeout=30)
        await journal.open(owner)
        open(f"{path}.ready.{owner}", "w").close()
        with anyio.fail_after(30):  # start together, or one of them drains it all alone
            while len(glob.glob(f"{path}.ready.*")) < workers:
                await anyio.sleep(0.01)
        won, lost = [], 0
        try:
            while True:
                rows, _ = await journal.runnable()
                if not rows:
                    break

                async def take(row):
                    nonlocal lost
                    change = claim(row, owner)
                    if not await journal.apply(change):
                        lost += 1
                        return
                    won.append(row.id)
                    await anyio.sleep(0.001)  # the "work"
                    mine = await journal.get(row.id)
                    assert mine is not None and mine.version == change.version + 1
                    assert await journal.apply(finish(mine, result_json='"ok"')) is True

                async with anyio.create_task_group() as tg:
                    for row in rows[:40]:
                        tg.start_soon(take, row)
        finally:
            await journal.close()
        print(json.dumps({"won": won, "lost": lost, "commits": journal.commits}))

    anyio.run(main)
"""


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # a subprocess test: the child's
# loop is what is tested, so one backend for the parent is enough
async def test_processes_share_one_backlog(tmp_path: Path, anyio_backend: object) -> None:
    path = tmp_path / "tasks.db"
    journal = SQLiteJournal(path)
    await journal.open(OWNER)
    try:
        ids = {(await journal.insert(make_row())).id for _ in range(400)}
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        children = [
            subprocess.Popen(  # noqa: ASYNC220 (the test waits for them at once)
                [sys.executable, "-c", textwrap.dedent(_WORKER), str(path), f"worker-{i}", "3"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
            for i in range(3)
        ]
        reports = []
        for child in children:
            out, err = child.communicate(timeout=90)
            assert child.returncode == 0, err
            assert "locked" not in err
            reports.append(json.loads(out))
        won = [task_id for report in reports for task_id in report["won"]]
        assert len(won) == len(set(won)) == len(ids)
        assert set(won) == ids
        assert sum(1 for report in reports if report["won"]) >= 2  # they really shared it
        counts = await journal.counts()
        assert counts[TaskStatus.COMPLETED] == len(ids)
        for task_id in list(ids)[:20]:
            targets = [h.target for h in await journal.history(task_id)]
            assert targets == [TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.COMPLETED]
    finally:
        await journal.close()
