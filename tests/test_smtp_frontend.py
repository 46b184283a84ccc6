"""The inbound SMTP front-end with real next hops: Dovecot's LMTP (the new store) and an aiosmtpd
server (the old server's SMTP), driven by smtplib, aiosmtplib, swaks and raw sockets.

Every delivered copy is checked byte for byte against what the client sent, apart from the one
Received header the proxy adds; every refusal checks that nothing reached any next hop.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import secrets
import shutil
import smtplib
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib
import pytest
from imapclient import IMAPClient

from tests.support.dovecot import DovecotInstance, free_port
from tests.support.mail import sample_corpus, sasl_plain, seed_mailbox
from tests.support.proxy import Proxy
from tests.support.smtp import OldSMTP, SinkSMTP
from tests.support.tls import TLSFiles, client_context

PASSWORD = "local-pw"
CAROL, FRANK = "carol@new.example", "frank@new.example"  # accounts on the new store
DAVE, ERIN, GONE = "dave@new.example", "erin@new.example", "gone@new.example"  # not moved yet
MAX_SIZE = 20000
HOSTNAME = "mx.test"
SENDER = "sender@elsewhere.example"
OUR_TRACE = re.compile(
    rb"Received: from [^\r\n]+\r\n"
    rb"\tby mx\.test \(migrating-proxy\) with [^\r\n]+\r\n(?:\t[^\r\n]+\r\n)*"
)


@pytest.fixture(scope="module")
def old_smtp() -> Iterator[OldSMTP]:
    with OldSMTP(refuse={GONE: "550 5.1.1 no such user at the old server"}) as server:
        yield server


@pytest.fixture(scope="module")
def smtp_proxy(tmp_path_factory: pytest.TempPathFactory, module_store: DovecotInstance,
               old_smtp: OldSMTP, tls_files: TLSFiles) -> Iterator[Proxy]:
    port = free_port()
    proxy = Proxy(tmp_path_factory.mktemp("smtp") / "proxy", module_store, tls=tls_files,
                  overrides={
                      "listen": {"smtp": f"127.0.0.1:{port}"},
                      "backend": {"delivery": f"lmtp://127.0.0.1:{module_store.lmtp_port}"},
                      "smtp": {"hostname": HOSTNAME, "max_message_size": MAX_SIZE,
                               "data_timeout": 2.0, "timeout": 5.0},
                  })
    proxy.ports["smtp"] = port
    proxy.cli("domain", "add", "new.example", "--source", "imap://127.0.0.1:1",
              "--relay", old_smtp.url)
    proxy.cli("domain", "add", "closed.example", "--source", "imap://127.0.0.1:1",
              "--relay", old_smtp.url, "--disabled")
    proxy.cli("domain", "add", "norelay.example", "--source", "imap://127.0.0.1:1")
    for address in (CAROL, FRANK):
        proxy.add_account(address, PASSWORD)
    with proxy:
        yield proxy


@pytest.fixture
def port(smtp_proxy: Proxy) -> int:
    return smtp_proxy.ports["smtp"]


def message(token: str, body: bytes = b"body line\r\n") -> bytes:
    return (f"From: {SENDER}\r\nTo: someone\r\nSubject: test {token}\r\n"
            f"Message-ID: <{token}@test>\r\n\r\n").encode() + body


def token() -> str:
    return secrets.token_hex(6)


def in_store(store: DovecotInstance, address: str, needle: str) -> list[bytes]:
    """Every INBOX message of address (fetched from the store itself) that contains needle."""
    with IMAPClient("127.0.0.1", store.imap_port, ssl=False) as client:
        client.login(address, PASSWORD)
        client.select_folder("INBOX", readonly=True)
        fetched = client.fetch(client.search(), ["BODY.PEEK[]"])
    return [data[b"BODY[]"] for data in fetched.values() if needle.encode() in data[b"BODY[]"]]


def after_our_trace(data: bytes) -> bytes:
    """What follows the proxy's Received header; exactly one such header must be present."""
    assert len(OUR_TRACE.findall(data)) == 1, data[:600]
    match = OUR_TRACE.search(data)
    assert match is not None
    return data[match.end():]


