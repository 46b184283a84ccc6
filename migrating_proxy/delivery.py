"""The client side of inbound mail: one transaction with one next hop, on the reactor.

The SMTP front-end opens a `NextHop` at the first recipient it routes to a hop, forwards each
RCPT as it arrives (so the sender sees the hop's own per-recipient verdict at RCPT time, before
anything is accepted), then streams the message while the sender sends it and passes the hop's
reply to the final dot back. Nothing is ever queued here: the front-end answers the sender with
what the hop said.

Streaming, bounded: the message goes to the hop in the pieces it arrives in (whole lines,
dot-stuffed here). Until the hop said 354 at most `HIGH_WATER` bytes wait; after that the hop
connection's own send buffer decides, through Twisted's producer API, when the sender's
connection stops being read. So a transaction holds a few hundred KB whatever the message size
and however slow the hop. A message that must not be delivered after all (the sender broke the
DATA rules mid-way, or left) is abandoned by dropping the hop connection before the final dot:
SMTP and LMTP servers deliver nothing from an unfinished DATA (RFC 5321 4.1.1.4).

Twisted rather than smtplib in a thread: a thread per transaction cannot stream with
backpressure into a reactor-driven session, and the thread pool capped concurrent deliveries.
LMTP answers the final dot once per recipient and SMTP cannot relay that: the front-end never
gives an LMTP hop more than one recipient per transaction (`max_recipients`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from zope.interface import implementer

from migrating_proxy.cacerts import VERIFIED, UpstreamTrust
from migrating_proxy.endpoints import Endpoint
from migrating_proxy.frontends.tls import client_options

UNREACHABLE = "451 4.4.1 Next hop not reachable, try again later"
LOST = "451 4.4.2 Connection to next hop lost, try again later"
MAX_REPLY = 65536  # octets of one reply: far more than any server's EHLO list
HIGH_WATER = 256 * 1024  # message octets kept while the hop has not said 354 yet


def reply_line(code: int, message: bytes | str) -> str:
    """The hop's reply as one line we can pass back: its class kept, its text made safe."""
    text = message.decode("utf-8", "replace") if isinstance(message, bytes) else message
    if not (text.isascii() and text.isprintable()):  # (the usual reply needs no filtering)
        text = "".join(c for c in text if " " <= c <= "~")
    text = " ".join(text.split())
    if code < 200 or code > 599 or 300 <= code < 400 or code == 421:
        return LOST  # a 421 passed on would tell our client that *we* are closing
    klass = code // 100
    if not (len(text) > 5 and text[0] == str(klass) and text[1] == "."):
        text = f"{klass}.0.0 {text}".rstrip()  # we advertise ENHANCEDSTATUSCODES
    return f"{code} {text}"


def stuff(lines: bytes) -> bytes:
    """DATA's wire form of whole CRLF lines that start a line: each leading `.` doubled."""
    stuffed = lines.replace(b"\r\n.", b"\r\n..")
    return b"." + stuffed if stuffed.startswith(b".") else stuffed


def dot_stuff(message: bytes) -> bytes:
    """DATA's wire form of a whole message, end-of-data line included (RFC 5321 4.5.2)."""
    if not message.endswith(b"\r\n") and message:
        message += b"\r\n"
    return stuff(message) + b".\r\n"


class HopLost(Exception):
    """The connection to the hop failed, closed, timed out, or stopped speaking SMTP."""


@dataclass(frozen=True)
class Reply:
    code: int
    text: bytes  # the lines' texts joined with LF, as smtplib gives them

    @property
    def line(self) -> str:
        return reply_line(self.code, self.text)


