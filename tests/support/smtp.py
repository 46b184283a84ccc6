"""The old server's SMTP for tests: a real aiosmtpd server that keeps what it received.

It can refuse chosen recipients at RCPT time (`refuse`), and be stopped and started again on
the same port to play a next hop that is down for a while. `SinkSMTP` is a next hop for big
messages: it keeps only their size and hash.
"""

from __future__ import annotations

import hashlib
import socketserver
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.controller import Controller

from tests.support.dovecot import free_port, wait_for_port


@dataclass
class Received:
    sender: str
    recipients: list[str]
    content: bytes  # dot-unstuffed, CRLF line ends, exactly as it came in
    tls: bool = False  # it came over TLS (aiosmtpd says so after STARTTLS only)


@dataclass
class OldSMTP:
    """Use as a context manager; `messages` fills as mail arrives."""

    port: int = field(default_factory=free_port)
    refuse: dict[str, str] = field(default_factory=dict)  # address -> reply, e.g. "550 5.1.1 x"
    messages: list[Received] = field(default_factory=list)
    data_reply: str = ""  # when set, every DATA is answered with it and nothing is kept
    tls: ssl.SSLContext | None = None  # offer STARTTLS with it (or with `implicit`, only TLS)
    implicit: bool = False
    controller: Controller | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        if address.lower() in self.refuse:
            return self.refuse[address.lower()]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.data_reply:
            return self.data_reply
        with self.lock:
            self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                          envelope.original_content,
                                          self.implicit or session.ssl is not None))
        return "250 2.0.0 queued"

    def for_recipient(self, address: str) -> list[Received]:
        with self.lock:
            return [m for m in self.messages if address in m.recipients]

    def start(self) -> None:
        tls = {"ssl_context": self.tls} if self.implicit else {"tls_context": self.tls}
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port, **tls)
        self.controller.start()
        wait_for_port("127.0.0.1", self.port)

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    def __enter__(self) -> OldSMTP:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class Sunk:
    """What a `SinkSMTP` received of one message: never the message itself."""

    recipients: list[str]
    head: bytes  # the first KB of DATA as it came (dot-stuffed, the proxy's trace first)
    size: int  # octets of DATA, the final dot line excluded
    sha256: str  # of those octets


class SinkSMTP:
    """An SMTP server that keeps no message: DATA is hashed and counted as it streams in, so
    messages of any size cost the test nothing. After each 354 it reads nothing for `stall`
    seconds, so a relaying sender's data backs up in whoever relays it."""

    def __init__(self, stall: float = 0.0) -> None:
        self.stall = stall
        self.port = free_port()
        self.messages: list[Sunk] = []
        self.lock = threading.Lock()
        self.server: socketserver.ThreadingTCPServer | None = None

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    def __enter__(self) -> SinkSMTP:
        sink = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                sink.converse(self.rfile, self.wfile)

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        wait_for_port("127.0.0.1", self.port)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()

    def converse(self, rfile: Any, wfile: Any) -> None:
        wfile.write(b"220 sink ESMTP\r\n")
        recipients: list[str] = []
        while line := rfile.readline(4096):
            verb = line[:4].upper()
            if verb == b"QUIT":
                wfile.write(b"221 bye\r\n")
                return
            if verb == b"RCPT":
                recipients.append(line.split(b"<", 1)[1].split(b">", 1)[0].decode())
            if verb == b"DATA":
                wfile.write(b"354 go ahead\r\n")
                wfile.flush()
                time.sleep(self.stall)
                with self.lock:
                    self.messages.append(read_data(rfile, recipients))
                recipients = []
            if verb in (b"MAIL", b"RSET"):
                recipients = []
            wfile.write(b"250-sink\r\n250 SIZE\r\n" if verb == b"EHLO" else b"250 ok\r\n")


def read_data(rfile: Any, recipients: list[str]) -> Sunk:
    """Up to the end-of-data line, hashed as it comes (the final CRLF before it included)."""
    digest, head, size, carry = hashlib.sha256(), b"", 0, b""
    while True:
        chunk = rfile.read1(1 << 18)
        if not chunk:
            raise ConnectionError("closed during DATA")
        window = carry + chunk
        end = window.find(b"\r\n.\r\n")
        done = window[: end + 2] if end >= 0 else window[:-4]
        carry = b"" if end >= 0 else window[-4:]
        digest.update(done)
        head, size = (head + done)[:1024], size + len(done)
        if end >= 0:
            return Sunk(list(recipients), head, size, digest.hexdigest())
