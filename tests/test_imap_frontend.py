"""The IMAP front-end against a real Dovecot store, driven by real clients.

Happy paths compare a session through the proxy with the same session against the store
directly; bad inputs check the exact answer and that nothing else happened.
"""

from __future__ import annotations

import imaplib
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from imapclient import IMAPClient

from tests.support.dovecot import DovecotInstance, free_port
from tests.support.mail import sasl_plain
from tests.support.proxy import Proxy
from tests.support.tls import TLSFiles, client_context

USER, PASSWORD = "carol@new.example", "carol secret \"quoted\" pw"
MESSAGE = b"From: a@b.example\r\nTo: carol@new.example\r\nSubject: hello\r\n\r\nbody line\r\n"


# Tests that neither stop the store nor need their own settings share one proxy. Throttling is
# off there (0 = no limit) because every test connects from 127.0.0.1; it has its own tests.
SHARED_LIMITS = {"max_failures_per_peer": 0, "max_failures_per_account": 0}


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, module_store: DovecotInstance,
          tls_files: TLSFiles) -> Iterator[Proxy]:
    proxy = Proxy(tmp_path_factory.mktemp("imap") / "proxy", module_store, tls=tls_files,
                  overrides={"limits": SHARED_LIMITS})
    proxy.add_account(USER, PASSWORD)
    with proxy:
        yield proxy



class Raw:
    """A line-level IMAP client for the cases real clients refuse to produce."""

    def __init__(self, port: int, sock: socket.socket | None = None) -> None:
        self.sock = sock or socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")
        self.greeting = self.line()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        return self.file.readline()

    def until_tagged(self, tag: bytes) -> list[bytes]:
        lines = []
        while True:
            line = self.line()
            if not line:
                raise AssertionError(f"connection closed before {tag!r}; got {lines}")
            lines.append(line)
            if line.startswith(tag + b" "):
                return lines

    def closed(self, timeout: float = 10) -> bool:
        """True when the server closes the connection (after any remaining output)."""
        self.sock.settimeout(timeout)
        try:
            while self.file.readline():
                pass
        except (TimeoutError, ConnectionResetError):
            return False
        return True

    def close(self) -> None:
        self.sock.close()


def session_transcript(client: IMAPClient) -> dict[str, object]:
    """A full client session; the result must not depend on whether a proxy is in between."""
    client.select_folder("INBOX")
    uid = client.append("INBOX", MESSAGE, flags=[b"$Forwarded"])
    client.select_folder("INBOX")
    uids = client.search("ALL")
    fetched = client.fetch(uids, ["BODY.PEEK[]", "FLAGS", "RFC822.SIZE"])
    client.add_flags(uids, [b"\\Seen"])
    flags = client.get_flags(uids)
    client.idle()
    client.idle_check(timeout=0.2)
    client.idle_done()
    client.delete_messages(uids)
    client.expunge()
    remaining = client.search("ALL")
    client.logout()
    return {
        "appended": uid is not None,
        "bodies": sorted(data[b"BODY[]"] for data in fetched.values()),
        "flags": sorted(sorted(f) for f in flags.values()),
        "remaining": remaining,
    }


def test_full_session_is_the_same_through_the_proxy(proxy: Proxy,
                                                   module_store: DovecotInstance) -> None:
    through = IMAPClient("127.0.0.1", proxy.imap_port, ssl=False)
    through.login(USER, PASSWORD)
    via_proxy = session_transcript(through)

    direct = IMAPClient("127.0.0.1", module_store.imap_port, ssl=False)
    direct.login(USER, PASSWORD)
    via_store = session_transcript(direct)

    assert via_proxy == via_store
    assert via_proxy["bodies"] == [MESSAGE]
    assert via_proxy["remaining"] == []


