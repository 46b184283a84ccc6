"""On-login migration end to end: a real old server, a real new store, the real proxy.

A user of a migrating domain who never existed on the new store logs in through the proxy with
their old password; the proxy checks it at the old server, creates the account, leaves the
notice and copies the mailbox in its worker processes while the session is relayed.
"""

from __future__ import annotations

import imaplib
import json
import poplib
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from imapclient import IMAPClient

from migrating_proxy.migration import SourceSpec, SourceUnavailable, check_source_login
from tests.support import dovecot
from tests.support.dovecot import DovecotInstance, free_port
from tests.support.mail import (
    SeedMessage,
    Snapshot,
    make_message,
    sample_corpus,
    seed_mailbox,
    snapshot_folders,
)
from tests.support.proxy import Proxy
from tests.support.secrets import find_secrets
from tests.support.tls import TLSFiles

ALICE, ALICE_PW = "alice@old.example", "alice-pw"
BOB, BOB_PW = "bob@old.example", "bob-pw"
NOTICE_SUBJECT = b"Your mailbox is moving to a new mail server"


def migrating_proxy(directory: Path, store: DovecotInstance, old: DovecotInstance,
                    protocol: str = "imap", workers: int = 1, domain_flags: tuple[str, ...] = (),
                    **migration: Any) -> Proxy:
    proxy = Proxy(directory, store, overrides={"migration": {"workers": workers, **migration}})
    port = old.imap_port if protocol == "imap" else old.pop3_port
    proxy.cli("domain", "add", "old.example", "--source", f"{protocol}://127.0.0.1:{port}",
              "--cutover", "immediate", *domain_flags)
    return proxy


@pytest.fixture
def seeded_old(old_server: DovecotInstance) -> DovecotInstance:
    seed_mailbox("127.0.0.1", old_server.imap_port, ALICE, ALICE_PW, sample_corpus())
    return old_server


@pytest.fixture
def proxy(tmp_path: Path, new_store: DovecotInstance,
          seeded_old: DovecotInstance) -> Iterator[Proxy]:
    with migrating_proxy(tmp_path / "proxy", new_store, seeded_old) as proxy:
        yield proxy


def snapshot(port: int, address: str, password: str | None = None,
             master: tuple[str, str] | None = None) -> Snapshot:
    client = IMAPClient("127.0.0.1", port, ssl=False)
    if master:
        client.plain_login(master[0], master[1], authorization_identity=address)
    else:
        client.login(address, password or "")
    folders = snapshot_folders(client)
    client.logout()
    return folders


def store_snapshot(store: DovecotInstance, address: str) -> dict[str, list[tuple[Any, ...]]]:
    assert store.master_user and store.master_password
    return snapshot(store.imap_port, address, master=(store.master_user, store.master_password))


def without_notice(folders: dict[str, list[tuple[Any, ...]]]) -> dict[str, list[tuple[Any, ...]]]:
    inbox = [m for m in folders.get("INBOX", []) if NOTICE_SUBJECT not in m[0]]
    return {**folders, "INBOX": inbox}


def notices(folders: dict[str, list[tuple[Any, ...]]]) -> int:
    return sum(NOTICE_SUBJECT in m[0] for m in folders.get("INBOX", []))


def db_rows(proxy: Proxy, table: str) -> list[Any]:
    engine = sqlalchemy.create_engine(f"sqlite:///{proxy.directory / 'proxy.db'}")
    with engine.connect() as conn:
        rows = conn.execute(sqlalchemy.text(f"SELECT * FROM {table}")).all()
    engine.dispose()
    return rows


