"""SQLite in a helper process, for `serve`: a storage fault must not kill the relayed sessions.

In WAL mode SQLite maps the database's `-shm` file into memory and writes to it on most
transactions. When the file system stops backing that mapping (the files made immutable, a
copy-on-write file system that is full, a device that went away), the kernel answers the next
write to it with SIGBUS, which no Python code can catch: the process dies on the spot. In the
process that relays every user's session that would drop them all. So `serve` never opens an
SQLite file itself: this module gives SQLAlchemy DB-API connections whose statements run in a
helper process over a UNIX socket. If the helper dies, the statements in flight fail like a
lost database connection (the logins concerned are told to try again, once, and the log says
why), and the next statement starts a new helper; sessions already relayed never notice.

Workers and admin commands use SQLite directly: they have no sessions to lose, and the worker
pool replaces a worker that dies.

Each DB-API connection is one socket and one thread in the helper, and each statement one
round trip (~0.1 ms): the rows of a query come back with its answer.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import re
import secrets
import signal
import sqlite3
import tempfile
import threading
import time
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

import structlog

from migrating_proxy import lifeline, stopsignals

log = structlog.get_logger(__name__)

START_TIMEOUT = 10.0
# After the helper died, statements fail at once for this long rather than start a new
# helper each: while the storage fault lasts, every new one would die on its first write.
RESTART_DELAY = 1.0


class HelperGone(sqlite3.OperationalError):
    """The helper process died (the exit status says how) while a statement was under way."""


class SQLiteProcess:
    """The helper process, started on first use and again after it died."""

    def __init__(self, database: str) -> None:
        self.database = database
        self._directory = Path(tempfile.mkdtemp(prefix="mp-sqlite-"))
        self.address = str(self._directory / "socket")
        self._authkey = secrets.token_bytes(16)
        self._process: multiprocessing.process.BaseProcess | None = None
        self._died_at = -RESTART_DELAY
        self._lock = threading.Lock()

    def connect(self, timeout: float) -> HelperConnection:
        """A DB-API connection (sqlite3.connect's `timeout`: the busy timeout in seconds)."""
        with self._lock:
            self._ensure_running()
        connection = HelperConnection(self._channel(), self)
        try:
            connection.call("open", self.database, timeout)
        except BaseException:
            connection.close()
            raise
        return connection

    def _channel(self) -> Connection:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                return Client(self.address, family="AF_UNIX", authkey=self._authkey)
            except (ConnectionRefusedError, FileNotFoundError):
                # Bound but not listening yet, or died: _ensure_running starts it again.
                if time.monotonic() > deadline:
                    raise sqlite3.OperationalError("no answer from the database process") from None
                time.sleep(0.01)
                with self._lock:
                    self._ensure_running()

    def died(self) -> None:
        """Called when a connection lost its helper."""
        with self._lock:
            if self._process is not None and not self._process.is_alive():
                self._buried()

    def close(self) -> None:
        with self._lock:
            if self._process is not None and self._process.is_alive():
                self._process.terminate()
                self._process.join(5)
            self._process = None
        with contextlib.suppress(OSError):
            os.unlink(self.address)
            self._directory.rmdir()

    def _buried(self) -> None:
        """Log how the helper died, once, and note when (lock held)."""
        assert self._process is not None
        self._process.join()
        log.error("database_process_died", exitcode=self._process.exitcode,
                  reason=_exit_reason(self._process.exitcode))
        self._process, self._died_at = None, time.monotonic()

    def _ensure_running(self) -> None:
        if self._process is not None and self._process.is_alive():
            return
        if self._process is not None:  # died without a statement noticing
            self._buried()
        if time.monotonic() - self._died_at < RESTART_DELAY:
            raise HelperGone("the database process died moments ago")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.address)
        context = multiprocessing.get_context("spawn")
        self._process = context.Process(
            target=_helper_main, args=(self.address, self._authkey, os.getpid()),
            name="sqlite", daemon=True)
        with stopsignals.starting_a_child():
            self._process.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not os.path.exists(self.address):  # bound (listening follows at once)
            if not self._process.is_alive() or time.monotonic() > deadline:
                raise sqlite3.OperationalError("the database process did not start")
            time.sleep(0.01)


def _exit_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        if name == "SIGBUS":
            return ("SIGBUS: the database's files stopped being writable (disk full, "
                    "read-only, immutable?)")
        return name
    return f"exit status {exitcode}"


