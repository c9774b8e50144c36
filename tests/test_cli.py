"""The bgtasks command line: every command against a journal the tests make with the
library, every user mistake (one line on stderr, no traceback), and the demo end to end.

Commands run both through the real entry point (``python -m background_tasks`` in a
subprocess: what users get) and through ``main()`` in this process (fast, and measured by
coverage). ``tests/test_cli_worker.py`` covers ``bgtasks worker`` and commands run while
another process works on the journal.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from background_tasks import (
    BackgroundTaskManager,
    RetryPolicy,
    TaskFailed,
    TaskRecord,
    TaskStatus,
    current_task,
)
from background_tasks._demo import KINDS, allocate, percentile, plan
from background_tasks.cli import _lease, _span, main, parse_duration
from background_tasks.journal.sqlite import SQLiteJournal

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Result:
    code: int
    out: str
    err: str


def run(*args: str, cwd: Path | None = None, timeout: float = 60) -> Result:
    """``python -m background_tasks ARGS`` in a subprocess."""
    done = subprocess.run(
        [sys.executable, "-m", "background_tasks", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        check=False,
    )
    return Result(done.returncode, done.stdout, done.stderr)


Cli = Callable[..., Result]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    """``main(ARGS)`` in this process, captured."""

    def call(*args: str) -> Result:
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse usage errors and --help
            code = int(exc.code or 0)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return call


def assert_one_line_error(result: Result, code: int, *fragments: str) -> None:
    assert result.code == code, result
    assert "Traceback" not in result.err
    lines = result.err.splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("bgtasks"), lines
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# ------------------------------------------------------------------ a journal made by the library


@dataclass
class Made:
    path: Path
    ids: dict[str, str]  # what -> task id


async def _make_journal(path: Path) -> dict[str, str]:
    manager = BackgroundTaskManager(
        max_concurrency=4, queues={"mail": 2}, journal=SQLiteJournal(path), shutdown_timeout=1
    )

    @manager.task(name="ok")
    async def ok(n: int) -> dict[str, int]:
        return {"n": n}

    @manager.task(name="boom")
    async def boom() -> None:
        raise ValueError("the input is bad")

    @manager.task(name="progress")
    async def progress() -> str:
        await current_task().report_progress(0.5, "half way")
        return "done"

    @manager.task(name="flaky", retry=RetryPolicy(max_attempts=3, base_delay=3600, jitter=False))
    async def flaky() -> None:
        raise ConnectionError("try later")

    ids: dict[str, str] = {}
    async with manager:
        for n in range(3):
            ids[f"ok{n}"] = (await ok.submit(n)).id
        ids["mail"] = (await ok.options(queue="mail").submit(99)).id
        ids["progress"] = (await progress.submit()).id
        failing = await boom.submit()
        ids["failed"] = failing.id
        ids["retrying"] = (await flaky.submit()).id
        ids["pending"] = (await ok.options(delay=3600, priority=5).submit(7)).id
        cancelled = await ok.options(delay=3600).submit(8)
        ids["cancelled"] = cancelled.id
        assert await cancelled.cancel()
        for key in ("ok0", "ok1", "ok2", "mail", "progress"):
            await manager.handle(ids[key])
        with pytest.raises(TaskFailed):
            await failing
        with anyio.fail_after(10):
            while True:
                record = await manager.get(ids["retrying"])
                if record is not None and record.status is TaskStatus.RETRYING:
                    break
                await anyio.sleep(0.02)
    return ids


@pytest.fixture(scope="module")
def made_once(tmp_path_factory: pytest.TempPathFactory) -> Made:
    path = tmp_path_factory.mktemp("journal") / "tasks.db"
    ids = anyio.run(_make_journal, path, backend="asyncio")
    return Made(path, ids)


@pytest.fixture
def made(made_once: Made, tmp_path: Path) -> Made:
    """A fresh copy of the library-made journal for each test (commands change it)."""
    path = tmp_path / "tasks.db"
    for suffix in ("", "-wal"):
        source = Path(f"{made_once.path}{suffix}")
        if source.exists():
            shutil.copy(source, f"{path}{suffix}")
    return Made(path, made_once.ids)


def records(result: Result) -> list[dict[str, object]]:
    assert result.code == 0, result
    data = json.loads(result.out)
    assert isinstance(data, list)
    return data


# ------------------------------------------------------------------ reading commands


def test_list_json_is_an_array_of_task_records(cli: Cli, made: Made) -> None:
    items = records(cli("list", "--journal", str(made.path), "--json"))
    assert len(items) == len(made.ids)
    assert [item["id"] for item in items] == sorted(made.ids.values(), reverse=True)  # newest first
    for item in items:
        assert list(item) == list(TaskRecord.model_fields)
        TaskRecord.model_validate(item)  # the same fields and types as TaskRecord
    by_id = {item["id"]: item for item in items}
    failed = by_id[made.ids["failed"]]
    assert failed["status"] == "failed"
    assert failed["error"]["type"] == "ValueError"  # type: ignore[index]
    assert failed["error"]["message"] == "the input is bad"  # type: ignore[index]
    assert by_id[made.ids["ok1"]]["result"] == {"n": 1}
    assert by_id[made.ids["progress"]]["progress"]["message"] == "half way"  # type: ignore[index]
    assert str(by_id[made.ids["ok0"]]["created_at"]).endswith("Z")


def test_list_filters_and_limit(cli: Cli, made: Made) -> None:
    j = str(made.path)
    assert [i["id"] for i in records(cli("list", "-j", j, "--status", "FAILED", "--json"))] == [
        made.ids["failed"]
    ]
    assert [i["id"] for i in records(cli("list", "-j", j, "--queue", "mail", "--json"))] == [
        made.ids["mail"]
    ]
    assert {i["name"] for i in records(cli("list", "-j", j, "--name", "ok", "--json"))} == {"ok"}
    assert len(records(cli("list", "-j", j, "--limit", "2", "--json"))) == 2
    assert records(cli("list", "-j", j, "--name", "nothing", "--json")) == []


def test_list_table(cli: Cli, made: Made) -> None:
    result = cli("list", "--journal", str(made.path), "--limit", "3")
    assert result.code == 0
    assert result.err == ""
    assert "STATUS" in result.out
    assert "the 3 newest" in result.out
    assert made.ids["cancelled"] in result.out
    full = cli("list", "--journal", str(made.path))
    for task_id in made.ids.values():
        assert task_id in full.out
    assert "ValueError: the input is bad" in full.out
    assert "50% half way" not in full.out  # progress shows for unfinished tasks only
    assert cli("list", "-j", str(made.path), "--name", "nothing").out.strip() == "no tasks match"


@pytest.mark.parametrize("columns", [80, 40])
def test_list_never_cuts_an_id(
    cli: Cli, made: Made, monkeypatch: pytest.MonkeyPatch, columns: int
) -> None:
    """In a narrow terminal, ids stay whole (to paste into ``show``): other columns fold
    or are left out, and only a terminal too narrow for the ids themselves gets long lines."""
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich sizes the table as in a terminal
    monkeypatch.setenv("COLUMNS", str(columns))
    result = cli("list", "--journal", str(made.path))
    assert result.code == 0, result
    text = re.sub(r"\x1b\[[0-9;]*m", "", result.out)
    for task_id in made.ids.values():
        assert re.search(rf"^{task_id}  ", text, re.MULTILINE), (task_id, text)
    assert "too narrow for" in text  # says which columns it left out
    if columns == 80:
        assert max(len(line) for line in text.splitlines()) <= 80, text
        assert "ValueError" in text  # a failed task's error, as far as it fits


def test_show_prints_the_record_and_its_history(cli: Cli, made: Made) -> None:
    result = cli("show", made.ids["retrying"], "--journal", str(made.path))
    assert result.code == 0, result
    assert "retrying" in result.out
    assert "ConnectionError: try later" in result.out
    assert "history" in result.out
    assert "1 of 3" in result.out
    data = json.loads(cli("show", made.ids["retrying"], "-j", str(made.path), "--json").out)
    history = data.pop("history")
    TaskRecord.model_validate(data)
    assert [(h["source"], h["target"]) for h in history] == [
        (None, "pending"),
        ("pending", "running"),
        ("running", "retrying"),
    ]
    assert history[2]["error"]["type"] == "ConnectionError"
    assert set(history[0]) == {"task_id", "source", "target", "attempt", "at", "owner", "error"}
    failed = cli("show", made.ids["failed"], "-j", str(made.path))
    assert "Traceback" in failed.out  # the task's own traceback, as the record keeps it
    done = cli("show", made.ids["progress"], "-j", str(made.path))
    assert '"done"' in done.out
    assert "ran on" in done.out


def test_show_of_a_completed_task_calls_an_earlier_failure_earlier(
    cli: Cli, tmp_path: Path
) -> None:
    """A task that failed once and then completed keeps the first attempt's error in its
    record; ``show`` must not print it (and its traceback) as the task's error."""
    path = tmp_path / "tasks.db"

    async def make() -> str:
        manager = BackgroundTaskManager(journal=SQLiteJournal(path))

        @manager.task(name="lucky", retry=RetryPolicy(max_attempts=2, base_delay=0, jitter=False))
        async def lucky() -> str:
            if current_task().attempt == 1:
                raise ConnectionError("the first try was refused")
            return "second time lucky"

        async with manager:
            handle = await lucky.submit()
            assert await handle == "second time lucky"
            return handle.id

    task_id = anyio.run(make, backend="asyncio")
    shown = cli("show", task_id, "--journal", str(path))
    assert shown.code == 0, shown
    assert "completed" in shown.out
    assert '"second time lucky"' in shown.out
    earlier = "an earlier attempt failed (attempt 1): ConnectionError: the first try was refused"
    assert earlier in shown.out
    assert not re.search(r"^error ", shown.out, re.MULTILINE)
    assert "Traceback" not in shown.out
    listed = cli("list", "--journal", str(path))
    assert "ConnectionError" not in listed.out  # the list shows the result instead
    assert '-> "second time lucky"' in listed.out
    record = json.loads(cli("show", task_id, "-j", str(path), "--json").out)
    assert record["error"]["type"] == "ConnectionError"  # --json: the record as it is


