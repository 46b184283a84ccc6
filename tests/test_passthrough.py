"""Passthrough sessions and the switch as users see them (issue 9, Done when): real clients
(imapclient, poplib, mbsync) through `serve` to a real Dovecot old server, then to the store.

Before its switch an account is served by its old server: the whole old mailbox from the first
login, every change made there. At the switch its sessions are closed on every proxy process
(IMAP: a BYE between two responses), logins during the hold wait and go to the store, and the
store holds exactly the old mailbox's final state plus one notice.
"""

from __future__ import annotations

import datetime as dt
import imaplib
import poplib
import re
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from imapclient import IMAPClient

from migrating_proxy.switch import MOVED_BYE
from tests.support.cutover import (
    MOVED,
    User,
    count,
    events,
    passthrough_proxy,
    send,
    without,
    work_until_settled,
)
from tests.support.dovecot import DovecotInstance
from tests.support.mail import SeedMessage, make_message, seed_mailbox, snapshot_folders
from tests.support.proxy import Proxy

HOST = "127.0.0.1"


@pytest.fixture
def old(module_old: DovecotInstance, module_store: DovecotInstance) -> DovecotInstance:
    """The module's old server (with its store, `store`): each test adds its own users."""
    return module_old


@pytest.fixture
def store(old: DovecotInstance, module_store: DovecotInstance) -> DovecotInstance:
    return module_store


def through(proxy: Proxy, user: User) -> IMAPClient:
    client = IMAPClient(HOST, proxy.imap_port, ssl=False, timeout=30)
    client.login(user.address, user.password)
    return client


def logins(proxy: Proxy, user: User) -> list[dict[str, Any]]:
    return [e for e in events(proxy, "login") if e.get("address") == user.address]


def pop3_inbox(port: int, user: User) -> list[bytes]:
    client = poplib.POP3(HOST, port, timeout=30)
    client.user(user.address)
    client.pass_(user.password)
    messages = [b"\r\n".join(client.retr(n)[1]) + b"\r\n"
                for n in range(1, client.stat()[0] + 1)]
    client.quit()
    return messages


def mbsync_first_run(proxy: Proxy, user: User, directory: Path) -> int:
    """A sync client's first run through the proxy: how many messages it stored locally."""
    maildir = directory / "maildir"
    maildir.mkdir(parents=True)
    config = directory / "mbsyncrc"
    config.write_text(f"""IMAPAccount proxy
Host {HOST}
Port {proxy.imap_port}
User {user.address}
Pass "{user.password}"
SSLType None
AuthMechs LOGIN

IMAPStore far
Account proxy

MaildirStore near
Path {maildir}/
Inbox {maildir}/INBOX
SubFolders Verbatim

Channel all
Far :far:
Near :near:
Patterns *
Create Near
Sync Pull
SyncState *
""")
    subprocess.run(["mbsync", "-q", "-c", str(config), "all"], check=True, timeout=120,
                   capture_output=True)
    return sum(1 for path in maildir.rglob("*") if path.is_file()
               and path.parent.name in ("cur", "new"))


# --- before the switch: the old server, whole ----------------------------------------------


def test_a_first_login_sees_the_whole_old_mailbox_at_once(
        old: DovecotInstance, store: DovecotInstance, tmp_path: Path) -> None:
    user = User(old, store)
    everything = user.old_snapshot()
    proxy = passthrough_proxy(tmp_path / "proxy", old, store)  # no copy worker runs
    with proxy:
        with through(proxy, user) as client:  # the very first login
            assert snapshot_folders(client) == everything  # every folder, every message
        assert mbsync_first_run(proxy, user, tmp_path / "mbsync") == sum(
            map(len, everything.values()))
        assert sorted(pop3_inbox(proxy.pop3_port, user)) == sorted(
            m[0] for m in everything["INBOX"])
        [row] = proxy.status(user.address)
        assert (row["state"], row["served_by"]) == ("PENDING", "old")
    assert {e["served_by"] for e in logins(proxy, user)} == {"old"}
    assert not store.maildir(user.address).exists()  # nothing was written to the store


