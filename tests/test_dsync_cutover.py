"""The dsync engine inside the transparent cutover, through the CLI and the copy workers.

A passthrough domain with `--engine dsync`: the store's doveadm (HTTP API, as a second proxy
machine would reach it) copies the account with `backup -R`, every catch-up and final pass
too, and the switch keeps every UID. Clients that cached the old server's UIDs (imapclient)
or hold a sync state (mbsync) find nothing new after the switch but the "moved" notice.

Passthrough sessions are relayed to the old server, so the store mailbox stays untouched until
the first dsync pass; the other tests bring users in with `import` and `migrate`.
"""

from __future__ import annotations

import datetime as dt
import poplib
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from imapclient import IMAPClient

from migrating_proxy.switch import MOVED_BYE
from tests.support import dovecot
from tests.support.dovecot import DovecotInstance, free_port
from tests.support.mail import (
    SeedMessage,
    UidView,
    add_old_user,
    imap_login,
    make_message,
    sample_corpus,
    seed_mailbox,
    uid_view,
)
from tests.support.pop3 import Fetchmail, add_user_with_uidl_format
from tests.support.proxy import Proxy
from tests.test_cutover import events, import_and_migrate, pool, send, stop, work_until_settled

MOVED = b"Your mailbox has moved to a new mail server"


@pytest.fixture(scope="module")
def store() -> Iterator[DovecotInstance]:
    root = dovecot.instance_root("mp-dscut-")
    try:
        with dovecot.new_store(root, root / "provisioned", dsync=True) as instance:
            yield instance
    finally:
        dovecot.remove_root(root)


@pytest.fixture
def old(module_old: DovecotInstance) -> DovecotInstance:
    return module_old


class User:
    def __init__(self, old: DovecotInstance) -> None:
        self.address = f"dsync-{secrets.token_hex(3)}@old.example"
        self.password = "pw-" + secrets.token_hex(6)
        add_old_user(old, self.address, self.password)
        corpus = sample_corpus()
        corpus["INBOX"] += [_message(f"inbox {i}") for i in range(6)]
        seed_mailbox(old.host, old.imap_port, self.address, self.password, corpus)


def _message(subject: str) -> SeedMessage:
    when = dt.datetime(2025, 6, 1, 12, 0, tzinfo=dt.UTC)
    return SeedMessage(make_message(subject, f"{subject}\n", when), (), when)


def dsync_proxy(directory: Path, old: DovecotInstance, store: DovecotInstance, *,
                database: str | None = None, add_domain: bool = True) -> Proxy:
    """A proxy machine reaching the store's doveadm over HTTP; `database`: a PostgreSQL URL
    shared with other machines (and then their vault key, beside the database's name)."""
    assert store.doveadm_key_file is not None and store.dsync_users is not None
    smtp_port = free_port()
    migration: dict[str, object] = {"workers": 0, "engine": "dsync",
                                    "dsync_credentials": str(store.dsync_users)}
    overrides: dict[str, dict[str, object]] = {
        "listen": {"smtp": f"127.0.0.1:{smtp_port}"},
        "backend": {"delivery": f"lmtp://127.0.0.1:{store.lmtp_port}",
                    "doveadm_url": f"http://127.0.0.1:{store.doveadm_port}/doveadm/v1",
                    "doveadm_api_key_file": str(store.doveadm_key_file)},
        "migration": migration,
    }
    if database is not None:
        overrides["database"] = {"url": database}
        migration["vault_key_file"] = str(directory.parent / "shared-vault.key")
    proxy = Proxy(directory, store, overrides=overrides)
    proxy.ports["smtp"] = smtp_port
    if not add_domain:  # another machine added it to the shared database
        return proxy
    # The old server offers POP3 too: every pass also runs pop3c + pop3_migration.
    proxy.cli("domain", "add", "old.example", "--source", f"imap://127.0.0.1:{old.imap_port}",
              "--source", f"pop3://127.0.0.1:{old.pop3_port}",
              "--relay", f"lmtp://127.0.0.1:{old.lmtp_port}")  # passthrough: the default
    return proxy


def pop3_listing(port: int, login: str, password: str) -> list[bytes]:
    """UIDL lines (number, UIDL) in the server's order."""
    client = poplib.POP3("127.0.0.1", port, timeout=30)
    try:
        client.user(login)
        client.pass_(password)
        return client.uidl()[1]
    finally:
        client.quit()