def test_status_counts_by_status_and_queue(cli: Cli, made: Made) -> None:
    result = cli("status", "--journal", str(made.path))
    assert result.code == 0, result
    lines = {line.split()[0]: line.split()[1:] for line in result.out.splitlines() if line.strip()}
    # columns: pending running retrying completed failed cancelled total, due, on lock
    assert lines["QUEUE"][-3:] == ["DUE", "ON", "LOCK"]
    assert lines["default"][:7] == ["1", "0", "1", "4", "1", "1", "8"]
    assert lines["mail"] == ["0", "0", "0", "1", "0", "0", "1", "0", "0"]
    assert lines["all"][:7] == ["1", "0", "1", "5", "1", "1", "9"]
    assert lines["all"][7:] == lines["default"][7:]
    assert lines["default"][8] == "0"
    assert f"oldest pending {made.ids['pending']} ok" in result.out
    assert f"next retry {made.ids['retrying']} flaky" in result.out
    assert "running 0" in result.out
    assert re.search(r"last minute \d+ completed", result.out)


# ------------------------------------------------------------------ acting commands


def test_cancel(cli: Cli, made: Made) -> None:
    j = str(made.path)
    result = cli("cancel", made.ids["pending"], "--journal", j)
    assert result.code == 0
    assert "cancelled task" in result.out
    shown = json.loads(cli("show", made.ids["pending"], "-j", j, "--json").out)
    assert shown["status"] == "cancelled"
    assert shown["history"][-1]["owner"].startswith("cli:")
    assert cli("cancel", made.ids["retrying"], "-j", j).code == 0
    assert_one_line_error(cli("cancel", made.ids["ok0"], "-j", j), 1, "already completed")
    assert_one_line_error(cli("cancel", made.ids["pending"], "-j", j), 1, "already cancelled")


