"""The POP3 front-end against a real Dovecot store, driven by poplib, curl and raw sockets.

Most tests share one store and one proxy (module scope): starting Dovecot and the proxy costs
about three seconds, and these tests only need a mailbox and a login. The proxy's per-peer and
per-account throttles are switched off there, since every test logs in from 127.0.0.1 and many
fail on purpose; throttling has its own proxy. Tests that need another configuration (throttle,
tls.require, idle timeout) start their own proxy in front of the shared store, with the same
accounts, so the store's provisioned-users file stays the same.
"""

from __future__ import annotations

import base64
import poplib
import random
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from imapclient import IMAPClient

from tests.support.dovecot import DovecotInstance
from tests.support.mail import sasl_plain
from tests.support.proxy import Proxy
from tests.support.tls import TLSFiles, client_context

HOST = "127.0.0.1"
USER, PASSWORD = "carol@new.example", 'carol secret "pw" \\ with spaces'
# Lines starting with a dot must survive dot-stuffing, including a lone "." (end marker).
MESSAGES = [
    b"From: a@b.example\r\nTo: carol@new.example\r\nSubject: one\r\n\r\nfirst body\r\n",
    b"From: a@b.example\r\nSubject: two\r\n\r\n.leading dot\r\n.\r\n..two dots\r\nend\r\n",
    b"From: a@b.example\r\nSubject: three\r\n\r\n" + b"x" * 70 + b"\r\n" * 500,
]
NO_THROTTLE = {"max_failures_per_peer": 0, "max_failures_per_account": 0}


# -- fixtures -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def store(module_store: DovecotInstance) -> DovecotInstance:
    return module_store


def make_proxy(directory: Path, store: DovecotInstance, tls: TLSFiles | None = None,
               require_tls: bool = False, **limits: Any) -> Proxy:
    """A configured proxy with the module's account; start it with `with` (or `.start()`)."""
    overrides: dict[str, dict[str, Any]] = {"limits": limits}
    if require_tls:
        overrides["tls"] = {"require": True}
    proxy = Proxy(directory, store, tls=tls, overrides=overrides)
    proxy.add_account(USER, PASSWORD)
    return proxy


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, store: DovecotInstance,
          tls_files: TLSFiles) -> Iterator[Proxy]:
    with make_proxy(tmp_path_factory.mktemp("pop3-proxy"), store, tls_files,
                    **NO_THROTTLE) as proxy:
        seed(store)
        yield proxy


def seed(store: DovecotInstance) -> None:
    """APPEND at the store directly: the bytes are stored exactly as given."""
    with IMAPClient(HOST, store.imap_port, ssl=False, timeout=10) as client:
        client.login(USER, PASSWORD)
        for message in MESSAGES:
            client.append("INBOX", message)



def b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


