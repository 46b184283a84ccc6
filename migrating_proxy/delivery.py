"""The client side of inbound mail: one transaction with one next hop. Blocking; run in a thread.

The SMTP front-end opens a `NextHop` at the first recipient it routes to a hop, forwards each
RCPT as it arrives (so the sender sees the hop's own per-recipient verdict at RCPT time, before
anything is accepted), then hands over the whole message at the end of DATA and passes the hop's
reply back. Nothing is ever queued here: the front-end answers the sender with what the hop said.

smtplib rather than aiosmtplib: the front-end's protocol is Twisted, and a short blocking
dialogue in the thread pool (like the login decision) needs no second event loop. smtplib speaks
LMTP (LHLO), STARTTLS and implicit TLS, and returns every reply's code and text.
smtplib.LMTP.data() reads one reply only, whereas LMTP sends one per recipient: the front-end
therefore never gives an LMTP hop more than one recipient per transaction (`max_recipients`).
"""

from __future__ import annotations

import smtplib
import ssl
from dataclasses import dataclass

from migrating_proxy.endpoints import Endpoint

UNREACHABLE = "451 4.4.1 Next hop not reachable, try again later"
LOST = "451 4.4.2 Connection to next hop lost, try again later"


def reply_line(code: int, message: bytes | str) -> str:
    """The hop's reply as one line we can pass back: its class kept, its text made safe."""
    text = message.decode("utf-8", "replace") if isinstance(message, bytes) else message
    text = " ".join("".join(c for c in text if " " <= c <= "~").split())
    if code < 200 or code > 599 or 300 <= code < 400 or code == 421:
        return LOST  # a 421 passed on would tell our client that *we* are closing
    klass = code // 100
    if not (len(text) > 5 and text[0] == str(klass) and text[1] == "."):
        text = f"{klass}.0.0 {text}".rstrip()  # we advertise ENHANCEDSTATUSCODES
    return f"{code} {text}"


def dot_stuff(message: bytes) -> bytes:
    """DATA's wire form of a message of CRLF lines: each line's leading `.` doubled, and the
    end-of-data line added (RFC 5321 4.5.2)."""
    if not message.endswith(b"\r\n") and message:
        message += b"\r\n"
    stuffed = message.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed + b".\r\n"


def send_data(client: smtplib.SMTP, message: bytes) -> tuple[int, bytes]:
    """smtplib's DATA, minus its regex passes over the message for bare CR/LF and dots: the
    front-end's message already has CRLF lines only, so it is stuffed with one replace and
    sent with one sendall. Raises SMTPDataError when DATA itself is refused, as smtplib."""
    client.putcmd("data")
    code, reply = client.getreply()
    if code != 354:
        raise smtplib.SMTPDataError(code, reply)
    if client.sock is None:
        raise smtplib.SMTPServerDisconnected("please run connect() first")
    client.sock.sendall(dot_stuff(message))
    return client.getreply()