def test_requeue_one_and_by_status(cli: Cli, made: Made) -> None:
    j = str(made.path)
    result = cli("requeue", made.ids["failed"], "--journal", j)
    assert result.code == 0
    assert "requeued task" in result.out
    shown = json.loads(cli("show", made.ids["failed"], "-j", j, "--json").out)
    assert shown["status"] == "pending"
    assert shown["error"] is None
    assert shown["attempts"] == 0
    assert_one_line_error(cli("requeue", made.ids["ok0"], "-j", j), 1, "only failed or cancelled")
    result = cli("requeue", "--status", "cancelled", "-j", j)
    assert result.code == 0
    assert result.out.strip() == "requeued 1 cancelled task"
    result = cli("requeue", "--status", "failed", "--queue", "mail", "-j", j)
    assert result.out.strip() == "requeued 0 failed tasks"
    assert not records(cli("list", "-j", j, "--status", "cancelled", "--json"))


def test_purge(cli: Cli, made: Made) -> None:
    j = str(made.path)
    result = cli("purge", "--journal", j, "--older-than", "1h")
    assert result.code == 0
    assert result.out.startswith("purged 0 finished tasks")
    result = cli("purge", "--journal", j, "--older-than", "0s")
    assert result.code == 0, result
    assert result.out.startswith("purged 7 finished tasks"), result
    left = {i["status"] for i in records(cli("list", "-j", j, "--json"))}
    assert left == {"pending", "retrying"}


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("15m", 900),
        ("2h", 7200),
        ("7d", 604800),
        ("1w", 604800),
        ("1h30m", 5400),
        ("0.5s", 0.5),
        (" 2H ", 7200),
        ("0s", 0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "7", "7x", "d", "1h 30", "-1s", "1.s"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


def test_lease() -> None:
    assert _lease(112.5, now=100) == "expires in 12.5s"
    assert _lease(97, now=100) == "EXPIRED 3.0s ago"  # its owner is gone: reclaimed soon


def test_span() -> None:
    assert [_span(s) for s in (0.25, 12.34, 245, 7800, 3 * 86400 + 3600 * 4)] == [
        "250ms",
        "12.3s",
        "4m05s",
        "2h10m",
        "3d04h",
    ]


# ------------------------------------------------------------------ through the real entry point


def test_every_command_through_the_entry_point(made: Made) -> None:
    j = str(made.path)
    assert run("status", "--journal", j).code == 0
    assert len(json.loads(run("list", "--journal", j, "--json").out)) == len(made.ids)
    shown = json.loads(run("show", made.ids["ok0"], "--journal", j, "--json").out)
    assert shown["result"] == {"n": 0}
    assert len(shown["history"]) == 3
    assert run("cancel", made.ids["pending"], "--journal", j).code == 0
    assert run("requeue", made.ids["pending"], "--journal", j).code == 0
    assert run("purge", "--journal", j, "--older-than", "7d").code == 0


def test_help(cli: Cli) -> None:
    result = cli("--help")
    assert result.code == 0
    for command in ("demo", "status", "list", "show", "cancel", "requeue", "purge", "worker"):
        assert command in result.out


def test_version(cli: Cli) -> None:
    """``bgtasks --version``: the distribution's version from its installed metadata
    (the package's own ``__version__`` when this tree is imported without installing)."""
    import importlib.metadata

    import background_tasks

    try:
        expected = importlib.metadata.version("anyio-background-tasks")
    except importlib.metadata.PackageNotFoundError:
        expected = background_tasks.__version__ + " (not installed: "
    for result in (cli("--version"), run("--version")):
        assert result.code == 0, result
        assert result.out.startswith(f"bgtasks {expected}"), result
        assert result.out.count("\n") == 1
        assert result.err == ""


def _worker_module(tmp_path: Path, name: str, body: str) -> str:
    (tmp_path / f"{name}.py").write_text(body)
    return name


@pytest.mark.parametrize(
    ("args", "code", "fragments"),
    [
        (["status", "--journal", "{tmp}/missing.db"], 1, ["no journal at", "missing.db"]),
        (["list", "--journal", "{tmp}/missing.db"], 1, ["no journal at"]),
        (["show", "X", "--journal", "{tmp}/missing.db"], 1, ["no journal at"]),
        (["cancel", "X", "--journal", "{tmp}/missing.db"], 1, ["no journal at"]),
        (["requeue", "X", "--journal", "{tmp}/missing.db"], 1, ["no journal at"]),
        (["purge", "--older-than", "1d", "--journal", "{tmp}/missing.db"], 1, ["no journal at"]),
        (["status", "--journal", "{tmp}/garbage.db"], 1, ["not an SQLite database"]),
        (["status", "--journal", "{tmp}/other.db"], 1, ["something else"]),
        (["list", "--journal", "{tmp}"], 1, ["is not a journal file"]),
        (["show", "nope", "--journal", "{journal}"], 1, ["no task with id 'nope'"]),
        (["cancel", "nope", "--journal", "{journal}"], 1, ["no task with id 'nope'"]),
        (["requeue", "nope", "--journal", "{journal}"], 1, ["no task with id 'nope'"]),
        (["requeue", "--journal", "{journal}"], 1, ["give either a task id or --status"]),
        (["requeue", "--status", "pending", "--journal", "{journal}"], 1, ["not pending"]),
        (["requeue", "X", "--queue", "q", "--journal", "{journal}"], 1, ["with --status"]),
        (["purge", "--older-than", "7x", "--journal", "{journal}"], 2, ["invalid duration"]),
        (["purge", "--journal", "{journal}"], 2, ["--older-than"]),
        (["list", "--status", "lost", "--journal", "{journal}"], 2, ["unknown status 'lost'"]),
        (["list", "--limit", "0", "--journal", "{journal}"], 2, ["expected a whole number"]),
        (["status"], 2, ["--journal"]),
        (["frobnicate"], 2, ["invalid choice"]),
        ([], 2, ["required"]),
        (["demo", "--tasks", "5", "--journal", "{tmp}/d.db"], 2, ["at least 10"]),
        (
            ["demo", "--journal", "{journal}"],
            1,
            ["not a journal made by 'bgtasks demo'", "tasks named boom"],
        ),
        (["demo", "--journal", "{tmp}/garbage.db"], 1, ["not a journal made by"]),
        (["demo", "--journal", "{tmp}/nodir/d.db"], 1, ["does not exist"]),
        (["worker", "nocolon"], 1, ["expected module:manager"]),
        (["worker", "no_such_module_here:manager"], 1, ["cannot import module"]),
        (["worker", "json:nothing"], 1, ["has no attribute 'nothing'"]),
        (["worker", "json:dumps"], 1, ["not a BackgroundTaskManager"]),
        (["worker", "cli_broken:manager"], 1, ["importing 'cli_broken' failed: ZeroDivisionError"]),
        (["worker", "cli_badimport:manager"], 1, ["ModuleNotFoundError", "nowhere_to_be_found"]),
        (["worker", "cli_memory:manager"], 1, ["has no journal"]),
        (["worker", "cli_memory:manager", "--concurrency", "0"], 2, ["expected a whole number"]),
    ],
)
def test_user_mistakes_print_one_line(
    args: list[str],
    code: int,
    fragments: list[str],
    made: Made,
    tmp_path: Path,
    cli: Cli,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "garbage.db").write_bytes(b"this is not a database" * 100)
    import sqlite3

    with sqlite3.connect(tmp_path / "other.db") as conn:
        conn.execute("CREATE TABLE mine (x)")
    conn.close()
    _worker_module(tmp_path, "cli_broken", "1 / 0\n")
    _worker_module(tmp_path, "cli_badimport", "import nowhere_to_be_found\n")
    _worker_module(
        tmp_path,
        "cli_memory",
        "from background_tasks import BackgroundTaskManager\nmanager = BackgroundTaskManager()\n",
    )
    before = (tmp_path / "garbage.db").read_bytes()
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = [a.format(tmp=tmp_path, journal=made.path) for a in args]
    assert_one_line_error(cli(*argv), code, *fragments)
    assert (tmp_path / "garbage.db").read_bytes() == before  # left as it was
    assert not (tmp_path / "missing.db").exists()  # only demo creates a journal
    assert {t.name for t in (tmp_path / "other.db").parent.iterdir()} >= {"other.db"}


def test_user_mistakes_through_the_entry_point(made: Made, tmp_path: Path) -> None:
    """The real process: one line on stderr, the exit status, and never a traceback."""
    (tmp_path / "garbage.db").write_bytes(b"this is not a database" * 100)
    _worker_module(tmp_path, "cli_broken", "1 / 0\n")
    cases = [
        (["status", "--journal", "missing.db"], 1, "no journal at missing.db"),
        (["list", "--journal", "garbage.db"], 1, "not an SQLite database"),
        (["show", "nope", "--journal", str(made.path)], 1, "no task with id 'nope'"),
        (["list", "--journal", str(made.path), "--status", "lost"], 2, "unknown status"),
        (["worker", "cli_broken:manager"], 1, "ZeroDivisionError"),
    ]
    for args, code, fragment in cases:
        assert_one_line_error(run(*args, cwd=tmp_path), code, fragment)
    assert not (tmp_path / "missing.db").exists()


# ------------------------------------------------------------------ the demo


def test_demo_plan_is_a_realistic_mix() -> None:
    counts = allocate(300)
    assert sum(counts.values()) == 300
    assert min(counts.values()) >= 1
    assert sum(allocate(10).values()) == 10
    batch, urgent, exports = plan(300, seed=7)
    assert len(batch) + len(urgent) + len(exports) == 300
    assert {p.priority for p in urgent} == {10}
    assert any(p.delay for p in batch)
    assert any(p.delay for p in exports)
    assert any(not p.delay for p in exports)  # some are cancelled while running
    assert plan(300, seed=7) == (batch, urgent, exports)  # the seed decides everything
    assert {k.key for k in KINDS} == set(counts)
    assert percentile([], 0.5) != percentile([], 0.5)  # nan
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 0.99) == 99.0