def test_login_answer_carries_the_stores_capabilities(proxy: Proxy) -> None:
    raw = Raw(proxy.imap_port)
    assert b"AUTH=PLAIN" in raw.greeting and b"STARTTLS" in raw.greeting
    raw.send(b'a LOGIN {17}\r\n')
    assert raw.line().startswith(b"+ ")
    raw.send(USER.encode() + b" {" + str(len(PASSWORD)).encode() + b"+}\r\n"
             + PASSWORD.encode() + b"\r\n")
    reply = raw.until_tagged(b"a")[-1]
    assert reply.startswith(b"a OK [CAPABILITY IMAP4rev1")
    assert b"UIDPLUS" in reply  # a post-login capability only the store has
    raw.close()


def test_authenticate_plain_with_and_without_sasl_ir(proxy: Proxy) -> None:
    client = IMAPClient("127.0.0.1", proxy.imap_port, ssl=False)
    client.plain_login(USER, PASSWORD)  # imapclient uses SASL-IR when offered
    assert client.select_folder("INBOX")[b"EXISTS"] == 0
    client.logout()

    old_style = imaplib.IMAP4("127.0.0.1", proxy.imap_port)
    old_style.authenticate("PLAIN", lambda _: f"\0{USER}\0{PASSWORD}".encode())
    assert old_style.select("INBOX")[0] == "OK"
    old_style.logout()


def test_authenticate_login_mechanism(proxy: Proxy) -> None:
    answers = iter([USER.encode(), PASSWORD.encode()])
    client = imaplib.IMAP4("127.0.0.1", proxy.imap_port)
    typ, _ = client.authenticate("LOGIN", lambda _: next(answers))
    assert typ == "OK"
    client.logout()


def test_starttls_and_implicit_tls(proxy: Proxy, tls_files: TLSFiles) -> None:
    client = IMAPClient("127.0.0.1", proxy.imap_port, ssl=False)
    client.starttls(client_context(tls_files))
    assert b"STARTTLS" not in client.capabilities()
    client.login(USER, PASSWORD)
    client.select_folder("INBOX")
    client.logout()

    implicit = IMAPClient("127.0.0.1", proxy.ports["imaps"], ssl=True,
                          ssl_context=client_context(tls_files))
    implicit.login(USER, PASSWORD)
    assert implicit.append("INBOX", MESSAGE)
    implicit.logout()


