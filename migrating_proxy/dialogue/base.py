"""What every dialogue shares: the input buffer, the state, the actions out, the login's end.

Subclasses (one per protocol) implement `greet`, `process` (run every complete command while the
state is COMMANDS) and the wording hooks; they call `write_line`, `start_tls`, `authenticate`,
`close` and friends, which queue actions. The public methods return the queued actions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from migrating_proxy.dialogue.actions import (
    Action,
    Authenticate,
    Close,
    Relay,
    Reply,
    SessionState,
    StartTLS,
)
from migrating_proxy.dialogue.lines import LineBuffer, LineTooLong
from migrating_proxy.dialogue.sasl import Aborted, Attempt, SaslAuthentication, SaslStep
from migrating_proxy.login import Outcome

LOGIN_TIMED_OUT = "Login timed out."


@dataclass(frozen=True)
class DialogueSettings:
    """The limits and TLS facts a dialogue needs (from the configuration)."""

    max_line: int = 8192
    max_literal: int = 8192
    max_failures: int = 3  # failed logins before the connection is closed
    tls_available: bool = False  # STARTTLS/STLS can be offered
    tls_required: bool = False  # no authentication before TLS


class Dialogue:
    sasl_command = "AUTH"  # how the log names a SASL login: "<command> <mechanism>"
    sasl_prompt = "+"  # what precedes a challenge

    def __init__(self, settings: DialogueSettings, tls_active: bool = False) -> None:
        self.settings = settings
        self.buffer = LineBuffer(settings.max_line)
        self.state = SessionState.COMMANDS
        self.tls_active = tls_active  # implicit TLS listeners start with it
        self.failures = 0
        self.deadline_passed = False  # the login must end now, whatever its outcome
        self.sasl: SaslAuthentication | None = None  # an AUTHENTICATE/AUTH under way
        self.out: list[Action] = []

    # -- what the session calls ----------------------------------------------------------
    def greeting(self) -> list[Action]:
        self.greet()
        return self._flush()

    def receive(self, data: bytes) -> list[Action]:
        if self.state in (SessionState.CLOSED, SessionState.RELAYING):
            return []
        self.buffer.feed(data)
        if self.state is SessionState.COMMANDS:
            self.run()
        elif len(self.buffer) > self.settings.max_line + self.settings.max_literal:
            # Pipelined input while something is being decided; bounded all the same.
            self.close_with_error("Too much data sent before login completed.")
        return self._flush()

    def login_failed(self, outcome: Outcome) -> list[Action]:
        """The decision (or the upstream) refused the `Authenticate` this dialogue asked for."""
        if self.state is SessionState.CLOSED:
            return []
        self.failures += 1
        self.state = SessionState.COMMANDS
        self.answer_login_failed(outcome)
        if outcome is Outcome.UNAVAILABLE:
            self.close_after_answer("Service temporarily unavailable.")
        elif self.failures >= self.settings.max_failures:
            self.close_after_answer("Too many failed logins.")
        elif self.deadline_passed:
            self.close_after_answer(LOGIN_TIMED_OUT)
        else:
            self.run()  # commands the client pipelined after the failed login
        return self._flush()

    def login_succeeded(self, capabilities: str) -> list[Action]:
        """The login was accepted and the upstream is ready: relay from here on."""
        if self.state is SessionState.CLOSED:
            return []
        self.answer_login_ok(capabilities)
        self.state = SessionState.RELAYING
        self.out.append(Relay(self.buffer.rest()))
        return self._flush()

    def timed_out(self) -> list[Action]:
        """The client was silent for the idle timeout."""
        if self.state not in (SessionState.CLOSED, SessionState.RELAYING):
            self.close_with_error("Disconnected for inactivity.")
        return self._flush()

    def login_deadline(self) -> list[Action]:
        """The absolute pre-login deadline passed (limits.login_timeout)."""
        self.deadline_passed = True
        if self.state is SessionState.COMMANDS:
            self.close_with_error(LOGIN_TIMED_OUT)
        return self._flush()  # authenticating: the answer to that login closes

    # -- for subclasses ------------------------------------------------------------------
    def run(self) -> None:
        try:
            self.process()
        except LineTooLong:
            self.line_too_long()

    def process(self) -> None:
        """Run every complete command (or SASL response) until input runs out or a command
        needs the world (a login, a recipient, TLS) or ends the dialogue."""
        while self.state is SessionState.COMMANDS:
            line = self.next_line()
            if line is None:
                return
            if self.sasl is not None:
                self.sasl_step(self.sasl.respond(line))
            else:
                self.command_line(line)

    def next_line(self) -> bytes | None:
        return self.buffer.line()

    def handler(self, verb: bytes) -> Any:
        """The `do_<VERB>` method for a command word; only ASCII letters can name one."""
        if not (verb.isalpha() and verb.isascii()):
            return None
        return getattr(self, f"do_{verb.decode('ascii').upper()}", None)

    def write_line(self, text: str) -> None:
        if self.state is not SessionState.CLOSED:
            self.out.append(Reply(text.encode("utf-8") + b"\r\n"))

    def start_tls(self) -> None:
        # Anything the client sent after the STARTTLS command arrived in clear text and could
        # have been injected by a man in the middle (CVE-2011-0411): drop it, never run it.
        self.buffer.clear()
        self.out.append(StartTLS())
        self.tls_active = True

    def authenticate(self, username: str, password: str, mechanism: str) -> None:
        self.state = SessionState.AUTHENTICATING
        self.out.append(Authenticate(username, password, mechanism))

    def begin_sasl(self, mechanism: str, initial_response: bytes | None) -> None:
        self.sasl = SaslAuthentication(mechanism)
        self.sasl_step(self.sasl.start(initial_response))

    def sasl_step(self, step: SaslStep) -> None:
        """The one place a SASL step becomes a challenge, an error or a login attempt."""
        exchange = self.sasl
        assert exchange is not None
        if isinstance(step, Aborted):
            self.sasl = None
            self.sasl_aborted(step)
        elif isinstance(step, Attempt):
            self.sasl = None
            self.authenticate(step.username, step.password,
                              f"{self.sasl_command} {exchange.mechanism}")
        else:
            self.write_line(f"{self.sasl_prompt} {step.text}")

    def close(self) -> None:
        if self.state is not SessionState.CLOSED:
            self.buffer.clear()
            self.out.append(Close())
            self.state = SessionState.CLOSED

    def close_with_error(self, message: str) -> None:
        self.say_bye(message)
        self.close()

    def close_after_answer(self, message: str) -> None:
        """Close right after a command's final answer (IMAP adds a BYE; POP3 overrides)."""
        self.close_with_error(message)

    def line_too_long(self) -> None:
        self.close_with_error("Line too long.")

    @property
    def plaintext_login_allowed(self) -> bool:
        return self.tls_active or not self.settings.tls_required

    @property
    def offers_starttls(self) -> bool:
        return self.settings.tls_available and not self.tls_active

    def _flush(self) -> list[Action]:
        out, self.out = self.out, []
        return out

    # -- protocol hooks ------------------------------------------------------------------
    def greet(self) -> None:
        raise NotImplementedError

    def command_line(self, line: bytes) -> None:
        raise NotImplementedError

    def say_bye(self, message: str) -> None:
        raise NotImplementedError

    def answer_login_ok(self, capabilities: str) -> None:
        raise NotImplementedError

    def answer_login_failed(self, outcome: Outcome) -> None:
        raise NotImplementedError

    def sasl_aborted(self, step: Aborted) -> None:
        raise NotImplementedError