class HopProtocol(protocol.Protocol):
    """Reads replies and hands each to the oldest waiter: commands may be pipelined and their
    replies still go where they belong. Every wait is bounded by `timeout`."""

    def __init__(self, clock: Any, timeout: float) -> None:
        self.clock, self.timeout = clock, timeout
        self.waiting: deque[defer.Deferred[Reply]] = deque()
        self.buffer = bytearray()
        self.texts: list[bytes] = []  # the lines so far of a multi-line reply
        self.timer: Any = None
        self.deadline = 0.0
        self.lost = False
        self.greeting = self.expect()

    def connectionMade(self) -> None:
        # Without it Nagle holds a write back until the hop acknowledges the last small one
        # (our trace header, sent on its own at the 354), and the hop delays that ACK: up to
        # 40 ms per message. Writes are coalesced per reactor turn anyway.
        self.transport.setTcpNoDelay(True)  # type: ignore[union-attr]

    def expect(self) -> defer.Deferred[Reply]:
        """The next reply not yet claimed (fails with HopLost)."""
        waiter: defer.Deferred[Reply] = defer.Deferred()
        if self.lost:
            waiter.errback(HopLost("connection closed"))
            return waiter
        self.waiting.append(waiter)
        self._arm()
        return waiter

    def command(self, *lines: str) -> list[defer.Deferred[Reply]]:
        """Send lines in one write (pipelined when more than one); one waiter each."""
        if not self.lost and self.transport is not None:
            self.transport.write("".join(f"{line}\r\n" for line in lines).encode())
        return [self.expect() for _ in lines]

    def start_tls(self, host: str, trust: UpstreamTrust) -> None:
        self.buffer.clear()  # nothing the hop sent in clear text counts (CVE-2011-0411)
        options = client_options(host, trust.verify, trust.ca_pem)
        self.transport.startTLS(options)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while not self.lost and (end := self.buffer.find(b"\n")) >= 0:
            line = bytes(self.buffer[:end]).rstrip(b"\r")
            del self.buffer[: end + 1]
            self._line(line)
        if len(self.buffer) + sum(map(len, self.texts)) > MAX_REPLY:
            self.abort()

    def _line(self, line: bytes) -> None:
        if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-"):
            self.abort()  # not SMTP: nothing it says can be trusted any more
            return
        self.texts.append(line[4:])
        if line[3:4] == b"-":
            return
        reply, self.texts = Reply(int(line[:3]), b"\n".join(self.texts)), []
        if self.waiting:  # else unsolicited (a 421 before an idle close): the close follows
            self.waiting.popleft().callback(reply)
            self._arm()

    def _arm(self) -> None:
        """While some reply is awaited, the hop has `timeout` seconds from the last reply (or
        the first wait). Lazily: a reply moves the deadline, and the one timer, when it
        fires, looks again; cancelling and re-scheduling per reply cost more than a reply."""
        self.deadline = self.clock.seconds() + self.timeout
        if self.waiting and (self.timer is None or not self.timer.active()):
            self.timer = self.clock.callLater(self.timeout, self._expired)

    def _expired(self) -> None:
        self.timer = None
        if not self.waiting or self.lost:
            return
        left = self.deadline - self.clock.seconds()
        if left > 0:
            self.timer = self.clock.callLater(left, self._expired)
        else:
            self.abort()

    def abort(self) -> None:
        if self.transport is not None and not self.lost:
            # Lost from now on: Twisted reports the loss a turn later, and no reply still in
            # the buffer, nor a command sent meanwhile, may use this connection.
            self.lost = True
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.lost = True
        waiting, self.waiting = self.waiting, deque()
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        for waiter in waiting:
            waiter.errback(HopLost(reason.getErrorMessage()))


class _HopFactory(protocol.ClientFactory):
    def __init__(self, clock: Any, timeout: float) -> None:
        self.clock, self.timeout = clock, timeout
        self.connected: defer.Deferred[HopProtocol] = defer.Deferred()

    def buildProtocol(self, addr: Any) -> HopProtocol:
        hop = HopProtocol(self.clock, self.timeout)
        self.connected.callback(hop)
        return hop

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.connected.errback(HopLost(reason.getErrorMessage()))


def connect(reactor: Any, endpoint: Endpoint, timeout: float,
            trust: UpstreamTrust) -> defer.Deferred[HopProtocol]:
    factory = _HopFactory(reactor, timeout)
    if endpoint.tls == "implicit":
        reactor.connectSSL(endpoint.host, endpoint.port, factory,
                           client_options(endpoint.host, trust.verify, trust.ca_pem),
                           timeout=timeout)
    else:
        reactor.connectTCP(endpoint.host, endpoint.port, factory, timeout=timeout)
    return factory.connected


@implementer(IPushProducer)
class Valve:
    """The sender's connection, read only while the message can go somewhere: paused while
    the hop has not said 354 and too much waits ("no 354 yet"), or while the hop connection's
    send buffer is full (Twisted calls pause/resumeProducing). Never closes it: a lost hop is
    a 4xx for the sender at the end of DATA, not a dropped connection."""

    def __init__(self, sender: Any) -> None:
        self.sender = sender
        self.reasons: set[str] = set()

    def hold(self, reason: str) -> None:
        if not self.reasons:
            self.sender.pauseProducing()
        self.reasons.add(reason)

    def release(self, reason: str | None = None) -> None:
        """Release one reason, or (None) all of them."""
        if not self.reasons:
            return
        self.reasons = set() if reason is None else self.reasons - {reason}
        if not self.reasons:
            self.sender.resumeProducing()

    def pauseProducing(self) -> None:
        self.hold("hop busy")

    def resumeProducing(self) -> None:
        self.release("hop busy")

    def stopProducing(self) -> None:
        self.release()


