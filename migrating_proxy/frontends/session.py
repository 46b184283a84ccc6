"""IMAP and POP3 sessions: a sans-IO pre-login dialogue, the login, then the relay.

A `ProxySession` owns the client connection. It feeds the client's bytes to its protocol's
dialogue (migrating_proxy/dialogue/) and carries out the actions that come back: replies,
STARTTLS and closing through its `ClientConnection`; `Authenticate` through the shared
`LoginRunner` (the login decision in the thread pool, the fixed failure delay, one `login` log
event); then it logs in at the upstream the decision named (the store, or the old server during
a cutover: see backend.py) and, on `Relay`, splices the two connections (relay.py). Relayed
sessions are listed in the process's `SessionRegistry`, which can close them on request.

`IMAPSession` and `POP3Session` only name their dialogue and how they say goodbye.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import structlog
from twisted.internet import defer, protocol, task
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from migrating_proxy import metrics
from migrating_proxy.config import Config
from migrating_proxy.dialogue import Action, Authenticate, Relay
from migrating_proxy.dialogue.base import Dialogue, DialogueSettings
from migrating_proxy.endpoints import Endpoint
from migrating_proxy.frontends.backend import (
    BackendRefused,
    BackendSession,
    UpstreamConnection,
    open_upstream,
)
from migrating_proxy.frontends.connection import ClientConnection, idle_seconds
from migrating_proxy.frontends.hints import UpstreamHints
from migrating_proxy.frontends.leases import LeaseKeeper
from migrating_proxy.frontends.registry import SessionRegistry
from migrating_proxy.frontends.relay import Relay as Splice
from migrating_proxy.frontends.relay import ResponseBoundary, unsplice_and_close
from migrating_proxy.frontends.uidl import UidlMap, UidlTranslator
from migrating_proxy.login import Credentials, LoginResult, LoginService, Outcome
from migrating_proxy.upstream import ServedBy, Upstream

log = structlog.get_logger("migrating_proxy.login")

REFUSAL_RETRY_INTERVAL = 0.2  # seconds between store logins of a just-provisioned account


@dataclass
class FrontendContext:
    """Everything a session needs from the running service; shared by all sessions."""

    reactor: Any  # IReactorTCP + IReactorTime + IReactorSSL
    config: Config
    login_service: LoginService
    threadpool: ThreadPool
    tls_options: Any  # twisted CertificateOptions, or None when TLS is not configured
    registry: SessionRegistry = field(default_factory=SessionRegistry)
    leases: LeaseKeeper | None = None  # old-server sessions' leases (the transparent cutover)
    hints: UpstreamHints = field(default_factory=UpstreamHints)  # where to connect ahead

    def store_endpoint(self, protocol_name: str) -> Endpoint:
        return getattr(self.config.backend, protocol_name)

    @cached_property
    def dialogue_settings(self) -> DialogueSettings:
        limits = self.config.limits
        return DialogueSettings(
            max_line=limits.max_line, max_literal=limits.max_literal,
            max_failures=limits.max_failures_per_connection,
            tls_available=self.tls_options is not None, tls_required=self.config.tls.require,
        )


class LoginRunner:
    """The login decision as every front-end runs it (IMAP, POP3, submission)."""

    def __init__(self, ctx: FrontendContext, protocol_name: str,
                 client: ClientConnection) -> None:
        self.ctx, self.protocol_name, self.client = ctx, protocol_name, client

    def decide(self, attempt: Authenticate) -> defer.Deferred[LoginResult]:
        """The decision, in the thread pool (it blocks); never fails: a crash is UNAVAILABLE."""
        creds = Credentials(attempt.username, attempt.password, self.protocol_name,
                            self.client.peer_host)
        decided = deferToThreadPool(self.ctx.reactor, self.ctx.threadpool,
                                    self.ctx.login_service.authenticate, creds)
        return decided.addErrback(self._internal_error)

    @staticmethod
    def _internal_error(failure: Failure) -> LoginResult:
        return LoginResult(Outcome.UNAVAILABLE, None, f"internal error: {failure.type.__name__}")

    def after_delay(self, result: LoginResult) -> defer.Deferred[LoginResult]:
        """Fires with `result` after the fixed failure delay (none for UNAVAILABLE), so that
        timing tells nothing about why a login failed."""
        delay = self.ctx.config.limits.auth_failure_delay \
            if result.outcome is not Outcome.UNAVAILABLE else 0
        return task.deferLater(self.ctx.reactor, delay, lambda: result)

    def log(self, result: LoginResult, mechanism: str, started: float, note: str = "") -> None:
        metrics.login(self.protocol_name, result.outcome.value)
        event = log.info if result.ok else log.warning
        event(
            "login", protocol=self.protocol_name, address=result.address,
            peer=self.client.peer_host, mechanism=mechanism, tls=self.client.tls_active,
            outcome=result.outcome.value, reason=note or result.reason,
            served_by=result.upstream.served_by if result.ok and result.upstream else None,
            duration_ms=round((time.monotonic() - started) * 1000, 1),
        )


class ProxySession(protocol.Protocol):
    protocol_name = "imap"
    dialogue_class: type[Dialogue] = Dialogue

    def __init__(self, ctx: FrontendContext, implicit_tls: bool = False) -> None:
        self.ctx = ctx
        self.limits = ctx.config.limits
        self.client = ClientConnection(ctx.reactor, ctx.tls_options, implicit_tls)
        self.dialogue = self.dialogue_class(ctx.dialogue_settings, tls_active=implicit_tls)
        self.login = LoginRunner(ctx, self.protocol_name, self.client)
        self.pending_upstream: UpstreamConnection | None = None
        self.backend: BackendSession | None = None
        self.relay: Splice | None = None
        self.account: str | None = None  # once relayed: the account, the registry's key
        self.served_by: ServedBy | None = None
        self.refusals_retried_until = 0.0  # see Upstream.retry_refusals_for
        self.lease: int | None = None  # while relayed to an old server (frontends/leases.py)
        self.uidls: UidlMap | None = None  # the old POP3 UIDLs the relay answers with
        self.login_started = 0.0
        self.username = ""  # as the client gave it at login (hints.py)

    # -- connection lifecycle ------------------------------------------------------------
    def connectionMade(self) -> None:
        self.client.made(self.transport)  # type: ignore[arg-type]
        self.client.deadline(self.limits.login_timeout, self._login_deadline)
        self.perform(self.dialogue.greeting())

    def dataReceived(self, data: bytes) -> None:
        if self.relay is not None:
            self.relay.from_client(data)
            return
        self.perform(self.dialogue.receive(data))

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.client.lost()
        if self.account is not None:
            self.ctx.registry.discard(self.account, self)
        if self.backend is not None:
            metrics.session_closed(self.protocol_name, self.served_by or "store")
            unsplice_and_close(self.backend.transport)  # the lease goes when it is lost
        elif self.pending_upstream is not None:
            self.pending_upstream.abandon()

    @property
    def closed(self) -> bool:
        return self.client.closed

    # -- carrying out the dialogue's actions ---------------------------------------------
    def perform(self, actions: list[Action]) -> None:
        self.client.carry_out(actions, self._session_action)
        self.client.idle(idle_seconds(self.dialogue.state, self.limits.idle_timeout),
                         self._timed_out)

    def _session_action(self, action: Action) -> None:
        if isinstance(action, Authenticate):
            self.authenticate(action)
        elif isinstance(action, Relay):
            self.start_relay(action.pipelined)

    def _timed_out(self) -> None:
        self.perform(self.dialogue.timed_out())

    def _login_deadline(self) -> None:
        self.perform(self.dialogue.login_deadline())

    # -- login ---------------------------------------------------------------------------
    def authenticate(self, attempt: Authenticate) -> None:
        started = self.login_started = time.monotonic()
        self.username = attempt.username
        # Open the upstream connection now: its greeting takes longer than the whole decision.
        # The store, unless this user's last session here went elsewhere (hints.py).
        hint = self.ctx.hints.get(self.protocol_name, attempt.username)
        if hint is None:
            self.pending_upstream = open_upstream(
                self.ctx.reactor, self.ctx.reactor, self.ctx.store_endpoint(self.protocol_name),
                self.ctx.config.backend.timeout,
            )
        else:
            self.pending_upstream = open_upstream(
                self.ctx.reactor, self.ctx.reactor, hint.endpoint,
                self.ctx.config.backend.timeout, hint.name, hint.verify_tls, hint.ca_pem,
            )
        decided = self.login.decide(attempt)
        decided.addCallback(self._decided, attempt.mechanism, started)
        decided.addErrback(self._crashed, attempt.mechanism, started)

    def _decided(self, result: LoginResult, mechanism: str, started: float) -> None:
        if result.upstream is not None and result.upstream.lease is not None:
            self._take_lease(result.upstream.lease)
        if self.closed:
            self.login.log(result, mechanism, started, "client gone")
            self._give_back_lease()
            return
        connection, self.pending_upstream = self.pending_upstream, None
        assert connection is not None
        if not result.ok:
            connection.abandon()
            self.login.after_delay(result).addCallback(self._refused, mechanism, started)
            return
        assert result.upstream is not None
        self.ctx.hints.remember(self.protocol_name, self.username, result.upstream)
        self.refusals_retried_until = time.monotonic() + result.upstream.retry_refusals_for
        self._log_in_upstream(self._connection_to(result.upstream, connection), result,
                              mechanism, started)

    def _log_in_upstream(self, connection: UpstreamConnection | None, result: LoginResult,
                         mechanism: str, started: float) -> None:
        upstream = result.upstream
        assert upstream is not None
        if self.closed:
            self.login.log(result, mechanism, started, "client gone")
            return
        if connection is None:  # trying again
            connection = self._connection_to(upstream, None)
        connected = connection.log_in(upstream, self.client.peer_host, self.client.peer_port)
        connected.addBoth(metrics.upstream_login_timer(self.protocol_name, upstream.served_by))
        connected.addCallbacks(
            self._upstream_ready, self._upstream_failed,
            callbackArgs=(result, mechanism, started), errbackArgs=(result, mechanism, started),
        )

    def _crashed(self, failure: Failure, mechanism: str, started: float) -> None:
        """A bug on the way to the upstream: the client gets a temporary failure, not a hang."""
        if self.pending_upstream is not None:
            self.pending_upstream.abandon()
            self.pending_upstream = None
        self._give_back_lease()
        self._refused(LoginResult(Outcome.UNAVAILABLE, None,
                                  f"internal error: {failure.type.__name__}"), mechanism, started)

    def _connection_to(self, upstream: Upstream,
                       opened: UpstreamConnection | None) -> UpstreamConnection:
        """The connection opened ahead to the store if the decision chose it, else a new one
        to the upstream it named (the pre-opened one is dropped)."""
        if opened is not None and opened.serves(upstream):
            return opened
        if opened is not None:
            opened.abandon()
        return open_upstream(self.ctx.reactor, self.ctx.reactor, upstream.endpoint,
                             self.ctx.config.backend.timeout, upstream.name, upstream.verify_tls,
                             upstream.ca_pem)

    def _refused(self, result: LoginResult, mechanism: str, started: float) -> None:
        self.login.log(result, mechanism, started)
        if not self.closed:
            self.perform(self.dialogue.login_failed(result.outcome))

    def _upstream_ready(self, backend: BackendSession, result: LoginResult, mechanism: str,
                        started: float) -> None:
        # An old-server session's lease lasts as long as its connection there (leases.py).
        backend.protocol.on_lost.append(self._give_back_lease)
        if self.closed:
            backend.transport.loseConnection()
            self.login.log(result, mechanism, started, "client gone")
            return
        self.backend = backend
        backend.protocol.on_lost.append(self._upstream_lost)
        assert result.upstream is not None
        self.account, self.served_by = result.upstream.address, result.upstream.served_by
        self.uidls = result.upstream.uidls
        metrics.session_opened(self.protocol_name, self.served_by)
        self.perform(self.dialogue.login_succeeded(backend.capabilities))
        self.login.log(result, mechanism, started)

    def _upstream_failed(self, failure: Failure, result: LoginResult, mechanism: str,
                         started: float) -> None:
        refused = failure.check(BackendRefused)
        if refused and not self.closed and time.monotonic() < self.refusals_retried_until:
            # Provisioned moments ago: the store may not have read it yet (see login.py).
            log.debug("upstream_login_retried", address=result.address,
                      reason=failure.getErrorMessage())
            self.ctx.reactor.callLater(REFUSAL_RETRY_INTERVAL, self._log_in_upstream, None,
                                       result, mechanism, started)
            return
        self._give_back_lease()
        name = result.upstream.name if result.upstream else "store"
        reason = f"{name} {'refused' if refused else 'unavailable'}: {failure.getErrorMessage()}"
        self.login.log(LoginResult(Outcome.UNAVAILABLE, result.address, reason), mechanism,
                       started)
        if not self.closed:
            self.perform(self.dialogue.login_failed(Outcome.UNAVAILABLE))

    def _upstream_lost(self) -> None:
        unsplice_and_close(self.transport)  # type: ignore[arg-type]

    # -- relaying ------------------------------------------------------------------------
    def start_relay(self, pipelined: bytes) -> None:
        """The dialogue is over: bytes both ways from here, and the session is registered."""
        assert self.backend is not None and self.account is not None
        self.client.cancel_deadline()
        self.ctx.registry.add(self.account, self)
        translator = UidlTranslator(self.uidls) if self.uidls is not None else None
        self.relay = Splice(self.transport, self.backend.transport,  # type: ignore[arg-type]
                            self.ctx.reactor, self.response_boundary(), translator)
        self.backend.protocol.forward = self.relay.from_upstream
        self.relay.start(self.backend.pending, pipelined)
        # An old-server session whose account's sessions were closed everywhere while its
        # login was still being decided or connected (a switch under way) goes too. A store
        # session here may be a login that a switch held: it is where the account now lives.
        closed = self.ctx.registry.closed_since(self.account, self.login_started)
        if closed is not None and self.served_by == "old":
            self.close_on_request(closed)

    def _take_lease(self, lease: int) -> None:
        self.lease = lease
        if self.ctx.leases is not None:
            self.ctx.leases.taken(lease)

    def _give_back_lease(self) -> None:
        lease, self.lease = self.lease, None
        if lease is not None and self.ctx.leases is not None:
            self.ctx.leases.give_back(lease)

    def close_on_request(self, reason: str) -> None:
        """The account's sessions are being closed everywhere (see frontends/registry.py)."""
        if self.relay is not None:
            self.relay.close(self.goodbye(reason))

    # -- protocol-specific hooks ---------------------------------------------------------
    def response_boundary(self) -> ResponseBoundary | None:
        """A follower of the upstream's responses, for protocols that can say goodbye."""
        return None

    def goodbye(self, reason: str) -> bytes | None:
        """What to tell the client when its relayed session is closed on request."""
        return None


class SessionFactory(protocol.Factory):
    def __init__(self, session_class: Any, ctx: FrontendContext,
                 implicit_tls: bool = False) -> None:
        self.session_class = session_class  # any callable (ctx, implicit_tls) -> Protocol
        self.ctx = ctx
        self.implicit_tls = implicit_tls

    def buildProtocol(self, addr: object) -> protocol.Protocol:
        session = self.session_class(self.ctx, self.implicit_tls)
        session.factory = self
        return session