class HelperConnection:
    """The part of sqlite3.Connection that SQLAlchemy and store.sqlite use."""

    def __init__(self, channel: Connection, helper: SQLiteProcess) -> None:
        self._channel = channel
        self._helper = helper
        self._isolation_level: str | None = ""
        self.in_transaction = False
        self.dead = False  # its helper died: SQLAlchemy's pool replaces it (see db.py)

    def call(self, operation: str, *args: Any) -> Any:
        if self.dead:
            raise HelperGone("the database process died")
        try:
            self._channel.send((operation, args))
            kind, value, self.in_transaction = self._channel.recv()
        except (EOFError, OSError):
            self.dead, self.in_transaction = True, False
            self._helper.died()
            raise HelperGone("the database process died") from None
        if kind == "error":
            name, error_args = value
            error = getattr(sqlite3, name, None)
            if not (isinstance(error, type) and issubclass(error, sqlite3.Error)):
                error = sqlite3.OperationalError
            raise error(*error_args)
        return value

    @property
    def isolation_level(self) -> str | None:
        return self._isolation_level

    @isolation_level.setter
    def isolation_level(self, value: str | None) -> None:
        self.call("isolation_level", value)
        self._isolation_level = value

    def cursor(self) -> HelperCursor:
        return HelperCursor(self)

    def execute(self, sql: str, parameters: Any = ()) -> HelperCursor:
        cursor = self.cursor()
        cursor.execute(sql, parameters)
        return cursor

    def create_function(self, name: str, narg: int, func: Any, **kwargs: Any) -> None:
        self.call("create_function", name, narg, bool(kwargs.get("deterministic")))

    def commit(self) -> None:
        if self.in_transaction or self.dead:  # a dead helper committed nothing: say so
            self.call("commit")

    def rollback(self) -> None:
        # SQLAlchemy rolls back every connection it takes back: skip the round trip when
        # there is nothing to roll back.
        if self.in_transaction:
            self.call("rollback")

    def close(self) -> None:
        with contextlib.suppress(HelperGone, sqlite3.Error):
            self.call("close")
        with contextlib.suppress(OSError):
            self._channel.close()


class HelperCursor:
    """The part of sqlite3.Cursor SQLAlchemy uses; rows arrive with the statement's answer."""

    arraysize = 1

    def __init__(self, connection: HelperConnection) -> None:
        self.connection = connection
        self.description: Any = None
        self.rowcount = -1
        self.lastrowid: int | None = None
        self._rows: list[tuple[Any, ...]] = []

    def execute(self, sql: str, parameters: Any = ()) -> HelperCursor:
        self._take(self.connection.call("execute", sql, _plain(parameters)))
        return self

    def executemany(self, sql: str, seq_of_parameters: Any) -> HelperCursor:
        self._take(self.connection.call("executemany", sql,
                                        [_plain(p) for p in seq_of_parameters]))
        return self

    def _take(self, answer: tuple[Any, list[tuple[Any, ...]], int, int | None]) -> None:
        self.description, self._rows, self.rowcount, self.lastrowid = answer
        self._rows.reverse()  # pop() from the end

    def fetchone(self) -> tuple[Any, ...] | None:
        return self._rows.pop() if self._rows else None

    def fetchmany(self, size: int | None = None) -> list[tuple[Any, ...]]:
        count = min(size or self.arraysize, len(self._rows))
        return [self._rows.pop() for _ in range(count)]

    def fetchall(self) -> list[tuple[Any, ...]]:
        rows, self._rows = self._rows[::-1], []
        return rows

    def close(self) -> None:
        self._rows = []


def _plain(parameters: Any) -> Any:
    """Parameters as pickle carries them: a tuple or a dict, blobs (which SQLAlchemy hands
    over as memoryview, sqlite3.Binary) as bytes."""
    if isinstance(parameters, dict):
        return {key: _value(value) for key, value in parameters.items()}
    return tuple(_value(value) for value in parameters)


def _value(value: Any) -> Any:
    return bytes(value) if isinstance(value, memoryview) else value


# --- the helper process ------------------------------------------------------------------------
def _regexp(pattern: str, value: str | None) -> bool | None:
    return None if value is None else re.search(pattern, value) is not None


# The functions SQLAlchemy's SQLite dialect registers on every connection, by name (the
# callables themselves cannot travel to the helper).
_FUNCTIONS = {"regexp": _regexp, "floor": math.floor}


def _helper_main(address: str, authkey: bytes, parent_pid: int) -> None:
    # Restarted from whichever thread needed a connection: no kernel signal (lifeline.py).
    lifeline.follow(parent_pid, kernel_signal=False)
    with Listener(address, family="AF_UNIX", authkey=authkey) as listener:
        while True:
            channel = listener.accept()
            threading.Thread(target=_serve_connection, args=(channel,), daemon=True).start()


def _serve_connection(channel: Connection) -> None:
    database: sqlite3.Connection | None = None
    with channel:
        while True:
            try:
                operation, args = channel.recv()
            except (EOFError, OSError):
                break
            try:
                if operation == "open":
                    database = sqlite3.connect(args[0], timeout=args[1],
                                               check_same_thread=False)
                    answer = None
                else:
                    assert database is not None
                    answer = _run(database, operation, args)
                reply: tuple[Any, ...] = ("ok", answer)
            except sqlite3.Error as exc:
                reply = ("error", (type(exc).__name__, exc.args))
            if operation == "close":
                channel.send((*reply, False))
                return
            channel.send((*reply, bool(database and database.in_transaction)))
    if database is not None:
        database.close()


def _run(database: sqlite3.Connection, operation: str, args: tuple[Any, ...]) -> Any:
    if operation in ("execute", "executemany"):
        cursor = getattr(database, operation)(*args)
        rows = cursor.fetchall() if cursor.description else []
        return cursor.description, rows, cursor.rowcount, cursor.lastrowid
    if operation == "isolation_level":
        database.isolation_level = args[0]
        return None
    if operation == "create_function":
        name, narg, deterministic = args
        if name not in _FUNCTIONS:
            raise sqlite3.NotSupportedError(f"function {name} is not available here")
        database.create_function(name, narg, _FUNCTIONS[name], deterministic=deterministic)
        return None
    if operation in ("commit", "rollback", "close"):
        return getattr(database, operation)()
    raise sqlite3.ProgrammingError(f"unknown operation {operation}")