def mbsync(directory: Path, port: int, login: str, password: str) -> str:
    """One `mbsync` pull of every folder into directory/mail, with its sync state there."""
    mail = directory / "mail"
    mail.mkdir(parents=True, exist_ok=True)
    config = directory / "mbsyncrc"
    config.write_text(f"""IMAPAccount acc
Host 127.0.0.1
Port {port}
User {login}
Pass {password}
SSLType None
AuthMechs LOGIN

IMAPStore far
Account acc

MaildirStore near
Path {mail}/
Inbox {mail}/INBOX
SubFolders Verbatim

Channel ch
Far :far:
Near :near:
Patterns *
Create Near
Sync Pull
SyncState *
""")
    done = subprocess.run(["mbsync", "-c", str(config), "-a"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def local_messages(directory: Path) -> set[str]:
    """The messages mbsync stored, by file name without the flags part."""
    return {p.name.split(",U=")[0].split(":2,")[0] for p in (directory / "mail").rglob("*")
            if p.parent.name in ("cur", "new") and p.is_file()}


def through(proxy: Proxy, user: User) -> IMAPClient:
    """The user's own IMAP session through the proxy: the old server before the switch, the
    store after it."""
    client = IMAPClient("127.0.0.1", proxy.imap_port, ssl=False, timeout=30)
    client.login(user.address, user.password)
    return client


def test_the_switch_keeps_every_uid_and_sync_clients_download_nothing_again(
        old: DovecotInstance, store: DovecotInstance, tmp_path: Path) -> None:
    """The issue's "Done when", through `serve`: every client talks to the proxy only."""
    user = User(old)
    proxy = dsync_proxy(tmp_path / "proxy", old, store)
    client_dir = tmp_path / "mbsync"
    with proxy:
        # The first login (a phone's first sync): account, vault entry and job; the session
        # is relayed to the old server (passthrough), so the store stays untouched.
        mbsync(client_dir, proxy.imap_port, user.address, user.password)
        [row] = proxy.status(user.address)
        assert row["served_by"] == "old", row

        # During passthrough: the user works (through the proxy, at the old server), mail
        # arrives through the proxy's SMTP front-end (relayed to the old server), the phone
        # syncs again.
        with through(proxy, user) as client:
            client.select_folder("INBOX")
            uids = sorted(client.search("ALL"))
            client.add_flags(uids[:2], [b"\\Flagged", b"$label1"])
            client.remove_flags(uids[2:3], [b"\\Seen"])
            client.delete_messages(uids[3:4])
            client.uid_expunge(uids[3:4])
            client.create_folder("Made during passthrough")
            client.append("Made during passthrough", _message("filed").raw, [b"\\Seen"])
        send(proxy, user.address, "arrived during passthrough")
        mbsync(client_dir, proxy.imap_port, user.address, user.password)
        cached = local_messages(client_dir)
        with through(proxy, user) as client:
            before = uid_view(client)  # what a caching client remembers
        with imap_login(old, user.address, user.password) as client:
            assert uid_view(client) == before  # it was the old server's view
        pop3_before = pop3_listing(proxy.pop3_port, user.address, user.password)
        fetchmail = Fetchmail(tmp_path / "fetchmail", user.address, user.password)
        assert len(fetchmail.run(proxy.pop3_port)) == len(pop3_before)  # keep: left there

        row = work_until_settled(proxy, user.address, timeout=120)
        assert row["state"] == "COMPLETED" and row["served_by"] == "store", row
        assert (row["engine"], row["uids_kept"], row["last_error"]) == ("dsync", True, None)
        assert row["pop3_uidls"] == "kept"

        with through(proxy, user) as client:
            after = uid_view(client)
        with imap_login(store, user.address) as client:
            assert uid_view(client) == after  # it is the store's view now
        # Every folder: UIDVALIDITY, every UID, flags, INTERNALDATE and bytes as before the
        # switch; INBOX has one message more, the notice, after every old one.
        notice_uid = before["INBOX"][1]
        inbox = after["INBOX"][2]
        assert {u: m for u, m in inbox.items() if u != notice_uid} == before["INBOX"][2]
        assert after["INBOX"][0] == before["INBOX"][0] and after["INBOX"][1] == notice_uid + 1
        for name, folder in before.items():
            if name != "INBOX":
                assert after[name] == folder, name
        with through(proxy, user) as client:
            client.select_folder("INBOX", readonly=True)
            assert MOVED in client.fetch([notice_uid], ["BODY.PEEK[]"])[notice_uid][b"BODY[]"]

        # A POP3 client that keeps mail on the server: the same UIDLs, in the same order, and
        # the notice last.
        pop3_after = pop3_listing(proxy.pop3_port, user.address, user.password)
        assert pop3_after[:-1] == pop3_before and len(pop3_after) == len(pop3_before) + 1
        # The proxy retired (issue 10): the same client talks to Dovecot directly, with the
        # user's own password; the store itself serves the old UIDLs (pop3_migration kept
        # them in its index), so fetchmail's UIDL file finds only the notice new.
        assert pop3_listing(store.pop3_port, user.address, user.password) == pop3_after
        assert_uidls_in_the_store_index(store, user.address, pop3_before)
        [moved] = fetchmail.run(store.pop3_port)
        assert MOVED in moved and fetchmail.run(store.pop3_port) == []

        # The phone's next sync, same configuration: only the notice is new. A UIDVALIDITY
        # change would have made it fetch everything again.
        output = mbsync(client_dir, proxy.imap_port, user.address, user.password)
        assert "UIDVALIDITY" not in output
        new = local_messages(client_dir) - cached
        assert len(new) == 1 and local_messages(client_dir) >= cached

    assert events(proxy, "switch_done")
    assert store.dsync_users is not None and not list(store.dsync_users.glob("*/*"))
    assert user.password not in proxy.log_text()


def assert_uidls_in_the_store_index(store: DovecotInstance, address: str,
                                    listing: list[bytes]) -> None:
    """Each old UIDL is saved with its message in the store's index (Maildir: `P<uidl>` in
    dovecot-uidlist, written by pop3_migration), not derived from a UID that happens to be
    equal: Dovecot's POP3 server answers with it before its pop3_uidl_format."""
    uidlist = (store.maildir(address) / "dovecot-uidlist").read_text()
    saved = {field[1:] for line in uidlist.splitlines()[1:] for field in line.split()
             if field.startswith("P")}
    assert {line.split()[1].decode() for line in listing} <= saved


def test_uidls_that_reveal_no_uid_are_kept_by_the_store_itself(
        old: DovecotInstance, store: DovecotInstance, tmp_path: Path) -> None:
    """Issue 10, after the proxy: an old server whose UIDLs are Maildir file names; dsync's
    pop3_migration matches them by headers and the store serves them to clients that talk to
    Dovecot directly."""
    address, password = f"opaque-{secrets.token_hex(3)}@old.example", "pw-" + secrets.token_hex(6)
    add_user_with_uidl_format(old, address, password)
    seed_mailbox(old.host, old.imap_port, address, password, sample_corpus())
    proxy = dsync_proxy(tmp_path / "proxy", old, store)
    fetchmail = Fetchmail(tmp_path / "fetchmail", address, password)
    with proxy:
        before = pop3_listing(proxy.pop3_port, address, password)
        assert b"," in before[0]  # a Maildir file name
        assert len(fetchmail.run(proxy.pop3_port)) == len(before)
        row = work_until_settled(proxy, address, timeout=120)
        assert (row["served_by"], row["engine"], row["pop3_uidls"]) == (
            "store", "dsync", "kept"), row
    # The proxy retired: the client talks to the store directly.
    after = pop3_listing(store.pop3_port, address, password)
    assert after[:-1] == before and len(after) == len(before) + 1
    assert_uidls_in_the_store_index(store, address, before)
    [moved] = fetchmail.run(store.pop3_port)
    assert MOVED in moved and fetchmail.run(store.pop3_port) == []


def test_a_touched_store_mailbox_falls_back_to_the_imap_engine_and_loses_nothing(
        old: DovecotInstance, store: DovecotInstance, tmp_path: Path) -> None:
    user = User(old)
    proxy = dsync_proxy(tmp_path / "proxy", old, store)
    with proxy:
        import_and_migrate(proxy, user, tmp_path)
        with imap_login(store, user.address) as client:  # written to by mistake
            client.append("INBOX", make_message("already here", "x\n", dt.datetime.now(dt.UTC)))
        row = work_until_settled(proxy, user.address, timeout=120)
        assert row["state"] == "COMPLETED" and row["served_by"] == "store", row
        assert (row["engine"], row["uids_kept"]) == ("imap", False)
        assert "not untouched" in row["engine_note"] and "INBOX (1)" in row["engine_note"]
        with imap_login(old, user.address, user.password) as client:
            client.select_folder("INBOX", readonly=True)
            at_old = len(client.search("ALL"))
        with imap_login(store, user.address) as client:
            client.select_folder("INBOX", readonly=True)
            assert client.search(["SUBJECT", "already here"])  # kept
            assert len(client.search("ALL")) == at_old + 2  # + the notice
    [fallback] = events(proxy, "dsync_fallback_to_imap")
    assert "not untouched" in fallback["reason"]


def test_a_refused_doveadm_call_is_a_recorded_error_and_the_account_stays_on_the_old_server(
        old: DovecotInstance, store: DovecotInstance, tmp_path: Path) -> None:
    user = User(old)
    proxy = dsync_proxy(tmp_path / "proxy", old, store)
    wrong_key = tmp_path / "wrong-key"
    wrong_key.write_text("not-the-key")
    proxy.overrides["backend"] |= {"doveadm_api_key_file": str(wrong_key), "timeout": 1.0}
    proxy.write_config()
    with proxy:
        import_and_migrate(proxy, user, tmp_path)
        workers = pool(proxy)
        try:
            deadline = time.monotonic() + 60
            while True:
                [row] = proxy.status(user.address)
                if row["last_error"]:
                    break
                assert time.monotonic() < deadline, proxy.log_text()[-3000:]
                time.sleep(0.3)
        finally:
            stop(workers)
        assert "does not answer a wrong API key" in row["last_error"]
        assert row["state"] != "COMPLETED" and row["served_by"] == "old"
        assert row["engine"] is None and row["uids_kept"] is None  # nothing decided yet
        with imap_login(store, user.address) as client:  # dsync never got to copy anything
            client.select_folder("INBOX", readonly=True)
            assert client.search("ALL") == []


def test_two_proxies_each_driving_the_store_s_doveadm_over_http(
        old: DovecotInstance, store: DovecotInstance, tmp_path: Path,
        shared_database: str) -> None:
    """Two `serve` machines on one PostgreSQL database, the store's doveadm reached over HTTP
    from both: each user's session is on one machine, the copy run by the other machine's
    worker, and every switch keeps every UID and closes the session on the other machine."""
    first = dsync_proxy(tmp_path / "a", old, store, database=shared_database)
    second = dsync_proxy(tmp_path / "b", old, store, database=shared_database,
                         add_domain=False)
    users = {"a": User(old), "b": User(old)}
    with first, second:
        serving = {"a": first, "b": second}
        copying = {"a": second, "b": first}  # the other machine's worker
        for name, user in users.items():  # one after the other: one queued job at a time
            before = old_view(old, user)
            idling = through(serving[name], user)  # the first login: account, job
            idling.select_folder("INBOX")
            idling.idle()
            row = work_until_settled(copying[name], user.address, timeout=120)
            assert row["state"] == "COMPLETED" and row["served_by"] == "store", row
            assert (row["engine"], row["uids_kept"], row["last_error"]) == \
                ("dsync", True, None)
            assert idling.idle_check(timeout=15) == [(b"BYE", *MOVED_BYE.encode().split())]
            with through(serving[name], user) as client:
                after = uid_view(client)
            assert {n: f for n, f in after.items() if n != "INBOX"} == \
                {n: f for n, f in before.items() if n != "INBOX"}
            validity, uidnext, inbox = after["INBOX"]
            old_validity, old_uidnext, old_inbox = before["INBOX"]
            assert (validity, uidnext) == (old_validity, old_uidnext + 1)  # + the notice
            assert {u: m for u, m in inbox.items() if u != old_uidnext} == old_inbox
        for proxy, name in ((second, "a"), (first, "b")):
            assert events(proxy, "switch_done"), name  # each machine's worker did one
    for user in users.values():
        assert user.password not in first.log_text() + second.log_text()


def old_view(old: DovecotInstance, user: User) -> UidView:
    with imap_login(old, user.address, user.password) as client:
        return uid_view(client)
