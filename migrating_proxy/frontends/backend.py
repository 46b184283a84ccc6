"""Logging in to the upstream a session is served by, then handing the connection to the relay.

The upstream is whatever the login decision named (`migrating_proxy.upstream.Upstream`): the
new store, or the user's old server during a transparent cutover. One small client protocol per
mail protocol, in two steps so the slow part overlaps the login decision: `open_upstream`
connects and waits for the greeting while the password is still being checked (the store's
greeting costs more than the proxy's whole decision); `UpstreamConnection.log_in` then
authenticates and fires with a `BackendSession`. After that the protocol only forwards bytes to
`forward`.

How it logs in: with SASL PLAIN when acting through a master user (the only way to name the
user as authorization identity) and at the store; at an old server with the user's own
credentials, with the protocol's basic login (IMAP `AUTHENTICATE PLAIN` when offered, else
`LOGIN`; POP3 `USER`/`PASS`), which every server has and which the old-server check itself
uses. `starttls` endpoints (old servers only: the store refuses them in the configuration) get
STARTTLS/STLS first. Failures are `BackendRefused` (the server said no) or `BackendUnavailable`
(down, slow, or talking nonsense). Every step is bounded by the configured timeout.
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IReactorTCP, IReactorTime, ITransport
from twisted.python.failure import Failure

from migrating_proxy.endpoints import Endpoint
from migrating_proxy.frontends.tls import client_options
from migrating_proxy.upstream import Upstream

MAX_LOGIN_LINE = 65536  # the server's pre-login lines are short; anything longer is broken


class BackendUnavailable(Exception):
    """The upstream could not be reached or did not answer in time."""


class BackendRefused(Exception):
    """The upstream answered, and refused the login (an account not provisioned there?)."""


def sasl_plain(upstream: Upstream) -> str:
    """The SASL PLAIN response (RFC 4616), base64: authzid, authcid, password."""
    if upstream.master_user:
        raw = f"{upstream.login}\0{upstream.master_user}\0{upstream.password}"
    else:
        raw = f"\0{upstream.login}\0{upstream.password}"
    return base64.b64encode(raw.encode()).decode("ascii")


def uses_sasl_plain(upstream: Upstream) -> bool:
    return upstream.master_user is not None or upstream.served_by == "store"


@dataclass
class BackendSession:
    protocol: BackendProtocol
    capabilities: str  # IMAP: the upstream's post-login CAPABILITY list; POP3: empty
    pending: bytes  # upstream output that arrived right after the login answer

    @property
    def transport(self) -> ITransport:
        assert self.protocol.transport is not None
        return self.protocol.transport


class BackendProtocol(protocol.Protocol):
    """Shared plumbing: line buffer during login, STARTTLS, then plain forwarding."""

    def __init__(self, greeted: defer.Deferred[BackendProtocol], endpoint: Endpoint,
                 name: str, verify_tls: bool, ca_pem: str | None = None) -> None:
        self.greeted = greeted
        self.endpoint, self.name, self.verify_tls = endpoint, name, verify_tls
        self.ca_pem = ca_pem
        self.ready: defer.Deferred[BackendSession] | None = None  # set by log_in
        self.upstream: Upstream | None = None
        self.client_ip, self.client_port = "", 0
        self.capabilities = ""
        self.tls_started = endpoint.tls != "starttls"  # "none" and "implicit" need nothing
        self.buffer = b""
        self.forward: Callable[[bytes], None] | None = None  # the relay, once logged in
        self.on_lost: list = []  # callables run when the upstream side closes
        self.lost = False

    @property
    def waiting(self) -> defer.Deferred:  # type: ignore[type-arg]
        """What the next line from the upstream decides: the greeting, then the login."""
        return self.greeted if self.ready is None else self.ready

    def log_in(self, upstream: Upstream, client_ip: str = "",
               client_port: int = 0) -> defer.Deferred[BackendSession]:
        if self.lost:  # the server hung up while the decision was being made
            return defer.fail(BackendUnavailable(
                f"{self.name} closed the connection before login"))
        self.upstream, self.client_ip, self.client_port = upstream, client_ip, client_port
        self.ready = defer.Deferred()
        if self.tls_started:
            self.start_login()
        else:
            self.send(self.starttls_command)
        return self.ready

    def dataReceived(self, data: bytes) -> None:
        if self.forward is not None:
            self.forward(data)
            return
        self.buffer += data
        while not self.waiting.called and b"\n" in self.buffer:
            line, _, self.buffer = self.buffer.partition(b"\n")
            self.login_line(line.rstrip(b"\r").decode("utf-8", "replace"))
        if not self.waiting.called and len(self.buffer) > MAX_LOGIN_LINE:
            self.fail(BackendUnavailable(f"{self.name} sent an over-long line"))

    def start_tls(self) -> None:
        """The server said yes to STARTTLS/STLS: handshake, then log in over TLS."""
        assert self.transport is not None
        self.buffer = b""  # nothing the server sent in clear text counts (CVE-2011-0411)
        self.transport.startTLS(  # type: ignore[attr-defined]
            client_options(self.endpoint.host, self.verify_tls, self.ca_pem))
        self.tls_started = True
        self.capabilities = ""  # what it offered in clear text may change
        self.start_login()

    def login_line(self, text: str) -> None:
        raise NotImplementedError

    def start_login(self) -> None:
        raise NotImplementedError

    starttls_command = ""

    def greeting_ok(self, capabilities: str) -> None:
        self.capabilities = capabilities
        self.greeted.callback(self)

    def succeed(self, capabilities: str) -> None:
        assert self.ready is not None
        pending, self.buffer = self.buffer, b""
        self.ready.callback(BackendSession(self, capabilities, pending))

    def fail(self, exc: Exception) -> None:
        if not self.waiting.called:
            self.waiting.errback(exc)
        self.close()

    def refused(self, what: str, text: str) -> None:
        self.fail(BackendRefused(f"{self.name} refused {what}: {text[:120]}"))

    def unavailable(self, what: str, text: str) -> None:
        self.fail(BackendUnavailable(f"{self.name} failed {what}: {text[:120]}"))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    def send(self, line: str | bytes) -> None:
        assert self.transport is not None
        self.transport.write((line if isinstance(line, bytes) else line.encode()) + b"\r\n")

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.lost = True
        if not self.waiting.called:
            why = "" if reason.check(error.ConnectionDone) else f" ({reason.getErrorMessage()})"
            self.waiting.errback(BackendUnavailable(
                f"{self.name} closed the connection during login{why[:160]}"))
        for callback in self.on_lost:
            callback()

    def _upstream(self) -> Upstream:
        assert self.upstream is not None
        return self.upstream


class IMAPBackendLogin(BackendProtocol):
    """Tags: P0 STARTTLS, PC CAPABILITY before login, P1 ID, P2 the login, P3 CAPABILITY."""

    starttls_command = "P0 STARTTLS"

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.continuations: list[bytes] = []  # what each `+` from the server asks for next

    def login_line(self, text: str) -> None:
        if self.ready is None:
            self._greeting(text)
        elif text.startswith("+"):
            if not self.continuations:
                self.unavailable("login", f"unexpected continuation {text[:40]!r}")
                return
            self.send(self.continuations.pop(0))
        elif text.upper().startswith("* CAPABILITY "):
            self.capabilities = text[len("* CAPABILITY "):]
        elif text.startswith(("P0 ", "PC ", "P1 ", "P2 ", "P3 ")):
            self._tagged(text)

    def _greeting(self, text: str) -> None:
        if not text.upper().startswith("* OK"):
            self.fail(BackendUnavailable(
                f"unexpected greeting from {self.name}: {text[:80]!r}"))
            return
        self.greeting_ok(_response_code_capabilities(text) or "")

    def start_login(self) -> None:
        if not self.capabilities:
            self.send("PC CAPABILITY")  # not in the greeting, or changed by STARTTLS
            return
        upstream, caps = self._upstream(), self.capabilities.upper().split()
        if "ID" in caps:
            # Lets the store log the real client address (needs login_trusted_networks there).
            self.send(f'P1 ID ("x-originating-ip" "{self.client_ip}" '
                      f'"x-originating-port" "{self.client_port}")')
        if uses_sasl_plain(upstream) or "AUTH=PLAIN" in caps:
            if "SASL-IR" in caps:
                self.send(f"P2 AUTHENTICATE PLAIN {sasl_plain(upstream)}")
            else:
                self.send("P2 AUTHENTICATE PLAIN")
                self.continuations = [sasl_plain(upstream).encode()]
        else:
            first, *self.continuations = _login_command(upstream.login, upstream.password)
            self.send(first)
        self.capabilities = ""  # the pre-login list; the login answer brings the real one

    def _tagged(self, text: str) -> None:
        tag, _, rest = text.partition(" ")
        status = rest.split(" ", 1)[0].upper()
        if tag == "P1":
            return  # ID's answer does not matter
        if status != "OK":
            if tag == "P2":
                self.refused("login", rest)
            else:
                self.unavailable({"P0": "STARTTLS", "PC": "CAPABILITY",
                                  "P3": "CAPABILITY"}[tag], rest)
            return
        if tag == "P0":
            self.start_tls()
        elif tag == "PC":
            if not self.capabilities:
                self.unavailable("CAPABILITY", "no capabilities listed")
            else:
                self.start_login()
        else:  # P2 or P3
            caps = _response_code_capabilities(text)
            if tag == "P2" and caps is None and not self.capabilities:
                self.send("P3 CAPABILITY")  # the server did not say; ask
                return
            self.succeed(caps or self.capabilities)


def _login_command(user: str, password: str) -> list[bytes]:
    """`P2 LOGIN user password` as the segments to send: the first at once, each following one
    after a `+` continuation (synchronising literals for what a quoted string cannot carry)."""
    segments, current = [], b"P2 LOGIN"
    for value in (user.encode(), password.encode()):
        if _quotable(value):
            current += b' "' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
        else:
            segments.append(current + b" {%d}" % len(value))
            current = value
    segments.append(current)
    return segments


def _quotable(value: bytes) -> bool:
    return all(0x20 <= byte < 0x7F for byte in value)


class POP3BackendLogin(BackendProtocol):
    """AUTH PLAIN (or USER/PASS), after `XCLIENT ADDR= PORT=` when the server offers it:
    Dovecot says `+OK [XCLIENT]` in its greeting to clients in its login_trusted_networks, and
    then logs and rate-limits the client's address instead of the proxy's (as IMAP's ID
    x-originating-ip does)."""

    starttls_command = "STLS"

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.next_step: list[str] = []  # USER/PASS: what to send after the next +OK
        self.xclient = False  # the server offered XCLIENT
        self.xclient_sent = False  # its answer is the next line

    def login_line(self, text: str) -> None:
        if self.ready is None:
            if text.startswith("+OK"):
                self.xclient = text.startswith("+OK [XCLIENT")
                self.greeting_ok("")
            else:
                self.fail(BackendUnavailable(
                    f"unexpected greeting from {self.name}: {text[:80]!r}"))
        elif not self.tls_started:
            if text.startswith("+OK"):
                self.start_tls()
            else:
                self.unavailable("STLS", text)
        elif self.xclient_sent:
            self.xclient_sent = False  # refused or not, the login goes on from the proxy
            self.authenticate()
        elif text.startswith("+OK"):
            if self.next_step:
                self.send(self.next_step.pop(0))
            else:
                self.succeed("")
        elif text.startswith("+"):
            self.send(sasl_plain(self._upstream()))
        else:
            self.refused("login", text)

    def start_login(self) -> None:
        if self.xclient and _is_ip(self.client_ip):
            self.xclient_sent = True
            self.send(f"XCLIENT ADDR={self.client_ip} PORT={self.client_port}")
        else:
            self.authenticate()

    def authenticate(self) -> None:
        upstream = self._upstream()
        if uses_sasl_plain(upstream):
            self.send(f"AUTH PLAIN {sasl_plain(upstream)}")
        else:
            self.send(f"USER {upstream.login}")
            self.next_step = [f"PASS {upstream.password}"]


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _response_code_capabilities(text: str) -> str | None:
    start = text.upper().find("[CAPABILITY ")
    if start < 0:
        return None
    end = text.find("]", start)
    return text[start + len("[CAPABILITY "):end if end > 0 else None]


class _ConnectFactory(protocol.ClientFactory):
    def __init__(self, protocol_class: type[BackendProtocol],
                 greeted: defer.Deferred[BackendProtocol], endpoint: Endpoint, name: str,
                 verify_tls: bool, ca_pem: str | None) -> None:
        self.protocol_class = protocol_class
        self.greeted = greeted
        self.args = (endpoint, name, verify_tls, ca_pem)

    def buildProtocol(self, addr: object) -> BackendProtocol:
        return self.protocol_class(self.greeted, *self.args)

    def clientConnectionFailed(self, connector: object, reason: Failure) -> None:
        if not self.greeted.called:
            self.greeted.errback(BackendUnavailable(
                f"cannot connect to {self.args[1]}: {reason.value}"))


class UpstreamConnection:
    """A connection opened ahead of the login decision (or after it, to another upstream)."""

    def __init__(self, clock: IReactorTime, timeout: float, endpoint: Endpoint, name: str,
                 verify_tls: bool, ca_pem: str | None, greeted: defer.Deferred[BackendProtocol],
                 connector: object) -> None:
        self.clock, self.timeout = clock, timeout
        self.endpoint, self.name, self.verify_tls = endpoint, name, verify_tls
        self.ca_pem = ca_pem
        self.greeted = greeted
        self.connector = connector
        self.protocol: BackendProtocol | None = None
        greeted.addCallback(self._remember)
        _bounded(clock, timeout, greeted, name, "greet", connector)

    def serves(self, upstream: Upstream) -> bool:
        """Whether this connection goes where `upstream` says (then it can be used for it)."""
        return (self.endpoint, self.verify_tls, self.ca_pem) == \
            (upstream.endpoint, upstream.verify_tls, upstream.ca_pem)

    def _remember(self, proto: BackendProtocol) -> BackendProtocol:
        self.protocol = proto
        return proto

    def log_in(self, upstream: Upstream, client_ip: str = "",
               client_port: int = 0) -> defer.Deferred[BackendSession]:
        """Authenticate once greeted; bounded by the timeout again."""

        def authenticate(proto: BackendProtocol) -> defer.Deferred[BackendSession]:
            ready = proto.log_in(upstream, client_ip, client_port)
            _bounded(self.clock, self.timeout, ready, self.name, "complete login",
                     self.connector)
            return ready

        return self.greeted.addCallback(authenticate)

    def abandon(self) -> None:
        """The login was refused, went elsewhere, or the client left: let the server go."""
        self.greeted.addErrback(lambda _failure: None)  # nobody waits for it any more
        if self.protocol is not None:
            self.protocol.close()
        else:
            self.connector.disconnect()  # type: ignore[attr-defined]


def _bounded(clock: IReactorTime, timeout: float, waiting: defer.Deferred,  # type: ignore[type-arg]
             name: str, what: str, connector: object) -> None:
    def expire() -> None:
        if not waiting.called:
            waiting.errback(BackendUnavailable(f"{name} did not {what} in {timeout:g}s"))
            connector.disconnect()  # type: ignore[attr-defined]

    timer = clock.callLater(timeout, expire)

    def cancel_timer(result: object) -> object:
        if timer.active():
            timer.cancel()
        return result

    waiting.addBoth(cancel_timer)


def open_upstream(reactor: IReactorTCP, clock: IReactorTime, endpoint: Endpoint, timeout: float,
                  name: str = "store", verify_tls: bool = True,
                  ca_pem: str | None = None) -> UpstreamConnection:
    """Connect and wait for the greeting; `log_in` on the result finishes the login."""
    protocol_class = IMAPBackendLogin if endpoint.protocol == "imap" else POP3BackendLogin
    greeted: defer.Deferred[BackendProtocol] = defer.Deferred()
    factory = _ConnectFactory(protocol_class, greeted, endpoint, name, verify_tls, ca_pem)
    if endpoint.tls == "implicit":
        connector = reactor.connectSSL(  # type: ignore[attr-defined]
            endpoint.host, endpoint.port, factory,
            client_options(endpoint.host, verify_tls, ca_pem), timeout=timeout,
        )
    else:
        connector = reactor.connectTCP(endpoint.host, endpoint.port, factory, timeout=timeout)
    return UpstreamConnection(clock, timeout, endpoint, name, verify_tls, ca_pem, greeted,
                              connector)
