"""IMAP before login: greeting, CAPABILITY, NOOP, ID, LOGOUT, STARTTLS, LOGIN, AUTHENTICATE.

Only the not-authenticated state of RFC 9051/3501 is implemented here, completely and strictly
(literals `{n}` and `{n+}`, SASL-IR, PLAIN and LOGIN mechanisms). Everything after login is the
upstream's: the bytes are relayed unparsed.
"""

from __future__ import annotations

import re

from migrating_proxy.dialogue.base import Dialogue
from migrating_proxy.dialogue.lines import bounded_int
from migrating_proxy.dialogue.sasl import MECHANISMS, Aborted, login_text
from migrating_proxy.login import Outcome

LITERAL_AT_END = re.compile(rb"\{(\d+)(\+?)\}$")
# tag = 1*<any ASTRING-CHAR except "+"> (RFC 9051): printable ASCII minus atom-specials and "+".
TAG = re.compile(rb'^[^(){%*"\\+\x00-\x20\x7f-\xff]+$')
MAX_LITERALS = 4  # LOGIN needs two; nothing before login needs more
MAX_BAD_COMMANDS = 10
ATOM_FORBIDDEN = set(b'(){ %*"\\') | set(range(32)) | {127}
REFUSALS = {
    Outcome.FAILED: "NO [AUTHENTICATIONFAILED] Authentication failed.",
    Outcome.THROTTLED: "NO [UNAVAILABLE] Too many failed logins, try again later.",
    Outcome.UNAVAILABLE: "NO [UNAVAILABLE] Service temporarily unavailable, try later.",
}


class Literal(bytes):
    """Bytes that arrived as a literal: taken as they are, never tokenised."""


class CommandError(Exception):
    pass


def tokenize(segments: list[bytes]) -> list[bytes | str]:
    """Atoms and quoted strings as bytes, literals as `Literal`, parentheses as str."""
    tokens: list[bytes | str] = []
    for segment in segments:
        if isinstance(segment, Literal):
            tokens.append(segment)
            continue
        i = 0
        while i < len(segment):
            char = segment[i]
            if char == 0x20:
                i += 1
            elif char in b"()":
                tokens.append(chr(char))
                i += 1
            elif char == 0x22:
                value, i = _quoted(segment, i + 1)
                tokens.append(value)
            else:
                end = i
                while end < len(segment) and segment[end] not in b" ()":
                    if segment[end] in ATOM_FORBIDDEN or segment[end] > 127:
                        raise CommandError("invalid character in atom")
                    end += 1
                tokens.append(segment[i:end])
                i = end
    return tokens


def _quoted(segment: bytes, i: int) -> tuple[bytes, int]:
    out = bytearray()
    while i < len(segment):
        char = segment[i]
        if char == 0x22:
            return bytes(out), i + 1
        if char == 0x5C:
            if i + 1 >= len(segment) or segment[i + 1] not in b'"\\':
                raise CommandError("invalid escape in quoted string")
            out.append(segment[i + 1])
            i += 2
            continue
        if char in (0, 10, 13):
            raise CommandError("control character in quoted string")
        out.append(char)
        i += 1
    raise CommandError("unterminated quoted string")


