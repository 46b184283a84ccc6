"""Inbound SMTP, the migrating domains' MX: route each recipient, pass the message on, queue none.

Our own small protocol on `ProxySession` (its framing, limits, idle timeout and STARTTLS),
not twisted.mail.smtp: that server lets an over-long line inside DATA fall back into command
mode, buffers without bound and runs commands pipelined with STARTTLS (see
/work/shared/notes/twisted-mail.md).

Nothing lost without a queue: the sender gets 250 for DATA only once the next hop accepted the
message, and the hop's 4xx/5xx otherwise, so a failure stays with the sender, who retries or
bounces. RCPT is forwarded to the hop as it arrives, so a hop refusing one recipient is seen at
RCPT time, before anything was accepted.

One next hop per transaction. SMTP has one DATA reply for all recipients, so a transaction
that spans two hops (or one LMTP hop with several recipients, which answers DATA per
recipient) could end with one copy delivered and another refused temporarily; whatever we
answered, the sender would either re-send a copy that was delivered or drop one that was not.
So the first accepted recipient binds the transaction to its hop, and a recipient for another
hop, or a second recipient for an LMTP hop, gets `452 4.5.3` (RFC 5321 4.5.3.1.10: the sender
delivers to the accepted recipients and retries the others in a later transaction). Each
transaction then ends in exactly one verdict that is true for all its recipients.

DATA is strict (RFC 5321 2.3.8, 4.1.1.4, 4.5.2, 4.5.3.1.6) so that no next hop can read the
message differently from us (SMTP smuggling): the end of data is `CRLF . CRLF` and nothing
else. A bare LF or bare CR, a NUL, or a line over 998 characters never ends the data and never
returns to command mode: the rest of the message is read and discarded, and the whole message
is refused at its end with 554 5.6.0 (552 5.3.4 when it exceeds SIZE).
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

import structlog
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool

from migrating_proxy.delivery import NextHop
from migrating_proxy.endpoints import Endpoint
from migrating_proxy.frontends.session import FrontendContext, LineTooLong, ProxySession
from migrating_proxy.login import Outcome
from migrating_proxy.routing import Route, route

log = structlog.get_logger("migrating_proxy.smtp")

MAX_TEXT_LINE = 1000  # octets including CRLF, after dot-unstuffing (RFC 5321 4.5.3.1.6)
MAX_ERRORS = 10
PATH = re.compile(rb"(?i)(FROM|TO):\s?<([^<>\s]*)>((?: [^ ]+)*)\s*")
DOMAIN = re.compile(r"[A-Za-z0-9\[\]:._-]+")
REFUSED_BARE_LF = "554 5.6.0 Message refused: bare LF or CR (lines must end with CRLF)"
REFUSED_LONG_LINE = "554 5.6.0 Message refused: line longer than 998 characters"
REFUSED_NUL = "554 5.6.0 Message refused: NUL character"
TOO_BIG = "552 5.3.4 Message size exceeds fixed limit"


class DataReader:
    """One DATA section: CRLF lines only, dot-unstuffed, bounded; refusals kept for the end."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.message = bytearray()
        self.pending = bytearray()
        # The next byte starts a line only right after CRLF: after a bare LF it does not, or
        # `\n.\r\n` would end the data here but not at a next hop that reads only CRLF.
        self.line_start = True
        self.problem: str | None = None  # the reply refusing the message, once known

    def feed(self, data: bytes) -> bytes | None:
        """Take bytes; return what follows the final `.` line once it arrived, else None.

        Works on all complete lines at once with bytes methods (C speed), not line by line:
        a 20 KB message costs a handful of calls instead of a few hundred."""
        self.pending += data
        last = self.pending.rfind(b"\n")
        if last < 0:
            self.check_partial_line()
            return None
        block = bytes(self.pending[: last + 1])
        end = self.terminator(block)
        if end is None:
            del self.pending[: last + 1]
            self.take(block)
            self.check_partial_line()
            return None
        self.take(block[:end])
        rest = bytes(self.pending[end + 3:])  # what follows `.` CRLF
        self.pending = bytearray()
        return rest

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

    def take(self, lines: bytes) -> None:
        """Whole lines of content (maybe none): check, dot-unstuff, keep."""
        if not lines:
            return
        starts_line, self.line_start = self.line_start, lines.endswith(b"\r\n")
        crlf = lines.count(b"\r\n")
        if lines.count(b"\n") != crlf or lines.count(b"\r") != crlf:
            self.refuse(REFUSED_BARE_LF)
        if b"\0" in lines:
            self.refuse(REFUSED_NUL)
        if starts_line and lines.startswith(b"."):
            lines = lines[1:]
        lines = lines.replace(b"\r\n.", b"\r\n")
        longest = max(map(len, lines.split(b"\r\n")))
        if not starts_line or longest > MAX_TEXT_LINE - 2:
            self.refuse(REFUSED_LONG_LINE)
        if len(self.message) + len(lines) > self.max_size:
            self.refuse(TOO_BIG)
        if self.problem is None:
            self.message += lines

    def refuse(self, reply: str) -> None:
        if self.problem is None:
            self.problem = reply
            self.message = bytearray()  # a refused message is not kept, only read to its end