class NextHop:
    """One connection to a next hop, kept between a session's transactions."""

    def __init__(self, reactor: Any, endpoint: Endpoint, helo_name: str, timeout: float,
                 trust: UpstreamTrust = VERIFIED) -> None:
        self.reactor, self.endpoint, self.helo_name = reactor, endpoint, helo_name
        self.timeout, self.trust = timeout, trust
        self.proto: HopProtocol | None = None
        self.extensions: set[str] = set()
        self.dirty = False  # a transaction was begun and not finished by DATA's reply
        self.message: _Message | None = None  # the message being streamed, once DATA began

    @property
    def max_recipients(self) -> int | None:
        """LMTP answers DATA once per recipient and SMTP cannot relay that: one at a time."""
        return 1 if self.endpoint.protocol == "lmtp" else None

    @property
    def reusable(self) -> bool:
        """Whether a later transaction can use this connection (after RSET if dirty)."""
        return self.proto is not None and not self.proto.lost and self.message is None

    # -- the envelope --------------------------------------------------------------------
    async def open(self, sender: str, options: list[str], address: str | None = None
                   ) -> tuple[str, str | None]:
        """MAIL FROM, on the connection kept from an earlier transaction if it still works,
        and RCPT TO for the first recipient (`address`) if MAIL was accepted.

        Returns the reply lines of both (2xx for MAIL: ready for recipients); the RCPT's is
        None when it was not asked. To a hop that advertises PIPELINING (Dovecot's LMTP
        does) the two go in one write, a round trip less (RFC 2920); RCPT's reply is still
        the hop's own and is read after MAIL's."""
        if self.reusable:
            try:
                if self.dirty:  # the last transaction did not end in a delivery: start clean
                    await self._reply("RSET")
                replies = await self._mail(sender, options, address)
                if replies[0] != LOST:  # e.g. 421: the hop closes idle connections
                    return replies
            except HopLost:
                pass
        self.close()  # the hop may close an idle connection: connect again
        try:
            self.proto = await connect(self.reactor, self.endpoint, self.timeout,
                                       self.trust)
            await self._hello()
            replies = await self._mail(sender, options, address)
        except HopLost:
            # Includes a hop that cannot do the STARTTLS its URL asks for: never fall back to
            # clear text; the sender retries and an operator sees the warning in the log.
            self.close()
            return UNREACHABLE, None
        if replies[0] == LOST:
            self.close()
        return replies

    async def _hello(self) -> None:
        """Greeting, LHLO/EHLO (HELO for a pre-ESMTP server), STARTTLS if the URL says so."""
        assert self.proto is not None
        if (await self.proto.greeting).code != 220:
            raise HopLost("not greeted")
        await self._ehlo()
        if self.endpoint.tls == "starttls":
            if "starttls" not in self.extensions or (await self._reply("STARTTLS")).code != 220:
                raise HopLost("STARTTLS refused")
            self.proto.start_tls(self.endpoint.host, self.trust)
            await self._ehlo()

    async def _ehlo(self) -> None:
        verb = "LHLO" if self.endpoint.protocol == "lmtp" else "EHLO"
        reply = await self._reply(f"{verb} {self.helo_name}")
        if reply.code == 250:
            lines = reply.text.decode("ascii", "replace").split("\n")[1:]
            self.extensions = {line.split(" ", 1)[0].lower() for line in lines}
        elif verb == "EHLO" and (await self._reply(f"HELO {self.helo_name}")).code == 250:
            self.extensions = set()
        else:
            raise HopLost("hello refused")

    async def _mail(self, sender: str, options: list[str], address: str | None
                    ) -> tuple[str, str | None]:
        """MAIL (and RCPT). Raises HopLost if the connection fails before MAIL's reply."""
        params = "".join(f" {option}" for option in self._supported(options))
        mail = f"MAIL FROM:<{sender}>{params}"
        if address is None or "pipelining" not in self.extensions:
            self.dirty = True
            reply = (await self._reply(mail)).line
            if address is None or not reply.startswith("2"):
                return reply, None
            return reply, await self.rcpt(address)
        first, second = self._proto().command(mail, f"RCPT TO:<{address}>")
        second.addErrback(lambda _failure: Reply(0, b""))  # awaited only if MAIL succeeds
        self.dirty = True
        reply = (await first).line
        if reply == LOST:
            return reply, None  # the caller closes this connection
        # RCPT's reply comes even when MAIL was refused (then 503): read it to stay in step.
        rcpt = await self._step(second)
        return reply, (rcpt if reply.startswith("2") else None)

    async def rcpt(self, address: str) -> str:
        if not self.reusable:
            return LOST
        [waiter] = self._proto().command(f"RCPT TO:<{address}>")
        return await self._step(waiter)

    # -- the message ---------------------------------------------------------------------
    def send(self, lines: bytes, sender: Any) -> None:
        """Whole CRLF lines of the message (not dot-stuffed), the first call after the
        envelope starting DATA. `sender` is the client's transport: paused while the hop
        cannot take more (see `Valve`)."""
        if self.message is None:
            self.dirty = True
            self.message = _Message(self.proto, Valve(sender))
        self.message.send(stuff(lines))

    async def end_data(self) -> str:
        """The final dot; the hop's verdict."""
        assert self.message is not None  # the dialogue always sends its trace header first
        message, self.message = self.message, None
        verdict = await message.finish()
        if verdict == LOST:
            self.close()
        self.dirty = not verdict.startswith("2")
        return verdict

    def abandon(self) -> None:
        """Give up the transaction; a message begun is dropped with the connection."""
        if self.message is not None:
            self.message.valve.release()
            self.message = None
            if self.proto is not None:
                self.proto.abort()  # before the final dot: the hop delivers nothing
            self.proto = None

    def close(self) -> None:
        """QUIT and let go; nobody waits for it."""
        self.abandon()
        proto, self.proto = self.proto, None
        if proto is None or proto.lost:
            return
        [waiter] = proto.command("QUIT")
        waiter.addBoth(lambda _result: proto.transport.loseConnection())  # type: ignore[union-attr]

    # -- helpers -------------------------------------------------------------------------
    def _proto(self) -> HopProtocol:
        if self.proto is None:
            raise HopLost("not connected")
        return self.proto

    async def _reply(self, line: str) -> Reply:
        [waiter] = self._proto().command(line)
        return await waiter

    async def _step(self, waiter: defer.Deferred[Reply]) -> str:
        """A reply as the line for the sender; LOST (and the connection closed) on failure."""
        try:
            reply = (await waiter).line
        except HopLost:
            reply = LOST
        if reply == LOST:
            self.close()  # this connection is of no further use
        return reply

    def _supported(self, options: list[str]) -> list[str]:
        """Pass SIZE= and BODY= on only to a hop that advertises them (RFC 1870, RFC 6152)."""
        wanted = {"SIZE": "size", "BODY": "8bitmime"}
        return [o for o in options
                if wanted.get(o.partition("=")[0].upper(), "-") in self.extensions]


