"""The Dovecot fixtures work for real: logins, master users, LMTP, TLS, seeding."""

from __future__ import annotations

import datetime as dt
import poplib
import smtplib
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from imapclient import IMAPClient
from imapclient.exceptions import LoginError
from passlib.hash import sha512_crypt

from tests.support import dovecot
from tests.support.dovecot import DovecotInstance
from tests.support.mail import make_message, sample_corpus, seed_mailbox
from tests.support.tls import TLSFiles

HOST = "127.0.0.1"
CAROL = "carol@new.example"


def imap(instance: DovecotInstance) -> IMAPClient:
    return IMAPClient(HOST, port=instance.imap_port, ssl=False, timeout=10)


def provision(store: DovecotInstance, address: str, password: str) -> None:
    # rounds=5000 (crypt's default) keeps verification fast; the format is what the proxy writes.
    hashed = sha512_crypt.using(rounds=5000).hash(password)
    store.provision(address, f"{{SHA512-CRYPT}}{hashed}")


def test_old_server_imap_login(old_server: DovecotInstance) -> None:
    with imap(old_server) as client:
        client.login("alice@old.example", "alice-pw")
        names = {name for _flags, _sep, name in client.list_folders()}
        assert {"INBOX", "Sent", "Drafts", "Trash", "Junk", "Archive"} <= names
    with imap(old_server) as client, pytest.raises(LoginError):
        client.login("alice@old.example", "wrong")


def test_old_server_pop3_login(old_server: DovecotInstance) -> None:
    pop = poplib.POP3(HOST, old_server.pop3_port, timeout=10)
    pop.user("bob@old.example")
    pop.pass_("bob-pw")
    assert pop.stat() == (0, 0)
    pop.quit()
    pop = poplib.POP3(HOST, old_server.pop3_port, timeout=10)
    pop.user("bob@old.example")
    with pytest.raises(poplib.error_proto):
        pop.pass_("wrong")
    pop.close()


def test_old_server_add_user(old_server: DovecotInstance) -> None:
    old_server.add_user("dave@old.example", "dave-pw")
    with imap(old_server) as client:
        client.login("dave@old.example", "dave-pw")


def test_seed_sample_corpus(old_server: DovecotInstance) -> None:
    corpus = sample_corpus()
    counts = seed_mailbox(HOST, old_server.imap_port, "alice@old.example", "alice-pw", corpus)
    assert counts == {name: len(msgs) for name, msgs in corpus.items()}
    with imap(old_server) as client:
        client.login("alice@old.example", "alice-pw")
        listing = {name: flags for flags, _sep, name in client.list_folders()}
        assert "Reçus" in listing
        assert b"\\Noselect" in listing["Projects"]  # a parent that is not a mailbox itself
        client.select_folder("Archive/2024", readonly=True)
        fetched = client.fetch(client.search(), ["FLAGS", "INTERNALDATE"])
        flags = {flag for item in fetched.values() for flag in item[b"FLAGS"]}
        assert {b"\\Seen", b"project-x", b"\\Deleted"} <= flags
        first = corpus["Archive/2024"][0].internaldate
        assert first is not None
        # imapclient returns INTERNALDATE as naive local time; compare as instants.
        got = fetched[min(fetched)][b"INTERNALDATE"].astimezone(dt.UTC)
        assert got == first.astimezone(dt.UTC)


