"""Sessions go where the login decision says: a real old server, with the user's own password.

The accounts here belong to passthrough domains (the default) and are never switched, so the
transparent cutover's placement serves them from their old server. Real clients log in through
the real `serve` to a real Dovecot old server over each TLS mode a domain's `--source` can name
(plain, STARTTLS/STLS, implicit TLS; certificates checked against a private CA given with
`--source-ca`, or not checked as `--no-verify-tls` says).
"""

from __future__ import annotations

import datetime as dt
import functools
import imaplib
import poplib
import time
from collections.abc import Iterator

import pytest
from imapclient import IMAPClient

from tests.support import dovecot
from tests.support.dovecot import DovecotInstance, free_port
from tests.support.mail import SeedMessage, make_message, seed_mailbox
from tests.support.proxy import Proxy
from tests.support.tls import TLSFiles

HOST = "127.0.0.1"
# domain -> the old server's service named as its --source (scheme; port filled in below)
SOURCES = {
    "plain.example": "imap", "starttls.example": "imap+starttls", "implicit.example": "imaps",
    "pop.example": "pop3", "stls.example": "pop3+starttls", "pops.example": "pop3s",
    "ca.example": "imap+starttls",  # certificates checked, against the domain's --source-ca
}
USERS = {f"user@{domain}": f"{domain} pw" for domain in SOURCES}


@functools.cache
def old_mail(address: str) -> bytes:
    return make_message(f"only on the old server, for {address}", "hello\n",
                        dt.datetime(2025, 1, 2, 3, 4, tzinfo=dt.UTC))


@pytest.fixture(scope="module")
def old(tls_files: TLSFiles) -> Iterator[DovecotInstance]:
    root = dovecot.instance_root("mp-up-old-")
    try:
        with dovecot.old_server(root, dict(USERS), tls=tls_files) as instance:
            for address, password in USERS.items():
                seed_mailbox(HOST, instance.imap_port, address, password,
                             {"INBOX": [SeedMessage(old_mail(address))]})
            yield instance
    finally:
        dovecot.remove_root(root)


def source_url(old: DovecotInstance, scheme: str) -> str:
    implicit = {"imaps": old.imaps_port, "pop3s": old.pop3s_port}
    port = implicit.get(scheme) or (old.imap_port if scheme.startswith("imap")
                                    else old.pop3_port)
    return f"{scheme}://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, module_store: DovecotInstance,
          old: DovecotInstance, tls_files: TLSFiles) -> Iterator[Proxy]:
    proxy = Proxy(tmp_path_factory.mktemp("upstream") / "proxy", module_store,
                  overrides={"limits": {"max_failures_per_peer": 0,
                                        "max_failures_per_account": 0}})
    for domain, scheme in SOURCES.items():
        # The test CA is not in the system trust store: the domain says to trust it, or not to
        # verify at all.
        trust = ["--source-ca", str(tls_files.ca_cert)] if domain == "ca.example" \
            else ["--no-verify-tls"]
        proxy.cli("domain", "add", domain, "--source", source_url(old, scheme), *trust,
                  "--no-notice")
    with proxy:
        yield proxy


@pytest.mark.parametrize("domain", [d for d, s in SOURCES.items() if s.startswith("imap")])
def test_imap_sessions_are_served_by_the_old_server(
        proxy: Proxy, old: DovecotInstance, module_store: DovecotInstance, domain: str) -> None:
    address = f"user@{domain}"
    for _ in range(2):  # the first login (account created), then a later one
        client = IMAPClient(HOST, proxy.imap_port, ssl=False, timeout=15)
        client.login(address, USERS[address])
        client.select_folder("INBOX")
        fetched = client.fetch(client.search("ALL"), ["BODY.PEEK[]"])
        assert [data[b"BODY[]"] for data in fetched.values()] == [old_mail(address)]
        client.logout()
    # A change made through the proxy happens at the old server.
    client = IMAPClient(HOST, proxy.imap_port, ssl=False, timeout=15)
    client.login(address, USERS[address])
    client.create_folder("made through the proxy")
    client.logout()
    direct = IMAPClient(HOST, old.imap_port, ssl=False, timeout=15)
    direct.login(address, USERS[address])
    assert direct.folder_exists("made through the proxy")
    direct.logout()
    # The connection opened to the store while the decision ran was dropped unused.
    assert f"user=<{address}>" not in module_store.log_path.read_text()
    assert proxy.status(address)[0]["state"] == "PENDING"  # the copy is queued as usual