class Wire:
    """POP3 at the byte level, for what poplib refuses to send (and to see every line)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=15)
        self.file = self.sock.makefile("rb")
        self.greeting = self.file.readline()

    def ask(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.file.readline()

    def multiline(self, line: bytes) -> list[bytes]:
        first = self.ask(line)
        assert first.startswith(b"+OK"), first
        body = []
        while (next_line := self.file.readline()) != b".\r\n":
            assert next_line, "connection closed inside a multi-line reply"
            body.append(next_line.rstrip(b"\r\n"))
        return body

    def rest(self) -> list[bytes]:
        """Every line until the server closes the connection (fails if it never does)."""
        return list(iter(self.file.readline, b""))

    def close(self) -> None:
        self.sock.close()


def login(port: int, user: str = USER, password: str = PASSWORD) -> poplib.POP3:
    client = poplib.POP3(HOST, port, timeout=15)
    client.user(user)
    client.pass_(password)
    return client


def failed_login(port: int, user: str, password: str) -> bytes:
    client = poplib.POP3(HOST, port, timeout=15)
    client.user(user)
    with pytest.raises(poplib.error_proto) as refused:
        client.pass_(password)
    client.close()
    return refused.value.args[0]


def transcript(client: poplib.POP3) -> dict[str, object]:
    """What a client sees in a session; must not depend on a proxy being in between."""
    result = {
        "stat": client.stat(),
        "list": client.list()[1],
        "uidl": client.uidl()[1],
        "retr": [b"\r\n".join(client.retr(n)[1]) + b"\r\n" for n in (1, 2, 3)],
        "top": client.top(2, 1)[1],
        "dele": client.dele(1),
        "stat_after_dele": client.stat(),
        "rset": client.rset(),
    }
    client.quit()
    return result


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["curl", "-sS", "--max-time", "20", *args],
                          capture_output=True, timeout=30)


# -- a working session ----------------------------------------------------------------------
def test_full_session_is_the_same_through_the_proxy(proxy: Proxy,
                                                   store: DovecotInstance) -> None:
    via_store = transcript(login(store.pop3_port))
    via_proxy = transcript(login(proxy.pop3_port))
    assert via_proxy == via_store
    assert via_proxy["retr"] == MESSAGES  # byte-exact after dot-stuffing both ways
    assert via_proxy["stat"] == (3, sum(len(m) for m in MESSAGES))
    assert '"outcome": "ok"' in proxy.wait_for_log('"mechanism": "USER"')


def test_dele_through_the_proxy_reaches_the_store(proxy: Proxy,
                                                  store: DovecotInstance) -> None:
    client = login(proxy.pop3_port)
    uids = client.uidl()[1]
    client.dele(3)
    client.quit()
    direct = login(store.pop3_port)
    assert direct.uidl()[1] == uids[:2]
    direct.quit()
    seed_one(store, MESSAGES[2])  # the other tests expect the mailbox as seeded


def seed_one(store: DovecotInstance, message: bytes) -> None:
    with IMAPClient(HOST, store.imap_port, ssl=False, timeout=10) as client:
        client.login(USER, PASSWORD)
        client.append("INBOX", message)


def test_pipelined_commands_after_pass_reach_the_store(proxy: Proxy) -> None:
    wire = Wire(proxy.pop3_port)
    wire.sock.sendall(f"USER {USER}\r\nPASS {PASSWORD}\r\nSTAT\r\nQUIT\r\n".encode())
    replies = wire.rest()
    assert len(replies) == 4 and all(r.startswith(b"+OK") for r in replies), replies
    assert replies[1] == b"+OK Logged in.\r\n"
    assert replies[2].startswith(b"+OK 3 ")  # STAT, answered by the store


def test_capa_before_login(proxy: Proxy) -> None:
    wire = Wire(proxy.pop3_port)
    assert wire.greeting.startswith(b"+OK")
    capabilities = wire.multiline(b"CAPA")
    for expected in (b"TOP", b"UIDL", b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING",
                     b"USER", b"SASL PLAIN LOGIN", b"STLS"):
        assert expected in capabilities
    assert wire.multiline(b"AUTH") == [b"PLAIN", b"LOGIN"]
    assert wire.ask(b"NOOP").startswith(b"-ERR Unknown command or not allowed before login.")
    assert wire.ask(b"QUIT") == b"+OK Logging out\r\n"
    assert wire.rest() == []


def test_curl_lists_and_retrieves(proxy: Proxy) -> None:
    listing = curl("-u", f"{USER}:{PASSWORD}", f"pop3://{HOST}:{proxy.pop3_port}/")
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.splitlines() == [f"{n} {len(m)}".encode()
                                           for n, m in enumerate(MESSAGES, 1)]
    message = curl("-u", f"{USER}:{PASSWORD}", f"pop3://{HOST}:{proxy.pop3_port}/2")
    assert message.returncode == 0, message.stderr
    assert message.stdout == MESSAGES[1]


def test_curl_with_stls(proxy: Proxy, tls_files: TLSFiles) -> None:
    result = curl("--ssl-reqd", "--cacert", str(tls_files.ca_cert), "-u", f"{USER}:{PASSWORD}",
                  f"pop3://{HOST}:{proxy.pop3_port}/1")
    assert result.returncode == 0, result.stderr
    assert result.stdout == MESSAGES[0]
    assert '"tls": true' in proxy.log_text()


def test_stls_and_implicit_tls(proxy: Proxy, tls_files: TLSFiles) -> None:
    client = poplib.POP3(HOST, proxy.pop3_port, timeout=15)
    client.stls(client_context(tls_files))
    assert "STLS" not in client.capa()
    client.user(USER)
    client.pass_(PASSWORD)
    assert client.stat()[0] == 3
    client.quit()

    implicit = poplib.POP3_SSL(HOST, proxy.ports["pop3s"], context=client_context(tls_files),
                               timeout=15)
    assert "STLS" not in implicit.capa()
    implicit.user(USER)
    implicit.pass_(PASSWORD)
    assert implicit.retr(1)[1] == MESSAGES[0].rstrip(b"\r\n").split(b"\r\n")
    implicit.quit()


def test_auth_plain_and_login(proxy: Proxy) -> None:
    with_ir = poplib.POP3(HOST, proxy.pop3_port, timeout=15)
    assert with_ir._shortcmd(f"AUTH PLAIN {sasl_plain(USER, PASSWORD)}") == b"+OK Logged in."
    assert with_ir.stat()[0] == 3
    with_ir.quit()

    continued = poplib.POP3(HOST, proxy.pop3_port, timeout=15)
    assert continued._shortcmd("AUTH PLAIN") == b"+ "
    assert continued._shortcmd(sasl_plain(USER, PASSWORD, authzid=USER)) == b"+OK Logged in."
    continued.quit()

    login_mech = poplib.POP3(HOST, proxy.pop3_port, timeout=15)
    assert login_mech._shortcmd("AUTH LOGIN") == b"+ " + b64("Username:").encode()
    assert login_mech._shortcmd(b64(USER)) == b"+ " + b64("Password:").encode()
    assert login_mech._shortcmd(b64(PASSWORD)) == b"+OK Logged in."
    login_mech.quit()
    log = proxy.wait_for_log('"mechanism": "AUTH LOGIN"')
    assert '"mechanism": "AUTH PLAIN"' in log


def test_sasl_errors(proxy: Proxy) -> None:
    wire = Wire(proxy.pop3_port)
    assert wire.ask(b"AUTH PLAIN") == b"+ \r\n"
    assert wire.ask(b"*") == b"-ERR Authentication cancelled.\r\n"
    assert wire.ask(b"AUTH PLAIN !!notbase64!!") \
        == b"-ERR Invalid base64 data in SASL response.\r\n"
    assert wire.ask(b"AUTH PLAIN " + b64("no nuls").encode()) \
        == b"-ERR Invalid PLAIN response.\r\n"
    assert wire.ask(b"AUTH CRAM-MD5").startswith(b"-ERR Unsupported authentication mechanism.")
    # Acting as somebody else is a failed login, even with the right password.
    other = sasl_plain(USER, PASSWORD, authzid="bob@new.example").encode()
    assert wire.ask(b"AUTH PLAIN " + other) == b"-ERR [AUTH] Authentication failed.\r\n"
    assert wire.ask(b"PASS x") == b"-ERR No user name given (USER first).\r\n"
    wire.close()


# -- failed logins ----------------------------------------------------------------------------
def test_wrong_password_and_unknown_user(proxy: Proxy) -> None:
    assert failed_login(proxy.pop3_port, USER, "wrong") == b"-ERR [AUTH] Authentication failed."
    assert failed_login(proxy.pop3_port, "nobody@new.example", PASSWORD) \
        == b"-ERR [AUTH] Authentication failed."
    log = proxy.wait_for_log('"reason": "unknown user"')
    assert '"reason": "wrong password"' in log
    assert '"outcome": "failed"' in log


def test_third_failure_closes_the_connection(proxy: Proxy) -> None:
    wire = Wire(proxy.pop3_port)
    for _ in range(2):
        assert wire.ask(f"USER {USER}".encode()) == b"+OK\r\n"
        assert wire.ask(b"PASS wrong") == b"-ERR [AUTH] Authentication failed.\r\n"
    wire.ask(f"USER {USER}".encode())
    # Exactly one reply, the refusal; no second unsolicited -ERR before the close.
    assert wire.ask(b"PASS wrong") == b"-ERR [AUTH] Authentication failed.\r\n"
    assert wire.rest() == []


@pytest.mark.parametrize("username", [
    b'carol"@new.example',  # quote
    b"carol\\@new.example",  # backslash
    b"carol\0@new.example",  # NUL
    b"car\xf6l@new.example",  # 8-bit, not UTF-8
    b"car\xc3\xb6l@new.example",  # 8-bit, valid UTF-8
])
def test_hostile_usernames_are_refused_before_the_store(
        proxy: Proxy, store: DovecotInstance, username: bytes) -> None:
    wire = Wire(proxy.pop3_port)
    assert wire.ask(b"USER " + username) == b"+OK\r\n"
    assert wire.ask(b"PASS " + PASSWORD.encode()) == b"-ERR [AUTH] Authentication failed.\r\n"
    assert wire.ask(b"CAPA").startswith(b"+OK")  # still before login: nothing was relayed
    wire.close()
    log = proxy.wait_for_log('"reason": "invalid username')
    assert "store refused" not in log and "store unavailable" not in log
    # The store never saw a login for anybody but the real user.
    assert not [p.name for p in store.root.glob("mail/*/*") if p.name != "carol"]


def test_client_disconnecting_mid_login(proxy: Proxy) -> None:
    for _ in range(3):
        wire = Wire(proxy.pop3_port)
        wire.sock.sendall(f"USER {USER}\r\nPASS {PASSWORD}\r\n".encode())
        wire.close()
    proxy.wait_for_log("client gone")
    client = login(proxy.pop3_port)  # the proxy goes on serving everybody else
    assert client.stat()[0] == 3
    client.quit()


# -- hostile input ------------------------------------------------------------------------------
def test_stls_drops_pipelined_commands(proxy: Proxy, tls_files: TLSFiles) -> None:
    sock = socket.create_connection((HOST, proxy.pop3_port), timeout=15)
    assert read_line(sock).startswith(b"+OK")
    sock.sendall(f"STLS\r\nUSER {USER}\r\n".encode())  # one packet: USER is an injection
    assert read_line(sock) == b"+OK Begin TLS negotiation\r\n"
    wrapped = client_context(tls_files).wrap_socket(sock, server_hostname="localhost")
    file = wrapped.makefile("rb")
    wrapped.sendall(f"PASS {PASSWORD}\r\n".encode())
    # Had USER run, this PASS would log in. The next line is the answer to PASS alone.
    assert file.readline() == b"-ERR No user name given (USER first).\r\n"
    wrapped.sendall(b"QUIT\r\n")
    assert file.readline() == b"+OK Logging out\r\n"
    wrapped.close()


def read_line(sock: socket.socket) -> bytes:
    """One line without reading ahead: the TLS handshake must get the bytes that follow."""
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(1)
        assert chunk, "connection closed"
        line += chunk
    return line


def test_line_over_the_limit_closes(proxy: Proxy) -> None:
    wire = Wire(proxy.pop3_port)
    assert wire.ask(b"USER " + b"x" * 9000) == b"-ERR Line too long.\r\n"
    assert wire.rest() == []
    endless = Wire(proxy.pop3_port)
    endless.sock.sendall(b"y" * 9000)  # no line end at all
    assert endless.rest() == [b"-ERR Line too long.\r\n"]


def test_garbage_gets_errors_then_disconnect(proxy: Proxy) -> None:
    noise = random.Random(1939)
    lines = [bytes(noise.choice(range(256)) for _ in range(40)).replace(b"\n", b"")
             for _ in range(15)]
    wire = Wire(proxy.pop3_port)
    wire.sock.sendall(b"\r\n".join(lines) + b"\r\n")
    replies = wire.rest()
    assert replies == [b"-ERR Unknown command or not allowed before login.\r\n"] * 9 \
        + [b"-ERR Too many invalid commands.\r\n"]


# -- other configurations ---------------------------------------------------------------------
def test_throttling_refuses_even_the_right_password(tmp_path: Path,
                                                    store: DovecotInstance) -> None:
    with make_proxy(tmp_path, store, max_failures_per_peer=3) as proxy:
        for _ in range(3):
            assert failed_login(proxy.pop3_port, USER, "guess") \
                == b"-ERR [AUTH] Authentication failed."
        assert failed_login(proxy.pop3_port, USER, PASSWORD) \
            == b"-ERR [SYS/TEMP] Too many failed logins, try again later."
        assert '"outcome": "throttled"' in proxy.wait_for_log("too many recent failures")


def test_tls_required(tmp_path: Path, store: DovecotInstance, tls_files: TLSFiles) -> None:
    with make_proxy(tmp_path, store, tls_files, require_tls=True) as proxy:
        wire = Wire(proxy.pop3_port)
        capabilities = wire.multiline(b"CAPA")
        assert b"STLS" in capabilities
        assert b"USER" not in capabilities and not any(c.startswith(b"SASL") for c in capabilities)
        refusal = b"-ERR [AUTH] Plaintext authentication disallowed on non-secure connections.\r\n"
        assert wire.ask(f"USER {USER}".encode()) == refusal
        assert wire.ask(f"AUTH PLAIN {sasl_plain(USER, PASSWORD)}".encode()) == refusal
        assert wire.ask(b"PASS x") == refusal
        wire.close()

        client = poplib.POP3(HOST, proxy.pop3_port, timeout=15)
        client.stls(client_context(tls_files))
        capa = client.capa()
        assert "USER" in capa and capa["SASL"] == ["PLAIN", "LOGIN"]
        client.user(USER)
        client.pass_(PASSWORD)
        assert client.stat()[0] == 3
        client.quit()
        # curl too: it must see the SASL mechanisms only after STLS.
        fetched = curl("--ssl-reqd", "--cacert", str(tls_files.ca_cert),
                       "-u", f"{USER}:{PASSWORD}", f"pop3://{HOST}:{proxy.pop3_port}/2")
        assert fetched.stdout == MESSAGES[1], fetched.stderr
        assert proxy.log_text().count('"event": "login"') == 2  # the refused never got that far


def test_idle_client_is_disconnected(tmp_path: Path, store: DovecotInstance) -> None:
    with make_proxy(tmp_path, store, idle_timeout=1.0) as proxy:
        wire = Wire(proxy.pop3_port)
        assert wire.rest() == [b"-ERR Disconnected for inactivity.\r\n"]


def test_store_down_gives_sys_temp_and_closes(tmp_path: Path,
                                              new_store: DovecotInstance) -> None:
    with make_proxy(tmp_path, new_store) as proxy:
        new_store.stop()
        wire = Wire(proxy.pop3_port)
        assert wire.ask(f"USER {USER}".encode()) == b"+OK\r\n"
        assert wire.ask(f"PASS {PASSWORD}".encode()) \
            == b"-ERR [SYS/TEMP] Service temporarily unavailable.\r\n"
        assert wire.rest() == []  # closed, without a second reply
        assert '"outcome": "unavailable"' in proxy.wait_for_log("store unavailable")