def test_protocols_the_old_server_lacks_are_served_by_the_store(
        old: DovecotInstance, store: DovecotInstance, tmp_path: Path) -> None:
    pop_only, imap_only = User(old, store, "pop.example"), User(old, store, "imap.example")
    proxy = passthrough_proxy(tmp_path / "proxy", old, store, add_domain=False)
    proxy.cli("domain", "add", "pop.example", "--source", f"pop3://{HOST}:{old.pop3_port}")
    proxy.cli("domain", "add", "imap.example", "--source", f"imap://{HOST}:{old.imap_port}")
    with proxy:
        with through(proxy, pop_only) as client:  # IMAP against a POP3-only old server
            client.select_folder("INBOX")
        assert pop3_inbox(proxy.pop3_port, pop_only)  # POP3 there: its old mailbox
        with through(proxy, imap_only) as client:
            assert client.select_folder("INBOX")[b"EXISTS"] > 0  # IMAP there: the old one
        pop3_inbox(proxy.pop3_port, imap_only)  # POP3 against an IMAP-only old server
    assert [(e["protocol"], e["served_by"]) for e in logins(proxy, pop_only)] == [
        ("imap", "store"), ("pop3", "old")]
    assert [(e["protocol"], e["served_by"]) for e in logins(proxy, imap_only)] == [
        ("imap", "old"), ("pop3", "store")]


# --- the switch -----------------------------------------------------------------------------


class SlowFetch(threading.Thread):
    """A client in the middle of a large FETCH: it reads its answer slowly, so the proxy's
    relay is inside that response (a literal) when the switch closes the session."""

    def __init__(self, proxy: Proxy, user: User) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection((HOST, proxy.imap_port), timeout=60)
        self.file = self.sock.makefile("rb")
        self.file.readline()  # greeting
        self.sock.sendall(f'a LOGIN "{user.address}" "{user.password}"\r\n'.encode())
        while not self.file.readline().startswith(b"a "):
            pass
        self.sock.sendall(b"b SELECT Big\r\nc FETCH 1 BODY.PEEK[]\r\n")
        self.received = bytearray()

    def run(self) -> None:
        while chunk := self.sock.recv(4096):
            self.received += chunk
            time.sleep(0.01)  # about 400 KB/s: the 5 MB answer takes longer than the hold


class HeldLogin(threading.Thread):
    """Logs in the moment the account's switch holds its logins."""

    def __init__(self, proxy: Proxy, user: User) -> None:
        super().__init__(daemon=True)
        self.proxy, self.user = proxy, user
        self.engine = sqlalchemy.create_engine(f"sqlite:///{proxy.directory / 'proxy.db'}")
        self.inbox: int | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            deadline = time.monotonic() + 120
            while not self._held():
                assert time.monotonic() < deadline, "no hold seen"
                time.sleep(0.005)
            with through(self.proxy, self.user) as client:  # answered once the switch is done
                self.inbox = client.select_folder("INBOX")[b"EXISTS"]
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.engine.dispose()

    def _held(self) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(sqlalchemy.text(
                "SELECT count(*) FROM accounts WHERE address_key = :a AND hold_until IS NOT NULL"
            ), {"a": self.user.address.lower()}).scalar_one() > 0


def test_changes_made_before_the_switch_are_on_the_store_and_sessions_move_there(
        old: DovecotInstance, store: DovecotInstance, tmp_path: Path) -> None:
    user = User(old, store)
    big = make_message("a big one", "x\n", dt.datetime(2024, 1, 1, tzinfo=dt.UTC),
                       size=5_000_000)
    seed_mailbox(HOST, old.imap_port, user.address, user.password,
                 {"Big": [SeedMessage(big)]})
    proxy = passthrough_proxy(tmp_path / "proxy", old, store)
    with proxy:
        working = through(proxy, user)  # the first login; the copy waits for a worker
        user.change_something("changed through the proxy", client=working)
        send(proxy, user.address, "arrived before the switch")  # relayed to the old server
        idling = through(proxy, user)
        idling.select_folder("INBOX")
        idling.idle()
        fetching = SlowFetch(proxy, user)
        fetching.start()
        held = HeldLogin(proxy, user)
        held.start()

        row = work_until_settled(proxy, user.address)  # copy, catch up, hold, switch
        assert (row["state"], row["served_by"]) == ("COMPLETED", "store")

        # The idle session got a BYE between two responses and was closed.
        assert idle_responses(idling) == [(b"BYE", *MOVED_BYE.encode().split())]
        idling.socket().settimeout(5)
        assert idling.socket().recv(1) == b""
        # The big FETCH was cut short without a BYE inside its literal; the bytes it got are
        # the old server's, exactly.
        fetching.join(timeout=60)
        answer = bytes(fetching.received)
        literal = re.search(rb"\* 1 FETCH \(BODY\[\] \{(\d+)\}\r\n", answer)
        assert literal is not None and int(literal.group(1)) == len(big)
        assert big.startswith(answer[literal.end():literal.end() + len(big)])
        # The working session is gone too; reconnecting lands on the store.
        with pytest.raises((imaplib.IMAP4.abort, imaplib.IMAP4.error, OSError)):
            working.noop()
        held.join(timeout=60)
        assert held.error is None and held.inbox is not None  # held, then served
        final = user.old_snapshot()
        with through(proxy, user) as client:
            seen = snapshot_folders(client)
        assert without(seen, MOVED) == final and count(seen, MOVED) == 1
        assert without(user.store_snapshot(), MOVED) == final
        send(proxy, user.address, "arrived after the switch")
        assert user.has_message("store", "arrived after the switch")
        assert not user.has_message("old", "arrived after the switch")
    assert count(final, b"arrived before the switch") == 1
    served = [e["served_by"] for e in logins(proxy, user)]
    assert served[:3] == ["old", "old", "old"] and served[3:] == ["store", "store"]
    [closed] = events(proxy, "sessions_closed")
    assert closed["sessions"] == 3
    # The login that came during the hold waited for the switch and was served by the store.
    held_logins = [e for e in events(proxy, "login_held") if e["address"] == user.address]
    assert held_logins and {e["served_by"] for e in held_logins} == {"store"}


