"""POP3 before login: greeting, CAPA, STLS, USER/PASS, AUTH, QUIT; then the relay.

Only the AUTHORIZATION state is implemented here (RFC 1939, CAPA and response codes from
RFC 2449, STLS from RFC 2595, AUTH from RFC 5034, mechanisms PLAIN and LOGIN). The TRANSACTION
state is the upstream's: after the login the bytes are relayed unparsed, so dot-stuffing, UIDL
and friends are exactly what the server does (docs/twisted-mail.md says why twisted.mail.pop3
is not used).
"""

from __future__ import annotations

from migrating_proxy.dialogue.base import Dialogue
from migrating_proxy.dialogue.sasl import MECHANISMS, Aborted, login_text
from migrating_proxy.login import Outcome

MAX_ERRORS = 10
UNKNOWN_COMMAND = "Unknown command or not allowed before login."
PLAINTEXT_DISALLOWED = "[AUTH] Plaintext authentication disallowed on non-secure connections."
REFUSALS = {
    Outcome.FAILED: "-ERR [AUTH] Authentication failed.",
    Outcome.THROTTLED: "-ERR [SYS/TEMP] Too many failed logins, try again later.",
    Outcome.UNAVAILABLE: "-ERR [SYS/TEMP] Service temporarily unavailable.",
}


class Pop3PreLogin(Dialogue):
    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.user: bytes | None = None  # from USER, waiting for PASS
        self.errors = 0

    # -- wording -------------------------------------------------------------------------
    def capabilities(self) -> list[str]:
        caps = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self.plaintext_login_allowed:
            caps += ["USER", "SASL " + " ".join(MECHANISMS)]
        if self.offers_starttls:
            caps.append("STLS")
        return [*caps, "IMPLEMENTATION migrating-proxy"]

    def greet(self) -> None:
        self.write_line("+OK Mail service ready.")

    def say_bye(self, message: str) -> None:
        self.write_line(f"-ERR {message}")

    def close_after_answer(self, message: str) -> None:
        # POP3 has exactly one reply per command and no unsolicited BYE: the refusal that was
        # just sent is the last word.
        self.close()

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

    # -- commands ------------------------------------------------------------------------
    def command_line(self, line: bytes) -> None:
        keyword, space, rest = line.partition(b" ")
        handler = self.handler(keyword)
        if handler is None:
            self.error(UNKNOWN_COMMAND)
            return
        handler(rest if space else None)

    def do_CAPA(self, arg: bytes | None) -> None:
        self.write_line("+OK Capability list follows")
        for capability in self.capabilities():
            self.write_line(capability)
        self.write_line(".")

    def do_QUIT(self, arg: bytes | None) -> None:
        self.write_line("+OK Logging out")
        self.close()

    def do_STLS(self, arg: bytes | None) -> None:
        if not self.settings.tls_available:
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
            self.authenticate(*login_text(user, arg), "USER")

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
            self.begin_sasl(mechanism, words[1] if len(words) == 2 else None)

    def list_mechanisms(self) -> None:
        self.write_line("+OK")
        if self.plaintext_login_allowed:
            for mechanism in MECHANISMS:
                self.write_line(mechanism)
        self.write_line(".")

    def sasl_aborted(self, step: Aborted) -> None:
        self.error("Authentication cancelled." if step.cancelled else step.message)
