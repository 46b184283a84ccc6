"""Opening the database: engine settings per dialect and versioned schema creation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Column, Connection, Engine, create_engine, event, inspect, select, text
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.schema import CreateColumn

from migrating_proxy.store.schema import (
    SCHEMA_VERSION,
    WEB_INDEXES,
    WEB_TABLES,
    close_requests,
    metadata,
    schema_info,
)
from migrating_proxy.store.sqlite import configure as configure_sqlite
from migrating_proxy.store.sqlite_process import HelperGone, SQLiteProcess
from migrating_proxy.store.views import create_views


class DatabaseError(Exception):
    """The database cannot be used: unreachable, or a schema newer than this program."""


def _add_domain_source_ca(conn: Connection) -> None:
    """Version 2: domains.source_ca (`domain add --source-ca`)."""
    conn.exec_driver_sql("ALTER TABLE domains ADD COLUMN source_ca TEXT")


def _add_close_requests(conn: Connection) -> None:
    """Version 3: close_requests (store/sessions.py)."""
    close_requests.create(conn, checkfirst=True)


def add_column(conn: Connection, column: Column, default_sql: str | None = None) -> None:
    """ALTER TABLE ... ADD COLUMN in the connection's dialect. `default_sql` is the value rows
    that already exist get (and the column's server default), e.g. "'immediate'"."""
    ddl = str(CreateColumn(column).compile(dialect=conn.dialect))
    if default_sql is not None:  # SQLite adds a NOT NULL column only with a default
        ddl = ddl.replace(" NOT NULL", "") + f" DEFAULT {default_sql}"
        ddl += "" if column.nullable else " NOT NULL"
    conn.execute(text(f"ALTER TABLE {column.table.name} ADD COLUMN {ddl}"))


def _v4_transparent_cutover(conn: Connection) -> None:
    """Version 4: cutover modes, the old server's POP3 service, where each account is served.

    Domains that exist keep today's behaviour (`immediate`) and every existing account is
    served by the store, as it was; only domains added from now on default to passthrough.
    The copy's per-folder HIGHESTMODSEQ starts unknown (the next pass sweeps FLAGS once).
    old_sessions (sessions relayed to old servers) is a new table.
    """
    from migrating_proxy.store.copystate import copy_folders
    from migrating_proxy.store.schema import accounts, domains, old_sessions

    add_column(conn, domains.c.pop3_source_url)
    add_column(conn, domains.c.cutover, "'immediate'")
    add_column(conn, accounts.c.served_by, "'store'")
    add_column(conn, accounts.c.switched_at)
    add_column(conn, accounts.c.hold_until)
    add_column(conn, copy_folders.c.synced_modseq)
    old_sessions.create(conn, checkfirst=True)


def _v5_copy_engines(conn: Connection) -> None:
    """Version 5: the dsync engine (domains.engine; migrations.copy_engine, engine_note,
    uids_kept)."""
    from migrating_proxy.store.schema import domains, migrations

    add_column(conn, domains.c.engine)
    for name in ("copy_engine", "engine_note", "uids_kept"):
        add_column(conn, migrations.c[name])


def _add_dovecot_users_view(conn: Connection) -> None:
    """Version 6: the dovecot_users view (store/views.py) for Dovecot's SQL passdb."""
    create_views(conn)


def _v8_pop3_continuity(conn: Connection) -> None:
    """Version 8: POP3 continuity (pop3_uidls.position and store_uidl, migrations.pop3_uidls).

    Only the columns still missing: like version 7's tables, this step may meet a database
    that a test (or an interrupted hand upgrade) labelled older than its tables are."""
    from migrating_proxy.store.schema import migrations, pop3_uidls

    for column in (pop3_uidls.c.position, pop3_uidls.c.store_uidl, migrations.c.pop3_uidls):
        present = {c["name"] for c in inspect(conn).get_columns(column.table.name)}
        if column.name not in present:
            add_column(conn, column)


def _add_web_console(conn: Connection) -> None:
    """Version 7: the web console's admin users, tokens, sessions and the audit trail."""
    for table in WEB_TABLES:
        table.create(conn, checkfirst=True)
    for index in WEB_INDEXES:
        index.create(conn, checkfirst=True)


def _v9_prestage(conn: Connection) -> None:
    """Version 9: pre-stage (the old server's admin per domain, when an account was
    pre-staged; the new tables, its secret and the per-host pacing, come from create_all).
    Only the columns still missing, as in version 8's step."""
    from migrating_proxy.store.schema import domains, migrations

    for column in (domains.c.source_admin, domains.c.source_admin_style,
                   domains.c.source_admin_separator, migrations.c.prestaged_at):
        present = {c["name"] for c in inspect(conn).get_columns(column.table.name)}
        if column.name not in present:
            add_column(conn, column)


# version -> step that brings a database from version-1 to version.
UPGRADES: dict[int, Callable[[Connection], None]] = {
    2: _add_domain_source_ca,
    3: _add_close_requests,
    4: _v4_transparent_cutover,
    5: _v5_copy_engines,
    6: _add_dovecot_users_view,
    7: _add_web_console,
    8: _v8_pop3_continuity,
    9: _v9_prestage,
}


# Seconds a statement waits for a lock another connection holds (SQLite's busy timeout,
# PostgreSQL's lock_timeout) before failing. Workers and admin commands can afford to wait;
# `serve` passes less, because a client is waiting for each login (see server.py).
DEFAULT_LOCK_TIMEOUT = 30.0


def make_engine(url: str, lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
                sqlite_process: SQLiteProcess | None = None) -> Engine:
    """Engine with the settings each dialect needs for several processes sharing one database.

    `sqlite_process`: run SQLite's statements in that helper process (see sqlite_process.py)."""
    # Enough connections for every thread of serve's pools, held only per statement batch.
    pooling = {"pool_size": 10, "max_overflow": 40, "pool_timeout": lock_timeout}
    if url.startswith("sqlite"):
        _ensure_sqlite_directory(url)
        if sqlite_process is not None:
            engine = create_engine(url, creator=lambda: sqlite_process.connect(lock_timeout),
                                   **pooling)
            event.listen(engine, "checkout", _replace_dead_connection)
            event.listen(engine, "handle_error", _lost_helper_is_a_disconnect)
        else:
            engine = create_engine(url, connect_args={"timeout": lock_timeout,
                                                      "check_same_thread": False}, **pooling)
        configure_sqlite(engine, lock_timeout)
        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    options = f"-c lock_timeout={int(lock_timeout * 1000)}"
    try:
        return create_engine(url, pool_pre_ping=True, connect_args={"options": options},
                             **pooling)
    except ImportError as exc:  # installed without the [postgresql] extra
        raise DatabaseError(f"cannot use {url.split(':', 1)[0]}: the driver is not installed "
                            f"({exc.name}; install migrating-proxy[postgresql])") from None
    except Exception as exc:  # SQLAlchemy: unknown dialect or driver, bad arguments
        raise DatabaseError(f"cannot use the database URL: {_one_line(exc)}") from None


def sqlite_path(url: str) -> str:
    return url.split(":///", 1)[-1]


def _replace_dead_connection(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    if getattr(dbapi_connection, "dead", False):  # its helper died since it was last used
        raise DisconnectionError("the database process died")


def _lost_helper_is_a_disconnect(context: ExceptionContext) -> None:
    if isinstance(context.original_exception, HelperGone):
        context.is_disconnect = True  # drop the pooled connections to the dead helper


def _ensure_sqlite_directory(url: str) -> None:
    path = sqlite_path(url)
    if path and path != ":memory:":
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DatabaseError(
                f"cannot create the directory of {path}: {exc.strerror}"
            ) from None


def ensure_schema(engine: Engine) -> None:
    """Create the tables on a new database, or upgrade an older one step by step."""
    try:
        with engine.begin() as conn:
            _serialise_schema_changes(conn)
            if not inspect(conn).has_table("schema_info"):
                metadata.create_all(conn)
                create_views(conn)
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
            if version < SCHEMA_VERSION:
                create_views(conn)  # views follow the tables of the new version
            conn.execute(schema_info.update().values(version=SCHEMA_VERSION))
    except DatabaseError:
        raise
    except Exception as exc:  # driver errors: unreachable server, bad credentials, locked file
        raise DatabaseError(f"cannot open database: {_one_line(exc)}") from None


# Any constant: the key of the advisory lock every process takes while it checks the schema.
_SCHEMA_LOCK = 0x6D70_7363  # "mpsc"


def _serialise_schema_changes(conn: Connection) -> None:
    """Machines sharing a PostgreSQL database start at once (serve, worker, admin commands):
    without a lock, two of them creating the tables of a new database collide on PostgreSQL's
    catalogue (UniqueViolation) and one fails to start. The lock ends with the transaction.
    SQLite needs none: BEGIN IMMEDIATE already serialises writers."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_SCHEMA_LOCK})")


def _one_line(exc: Exception) -> str:
    """The driver's own message, first line only: the CLI prints errors as one line, and
    SQLAlchemy's wrapper adds the statement and a "Background on this error" link."""
    cause = getattr(exc, "orig", None) or exc
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0].strip() if lines else 'no details'}"
