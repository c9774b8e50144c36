"""The PostgreSQL journal's notifications: LISTEN on a connection of its own, waited on
from the event loop.

``wait`` parks no thread: it waits for the connection's socket to become readable
(``anyio.wait_readable``), then lets libpq read what arrived (``consume_input``) and
looks at the notifications (``notifies``), exactly what psycopg's own ``notifies()``
does, so a wait is cancellable at once. One caller reads the socket; concurrent
callers share its wake-up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import anyio.to_thread
import psycopg

__all__ = ["Listener"]


class Listener:
    """Wake-ups for one journal (``schema``) and its ``owner``, whose own writes do not
    count. The connection is opened on first use, and again after it broke, with
    ``connect``, which returns it listening on ``CHANNEL`` (worker thread)."""

    def __init__(
        self, connect: Callable[[], psycopg.Connection[Any]], schema: str, owner: str
    ) -> None:
        self._connect = connect
        self._mine = f"{schema} {owner}"
        self._prefix = f"{schema} "
        self.conn: psycopg.Connection[Any] | None = None
        self._listening: anyio.CancelScope | None = None  # the wait that reads the socket
        self._listen_done: anyio.Event | None = None
        self._wake = anyio.Event()  # set when that wait ends, for the waits sharing it

    async def wait(self, timeout: float) -> None:
        """``NotifyingJournal.wait_for_changes`` for ``timeout > 0``."""
        with anyio.move_on_after(timeout):
            if self._listening is not None:
                await self._wake.wait()
                return
            scope = self._listening = anyio.CancelScope()
            done = self._listen_done = anyio.Event()
            try:
                with scope:
                    await self._listen()
            finally:
                self._listening = self._listen_done = None
                done.set()
                wake, self._wake = self._wake, anyio.Event()
                wake.set()

    async def stop(self) -> psycopg.Connection[Any] | None:
        """End a wait in progress; returns the connection (or None) for the caller to close."""
        listening, done = self._listening, self._listen_done
        if listening is not None and done is not None:
            listening.cancel()
            with anyio.CancelScope(shield=True):
                await done.wait()
        conn, self.conn = self.conn, None
        return conn

    async def _listen(self) -> None:
        conn = self.conn
        if conn is None or conn.broken or conn.closed:
            self.conn = None
            try:
                self.conn = await anyio.to_thread.run_sync(self._connect_listener, conn)
            except psycopg.Error:
                await anyio.sleep_forever()  # the server is away: wait out the timeout
            return
        pgconn, fd = conn.pgconn, conn.fileno()
        mine, prefix = self._mine, self._prefix
        while True:
            try:
                pgconn.consume_input()
                seen = False
                while (n := pgconn.notifies()) is not None:
                    payload = n.extra.decode()
                    if payload.startswith(prefix) and payload != mine:
                        seen = True
                if seen:
                    return
            except psycopg.Error:
                return  # broken: the next call connects again (and returns at once)
            await anyio.wait_readable(fd)

    def _connect_listener(self, old: psycopg.Connection[Any] | None) -> psycopg.Connection[Any]:
        if old is not None:
            old.close()
        return self._connect()
