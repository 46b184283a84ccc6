"""Submission (RFC 6409): authenticated users' outgoing mail, all of it to `smtp.outbound`.

The inbound session's protocol (DATA rules, one next hop per transaction, STARTTLS) plus AUTH
PLAIN and LOGIN, which run the same login decision as IMAP and POP3 (failure delay, throttling,
logging from ProxySession): a user whose first contact with the new setup is sending mail is
migrated too. AUTH is offered only where a plaintext login is allowed (after STARTTLS when
tls.require). A user may send only as their own address: the account store has no aliases yet.
"""

from __future__ import annotations

import time

from migrating_proxy.frontends.sasl import (
    MECHANISMS,
    SaslCancelled,
    SaslCredentials,
    SaslError,
    SaslExchange,
)
from migrating_proxy.frontends.smtp import SMTPSession
from migrating_proxy.login import Credentials, LoginResult, Outcome
from migrating_proxy.routing import Route
from migrating_proxy.store.accounts import AddressError, address_key, normalise

AUTH_REFUSALS = {
    Outcome.FAILED: "535 5.7.8 Authentication credentials invalid",
    Outcome.THROTTLED: "454 4.7.0 Too many failed logins, try again later",
    Outcome.UNAVAILABLE: "454 4.7.0 Temporary authentication failure, try again later",
}


class SubmissionSession(SMTPSession):
    protocol_name = "submission"

    def extensions(self) -> list[str]:
        auth = [f"AUTH {' '.join(MECHANISMS)}"] if self.plaintext_login_allowed else []
        return [*super().extensions(), *auth]

    def do_AUTH(self, arg: bytes) -> None:
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
            self.sasl = SaslExchange(mechanism)
            if len(words) == 2:  # the initial response (RFC 4954 section 4)
                self.sasl_response(words[1])
            else:
                self.write_line("334 " + self.sasl.first_challenge())

    def sasl_response(self, line: bytes) -> None:
        exchange, self.sasl = self.sasl, None
        assert exchange is not None
        try:
            step = exchange.step(line)
        except SaslCancelled:
            self.error("501 5.0.0 Authentication cancelled")
        except SaslError as exc:
            self.error(f"501 5.5.2 {exc}")
        else:
            if isinstance(step, SaslCredentials):
                self.begin_login(*step.as_text(), f"AUTH {exchange.mechanism}")
            else:
                self.sasl = exchange
                self.write_line("334 " + step)

    def begin_login(self, username: str, password: str, mechanism: str) -> None:
        """The shared decision, without the store session IMAP and POP3 relay to afterwards."""
        started = time.monotonic()
        creds = Credentials(username, password, self.protocol_name, self.peer_host)
        decided = self.in_thread(self.ctx.login_service.authenticate, creds)
        decided.addCallback(self._authenticated, mechanism, started)
        decided.addErrback(self._internal_error, mechanism, started)

    def _authenticated(self, result: LoginResult, mechanism: str, started: float) -> None:
        if not result.ok:
            self._refuse(result, mechanism, started)  # fixed delay, then answer_login_failed
            return
        self._log(result, mechanism, started, "" if self.state != "closed" else "client gone")
        self.user = result.address
        self.resume("235 2.7.0 Authentication successful")

    def answer_login_failed(self, outcome: Outcome) -> None:
        self.write_line(AUTH_REFUSALS[outcome])

    def check_sender(self, sender: str) -> str:
        if self.user is None:
            return "530 5.7.0 Authentication required"
        try:
            owned = address_key(sender) == address_key(self.user)
        except AddressError:
            owned = False  # the null sender too: users do not send bounces
        return "" if owned else "553 5.7.1 Sender address not owned by the authenticated user"

    def route_recipient(self, address: str) -> Route:
        try:
            address = normalise(address)
        except AddressError:
            return Route(address, reply="553 5.1.3 Bad recipient address syntax")
        outbound = self.smtp.outbound
        assert outbound is not None  # the configuration requires it with listen.submission
        return Route(address, outbound)