class ImapPreLogin(Dialogue):
    sasl_command = "AUTHENTICATE"

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.segments: list[bytes] = []  # the command so far: lines and literals
        self.literal_needed: int | None = None
        self.login_tag = "*"  # the LOGIN or AUTHENTICATE being answered
        self.bad_commands = 0

    # -- wording -------------------------------------------------------------------------
    def capabilities(self) -> str:
        caps = ["IMAP4rev1", "SASL-IR", "ID", "LITERAL+", "ENABLE", "IDLE"]
        if self.offers_starttls:
            caps.append("STARTTLS")
        if self.plaintext_login_allowed:
            caps += ["AUTH=PLAIN", "AUTH=LOGIN"]
        else:
            caps.append("LOGINDISABLED")
        return " ".join(caps)

    def greet(self) -> None:
        self.write_line(f"* OK [CAPABILITY {self.capabilities()}] Mail service ready.")

    def say_bye(self, message: str) -> None:
        self.write_line(f"* BYE {message}")

    def answer_login_ok(self, capabilities: str) -> None:
        code = f"[CAPABILITY {capabilities}] " if capabilities else ""
        self.write_line(f"{self.login_tag} OK {code}Logged in")

    def answer_login_failed(self, outcome: Outcome) -> None:
        self.write_line(f"{self.login_tag} {REFUSALS[outcome]}")

    def bad(self, tag: str, message: str) -> None:
        self.bad_commands += 1
        self.write_line(f"{tag} BAD {message}")
        if self.bad_commands >= MAX_BAD_COMMANDS:
            self.close_with_error("Too many invalid commands.")

    # -- framing -------------------------------------------------------------------------
    def next_line(self) -> bytes | None:
        """A literal the command announced is taken whole first; then the next line."""
        if self.literal_needed is not None:
            literal = self.buffer.take(self.literal_needed)
            if literal is None:
                return None
            self.segments.append(Literal(literal))
            self.literal_needed = None
        return self.buffer.line()

    def command_line(self, line: bytes) -> None:
        literal = LITERAL_AT_END.search(line)
        if literal is None:
            segments, self.segments = [*self.segments, line], []
            self.dispatch(segments)
            return
        size = bounded_int(literal[1], self.settings.max_literal)
        non_synchronising = bool(literal[2])
        if size is None or len(self.segments) >= 2 * MAX_LITERALS:
            tag = (self.segments[0] if self.segments else line).split(b" ", 1)[0]
            self.segments = []
            tag_text = tag.decode("ascii", "replace") if TAG.match(tag) else "*"
            self.write_line(f"{tag_text} BAD Literal too large.")
            if non_synchronising:
                # The client sends the bytes regardless; we cannot find the next command.
                self.close_with_error("Literal too large.")
            return
        self.segments.append(line[: literal.start()])
        self.literal_needed = size
        if not non_synchronising:
            self.write_line("+ OK")

    # -- commands ------------------------------------------------------------------------
    def dispatch(self, segments: list[bytes]) -> None:
        try:
            tokens = tokenize(segments)
        except CommandError as exc:
            self.bad(_tag_of(segments), f"Error in IMAP command: {exc}.")
            return
        if not tokens or not isinstance(tokens[0], bytes) or not TAG.match(tokens[0]) \
                or isinstance(tokens[0], Literal):
            self.bad("*", "Error in IMAP command received by server.")
            return
        tag = tokens[0].decode("ascii")
        if len(tokens) < 2 or not isinstance(tokens[1], bytes):
            self.bad(tag, "Missing command.")
            return
        command = tokens[1].decode("ascii", "replace").upper()
        handler = getattr(self, f"do_{command}", None)
        if handler is None or isinstance(tokens[1], Literal):
            self.bad(tag, "Unknown command or not allowed before login.")
            return
        handler(tag, tokens[2:])

    def do_CAPABILITY(self, tag: str, args: list) -> None:
        self.write_line(f"* CAPABILITY {self.capabilities()}")
        self.write_line(f"{tag} OK Capability completed.")

    def do_NOOP(self, tag: str, args: list) -> None:
        self.write_line(f"{tag} OK NOOP completed.")

    def do_LOGOUT(self, tag: str, args: list) -> None:
        self.write_line("* BYE Logging out")
        self.write_line(f"{tag} OK Logout completed.")
        self.close()

    def do_ID(self, tag: str, args: list) -> None:
        self.write_line('* ID ("name" "migrating-proxy")')
        self.write_line(f"{tag} OK ID completed.")

    def do_STARTTLS(self, tag: str, args: list) -> None:
        if not self.settings.tls_available:
            self.bad(tag, "STARTTLS is not available.")
        elif self.tls_active:
            self.bad(tag, "TLS is already active.")
        else:
            self.write_line(f"{tag} OK Begin TLS negotiation now.")
            self.start_tls()

    def do_LOGIN(self, tag: str, args: list) -> None:
        if len(args) != 2 or not all(isinstance(a, bytes) for a in args):
            self.bad(tag, "LOGIN expects a user name and a password.")
            return
        if not self.plaintext_login_allowed:
            self.write_line(f"{tag} NO [PRIVACYREQUIRED] Plaintext login needs TLS (STARTTLS).")
            return
        self.login_tag = tag
        self.authenticate(*login_text(args[0], args[1]), "LOGIN")

    def do_AUTHENTICATE(self, tag: str, args: list) -> None:
        if not args or not isinstance(args[0], bytes) or len(args) > 2:
            self.bad(tag, "AUTHENTICATE expects a mechanism.")
            return
        mechanism = args[0].decode("ascii", "replace").upper()
        if mechanism not in MECHANISMS:
            self.write_line(f"{tag} NO Unsupported authentication mechanism.")
            return
        if not self.plaintext_login_allowed:
            self.write_line(f"{tag} NO [PRIVACYREQUIRED] Authentication needs TLS (STARTTLS).")
            return
        self.login_tag = tag
        self.begin_sasl(mechanism, args[1] if len(args) == 2 else None)

    def sasl_aborted(self, step: Aborted) -> None:
        self.bad(self.login_tag, "Authentication canceled." if step.cancelled else step.message)


def _tag_of(segments: list[bytes]) -> str:
    first = segments[0].split(b" ", 1)[0] if segments else b""
    return first.decode("ascii") if first and TAG.match(first) else "*"
