"""The store side of the web console, on SQLite and PostgreSQL: the schema upgrade that adds it,
admin users, tokens and sessions, the audit trail, and paged status rows."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import insert, inspect, select, update

from migrating_proxy.admin import Actor, audit
from migrating_proxy.store import Store, StoreError, open_store
from migrating_proxy.store import audit as audit_trail
from migrating_proxy.store.accounts import AccountStore, Domain, now
from migrating_proxy.store.admins import AdminStore, digest
from migrating_proxy.store.db import UPGRADES, make_engine
from migrating_proxy.store.schema import (
    SCHEMA_VERSION,
    WEB_INDEXES,
    WEB_TABLES,
    admin_tokens,
    metadata,
    migrations,
    schema_info,
    web_sessions,
)
from migrating_proxy.store.status import StatusQuery, domain_totals, status_page

WEB_CONSOLE_VERSION = next(v for v, step in UPGRADES.items() if step.__name__ == "_add_web_console")


def test_a_database_without_the_console_is_upgraded_in_place(store_url: str) -> None:
    engine = make_engine(store_url)
    try:
        with engine.begin() as conn:  # the database as the version before the console left it
            tables = [t for t in metadata.sorted_tables if t not in WEB_TABLES]
            metadata.create_all(conn, tables=tables)
            for index in WEB_INDEXES:
                index.drop(conn)
            conn.execute(schema_info.insert().values(id=1, version=WEB_CONSOLE_VERSION - 1))
        AccountStore(engine).add_domain(Domain("old.example", "imap://h:143"))
        AccountStore(engine).add_account("alice@old.example", "$6$x", migration_state="NEW")
    finally:
        engine.dispose()
    store = open_store(store_url)
    try:
        with store.engine.connect() as conn:
            assert conn.execute(select(schema_info.c.version)).scalar_one() == SCHEMA_VERSION
            found = inspect(conn)
            assert {t.name for t in WEB_TABLES} <= set(found.get_table_names())
            indexes = {i["name"] for t in ("accounts", "jobs") for i in found.get_indexes(t)}
            assert {index.name for index in WEB_INDEXES} <= indexes
        assert store.accounts.get_account("alice@old.example") is not None  # data kept
        assert AdminStore(store.engine).add_user("admin", "$6$y").name == "admin"
    finally:
        store.close()


def test_tokens_and_sessions_are_kept_as_digests(store: Store) -> None:
    admins = AdminStore(store.engine)
    user = admins.add_user("admin", "$6$hash")
    with pytest.raises(StoreError, match="already exists"):
        admins.add_user("admin", "$6$other")
    token = admins.new_token("admin")
    assert admins.user_for_token(token) == user
    assert admins.user_for_token(token + "x") is None
    session_id, session = admins.open_session(user, 60)
    with store.engine.connect() as conn:
        assert conn.execute(select(admin_tokens.c.token_hash)).scalar_one() == digest(token)
        assert conn.execute(select(web_sessions.c.id_hash)).scalar_one() == digest(session_id)
    assert admins.session(session_id, 60).csrf_token == session.csrf_token  # type: ignore[union-attr]
    with store.engine.begin() as conn:
        conn.execute(update(web_sessions).values(expires_at=now() - timedelta(seconds=1)))
    assert admins.session(session_id, 60) is None  # expired
    admins.set_password_hash("admin", "$6$new")
    admins.remove_user("admin")
    assert admins.user_for_token(token) is None


def test_audit_rows_come_back_newest_first(store: Store) -> None:
    actor = Actor("ann", "web")
    audit(store.engine, actor, "stop", accounts=[f"u{n}@x.example" for n in range(150)])
    audit(store.engine, Actor.command_line(), "finish", domain="x.example")
    total, entries = audit_trail.entries(store.engine, limit=10)
    assert total == 2 and [e["action"] for e in entries] == ["finish", "stop"]
    assert entries[0]["via"] == "cli" and entries[1]["who"] == "ann"
    assert len(entries[1]["details"]["accounts"]) == 100  # long lists are cut, and counted
    assert entries[1]["details"]["accounts_count"] == 150
    assert audit_trail.entries(store.engine, action="stop")[0] == 1


def test_status_pages_are_filtered_sorted_and_counted_in_the_database(store: Store) -> None:
    store.accounts.add_domain(Domain("a.example", "imap://h:143"))
    for n, state in enumerate(["NEW", "COMPLETED", "ERROR", "COMPLETED", "PENDING"]):
        account = store.accounts.add_account(f"u{n}_x@a.example", "$6$x", migration_state=state)
        with store.engine.begin() as conn:
            conn.execute(insert(migrations).values(
                account_id=account.id, messages_total=10, messages_copied=2 * n,
                bytes_copied=100 * (5 - n)))
    store.accounts.add_account("local@a.example", "$6$x")  # not migrating: never listed
    total, rows = status_page(store.engine, StatusQuery(domain="a.example", limit=2, offset=2))
    assert total == 5 and [r["address"] for r in rows] == ["u2_x@a.example", "u3_x@a.example"]
    _, rows = status_page(store.engine, StatusQuery(domain="a.example", sort="bytes_copied"))
    assert [r["bytes_copied"] for r in rows] == [100, 200, 300, 400, 500]
    _, rows = status_page(store.engine, StatusQuery(sort="progress", descending=True, limit=1))
    assert rows[0]["address"] == "u4_x@a.example"
    total, rows = status_page(store.engine, StatusQuery(state="COMPLETED"))
    assert total == 2 and {r["state"] for r in rows} == {"COMPLETED"}
    assert status_page(store.engine, StatusQuery(search="U1_"))[0] == 1
    assert status_page(store.engine, StatusQuery(search="%"))[0] == 0  # literal, no wildcard
    with pytest.raises(ValueError, match="sort must be one of"):
        status_page(store.engine, StatusQuery(sort="password_hash"))
    totals = domain_totals(store.engine)["a.example"]
    assert totals["accounts"] == 5 and totals["states"]["COMPLETED"] == 2
    assert totals["messages_copied"] == 20 and totals["bytes_copied"] == 1500