class RawSMTP:
    """A line-level client for what real clients refuse to send."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")
        assert self.reply().startswith(b"220 ")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> bytes:
        """One whole reply (multi-line ones joined); b"" once the server closed."""
        lines = []
        while True:
            line = self.file.readline()
            lines.append(line)
            if len(line) < 4 or line[3:4] != b"-":
                return b"".join(lines)

    def command(self, line: bytes) -> bytes:
        self.send(line + b"\r\n")
        return self.reply()

    def transaction(self, recipient: str, data: bytes) -> bytes:
        """MAIL, RCPT (accepted), DATA, then data as is (ending the data); the DATA reply."""
        assert self.command(f"MAIL FROM:<{SENDER}>".encode()).startswith(b"250")
        assert self.command(f"RCPT TO:<{recipient}>".encode()).startswith(b"250")
        assert self.command(b"DATA").startswith(b"354")
        self.send(data)
        return self.reply()

    def closed(self) -> bool:
        try:
            return self.file.read() == b""
        except (TimeoutError, ConnectionResetError):
            return False

    def close(self) -> None:
        self.sock.close()


# -- routing ---------------------------------------------------------------------------------
def test_local_account_is_delivered_to_the_store_byte_for_byte(
        port: int, module_store: DovecotInstance) -> None:
    tag = token()
    sent = message(tag, b"first\r\n.starts with a dot\r\n..two dots\r\n\xc3\xa9 8bit\r\n")
    with smtplib.SMTP("127.0.0.1", port) as client:
        assert client.ehlo()[0] == 250
        assert client.sendmail(SENDER, [CAROL], sent, mail_options=["BODY=8BITMIME"]) == {}
    [stored] = in_store(module_store, CAROL, tag)
    assert after_our_trace(stored) == sent


def test_user_not_moved_yet_is_relayed_to_the_old_server(port: int, old_smtp: OldSMTP) -> None:
    tag = token()
    sent = message(tag)

    async def send() -> None:
        await aiosmtplib.send(sent, sender=SENDER, recipients=[DAVE], hostname="127.0.0.1",
                              port=port, start_tls=False)

    asyncio.run(send())
    [got] = [m for m in old_smtp.for_recipient(DAVE) if tag.encode() in m.content]
    assert got.sender == SENDER and got.recipients == [DAVE]
    assert got.content.startswith(b"Received: from ")
    assert after_our_trace(got.content) == sent


@pytest.mark.parametrize(("recipient", "reply"), [
    ("nobody@closed.example", b"550 5.1.1"),  # domain no longer migrating, no account
    ("victim@elsewhere.example", b"550 5.7.1"),  # not our domain: never an open relay
    ("x@norelay.example", b"451 4.3.0"),  # migrating, but no --relay to hand it to
    ("not-an-address", b"553 5.1.3"),
    # Source routing through the old server, which may trust the proxy's address.
    ("victim%elsewhere.example@new.example", b"550 5.7.1"),
    ("elsewhere.example!victim@new.example", b"550 5.7.1"),
    ('"victim@elsewhere.example"@new.example', b"553 5.1.3"),
    ("@new.example:victim@elsewhere.example", b"553 5.1.3"),
])
def test_recipients_nobody_can_take_are_refused_at_rcpt(
        port: int, old_smtp: OldSMTP, recipient: str, reply: bytes) -> None:
    before = len(old_smtp.messages)
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.ehlo("client.test")
        assert client.mail(SENDER)[0] == 250
        code, text = client.rcpt(recipient)
        assert f"{code} ".encode() + text.split(b" ")[0] == reply
        assert client.docmd("DATA")[0] == 554  # no valid recipient, no data phase
    assert len(old_smtp.messages) == before


def test_mixed_recipients_arrive_exactly_once_each(
        port: int, old_smtp: OldSMTP, module_store: DovecotInstance) -> None:
    """One next hop per transaction: the others get 452 and come in a later transaction."""
    tag = token()
    sent = message(tag)
    with smtplib.SMTP("127.0.0.1", port) as client:
        refused = client.sendmail(SENDER, [DAVE, CAROL, ERIN, FRANK], sent)
        assert set(refused) == {CAROL, FRANK}
        assert all(code == 452 and text.startswith(b"4.5.3") for code, text in refused.values())
        # The sender retries the deferred ones; LMTP takes one recipient per transaction.
        refused = client.sendmail(SENDER, [CAROL, FRANK], sent)
        assert set(refused) == {FRANK}
        assert client.sendmail(SENDER, [FRANK], sent) == {}
    [relayed] = [m for m in old_smtp.messages if tag.encode() in m.content]
    assert relayed.recipients == [DAVE, ERIN]
    assert after_our_trace(relayed.content) == sent
    for local in (CAROL, FRANK):
        [stored] = in_store(module_store, local, tag)
        assert after_our_trace(stored) == sent


def test_next_hop_down_gives_4xx_then_delivers_once_when_back(
        port: int, old_smtp: OldSMTP) -> None:
    tag = token()
    sent = message(tag)
    old_smtp.stop()
    try:
        with smtplib.SMTP("127.0.0.1", port) as client, \
                pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            client.sendmail(SENDER, [DAVE], sent)
        code, text = refused.value.recipients[DAVE]
        assert code == 451 and text.startswith(b"4.4.1")
    finally:
        old_smtp.start()
    with smtplib.SMTP("127.0.0.1", port) as client:  # the sender's retry
        assert client.sendmail(SENDER, [DAVE], sent) == {}
    assert len([m for m in old_smtp.messages if tag.encode() in m.content]) == 1


def test_a_session_reuses_its_hop_connection_safely(port: int, old_smtp: OldSMTP) -> None:
    """The hop connection kept between transactions: reset after a refused message (no
    leftover recipient), and reconnected when the hop dropped it meanwhile."""
    first, second, third = token(), token(), token()
    raw, answer = send_raw_data(port, ERIN, message(first, b"bare\nLF\r\n") + b".\r\n")
    assert answer.startswith(b"554 5.6.0")  # refused here; the hop saw MAIL and RCPT only
    raw.command(f"MAIL FROM:<{SENDER}>".encode())
    raw.command(f"RCPT TO:<{DAVE}>".encode())
    raw.command(b"DATA")
    raw.send(message(second) + b".\r\n")
    assert raw.reply() == b"250 2.0.0 Ok: delivered\r\n"
    old_smtp.stop()  # drops the connection the session keeps
    old_smtp.start()
    assert raw.transaction(DAVE, message(third) + b".\r\n") == b"250 2.0.0 Ok: delivered\r\n"
    raw.close()
    assert not [m for m in old_smtp.messages if first.encode() in m.content]
    for tag in (second, third):
        [got] = [m for m in old_smtp.messages if tag.encode() in m.content]
        assert got.recipients == [DAVE]


def test_next_hop_failing_data_temporarily_is_passed_back_then_retried(
        port: int, old_smtp: OldSMTP) -> None:
    tag = token()
    old_smtp.data_reply = "451 4.3.0 disk full, try later"
    try:
        with smtplib.SMTP("127.0.0.1", port) as client, \
                pytest.raises(smtplib.SMTPDataError) as refused:
            client.sendmail(SENDER, [DAVE, ERIN], message(tag))
        assert (refused.value.smtp_code, refused.value.smtp_error) == (
            451, b"4.3.0 disk full, try later")
    finally:
        old_smtp.data_reply = ""
    with smtplib.SMTP("127.0.0.1", port) as client:
        assert client.sendmail(SENDER, [DAVE, ERIN], message(tag)) == {}
    [got] = [m for m in old_smtp.messages if tag.encode() in m.content]
    assert got.recipients == [DAVE, ERIN]


def test_next_hop_refusing_one_recipient_is_passed_back(port: int, old_smtp: OldSMTP) -> None:
    tag = token()
    with smtplib.SMTP("127.0.0.1", port) as client:
        refused = client.sendmail(SENDER, [GONE, DAVE], message(tag))
    assert refused == {GONE: (550, b"5.1.1 no such user at the old server")}
    [got] = [m for m in old_smtp.messages if tag.encode() in m.content]
    assert got.recipients == [DAVE]


def test_swaks_a_client_not_written_in_python(
        port: int, module_store: DovecotInstance) -> None:
    swaks = shutil.which("swaks")
    if swaks is None:
        pytest.skip("swaks is not installed (scripts/test installs it)")
    tag = token()
    result = subprocess.run(
        [swaks, "--server", f"127.0.0.1:{port}", "--from", SENDER, "--to", CAROL,
         "--helo", "swaks.test", "--pipeline", "--header", f"Subject: swaks {tag}",
         "--body", "from swaks"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "250 2.0.0 Ok: delivered" in result.stdout
    [stored] = in_store(module_store, CAROL, tag)
    assert b"by mx.test (migrating-proxy) with ESMTP" in stored


# -- the session -----------------------------------------------------------------------------
def test_ehlo_advertises_what_is_implemented(port: int) -> None:
    raw = RawSMTP(port)
    reply = raw.command(b"EHLO client.test")
    assert reply.split(b"\r\n")[:-1] == [
        b"250-mx.test", b"250-PIPELINING", f"250-SIZE {MAX_SIZE}".encode(), b"250-8BITMIME",
        b"250-ENHANCEDSTATUSCODES", b"250 STARTTLS",
    ]
    assert raw.command(b"VRFY carol").startswith(b"252 2.5.2")
    assert raw.command(b"NOOP") == b"250 2.0.0 Ok\r\n"
    assert raw.command(b"AUTH PLAIN").startswith(b"503 5.5.1")
    assert raw.command(b"MAIL FROM:<a@b.example> SMTPUTF8").startswith(b"555 5.5.4")
    assert raw.command(b"MAIL FROM:<a@b.example>") == b"250 2.1.0 Ok\r\n"
    assert raw.command(b"RSET") == b"250 2.0.0 Ok\r\n"
    assert raw.command(b"RCPT TO:<carol@new.example>").startswith(b"503 5.5.1")
    assert raw.command(b"QUIT").startswith(b"221 ")
    assert raw.closed()


def test_pipelined_transaction(port: int, old_smtp: OldSMTP) -> None:
    tag = token()
    raw = RawSMTP(port)
    raw.command(b"EHLO client.test")
    raw.send(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{DAVE}>\r\nRCPT TO:<nobody@elsewhere.example>"
             f"\r\nDATA\r\n".encode())
    assert [raw.reply()[:3] for _ in range(4)] == [b"250", b"250", b"550", b"354"]
    raw.send(message(tag) + b".\r\nNOOP\r\nQUIT\r\n")
    assert raw.reply() == b"250 2.0.0 Ok: delivered\r\n"
    assert raw.reply() == b"250 2.0.0 Ok\r\n"
    assert raw.reply().startswith(b"221 ")
    assert len([m for m in old_smtp.messages if tag.encode() in m.content]) == 1


# -- DATA: size, line ends, long lines, NUL, smuggling ----------------------------------------
def sized(tag: str, size: int) -> bytes:
    head = message(tag, b"")
    filler = size - len(head)
    lines, rest = divmod(filler, 100)
    body = (b"x" * 98 + b"\r\n") * lines + (b"y" * (rest - 2) + b"\r\n" if rest else b"")
    assert len(head + body) == size and rest != 1
    return head + body


def test_message_at_the_size_limit_passes_and_a_bigger_one_is_refused(
        port: int, old_smtp: OldSMTP) -> None:
    at, over, declared = token(), token(), token()
    with smtplib.SMTP("127.0.0.1", port) as client:  # smtplib declares SIZE= itself
        assert client.sendmail(SENDER, [DAVE], sized(at, MAX_SIZE)) == {}
        # Declared too big up front: refused at MAIL, before any data is sent.
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail(SENDER, [DAVE], sized(declared, MAX_SIZE + 2))
        assert (refused.value.smtp_code, refused.value.smtp_error[:5]) == (552, b"5.3.4")
    # Not declared: counted while it arrives, read to its end, refused there.
    raw, answer = send_raw_data(port, DAVE, sized(over, MAX_SIZE + 2) + b".\r\n")
    assert answer.startswith(b"552 5.3.4")
    assert raw.command(b"NOOP") == b"250 2.0.0 Ok\r\n"
    [got] = [m for m in old_smtp.messages if at.encode() in m.content]
    assert after_our_trace(got.content) == sized(at, MAX_SIZE)
    for tag in (over, declared):
        assert not [m for m in old_smtp.messages if tag.encode() in m.content]


def send_raw_data(port: int, recipient: str, data: bytes) -> tuple[RawSMTP, bytes]:
    """MAIL, RCPT, DATA, then data as is (it must end the data itself); the DATA reply."""
    raw = RawSMTP(port)
    raw.command(b"EHLO client.test")
    assert raw.command(f"MAIL FROM:<{SENDER}>".encode()).startswith(b"250")
    assert raw.command(f"RCPT TO:<{recipient}>".encode()).startswith(b"250")
    assert raw.command(b"DATA").startswith(b"354")
    raw.send(data)
    return raw, raw.reply()


@pytest.mark.parametrize(("body", "reply"), [
    (b"bare\nLF\r\n", b"554 5.6.0 Message refused: bare LF"),
    (b"bare\rCR\r\n", b"554 5.6.0 Message refused: bare LF or CR"),
    (b"a NUL \x00 here\r\n", b"554 5.6.0 Message refused: NUL"),
    (b"x" * 999 + b"\r\n", b"554 5.6.0 Message refused: line longer"),  # 998 is the limit
    # Longer than any buffer: read on and discarded, never parsed.
    (b"x" * 70000 + b"\r\n", b"554 5.6.0 Message refused: line longer"),
])
def test_malformed_data_is_refused_whole_and_the_session_goes_on(
        port: int, old_smtp: OldSMTP, body: bytes, reply: bytes) -> None:
    tag = token()
    raw, answer = send_raw_data(port, DAVE, message(tag, body) + b".\r\n")
    assert answer.startswith(reply)
    assert raw.command(b"NOOP") == b"250 2.0.0 Ok\r\n"  # still in step: no leftover lines
    raw.close()
    assert not [m for m in old_smtp.messages if tag.encode() in m.content]


def test_a_message_refused_after_part_of_it_was_streamed_is_not_delivered(
        port: int, old_smtp: OldSMTP) -> None:
    """The first lines went to the hop already when a bare LF comes: the hop connection is
    dropped before the final dot (the hop delivers nothing), and the session goes on."""
    refused, later = token(), token()
    raw = RawSMTP(port)
    raw.command(b"EHLO client.test")
    raw.command(f"MAIL FROM:<{SENDER}>".encode())
    assert raw.command(f"RCPT TO:<{DAVE}>".encode()).startswith(b"250")
    assert raw.command(b"DATA").startswith(b"354")
    raw.send(message(refused, b"good line\r\n" * 1000))
    time.sleep(0.5)  # the proxy reads (and streams) the part above on its own
    raw.send(b"bare\nLF\r\n.\r\n")
    assert raw.reply().startswith(b"554 5.6.0")
    assert raw.command(b"NOOP") == b"250 2.0.0 Ok\r\n"
    assert raw.transaction(DAVE, message(later) + b".\r\n") == b"250 2.0.0 Ok: delivered\r\n"
    raw.close()
    assert not [m for m in old_smtp.messages if refused.encode() in m.content]
    assert len([m for m in old_smtp.messages if later.encode() in m.content]) == 1


def test_line_of_998_characters_passes(port: int, old_smtp: OldSMTP) -> None:
    tag = token()
    sent = message(tag, b"." * 998 + b"\r\n")  # stuffed on the wire: 999 + CRLF
    stuffed = message(tag, b"." * 999 + b"\r\n")
    raw, answer = send_raw_data(port, DAVE, stuffed + b".\r\n")
    assert answer == b"250 2.0.0 Ok: delivered\r\n"
    raw.close()
    [got] = [m for m in old_smtp.messages if tag.encode() in m.content]
    assert after_our_trace(got.content) == sent


@pytest.mark.parametrize("end", [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r"])
def test_smuggling_a_second_message_is_impossible(
        port: int, old_smtp: OldSMTP, module_store: DovecotInstance, end: bytes) -> None:
    """A fake end of data and a second transaction inside one message (the real end of data
    then ends the smuggled message for a server that took the fake one)."""
    tag = token()
    smuggled = (f"MAIL FROM:<evil@elsewhere.example>\r\nRCPT TO:<{CAROL}>\r\nDATA\r\n"
                f"Subject: smuggled {tag}\r\n\r\nsmuggled\r\n").encode()
    raw, answer = send_raw_data(port, DAVE, message(tag, b"innocent" + end + smuggled)
                                + b".\r\n")
    assert answer.startswith(b"554 5.6.0")
    assert raw.command(b"QUIT").startswith(b"221 ")  # the very next reply: nothing else ran
    assert raw.closed()
    assert not [m for m in old_smtp.messages if tag.encode() in m.content]
    assert in_store(module_store, CAROL, tag) == []


@pytest.mark.parametrize(("data", "problem", "content"), [
    (b"a\r\n.b\r\n..c\r\n\r\n.\r\nNOOP\r\n", None, b"a\r\nb\r\n.c\r\n\r\n"),
    (b"a\n.\nb\r\n.\r\nNOOP\r\n", "554 5.6.0 Message refused: bare LF", b""),
    (b"a\r\n.\nb\r\n.\r\nNOOP\r\n", "554 5.6.0 Message refused: bare LF", b""),
    (b"a\n.\r\nb\r\n.\r\nNOOP\r\n", "554 5.6.0 Message refused: bare LF", b""),
    (b"x" * 3000 + b"\r\n.\r\nNOOP\r\n", "554 5.6.0 Message refused: line longer", b""),
    (b"y" * 998 + b"\r\n" + b"." * 999 + b"\r\n.\r\nNOOP\r\n", None,
     b"y" * 998 + b"\r\n" + b"." * 998 + b"\r\n"),
])
def test_data_reader_gives_the_same_verdict_however_the_bytes_are_split(
        data: bytes, problem: str | None, content: bytes) -> None:
    """The end of data, the content and the refusal do not depend on TCP segment borders."""
    from migrating_proxy.dialogue.smtp import DataReader

    for size in (1, 2, 3, 7, 1000, len(data)):
        reader, rest, passed = DataReader(MAX_SIZE), None, b""
        for start in range(0, len(data), size):
            chunk = data[start:start + size]
            if rest is None:
                lines, rest = reader.feed(chunk)
                passed += lines
            else:  # after the end: commands again, the session's business
                rest += chunk
        assert rest == b"NOOP\r\n", size
        assert (reader.problem or "").startswith(problem or ""), size
        assert (reader.problem is None) == (problem is None), size
        # What was passed on of a refused message is dropped with the hop connection.
        assert (passed if reader.problem is None else b"") == content, size


@pytest.mark.parametrize("content", [
    b"", b"a\r\n", b".\r\n", b".a\r\n..b\r\nc.\r\n.\r\n", b"x\r\n.\r\n.\r\ny\r\n",
])
def test_data_sent_to_the_hop_reads_back_as_the_message(content: bytes) -> None:
    """The next hop's DATA (dot-stuffed here, not by smtplib) gives back exactly the message:
    read by our own DataReader, as a hop would read it."""
    from migrating_proxy.delivery import dot_stuff
    from migrating_proxy.dialogue.smtp import DataReader

    wire = dot_stuff(content)
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n"
    reader = DataReader(MAX_SIZE)
    assert reader.feed(wire + b"NOOP\r\n") == (content, b"NOOP\r\n")
    assert reader.problem is None


def test_one_session_follows_an_account_created_during_it(
        smtp_proxy: Proxy, port: int, old_smtp: OldSMTP, module_store: DovecotInstance) -> None:
    """A session's recipient without an account goes to the old server until the account
    exists, then at once to the store; the store's connection is reused (MAIL and RCPT
    pipelined), also after a refused message."""
    hank = f"hank-{token()}@new.example"
    tags = [token() for _ in range(5)]
    raw, answer = send_raw_data(port, hank, message(tags[0]) + b".\r\n")
    assert answer == b"250 2.0.0 Ok: delivered\r\n"
    smtp_proxy.add_account(hank, PASSWORD)

    def send(recipient: str, data: bytes) -> bytes:
        assert raw.command(f"MAIL FROM:<{SENDER}>".encode()).startswith(b"250")
        assert raw.command(f"RCPT TO:<{recipient}>".encode()).startswith(b"250")
        assert raw.command(b"DATA").startswith(b"354")
        raw.send(data)
        return raw.reply()

    assert send(hank, message(tags[1], b"..dot\r\n") + b".\r\n").startswith(b"250")
    assert send(CAROL, message(tags[2]) + b".\r\n").startswith(b"250")
    assert send(CAROL, message(tags[3], b"bare\nLF\r\n") + b".\r\n").startswith(b"554")
    assert send(hank, message(tags[4]) + b".\r\n").startswith(b"250")
    raw.command(b"QUIT")
    raw.close()
    assert [m.recipients for m in old_smtp.messages if tags[0].encode() in m.content] == [[hank]]
    assert not [m for m in old_smtp.messages if any(t.encode() in m.content for t in tags[1:])]
    [stored] = in_store(module_store, hank, tags[1])
    assert after_our_trace(stored) == message(tags[1], b".dot\r\n")
    assert len(in_store(module_store, CAROL, tags[2])) == 1
    assert not in_store(module_store, CAROL, tags[3])
    assert len(in_store(module_store, hank, tags[4])) == 1


def test_a_size_of_thousands_of_digits_is_refused_as_too_big(port: int) -> None:
    raw = RawSMTP(port)
    raw.command(b"EHLO client.test")
    huge = b"9" * 5000  # Python refuses to convert more than 4300 digits
    assert raw.command(b"MAIL FROM:<" + SENDER.encode() + b"> SIZE=" + huge) \
        == b"552 5.3.4 Message size exceeds fixed limit\r\n"
    assert raw.command(b"NOOP") == b"250 2.0.0 Ok\r\n"  # the session goes on
    raw.close()


def test_overlong_command_line_is_refused_and_closed(port: int) -> None:
    raw = RawSMTP(port)
    raw.send(b"NOOP " + b"x" * 20000 + b"\r\nNOOP\r\n")
    assert raw.reply().startswith(b"500 5.5.2")
    assert raw.closed()


def test_a_client_that_never_ends_data_times_out(port: int, old_smtp: OldSMTP) -> None:
    tag = token()
    raw, answer = send_raw_data(port, DAVE, message(tag))  # and never the final dot
    assert answer.startswith(b"421 4.4.2 mx.test")
    assert raw.closed()
    assert not [m for m in old_smtp.messages if tag.encode() in m.content]


# -- STARTTLS --------------------------------------------------------------------------------
def test_commands_pipelined_with_starttls_are_dropped(
        port: int, tls_files: TLSFiles, old_smtp: OldSMTP) -> None:
    raw = RawSMTP(port)
    raw.command(b"EHLO client.test")
    raw.send(f"STARTTLS\r\nMAIL FROM:<{SENDER}>\r\nRCPT TO:<{DAVE}>\r\n".encode())
    assert raw.reply().startswith(b"220 2.0.0")
    tls = client_context(tls_files).wrap_socket(raw.sock, server_hostname="localhost")
    raw.sock, raw.file = tls, tls.makefile("rb")
    ehlo = raw.command(b"EHLO client.test")
    assert ehlo.startswith(b"250-mx.test") and b"STARTTLS" not in ehlo
    # The MAIL sent in clear text behind STARTTLS never ran.
    assert raw.command(f"RCPT TO:<{DAVE}>".encode()).startswith(b"503 5.5.1")
    assert raw.command(b"STARTTLS").startswith(b"503 5.5.1")
    tag = token()
    raw.command(f"MAIL FROM:<{SENDER}>".encode())
    raw.command(f"RCPT TO:<{DAVE}>".encode())
    raw.command(b"DATA")
    raw.send(message(tag) + b".\r\n")
    assert raw.reply() == b"250 2.0.0 Ok: delivered\r\n"
    [got] = [m for m in old_smtp.messages if tag.encode() in m.content]
    assert b"with ESMTPS" in got.content


def test_starttls_with_smtplib(port: int, tls_files: TLSFiles, module_store: DovecotInstance
                               ) -> None:
    tag = token()
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.starttls(context=client_context(tls_files))
        assert client.sendmail(SENDER, [CAROL], message(tag)) == {}
    [stored] = in_store(module_store, CAROL, tag)
    assert after_our_trace(stored) == message(tag)



@pytest.mark.parametrize("scheme", ["smtp+starttls", "smtps"])
@pytest.mark.parametrize("trust", ["--source-ca", "--no-verify-tls", "system CAs only"])
def test_relay_over_tls_starttls_or_implicit(tmp_path: Path, module_store: DovecotInstance,
                                             tls_files: TLSFiles, scheme: str,
                                             trust: str) -> None:
    """An old server reached with STARTTLS or implicit TLS (the domain's --relay URL), its
    certificate from a private CA: checked against the domain's --source-ca as the old
    server's IMAP is, or unchecked with --no-verify-tls; with neither, nothing is relayed
    (4xx: the sender keeps the message), never sent unverified."""
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(tls_files.cert, tls_files.key)
    smtp_port, tag = free_port(), token()
    options = {"--source-ca": ["--source-ca", str(tls_files.ca_cert)],
               "--no-verify-tls": ["--no-verify-tls"], "system CAs only": []}[trust]
    with OldSMTP(tls=server, implicit=scheme == "smtps") as old:
        proxy = Proxy(tmp_path / "proxy", module_store, overrides={
            "listen": {"smtp": f"127.0.0.1:{smtp_port}"}, "smtp": {"hostname": HOSTNAME}})
        proxy.cli("domain", "add", "tls.example", "--source", "imap://127.0.0.1:1",
                  "--relay", f"{scheme}://localhost:{old.port}", *options)
        with proxy, smtplib.SMTP("127.0.0.1", smtp_port) as client:
            if trust == "system CAs only":
                with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
                    client.sendmail(SENDER, ["ida@tls.example"], message(tag))
                [(code, _)] = refused.value.recipients.values()
                assert 400 <= code < 500
                return
            assert client.sendmail(SENDER, ["ida@tls.example"], message(tag, b"..x\r\n")) == {}
    [got] = [m for m in old.messages if tag.encode() in m.content]
    assert got.tls and after_our_trace(got.content) == message(tag, b"..x\r\n")


# -- big messages: streamed, bounded memory --------------------------------------------------
BIG = 40_000_000  # octets of each big message
BIG_SENDERS = 4


def peak_rss(pid: int) -> int:
    """The process's peak resident set so far (VmHWM), in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    [line] = [line for line in status.splitlines() if line.startswith("VmHWM:")]
    return int(line.split()[1]) * 1024


@dataclass(frozen=True)
class BigMessage:
    """A message of about `size` octets (lines starting with dots among them), made of one
    1 MB block repeated: generated while it is sent, never held whole."""

    tag: str
    size: int
    block: bytes = (b"..a line starting with a dot, stuffed" + b"x" * 60 + b"\r\n"
                    + (b"y" * 98 + b"\r\n") * 99) * 100

    def pieces(self) -> Iterator[bytes]:
        """The DATA wire form (dot-stuffed), end-of-data line excluded."""
        head = message(self.tag, b"")
        yield head
        for _ in range((self.size - len(head)) // len(self.block)):
            yield self.block

    def sha256(self, prefix: bytes) -> str:
        digest = hashlib.sha256(prefix)
        for piece in self.pieces():
            digest.update(piece)
        return digest.hexdigest()


def send_big(port: int, big: BigMessage) -> bytes:
    """MAIL, RCPT, DATA and the message in 1 MB writes; the DATA reply."""
    raw = RawSMTP(port)
    raw.sock.settimeout(120)
    raw.command(b"EHLO client.test")
    assert raw.command(f"MAIL FROM:<{SENDER}>".encode()).startswith(b"250")
    assert raw.command(f"RCPT TO:<{CAROL}>".encode()).startswith(b"250")
    assert raw.command(b"DATA").startswith(b"354")
    for piece in big.pieces():
        raw.send(piece)
    raw.send(b".\r\n")
    reply = raw.reply()
    raw.close()
    return reply


def test_big_messages_at_once_stream_through_in_bounded_memory(
        tmp_path: Path, module_store: DovecotInstance) -> None:
    """Several 40 MB messages at once, to a next hop that stalls after 354: the proxy's peak
    RSS grows by less than half of one message (it held each message twice before, so +320 MB
    here), and each arrives byte for byte, dot-stuffing included."""
    smtp_port = free_port()
    bigs = [BigMessage(token(), BIG) for _ in range(BIG_SENDERS)]
    replies: dict[str, bytes] = {}
    with SinkSMTP(stall=2.0) as sink:
        proxy = Proxy(tmp_path / "proxy", module_store, overrides={
            "listen": {"smtp": f"127.0.0.1:{smtp_port}"},
            "backend": {"delivery": sink.url},
            "smtp": {"hostname": HOSTNAME, "max_message_size": "50MB", "data_timeout": 60.0},
        })
        proxy.add_account(CAROL, PASSWORD)
        with proxy:
            assert proxy.process is not None
            send_big(smtp_port, BigMessage(token(), 1_000_000))  # every code path run once
            before = peak_rss(proxy.process.pid)
            threads = [threading.Thread(target=lambda b=b: replies.update(
                {b.tag: send_big(smtp_port, b)})) for b in bigs]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            growth = peak_rss(proxy.process.pid) - before
    assert growth < BIG // 2, f"peak RSS grew by {growth / 1e6:.0f} MB"
    for big in bigs:
        assert replies[big.tag] == b"250 2.0.0 Ok: delivered\r\n"
        [got] = [m for m in sink.messages if f"test {big.tag}".encode() in m.head]
        trace = OUR_TRACE.match(got.head)
        assert trace is not None, got.head[:300]
        assert got.recipients == [CAROL] and got.sha256 == big.sha256(trace.group())


# -- mail during a migration -----------------------------------------------------------------
ALICE, ALICE_PW = "alice@old.example", "alice-pw"  # on the old server (conftest.OLD_USERS)
BOB = "bob@old.example"


def send(port: int, recipient: str, tag: str) -> None:
    with smtplib.SMTP("127.0.0.1", port) as client:
        assert client.sendmail(SENDER, [recipient], message(tag)) == {}


def count_in_mailbox(port: int, address: str, password: str, tag: str) -> int:
    with IMAPClient("127.0.0.1", port, ssl=False) as client:
        client.login(address, password)
        client.select_folder("INBOX", readonly=True)
        fetched = client.fetch(client.search(), ["BODY.PEEK[]"])
    return sum(tag.encode() in data[b"BODY[]"] for data in fetched.values())


def test_mail_before_during_and_after_the_first_login_arrives_exactly_once(
        tmp_path: Path, new_store: DovecotInstance, old_server: DovecotInstance) -> None:
    """Before: relayed to the old server (its LMTP here) and copied; during the copy and
    after it: delivered to the new store. Each ends up in the new INBOX exactly once."""
    seed_mailbox("127.0.0.1", old_server.imap_port, ALICE, ALICE_PW, sample_corpus())
    smtp_port = free_port()
    proxy = Proxy(tmp_path / "proxy", new_store, overrides={
        "listen": {"smtp": f"127.0.0.1:{smtp_port}"},
        "backend": {"delivery": f"lmtp://127.0.0.1:{new_store.lmtp_port}"},
        "smtp": {"hostname": HOSTNAME},
        "migration": {"workers": 1},
    })
    proxy.cli("domain", "add", "old.example",
              "--source", f"imap://127.0.0.1:{old_server.imap_port}",
              "--relay", f"lmtp://127.0.0.1:{old_server.lmtp_port}", "--cutover", "immediate")
    before, during, after = token(), token(), token()
    with proxy:
        send(smtp_port, ALICE, before)
        assert count_in_mailbox(old_server.imap_port, ALICE, ALICE_PW, before) == 1
        with IMAPClient("127.0.0.1", proxy.imap_port, ssl=False) as client:
            client.login(ALICE, ALICE_PW)  # the first login: account created, copy queued
        send(smtp_port, ALICE, during)  # the account exists now: straight to the new store
        assert proxy.wait_for_state(ALICE)["state"] == "COMPLETED"
        send(smtp_port, ALICE, after)
        for tag in (before, during, after):
            assert count_in_mailbox(proxy.imap_port, ALICE, ALICE_PW, tag) == 1, tag
    assert count_in_mailbox(old_server.imap_port, ALICE, ALICE_PW, during) == 0


def test_store_unreachable_gives_4xx_and_nothing_is_accepted(
        tmp_path: Path, module_store: DovecotInstance) -> None:
    smtp_port = free_port()
    proxy = Proxy(tmp_path / "proxy", module_store, overrides={
        "listen": {"smtp": f"127.0.0.1:{smtp_port}"},
        "backend": {"delivery": f"lmtp://127.0.0.1:{free_port()}"},  # nothing listens there
    })
    proxy.add_account(CAROL, PASSWORD)
    with proxy, smtplib.SMTP("127.0.0.1", smtp_port) as client:
        client.ehlo("client.test")
        client.mail(SENDER)
        code, text = client.rcpt(CAROL)
        assert (code, text[:5]) == (451, b"4.4.1")
        assert client.docmd("DATA")[0] == 554


# -- submission ------------------------------------------------------------------------------
@pytest.fixture
def submission(tmp_path: Path, new_store: DovecotInstance, old_server: DovecotInstance,
               tls_files: TLSFiles) -> Iterator[tuple[Proxy, OldSMTP]]:
    """A proxy with a submission port (TLS required before AUTH) and an outbound relay."""
    with OldSMTP() as outbound:
        port = free_port()
        proxy = Proxy(tmp_path / "proxy", new_store, tls=tls_files, overrides={
            "listen": {"submission": f"127.0.0.1:{port}"},
            "tls": {"require": True},
            "smtp": {"hostname": HOSTNAME, "outbound": outbound.url},
            "limits": {"max_failures_per_peer": 0, "max_failures_per_account": 0},
        })
        proxy.ports["submission"] = port
        proxy.cli("domain", "add", "old.example",
                  "--source", f"imap://127.0.0.1:{old_server.imap_port}", "--cutover", "immediate")
        with proxy:
            yield proxy, outbound


def test_submission_login_migrates_the_user_and_relays_to_outbound(
        submission: tuple[Proxy, OldSMTP], tls_files: TLSFiles) -> None:
    proxy, outbound = submission
    tag = token()
    sent = message(tag)
    with smtplib.SMTP("127.0.0.1", proxy.ports["submission"]) as client:
        client.starttls(context=client_context(tls_files))
        assert client.login(ALICE, ALICE_PW)[0] == 235  # the user's first contact ever
        assert client.sendmail(ALICE, ["friend@elsewhere.example"], sent) == {}
    [got] = outbound.messages
    assert (got.sender, got.recipients) == (ALICE, ["friend@elsewhere.example"])
    assert b"with ESMTPSA" in got.content and after_our_trace(got.content) == sent
    # The same login decision as IMAP: the account now exists and its copy is queued.
    assert [row["address"] for row in proxy.status(ALICE)] == [ALICE]

    async def later_login_with_aiosmtplib() -> None:
        await aiosmtplib.send(sent, sender=ALICE.upper(), recipients=[DAVE], hostname="127.0.0.1",
                              port=proxy.ports["submission"], start_tls=True,
                              tls_context=client_context(tls_files),
                              username=ALICE, password=ALICE_PW)

    asyncio.run(later_login_with_aiosmtplib())
    assert [m.recipients for m in outbound.messages] == [["friend@elsewhere.example"], [DAVE]]
    assert_no_password_logged(proxy)


def assert_no_password_logged(proxy: Proxy) -> None:
    """SASL payloads never reach the log (tests/test_secrets.py does this for IMAP/POP3)."""
    log = proxy.log_text()
    assert '"event": "login"' in log
    for secret in (ALICE_PW, sasl_plain(ALICE, ALICE_PW),
                   base64.b64encode(ALICE_PW.encode()).decode()):
        assert secret not in log


def test_submission_needs_tls_and_auth_and_one_s_own_sender(
        submission: tuple[Proxy, OldSMTP], tls_files: TLSFiles) -> None:
    proxy, outbound = submission
    raw = RawSMTP(proxy.ports["submission"])
    assert b"AUTH" not in raw.command(b"EHLO client.test")
    assert raw.command(b"AUTH PLAIN " + sasl_plain(ALICE, ALICE_PW).encode()).startswith(
        b"530 5.7.0")
    assert raw.command(f"MAIL FROM:<{ALICE}>".encode()).startswith(b"530 5.7.0")
    raw.close()
    with smtplib.SMTP("127.0.0.1", proxy.ports["submission"]) as client:
        client.starttls(context=client_context(tls_files))
        client.ehlo()
        assert client.has_extn("auth") and "PLAIN" in client.esmtp_features["auth"]
        client.user, client.password = ALICE, "wrong"
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            client.auth("LOGIN", client.auth_login)
        assert (refused.value.smtp_code, refused.value.smtp_error[:5]) == (535, b"5.7.8")
        client.user, client.password = ALICE, ALICE_PW
        assert client.auth("LOGIN", client.auth_login)[0] == 235
        code, text = client.mail(BOB)  # somebody else's address
        assert (code, text[:5]) == (553, b"5.7.1")
        assert client.mail("")[0] == 553
    assert outbound.messages == []
    assert_no_password_logged(proxy)


# -- configuration ---------------------------------------------------------------------------
def test_smtp_configuration_defaults_and_errors(tmp_path: Path) -> None:
    from migrating_proxy.config import Config, ConfigError, load

    defaults = Config()
    assert defaults.listen.smtp is None and defaults.listen.submission is None  # opt-in
    assert defaults.backend.delivery.url == "lmtp://127.0.0.1:24"
    assert defaults.smtp.max_message_size == 50 * 1024 * 1024 and defaults.smtp.outbound is None
    path = tmp_path / "c.toml"
    base = '[provision]\nkind = "none"\n'
    path.write_text(base + '[listen]\nsmtp = "127.0.0.1:25"\n[smtp]\nmax_message_size = "10M"\n'
                    'hostname = "mx.example"\n[backend]\ndelivery = "smtp+starttls://store"\n')
    loaded = load(str(path))
    assert loaded.listen.smtp == ("127.0.0.1", 25) and loaded.smtp.max_message_size == 10 << 20
    assert loaded.backend.delivery.url == "smtp+starttls://store:25"
    for text, error in [
        ('[listen]\nsubmission = "127.0.0.1:587"\n', "smtp.outbound: required with"),
        ('[smtp]\nmax_message_size = "lots"\n', "smtp.max_message_size: 'lots' is not a size"),
        ('[smtp]\noutbound = "lmtp://x"\n', "smtp.outbound: 'lmtp://x': must be one of smtp"),
        ('[backend]\ndelivery = "imap://x"\n', "backend.delivery: 'imap://x': must be one of"),
        ('[smtp]\ndata_timeout = 0\n', "smtp.data_timeout: must be positive"),
        ('[smtp]\nhostname = "mx\\r\\nX-Injected: 1"\n', "smtp.hostname: must be a plain"),
    ]:
        path.write_text(base + text)
        with pytest.raises(ConfigError, match=re.escape(error)):
            load(str(path))