def test_make_message_size_and_crlf() -> None:
    when = dt.datetime(2024, 5, 6, 7, 8, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    raw = make_message("Größe", "Grüße\n", when, message_id="<x@y>", size=50_000)
    assert 50_000 <= len(raw) < 50_200
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert b"Message-ID: <x@y>\r\n" in raw
    assert b"Date: Mon, 06 May 2024 07:08:00 +0200\r\n" in raw


def test_new_store_direct_and_master_login(new_store: DovecotInstance) -> None:
    provision(new_store, CAROL, "carol-pw")
    assert new_store.master_user and new_store.master_password
    with imap(new_store) as client:
        client.login(CAROL, "carol-pw")
    with imap(new_store) as client:
        client.plain_login(
            new_store.master_user, new_store.master_password, authorization_identity=CAROL
        )
        client.select_folder("INBOX")
    # pass = yes: a master login for a user that was never provisioned must fail.
    with imap(new_store) as client, pytest.raises(LoginError):
        client.plain_login(
            new_store.master_user, new_store.master_password,
            authorization_identity="mallory@new.example",
        )


def test_new_store_pop3_master_separator(new_store: DovecotInstance) -> None:
    provision(new_store, CAROL, "carol-pw")
    pop = poplib.POP3(HOST, new_store.pop3_port, timeout=10)
    pop.user(f"{CAROL}*{new_store.master_user}")
    pop.pass_(new_store.master_password or "")
    assert pop.stat() == (0, 0)
    pop.quit()


def test_new_store_lmtp_delivery(new_store: DovecotInstance) -> None:
    provision(new_store, CAROL, "carol-pw")
    when = dt.datetime(2025, 4, 1, 12, 0, tzinfo=dt.UTC)
    raw = make_message("Delivered by LMTP", "hi carol\n", when, to=CAROL)
    with smtplib.LMTP(HOST, new_store.lmtp_port, timeout=10) as lmtp:
        assert lmtp.sendmail("sender@elsewhere.example", [CAROL], raw) == {}
        # Unprovisioned recipients are refused: the static userdb checks the passdb.
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            lmtp.sendmail("sender@elsewhere.example", ["nobody@new.example"], raw)
    with imap(new_store) as client:
        client.login(CAROL, "carol-pw")
        client.select_folder("INBOX", readonly=True)
        assert len(client.search(["SUBJECT", "Delivered by LMTP"])) == 1
    assert any(new_store.maildir(CAROL).glob("new/*"))


@pytest.fixture
def tls_old_server(tls_files: TLSFiles) -> Iterator[DovecotInstance]:
    root = dovecot.instance_root("mp-tls-")
    try:
        with dovecot.old_server(root, {"alice@old.example": "alice-pw"}, tls=tls_files) as inst:
            yield inst
    finally:
        dovecot.remove_root(root)


def test_tls_imaps_and_starttls(tls_old_server: DovecotInstance, tls_files: TLSFiles) -> None:
    context = ssl.create_default_context(cafile=str(tls_files.ca_cert))
    assert tls_old_server.imaps_port and tls_old_server.pop3s_port
    with IMAPClient("localhost", port=tls_old_server.imaps_port, ssl_context=context) as client:
        client.login("alice@old.example", "alice-pw")
    with imap(tls_old_server) as client:
        client.starttls(context)
        client.login("alice@old.example", "alice-pw")
    pop = poplib.POP3_SSL(HOST, tls_old_server.pop3s_port, context=context, timeout=10)
    pop.user("alice@old.example")
    pop.pass_("alice-pw")
    pop.quit()


def test_new_store_config_comes_from_snippet(new_store: DovecotInstance) -> None:
    """The snippet, with only paths, ports and the mail owner replaced; nothing of the
    store's users, mail or listeners comes from the fixture's own settings."""
    included = (new_store.root / "conf.d" / "migrating-proxy.conf").read_text().splitlines()
    original = dovecot.SNIPPET.read_text().splitlines()
    assert len(included) == len(original)
    replaced = (dovecot.SNIPPET_MASTERS_PATH, dovecot.SNIPPET_USERS_PATH,
                dovecot.SNIPPET_MAIL_ROOT, dovecot.SNIPPET_MAIL_OWNER, "port = ")
    for before, after in zip(original, included, strict=True):
        if before != after:
            assert any(literal in before for literal in replaced), (before, after)
    assert f"port = {new_store.imap_port}" in included[original.index("    port = 10143")]
    base = new_store.config_path.read_text()
    for setting in ("passdb", "userdb", "mail_location", "inet_listener"):
        assert setting not in base, setting


def test_stop_waits_for_master() -> None:
    root = dovecot.instance_root("mp-stop-")
    try:
        inst = dovecot.old_server(root, {})
        inst.start()
        pid = int((inst.base_dir / "master.pid").read_text())
        inst.stop()
        assert not inst.running
        assert not Path(f"/proc/{pid}").exists()
    finally:
        dovecot.remove_root(root)
