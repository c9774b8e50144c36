"""End to end: the example app under a real uvicorn, with a SQLite journal.

These start real processes on 127.0.0.1 (free ports), so they are synchronous tests: the
event loop under test is uvicorn's, in the child process, not the test's. The app is
``examples/fastapi_app.py`` wrapped by ``served_app`` below, which only adds an
``x-worker-pid`` header so a test can tell which worker process answered.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def served_app() -> ASGIApp:
    """uvicorn --factory target: the example app, answering with its worker's pid."""
    from examples.fastapi_app import app

    pid = str(os.getpid()).encode()

    async def with_pid(scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_pid(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-worker-pid", pid)]
            await send(message)

        await app(scope, receive, send_with_pid if scope["type"] == "http" else send)

    return with_pid


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    def __init__(self, process: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.process = process
        self.url = f"http://127.0.0.1:{port}"
        self.log = log

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> bool:
        """SIGTERM, then True if uvicorn shut down cleanly (it re-raises the signal)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:  # pragma: no cover - a hung server fails the test
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"uvicorn did not stop on SIGTERM:\n{self.output()}") from None
        return code in (0, -signal.SIGTERM) and "Finished server process" in self.output()


@contextmanager
def uvicorn(tmp_path: Path, journal: Path, *extra: str, **env: str) -> Iterator[Server]:
    port = free_port()
    log = tmp_path / f"uvicorn-{port}.log"
    command = [
        sys.executable, "-m", "uvicorn", "--factory", "test_fastapi_uvicorn:served_app",
        "--app-dir", str(ROOT / "tests"), "--host", "127.0.0.1", "--port", str(port),
        "--log-level", "info", *extra,
    ]  # fmt: skip
    environ = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "BGTASKS_JOURNAL": str(journal),
        "EXAMPLE_PAGE_SECONDS": "0.2",
        **env,
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, cwd=ROOT, env=environ, stdout=out, stderr=subprocess.STDOUT
        )
    server = Server(process, port, log)
    try:
        deadline = time.monotonic() + 30
        with httpx.Client(base_url=server.url, timeout=1) as probe:
            while True:
                assert process.poll() is None, f"uvicorn exited early:\n{server.output()}"
                try:
                    if probe.get("/tasks").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, f"uvicorn did not start:\n{server.output()}"
                time.sleep(0.05)
        yield server
    finally:
        server.stop()


def submit(client: httpx.Client, pages: int) -> httpx.Response:
    response = client.post("/reports", json={"pages": pages})
    assert response.status_code == 202, response.text
    assert response.headers["location"].endswith(f"/tasks/{response.json()['id']}")
    return response


def test_sigterm_mid_run_then_restart_completes_the_task(tmp_path: Path) -> None:
    journal = tmp_path / "tasks.db"

    def poll(client: httpx.Client, task_id: str, done: Callable[[dict[str, Any]], bool]) -> None:
        deadline = time.monotonic() + 15
        while not done(client.get(f"/tasks/{task_id}").json()):
            assert time.monotonic() < deadline
            time.sleep(0.05)

    # SIGTERM with two tasks running: the short one finishes within shutdown_timeout, the
    # long one is cut short, stays PENDING in the journal and runs after the restart.
    with uvicorn(tmp_path, journal, EXAMPLE_SHUTDOWN_TIMEOUT="2.5") as server:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            long_id = submit(client, pages=30).json()["id"]  # 6 s
            poll(client, long_id, lambda record: record["progress"] is not None)
            short_id = submit(client, pages=2).json()["id"]  # 0.4 s
            poll(client, short_id, lambda record: record["status"] == "running")
        started = time.monotonic()
        assert server.stop(), server.output()
        assert time.monotonic() - started < 10
        assert "Application shutdown complete" in server.output()

    with (
        uvicorn(tmp_path, journal, EXAMPLE_PAGE_SECONDS="0.02") as server,
        httpx.Client(base_url=server.url, timeout=40) as client,
    ):
        short = client.get(f"/tasks/{short_id}").json()
        assert short["status"] == "completed", short  # finished within shutdown_timeout
        assert short["recoveries"] == 0
        assert short["result"] == {"pages": 2, "download": f"/reports/{short_id}.pdf"}

        record = client.get(f"/tasks/{long_id}", params={"wait": 30}).json()
        assert record["status"] == "completed", record
        assert record["recoveries"] == 1  # cut short once, by the SIGTERM
        # Two attempts started, but the one cut short did not use up the only one allowed.
        assert record["attempts"] == 2
        assert record["max_attempts"] == 1
        assert record["result"]["pages"] == 30
        assert record["progress"]["fraction"] == 1.0


def test_two_workers_share_one_journal(tmp_path: Path) -> None:
    journal = tmp_path / "tasks.db"
    with (
        uvicorn(tmp_path, journal, "--workers", "2") as server,
        # No keep-alive: a new connection per request, which either worker may accept.
        httpx.Client(
            base_url=server.url, timeout=20, limits=httpx.Limits(max_keepalive_connections=0)
        ) as client,
    ):
        submitted: dict[str, str] = {}  # task id -> pid of the worker that accepted it
        deadline = time.monotonic() + 30
        while len(set(submitted.values())) < 2:
            assert time.monotonic() < deadline, f"one worker took every request: {submitted}"
            response = submit(client, pages=1)
            submitted[response.json()["id"]] = response.headers["x-worker-pid"]

        # Every task is served, finished, by the worker that did not accept it.
        served_elsewhere: set[str] = set()
        deadline = time.monotonic() + 30
        while served_elsewhere != set(submitted):
            assert time.monotonic() < deadline, (submitted, served_elsewhere)
            for task_id, pid in submitted.items():
                response = client.get(f"/tasks/{task_id}", params={"wait": 10})
                assert response.status_code == 200, response.text
                assert response.json()["status"] == "completed", response.json()
                if response.headers["x-worker-pid"] != pid:
                    served_elsewhere.add(task_id)

        listed = client.get("/tasks", params={"name": "build_report", "limit": 1000}).json()
        assert set(submitted) <= {record["id"] for record in listed}
        assert server.stop(), server.output()
