"""SMTP's command dialogue (inbound MX and submission) and its DATA reader, sans-IO.

The dialogue parses commands, keeps the envelope and words every reply; what needs the world
(routing a recipient and asking its next hop, passing the message on, the login decision) comes
out as an action, and the session answers with `resume(reply)` (or `authenticated`). Policy is
not here: which senders a session may use (`check_sender`) and where recipients go are the
session's handler's (frontends/smtp.py), in the way of aiosmtpd's handler hooks.

DATA is strict (RFC 5321 2.3.8, 4.1.1.4, 4.5.2, 4.5.3.1.6) so that no next hop can read the
message differently from us (SMTP smuggling): the end of data is `CRLF . CRLF` and nothing
else. A bare LF or bare CR, a NUL, or a line over 998 characters never ends the data and never
returns to command mode: the rest of the message is read and discarded, and the whole message
is refused at its end with 554 5.6.0 (552 5.3.4 when it exceeds SIZE). `DataReader` is the one
place message bytes are consumed; the lines it passes (checked, dot-unstuffed) go out at once as
`MessageData`, so a message is never held whole: what was streamed of a message refused later
is dropped by the session with the hop connection, before the hop's final dot.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

from migrating_proxy.dialogue.actions import (
    AddRecipient,
    EndOfMessage,
    EndTransaction,
    MessageData,
    MessageRefused,
    SessionState,
)
from migrating_proxy.dialogue.base import Dialogue, DialogueSettings
from migrating_proxy.dialogue.lines import bounded_int
from migrating_proxy.dialogue.sasl import MECHANISMS, Aborted
from migrating_proxy.login import Outcome

MAX_TEXT_LINE = 1000  # octets including CRLF, after dot-unstuffing (RFC 5321 4.5.3.1.6)
MAX_ERRORS = 10
PATH = re.compile(rb"(?i)(FROM|TO):\s?<([^<>\s]*)>((?: [^ ]+)*)\s*")
DOMAIN = re.compile(r"[A-Za-z0-9\[\]:._-]+")
REFUSED_BARE_LF = "554 5.6.0 Message refused: bare LF or CR (lines must end with CRLF)"
REFUSED_LONG_LINE = "554 5.6.0 Message refused: line longer than 998 characters"
REFUSED_NUL = "554 5.6.0 Message refused: NUL character"
TOO_BIG = "552 5.3.4 Message size exceeds fixed limit"
AUTH_REFUSALS = {
    Outcome.FAILED: "535 5.7.8 Authentication credentials invalid",
    Outcome.THROTTLED: "454 4.7.0 Too many failed logins, try again later",
    Outcome.UNAVAILABLE: "454 4.7.0 Temporary authentication failure, try again later",
}


class DataReader:
    """One DATA section: CRLF lines only, dot-unstuffed, bounded; refusals kept for the end.

    Nothing is kept but a partial line: each `feed` returns the whole lines it completed,
    ready to pass on, and the reader only counts them (SIZE)."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.size = 0  # octets of content so far, dot-unstuffed
        self.pending = bytearray()
        # The next byte starts a line only right after CRLF: after a bare LF it does not, or
        # `\n.\r\n` would end the data here but not at a next hop that reads only CRLF.
        self.line_start = True
        self.problem: str | None = None  # the reply refusing the message, once known

    def feed(self, data: bytes) -> tuple[bytes, bytes | None]:
        """Take bytes; return (the content lines they completed, b"" once refused; what
        follows the final `.` line once it arrived, else None).

        Works on all complete lines at once with bytes methods (C speed), not line by line:
        a 20 KB message costs a handful of calls instead of a few hundred."""
        self.pending += data
        last = self.pending.rfind(b"\n")
        if last < 0:
            self.check_partial_line()
            return b"", None
        block = bytes(self.pending[: last + 1])
        end = self.terminator(block)
        if end is None:
            del self.pending[: last + 1]
            content = self.take(block)
            self.check_partial_line()
            return content, None
        content = self.take(block[:end])
        rest = bytes(self.pending[end + 3:])  # what follows `.` CRLF
        self.pending = bytearray()
        return content, rest

    def terminator(self, block: bytes) -> int | None:
        """Where the `.` line ending the data starts in block (whole lines), or None.

        Only `CRLF . CRLF` counts: `\n.\n`, `\r\n.\n` and `\n.\r\n` are content (and get the
        message refused), never the end, so nothing after them can run as a command."""
        if self.line_start and block.startswith(b".\r\n"):
            return 0
        found = block.find(b"\r\n.\r\n")
        return None if found < 0 else found + 2

    def check_partial_line(self) -> None:
        if len(self.pending) > MAX_TEXT_LINE + 1:  # +1: a stuffed dot is not counted
            self.refuse(REFUSED_LONG_LINE)
            self.pending.clear()  # read on and discard: the buffer stays bounded
            self.line_start = False

    def take(self, lines: bytes) -> bytes:
        """Whole lines of content (maybe none): check, dot-unstuff, count; the content to
        pass on (b"" once the message is refused)."""
        if not lines:
            return b""
        starts_line, self.line_start = self.line_start, lines.endswith(b"\r\n")
        if starts_line and lines.startswith(b"."):
            lines = lines[1:]
        lines = lines.replace(b"\r\n.", b"\r\n")  # leaves every CR and LF where it was
        # One split serves both checks: it counts the CRLFs (each CR and LF must be one's)
        # and measures the lines, in one pass of C.
        parts = lines.split(b"\r\n")
        crlf = len(parts) - 1
        if lines.count(b"\n") != crlf or lines.count(b"\r") != crlf:
            self.refuse(REFUSED_BARE_LF)
        if b"\0" in lines:
            self.refuse(REFUSED_NUL)
        if not starts_line or max(map(len, parts)) > MAX_TEXT_LINE - 2:
            self.refuse(REFUSED_LONG_LINE)
        self.size += len(lines)
        if self.size > self.max_size:
            self.refuse(TOO_BIG)
        return lines if self.problem is None else b""

    def refuse(self, reply: str) -> None:
        if self.problem is None:
            self.problem = reply