@dataclass
class NextHop:
    endpoint: Endpoint
    helo_name: str
    timeout: float
    verify_tls: bool = True
    client: smtplib.SMTP | None = None
    dirty: bool = False  # a transaction was begun and not finished by DATA's reply

    @property
    def max_recipients(self) -> int | None:
        """LMTP answers DATA once per recipient and SMTP cannot relay that: one at a time."""
        return 1 if self.endpoint.protocol == "lmtp" else None

    def open(self, sender: str, options: list[str], address: str | None = None
             ) -> tuple[str, str | None]:
        """MAIL FROM, on the connection kept from an earlier transaction if it still works,
        and RCPT TO for the first recipient (`address`) if MAIL was accepted.

        Returns the reply lines of both (2xx for MAIL: ready for recipients); the RCPT's is
        None when it was not asked. To a hop that advertises PIPELINING (Dovecot's LMTP
        does) the two go in one write, a round trip less (RFC 2920); RCPT's reply is still
        the hop's own and is read after MAIL's."""
        if self.client is not None:
            try:
                if self.dirty:  # the last transaction did not end in a delivery: start clean
                    self.client.rset()
                replies = self._mail(sender, options, address)
                if replies[0] != LOST:  # e.g. 421: the hop closes idle connections
                    return replies
            except (OSError, smtplib.SMTPException):
                pass
            self.close()  # the hop may close an idle connection: connect again
        try:
            self.client = self._connect()
            self.client.ehlo_or_helo_if_needed()  # LHLO for LMTP; HELO for a pre-ESMTP server
            if self.endpoint.tls == "starttls":
                self.client.starttls(context=self._tls_context())
                self.client.ehlo()
            replies = self._mail(sender, options, address)
        except (OSError, smtplib.SMTPException):
            # Includes a hop that cannot do the STARTTLS its URL asks for: never fall back to
            # clear text; the sender retries and an operator sees the warning in the log.
            self.close()
            return UNREACHABLE, None
        if replies[0] == LOST:
            self.close()
        return replies

    def _mail(self, sender: str, options: list[str], address: str | None
              ) -> tuple[str, str | None]:
        """MAIL (and RCPT). Raises if the connection fails before MAIL's reply is read."""
        assert self.client is not None
        options = self._supported(options)
        if address is None or not self.client.has_extn("pipelining"):
            code, message = self.client.mail(sender, options)
            self.dirty = True
            reply = reply_line(code, message)
            if address is None or not reply.startswith("2"):
                return reply, None
            return reply, self.rcpt(address)
        params = "".join(f" {option}" for option in options)
        self.client.send(f"mail FROM:{smtplib.quoteaddr(sender)}{params}\r\n"
                         f"rcpt TO:{smtplib.quoteaddr(address)}\r\n")
        code, message = self.client.getreply()
        self.dirty = True
        reply = reply_line(code, message)
        if reply == LOST:
            return reply, None  # the caller closes this connection
        # RCPT's reply comes even when MAIL was refused (then 503): read it to stay in step.
        second = self._step(lambda client: client.getreply())
        return reply, (second if reply.startswith("2") else None)

    def rcpt(self, address: str) -> str:
        return self._step(lambda client: client.rcpt(address))

    def data(self, message: bytes) -> str:
        """The whole message, CRLF lines, not dot-stuffed. Returns the hop's verdict."""
        reply = self._step(lambda client: send_data(client, message))
        self.dirty = not reply.startswith("2")
        return reply

    def close(self) -> None:
        client, self.client = self.client, None
        if client is None:
            return
        try:
            client.quit()
        except (OSError, smtplib.SMTPException):
            client.close()

    def _step(self, call) -> str:  # type: ignore[no-untyped-def]
        if self.client is None:
            return LOST
        try:
            reply = reply_line(*call(self.client))
        except smtplib.SMTPResponseException as exc:  # e.g. DATA refused before 354
            reply = reply_line(exc.smtp_code, exc.smtp_error)
        except (OSError, smtplib.SMTPException):
            reply = LOST
        if reply == LOST:
            self.close()  # this connection is of no further use
        return reply

    def _connect(self) -> smtplib.SMTP:
        host, port, name = self.endpoint.host, self.endpoint.port, self.helo_name
        if self.endpoint.protocol == "lmtp":
            return smtplib.LMTP(host, port, local_hostname=name, timeout=self.timeout)
        if self.endpoint.tls == "implicit":
            return smtplib.SMTP_SSL(host, port, local_hostname=name, timeout=self.timeout,
                                    context=self._tls_context())
        return smtplib.SMTP(host, port, local_hostname=name, timeout=self.timeout)

    def _tls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        if not self.verify_tls:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def _supported(self, options: list[str]) -> list[str]:
        """Pass SIZE= and BODY= on only to a hop that advertises them (RFC 1870, RFC 6152)."""
        assert self.client is not None
        wanted = {"SIZE": "size", "BODY": "8bitmime"}
        return [o for o in options
                if self.client.has_extn(wanted.get(o.partition("=")[0].upper(), "-"))]
