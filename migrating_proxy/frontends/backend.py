"""Logging in to the new store on a user's behalf, then handing the connection to the relay.

One small client protocol per store protocol, in two steps so the slow part overlaps the login
decision: `open_store` connects and waits for the greeting while the password is still being
checked (the store's greeting costs more than the proxy's whole decision); `StoreConnection.
log_in` then authenticates with SASL PLAIN (as a master user with the user as authorization
identity when configured, otherwise with the user's own password) and fires with a
`BackendSession`. After that the protocol only forwards bytes to whatever `relay_to` names.
Failures are `BackendRefused` (the store said no) or `BackendUnavailable` (down, slow, or
talking nonsense). Every step is bounded by the configured timeout.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IReactorTCP, IReactorTime, ITransport
from twisted.python.failure import Failure

from migrating_proxy.endpoints import Endpoint
from migrating_proxy.frontends.tls import client_options

MAX_LOGIN_LINE = 65536  # the store's pre-login lines are short; anything longer is broken


class BackendUnavailable(Exception):
    """The store could not be reached or did not answer in time."""


class BackendRefused(Exception):
    """The store answered, and refused the login (an account not provisioned there?)."""


@dataclass(frozen=True)
class StoreLogin:
    """Who to log in as at the store. Secrets are kept out of repr."""

    address: str
    password: str = field(repr=False)  # the user's password, or the master password
    master_user: str | None = None
    client_ip: str = ""
    client_port: int = 0

    def sasl_plain(self) -> str:
        if self.master_user:
            raw = f"{self.address}\0{self.master_user}\0{self.password}"
        else:
            raw = f"\0{self.address}\0{self.password}"
        return base64.b64encode(raw.encode()).decode("ascii")


@dataclass
class BackendSession:
    protocol: BackendProtocol
    capabilities: str  # IMAP: the store's post-login CAPABILITY list; POP3: empty
    pending: bytes  # store output that arrived right after the login answer

    @property
    def transport(self) -> ITransport:
        assert self.protocol.transport is not None
        return self.protocol.transport


class BackendProtocol(protocol.Protocol):
    """Shared plumbing: line buffer during login, then plain forwarding."""

    def __init__(self, greeted: defer.Deferred[BackendProtocol]) -> None:
        self.greeted = greeted
        self.ready: defer.Deferred[BackendSession] | None = None  # set by log_in
        self.login: StoreLogin | None = None
        self.capabilities = ""
        self.buffer = b""
        self.relay_to: ITransport | None = None
        self.on_lost: list = []  # callables run when the store side closes
        self.lost = False

    @property
    def waiting(self) -> defer.Deferred:  # type: ignore[type-arg]
        """What the next line from the store decides: the greeting, then the login."""
        return self.greeted if self.ready is None else self.ready

    def log_in(self, login: StoreLogin) -> defer.Deferred[BackendSession]:
        if self.lost:  # the store hung up while the decision was being made
            return defer.fail(BackendUnavailable("store closed the connection before login"))
        self.login = login
        self.ready = defer.Deferred()
        self.start_login()
        return self.ready

    def dataReceived(self, data: bytes) -> None:
        if self.relay_to is not None:
            self.relay_to.write(data)
            return
        self.buffer += data
        while not self.waiting.called and b"\n" in self.buffer:
            line, _, self.buffer = self.buffer.partition(b"\n")
            self.login_line(line.rstrip(b"\r").decode("utf-8", "replace"))
        if not self.waiting.called and len(self.buffer) > MAX_LOGIN_LINE:
            self.fail(BackendUnavailable("store sent an over-long line"))

    def login_line(self, text: str) -> None:
        raise NotImplementedError

    def start_login(self) -> None:
        raise NotImplementedError

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

    def close(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    def send(self, line: str) -> None:
        assert self.transport is not None
        self.transport.write(line.encode() + b"\r\n")

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.lost = True
        if not self.waiting.called:
            self.waiting.errback(BackendUnavailable("store closed the connection during login"))
        for callback in self.on_lost:
            callback()


class IMAPBackendLogin(BackendProtocol):
    def login_line(self, text: str) -> None:
        if self.ready is None:
            self._greeting(text)
        elif text.startswith("+"):
            self.send(self._login().sasl_plain())  # a store without SASL-IR asked for it
        elif text.upper().startswith("* CAPABILITY "):
            self.capabilities = text[len("* CAPABILITY "):]
        elif text.startswith(("P1 ", "P2 ", "P3 ")):
            self._tagged(text)

    def _login(self) -> StoreLogin:
        assert self.login is not None
        return self.login

    def _greeting(self, text: str) -> None:
        if not text.upper().startswith("* OK"):
            self.fail(BackendUnavailable(f"unexpected greeting from store: {text[:80]!r}"))
            return
        self.greeting_ok(_response_code_capabilities(text) or "")

    def start_login(self) -> None:
        login, caps = self._login(), self.capabilities.upper().split()
        if "ID" in caps:
            # Lets the store log the real client address (needs login_trusted_networks there).
            self.send(f'P1 ID ("x-originating-ip" "{login.client_ip}" '
                      f'"x-originating-port" "{login.client_port}")')
        if "SASL-IR" in caps:
            self.send(f"P2 AUTHENTICATE PLAIN {login.sasl_plain()}")
        else:
            self.send("P2 AUTHENTICATE PLAIN")
        self.capabilities = ""  # the pre-login list; the login answer brings the real one

    def _tagged(self, text: str) -> None:
        tag, _, rest = text.partition(" ")
        status = rest.split(" ", 1)[0].upper()
        if tag == "P1":
            return  # ID's answer does not matter
        if status != "OK":
            if tag == "P2":
                self.fail(BackendRefused(f"store refused login: {rest[:120]}"))
            else:
                self.fail(BackendUnavailable(f"store failed CAPABILITY: {rest[:120]}"))
            return
        if tag == "P2":
            caps = _response_code_capabilities(text)
            if caps is None and not self.capabilities:
                self.send("P3 CAPABILITY")  # the store did not say; ask
                return
            self.capabilities = caps or self.capabilities
        self.succeed(self.capabilities)


class POP3BackendLogin(BackendProtocol):
    def login_line(self, text: str) -> None:
        if self.ready is None:
            if text.startswith("+OK"):
                self.greeting_ok("")
            else:
                self.fail(BackendUnavailable(f"unexpected greeting from store: {text[:80]!r}"))
        elif text.startswith("+OK"):
            self.succeed("")
        elif text.startswith("+"):
            assert self.login is not None
            self.send(self.login.sasl_plain())
        else:
            self.fail(BackendRefused(f"store refused login: {text[:120]}"))

    def start_login(self) -> None:
        assert self.login is not None
        self.send(f"AUTH PLAIN {self.login.sasl_plain()}")


def _response_code_capabilities(text: str) -> str | None:
    start = text.upper().find("[CAPABILITY ")
    if start < 0:
        return None
    end = text.find("]", start)
    return text[start + len("[CAPABILITY "):end if end > 0 else None]


class _ConnectFactory(protocol.ClientFactory):
    def __init__(self, protocol_class: type[BackendProtocol],
                 greeted: defer.Deferred[BackendProtocol]) -> None:
        self.protocol_class = protocol_class
        self.greeted = greeted

    def buildProtocol(self, addr: object) -> BackendProtocol:
        return self.protocol_class(self.greeted)

    def clientConnectionFailed(self, connector: object, reason: Failure) -> None:
        if not self.greeted.called:
            self.greeted.errback(BackendUnavailable(f"cannot connect to store: {reason.value}"))


class StoreConnection:
    """A connection to the store opened ahead of the login decision."""

    def __init__(self, clock: IReactorTime, timeout: float,
                 greeted: defer.Deferred[BackendProtocol], connector: object) -> None:
        self.clock, self.timeout = clock, timeout
        self.greeted = greeted
        self.connector = connector
        self.protocol: BackendProtocol | None = None
        greeted.addCallback(self._remember)
        _bounded(clock, timeout, greeted, "greet", connector)

    def _remember(self, proto: BackendProtocol) -> BackendProtocol:
        self.protocol = proto
        return proto

    def log_in(self, login: StoreLogin) -> defer.Deferred[BackendSession]:
        """Authenticate once greeted; bounded by the timeout again."""

        def authenticate(proto: BackendProtocol) -> defer.Deferred[BackendSession]:
            ready = proto.log_in(login)
            _bounded(self.clock, self.timeout, ready, "complete login", self.connector)
            return ready

        return self.greeted.addCallback(authenticate)

    def abandon(self) -> None:
        """The login was refused or the client left: let the store go."""
        self.greeted.addErrback(lambda _failure: None)  # nobody waits for it any more
        if self.protocol is not None:
            self.protocol.close()
        else:
            self.connector.disconnect()  # type: ignore[attr-defined]


def _bounded(clock: IReactorTime, timeout: float, waiting: defer.Deferred,  # type: ignore[type-arg]
             what: str, connector: object) -> None:
    def expire() -> None:
        if not waiting.called:
            waiting.errback(BackendUnavailable(f"store did not {what} in {timeout:g}s"))
            connector.disconnect()  # type: ignore[attr-defined]

    timer = clock.callLater(timeout, expire)

    def cancel_timer(result: object) -> object:
        if timer.active():
            timer.cancel()
        return result

    waiting.addBoth(cancel_timer)


def open_store(reactor: IReactorTCP, clock: IReactorTime, endpoint: Endpoint,
               timeout: float) -> StoreConnection:
    """Connect and wait for the greeting; `log_in` on the result finishes the login."""
    protocol_class = IMAPBackendLogin if endpoint.protocol == "imap" else POP3BackendLogin
    greeted: defer.Deferred[BackendProtocol] = defer.Deferred()
    factory = _ConnectFactory(protocol_class, greeted)
    if endpoint.tls == "implicit":
        connector = reactor.connectSSL(  # type: ignore[attr-defined]
            endpoint.host, endpoint.port, factory, client_options(endpoint.host), timeout=timeout
        )
    else:
        connector = reactor.connectTCP(endpoint.host, endpoint.port, factory, timeout=timeout)
    return StoreConnection(clock, timeout, greeted, connector)
