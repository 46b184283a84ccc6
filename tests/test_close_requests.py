"""Closing an account's live sessions on every proxy process that shares the database.

The store side on both databases; an older database upgraded in place; then two real `serve`
processes sharing PostgreSQL, with real clients idling on both, and a request made through the
store from this (third) process, as the cutover's switch will make it from a worker.
"""

from __future__ import annotations

import poplib
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from imapclient import IMAPClient
from sqlalchemy import inspect, select, update

from migrating_proxy.store import Store, open_store
from migrating_proxy.store.accounts import now
from migrating_proxy.store.schema import SCHEMA_VERSION, close_requests, schema_info
from migrating_proxy.store.sessions import OVERLAP, RETAIN
from tests.support.dovecot import DovecotInstance
from tests.support.proxy import Proxy
from tests.support.schemas import create_old_schema

CAROL, CAROL_PW = "carol@new.example", "carol-pw"
DAVE, DAVE_PW = "dave@new.example", "dave-pw"
REASON = "Your mailbox has moved; please log in again."


# -- the store -------------------------------------------------------------------------------------
def test_requests_are_seen_by_time_and_pruned(store: Store) -> None:
    before = now()
    first = store.sessions.request_close("Carol@New.example", "moved\r\n* 0 EXISTS \x00")
    seen = store.sessions.requests_since(before - OVERLAP)
    assert [(r.id, r.address_key, r.reason) for r in seen] == \
        [(first, "carol@new.example", "moved  * 0 EXISTS")]  # one line, printable only
    assert store.sessions.requests_since(seen[0].created_at) == []
    with store.engine.begin() as conn:  # an hour passes
        conn.execute(update(close_requests).values(created_at=now() - RETAIN - timedelta(1)))
    store.sessions.request_close(DAVE, "")
    with store.engine.connect() as conn:
        rows = conn.execute(select(close_requests.c.address_key, close_requests.c.reason)).all()
    assert [tuple(row) for row in rows] == [(DAVE, "Session closed.")]


def test_a_version_2_database_is_upgraded_in_place(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    create_old_schema(url, 2)  # what version 2 created (tests/data): no close_requests
    store = open_store(url)
    try:
        store.accounts.add_account(CAROL, "$6$x")
        assert inspect(store.engine).has_table("close_requests")
        store.sessions.request_close(CAROL, REASON)
        with store.engine.connect() as conn:
            assert conn.execute(select(schema_info.c.version)).scalar() == SCHEMA_VERSION
    finally:
        store.close()


# -- two serve processes -------------------------------------------------------------------------
@pytest.fixture
def two_proxies(tmp_path: Path, module_store: DovecotInstance,
                shared_database: str) -> Iterator[tuple[Proxy, Proxy]]:
    overrides = {"database": {"url": shared_database},
                 "migration": {"vault_key_file": str(tmp_path / "vault.key")}}
    first = Proxy(tmp_path / "a", module_store, overrides=overrides)
    second = Proxy(tmp_path / "b", module_store, overrides=overrides)
    first.add_account(CAROL, CAROL_PW)
    first.add_account(DAVE, DAVE_PW)
    with first, second:
        yield first, second


def idling(port: int, address: str, password: str) -> IMAPClient:
    client = IMAPClient("127.0.0.1", port, ssl=False, timeout=15)
    client.login(address, password)
    client.select_folder("INBOX")
    client.idle()
    return client


def test_a_request_closes_the_accounts_sessions_on_every_process(
        two_proxies: tuple[Proxy, Proxy], shared_database: str) -> None:
    first, second = two_proxies
    carol_here, carol_there = idling(first.imap_port, CAROL, CAROL_PW), \
        idling(second.imap_port, CAROL, CAROL_PW)
    carol_pop = poplib.POP3("127.0.0.1", second.pop3_port, timeout=15)
    carol_pop.user(CAROL)
    carol_pop.pass_(CAROL_PW)
    dave = idling(first.imap_port, DAVE, DAVE_PW)

    store = open_store(shared_database)
    try:
        store.sessions.request_close(CAROL, REASON)
    finally:
        store.close()

    for client in (carol_here, carol_there):
        responses = client.idle_check(timeout=10)  # ends at the BYE and the close after it
        assert responses == [(b"BYE", *REASON.encode().split())], responses
        client.socket().settimeout(5)
        assert client.socket().recv(1) == b""  # and the proxy closed the connection
    with pytest.raises((poplib.error_proto, OSError, EOFError)):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # poplib sees the close at its next command
            carol_pop.noop()
            time.sleep(0.2)
    assert '"sessions": 1' in first.wait_for_log('"event": "sessions_closed"')
    assert '"sessions": 2' in second.wait_for_log('"event": "sessions_closed"')

    # Only Carol's sessions: Dave idles on, and Carol may come back at once.
    assert dave.idle_check(timeout=0.5) == []
    dave.idle_done()
    assert dave.noop()[0].startswith(b"NOOP")
    dave.logout()
    again = IMAPClient("127.0.0.1", second.imap_port, ssl=False, timeout=15)
    again.login(CAROL, CAROL_PW)
    again.logout()
