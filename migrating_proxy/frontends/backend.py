"""Logging in to the new store on a user's behalf, then handing the connection to the relay.

One small client protocol per store protocol. Each reads the greeting, authenticates with SASL
PLAIN (as a master user with the user as authorization identity when configured, otherwise with
the user's own password), and fires `ready` with a `BackendSession`. After that it only forwards
bytes to whatever `relay_to` names. Failures fire `ready` with `BackendRefused` (the store said
no) or `BackendUnavailable` (down, slow, or talking nonsense).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import ClassVar

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

    def __init__(self, login: StoreLogin, ready: defer.Deferred[BackendSession]) -> None:
        self.login = login
        self.ready = ready
        self.buffer = b""
        self.relay_to: ITransport | None = None
        self.on_lost: list = []  # callables run when the store side closes

    def dataReceived(self, data: bytes) -> None:
        if self.relay_to is not None:
            self.relay_to.write(data)
            return
        self.buffer += data
        while not self.ready.called and b"\n" in self.buffer:
            line, _, self.buffer = self.buffer.partition(b"\n")
            self.login_line(line.rstrip(b"\r"))
        if not self.ready.called and len(self.buffer) > MAX_LOGIN_LINE:
            self.fail(BackendUnavailable("store sent an over-long line"))

    def login_line(self, line: bytes) -> None:
        raise NotImplementedError

    def succeed(self, capabilities: str) -> None:
        pending, self.buffer = self.buffer, b""
        self.ready.callback(BackendSession(self, capabilities, pending))

    def fail(self, exc: Exception) -> None:
        if not self.ready.called:
            self.ready.errback(exc)
        if self.transport is not None:
            self.transport.loseConnection()

    def send(self, line: str) -> None:
        assert self.transport is not None
        self.transport.write(line.encode() + b"\r\n")

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if not self.ready.called:
            self.ready.errback(BackendUnavailable("store closed the connection during login"))
        for callback in self.on_lost:
            callback()


class IMAPBackendLogin(BackendProtocol):
    TAGS: ClassVar = ("P1", "P2", "P3")

    def __init__(self, login: StoreLogin, ready: defer.Deferred[BackendSession]) -> None:
        super().__init__(login, ready)
        self.state = "greeting"
        self.capabilities = ""

    def login_line(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace")
        if self.state == "greeting":
            self._greeting(text)
        elif text.startswith("+") and self.state == "auth":
            self.send(self.login.sasl_plain())  # store without SASL-IR asked for the response
        elif text.upper().startswith("* CAPABILITY "):
            self.capabilities = text[len("* CAPABILITY "):]
        elif text.startswith(("P1 ", "P2 ", "P3 ")):
            self._tagged(text)

    def _greeting(self, text: str) -> None:
        if not text.upper().startswith("* OK"):
            self.fail(BackendUnavailable(f"unexpected greeting from store: {text[:80]!r}"))
            return
        caps = _response_code_capabilities(text) or ""
        if "ID" in caps.upper().split():
            # Lets the store log the real client address (needs login_trusted_networks there).
            self.send(
                f'P1 ID ("x-originating-ip" "{self.login.client_ip}" '
                f'"x-originating-port" "{self.login.client_port}")'
            )
        if "SASL-IR" in caps.upper().split():
            self.send(f"P2 AUTHENTICATE PLAIN {self.login.sasl_plain()}")
        else:
            self.send("P2 AUTHENTICATE PLAIN")
        self.state = "auth"

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
    def __init__(self, login: StoreLogin, ready: defer.Deferred[BackendSession]) -> None:
        super().__init__(login, ready)
        self.state = "greeting"

    def login_line(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace")
        if self.state == "greeting":
            if not text.startswith("+OK"):
                self.fail(BackendUnavailable(f"unexpected greeting from store: {text[:80]!r}"))
                return
            self.send(f"AUTH PLAIN {self.login.sasl_plain()}")
            self.state = "auth"
        elif text.startswith("+OK"):
            self.succeed("")
        elif text.startswith("+"):
            self.send(self.login.sasl_plain())
        else:
            self.fail(BackendRefused(f"store refused login: {text[:120]}"))


def _response_code_capabilities(text: str) -> str | None:
    start = text.upper().find("[CAPABILITY ")
    if start < 0:
        return None
    end = text.find("]", start)
    return text[start + len("[CAPABILITY "):end if end > 0 else None]


class _LoginFactory(protocol.ClientFactory):
    def __init__(self, protocol_class: type[BackendProtocol], login: StoreLogin,
                 ready: defer.Deferred[BackendSession]) -> None:
        self.protocol_class = protocol_class
        self.login = login
        self.ready = ready

    def buildProtocol(self, addr: object) -> BackendProtocol:
        return self.protocol_class(self.login, self.ready)

    def clientConnectionFailed(self, connector: object, reason: Failure) -> None:
        if not self.ready.called:
            self.ready.errback(BackendUnavailable(f"cannot connect to store: {reason.value}"))


def connect_store(reactor: IReactorTCP, clock: IReactorTime, endpoint: Endpoint,
                  login: StoreLogin, timeout: float) -> defer.Deferred[BackendSession]:
    """Connect and log in; the whole thing (connect, greeting, login) is bounded by `timeout`."""
    protocol_class = IMAPBackendLogin if endpoint.protocol == "imap" else POP3BackendLogin
    ready: defer.Deferred[BackendSession] = defer.Deferred()
    factory = _LoginFactory(protocol_class, login, ready)
    if endpoint.tls == "implicit":
        connector = reactor.connectSSL(  # type: ignore[attr-defined]
            endpoint.host, endpoint.port, factory, client_options(endpoint.host), timeout=timeout
        )
    else:
        connector = reactor.connectTCP(endpoint.host, endpoint.port, factory, timeout=timeout)

    def expire() -> None:
        if not ready.called:
            ready.errback(BackendUnavailable(f"store did not complete login in {timeout:g}s"))
            connector.disconnect()

    timer = clock.callLater(timeout, expire)

    def cancel_timer(result: object) -> object:
        if timer.active():
            timer.cancel()
        return result

    ready.addBoth(cancel_timer)
    return ready
