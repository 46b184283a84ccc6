"""The dsync engine against a real Dovecot old server and a real Dovecot store.

The store is built from deploy/dovecot/migrating-proxy.conf plus migrating-proxy-dsync.conf,
as shipped. One old server and one store for the module; every test uses accounts of its own.
A store mailbox is never opened over IMAP before an engine pass has run: that would touch it.
"""

from __future__ import annotations

import datetime as dt
import poplib
from collections.abc import Iterator
from pathlib import Path

import pytest
from imapclient import IMAPClient

from migrating_proxy.migration.connections import SourceSpec
from migrating_proxy.migration.doveadm import HttpDoveadm, LocalDoveadm
from migrating_proxy.migration.dsync import DsyncEngine, Fallback, imapc_mailbox_guid
from migrating_proxy.provision.dsync_credentials import DsyncCredentials
from migrating_proxy.store import Store, open_store
from migrating_proxy.store.copystate import CopyState
from migrating_proxy.store.status import migration_status
from tests.support import dovecot
from tests.support.mail import UidView, make_message, sample_corpus, seed_mailbox, uid_view

PASSWORD = "Old=Secret-Grüße-7"  # "=" and UTF-8: both must survive the userdb entry
USERS = ["http@old.example", "local@old.example", "pop@old.example", "opened@old.example",
         "noticed@old.example", "refused@old.example", "nocred@old.example",
         "badpw@old.example", "spaced@old.example"]
SPACED_PASSWORD = "with space"


@pytest.fixture(scope="module")
def old() -> Iterator[dovecot.DovecotInstance]:
    root = dovecot.instance_root("mp-dsold-")
    users = {u: SPACED_PASSWORD if u.startswith("spaced") else PASSWORD for u in USERS}
    instance = dovecot.old_server(root, users)
    # Distinct UIDLs, so equal UIDLs on the store prove pop3_migration did its work.
    instance.config_path.write_text(instance.config_path.read_text()
                                    + "protocol pop3 {\n  pop3_uidl_format = OLD-%g\n}\n")
    try:
        with instance:
            yield instance
    finally:
        dovecot.remove_root(root)


@pytest.fixture(scope="module")
def store() -> Iterator[dovecot.DovecotInstance]:
    root = dovecot.instance_root("mp-dsnew-")
    try:
        with dovecot.new_store(root, root / "provisioned", dsync=True) as instance:
            for user in USERS:  # what the proxy's onboarding does: a locked entry
                instance.provision(user, "{SHA512-CRYPT}!locked")
            yield instance
    finally:
        dovecot.remove_root(root)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Store]:
    accounts = open_store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    yield accounts
    accounts.close()


def http_engine(store: dovecot.DovecotInstance, credentials: Path | None = None) -> DsyncEngine:
    assert store.doveadm_key_file is not None and store.dsync_users is not None
    doveadm = HttpDoveadm(f"http://127.0.0.1:{store.doveadm_port}/doveadm/v1",
                          store.doveadm_key_file.read_text().strip(), timeout=10,
                          pass_timeout=120)
    return DsyncEngine(doveadm, DsyncCredentials(credentials or store.dsync_users))


def local_engine(store: dovecot.DovecotInstance) -> DsyncEngine:
    assert store.dsync_users is not None
    return DsyncEngine(LocalDoveadm(f"doveadm -c {store.config_path}", timeout=10,
                                    pass_timeout=120),
                       DsyncCredentials(store.dsync_users))


def spec(old: dovecot.DovecotInstance, user: str, protocol: str = "imap",
         password: str = PASSWORD) -> SourceSpec:
    port = old.imap_port if protocol == "imap" else old.pop3_port
    return SourceSpec(protocol, "127.0.0.1", port, "none", True, user, password)  # type: ignore[arg-type]


def account(db: Store, user: str) -> int:
    return db.accounts.add_account(user, "$6$x").id


def seed(old: dovecot.DovecotInstance, user: str) -> None:
    corpus = sample_corpus()
    corpus["INBOX"] = [*corpus["INBOX"]]
    seed_mailbox("127.0.0.1", old.imap_port, user, PASSWORD, corpus)
    with old_client(old, user) as client:  # holes in the UIDs, as real mailboxes have
        client.select_folder("INBOX")
        client.delete_messages([2])
        client.expunge()


def old_client(old: dovecot.DovecotInstance, user: str) -> IMAPClient:
    client = IMAPClient("127.0.0.1", old.imap_port, ssl=False, timeout=30)
    client.plain_login(user, PASSWORD)
    return client


def store_client(store: dovecot.DovecotInstance, user: str) -> IMAPClient:
    client = IMAPClient("127.0.0.1", store.imap_port, ssl=False, timeout=30)
    assert store.master_user and store.master_password
    client.plain_login(store.master_user, store.master_password, authorization_identity=user)
    return client


