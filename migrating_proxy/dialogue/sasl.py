"""SASL before login, shared by IMAP, POP3 and submission: PLAIN (RFC 4616) and LOGIN.

`SaslAuthentication` is the one step handler: start it with the mechanism (and the initial
response, if the command carried one), feed it each client response, and it says what comes
next: a `Challenge` to send, the `Attempt` to decide, or `Aborted` with the reason. Each
dialogue only words these (`+ ...` in IMAP and POP3, `334 ...` in SMTP; its own error lines).
Every result is turned into text for the login decision by `login_text`, which never lets raw
bytes through: undecodable input becomes a username that can never match an account, so it is
refused like any other failed login (same delay, same log).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field

MECHANISMS = ("PLAIN", "LOGIN")
CANCEL = b"*"  # RFC 4422 section 3.5: the client aborts the exchange
# Not a valid address (normalise() rejects it), so the login decision answers FAILED.
UNUSABLE_USERNAME = "\ufffd"
USERNAME_PROMPT = base64.b64encode(b"Username:").decode("ascii")
PASSWORD_PROMPT = base64.b64encode(b"Password:").decode("ascii")


class SaslError(Exception):
    """The client's response is malformed; the message can be shown to the client."""


class SaslCancelled(Exception):
    """The client sent `*`."""


@dataclass(frozen=True)
class SaslCredentials:
    authzid: bytes
    authcid: bytes
    password: bytes = field(repr=False)

    def as_text(self) -> tuple[str, str]:
        """(username, password) for `begin_login`; unusable when acting for someone else."""
        if self.authzid and self.authzid != self.authcid:
            # Clients may not log in as somebody else; only the proxy's master user may.
            return UNUSABLE_USERNAME, ""
        return login_text(self.authcid, self.password)


def login_text(username: bytes, password: bytes) -> tuple[str, str]:
    """Strict UTF-8, or an unusable username: bytes never reach the login decision."""
    try:
        return username.decode("utf-8"), password.decode("utf-8")
    except UnicodeDecodeError:
        return UNUSABLE_USERNAME, ""


def decode_response(response: bytes) -> bytes:
    """A base64 client response; `=` is the empty response (RFC 4959, RFC 5034)."""
    if response == b"=":
        return b""
    try:
        return base64.b64decode(response, validate=True)
    except (binascii.Error, ValueError):
        raise SaslError("Invalid base64 data in SASL response.") from None


def split_plain(decoded: bytes) -> SaslCredentials:
    parts = decoded.split(b"\0")
    if len(parts) != 3:
        raise SaslError("Invalid PLAIN response.")
    return SaslCredentials(*parts)


class SaslExchange:
    """One PLAIN or LOGIN exchange: feed it responses, get the next challenge or credentials."""

    def __init__(self, mechanism: str) -> None:
        if mechanism not in MECHANISMS:
            raise ValueError(mechanism)
        self.mechanism = mechanism
        self.username: bytes | None = None

    def first_challenge(self) -> str:
        return "" if self.mechanism == "PLAIN" else USERNAME_PROMPT

    def step(self, response: bytes) -> str | SaslCredentials:
        """The next challenge (base64 text), or the final credentials.

        Raises SaslCancelled for `*` and SaslError for malformed responses; either ends it.
        """
        if response == CANCEL:
            raise SaslCancelled
        decoded = decode_response(response)
        if self.mechanism == "PLAIN":
            return split_plain(decoded)
        if self.username is None:
            self.username = decoded
            return PASSWORD_PROMPT
        return SaslCredentials(b"", self.username, decoded)


@dataclass(frozen=True)
class Challenge:
    text: str  # base64; "" for the empty challenge


@dataclass(frozen=True)
class Attempt:
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class Aborted:
    message: str  # safe to show the client
    cancelled: bool = False  # the client sent `*` (else: a malformed response)


SaslStep = Challenge | Attempt | Aborted


class SaslAuthentication:
    """One AUTHENTICATE / AUTH exchange, whatever the protocol around it."""

    def __init__(self, mechanism: str) -> None:
        self.exchange = SaslExchange(mechanism)
        self.mechanism = mechanism

    def start(self, initial_response: bytes | None) -> SaslStep:
        """The first step: the initial response's (SASL-IR, RFC 4959/5034/4954) or the
        first challenge."""
        if initial_response is not None:
            return self.respond(initial_response)
        return Challenge(self.exchange.first_challenge())

    def respond(self, response: bytes) -> SaslStep:
        try:
            step = self.exchange.step(response)
        except SaslCancelled:
            return Aborted("cancelled", cancelled=True)
        except SaslError as exc:
            return Aborted(str(exc))
        if isinstance(step, SaslCredentials):
            return Attempt(*step.as_text())
        return Challenge(step)
