"""Inbound SMTP, the migrating domains' MX: route each recipient, pass the message on, queue none.

The dialogue (commands, envelope, DATA rules) is dialogue/smtp.py, sans-IO; this session only
carries its actions out, sharing the client side (replies, STARTTLS, timers) with IMAP and POP3
through a `ClientConnection` and the login with them through a `LoginRunner`. Policy is a small
handler object (aiosmtpd's model): `InboundHandler` here, `SubmissionHandler` for
`listen.submission`. Not twisted.mail.smtp: that server lets an over-long line inside DATA fall
back into command mode, buffers without bound and runs commands pipelined with STARTTLS (see
docs/twisted-mail.md).

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

The message is streamed: each `MessageData` (whole lines, as the dialogue's DataReader checked
them) goes to the hop as it arrives, and the sender's connection is read only as fast as the
hop takes it (delivery.py), so memory per transaction does not grow with the message. Routing
(the account store) runs in the SMTP thread pool; the hop's dialogue runs on the reactor.
"""

from __future__ import annotations

import time
from typing import Any

import structlog
from twisted.internet import defer, protocol
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure

from migrating_proxy import metrics
from migrating_proxy.cacerts import UpstreamTrust
from migrating_proxy.delivery import NextHop
from migrating_proxy.dialogue import (
    Action,
    AddRecipient,
    Authenticate,
    EndOfMessage,
    EndTransaction,
    MessageData,
    MessageRefused,
    SessionState,
)
from migrating_proxy.dialogue.smtp import SmtpDialogue, SmtpSettings, Transaction
from migrating_proxy.endpoints import Endpoint
from migrating_proxy.frontends.connection import ClientConnection, idle_seconds
from migrating_proxy.frontends.session import FrontendContext, LoginRunner
from migrating_proxy.login import LoginResult
from migrating_proxy.routing import Route, route

log = structlog.get_logger("migrating_proxy.smtp")


class InboundHandler:
    """The MX's policy: mail from anyone, each recipient routed by the account store."""

    protocol_name = "smtp"
    submission = False  # no AUTH, no login deadline

    def __init__(self, ctx: FrontendContext) -> None:
        self.ctx = ctx
        # Recipients found to have an account, for the rest of the session: a sender with
        # many messages for one user pays one account lookup, not one per message. Only
        # these: "no account" is asked again each time, so an account created meanwhile
        # gets its mail at once instead of the old server's.
        self.local_routes: dict[str, Route] = {}

    def check_sender(self, sender: str, user: str | None) -> str:
        """A refusal for this envelope sender, or "". Inbound mail may come from anyone."""
        return ""

    def route_name(self, found: Route) -> str:
        """Where a recipient was bound, as a bounded metric label."""
        if found.next_hop is None:
            return "none"
        return "store" if found.local else "old_server"

    def known_route(self, address: str) -> Route | None:
        """On the reactor: the route if it is known without the store, else None. A thread
        hand-off per RCPT cost more CPU than the rest of the message's way together."""
        return self.local_routes.get(address)

    def route(self, address: str) -> Route:
        """In a thread: where this recipient's copy goes (see migrating_proxy.routing)."""
        found = route(self.ctx.login_service.accounts, self.ctx.config.backend.delivery,
                      address)
        if found.local and len(self.local_routes) < self.ctx.config.smtp.max_recipients:
            self.local_routes[address] = found
        return found