def assert_uid_exact(old: dovecot.DovecotInstance, store: dovecot.DovecotInstance,
                     user: str) -> UidView:
    with old_client(old, user) as client:
        expected = uid_view(client)
    with store_client(store, user) as client:
        got = uid_view(client, only=set(expected))
    assert got == expected
    assert sum(len(folder[2]) for folder in expected.values()) > 3
    return expected


def change_old_mailbox(old: dovecot.DovecotInstance, user: str) -> None:
    """Flags set and cleared, an expunge, new mail, a new folder with mail."""
    with old_client(old, user) as client:
        client.select_folder("INBOX")
        uids = client.search("ALL")
        client.add_flags(uids[0], [b"\\Flagged", b"$Label1"])
        client.remove_flags(uids[-1], [b"\\Seen"])
        client.delete_messages(uids[1])
        client.expunge()
        new = make_message("Late mail", "Arrived during passthrough.\n",
                           dt.datetime(2026, 11, 1, 8, 0, tzinfo=dt.UTC))
        client.append("INBOX", new, [b"\\Seen"], dt.datetime(2026, 11, 1, 8, 5, tzinfo=dt.UTC))
        client.create_folder("Neu/Ordner")
        client.append("Neu/Ordner", new, [], None)


# --- the copy: exact to the UID --------------------------------------------------------


def test_first_and_incremental_passes_over_http_are_uid_exact(
        old: dovecot.DovecotInstance, store: dovecot.DovecotInstance, db: Store) -> None:
    user = "http@old.example"
    seed(old, user)
    engine, account_id = http_engine(store), account(db, user)
    result = engine.run_pass(db.engine, account_id, user, spec(old, user))
    assert not isinstance(result, Fallback) and result.state == "completed", result
    assert result.changes > 0
    first = assert_uid_exact(old, store, user)
    again = engine.run_pass(db.engine, account_id, user, spec(old, user))
    assert not isinstance(again, Fallback) and again.changes == 0  # in step: the switch's cue

    change_old_mailbox(old, user)
    result = engine.run_pass(db.engine, account_id, user, spec(old, user))
    assert not isinstance(result, Fallback) and result.state == "completed", result
    assert result.changes >= 5  # two flag changes, an expunge, new mail, a new folder
    second = assert_uid_exact(old, store, user)
    assert "Neu/Ordner" in second and second["INBOX"][1] > first["INBOX"][1]

    [status] = migration_status(db.engine, [user])
    assert status["engine"] == "dsync" and status["uids_kept"] is None  # not switched yet
    assert status["messages_copied"] == sum(len(f[2]) for f in second.values())
    assert status["last_error"] is None and status["last_pass_at"] is not None
    assert store.dsync_users is not None and not list(store.dsync_users.glob("*/*"))


def test_local_doveadm_is_uid_exact_too(
        old: dovecot.DovecotInstance, store: dovecot.DovecotInstance, db: Store) -> None:
    user = "local@old.example"
    seed(old, user)
    engine, account_id = local_engine(store), account(db, user)
    assert engine.run_pass(db.engine, account_id, user, spec(old, user)).state == "completed"  # type: ignore[union-attr]
    assert_uid_exact(old, store, user)
    change_old_mailbox(old, user)
    assert engine.run_pass(db.engine, account_id, user, spec(old, user)).state == "completed"  # type: ignore[union-attr]
    assert_uid_exact(old, store, user)


def pop3_uidls(port: int, login: str, password: str) -> list[bytes]:
    client = poplib.POP3("127.0.0.1", port, timeout=30)
    try:
        client.user(login)
        client.pass_(password)
        return [line.split(b" ", 1)[1] for line in client.uidl()[1]]
    finally:
        client.quit()


def test_pop3_uidls_and_their_order_are_kept_with_pop3_migration(
        old: dovecot.DovecotInstance, store: dovecot.DovecotInstance, db: Store) -> None:
    user = "pop@old.example"
    seed(old, user)
    engine, account_id = http_engine(store), account(db, user)
    imap, pop3 = spec(old, user), spec(old, user, "pop3")
    assert engine.run_pass(db.engine, account_id, user, imap, pop3).state == "completed"  # type: ignore[union-attr]
    master = f"{user}*{store.master_user}"
    expected = pop3_uidls(old.pop3_port, user, PASSWORD)
    assert expected[0].startswith(b"OLD-")
    assert pop3_uidls(store.pop3_port, master, store.master_password or "") == expected
    assert_uid_exact(old, store, user)

    with old_client(old, user) as client:
        client.select_folder("INBOX")
        client.append("INBOX", make_message("POP me", "x\n", dt.datetime.now(dt.UTC)))
    assert engine.run_pass(db.engine, account_id, user, imap, pop3).state == "completed"  # type: ignore[union-attr]
    expected = pop3_uidls(old.pop3_port, user, PASSWORD)
    assert pop3_uidls(store.pop3_port, master, store.master_password or "") == expected


# --- safety rails ----------------------------------------------------------------------


