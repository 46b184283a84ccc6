"""What IMAP and POP3 sessions share before login, and the switch to the relay after it.

A `ProxySession` owns the client connection. Subclasses (one per protocol) parse commands from
`self.buffer` in `process_buffer` and call `begin_login` with the credentials they collected.
This class then runs the shared login decision in a worker thread, applies the fixed failure
delay, logs one event per login, logs in at the upstream the decision named (the store, or the
old server during a cutover), and splices the two connections. Subclasses only word the
answers (`answer_*` hooks).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import structlog
from twisted.internet import defer, protocol
from twisted.internet.threads import deferToThreadPool
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from migrating_proxy.config import Config
from migrating_proxy.endpoints import Endpoint
from migrating_proxy.frontends.backend import (
    BackendRefused,
    BackendSession,
    UpstreamConnection,
    open_upstream,
)
from migrating_proxy.frontends.registry import SessionRegistry
from migrating_proxy.frontends.relay import Relay, ResponseBoundary, unsplice_and_close
from migrating_proxy.frontends.sasl import SaslExchange
from migrating_proxy.login import Credentials, LoginResult, LoginService, Outcome
from migrating_proxy.upstream import ServedBy, Upstream

log = structlog.get_logger("migrating_proxy.login")


class LineTooLong(Exception):
    pass


@dataclass
class FrontendContext:
    """Everything a session needs from the running service; shared by all sessions."""

    reactor: Any  # IReactorTCP + IReactorTime + IReactorSSL
    config: Config
    login_service: LoginService
    threadpool: ThreadPool
    tls_options: Any  # twisted CertificateOptions, or None when TLS is not configured
    registry: SessionRegistry = field(default_factory=SessionRegistry)

    def store_endpoint(self, protocol_name: str) -> Endpoint:
        return getattr(self.config.backend, protocol_name)


class ProxySession(protocol.Protocol, TimeoutMixin):
    protocol_name = "imap"

    def __init__(self, ctx: FrontendContext, implicit_tls: bool = False) -> None:
        self.ctx = ctx
        self.limits = ctx.config.limits
        self.buffer = bytearray()
        self.tls_active = implicit_tls
        self.state = "preauth"  # preauth | authenticating | relaying | closed
        self.failures = 0
        self.backend: BackendSession | None = None
        self.relay: Relay | None = None
        self.account: str | None = None  # once relayed: the account, the registry's key
        self.served_by: ServedBy | None = None
        self.pending_upstream: UpstreamConnection | None = None
        self.sasl: SaslExchange | None = None  # an AUTHENTICATE/AUTH dialogue under way
        self.peer_host = ""
        self.peer_port = 0

    # -- connection lifecycle ------------------------------------------------------------
    def connectionMade(self) -> None:
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        self.peer_host, self.peer_port = getattr(peer, "host", ""), getattr(peer, "port", 0)
        self.setTimeout(self.limits.idle_timeout or None)
        self.greet()

    def dataReceived(self, data: bytes) -> None:
        if self.state == "relaying":
            self.relay.from_client(data)  # type: ignore[union-attr]
            return
        self.resetTimeout()
        self.buffer += data
        if self.state == "preauth":
            self.process_safely()
        elif len(self.buffer) > self.limits.max_line + self.limits.max_literal:
            # Pipelined input while the login is being decided; bounded all the same.
            self.close_with_error("Too much data sent before login completed.")

    def process_buffer(self) -> None:
        """Run every complete command the client sent, until login starts or input runs out."""
        while self.state == "preauth":
            line = self.next_line()
            if line is None:
                return
            if self.sasl is not None:
                self.sasl_response(line)
            else:
                self.command_line(line)

    def next_line(self) -> bytes | None:
        return self.take_line()

    def process_safely(self) -> None:
        try:
            self.process_buffer()
        except LineTooLong:
            self.close_with_error("Line too long.")

    def timeoutConnection(self) -> None:
        self.say_bye("Disconnected for inactivity.")
        self.close()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.state = "closed"
        self.setTimeout(None)
        if self.account is not None:
            self.ctx.registry.discard(self.account, self)
        if self.backend is not None:
            unsplice_and_close(self.backend.transport)
        elif self.pending_upstream is not None:
            self.pending_upstream.abandon()

    def close(self) -> None:
        if self.state != "closed" and self.transport is not None:
            self.transport.loseConnection()

    def close_with_error(self, message: str) -> None:
        self.buffer.clear()
        self.say_bye(message)
        self.close()
        self.state = "closed"

    def close_after_answer(self, message: str) -> None:
        """Close right after a command's final answer (IMAP adds a BYE; POP3 overrides)."""
        self.close_with_error(message)

    # -- framing helpers for subclasses --------------------------------------------------
    def take_line(self) -> bytes | None:
        """One line without its CRLF (bare LF accepted), or None if not complete yet."""
        end = self.buffer.find(b"\n")
        if end < 0:
            if len(self.buffer) > self.limits.max_line:
                raise LineTooLong
            return None
        if end > self.limits.max_line:
            raise LineTooLong
        line = bytes(self.buffer[:end])
        del self.buffer[: end + 1]
        return line.removesuffix(b"\r")

    def write_line(self, text: str) -> None:
        if self.transport is not None and self.state != "closed":
            self.transport.write(text.encode("utf-8") + b"\r\n")

    def start_tls(self) -> None:
        # Anything the client sent after the STARTTLS command arrived in clear text and could
        # have been injected by a man in the middle (CVE-2011-0411): drop it, never run it.
        self.buffer.clear()
        self.transport.startTLS(self.ctx.tls_options)  # type: ignore[union-attr]
        self.tls_active = True

    @property
    def plaintext_login_allowed(self) -> bool:
        return self.tls_active or not self.ctx.config.tls.require

    # -- login ---------------------------------------------------------------------------
    def begin_login(self, username: str, password: str, mechanism: str) -> None:
        self.state = "authenticating"
        # The login's own bounds (backend.timeout, the failure delay) apply now, not idleness.
        self.setTimeout(None)
        started = time.monotonic()
        # Open the store connection now: its greeting takes longer than the whole decision.
        self.pending_upstream = open_upstream(
            self.ctx.reactor, self.ctx.reactor, self.ctx.store_endpoint(self.protocol_name),
            self.ctx.config.backend.timeout,
        )
        creds = Credentials(username, password, self.protocol_name, self.peer_host)
        decided = deferToThreadPool(
            self.ctx.reactor, self.ctx.threadpool, self.ctx.login_service.authenticate, creds
        )
        decided.addCallback(self._decided, mechanism, started)
        decided.addErrback(self._internal_error, mechanism, started)

    def _decided(self, result: LoginResult, mechanism: str,
                 started: float) -> defer.Deferred[None] | None:
        if self.state == "closed":
            self._log(result, mechanism, started, "client gone")
            return None
        connection, self.pending_upstream = self.pending_upstream, None
        assert connection is not None
        if not result.ok:
            connection.abandon()
            return self._refuse(result, mechanism, started)
        assert result.upstream is not None
        connection = self._connection_to(result.upstream, connection)
        connected = connection.log_in(result.upstream, self.peer_host, self.peer_port)
        connected.addCallbacks(
            self._store_ready, self._store_failed,
            callbackArgs=(result, mechanism, started), errbackArgs=(result, mechanism, started),
        )
        return None

    def _connection_to(self, upstream: Upstream,
                       opened: UpstreamConnection) -> UpstreamConnection:
        """The connection opened ahead to the store if the decision chose it, else a new one
        to the upstream it named (the pre-opened one is dropped)."""
        if opened.serves(upstream):
            return opened
        opened.abandon()
        return open_upstream(self.ctx.reactor, self.ctx.reactor, upstream.endpoint,
                             self.ctx.config.backend.timeout, upstream.name, upstream.verify_tls)

    def _refuse(self, result: LoginResult, mechanism: str, started: float) -> None:
        self.failures += 1
        # The same fixed delay for every failure, so timing tells nothing about why.
        delay = self.limits.auth_failure_delay if result.outcome is not Outcome.UNAVAILABLE else 0
        self.ctx.reactor.callLater(delay, self._answer_refusal, result, mechanism, started)

    def _answer_refusal(self, result: LoginResult, mechanism: str, started: float) -> None:
        self._log(result, mechanism, started)
        if self.state == "closed":
            return
        self.state = "preauth"
        self.answer_login_failed(result.outcome)
        if result.outcome is Outcome.UNAVAILABLE:
            self.close_after_answer("Service temporarily unavailable.")
        elif self.failures >= self.limits.max_failures_per_connection:
            self.close_after_answer("Too many failed logins.")
        else:
            self.setTimeout(self.limits.idle_timeout or None)
            self.process_safely()  # commands the client pipelined after the failed login

    def _store_ready(self, backend: BackendSession, result: LoginResult, mechanism: str,
                     started: float) -> None:
        if self.state == "closed":
            backend.transport.loseConnection()
            self._log(result, mechanism, started, "client gone")
            return
        self.setTimeout(None)  # idle handling is the upstream's business from now on
        self.backend = backend
        backend.protocol.on_lost.append(self._store_lost)
        self.answer_login_ok(backend.capabilities)
        self.state = "relaying"
        self._log(result, mechanism, started)
        assert result.upstream is not None
        self.account, self.served_by = result.upstream.address, result.upstream.served_by
        self.ctx.registry.add(self.account, self)
        self.relay = Relay(self.transport, backend.transport,  # type: ignore[arg-type]
                           self.ctx.reactor, self.response_boundary())
        backend.protocol.forward = self.relay.from_upstream
        pipelined, self.buffer = bytes(self.buffer), bytearray()
        self.relay.start(backend.pending, pipelined)

    def response_boundary(self) -> ResponseBoundary | None:
        """A follower of the upstream's responses, for protocols that can say goodbye."""
        return None

    def close_on_request(self, reason: str) -> None:
        """The account's sessions are being closed everywhere (see frontends/registry.py)."""
        if self.relay is not None:
            self.relay.close(self.goodbye(reason))

    def goodbye(self, reason: str) -> bytes | None:
        """What to tell the client when its relayed session is closed on request."""
        return None

    def _store_failed(self, failure: Failure, result: LoginResult, mechanism: str,
                      started: float) -> None:
        refused = failure.check(BackendRefused)
        name = result.upstream.name if result.upstream else "store"
        reason = f"{name} {'refused' if refused else 'unavailable'}: {failure.getErrorMessage()}"
        self._log(LoginResult(Outcome.UNAVAILABLE, result.address, reason), mechanism, started)
        if self.state == "closed":
            return
        self.answer_login_failed(Outcome.UNAVAILABLE)
        self.close_after_answer("Service temporarily unavailable.")

    def _store_lost(self) -> None:
        unsplice_and_close(self.transport)  # type: ignore[arg-type]

    def _internal_error(self, failure: Failure, mechanism: str, started: float) -> None:
        if self.pending_upstream is not None:
            self.pending_upstream.abandon()
            self.pending_upstream = None
        result = LoginResult(Outcome.UNAVAILABLE, None, f"internal error: {failure.type.__name__}")
        self._refuse(result, mechanism, started)

    def _log(self, result: LoginResult, mechanism: str, started: float, note: str = "") -> None:
        event = log.info if result.ok else log.warning
        event(
            "login", protocol=self.protocol_name, address=result.address, peer=self.peer_host,
            mechanism=mechanism, tls=self.tls_active, outcome=result.outcome.value,
            reason=note or result.reason, duration_ms=round((time.monotonic() - started) * 1000, 1),
        )

    # -- protocol-specific hooks ---------------------------------------------------------
    def greet(self) -> None:
        raise NotImplementedError

    def command_line(self, line: bytes) -> None:
        raise NotImplementedError

    def sasl_response(self, line: bytes) -> None:
        raise NotImplementedError

    def say_bye(self, message: str) -> None:
        raise NotImplementedError

    def answer_login_ok(self, capabilities: str) -> None:
        raise NotImplementedError

    def answer_login_failed(self, outcome: Outcome) -> None:
        raise NotImplementedError


class SessionFactory(protocol.Factory):
    def __init__(self, session_class: type[ProxySession], ctx: FrontendContext,
                 implicit_tls: bool = False) -> None:
        self.session_class = session_class
        self.ctx = ctx
        self.implicit_tls = implicit_tls

    def buildProtocol(self, addr: object) -> ProxySession:
        session = self.session_class(self.ctx, self.implicit_tls)
        session.factory = self
        return session