# --- two proxies ------------------------------------------------------------------------------


def idle_responses(client: IMAPClient) -> list[tuple[bytes, ...]]:
    """What an IDLE session got up to the server's BYE (or 15 s of silence), without the
    old server's keepalives: Dovecot sends `* OK Still here` every two minutes of IDLE, which a
    copy on a loaded machine can outlast."""
    responses: list[tuple[bytes, ...]] = []
    while not any(r[0] == b"BYE" for r in responses):
        got = client.idle_check(timeout=15)
        if not got:
            break
        responses += [r for r in got if r != (b"OK", b"Still here")]
    return responses


def test_a_session_on_another_proxy_is_closed_at_the_switch(
        old: DovecotInstance, store: DovecotInstance, tmp_path: Path,
        shared_database: str) -> None:
    """Two `serve` processes share PostgreSQL; the session is on the one without workers."""
    user = User(old, store)
    shared = {"database": {"url": shared_database},
              "migration": {"vault_key_file": str(tmp_path / "vault.key")}}
    copying = passthrough_proxy(tmp_path / "a", old, store, overrides=shared, workers=1,
                                add_domain=True)
    serving = passthrough_proxy(tmp_path / "b", old, store, overrides=shared,
                                add_domain=False)
    with serving:
        idling = through(serving, user)  # the first login, on the proxy without workers
        idling.select_folder("INBOX")
        idling.idle()
        with copying:  # its worker copies and switches
            assert copying.wait_for_state(user.address, ("COMPLETED",))["served_by"] == \
                "store"
            assert idle_responses(idling) == [(b"BYE", *MOVED_BYE.encode().split())]
        with through(serving, user) as client:
            assert without(snapshot_folders(client), MOVED) == user.old_snapshot()
    assert [e["served_by"] for e in logins(serving, user)] == ["old", "store"]


# --- crashes ----------------------------------------------------------------------------------


def test_kill_9_of_serve_and_workers_during_the_switch_then_restart(
        old: DovecotInstance, store: DovecotInstance, tmp_path: Path) -> None:
    user = User(old, store)
    proxy = passthrough_proxy(tmp_path / "proxy", old, store, workers=1)
    proxy.start(env={"MIGRATING_PROXY_FAILPOINTS": "switch.final_pass_done"})
    try:
        idling = through(proxy, user)  # relayed to the old server; its worker copies
        idling.select_folder("INBOX")
        idling.idle()
        proxy.wait_for_log('"event": "worker_died"', timeout=60)  # killed at the final pass
    finally:
        proxy.crash()  # and serve with it, every process at once
    [row] = proxy.status(user.address)
    assert (row["served_by"], row["switched_at"]) == ("old", None)  # wholly on the old server
    user.change_something("after the crash")
    with proxy:  # restarted: the switch completes
        row = proxy.wait_for_state(user.address, ("COMPLETED",))
        assert row["served_by"] == "store"
        with through(proxy, user) as client:
            seen = snapshot_folders(client)
    assert without(seen, MOVED) == user.old_snapshot() and count(seen, MOVED) == 1
    assert logins(proxy, user)[-1]["served_by"] == "store"  # nobody on the old server now
    engine = sqlalchemy.create_engine(f"sqlite:///{proxy.directory / 'proxy.db'}")
    with engine.connect() as conn:
        assert conn.execute(sqlalchemy.text("SELECT count(*) FROM old_sessions")).scalar() == 0
    engine.dispose()