@dataclass
class Transaction:
    sender: str
    options: list[str]  # MAIL parameters to pass on (SIZE=, BODY=)
    hop: NextHop | None = None
    recipients: list[str] = field(default_factory=list)


class SMTPSession(ProxySession):
    protocol_name = "smtp"

    def __init__(self, ctx: FrontendContext, implicit_tls: bool = False) -> None:
        super().__init__(ctx, implicit_tls)
        self.smtp = ctx.config.smtp
        self.hostname = self.smtp.banner_name
        self.helo: str | None = None
        self.esmtp = False
        self.txn: Transaction | None = None
        self.reader: DataReader | None = None
        self.errors = 0
        self.user: str | None = None  # the authenticated address (submission only)
        # The last transaction's hop connection, kept for the next transaction of this
        # session: a sender with many messages pays one connect + LHLO, not one per message.
        self.spare: NextHop | None = None
        # Recipients found to have an account, for the rest of the session: a sender with
        # many messages for one user pays one account lookup, not one per message. Only
        # these: "no account" is asked again each time, so an account created meanwhile
        # gets its mail at once instead of the old server's.
        self.local_routes: dict[str, Route] = {}

    # -- session plumbing --------------------------------------------------------------
    def greet(self) -> None:
        self.write_line(f"220 {self.hostname} ESMTP migrating-proxy")

    def say_bye(self, message: str) -> None:
        self.write_line(f"421 4.4.2 {self.hostname} {message}")

    def answer_login_ok(self, capabilities: str) -> None:
        raise AssertionError("inbound SMTP has no login")

    def answer_login_failed(self, outcome: Outcome) -> None:
        raise AssertionError("inbound SMTP has no login")

    def sasl_response(self, line: bytes) -> None:
        raise AssertionError("inbound SMTP has no login")

    def dataReceived(self, data: bytes) -> None:
        if self.state == "data":
            self.resetTimeout()
            self.feed_data(data)
        else:
            super().dataReceived(data)

    def process_safely(self) -> None:
        try:
            self.process_buffer()
        except LineTooLong:
            # No resynchronisation on a stream that broke the framing: answer once and hang up.
            self.write_line("500 5.5.2 Line too long, closing connection")
            self.buffer.clear()
            self.close()
            self.state = "closed"

    def connectionLost(self, reason: Any = None) -> None:
        busy = self.state == "busy"
        super().connectionLost()
        if not busy:  # else the thread still uses the hop; `resume` closes it afterwards
            self.release_hops()

    def in_thread(self, function: Any, *args: Any) -> defer.Deferred[Any]:
        """Run blocking work (store lookups, next hops) off the reactor; commands wait."""
        self.state = "busy"
        self.setTimeout(None)  # each step with a next hop has its own timeout
        return deferToThreadPool(self.ctx.reactor, self.ctx.threadpool, function, *args)

    def resume(self, reply: str) -> None:
        """Answer the command that went to a thread, then run what was pipelined behind it."""
        if self.state == "closed":
            self.release_hops()
            return
        self.state = "preauth"
        self.write_line(reply)
        self.setTimeout(self.limits.idle_timeout or None)
        self.process_safely()

    def error(self, reply: str) -> None:
        self.errors += 1
        if self.errors >= MAX_ERRORS:
            self.close_with_error("Too many errors, closing connection")
        else:
            self.write_line(reply)

    # -- commands ------------------------------------------------------------------------
    def command_line(self, line: bytes) -> None:
        verb, _, arg = line.partition(b" ")
        handler = getattr(self, f"do_{verb.decode('ascii').upper()}", None) \
            if verb.isalpha() and verb.isascii() else None
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

    def extensions(self) -> list[str]:
        extensions = ["PIPELINING", f"SIZE {self.smtp.max_message_size}", "8BITMIME",
                      "ENHANCEDSTATUSCODES"]
        if self.ctx.tls_options is not None and not self.tls_active:
            extensions.append("STARTTLS")
        return extensions

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
            problem = self.check_sender(match[2].decode("ascii")) or problem
            if problem:
                self.error(problem)
            else:
                self.txn = Transaction(match[2].decode("ascii"), options)
                self.write_line("250 2.1.0 Ok")

    def check_sender(self, sender: str) -> str:
        """A refusal for this envelope sender, or "". Inbound mail may come from anyone."""
        return ""

    def mail_options(self, params: list[str]) -> tuple[list[str], str]:
        """(options to pass on, refusal or "") for MAIL's ESMTP parameters."""
        for param in params:
            key, _, value = param.upper().partition("=")
            if key == "SIZE" and value.isdigit():
                if int(value) > self.smtp.max_message_size:
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
            address = match[2].decode("ascii", "replace")
            self.in_thread(self.add_recipient, self.txn, address).addCallbacks(
                self.resume, self.internal_error)

    def add_recipient(self, txn: Transaction, address: str) -> str:
        """In a thread: route, then ask the hop. Returns the reply for the sender."""
        found = self.route_recipient(address)
        if found.next_hop is None:
            return found.reply
        if txn.hop is not None and (
            txn.hop.endpoint != found.next_hop
            or len(txn.recipients) >= (txn.hop.max_recipients or self.smtp.max_recipients)
        ):
            # Another next hop, or one more LMTP recipient: a later transaction (see above).
            return "452 4.5.3 Too many recipients for this transaction, send separately"
        if txn.hop is None:
            hop = self.hop_for(found.next_hop, found.verify_tls)
            opened, reply = hop.open(txn.sender, txn.options, found.address)
            if reply is None:  # MAIL not accepted
                self.spare = hop  # closed by open() if unusable; else kept for later
                return opened
            txn.hop = hop
        else:
            reply = txn.hop.rcpt(found.address)
        if reply.startswith("2"):
            txn.recipients.append(found.address)
        return reply

    def route_recipient(self, address: str) -> Route:
        """In a thread: where this recipient's copy goes (see migrating_proxy.routing)."""
        found = self.local_routes.get(address)
        if found is None:
            found = route(self.ctx.login_service.accounts, self.ctx.config.backend.delivery,
                          address)
            if found.local and len(self.local_routes) < self.smtp.max_recipients:
                self.local_routes[address] = found
        return found

    def hop_for(self, endpoint: Endpoint, verify_tls: bool) -> NextHop:
        """In a thread: the spare connection if it goes to the same hop, else a new one."""
        spare, self.spare = self.spare, None
        if spare is not None and (spare.endpoint, spare.verify_tls) == (endpoint, verify_tls):
            return spare
        if spare is not None:
            spare.close()
        return NextHop(endpoint, self.hostname, self.smtp.timeout, verify_tls)

    def do_DATA(self, arg: bytes) -> None:
        if self.txn is None:
            self.error("503 5.5.1 Need MAIL first")
        elif not self.txn.recipients:
            self.error("554 5.5.1 No valid recipients")
        else:
            self.write_line("354 End data with <CR><LF>.<CR><LF>")
            self.state = "data"
            self.reader = DataReader(self.smtp.max_message_size)
            self.setTimeout(self.smtp.data_timeout)
            rest, self.buffer = bytes(self.buffer), bytearray()
            self.feed_data(rest)

    def feed_data(self, data: bytes) -> None:
        assert self.reader is not None
        rest = self.reader.feed(data)
        if rest is None:
            return
        reader, self.reader, self.buffer = self.reader, None, bytearray(rest)
        if reader.problem is not None:
            self.log_message(len(reader.message), reader.problem)
            self.end_transaction()
            self.resume(reader.problem)
            return
        message = self.received_header() + bytes(reader.message)
        self.in_thread(self.deliver, self.txn, message).addCallbacks(
            self.delivered, self.internal_error, callbackArgs=(len(message),))

    @staticmethod
    def deliver(txn: Transaction, message: bytes) -> str:
        assert txn.hop is not None
        return txn.hop.data(message)

    def delivered(self, reply: str, size: int) -> None:
        self.log_message(size, reply)
        self.end_transaction()
        self.resume(reply if not reply.startswith("2") else "250 2.0.0 Ok: delivered")

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
        self.state = "closed"

    def do_STARTTLS(self, arg: bytes) -> None:
        if self.ctx.tls_options is None:
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
        self.error("503 5.5.1 AUTH not available on this port")

    def do_BDAT(self, arg: bytes) -> None:
        self.error("502 5.5.1 CHUNKING not supported")

    # -- transaction end -----------------------------------------------------------------
    def end_transaction(self) -> None:
        """Forget the transaction; its hop connection becomes the spare (reset when reused)."""
        txn, self.txn = self.txn, None
        if txn is None or txn.hop is None:
            return
        if self.state == "closed" or self.spare is not None:
            self.close_hop(txn.hop)
        else:
            self.spare = txn.hop

    def release_hops(self) -> None:
        self.end_transaction()
        spare, self.spare = self.spare, None
        if spare is not None:
            self.close_hop(spare)

    def close_hop(self, hop: NextHop) -> None:
        # QUIT at the hop is blocking; nobody waits for it.
        deferToThreadPool(self.ctx.reactor, self.ctx.threadpool, hop.close)

    def internal_error(self, failure: Any) -> None:
        log.error("smtp_internal_error", peer=self.peer_host, error=failure.getErrorMessage(),
                  kind=failure.type.__name__)
        self.end_transaction()
        self.resume("451 4.3.0 Internal error, try again later")

    def log_message(self, size: int, reply: str) -> None:
        assert self.txn is not None
        hop = self.txn.hop.endpoint.url if self.txn.hop else None
        event = log.info if reply.startswith("2") else log.warning
        event("smtp_message", peer=self.peer_host, sender=self.txn.sender,
              recipients=len(self.txn.recipients), next_hop=hop, size=size, reply=reply)