# -- the happy path ----------------------------------------------------------------------------
def test_first_login_migrates_the_whole_mailbox(proxy: Proxy, new_store: DovecotInstance,
                                                 seeded_old: DovecotInstance) -> None:
    before = snapshot(seeded_old.imap_port, ALICE, ALICE_PW)

    client = IMAPClient("127.0.0.1", proxy.imap_port, ssl=False)
    client.login(ALICE, ALICE_PW)  # answered at once; the copy runs in the worker
    client.select_folder("INBOX")
    client.logout()

    status = proxy.wait_for_state(ALICE)
    assert status["state"] == "COMPLETED", status
    migrated = store_snapshot(new_store, ALICE)
    assert without_notice(migrated) == before  # folders, bytes, flags, dates
    assert notices(migrated) == 1
    [notice] = [m[0] for m in migrated["INBOX"] if NOTICE_SUBJECT in m[0]]
    assert re.search(rb"\r\nDate: \w{3}, \d+ \w{3} \d{4} [\d:]{8} \+0000\r\n", notice)
    assert snapshot(seeded_old.imap_port, ALICE, ALICE_PW) == before  # the source is untouched
    expected = sum(len(messages) for messages in before.values())
    assert status["messages_copied"] == expected and status["messages_skipped"] == 0
    assert status["folders_done"] == status["folders_total"] > 1
    assert status["bytes_copied"] > 200_000
    assert db_rows(proxy, "vault") == []  # the captured password is gone once complete
    # The first login counts as a login, and times carry their zone as in `status`.
    [account] = json.loads(proxy.cli("account", "list", "--json").stdout)
    assert account["last_login_at"].endswith("+00:00"), account
    assert account["created_at"].endswith("+00:00"), account
    table = proxy.cli("account", "list").stdout.splitlines()
    assert table[1].split()[-2:] == [account["created_at"], account["last_login_at"]]

    # The user's password now works at the store directly (the proxy can be retired).
    direct = IMAPClient("127.0.0.1", new_store.imap_port, ssl=False)
    direct.login(ALICE, ALICE_PW)
    direct.logout()


def test_later_logins_pick_up_new_mail_without_duplicates(
        tmp_path: Path, new_store: DovecotInstance, seeded_old: DovecotInstance) -> None:
    with migrating_proxy(tmp_path / "p", new_store, seeded_old, resync_interval=0.0) as proxy:
        IMAPClient("127.0.0.1", proxy.imap_port, ssl=False).login(ALICE, ALICE_PW)
        proxy.wait_for_state(ALICE)
        late = make_message("Arrived at the old server late", "still there\n",
                            datetime(2025, 5, 1, 12, 0, tzinfo=UTC))
        old = IMAPClient("127.0.0.1", seeded_old.imap_port, ssl=False)
        old.login(ALICE, ALICE_PW)
        old.append("INBOX", late)
        old.logout()

        for _ in range(3):  # several logins: still one copy of everything, one notice
            client = IMAPClient("127.0.0.1", proxy.imap_port, ssl=False)
            client.login(ALICE, ALICE_PW)
            client.logout()
            proxy.wait_for_state(ALICE)
        migrated = store_snapshot(new_store, ALICE)
        assert without_notice(migrated) == snapshot(seeded_old.imap_port, ALICE, ALICE_PW)
        assert notices(migrated) == 1


def test_pop3_first_login_with_a_pop3_source(tmp_path: Path, new_store: DovecotInstance,
                                             seeded_old: DovecotInstance) -> None:
    inbox_before = snapshot(seeded_old.imap_port, ALICE, ALICE_PW)["INBOX"]
    with migrating_proxy(tmp_path / "p", new_store, seeded_old, protocol="pop3",
                         domain_flags=("--no-notice",)) as proxy:
        client = poplib.POP3("127.0.0.1", proxy.pop3_port, timeout=20)
        client.user(ALICE)
        assert client.pass_(ALICE_PW).startswith(b"+OK")
        client.quit()
        assert proxy.wait_for_state(ALICE)["state"] == "COMPLETED"
        inbox = store_snapshot(new_store, ALICE)["INBOX"]
    assert notices({"INBOX": inbox}) == 0  # this domain switched the notice off
    assert sorted(m[0] for m in inbox) == sorted(m[0] for m in inbox_before)
    assert len(db_rows(proxy, "pop3_uidls")) == len(inbox_before)


# -- passwords are UTF-8 -------------------------------------------------------------------------
UTF8_USERS = {  # address -> (password, how the user logs in to the proxy)
    "ute@old.example": ("Grüße-Straße-ü€", "IMAP LOGIN with a literal"),
    "zoe@old.example": ("Zoë-Ørsted-€uro-ß", "IMAP AUTHENTICATE PLAIN"),
    "pia@pop.example": ("Pâté-Ñandú-Ünïcode-€", "POP3 USER/PASS, POP3 old server"),
}


