"""A PostgreSQL cluster of a test's own (Debian's ``initdb`` + ``pg_ctl`` on a free port,
in a temporary directory), which the fault tests restart, stop and start again; it is
stopped and removed at the end. Imported as ``pgcluster`` (tests/ is on sys.path)."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator

import psycopg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """One throwaway server; ``dsn`` reaches its ``postgres`` database."""

    def __init__(self) -> None:
        initdbs = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not initdbs:
            raise RuntimeError("no /usr/lib/postgresql/*/bin/initdb (apt-get install postgresql)")
        self.bindir = os.path.dirname(initdbs[-1])
        self.tmp = tempfile.mkdtemp(prefix="bgtasks-pgfault-")
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # the server refuses to run as root
            shutil.chown(self.tmp, "postgres", "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.data = os.path.join(self.tmp, "data")
        self.port = _free_port()
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._run(f"{self.bindir}/initdb", "-D", self.data, "-A", "trust", "-U", "postgres",
                  "--no-sync")  # fmt: skip
        self.start()

    def _run(self, *cmd: str) -> None:
        subprocess.run([*self.as_user, *cmd], check=True, capture_output=True, text=True,
                       timeout=60)  # fmt: skip

    def _ctl(self, *args: str) -> None:
        self._run(f"{self.bindir}/pg_ctl", "-D", self.data, *args)

    def start(self) -> None:
        options = f"-k {self.tmp} -c listen_addresses=127.0.0.1 -p {self.port} -c fsync=off"
        self._ctl("-o", options, "-l", f"{self.tmp}/log", "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._ctl("-m", mode, "-w", "stop")

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def terminate_backends(self) -> int:
        """``pg_terminate_backend`` of every other session; how many were ended."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'"
            ).fetchall()
        return sum(1 for (ok,) in rows if ok)

    def close(self) -> None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            self.stop("immediate")
        shutil.rmtree(self.tmp, ignore_errors=True)


@contextlib.contextmanager
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    try:
        yield c
    finally:
        c.close()
