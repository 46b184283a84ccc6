"""POP3 before login: greeting, CAPA, STLS, USER/PASS, AUTH; then the relay.

Only the AUTHORIZATION state is implemented here (RFC 1939, CAPA and response codes from
RFC 2449, STLS from RFC 2595, AUTH from RFC 5034, mechanisms PLAIN and LOGIN). The TRANSACTION
state is the store's: after the login the bytes are relayed unparsed, so dot-stuffing, UIDL and
friends are exactly what the store does (see /work/shared/notes/twisted-mail.md for why
twisted.mail.pop3 is not used).
"""

from __future__ import annotations

from migrating_proxy.frontends.sasl import (
    MECHANISMS,
    SaslCancelled,
    SaslCredentials,
    SaslError,
    SaslExchange,
    login_text,
)
from migrating_proxy.frontends.session import FrontendContext, ProxySession
from migrating_proxy.login import Outcome

MAX_ERRORS = 10
UNKNOWN_COMMAND = "Unknown command or not allowed before login."
PLAINTEXT_DISALLOWED = "[AUTH] Plaintext authentication disallowed on non-secure connections."
REFUSALS = {
    Outcome.FAILED: "-ERR [AUTH] Authentication failed.",
    Outcome.THROTTLED: "-ERR [SYS/TEMP] Too many failed logins, try again later.",
    Outcome.UNAVAILABLE: "-ERR [SYS/TEMP] Service temporarily unavailable.",
}


class POP3Session(ProxySession):
    protocol_name = "pop3"

    def __init__(self, ctx: FrontendContext, implicit_tls: bool = False) -> None:
        super().__init__(ctx, implicit_tls)
        self.user: bytes | None = None  # from USER, waiting for PASS
        self.errors = 0

    # -- wording -------------------------------------------------------------------------
    def capabilities(self) -> list[str]:
        caps = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self.plaintext_login_allowed:
            caps += ["USER", "SASL " + " ".join(MECHANISMS)]
        if self.ctx.tls_options is not None and not self.tls_active:
            caps.append("STLS")
        return [*caps, "IMPLEMENTATION migrating-proxy"]

    def greet(self) -> None:
        self.write_line("+OK Mail service ready.")

    def say_bye(self, message: str) -> None:
        self.write_line(f"-ERR {message}")

    def close_after_answer(self, message: str) -> None:
        # POP3 has exactly one reply per command and no unsolicited BYE: the refusal that was
        # just sent is the last word.
        self.buffer.clear()
        self.close()
        self.state = "closed"

    def answer_login_ok(self, capabilities: str) -> None:
        self.write_line("+OK Logged in.")

    def answer_login_failed(self, outcome: Outcome) -> None:
        self.write_line(REFUSALS[outcome])

    def error(self, message: str) -> None:
        """Answer a bad command; a client that keeps sending them is not a mail client."""
        self.errors += 1
        if self.errors >= MAX_ERRORS:
            self.close_with_error("Too many invalid commands.")
        else:
            self.write_line(f"-ERR {message}")

    # -- framing -------------------------------------------------------------------------
    def command_line(self, line: bytes) -> None:
        keyword, space, rest = line.partition(b" ")
        # Only ASCII letters can name a handler; anything else is just an unknown command.
        handler = getattr(self, f"do_{keyword.decode('ascii').upper()}", None) \
            if keyword.isalpha() else None
        if handler is None:
            self.error(UNKNOWN_COMMAND)
            return
        handler(rest if space else None)

    # -- commands ------------------------------------------------------------------------
    def do_CAPA(self, arg: bytes | None) -> None:
        self.write_line("+OK Capability list follows")
        for capability in self.capabilities():
            self.write_line(capability)
        self.write_line(".")

    def do_QUIT(self, arg: bytes | None) -> None:
        self.write_line("+OK Logging out")
        self.close()
        self.state = "closed"

    def do_STLS(self, arg: bytes | None) -> None:
        if self.ctx.tls_options is None:
            self.error("STLS is not available.")
        elif self.tls_active:
            self.error("Command not permitted when TLS active.")
        else:
            self.write_line("+OK Begin TLS negotiation")
            self.user = None  # nothing from before TLS carries over (RFC 2595 section 4)
            self.start_tls()

    def do_USER(self, arg: bytes | None) -> None:
        if not self.plaintext_login_allowed:
            self.error(PLAINTEXT_DISALLOWED)
        elif not arg:
            self.error("USER needs a user name.")
        else:
            self.user = arg
            self.write_line("+OK")

    def do_PASS(self, arg: bytes | None) -> None:
        # The password is the rest of the line after one space: it may contain spaces.
        if not self.plaintext_login_allowed:
            self.error(PLAINTEXT_DISALLOWED)
        elif self.user is None:
            self.error("No user name given (USER first).")
        elif arg is None:
            self.error("PASS needs a password.")
        else:
            user, self.user = self.user, None
            self.begin_login(*login_text(user, arg), "USER")

    def do_AUTH(self, arg: bytes | None) -> None:
        if arg is None:
            self.list_mechanisms()
            return
        words = arg.split(b" ")
        mechanism = words[0].decode("ascii", "replace").upper()
        if len(words) > 2 or mechanism not in MECHANISMS:
            self.error("Unsupported authentication mechanism.")
        elif not self.plaintext_login_allowed:
            self.error(PLAINTEXT_DISALLOWED)
        else:
            self.sasl = SaslExchange(mechanism)
            if len(words) == 2:  # the initial response (RFC 5034 section 4)
                self.sasl_response(words[1])
            else:
                self.write_line("+ " + self.sasl.first_challenge())

    def list_mechanisms(self) -> None:
        self.write_line("+OK")
        if self.plaintext_login_allowed:
            for mechanism in MECHANISMS:
                self.write_line(mechanism)
        self.write_line(".")

    def sasl_response(self, line: bytes) -> None:
        exchange = self.sasl
        assert exchange is not None
        try:
            step = exchange.step(line)
        except SaslCancelled:
            self.sasl = None
            self.error("Authentication cancelled.")
            return
        except SaslError as exc:
            self.sasl = None
            self.error(str(exc))
            return
        if isinstance(step, SaslCredentials):
            self.sasl = None
            self.begin_login(*step.as_text(), f"AUTH {exchange.mechanism}")
        else:
            self.write_line("+ " + step)
