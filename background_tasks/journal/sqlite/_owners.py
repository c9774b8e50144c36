"""Which owners of a SQLite journal are alive: an OS lock each one holds.

Every open ``SQLiteJournal`` holds an exclusive ``flock`` on a file of its own in a
directory beside the database (``tasks.db-owners/``). The kernel releases the lock when
the process dies, however it died (``kill -9`` included), and a pid reused by another
program holds no such lock, so "its lock can be taken" means "that owner is dead" with
certainty, at once: its RUNNING tasks can be taken over without waiting for a lease.
A process that hangs keeps its lock (only its lease expires, and the lease decides).

The file is created under a temporary name, locked, then renamed into place, so an
observer never finds an owner's file before it is locked. Closing the journal lets go of
the lock (its owner is gone); the file of a gone owner is removed, when a journal opens,
once none of its tasks is RUNNING.
Without a writable directory (a read-only location) nothing is known: leases decide.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from collections.abc import Iterable

__all__ = ["OwnerLocks"]

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class OwnerLocks:
    """This journal's own lock, and the test of other owners' locks."""

    def __init__(self, database: str) -> None:
        self.directory = os.path.abspath(database) + "-owners"
        self._fd: int | None = None
        self._path: str | None = None

    def _file(self, owner: str) -> str:
        return os.path.join(self.directory, _UNSAFE.sub("_", owner) + ".lock")

    def hold(self, owner: str) -> None:
        """Take this owner's lock (worker thread); nothing if the directory cannot be made."""
        try:
            os.makedirs(self.directory, exist_ok=True)
            path = self._file(owner)
            temporary = f"{path}.{os.getpid()}.new"
            fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, f"{owner}\n".encode())
            os.replace(temporary, path)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            return
        self._fd, self._path = fd, path

    def release(self) -> None:
        """Let go of this owner's lock (a closed journal's owner is gone, as a dead one
        is; its file is removed by a later ``forget``, once it holds no task)."""
        fd = self._fd
        self._fd = self._path = None
        if fd is not None:
            os.close(fd)

    def dead(self, owners: Iterable[str]) -> set[str]:
        """Those of ``owners`` whose lock file exists and whose lock is free (worker
        thread). An owner without a file (an older version, or a read-only directory)
        is not known to be dead."""
        found = set()
        for owner in owners:
            try:
                fd = os.open(self._file(owner), os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # held: alive
            else:
                found.add(owner)
            finally:
                os.close(fd)  # releases our probe's lock too
        return found

    def forget(self, owners: Iterable[str]) -> None:
        """Remove the files of dead owners that no longer hold any task."""
        for owner in owners:
            with contextlib.suppress(OSError):
                os.unlink(self._file(owner))