def imap_login_with_literal(port: int, user: str, password: str) -> bytes:
    """LOGIN with the password as a literal, the way RFC 9051 carries any octets."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        lines = sock.makefile("rb")
        lines.readline()
        data = password.encode()
        sock.sendall(f"a LOGIN {user} {{{len(data)}}}\r\n".encode())
        assert lines.readline().startswith(b"+")
        sock.sendall(data + b"\r\n")
        while not (answer := lines.readline()).startswith(b"a "):
            pass
        sock.sendall(b"z LOGOUT\r\n")
    return answer


def test_utf8_passwords_migrate_by_imap_login_authenticate_plain_and_pop3(
        tmp_path: Path, new_store: DovecotInstance, old_server: DovecotInstance) -> None:
    """Non-ASCII passwords pass the old server's check and its copy logins, IMAP and POP3,
    and are found in no form in anything the proxy wrote."""
    when = datetime(2025, 2, 2, 12, 0, tzinfo=UTC)
    old_server.stop()  # Dovecot re-reads a passwd-file changed within the same second late
    for address, (password, _how) in UTF8_USERS.items():
        old_server.add_user(address, password)
    old_server.start()
    for address, (password, _how) in UTF8_USERS.items():
        seed_mailbox("127.0.0.1", old_server.imap_port, address, password,
                     {"INBOX": [SeedMessage(make_message(f"for {address}", "hi\n", when))],
                      "Entwürfe": [SeedMessage(make_message("draft", "d\n", when))]})
    ute, zoe, pia = UTF8_USERS
    proxy = migrating_proxy(tmp_path / "p", new_store, old_server)
    proxy.cli("domain", "add", "pop.example", "--source",
              f"pop3://127.0.0.1:{old_server.pop3_port}", "--cutover", "immediate")
    wrong = "Grüße-falsch-€"
    with proxy:  # a wrong one is refused as wrong, not "old server unreachable"
        assert b"[AUTHENTICATIONFAILED]" in imap_login_with_literal(proxy.imap_port, ute, wrong)
        assert imap_login_with_literal(proxy.imap_port, ute, UTF8_USERS[ute][0]).startswith(
            b"a OK"), proxy.log_text()[-2000:]
        with IMAPClient("127.0.0.1", proxy.imap_port, ssl=False, timeout=20) as client:
            client.plain_login(zoe, UTF8_USERS[zoe][0])
        pop = poplib.POP3("127.0.0.1", proxy.pop3_port, timeout=20)
        pop.user(pia)
        assert pop.pass_(UTF8_USERS[pia][0]).startswith(b"+OK")
        pop.quit()
        for address in UTF8_USERS:
            assert proxy.wait_for_state(address)["state"] == "COMPLETED", address
    for address in (ute, zoe):
        old = snapshot_folders_of(old_server, address, UTF8_USERS[address][0])
        assert without_notice(store_snapshot(new_store, address)) == old
    pop3_inbox = snapshot_folders_of(old_server, pia, UTF8_USERS[pia][0])["INBOX"]
    assert [m[0] for m in without_notice(store_snapshot(new_store, pia))["INBOX"]] == [
        m[0] for m in pop3_inbox]  # POP3 sees only the INBOX
    for address, (password, _how) in UTF8_USERS.items():  # the store has the password's hash
        with IMAPClient("127.0.0.1", new_store.imap_port, ssl=False) as direct:
            direct.plain_login(address, password)

    written = {str(path): path.read_bytes() for path in proxy.directory.rglob("*")
               if path.is_file()}
    written[str(new_store.users_file)] = new_store.provisioned_text().encode()
    written[str(new_store.log_path)] = new_store.log_path.read_bytes()
    passwords = [wrong, *(password for password, _how in UTF8_USERS.values())]
    leaks = {name: find_secrets(data, passwords, UTF8_USERS) for name, data in written.items()}
    assert {name: found for name, found in leaks.items() if found} == {}
    assert b"UnicodeEncodeError" not in written[str(proxy.log_path)]
    assert db_rows(proxy, "vault") == []


def snapshot_folders_of(server: DovecotInstance, address: str, password: str) -> Snapshot:
    with IMAPClient("127.0.0.1", server.imap_port, ssl=False) as client:
        client.plain_login(address, password)
        return snapshot_folders(client)


# -- what must not happen ------------------------------------------------------------------------
def assert_nothing_created(proxy: Proxy, store: DovecotInstance, address: str) -> None:
    assert proxy.cli("account", "list", "--json").stdout.strip() == "[]"
    assert address not in store.provisioned_text()
    assert db_rows(proxy, "jobs") == [] and db_rows(proxy, "vault") == []


def test_wrong_old_password_creates_nothing(proxy: Proxy, new_store: DovecotInstance) -> None:
    client = imaplib.IMAP4("127.0.0.1", proxy.imap_port)
    with pytest.raises(imaplib.IMAP4.error, match=r"\[AUTHENTICATIONFAILED\]"):
        client.login(ALICE, "not-alices-password")
    assert_nothing_created(proxy, new_store, ALICE)
    assert "old server refused the password" in proxy.log_text()


def test_old_server_down_answers_unavailable_and_creates_nothing(
        tmp_path: Path, new_store: DovecotInstance, old_server: DovecotInstance) -> None:
    proxy = Proxy(tmp_path / "p", new_store)
    proxy.cli("domain", "add", "old.example", "--source", f"imap://127.0.0.1:{free_port()}",
              "--cutover", "immediate")
    with proxy:
        client = imaplib.IMAP4("127.0.0.1", proxy.imap_port)
        with pytest.raises(imaplib.IMAP4.error, match=r"\[UNAVAILABLE\]"):
            client.login(ALICE, ALICE_PW)
        assert_nothing_created(proxy, new_store, ALICE)


def test_unknown_domain_and_switched_off_domain_are_refused(
        proxy: Proxy, new_store: DovecotInstance) -> None:
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        imaplib.IMAP4("127.0.0.1", proxy.imap_port).login("someone@elsewhere.example", "pw")
    proxy.cli("domain", "disable", "old.example")  # takes effect at the next login
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        imaplib.IMAP4("127.0.0.1", proxy.imap_port).login(ALICE, ALICE_PW)
    assert_nothing_created(proxy, new_store, ALICE)
    proxy.cli("domain", "enable", "old.example")
    client = imaplib.IMAP4("127.0.0.1", proxy.imap_port)
    assert client.login(ALICE, ALICE_PW)[0] == "OK"
    client.logout()


def test_concurrent_first_logins_make_one_account_and_one_job(
        proxy: Proxy, new_store: DovecotInstance) -> None:
    results: list[str] = []

    def login() -> None:
        client = IMAPClient("127.0.0.1", proxy.imap_port, ssl=False, timeout=30)
        try:
            client.login(ALICE, ALICE_PW)
            results.append("ok")
            client.logout()
        except Exception as exc:  # reported through `results`
            results.append(repr(exc))

    threads = [threading.Thread(target=login) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == ["ok"] * 6, new_store.log_path.read_text()[-6000:]
    assert proxy.wait_for_state(ALICE)["state"] == "COMPLETED"
    assert len(db_rows(proxy, "accounts")) == 1
    assert len(db_rows(proxy, "jobs")) == 1
    assert notices(store_snapshot(new_store, ALICE)) == 1


def test_password_changed_at_the_old_server_is_accepted(
        proxy: Proxy, new_store: DovecotInstance, seeded_old: DovecotInstance) -> None:
    IMAPClient("127.0.0.1", proxy.imap_port, ssl=False).login(ALICE, ALICE_PW)
    proxy.wait_for_state(ALICE)
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        imaplib.IMAP4("127.0.0.1", proxy.imap_port).login(ALICE, "new-pw")
    seeded_old.stop()
    seeded_old.users_file.write_text(
        seeded_old.users_file.read_text().replace("{PLAIN}alice-pw", "{PLAIN}new-pw"))
    seeded_old.start()
    client = imaplib.IMAP4("127.0.0.1", proxy.imap_port)
    assert client.login(ALICE, "new-pw")[0] == "OK"
    client.logout()
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        imaplib.IMAP4("127.0.0.1", proxy.imap_port).login(ALICE, ALICE_PW)
    direct = IMAPClient("127.0.0.1", new_store.imap_port, ssl=False)
    direct.login(ALICE, "new-pw")  # re-provisioned with the new hash
    direct.logout()


def test_local_account_of_a_migrating_domain_does_not_ask_the_old_server(
        proxy: Proxy, seeded_old: DovecotInstance) -> None:
    proxy.add_account("carol@old.example", "carol-pw")  # created by an admin, not migrated
    seeded_old.stop()
    client = imaplib.IMAP4("127.0.0.1", proxy.imap_port)
    assert client.login("carol@old.example", "carol-pw")[0] == "OK"
    client.logout()
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        imaplib.IMAP4("127.0.0.1", proxy.imap_port).login("carol@old.example", "wrong")


def messages_on_store(store: DovecotInstance, address: str) -> int:
    """Messages the store holds for address, counted in its maildir (cheap enough to poll)."""
    maildir = store.maildir(address)
    return sum(1 for part in ("cur", "new") for _ in maildir.glob(f"**/{part}/*"))


def test_crash_in_the_middle_of_a_copy_then_restart_gives_an_exact_copy(
        tmp_path: Path, new_store: DovecotInstance, old_server: DovecotInstance) -> None:
    when = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
    bulk = [SeedMessage(make_message(f"bulk {n}", f"message {n}\n", when, size=40_000))
            for n in range(1200)]
    seed_mailbox("127.0.0.1", old_server.imap_port, ALICE, ALICE_PW,
                 {"INBOX": bulk[:800], "Archive": bulk[800:]})
    before = snapshot(old_server.imap_port, ALICE, ALICE_PW)
    proxy = migrating_proxy(tmp_path / "p", new_store, old_server)
    proxy.start()
    try:
        IMAPClient("127.0.0.1", proxy.imap_port, ssl=False).login(ALICE, ALICE_PW)
        deadline = time.monotonic() + 60
        while messages_on_store(new_store, ALICE) < 100 and time.monotonic() < deadline:
            time.sleep(0.002)
        proxy.crash()  # serve, the worker pool and the worker: all at once, mid-copy
        assert 0 < messages_on_store(new_store, ALICE) < len(bulk), "crash not mid-copy"
        proxy.start()
        assert proxy.wait_for_state(ALICE)["state"] == "COMPLETED"
    finally:
        proxy.stop()
    migrated = store_snapshot(new_store, ALICE)
    assert without_notice(migrated) == before  # nothing lost, nothing twice
    assert notices(migrated) == 1


def test_a_folder_the_old_server_refuses_ends_the_pass_in_error_with_the_rest_copied(
        tmp_path: Path, new_store: DovecotInstance, seeded_old: DovecotInstance) -> None:
    """One folder's failure neither stops the others nor keeps the account PENDING through
    hours of retries: the pass copies the rest and ends in ERROR naming the folder."""
    before = snapshot(seeded_old.imap_port, ALICE, ALICE_PW)
    broken = seeded_old.maildir(ALICE) / "Archive" / "2024"
    broken.chmod(0)  # the old server answers STATUS and SELECT with "NO [SERVERBUG] ..."
    try:
        with migrating_proxy(tmp_path / "p", new_store, seeded_old, parallel_folders=1) as proxy:
            IMAPClient("127.0.0.1", proxy.imap_port, ssl=False).login(ALICE, ALICE_PW)
            status = proxy.wait_for_state(ALICE, timeout=30)
            assert status["state"] == "ERROR", status
            assert "Archive/2024" in status["last_error"]
            assert "SERVERBUG" in status["last_error"]
            assert status["folders_done"] == status["folders_total"] - 1
            migrated = without_notice(store_snapshot(new_store, ALICE))
            assert {k: v for k, v in migrated.items() if v} == {
                k: v for k, v in before.items() if v and k != "Archive/2024"}
            assert [row.state for row in db_rows(proxy, "jobs")] == ["failed"]  # no retries

            # As the README says: fix the folder at the old server, then resync. (Dovecot's
            # folder list index, a cache, still remembers the failure: drop it.)
            broken.chmod(0o700)
            for cache in seeded_old.maildir(ALICE).glob("dovecot.list.index*"):
                cache.unlink()
            proxy.cli("resync", ALICE)
            assert proxy.wait_for_state(ALICE, timeout=30)["state"] == "COMPLETED"
            assert without_notice(store_snapshot(new_store, ALICE)) == before
    finally:
        broken.chmod(0o700)


def test_old_server_certificates_are_verified_unless_the_domain_says_not(
        tmp_path: Path, new_store: DovecotInstance, tls_files: TLSFiles) -> None:
    root = dovecot.instance_root("mp-oldtls-")
    try:
        with dovecot.old_server(root, {ALICE: ALICE_PW}, tls=tls_files) as old, \
                Proxy(tmp_path / "p", new_store) as proxy:
            source = f"imaps://127.0.0.1:{old.imaps_port}"
            proxy.cli("domain", "add", "old.example", "--source", source,
                      "--cutover", "immediate")
            # The test CA is not one the proxy trusts: a man in the middle would look the same.
            with pytest.raises(imaplib.IMAP4.error, match=r"\[UNAVAILABLE\]"):
                imaplib.IMAP4("127.0.0.1", proxy.imap_port).login(ALICE, ALICE_PW)
            assert_nothing_created(proxy, new_store, ALICE)
            proxy.cli("domain", "remove", "old.example")
            proxy.cli("domain", "add", "old.example", "--source", source, "--no-verify-tls",
                      "--cutover", "immediate")
            client = imaplib.IMAP4("127.0.0.1", proxy.imap_port)
            assert client.login(ALICE, ALICE_PW)[0] == "OK"
            client.logout()
    finally:
        dovecot.remove_root(root)


def test_an_old_server_with_a_private_ca_is_trusted_with_source_ca(
        tmp_path: Path, new_store: DovecotInstance, tls_files: TLSFiles) -> None:
    """Refused without --source-ca (as a man in the middle would be), accepted with it for the
    check and the copy, IMAPS and POP3S; the CA file may be gone after `domain add`."""
    root = dovecot.instance_root("mp-oldca-")
    try:
        with dovecot.old_server(root, {ALICE: ALICE_PW}, tls=tls_files) as old, \
                migrating_proxy(tmp_path / "p", new_store, old, workers=1) as proxy:
            seed_mailbox("127.0.0.1", old.imap_port, ALICE, ALICE_PW, sample_corpus())
            source = f"imaps://127.0.0.1:{old.imaps_port}"
            proxy.cli("domain", "remove", "old.example")
            proxy.cli("domain", "add", "old.example", "--source", source, "--cutover",
                      "immediate")
            with pytest.raises(imaplib.IMAP4.error, match=r"\[UNAVAILABLE\]"):
                imaplib.IMAP4("127.0.0.1", proxy.imap_port).login(ALICE, ALICE_PW)
            assert_nothing_created(proxy, new_store, ALICE)
            assert "CERTIFICATE_VERIFY_FAILED" in proxy.log_text()

            ca_file = tmp_path / "old-ca.pem"
            ca_file.write_bytes(tls_files.ca_cert.read_bytes())
            proxy.cli("domain", "remove", "old.example")
            proxy.cli("domain", "add", "old.example", "--source", source, "--source-ca",
                      str(ca_file), "--cutover", "immediate")
            ca_file.unlink()
            client = imaplib.IMAP4("127.0.0.1", proxy.imap_port)
            assert client.login(ALICE, ALICE_PW)[0] == "OK"
            client.logout()
            assert proxy.wait_for_state(ALICE)["state"] == "COMPLETED"
            assert without_notice(store_snapshot(new_store, ALICE)) == snapshot(
                old.imap_port, ALICE, ALICE_PW)

            assert old.pop3s_port is not None
            pop3s = SourceSpec("pop3", "127.0.0.1", old.pop3s_port, "implicit", True, ALICE,
                               ALICE_PW)
            with pytest.raises(SourceUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
                check_source_login(pop3s, timeout=5)
            check_source_login(replace(pop3s, ca_pem=tls_files.ca_cert.read_text()), timeout=5)
    finally:
        dovecot.remove_root(root)


def test_kept_credentials_let_workers_fetch_late_mail_without_a_login(
        tmp_path: Path, new_store: DovecotInstance, seeded_old: DovecotInstance) -> None:
    with migrating_proxy(tmp_path / "p", new_store, seeded_old, keep_credentials=True,
                         resync_interval=1.0) as proxy:
        IMAPClient("127.0.0.1", proxy.imap_port, ssl=False).login(ALICE, ALICE_PW)
        assert proxy.wait_for_state(ALICE)["state"] == "COMPLETED"
        assert len(db_rows(proxy, "vault")) == 1  # kept, encrypted, for the next passes
        old = IMAPClient("127.0.0.1", seeded_old.imap_port, ssl=False)
        old.login(ALICE, ALICE_PW)
        old.append("INBOX", make_message("Late, no login since", "picked up anyway\n",
                                         datetime(2025, 6, 1, 9, 0, tzinfo=UTC)))
        old.logout()
        expected = snapshot(seeded_old.imap_port, ALICE, ALICE_PW)
        deadline = time.monotonic() + 60
        while without_notice(store_snapshot(new_store, ALICE)) != expected:
            assert time.monotonic() < deadline, proxy.log_text()[-3000:]
            time.sleep(0.5)
        assert notices(store_snapshot(new_store, ALICE)) == 1