def test_demo_end_to_end(cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich draws the live bars, as in a terminal
    monkeypatch.setenv("COLUMNS", "120")
    path = tmp_path / "demo.db"
    result = cli("demo", "--tasks", "20", "--journal", str(path))
    assert result.code == 0, result
    for word in ("report", "completed", "failed", "cancelled", "retries", "p50", "p99"):
        assert word in result.out
    assert "Traceback" not in result.out + result.err
    monkeypatch.delenv("TTY_COMPATIBLE")
    items = records(cli("list", "--journal", str(path), "--limit", "100", "--json"))
    assert len(items) == 20
    statuses = {i["status"] for i in items}
    assert statuses <= {"completed", "failed", "cancelled"}
    assert "cancelled" in statuses
    assert all(str(i["name"]).startswith("demo.") for i in items)
    assert any(i["attempts"] != 1 for i in items if i["status"] != "cancelled")  # retried
    assert cli("status", "--journal", str(path)).code == 0

    # The real entry point, its output not a terminal (as in CI): progress as plain lines.
    # It replaces the earlier demo journal (and only a demo journal, see the error cases).
    again = run("demo", "--tasks", "10", "--journal", str(path), cwd=tmp_path)
    assert again.code == 0, again
    assert "Traceback" not in again.err
    assert "10/10 finished" in again.out
    assert "\x1b[" not in again.out  # no cursor movement or colour codes
    assert len(json.loads(run("list", "-j", str(path), "--json").out)) == 10


@pytest.mark.slow
def test_the_demos_last_hint_gets_requeued_tasks_run(cli: Cli, tmp_path: Path) -> None:
    """The summary ends with requeue + worker: the worker it names has the demo's tasks
    and serves that journal, so the requeued tasks run (they do not wait for ever)."""
    path = tmp_path / "my demo.db"  # not the default path, and one that needs quoting
    result = cli("demo", "--tasks", "40", "--journal", str(path))
    assert result.code == 0, result
    quoted = f"'{path}'"
    hint = result.out.splitlines()[-2:]
    assert hint == [
        f"  bgtasks requeue --status failed --journal {quoted}",
        f"  BGTASKS_DEMO_JOURNAL={quoted} bgtasks worker background_tasks._demo:worker",
    ]
    assert "<task id>" not in result.out  # the show hint names a failed task
    failed = [i["id"] for i in records(cli("list", "-j", str(path), "-s", "failed", "--json"))]
    assert failed
    requeued = cli("requeue", "--status", "failed", "--journal", str(path))
    assert requeued.out.strip() == f"requeued {len(failed)} failed tasks"

    env = {**os.environ, "BGTASKS_DEMO_JOURNAL": str(path)}
    command = [sys.executable, "-m", "background_tasks", "worker", "background_tasks._demo:worker"]
    worker = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            items = records(cli("list", "-j", str(path), "--limit", "100", "--json"))
            if all(TaskStatus(i["status"]).is_terminal for i in items):
                break
            time.sleep(0.1)
        worker.send_signal(signal.SIGINT)
        _, err = worker.communicate(timeout=20)
    finally:
        worker.kill()
    assert worker.returncode == 0, err
    assert "worker stopped" in err
    by_id = {i["id"]: i for i in items}
    for task_id in failed:
        assert by_id[task_id]["status"] in ("completed", "failed"), by_id[task_id]
        assert by_id[task_id]["attempts"] >= 1  # run again, by the worker