@pytest.mark.parametrize("domain", [d for d, s in SOURCES.items() if s.startswith("pop3")])
def test_pop3_sessions_are_served_by_the_old_server(proxy: Proxy, domain: str) -> None:
    address = f"user@{domain}"
    for _ in range(2):
        client = poplib.POP3(HOST, proxy.pop3_port, timeout=15)
        client.user(address)
        assert client.pass_(USERS[address]) == b"+OK Logged in."  # the proxy's own answer
        assert client.stat()[0] == 1
        lines = client.retr(1)[1]
        assert b"\r\n".join(lines) + b"\r\n" == old_mail(address)
        client.quit()


def test_an_old_server_that_refuses_gives_a_temporary_failure(
        proxy: Proxy, old: DovecotInstance) -> None:
    address, password = "user@plain.example", USERS["user@plain.example"]
    IMAPClient(HOST, proxy.imap_port, ssl=False, timeout=15).login(address, password)
    users = old.users_file.read_text()
    # The password changed at the old server after the proxy last saw it: the proxy's hash
    # still accepts it, the old server does not. Dovecot re-reads its passwd-file by itself.
    old.users_file.write_text(users.replace(f"{{PLAIN}}{password}", "{PLAIN}changed"))
    try:
        deadline = time.monotonic() + 10
        while True:
            client = imaplib.IMAP4(HOST, proxy.imap_port)
            try:
                client.login(address, password)
            except imaplib.IMAP4.error as exc:
                assert "[UNAVAILABLE]" in str(exc)
                break
            client.logout()
            assert time.monotonic() < deadline, "the old server never saw the new password"
            time.sleep(0.5)
        proxy.wait_for_log("old server refused login")
    finally:
        old.users_file.write_text(users)


def test_an_old_server_that_is_down_gives_a_temporary_failure(proxy: Proxy) -> None:
    proxy.cli("domain", "add", "gone.example", "--source", f"imap://127.0.0.1:{free_port()}")
    users = proxy.directory / "gone.csv"
    users.write_text("carol@gone.example,carol-pw\n")
    proxy.cli("import", str(users))  # known locally, served by its old server: which is down
    client = imaplib.IMAP4(HOST, proxy.imap_port)
    with pytest.raises(imaplib.IMAP4.error, match=r"\[UNAVAILABLE\]"):
        client.login("carol@gone.example", "carol-pw")
    proxy.wait_for_log("old server unavailable: cannot connect to old server")


# -- the IMAP client's login without AUTH=PLAIN, at the byte level ------------------------------
def test_imap_login_command_without_auth_plain_uses_literals_for_8bit() -> None:
    from twisted.internet import defer
    from twisted.internet.testing import StringTransport

    from migrating_proxy.endpoints import parse_endpoint
    from migrating_proxy.frontends.backend import IMAPBackendLogin
    from migrating_proxy.upstream import Upstream

    endpoint = parse_endpoint("imap://old.example")
    greeted: defer.Deferred = defer.Deferred()
    client = IMAPBackendLogin(greeted, endpoint, "old server", True)
    transport = StringTransport()
    client.makeConnection(transport)
    client.dataReceived(b"* OK [CAPABILITY IMAP4rev1 LITERAL+] ready\r\n")
    assert greeted.called
    upstream = Upstream.old_server(endpoint, "dan@x.example", 'dan "the man"', "p\u00e4ss\u00fc")
    ready = client.log_in(upstream)
    assert transport.value() == b'P2 LOGIN "dan \\"the man\\"" {7}\r\n'
    transport.clear()
    client.dataReceived(b"+ go ahead\r\n")
    assert transport.value() == "p\u00e4ss\u00fc".encode() + b"\r\n"
    client.dataReceived(b"P2 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n")
    assert ready.called and ready.result.capabilities == "IMAP4rev1 IDLE"


def test_an_old_server_certificate_nobody_vouches_for_is_refused(
        proxy: Proxy, old: DovecotInstance) -> None:
    """Without --source-ca or --no-verify-tls the test CA is unknown: no session goes there."""
    proxy.cli("domain", "add", "strict.example", "--source", source_url(old, "imaps"))
    users = proxy.directory / "strict.csv"
    users.write_text("dan@strict.example,dan-pw\n")
    proxy.cli("import", str(users))  # known locally, served by its old server
    client = imaplib.IMAP4(HOST, proxy.imap_port)
    with pytest.raises(imaplib.IMAP4.error, match=r"\[UNAVAILABLE\]"):
        client.login("dan@strict.example", "dan-pw")
    log = proxy.wait_for_log("old server unavailable")
    assert "certificate verify failed" in log
