"""Opening the database: engine settings per dialect and versioned schema creation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event, inspect, select

from migrating_proxy.store.schema import (
    SCHEMA_VERSION,
    WEB_INDEXES,
    WEB_TABLES,
    close_requests,
    metadata,
    schema_info,
)


class DatabaseError(Exception):
    """The database cannot be used: unreachable, or a schema newer than this program."""


def _add_domain_source_ca(conn: Connection) -> None:
    """Version 2: domains.source_ca (`domain add --source-ca`)."""
    conn.exec_driver_sql("ALTER TABLE domains ADD COLUMN source_ca TEXT")


def _add_close_requests(conn: Connection) -> None:
    """Version 3: close_requests (store/sessions.py)."""
    close_requests.create(conn, checkfirst=True)


def _add_web_console(conn: Connection) -> None:
    """Version 4: the web console's admin users, tokens, sessions and the audit trail."""
    for table in WEB_TABLES:
        table.create(conn, checkfirst=True)
    for index in WEB_INDEXES:
        index.create(conn, checkfirst=True)


# version -> step that brings a database from version-1 to version.
UPGRADES: dict[int, Callable[[Connection], None]] = {
    2: _add_domain_source_ca,
    3: _add_close_requests,
    4: _add_web_console,
}


def make_engine(url: str) -> Engine:
    """Engine with the settings each dialect needs for several processes sharing one database."""
    if url.startswith("sqlite"):
        _ensure_sqlite_directory(url)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin_immediate)
        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)


def _ensure_sqlite_directory(url: str) -> None:
    path = url.split(":///", 1)[-1]
    if path and path != ":memory:":
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DatabaseError(
                f"cannot create the directory of {path}: {exc.strerror}"
            ) from None


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    # pysqlite's own transaction handling would defer BEGIN; we issue it ourselves (below).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers don't block the writer
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _sqlite_begin_immediate(connection: Connection) -> None:
    # Take the write lock at BEGIN so read-then-write transactions (claiming a job, creating an
    # account) cannot deadlock or lose updates between processes.
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def ensure_schema(engine: Engine) -> None:
    """Create the tables on a new database, or upgrade an older one step by step."""
    try:
        with engine.begin() as conn:
            if not inspect(conn).has_table("schema_info"):
                metadata.create_all(conn)
                conn.execute(schema_info.insert().values(id=1, version=SCHEMA_VERSION))
                return
            version = conn.execute(select(schema_info.c.version)).scalar_one()
            if version > SCHEMA_VERSION:
                raise DatabaseError(
                    f"database schema version {version} is newer than this program "
                    f"({SCHEMA_VERSION}); upgrade migrating-proxy"
                )
            for step in range(version + 1, SCHEMA_VERSION + 1):
                UPGRADES[step](conn)
            metadata.create_all(conn)  # tables added by a new version
            conn.execute(schema_info.update().values(version=SCHEMA_VERSION))
    except DatabaseError:
        raise
    except Exception as exc:  # driver errors: unreachable server, bad credentials, locked file
        raise DatabaseError(f"cannot open database: {_one_line(exc)}") from None


def _one_line(exc: Exception) -> str:
    """The driver's own message, first line only: the CLI prints errors as one line, and
    SQLAlchemy's wrapper adds the statement and a "Background on this error" link."""
    cause = getattr(exc, "orig", None) or exc
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0].strip() if lines else 'no details'}"