class _Message:
    """One DATA at the hop: held until its 354, then written as it comes; the final dot."""

    def __init__(self, proto: HopProtocol | None, valve: Valve) -> None:
        self.proto, self.valve = proto, valve
        self.pending: list[bytes] = []  # before the 354
        self.pending_size = 0
        self.verdict: str | None = None  # known early: DATA refused, or the hop lost
        self.transport: Any = None  # the hop's, once it said 354
        self.started: defer.Deferred[None] = defer.Deferred()
        if proto is None:
            self._decided(LOST)
            return
        [waiter] = proto.command("DATA")
        waiter.addCallbacks(self._go_ahead, self._lost)

    def send(self, wire: bytes) -> None:
        if self.verdict is not None or not wire:
            return  # the hop decided already: the rest is read and dropped
        if self.transport is not None:
            self.transport.write(wire)
            return
        self.pending.append(wire)
        self.pending_size += len(wire)
        if self.pending_size > HIGH_WATER and self.valve.sender is not None:
            self.valve.hold("no 354 yet")

    def _go_ahead(self, reply: Reply) -> None:
        assert self.proto is not None
        if reply.code != 354 or self.proto.transport is None:
            self._decided(reply.line if reply.code != 354 else LOST)
            return
        self.transport = self.proto.transport
        if self.valve.sender is not None:
            self.transport.registerProducer(self.valve, True)
        self.transport.writeSequence(self.pending)
        self.pending = []
        self.valve.release("no 354 yet")
        self.started.callback(None)

    def _lost(self, failure: Failure) -> None:
        self._decided(LOST)

    def _decided(self, verdict: str) -> None:
        self.verdict, self.pending = verdict, []
        self.valve.release()
        self.started.callback(None)

    async def finish(self) -> str:
        await self.started
        if self.verdict is None:
            assert self.proto is not None
            self.transport.write(b".\r\n")
            try:
                self.verdict = (await self.proto.expect()).line
            except HopLost:
                self.verdict = LOST
        self._unregister()
        return self.verdict

    def _unregister(self) -> None:
        if self.transport is not None and self.valve.sender is not None:
            self.transport.unregisterProducer()
        self.valve.release()
