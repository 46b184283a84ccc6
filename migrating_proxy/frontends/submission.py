"""Submission (RFC 6409): authenticated users' outgoing mail, all of it to `smtp.outbound`.

The inbound session (frontends/smtp.py: DATA rules, one next hop per transaction, STARTTLS)
with this handler: AUTH PLAIN and LOGIN offered (the dialogue's `submission` setting), which
run the same login decision as IMAP and POP3 (failure delay, throttling, logging: the shared
LoginRunner), so a user whose first contact with the new setup is sending mail is migrated too.
AUTH is offered only where a plaintext login is allowed (after STARTTLS when tls.require). A
user may send only as their own address: the account store has no aliases yet.
"""

from __future__ import annotations

from migrating_proxy.frontends.session import FrontendContext
from migrating_proxy.frontends.smtp import InboundHandler, SMTPSession
from migrating_proxy.routing import Route
from migrating_proxy.store.accounts import AddressError, address_key, normalise


class SubmissionHandler(InboundHandler):
    protocol_name = "submission"
    submission = True

    def check_sender(self, sender: str, user: str | None) -> str:
        if user is None:
            return "530 5.7.0 Authentication required"
        try:
            owned = address_key(sender) == address_key(user)
        except AddressError:
            owned = False  # the null sender too: users do not send bounces
        return "" if owned else "553 5.7.1 Sender address not owned by the authenticated user"

    def route_name(self, found: Route) -> str:
        return "outbound" if found.next_hop is not None else "none"

    def known_route(self, address: str) -> Route | None:
        return self.route(address)  # everything goes to smtp.outbound: no store to ask

    def route(self, address: str) -> Route:
        try:
            address = normalise(address)
        except AddressError:
            return Route(address, reply="553 5.1.3 Bad recipient address syntax")
        outbound = self.ctx.config.smtp.outbound
        assert outbound is not None  # the configuration requires it with listen.submission
        return Route(address, outbound)


def SubmissionSession(ctx: FrontendContext, implicit_tls: bool = False) -> SMTPSession:
    """The `listen.submission` session: an SMTP session with the submission handler."""
    return SMTPSession(ctx, implicit_tls, SubmissionHandler)