def test_an_inbox_opened_before_the_first_pass_is_repaired_and_exact(
        old: dovecot.DovecotInstance, store: dovecot.DovecotInstance, db: Store) -> None:
    user = "opened@old.example"
    seed(old, user)
    with store_client(store, user) as client:  # a login that opens INBOX: it gets its own
        client.select_folder("INBOX")          # UIDVALIDITY, which dsync cannot reconcile
    engine, account_id = http_engine(store), account(db, user)
    result = engine.run_pass(db.engine, account_id, user, spec(old, user))
    assert not isinstance(result, Fallback) and result.state == "completed", result
    assert_uid_exact(old, store, user)
    assert imapc_mailbox_guid("INBOX") == "c92f64f79f0d1ed01e6d5b314f04886c"  # probed


def test_a_store_mailbox_holding_mail_falls_back_to_the_imap_engine_and_keeps_it(
        old: dovecot.DovecotInstance, store: dovecot.DovecotInstance, db: Store) -> None:
    user = "noticed@old.example"
    seed(old, user)
    notice = make_message("Your mail is moving", "notice\n", dt.datetime.now(dt.UTC))
    with store_client(store, user) as client:
        client.append("INBOX", notice)
    engine, account_id = http_engine(store), account(db, user)
    result = engine.run_pass(db.engine, account_id, user, spec(old, user))
    assert isinstance(result, Fallback)
    assert "not untouched" in result.reason and "INBOX (1)" in result.reason
    with store_client(store, user) as client:  # nothing deleted, nothing copied by dsync
        client.select_folder("INBOX", readonly=True)
        assert client.search("ALL") == [1]
    [status] = migration_status(db.engine, [user])
    assert status["engine"] == "imap" and "not untouched" in status["engine_note"]
    # Decided once: later passes go straight to the imap engine.
    again = engine.run_pass(db.engine, account_id, user, spec(old, user))
    assert isinstance(again, Fallback)


def test_a_wrong_api_key_ends_the_pass_in_a_readable_error(
        old: dovecot.DovecotInstance, store: dovecot.DovecotInstance, db: Store) -> None:
    user = "refused@old.example"
    seed(old, user)
    engine = http_engine(store)
    engine.doveadm = HttpDoveadm(f"http://127.0.0.1:{store.doveadm_port}/doveadm/v1",
                                 "not-the-key", timeout=1, pass_timeout=120)
    account_id = account(db, user)
    result = engine.run_pass(db.engine, account_id, user, spec(old, user))
    assert not isinstance(result, Fallback)
    assert result.state == "error" and result.error_kind == "store"
    assert "does not answer a wrong API key" in (result.error or "")
    assert CopyState(db.engine, account_id).copy_engine() is None  # nothing was decided


def test_a_missing_credential_ends_the_pass_in_the_reason_read_back_from_the_store(
        old: dovecot.DovecotInstance, store: dovecot.DovecotInstance, db: Store,
        tmp_path: Path) -> None:
    """The entry is written where the store does not look (a misconfigured directory): the
    store's doveadm has no imapc settings for the user, its process dies and the HTTP
    connection drops without an answer. The reason comes back from the store's log."""
    user = "nocred@old.example"
    seed(old, user)
    engine, account_id = http_engine(store, credentials=tmp_path / "elsewhere"), account(db, user)
    result = engine.run_pass(db.engine, account_id, user, spec(old, user))
    assert not isinstance(result, Fallback) and result.state == "error"
    assert "without an answer" in (result.error or "")
    assert "missing imapc" in (result.error or "")
    [status] = migration_status(db.engine, [user])
    assert status["last_error"] == result.error and status["last_pass_at"] is None
    assert PASSWORD not in (result.error or "")


@pytest.mark.parametrize("transport", ["http", "local"])
def test_a_password_the_old_server_refuses_is_an_error_not_success(
        old: dovecot.DovecotInstance, store: dovecot.DovecotInstance, db: Store,
        transport: str) -> None:
    user = "badpw@old.example"
    engine = http_engine(store) if transport == "http" else local_engine(store)
    account_id = account(db, user)
    state = CopyState(db.engine, account_id)
    state.write_progress(copy_engine="dsync")  # past the first pass: straight to backup
    result = engine.run_pass(db.engine, account_id, user, spec(old, user, password="wrong"))
    assert not isinstance(result, Fallback)
    assert result.state == "error" and result.error_kind == "auth"
    assert "imapc" in (result.error or "") and "Authentication failed" in (result.error or "")
    assert CopyState(db.engine, account_id).copy_engine() == "dsync"
    assert store.dsync_users is not None and not list(store.dsync_users.glob("*/*"))


def test_a_password_with_whitespace_falls_back_to_the_imap_engine(
        old: dovecot.DovecotInstance, store: dovecot.DovecotInstance, db: Store) -> None:
    user = "spaced@old.example"
    engine, account_id = http_engine(store), account(db, user)
    result = engine.run_pass(db.engine, account_id, user,
                             spec(old, user, password=SPACED_PASSWORD))
    assert isinstance(result, Fallback) and "whitespace" in result.reason
    assert SPACED_PASSWORD not in result.reason
    assert CopyState(db.engine, account_id).copy_engine() == "imap"