class SMTPSession(protocol.Protocol):
    def __init__(self, ctx: FrontendContext, implicit_tls: bool = False,
                 handler: type[InboundHandler] = InboundHandler) -> None:
        self.ctx = ctx
        self.smtp = ctx.config.smtp
        self.handler = handler(ctx)
        self.protocol_name = self.handler.protocol_name
        self.implicit_tls = implicit_tls
        self.client = ClientConnection(ctx.reactor, ctx.tls_options, implicit_tls)
        self.login = LoginRunner(ctx, self.protocol_name, self.client)
        self.dialogue: SmtpDialogue | None = None  # made once the peer is known
        # The last transaction's hop connection, kept for the next transaction of this
        # session: a sender with many messages pays one connect + LHLO, not one per message.
        self.spare: NextHop | None = None

    # -- connection lifecycle ------------------------------------------------------------
    def connectionMade(self) -> None:
        self.client.made(self.transport)  # type: ignore[arg-type]
        settings = SmtpSettings(self.smtp.banner_name, self.smtp.max_message_size,
                                self.smtp.max_recipients, self.handler.submission)
        self.dialogue = SmtpDialogue(self.ctx.dialogue_settings, settings,
                                     self.client.peer_host, self.implicit_tls,
                                     self.handler.check_sender)
        if self.handler.submission:
            self.client.deadline(self.ctx.config.limits.login_timeout, self._login_deadline)
        self.perform(self.dialogue.greeting())

    def dataReceived(self, data: bytes) -> None:
        self.perform(self._dialogue.receive(data))

    def connectionLost(self, reason: Any = None) -> None:
        waiting = self._dialogue.state in (SessionState.BUSY, SessionState.AUTHENTICATING)
        self.client.lost()
        if not waiting:  # else a recipient or the hop's verdict is pending: its callback releases
            self.release_hops()

    @property
    def _dialogue(self) -> SmtpDialogue:
        assert self.dialogue is not None
        return self.dialogue

    @property
    def closed(self) -> bool:
        return self.client.closed

    # -- carrying out the dialogue's actions ---------------------------------------------
    def perform(self, actions: list[Action]) -> None:
        self.client.carry_out(actions, self._session_action)
        self.client.idle(idle_seconds(self._dialogue.state, self.ctx.config.limits.idle_timeout,
                                      self.smtp.data_timeout), self._timed_out)

    def _session_action(self, action: Action) -> None:
        if isinstance(action, MessageData):
            self.message_data(action.txn, action.data)
        elif isinstance(action, AddRecipient):
            defer.Deferred.fromCoroutine(self.add_recipient(action.txn, action.address)) \
                .addCallbacks(self.resume, self.internal_error)
        elif isinstance(action, EndOfMessage):
            defer.Deferred.fromCoroutine(self.end_of_message(action.txn)).addCallbacks(
                self.delivered, self.internal_error, callbackArgs=(action.txn, action.size))
        elif isinstance(action, MessageRefused):
            self.log_message(action.txn, action.size, action.reply)
        elif isinstance(action, EndTransaction):
            self.end_transaction(action.txn)
        elif isinstance(action, Authenticate):
            self.authenticate(action)

    def in_thread(self, function: Any, *args: Any) -> defer.Deferred[Any]:
        """Run blocking work (store lookups) off the reactor; commands wait."""
        return deferToThreadPool(self.ctx.reactor, self.ctx.threadpool, function, *args)

    def resume(self, reply: str) -> None:
        """Answer the command that went to a thread, then run what was pipelined behind it."""
        if self.closed:
            self.release_hops()
            return
        self.perform(self._dialogue.resume(reply))

    def internal_error(self, failure: Failure) -> None:
        log.error("smtp_internal_error", peer=self.client.peer_host,
                  error=failure.getErrorMessage(), kind=failure.type.__name__)
        if self.closed:
            self.release_hops()
            return
        self.perform(self._dialogue.resume("451 4.3.0 Internal error, try again later",
                                           end_transaction=True))

    def _timed_out(self) -> None:
        self.perform(self._dialogue.timed_out())

    def _login_deadline(self) -> None:
        self.perform(self._dialogue.login_deadline())

    # -- recipients ----------------------------------------------------------------------
    async def add_recipient(self, txn: Transaction, address: str) -> str:
        """Route (in a thread unless known), then ask the hop. Returns the reply for the
        sender."""
        found = self.handler.known_route(address) \
            or await self.in_thread(self.handler.route, address)
        reply = await self.ask_next_hop(txn, found)
        metrics.smtp_recipient(self.protocol_name, self.handler.route_name(found), reply)
        return reply

    async def ask_next_hop(self, txn: Transaction, found: Route) -> str:
        if found.next_hop is None:
            return found.reply
        if txn.hop is not None and (
            txn.hop.endpoint != found.next_hop
            or len(txn.recipients) >= (txn.hop.max_recipients or self.smtp.max_recipients)
        ):
            # Another next hop, or one more LMTP recipient: a later transaction (see above).
            return "452 4.5.3 Too many recipients for this transaction, send separately"
        if txn.hop is None:
            hop = self.hop_for(found.next_hop, found.trust)
            opened, reply = await hop.open(txn.sender, txn.options, found.address)
            if reply is None:  # MAIL not accepted
                self.spare = hop  # closed by open() if unusable; else kept for later
                return opened
            txn.hop = hop
        else:
            reply = await txn.hop.rcpt(found.address)
        if reply.startswith("2"):
            txn.recipients.append(found.address)
        return reply

    def hop_for(self, endpoint: Endpoint, trust: UpstreamTrust) -> NextHop:
        """The spare connection if it goes to the same hop, else a new one."""
        spare, self.spare = self.spare, None
        if spare is not None and (spare.endpoint, spare.trust) == (endpoint, trust):
            return spare
        if spare is not None:
            spare.close()
        return NextHop(self.ctx.reactor, endpoint, self.smtp.banner_name, self.smtp.timeout,
                       trust)

    # -- the message ---------------------------------------------------------------------
    def message_data(self, txn: Transaction, data: bytes) -> None:
        """Lines of the message as they arrive: straight on to the hop (bounded there)."""
        assert txn.hop is not None
        txn.hop.send(data, self.transport)

    @staticmethod
    async def end_of_message(txn: Transaction) -> str:
        assert txn.hop is not None
        return await txn.hop.end_data()

    def delivered(self, reply: str, txn: Transaction, size: int) -> None:
        self.log_message(txn, size, reply)
        if self.closed:
            self.release_hops()
            return
        self.perform(self._dialogue.delivered(reply))

    def log_message(self, txn: Transaction, size: int, reply: str) -> None:
        hop = txn.hop.endpoint.url if txn.hop else None
        event = log.info if reply.startswith("2") else log.warning
        event("smtp_message", peer=self.client.peer_host, sender=txn.sender,
              recipients=len(txn.recipients), next_hop=hop, size=size, reply=reply)

    # -- transaction end -----------------------------------------------------------------
    def end_transaction(self, txn: Transaction) -> None:
        """The transaction's hop connection becomes the spare (reset when reused), unless a
        message was begun there and not finished: then it is dropped, and the message with
        it."""
        hop, txn.hop = txn.hop, None
        if hop is None:
            return
        hop.abandon()
        if self.closed or self.spare is not None or not hop.reusable:
            hop.close()
        else:
            self.spare = hop

    def release_hops(self) -> None:
        if self._dialogue.txn is not None:
            self.end_transaction(self._dialogue.txn)
        spare, self.spare = self.spare, None
        if spare is not None:
            spare.close()

    # -- submission's login --------------------------------------------------------------
    def authenticate(self, attempt: Authenticate) -> None:
        started = time.monotonic()
        self.login.decide(attempt).addCallback(self._authenticated, attempt.mechanism, started)

    def _authenticated(self, result: LoginResult, mechanism: str, started: float) -> None:
        if not result.ok:
            self.login.after_delay(result).addCallback(self._refused, mechanism, started)
            return
        self.login.log(result, mechanism, started, "client gone" if self.closed else "")
        if self.closed:
            self.release_hops()
            return
        self.client.cancel_deadline()
        assert result.address is not None
        self.perform(self._dialogue.authenticated(result.address))

    def _refused(self, result: LoginResult, mechanism: str, started: float) -> None:
        self.login.log(result, mechanism, started)
        if self.closed:
            self.release_hops()
            return
        self.perform(self._dialogue.login_failed(result.outcome))