def test_curl_reads_mail_through_the_proxy(proxy: Proxy, module_store: DovecotInstance) -> None:
    store = IMAPClient("127.0.0.1", module_store.imap_port, ssl=False)
    store.login(USER, PASSWORD)
    store.create_folder("curl")
    store.append("curl", MESSAGE)
    store.logout()
    result = subprocess.run(
        ["curl", "-sS", "--max-time", "20", "-u", f"{USER}:{PASSWORD}",
         f"imap://127.0.0.1:{proxy.imap_port}/curl;UID=1"],
        capture_output=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == MESSAGE


def test_pipelined_commands_after_login_reach_the_store(proxy: Proxy) -> None:
    raw = Raw(proxy.imap_port)
    raw.send(f'a LOGIN {USER} "{PASSWORD.replace(chr(34), chr(92) + chr(34))}"\r\n'
             'b SELECT INBOX\r\nc LOGOUT\r\n'.encode())
    lines = raw.until_tagged(b"c")
    tagged = [line.split(b" ")[:2] for line in lines if line[:2] in (b"a ", b"b ", b"c ")]
    assert tagged == [[b"a", b"OK"], [b"b", b"OK"], [b"c", b"OK"]]


# -- bad input ------------------------------------------------------------------------------
def test_wrong_password_and_unknown_user(proxy: Proxy) -> None:
    for user, password in ((USER, "wrong"), ("nobody@new.example", PASSWORD)):
        client = imaplib.IMAP4("127.0.0.1", proxy.imap_port)
        started = time.monotonic()
        with pytest.raises(imaplib.IMAP4.error, match=r"\[AUTHENTICATIONFAILED\]"):
            client.login(user, password)
        assert time.monotonic() - started >= 0.2  # the configured fixed delay was applied
        client.shutdown()
    log = proxy.wait_for_log('"reason": "unknown user"')
    assert '"reason": "wrong password"' in log


def test_throttling_after_repeated_failures(tmp_path: Path, module_store: DovecotInstance) -> None:
    limits = {"max_failures_per_peer": 3, "max_failures_per_connection": 10,
              "auth_failure_delay": 0.0}
    with Proxy(tmp_path / "p", module_store, overrides={"limits": limits}) as proxy:
        proxy.add_account(USER, PASSWORD)
        raw = Raw(proxy.imap_port)
        for n in range(3):
            raw.send(f"f{n} LOGIN {USER} wrong\r\n".encode())
            assert b"[AUTHENTICATIONFAILED]" in raw.until_tagged(f"f{n}".encode())[-1]
        # Now even the right password is refused without being checked.
        raw.send(f'ok LOGIN {USER} "{PASSWORD.replace(chr(34), chr(92) + chr(34))}"\r\n'
                 .encode())
        assert raw.until_tagged(b"ok")[-1].startswith(b"ok NO [UNAVAILABLE] Too many")


def test_store_down_gives_unavailable_and_closes(tmp_path: Path,
                                                 new_store: DovecotInstance) -> None:
    proxy = Proxy(tmp_path / "p", new_store)
    proxy.add_account(USER, PASSWORD)
    proxy.start()
    new_store.stop()
    raw = Raw(proxy.imap_port)
    raw.send(f'a AUTHENTICATE PLAIN {sasl_plain(USER, PASSWORD)}\r\n'.encode())
    assert raw.until_tagged(b"a")[-1].startswith(b"a NO [UNAVAILABLE]")
    assert raw.closed()
    proxy.wait_for_log("store unavailable")
    proxy.stop()


def test_slow_store_gives_unavailable_within_the_timeout(tmp_path: Path,
                                                         module_store: DovecotInstance) -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts connections (kernel backlog) and never says a word
    port = silent.getsockname()[1]
    overrides = {"backend": {"imap": f"imap://127.0.0.1:{port}", "timeout": 1.0}}
    with Proxy(tmp_path / "p", module_store, overrides=overrides) as proxy:
        proxy.add_account(USER, PASSWORD)
        raw = Raw(proxy.imap_port)
        started = time.monotonic()
        raw.send(f'a AUTHENTICATE PLAIN {sasl_plain(USER, PASSWORD)}\r\n'.encode())
        assert raw.until_tagged(b"a")[-1].startswith(b"a NO [UNAVAILABLE]")
        assert time.monotonic() - started < 10  # bounded, not hanging forever
        assert raw.closed()
    silent.close()


def test_commands_pipelined_with_starttls_are_discarded(proxy: Proxy,
                                                        tls_files: TLSFiles) -> None:
    raw = Raw(proxy.imap_port)
    raw.send(f"s STARTTLS\r\ninjected LOGIN {USER} x\r\n".encode())
    assert raw.line().startswith(b"s OK")
    wrapped = client_context(tls_files).wrap_socket(raw.sock, server_hostname="localhost")
    file = wrapped.makefile("rb")
    wrapped.sendall(b"n NOOP\r\n")
    # The very next line must be NOOP's answer: "injected" was never executed.
    assert file.readline().startswith(b"n OK")
    wrapped.close()


def test_tls_required_refuses_plaintext_login(tmp_path: Path, module_store: DovecotInstance,
                                              tls_files: TLSFiles) -> None:
    with Proxy(tmp_path / "p", module_store, tls=tls_files,
               overrides={"tls": {"require": True}}) as proxy:
        proxy.add_account(USER, PASSWORD)
        raw = Raw(proxy.imap_port)
        assert b"LOGINDISABLED" in raw.greeting and b"AUTH=PLAIN" not in raw.greeting
        raw.send(f"a LOGIN {USER} pw\r\nb AUTHENTICATE PLAIN {sasl_plain(USER, 'pw')}\r\n".encode())
        assert raw.until_tagged(b"a")[-1].startswith(b"a NO [PRIVACYREQUIRED]")
        assert raw.until_tagged(b"b")[-1].startswith(b"b NO [PRIVACYREQUIRED]")
        client = IMAPClient("127.0.0.1", proxy.imap_port, ssl=False)
        client.starttls(client_context(tls_files))
        client.login(USER, PASSWORD)
        client.logout()
        assert '"outcome": "ok"' in proxy.log_text()
        assert proxy.log_text().count('"event": "login"') == 1  # the refused ones never got far


def test_line_over_the_limit_closes(proxy: Proxy) -> None:
    raw = Raw(proxy.imap_port)
    raw.send(b"a LOGIN " + b"x" * 10000 + b" pw\r\n")
    assert raw.line().startswith(b"* BYE Line too long")
    assert raw.closed()


@pytest.mark.parametrize("marker", [b"{100000}", b"{99999999999999999999}",
                                    b"{" + b"9" * 5000 + b"}"])  # past Python's 4300 digits
def test_synchronising_literal_over_the_limit_is_refused(proxy: Proxy, marker: bytes) -> None:
    raw = Raw(proxy.imap_port)
    raw.send(b"a LOGIN " + marker + b"\r\n")
    assert raw.line() == b"a BAD Literal too large.\r\n"
    raw.send(b"b NOOP\r\n")  # the session goes on: the client never sent the literal
    assert raw.line().startswith(b"b OK")


@pytest.mark.parametrize("marker", [b"{100000+}", b"{" + b"8" * 4400 + b"+}"])
def test_non_synchronising_literal_over_the_limit_closes(proxy: Proxy, marker: bytes) -> None:
    raw = Raw(proxy.imap_port)
    raw.send(b"a LOGIN " + marker + b"\r\n" + b"y" * 100)
    assert raw.line() == b"a BAD Literal too large.\r\n"
    assert raw.line() == b"* BYE Literal too large.\r\n"
    assert raw.closed()


@pytest.mark.parametrize("line", [b"a LOGIN {-1}", b"a LOGIN {1x}", b"a LOGIN {+}"])
def test_malformed_literal_sizes_are_errors(proxy: Proxy, line: bytes) -> None:
    raw = Raw(proxy.imap_port)
    raw.send(line + b"\r\n")
    assert raw.line().startswith(b"a BAD")
    raw.send(b"b CAPABILITY\r\n")
    assert raw.until_tagged(b"b")[-1].startswith(b"b OK")


def test_garbage_gets_errors_then_disconnect(tmp_path: Path, new_store: DovecotInstance) -> None:
    with Proxy(tmp_path / "p", new_store) as proxy:
        check_garbage(proxy)


def check_garbage(proxy: Proxy) -> None:
    raw = Raw(proxy.imap_port)
    raw.send(bytes(range(256)) * 3 + b"\r\n" + b"\xff\xfe garbage\r\n" * 12)
    lines = []
    while line := raw.line():
        lines.append(line)
    assert lines[-1].startswith(b"* BYE Too many invalid commands")
    assert all(b" BAD " in line or line.startswith(b"* BYE") for line in lines)
    assert "login" not in proxy.log_text().replace('"event": "listening"', "")


def test_a_client_that_never_logs_in_is_closed_however_busy(
        tmp_path: Path, new_store: DovecotInstance) -> None:
    """limits.login_timeout: the idle timeout alone restarts with every byte, so a client that
    keeps talking could stay before login forever (slowloris)."""
    limits = {"idle_timeout": 5.0, "login_timeout": 1.0}
    with Proxy(tmp_path / "p", new_store, overrides={"limits": limits}) as proxy:
        raw = Raw(proxy.imap_port)
        lines: list[bytes] = []
        for n in range(40):  # at most 8 s of a busy client
            try:
                raw.send(f"n{n} NOOP\r\n".encode())
            except OSError:
                break
            time.sleep(0.2)
        raw.sock.settimeout(10)
        while line := raw.line():
            lines.append(line)
        assert lines[-1] == b"* BYE Login timed out.\r\n", lines[-3:]
        assert len(lines) < 39  # closed long before the client stopped


def test_silent_client_is_disconnected(tmp_path: Path, new_store: DovecotInstance) -> None:
    # Its own store: a proxy provisions the store's user file from its own database at start.
    with Proxy(tmp_path / "p", new_store, overrides={"limits": {"idle_timeout": 1.0}}) as proxy:
        raw = Raw(proxy.imap_port)
        assert raw.line().startswith(b"* BYE Disconnected for inactivity")
        assert raw.closed()


@pytest.mark.parametrize("username", [
    b'"carol\\"@new.example"',  # quote inside a quoted string
    b'"carol\\\\@new.example"',  # backslash
    b"{22}\r\ncarol@new.example\r\nX",  # CR/LF inside a literal
    b"{18}\r\ncarol\0@new.example",  # NUL inside a literal
    b"{19}\r\ncar\xc3\xb6l@new.example",  # 8-bit (UTF-8) user name
])
def test_hostile_usernames_are_refused_without_injection(
        proxy: Proxy, module_store: DovecotInstance, username: bytes) -> None:
    raw = Raw(proxy.imap_port)
    if b"\r\n" in username:  # a literal: wait for the continuation, then send its bytes
        marker, rest = username.split(b"\r\n", 1)
        raw.send(b"a LOGIN " + marker + b"\r\n")
        assert raw.line().startswith(b"+ ")
        raw.send(rest + b" pw\r\n")
    else:
        raw.send(b"a LOGIN " + username + b" pw\r\n")
    assert raw.until_tagged(b"a")[-1].startswith(b"a NO [AUTHENTICATIONFAILED]")
    raw.send(b"b NOOP\r\n")
    assert raw.until_tagged(b"b")[-1].startswith(b"b OK")  # still pre-login, nothing injected
    assert "unavailable" not in proxy.log_text()  # the store was never asked
    assert not [p for p in module_store.root.glob("mail/*/*") if "carol" not in p.name]


def test_sasl_errors(proxy: Proxy) -> None:
    raw = Raw(proxy.imap_port)
    raw.send(b"a AUTHENTICATE PLAIN\r\n")
    assert raw.line() == b"+ \r\n"
    raw.send(b"*\r\n")
    assert raw.line().startswith(b"a BAD Authentication canceled")
    raw.send(b"b AUTHENTICATE PLAIN !!notbase64!!\r\n")
    assert raw.line().startswith(b"b BAD Invalid base64")
    raw.send(b"c AUTHENTICATE CRAM-MD5\r\n")
    assert raw.line().startswith(b"c NO Unsupported")
    raw.send(f"d AUTHENTICATE PLAIN {sasl_plain(USER, PASSWORD, authzid='bob@new.example')}\r\n"
             .encode())
    assert raw.line().startswith(b"d NO [AUTHENTICATIONFAILED]")


def test_client_disconnecting_mid_login(proxy: Proxy) -> None:
    for _ in range(5):
        raw = Raw(proxy.imap_port)
        raw.send(f"a AUTHENTICATE PLAIN {sasl_plain(USER, PASSWORD)}\r\n".encode())
        raw.close()
    proxy.wait_for_log("client gone")
    # The proxy still serves everyone else.
    client = IMAPClient("127.0.0.1", proxy.imap_port, ssl=False)
    client.login(USER, PASSWORD)
    client.logout()


def test_many_parallel_logins(proxy: Proxy) -> None:
    errors: list[BaseException] = []

    def one() -> None:
        try:
            client = IMAPClient("127.0.0.1", proxy.imap_port, ssl=False, timeout=20)
            client.login(USER, PASSWORD)
            client.select_folder("INBOX")
            client.logout()
        except BaseException as exc:  # collected and re-raised in the test thread
            errors.append(exc)

    # Dovecot allows 10 sessions per user and IP (mail_max_userip_connections).
    threads = [threading.Thread(target=one) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_unreachable_port_is_not_a_crash(tmp_path: Path, module_store: DovecotInstance) -> None:
    overrides = {"backend": {"imap": f"imap://127.0.0.1:{free_port()}"}}
    with Proxy(tmp_path / "p", module_store, overrides=overrides) as proxy:
        proxy.add_account(USER, PASSWORD)
        client = imaplib.IMAP4("127.0.0.1", proxy.imap_port)
        with pytest.raises(imaplib.IMAP4.error, match=r"\[UNAVAILABLE\]"):
            client.login(USER, PASSWORD)