@dataclass
class Transaction:
    sender: str
    options: list[str]  # MAIL parameters to pass on (SIZE=, BODY=)
    # The session's connection to this transaction's next hop, and the recipients that hop
    # accepted: both kept by the session (its add_recipient runs in a thread).
    hop: Any = None
    recipients: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SmtpSettings:
    hostname: str  # banner and Received header
    max_message_size: int
    max_recipients: int
    submission: bool = False  # AUTH offered and required (listen.submission)


def no_check(sender: str, user: str | None) -> str:
    """Inbound mail may come from anyone."""
    return ""


class SmtpDialogue(Dialogue):
    sasl_prompt = "334"

    def __init__(self, settings: DialogueSettings, smtp: SmtpSettings, peer_host: str = "",
                 tls_active: bool = False,
                 check_sender: Callable[[str, str | None], str] = no_check) -> None:
        super().__init__(settings, tls_active)
        self.smtp, self.peer_host, self.check_sender = smtp, peer_host, check_sender
        self.hostname = smtp.hostname
        self.helo: str | None = None
        self.esmtp = False
        self.txn: Transaction | None = None
        self.reader: DataReader | None = None
        self.user: str | None = None  # the authenticated address (submission only)
        self.errors = 0

    # -- what the session calls ----------------------------------------------------------
    def receive(self, data: bytes):  # type: ignore[no-untyped-def]
        if self.state is SessionState.DATA:
            self.data(data)
            return self._flush()
        return super().receive(data)

    def resume(self, reply: str, end_transaction: bool = False) -> list:  # type: ignore[type-arg]
        """Answer the command that went out as an action, then run what was pipelined."""
        self.answer(reply, end_transaction)
        return self._flush()

    def delivered(self, reply: str) -> list:  # type: ignore[type-arg]
        """The next hop's verdict on the message of an `EndOfMessage`."""
        return self.resume(reply if not reply.startswith("2") else "250 2.0.0 Ok: delivered",
                           end_transaction=True)

    def authenticated(self, address: str) -> list:  # type: ignore[type-arg]
        """Submission: the login decision accepted the `Authenticate` (as `address`)."""
        self.user = address
        return self.resume("235 2.7.0 Authentication successful")

    def login_deadline(self) -> list:  # type: ignore[type-arg]
        return [] if self.user is not None else super().login_deadline()

    def answer(self, reply: str, end_transaction: bool = False) -> None:
        if self.state is SessionState.CLOSED:
            return
        if end_transaction:
            self.end_transaction()
        self.state = SessionState.COMMANDS
        self.write_line(reply)
        self.run()

    # -- wording -------------------------------------------------------------------------
    def greet(self) -> None:
        self.write_line(f"220 {self.hostname} ESMTP migrating-proxy")

    def say_bye(self, message: str) -> None:
        self.write_line(f"421 4.4.2 {self.hostname} {message}")

    def line_too_long(self) -> None:
        # No resynchronisation on a stream that broke the framing: answer once and hang up.
        self.write_line("500 5.5.2 Line too long, closing connection")
        self.close()

    def answer_login_failed(self, outcome: Outcome) -> None:
        self.write_line(AUTH_REFUSALS[outcome])

    def error(self, reply: str) -> None:
        self.errors += 1
        if self.errors >= MAX_ERRORS:
            self.close_with_error("Too many errors, closing connection")
        else:
            self.write_line(reply)

    def extensions(self) -> list[str]:
        extensions = ["PIPELINING", f"SIZE {self.smtp.max_message_size}", "8BITMIME",
                      "ENHANCEDSTATUSCODES"]
        if self.offers_starttls:
            extensions.append("STARTTLS")
        if self.smtp.submission and self.plaintext_login_allowed:
            extensions.append(f"AUTH {' '.join(MECHANISMS)}")
        return extensions

    # -- commands ------------------------------------------------------------------------
    def command_line(self, line: bytes) -> None:
        verb, _, arg = line.partition(b" ")
        handler = self.handler(verb)
        if handler is None:
            self.error("500 5.5.2 Command unrecognized")
        else:
            handler(arg.strip())

    def do_EHLO(self, arg: bytes) -> None:
        if self.greeted(arg, esmtp=True):
            lines = [self.hostname, *self.extensions()]
            for extension in lines[:-1]:
                self.write_line(f"250-{extension}")
            self.write_line(f"250 {lines[-1]}")

    def do_HELO(self, arg: bytes) -> None:
        if self.greeted(arg, esmtp=False):
            self.write_line(f"250 {self.hostname}")

    def greeted(self, arg: bytes, esmtp: bool) -> bool:
        name = arg.decode("ascii", "replace")
        if not DOMAIN.fullmatch(name):
            self.error("501 5.5.4 Syntax: EHLO hostname")
            return False
        self.end_transaction()
        self.helo, self.esmtp = name, esmtp  # goes into the Received header: checked above
        return True

    def do_MAIL(self, arg: bytes) -> None:
        match = PATH.fullmatch(arg)
        if self.helo is None:
            self.error("503 5.5.1 Send EHLO first")
        elif self.txn is not None:
            self.error("503 5.5.1 Nested MAIL command")
        elif match is None or match[1].upper() != b"FROM":
            self.error("501 5.5.4 Syntax: MAIL FROM:<address>")
        elif not match[2].isascii():
            self.error("553 5.6.7 Non-ASCII address needs SMTPUTF8, not supported here")
        else:
            options, problem = self.mail_options(match[3].decode("ascii", "replace").split())
            problem = self.check_sender(match[2].decode("ascii"), self.user) or problem
            if problem:
                self.error(problem)
            else:
                self.txn = Transaction(match[2].decode("ascii"), options)
                self.write_line("250 2.1.0 Ok")

    def mail_options(self, params: list[str]) -> tuple[list[str], str]:
        """(options to pass on, refusal or "") for MAIL's ESMTP parameters."""
        for param in params:
            key, _, value = param.upper().partition("=")
            if key == "SIZE" and value.isascii() and value.isdigit():
                if bounded_int(value, self.smtp.max_message_size) is None:
                    return [], TOO_BIG
            elif not (key == "BODY" and value in ("7BIT", "8BITMIME")) or not self.esmtp:
                return [], f"555 5.5.4 Unsupported parameter {param[:40]}"
        return params, ""

    def do_RCPT(self, arg: bytes) -> None:
        match = PATH.fullmatch(arg)
        if self.txn is None:
            self.error("503 5.5.1 Need MAIL first")
        elif match is None or match[1].upper() != b"TO":
            self.error("501 5.5.4 Syntax: RCPT TO:<address>")
        elif match[3]:
            self.error("555 5.5.4 No RCPT parameters supported")
        elif len(self.txn.recipients) >= self.smtp.max_recipients:
            self.write_line("452 4.5.3 Too many recipients")
        else:
            self.state = SessionState.BUSY
            self.out.append(AddRecipient(self.txn, match[2].decode("ascii", "replace")))

    def do_DATA(self, arg: bytes) -> None:
        if self.txn is None:
            self.error("503 5.5.1 Need MAIL first")
        elif not self.txn.recipients:
            self.error("554 5.5.1 No valid recipients")
        else:
            self.write_line("354 End data with <CR><LF>.<CR><LF>")
            self.state = SessionState.DATA
            self.reader = DataReader(self.smtp.max_message_size)
            # The trace header goes out now, so that the hop's DATA and its 354 overlap with
            # the sender's first lines instead of holding them up.
            self.out.append(MessageData(self.txn, self.received_header()))
            self.data(self.buffer.rest())

    def data(self, data: bytes) -> None:
        assert self.reader is not None and self.txn is not None
        content, rest = self.reader.feed(data)
        if content:
            self.out.append(MessageData(self.txn, content))
        if rest is None:
            return
        reader, self.reader = self.reader, None
        self.buffer.feed(rest)
        if reader.problem is not None:
            self.out.append(MessageRefused(self.txn, reader.size, reader.problem))
            self.answer(reader.problem, end_transaction=True)
            return
        self.state = SessionState.BUSY
        self.out.append(EndOfMessage(self.txn, reader.size))

    def received_header(self) -> bytes:
        """RFC 5321 4.4 trace; `for` only with one recipient, not to reveal the others."""
        assert self.txn is not None
        # RFC 3848: ESMTP, plus S with TLS, plus A once authenticated.
        with_ = "ESMTP" + "S" * self.tls_active + "A" * (self.user is not None) \
            if self.esmtp else "SMTP"
        target = f"\r\n\tfor <{self.txn.recipients[0]}>" if len(self.txn.recipients) == 1 else ""
        peer = f"IPv6:{self.peer_host}" if ":" in self.peer_host else self.peer_host
        return (f"Received: from {self.helo} ([{peer}])\r\n"
                f"\tby {self.hostname} (migrating-proxy) with {with_} id {secrets.token_hex(8)}"
                f"{target};\r\n\t{formatdate(localtime=True)}\r\n").encode("ascii")

    def do_RSET(self, arg: bytes) -> None:
        self.end_transaction()
        self.write_line("250 2.0.0 Ok")

    def do_NOOP(self, arg: bytes) -> None:
        self.write_line("250 2.0.0 Ok")

    def do_VRFY(self, arg: bytes) -> None:
        # Never confirms an address: that would hand out the user list.
        self.write_line("252 2.5.2 Cannot VRFY user, but will accept message and attempt delivery")

    def do_QUIT(self, arg: bytes) -> None:
        self.write_line(f"221 2.0.0 {self.hostname} closing connection")
        self.end_transaction()
        self.close()

    def do_STARTTLS(self, arg: bytes) -> None:
        if not self.settings.tls_available:
            self.error("454 4.7.0 TLS not available")
        elif self.tls_active:
            self.error("503 5.5.1 TLS already active")
        elif arg:
            self.error("501 5.5.4 Syntax: STARTTLS")
        else:
            self.write_line("220 2.0.0 Ready to start TLS")
            self.end_transaction()
            self.helo = self.user = None  # RFC 3207 4.2: nothing from before TLS counts
            self.start_tls()  # drops whatever was pipelined behind STARTTLS

    def do_AUTH(self, arg: bytes) -> None:
        if not self.smtp.submission:
            self.error("503 5.5.1 AUTH not available on this port")
            return
        words = arg.split()
        mechanism = words[0].decode("ascii", "replace").upper() if words else ""
        if self.helo is None or not self.esmtp:
            self.error("503 5.5.1 Send EHLO first")
        elif self.user is not None or self.txn is not None:
            self.error("503 5.5.1 Already authenticated or in a mail transaction")
        elif not self.plaintext_login_allowed:
            self.error("530 5.7.0 Must issue a STARTTLS command first")
        elif mechanism not in MECHANISMS or len(words) > 2:
            self.error("504 5.5.4 Unrecognized authentication type")
        else:
            self.begin_sasl(mechanism, words[1] if len(words) == 2 else None)

    def sasl_aborted(self, step: Aborted) -> None:
        self.error("501 5.0.0 Authentication cancelled" if step.cancelled
                   else f"501 5.5.2 {step.message}")

    def do_BDAT(self, arg: bytes) -> None:
        self.error("502 5.5.1 CHUNKING not supported")

    def end_transaction(self) -> None:
        txn, self.txn = self.txn, None
        if txn is not None:
            self.out.append(EndTransaction(txn))
