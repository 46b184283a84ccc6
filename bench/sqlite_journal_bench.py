"""What SQLite's WAL and the ways around its memory-mapped -shm file cost, in one run.

WAL maps the -shm file, which is how a storage fault becomes SIGBUS (see
store/sqlite_process.py). The alternatives measured here, on the file system of --directory:

- WAL, statements in this process (what workers and admin commands do);
- WAL, statements in a helper process (what `serve` does): the price of the round trip;
- rollback journals (TRUNCATE, DELETE, PERSIST), which map nothing: every commit pays its
  fsyncs, and readers and writers block each other.

For each: one-row update transactions and one-row lookups alone, then both at once (one writer
process, two reader processes).

    .venv/bin/python bench/sqlite_journal_bench.py [--directory DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import text

from migrating_proxy.store import sqlite
from migrating_proxy.store.db import make_engine
from migrating_proxy.store.sqlite_process import SQLiteProcess

ROWS = 2000


def engine(path: Path, mode: str, helper: SQLiteProcess | None = None):  # type: ignore[no-untyped-def]
    """The project's engine, with its journal mode replaced by `mode` (set per connection:
    switching a database between WAL and a rollback journal needs it to itself)."""
    project_pragmas = sqlite.__dict__.setdefault("_project_pragmas", sqlite._pragmas)

    def pragmas(dbapi_connection, lock_timeout: float) -> None:  # type: ignore[no-untyped-def]
        if mode == "WAL":
            project_pragmas(dbapi_connection, lock_timeout)
            return
        dbapi_connection.isolation_level = None
        for pragma in (f"journal_mode={mode}", "foreign_keys=ON",
                       f"busy_timeout={int(lock_timeout * 1000)}", "synchronous=NORMAL"):
            dbapi_connection.execute(f"PRAGMA {pragma}")

    sqlite._pragmas = pragmas
    return make_engine(f"sqlite:///{path}", sqlite_process=helper)


def prepare(path: Path, mode: str) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    made = engine(path, mode)
    with made.begin() as conn:
        conn.execute(text("CREATE TABLE a (id INTEGER PRIMARY KEY, k TEXT UNIQUE, t REAL)"))
        conn.execute(text("INSERT INTO a (k, t) VALUES (:k, 0)"),
                     [{"k": f"u{n}"} for n in range(ROWS)])
    made.dispose()


def writes(path: Path, mode: str, count: int, isolated: bool = False) -> list[float]:
    helper = SQLiteProcess(str(path)) if isolated else None
    made = engine(path, mode, helper)
    latencies = []
    for n in range(count):
        started = time.perf_counter()
        with made.begin() as conn:
            conn.execute(text("UPDATE a SET t = :t WHERE k = :k"),
                         {"t": time.time(), "k": f"u{n % ROWS}"})
        latencies.append(time.perf_counter() - started)
    made.dispose()
    if helper is not None:
        helper.close()
    return latencies


def reads(path: Path, mode: str, count: int, isolated: bool = False) -> list[float]:
    helper = SQLiteProcess(str(path)) if isolated else None
    made = engine(path, mode, helper)
    latencies = []
    for n in range(count):
        started = time.perf_counter()
        with made.connect() as conn:
            conn.execute(text("SELECT * FROM a WHERE k = :k"), {"k": f"u{n * 7 % ROWS}"}).one()
        latencies.append(time.perf_counter() - started)
    made.dispose()
    if helper is not None:
        helper.close()
    return latencies


def _run(args: tuple) -> list[float]:  # type: ignore[type-arg]
    kind, path, mode, count, isolated = args
    return (writes if kind == "write" else reads)(path, mode, count, isolated)


def ms(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--directory", type=Path, default=None)
    args = parser.parse_args()
    directory = args.directory or Path(tempfile.mkdtemp(prefix="mp-journal-"))
    path = directory / "bench.db"
    print(f"SQLite journal modes, {dt.date.today()}, {platform.node()}, on {directory}")
    print(f"{'':26} {'write med':>9} {'p99':>7} {'read med':>9} {'p99':>7} | "
          f"with 2 readers: {'write med':>9} {'p99':>7} {'read p99':>9} {'max':>7} ms")
    context = multiprocessing.get_context("spawn")
    for mode, isolated in (("WAL", False), ("WAL", True), ("TRUNCATE", False),
                           ("DELETE", False), ("PERSIST", False)):
        prepare(path, mode)
        alone_w, alone_r = writes(path, mode, 300, isolated), reads(path, mode, 2000, isolated)
        with context.Pool(3) as pool:
            busy_w, *busy_r = pool.map(_run, [("write", path, mode, 300, isolated),
                                             ("read", path, mode, 3000, isolated),
                                             ("read", path, mode, 3000, isolated)])
        both_r = [x for r in busy_r for x in r]
        label = f"{mode}{', helper process' if isolated else ''}"
        print(f"{label:26} {ms(alone_w, .5):9.2f} {ms(alone_w, .99):7.2f} "
              f"{ms(alone_r, .5):9.3f} {ms(alone_r, .99):7.3f} | "
              f"{'':15} {ms(busy_w, .5):9.2f} {ms(busy_w, .99):7.2f} {ms(both_r, .99):9.2f} "
              f"{max(both_r) * 1000:7.1f}")


if __name__ == "__main__":
    main()
