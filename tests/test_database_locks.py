"""A database whose write lock is held elsewhere (an admin import, a backup, another machine's
long transaction) must not stall what does not need to write: local logins and SMTP
recipients to local accounts are answered while it lasts, on SQLite and on PostgreSQL.

The lock is held from a connection of the test's own: SQLite's `BEGIN IMMEDIATE`, PostgreSQL's
`LOCK TABLE ... IN EXCLUSIVE MODE` (writes wait, reads do not). What does need a write (a first
login creates the account) waits a bounded time and is told to try again; what is merely worth
writing (the last-login time) is written once the lock is gone.
"""

from __future__ import annotations

import contextlib
import imaplib
import json
import smtplib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import dovecot
from tests.support.dovecot import DovecotInstance, free_port
from tests.support.proxy import Proxy
from tests.support.waiting import eventually

LOCAL, LOCAL_PW = "dora@new.example", "dora-pw"
NEWCOMER, NEWCOMER_PW = "alice@old.example", "alice-pw"


@pytest.fixture(scope="module")
def old_server() -> Iterator[DovecotInstance]:
    with dovecot.running_old_server({NEWCOMER: NEWCOMER_PW}, "mp-lk-") as instance:
        yield instance


@contextlib.contextmanager
def write_lock(url: str) -> Iterator[None]:
    """Hold the database's write lock from another connection until the block ends."""
    if url.startswith("sqlite"):
        holder = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        return
    import psycopg

    with psycopg.connect(url) as holder:
        holder.execute("LOCK TABLE accounts, domains, jobs, vault IN EXCLUSIVE MODE")
        yield
        holder.rollback()


def imap_login(port: int, user: str, password: str) -> str:
    """"OK" (after a SELECT in the relayed session), or the refusal's response code."""
    client = imaplib.IMAP4("127.0.0.1", port, timeout=60)
    try:
        client.login(user, password)
        assert client.select("INBOX")[0] == "OK"
        client.logout()
    except imaplib.IMAP4.error as exc:
        client.shutdown()
        return str(exc).split("[", 1)[-1].split("]", 1)[0]
    return "OK"




def test_a_held_write_lock_stalls_neither_local_logins_nor_smtp(
        tmp_path: Path, store_url: str, module_store: DovecotInstance,
        old_server: DovecotInstance) -> None:
    smtp_port = free_port()
    proxy = Proxy(tmp_path / "p", module_store, overrides={
        "database": {"url": store_url},
        "listen": {"smtp": f"127.0.0.1:{smtp_port}"},
        "backend": {"delivery": f"lmtp://127.0.0.1:{module_store.lmtp_port}"},
    })
    proxy.add_account(LOCAL, LOCAL_PW)
    proxy.cli("domain", "add", "old.example", "--source",
              f"imap://127.0.0.1:{old_server.imap_port}")
    with proxy:
        with write_lock(store_url):
            for _ in range(3):  # more than one: none of them is left waiting on the lock
                assert imap_login(proxy.imap_port, LOCAL, LOCAL_PW) == "OK"
            with smtplib.SMTP("127.0.0.1", smtp_port, timeout=60) as smtp:
                smtp.ehlo()
                smtp.mail("sender@elsewhere.example")
                assert smtp.rcpt(LOCAL)[0] == 250
                assert smtp.data(b"Subject: during the lock\r\n\r\nhello\r\n")[0] == 250
            # A first login must write: a bounded wait, then "try again", nothing created.
            assert imap_login(proxy.imap_port, NEWCOMER, NEWCOMER_PW) == "UNAVAILABLE"
        # The lock is gone: the newcomer gets in, and the last-login time is written.
        assert imap_login(proxy.imap_port, NEWCOMER, NEWCOMER_PW) == "OK"
        assert eventually(lambda: last_login(proxy, LOCAL) is not None)


def last_login(proxy: Proxy, address: str) -> str | None:
    rows = json.loads(proxy.cli("account", "list", "--json").stdout)
    return next(row["last_login_at"] for row in rows if row["address"] == address)
