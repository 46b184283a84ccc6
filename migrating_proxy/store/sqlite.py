"""SQLite as a database that several processes (serve, workers, admin commands) share.

WAL journal: readers never wait for the writer, nor the writer for readers. Transactions:

- Writes are always `engine.begin()` blocks. They take the write lock at BEGIN (IMMEDIATE), so
  read-then-write transactions (claiming a job, creating an account) cannot deadlock or lose
  updates between processes. Within one process they queue on a lock of our own first: SQLite's
  busy handler makes a waiting writer sleep in growing steps (up to 100 ms) and poll, and a
  burst of forty first logins spent more time asleep than writing.
- Reads are `engine.connect()` blocks, whose transaction SQLAlchemy begins with their first
  statement ("autobegin"). They get a plain BEGIN: a snapshot that neither waits for a writer
  nor blocks one. (With IMMEDIATE there, every login's lookups queued for the write lock behind
  an admin import or a burst of first logins.) The two are told apart by whether a statement is
  already on its way when the transaction begins.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from typing import Any

from sqlalchemy import Connection, Engine, event
from sqlalchemy.exc import OperationalError

_AUTOBEGIN = "migrating_proxy.autobegin"
_WRITING = "migrating_proxy.writing"
_SHORTENED = "migrating_proxy.busy_timeout_shortened"


def configure(engine: Engine, lock_timeout: float) -> None:
    """Pragmas on every new connection, and the transactions described above."""
    writers = _Writers(lock_timeout)
    event.listen(engine, "connect", lambda dbapi_connection, _record:
                 _pragmas(dbapi_connection, lock_timeout))
    event.listen(engine, "before_execute", _note_autobegin)
    event.listen(engine, "begin", writers.begin)
    event.listen(engine, "commit", writers.end)
    event.listen(engine, "rollback", writers.end)


def _pragmas(dbapi_connection: Any, lock_timeout: float) -> None:
    # pysqlite's own transaction handling would defer BEGIN; we issue it ourselves (below).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers don't block the writer
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={int(lock_timeout * 1000)}")  # other processes
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _note_autobegin(connection: Connection, *_args: object) -> None:
    if not connection.in_transaction():  # this statement is about to begin one
        connection.info[_AUTOBEGIN] = True


class _Writers:
    """This process's write transactions, one at a time, in turn."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._lock = threading.Lock()

    def begin(self, connection: Connection) -> None:
        try:
            self._begin(connection)
        except sqlite3.Error as exc:  # as if SQLAlchemy had run the statement itself
            raise OperationalError("BEGIN", None, exc) from None

    def _begin(self, connection: Connection) -> None:
        # Straight to the driver: a statement through SQLAlchemy would fire the hooks.
        driver = connection.connection.dbapi_connection
        assert driver is not None
        if connection.info.pop(_AUTOBEGIN, False):
            driver.execute("BEGIN")
            return
        started = time.monotonic()
        if not self._lock.acquire(timeout=self.timeout):
            raise sqlite3.OperationalError(f"no turn to write within {self.timeout:g} s")
        connection.info[_WRITING] = True
        try:
            # Waiting for SQLite's lock (held by another process) gets what is left of the
            # timeout, so that the whole wait stays within it.
            left = self.timeout - (time.monotonic() - started)
            if left < self.timeout - 0.05 or connection.info.pop(_SHORTENED, False):
                driver.execute(f"PRAGMA busy_timeout={max(1, int(left * 1000))}")
                connection.info[_SHORTENED] = left < self.timeout - 0.05
            driver.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.end(connection)
            raise

    def end(self, connection: Connection) -> None:
        # Runs just before the driver's COMMIT or ROLLBACK: the next writer's BEGIN IMMEDIATE
        # may find the lock still held and wait a first millisecond in SQLite's busy handler.
        if connection.info.pop(_WRITING, False):
            self._lock.release()
