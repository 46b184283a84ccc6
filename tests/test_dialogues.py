"""The pre-login dialogues at the byte level: no sockets, no Twisted, no store.

Every scenario is what a test of the end-to-end suites (test_imap_frontend.py,
test_pop3_frontend.py, test_smtp_frontend.py, test_secrets.py) sends, with the answers those
tests expect. Each is fed whole, byte by byte, split in two at every position, pipelined in one
piece, and with the login decision answering late (after everything was sent); the transcript
(replies, the actions in between, the bytes handed to the upstream) must be the same every time.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from migrating_proxy.dialogue import (
    AddRecipient,
    Authenticate,
    Close,
    EndOfMessage,
    EndTransaction,
    MessageData,
    MessageRefused,
    Relay,
    Reply,
    SessionState,
    StartTLS,
)
from migrating_proxy.dialogue.base import Dialogue, DialogueSettings
from migrating_proxy.dialogue.imap import ImapPreLogin
from migrating_proxy.dialogue.pop3 import Pop3PreLogin
from migrating_proxy.dialogue.smtp import SmtpDialogue, SmtpSettings
from migrating_proxy.login import Outcome

USER, PASSWORD = "carol@new.example", 'carol secret "quoted" pw'
POP_PASSWORD = 'carol secret "pw" \\ with spaces'
DOWN, BUSY = "down@new.example", "busy@new.example"  # the decision: unavailable, throttled
STORE_CAPS = "IMAP4rev1 IDLE UIDPLUS"
SETTINGS = DialogueSettings(tls_available=True)


def b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def plain(user: str, password: str, authzid: str = "") -> str:
    return b64(f"{authzid}\0{user}\0{password}")


def decide(attempt: Authenticate) -> Outcome:
    if attempt.username == DOWN:
        return Outcome.UNAVAILABLE
    if attempt.username == BUSY:
        return Outcome.THROTTLED
    ok = (attempt.username, attempt.password) in ((USER, PASSWORD), (USER, POP_PASSWORD))
    return Outcome.OK if ok else Outcome.FAILED


# -- the harness -------------------------------------------------------------------------------
@dataclass
class Transcript:
    steps: list[Any] = field(default_factory=list)  # reply bytes (merged) and action tuples
    upstream: bytes = b""  # what the relay sends the upstream: pipelined, then the rest
    relaying: bool = False
    closed: bool = False

    def reply(self, data: bytes) -> None:
        if self.steps and isinstance(self.steps[-1], bytes):
            self.steps[-1] += data
        else:
            self.steps.append(data)

    @property
    def text(self) -> bytes:
        return b"".join(s for s in self.steps if isinstance(s, bytes))


def run(dialogue: Dialogue, phases: list[bytes], split: Callable[[bytes], list[bytes]],
        late: bool = False) -> Transcript:
    """Feed `phases` (the client waits for the answers between two phases), each cut by
    `split`; decisions answer at once, or with `late` only once the phase was sent."""
    seen, waiting, streamed = Transcript(), [], []

    def absorb(actions: list[Any]) -> None:
        for action in actions:
            if isinstance(action, Reply):
                seen.reply(action.data)
            elif isinstance(action, Authenticate):
                seen.steps.append(("authenticate", action.username, action.password,
                                   action.mechanism))
                waiting.append(action)
                if not late:
                    resolve()
            elif isinstance(action, StartTLS):
                seen.steps.append(("starttls",))
            elif isinstance(action, Relay):
                seen.steps.append(("relay",))
                seen.upstream += action.pipelined
                seen.relaying = True
            elif isinstance(action, Close):
                seen.steps.append(("close",))
                seen.closed = True
            else:
                smtp_action(action)

    def smtp_action(action: Any) -> None:
        assert isinstance(dialogue, SmtpDialogue)
        if isinstance(action, AddRecipient):
            seen.steps.append(("rcpt", action.address))
            if action.address.endswith("@new.example"):
                action.txn.recipients.append(action.address.lower())
                absorb(dialogue.resume("250 2.1.5 Ok"))
            else:
                absorb(dialogue.resume("550 5.7.1 Relaying denied"))
        elif isinstance(action, MessageData):
            # Streamed in pieces that depend on the split: the transcript shows it whole.
            streamed.append(action.data)
        elif isinstance(action, EndOfMessage):
            header, _, body = b"".join(streamed).partition(b";\r\n\t")
            streamed.clear()
            assert header.startswith(b"Received: from ")
            seen.steps.append(("deliver", body.split(b"\r\n", 1)[1]))
            absorb(dialogue.delivered("250 2.0.0 <id> Saved"))
        elif isinstance(action, MessageRefused):
            streamed.clear()  # the session drops what it streamed, with the hop connection
            seen.steps.append(("refused", action.reply))
        elif isinstance(action, EndTransaction):
            seen.steps.append(("end",))

    def resolve() -> None:
        while waiting:
            outcome = decide(waiting.pop(0))
            if isinstance(dialogue, SmtpDialogue):
                absorb(dialogue.authenticated(USER) if outcome is Outcome.OK
                       else dialogue.login_failed(outcome))
            else:
                absorb(dialogue.login_succeeded(STORE_CAPS) if outcome is Outcome.OK
                       else dialogue.login_failed(outcome))

    absorb(dialogue.greeting())
    for phase in phases:
        for chunk in split(phase):
            if seen.relaying:
                seen.upstream += chunk
            elif not seen.closed:
                absorb(dialogue.receive(chunk))
        resolve()
    return seen


def whole(data: bytes) -> list[bytes]:
    return [data]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i:i + 1] for i in range(len(data))]


def splits(data: bytes) -> Iterator[Callable[[bytes], list[bytes]]]:
    yield bytewise
    for k in range(1, len(data)):
        yield lambda d, k=k: [d[:k], d[k:]]  # type: ignore[misc]


def same_whatever_the_split(make: Callable[[], Dialogue], phases: list[bytes],
                            pipelined: bool = True) -> Transcript:
    """The transcript with each phase whole; asserts every other way of sending gives it."""
    expected = run(make(), phases, whole)
    for phase_index, phase in enumerate(phases):
        for cut in splits(phase):
            def split(data: bytes, this: bytes = phase, cut: Any = cut) -> list[bytes]:
                return cut(data) if data is this else [data]

            assert run(make(), phases, split) == expected, (phase_index, cut(phase)[:1])
    assert run(make(), phases, bytewise, late=True) == expected
    assert run(make(), phases, whole, late=True) == expected
    if pipelined:
        assert run(make(), [b"".join(phases)], whole).text == expected.text
    return expected


def imap(settings: DialogueSettings = SETTINGS, tls: bool = False) -> ImapPreLogin:
    return ImapPreLogin(settings, tls_active=tls)


def pop3(settings: DialogueSettings = SETTINGS, tls: bool = False) -> Pop3PreLogin:
    return Pop3PreLogin(settings, tls_active=tls)


def quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# -- IMAP --------------------------------------------------------------------------------------
IMAP_GREETING = (b"* OK [CAPABILITY IMAP4rev1 SASL-IR ID LITERAL+ ENABLE IDLE STARTTLS "
                 b"AUTH=PLAIN AUTH=LOGIN] Mail service ready.\r\n")
LOGGED_IN = f"OK [CAPABILITY {STORE_CAPS}] Logged in\r\n".encode()


def test_imap_commands_before_login() -> None:
    seen = same_whatever_the_split(imap, [
        b"c1 CAPABILITY\r\nn1 NOOP\r\ni1 ID (\"name\" \"x\")\r\nl1 LOGOUT\r\nafter LOGOUT\r\n"])
    assert seen.steps == [
        IMAP_GREETING
        + b"* CAPABILITY IMAP4rev1 SASL-IR ID LITERAL+ ENABLE IDLE STARTTLS AUTH=PLAIN "
          b"AUTH=LOGIN\r\nc1 OK Capability completed.\r\n"
        + b"n1 OK NOOP completed.\r\n"
        + b'* ID ("name" "migrating-proxy")\r\ni1 OK ID completed.\r\n'
        + b"* BYE Logging out\r\nl1 OK Logout completed.\r\n",
        ("close",)]


def test_imap_login_then_pipelined_commands_go_to_the_upstream() -> None:
    seen = same_whatever_the_split(imap, [
        f"a LOGIN {USER} {quoted(PASSWORD)}\r\nb SELECT INBOX\r\nc LOGOUT\r\n".encode()])
    assert seen.steps == [IMAP_GREETING, ("authenticate", USER, PASSWORD, "LOGIN"),
                          b"a " + LOGGED_IN, ("relay",)]
    assert seen.upstream == b"b SELECT INBOX\r\nc LOGOUT\r\n"


def test_imap_login_with_synchronising_and_non_synchronising_literals() -> None:
    password = PASSWORD.encode()
    seen = same_whatever_the_split(imap, [
        b"a LOGIN {17}\r\n",
        USER.encode() + b" {" + str(len(password)).encode() + b"+}\r\n" + password + b"\r\n"])
    assert seen.steps == [IMAP_GREETING + b"+ OK\r\n",
                          ("authenticate", USER, PASSWORD, "LOGIN"), b"a " + LOGGED_IN,
                          ("relay",)]


@pytest.mark.parametrize(("phases", "mechanism"), [
    ([f"a AUTHENTICATE PLAIN {plain(USER, PASSWORD)}\r\n"], "AUTHENTICATE PLAIN"),
    (["a AUTHENTICATE PLAIN\r\n", f"{plain(USER, PASSWORD, USER)}\r\n"], "AUTHENTICATE PLAIN"),
    (["a AUTHENTICATE LOGIN\r\n", f"{b64(USER)}\r\n", f"{b64(PASSWORD)}\r\n"],
     "AUTHENTICATE LOGIN"),
])
def test_imap_authenticate(phases: list[str], mechanism: str) -> None:
    seen = same_whatever_the_split(imap, [p.encode() for p in phases])
    challenges = {1: b"", 2: b"+ \r\n", 3: b"+ VXNlcm5hbWU6\r\n+ UGFzc3dvcmQ6\r\n"}[len(phases)]
    assert seen.steps == [IMAP_GREETING + challenges, ("authenticate", USER, PASSWORD, mechanism),
                          b"a " + LOGGED_IN, ("relay",)]


def test_imap_sasl_errors() -> None:
    seen = same_whatever_the_split(imap, [
        b"a AUTHENTICATE PLAIN\r\n", b"*\r\n", b"b AUTHENTICATE PLAIN !!notbase64!!\r\n",
        b"c AUTHENTICATE CRAM-MD5\r\n",
        f"d AUTHENTICATE PLAIN {plain(USER, PASSWORD, 'bob@new.example')}\r\n".encode()])
    assert seen.steps == [
        IMAP_GREETING + b"+ \r\na BAD Authentication canceled.\r\n"
        b"b BAD Invalid base64 data in SASL response.\r\n"
        b"c NO Unsupported authentication mechanism.\r\n",
        ("authenticate", "\ufffd", "", "AUTHENTICATE PLAIN"),  # someone else: never matches
        b"d NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"]


def test_imap_failed_logins_then_the_third_closes() -> None:
    seen = same_whatever_the_split(imap, [
        f"f0 LOGIN {USER} wrong\r\nn NOOP\r\nf1 LOGIN {USER} wrong\r\n"
        f"f2 LOGIN {USER} wrong\r\nnever NOOP\r\n".encode()])
    refused = b"NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
    assert seen.text == (IMAP_GREETING + b"f0 " + refused + b"n OK NOOP completed.\r\n"
                         + b"f1 " + refused + b"f2 " + refused
                         + b"* BYE Too many failed logins.\r\n")
    assert seen.steps[-1] == ("close",)


@pytest.mark.parametrize(("user", "answer"), [
    (DOWN, b"a NO [UNAVAILABLE] Service temporarily unavailable, try later.\r\n"
           b"* BYE Service temporarily unavailable.\r\n"),
    (BUSY, b"a NO [UNAVAILABLE] Too many failed logins, try again later.\r\n"
           b"b OK NOOP completed.\r\n"),
])
def test_imap_unavailable_closes_throttled_does_not(user: str, answer: bytes) -> None:
    seen = same_whatever_the_split(imap, [f"a LOGIN {user} pw\r\nb NOOP\r\n".encode()])
    assert seen.text == IMAP_GREETING + answer
    assert seen.closed == (user == DOWN)


def test_imap_starttls_drops_what_was_pipelined_behind_it() -> None:
    dialogue = imap()
    seen = run(dialogue, [b"s STARTTLS\r\ninjected LOGIN carol x\r\n", b"n NOOP\r\n"], whole)
    assert seen.steps == [IMAP_GREETING + b"s OK Begin TLS negotiation now.\r\n", ("starttls",),
                          b"n OK NOOP completed.\r\n"]
    again = run(imap(tls=True), [b"s STARTTLS\r\nc CAPABILITY\r\n"], whole)
    assert again.text.endswith(b"s BAD TLS is already active.\r\n* CAPABILITY IMAP4rev1 SASL-IR "
                               b"ID LITERAL+ ENABLE IDLE AUTH=PLAIN AUTH=LOGIN\r\n"
                               b"c OK Capability completed.\r\n")
    # Sent as a client does (waiting for the answer), the split does not matter; pipelined,
    # what follows STARTTLS is dropped, which is the point.
    same_whatever_the_split(imap, [b"s STARTTLS\r\n", b"n NOOP\r\n"], pipelined=False)


def test_imap_tls_required_refuses_plaintext_logins() -> None:
    settings = DialogueSettings(tls_available=True, tls_required=True)
    seen = same_whatever_the_split(lambda: imap(settings), [
        f"a LOGIN {USER} pw\r\nb AUTHENTICATE PLAIN {plain(USER, 'pw')}\r\n".encode()])
    assert b"LOGINDISABLED" in seen.text and b"AUTH=PLAIN" not in seen.text
    assert seen.text.endswith(
        b"a NO [PRIVACYREQUIRED] Plaintext login needs TLS (STARTTLS).\r\n"
        b"b NO [PRIVACYREQUIRED] Authentication needs TLS (STARTTLS).\r\n")


def test_imap_line_over_the_limit_closes() -> None:
    seen = same_whatever_the_split(imap, [b"a LOGIN " + b"x" * 9000 + b" pw\r\n"],
                                   pipelined=False)
    assert seen.steps == [IMAP_GREETING + b"* BYE Line too long.\r\n", ("close",)]


@pytest.mark.parametrize("marker", [b"{100000}", b"{99999999999999999999}",
                                    b"{" + b"9" * 5000 + b"}"])  # Python refuses 4301+ digits
def test_imap_synchronising_literal_over_the_limit_is_refused(marker: bytes) -> None:
    seen = same_whatever_the_split(imap, [b"a LOGIN " + marker + b"\r\n", b"b NOOP\r\n"])
    assert seen.steps == [IMAP_GREETING + b"a BAD Literal too large.\r\nb OK NOOP completed.\r\n"]


@pytest.mark.parametrize("marker", [b"{100000+}", b"{" + b"7" * 4400 + b"+}"])
def test_imap_non_synchronising_literal_over_the_limit_closes(marker: bytes) -> None:
    seen = same_whatever_the_split(imap, [b"a LOGIN " + marker + b"\r\n" + b"y" * 100])
    assert seen.steps == [IMAP_GREETING + b"a BAD Literal too large.\r\n"
                          b"* BYE Literal too large.\r\n", ("close",)]


@pytest.mark.parametrize("line", [b"a LOGIN {-1}", b"a LOGIN {1x}", b"a LOGIN {+}"])
def test_imap_malformed_literal_sizes_are_errors(line: bytes) -> None:
    seen = same_whatever_the_split(imap, [line + b"\r\nb CAPABILITY\r\n"])
    assert seen.text.startswith(IMAP_GREETING + b"a BAD")
    assert seen.text.endswith(b"b OK Capability completed.\r\n")


def test_imap_garbage_gets_errors_then_disconnect() -> None:
    seen = run(imap(), [bytes(range(256)) * 3 + b"\r\n" + b"\xff\xfe garbage\r\n" * 12], whole)
    lines = seen.text.splitlines(keepends=True)[1:]
    assert lines[-1] == b"* BYE Too many invalid commands.\r\n"
    assert all(b" BAD " in line for line in lines[:-1]) and len(lines) == 11
    assert not any(isinstance(s, tuple) and s[0] == "authenticate" for s in seen.steps)
    assert run(imap(), [bytes(range(256)) * 3 + b"\r\n" + b"\xff\xfe garbage\r\n" * 12],
               bytewise) == seen


@pytest.mark.parametrize(("username", "decoded"), [
    (b'"carol\\"@new.example"', 'carol"@new.example'),
    (b'"carol\\\\@new.example"', "carol\\@new.example"),
    # A literal counts bytes: what follows the name up to its size belongs to the name.
    (b"{22}\r\ncarol@new.example\r\nX", "carol@new.example\r\nX p"),
    (b"{18}\r\ncarol\0@new.example", "carol\0@new.example"),
    (b"{19}\r\ncar\xc3\xb6l@new.example", "car\u00f6l@new.example "),
])
def test_imap_hostile_usernames_reach_the_decision_as_they_are(username: bytes,
                                                                decoded: str) -> None:
    seen = same_whatever_the_split(imap, [b"a LOGIN " + username + b" pw\r\nb NOOP\r\n"])
    attempts = [step for step in seen.steps if isinstance(step, tuple)]
    assert [step[:2] for step in attempts] == [("authenticate", decoded)]
    assert seen.text.endswith(b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
                              b"b OK NOOP completed.\r\n")


# -- POP3 --------------------------------------------------------------------------------------
POP_GREETING = b"+OK Mail service ready.\r\n"
POP_CAPA = (b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\n"
            b"PIPELINING\r\nUSER\r\nSASL PLAIN LOGIN\r\nSTLS\r\nIMPLEMENTATION migrating-proxy\r\n"
            b".\r\n")


def test_pop3_commands_before_login() -> None:
    seen = same_whatever_the_split(pop3, [b"CAPA\r\nAUTH\r\nNOOP\r\nQUIT\r\nSTAT\r\n"])
    assert seen.steps == [
        POP_GREETING + POP_CAPA + b"+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n"
        + b"-ERR Unknown command or not allowed before login.\r\n+OK Logging out\r\n",
        ("close",)]


def test_pop3_user_pass_then_pipelined_commands_go_to_the_upstream() -> None:
    seen = same_whatever_the_split(pop3, [
        f"USER {USER}\r\nPASS {POP_PASSWORD}\r\nSTAT\r\nQUIT\r\n".encode()])
    assert seen.steps == [POP_GREETING + b"+OK\r\n", ("authenticate", USER, POP_PASSWORD, "USER"),
                          b"+OK Logged in.\r\n", ("relay",)]
    assert seen.upstream == b"STAT\r\nQUIT\r\n"


@pytest.mark.parametrize(("phases", "challenges", "mechanism"), [
    ([f"AUTH PLAIN {plain(USER, POP_PASSWORD)}\r\n"], b"", "AUTH PLAIN"),
    (["AUTH PLAIN\r\n", f"{plain(USER, POP_PASSWORD, USER)}\r\n"], b"+ \r\n", "AUTH PLAIN"),
    (["AUTH LOGIN\r\n", f"{b64(USER)}\r\n", f"{b64(POP_PASSWORD)}\r\n"],
     b"+ VXNlcm5hbWU6\r\n+ UGFzc3dvcmQ6\r\n", "AUTH LOGIN"),
])
def test_pop3_auth(phases: list[str], challenges: bytes, mechanism: str) -> None:
    seen = same_whatever_the_split(pop3, [p.encode() for p in phases])
    assert seen.steps == [POP_GREETING + challenges,
                          ("authenticate", USER, POP_PASSWORD, mechanism),
                          b"+OK Logged in.\r\n", ("relay",)]


def test_pop3_sasl_errors() -> None:
    other = plain(USER, POP_PASSWORD, authzid="bob@new.example")
    seen = same_whatever_the_split(pop3, [
        b"AUTH PLAIN\r\n", b"*\r\n", b"AUTH PLAIN !!notbase64!!\r\n",
        f"AUTH PLAIN {b64('no nuls')}\r\n".encode(), b"AUTH CRAM-MD5\r\n",
        f"AUTH PLAIN {other}\r\n".encode(), b"PASS x\r\n"])
    assert seen.text == (POP_GREETING + b"+ \r\n-ERR Authentication cancelled.\r\n"
                         b"-ERR Invalid base64 data in SASL response.\r\n"
                         b"-ERR Invalid PLAIN response.\r\n"
                         b"-ERR Unsupported authentication mechanism.\r\n"
                         b"-ERR [AUTH] Authentication failed.\r\n"
                         b"-ERR No user name given (USER first).\r\n")


def test_pop3_third_failure_closes_without_a_second_reply() -> None:
    seen = same_whatever_the_split(pop3, [f"USER {USER}\r\nPASS wrong\r\n".encode() * 3])
    assert seen.text == POP_GREETING + b"+OK\r\n-ERR [AUTH] Authentication failed.\r\n" * 3
    assert seen.steps[-1] == ("close",)


def test_pop3_unavailable_closes_after_its_one_reply() -> None:
    seen = same_whatever_the_split(pop3, [f"USER {DOWN}\r\nPASS pw\r\nCAPA\r\n".encode()])
    assert seen.steps[-2:] == [b"-ERR [SYS/TEMP] Service temporarily unavailable.\r\n",
                               ("close",)]


def test_pop3_stls_drops_pipelined_commands() -> None:
    seen = run(pop3(), [f"STLS\r\nUSER {USER}\r\n".encode(), b"PASS x\r\nQUIT\r\n"], whole)
    assert seen.steps == [POP_GREETING + b"+OK Begin TLS negotiation\r\n", ("starttls",),
                          b"-ERR No user name given (USER first).\r\n+OK Logging out\r\n",
                          ("close",)]


def test_pop3_tls_required() -> None:
    settings = DialogueSettings(tls_available=True, tls_required=True)
    refusal = b"-ERR [AUTH] Plaintext authentication disallowed on non-secure connections.\r\n"
    seen = same_whatever_the_split(lambda: pop3(settings), [
        f"CAPA\r\nUSER {USER}\r\nAUTH PLAIN {plain(USER, 'x')}\r\nPASS x\r\n".encode()])
    assert seen.text.endswith(b"STLS\r\nIMPLEMENTATION migrating-proxy\r\n.\r\n" + refusal * 3)
    assert b"SASL" not in seen.text and b"USER\r\n" not in seen.text


def test_pop3_line_over_the_limit_closes() -> None:
    for data in (b"USER " + b"x" * 9000 + b"\r\n", b"y" * 9000):
        seen = same_whatever_the_split(pop3, [data], pipelined=False)
        assert seen.steps == [POP_GREETING + b"-ERR Line too long.\r\n", ("close",)]


def test_pop3_hostile_usernames() -> None:
    for username in (b'carol"@new.example', b"carol\0@new.example", b"car\xf6l@new.example"):
        seen = same_whatever_the_split(pop3, [b"USER " + username + b"\r\nPASS pw\r\nCAPA\r\n"])
        assert seen.text.endswith(b"-ERR [AUTH] Authentication failed.\r\n" + POP_CAPA)


# -- timers and bounds (the session calls these; the dialogue words them) ----------------------
def test_idle_and_login_deadlines_and_too_much_pipelined_input() -> None:
    dialogue = imap()
    dialogue.greeting()
    assert dialogue.timed_out() == [Reply(b"* BYE Disconnected for inactivity.\r\n"), Close()]
    assert dialogue.receive(b"a NOOP\r\n") == []  # closed: nothing more

    dialogue = pop3()
    dialogue.greeting()
    assert dialogue.login_deadline() == [Reply(b"-ERR Login timed out.\r\n"), Close()]

    # During a login decision the deadline waits for the answer, then closes.
    dialogue = imap()
    dialogue.greeting()
    assert dialogue.receive(f"a LOGIN {USER} wrong\r\n".encode())[0].username == USER
    assert dialogue.login_deadline() == []
    assert dialogue.login_failed(Outcome.FAILED) == [
        Reply(b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"),
        Reply(b"* BYE Login timed out.\r\n"), Close()]

    dialogue = imap()
    dialogue.greeting()
    dialogue.receive(f"a LOGIN {USER} pw\r\n".encode())
    assert dialogue.state is SessionState.AUTHENTICATING
    assert dialogue.receive(b"x" * 16000) == []
    assert dialogue.receive(b"x" * 1000) == [
        Reply(b"* BYE Too much data sent before login completed.\r\n"), Close()]


# -- SMTP --------------------------------------------------------------------------------------
SMTP = SmtpSettings(hostname="mx.test", max_message_size=20000, max_recipients=100)
EHLO = (b"250-mx.test\r\n250-PIPELINING\r\n250-SIZE 20000\r\n250-8BITMIME\r\n"
        b"250-ENHANCEDSTATUSCODES\r\n250 STARTTLS\r\n")
MESSAGE = b"From: sender@elsewhere.example\r\nSubject: test\r\n\r\nbody line\r\n..dot\r\n"


def mx(settings: SmtpSettings = SMTP) -> SmtpDialogue:
    return SmtpDialogue(SETTINGS, settings, peer_host="192.0.2.1")


def submission() -> SmtpDialogue:
    def own_address(sender: str, user: str | None) -> str:
        if user is None:
            return "530 5.7.0 Authentication required"
        return "" if sender.lower() == user.lower() else "553 5.7.1 Sender address not owned"

    return SmtpDialogue(SETTINGS, SmtpSettings("mx.test", 20000, 100, submission=True),
                        "192.0.2.1", check_sender=own_address)


def test_smtp_commands() -> None:
    seen = same_whatever_the_split(mx, [
        b"EHLO client.test\r\nVRFY carol\r\nNOOP\r\nAUTH PLAIN\r\n"
        b"MAIL FROM:<a@b.example> SMTPUTF8\r\nMAIL FROM:<a@b.example>\r\nRSET\r\n"
        b"RCPT TO:<carol@new.example>\r\nBDAT 10\r\nQUIT\r\nNOOP\r\n"])
    assert seen.text == (
        b"220 mx.test ESMTP migrating-proxy\r\n" + EHLO
        + b"252 2.5.2 Cannot VRFY user, but will accept message and attempt delivery\r\n"
          b"250 2.0.0 Ok\r\n503 5.5.1 AUTH not available on this port\r\n"
          b"555 5.5.4 Unsupported parameter SMTPUTF8\r\n250 2.1.0 Ok\r\n250 2.0.0 Ok\r\n"
          b"503 5.5.1 Need MAIL first\r\n502 5.5.1 CHUNKING not supported\r\n"
          b"221 2.0.0 mx.test closing connection\r\n")
    assert seen.steps[-1] == ("close",)


def test_smtp_pipelined_transaction_and_data() -> None:
    seen = same_whatever_the_split(mx, [
        b"EHLO client.test\r\n",
        b"MAIL FROM:<sender@elsewhere.example>\r\nRCPT TO:<dave@new.example>\r\n"
        b"RCPT TO:<nobody@elsewhere.example>\r\nDATA\r\n",
        b".." + MESSAGE + b".\r\nNOOP\r\nQUIT\r\n"])
    assert seen.steps[0].endswith(EHLO + b"250 2.1.0 Ok\r\n")
    assert seen.steps[1:] == [
        ("rcpt", "dave@new.example"), b"250 2.1.5 Ok\r\n",
        ("rcpt", "nobody@elsewhere.example"),
        b"550 5.7.1 Relaying denied\r\n354 End data with <CR><LF>.<CR><LF>\r\n",
        ("deliver", b"." + MESSAGE.replace(b"\r\n..", b"\r\n.")), ("end",),
        b"250 2.0.0 Ok: delivered\r\n250 2.0.0 Ok\r\n221 2.0.0 mx.test closing connection\r\n",
        ("close",)]


@pytest.mark.parametrize(("body", "reply"), [
    (b"bare\nLF\r\n", b"554 5.6.0 Message refused: bare LF or CR (lines must end with CRLF)"),
    (b"x" * 999 + b"\r\n", b"554 5.6.0 Message refused: line longer than 998 characters"),
    (b"nul \0 here\r\n", b"554 5.6.0 Message refused: NUL character"),
    (b"y" * 70 + b"\r\n" * 300, b"552 5.3.4 Message size exceeds fixed limit"),
])
def test_smtp_malformed_data_is_refused_whole_and_the_session_goes_on(body: bytes,
                                                                      reply: bytes) -> None:
    seen = same_whatever_the_split(lambda: mx(SmtpSettings("mx.test", 20000 if b"y" not in body
                                                          else 200, 100)), [
        b"EHLO client.test\r\nMAIL FROM:<s@elsewhere.example>\r\nRCPT TO:<dave@new.example>\r\n"
        b"DATA\r\n", MESSAGE + body + b".\r\nNOOP\r\n"])
    refused = [step for step in seen.steps if isinstance(step, tuple) and step[0] == "refused"]
    assert refused and refused[0][1] == reply.decode()
    assert seen.text.endswith(reply + b"\r\n250 2.0.0 Ok\r\n")


def test_smtp_huge_size_parameter_is_the_protocols_error() -> None:
    seen = same_whatever_the_split(mx, [
        b"EHLO c.test\r\nMAIL FROM:<a@b.example> SIZE=" + b"9" * 5000 + b"\r\nNOOP\r\n"])
    assert seen.text.endswith(b"552 5.3.4 Message size exceeds fixed limit\r\n250 2.0.0 Ok\r\n")


def test_smtp_overlong_command_line_closes() -> None:
    seen = same_whatever_the_split(mx, [b"NOOP " + b"x" * 20000 + b"\r\nNOOP\r\n"],
                                   pipelined=False)
    assert seen.steps == [b"220 mx.test ESMTP migrating-proxy\r\n"
                          b"500 5.5.2 Line too long, closing connection\r\n", ("close",)]


def test_smtp_starttls_drops_pipelined_commands() -> None:
    seen = run(mx(), [b"EHLO c.test\r\nSTARTTLS\r\nMAIL FROM:<s@x.example>\r\n",
                      b"RCPT TO:<dave@new.example>\r\nSTARTTLS\r\n"], whole)
    assert seen.text.endswith(b"220 2.0.0 Ready to start TLS\r\n503 5.5.1 Need MAIL first\r\n"
                              b"503 5.5.1 TLS already active\r\n")


def test_submission_auth_and_own_sender_only() -> None:
    seen = same_whatever_the_split(submission, [
        b"MAIL FROM:<carol@new.example>\r\nEHLO c.test\r\n"
        b"MAIL FROM:<carol@new.example>\r\n"
        + f"AUTH PLAIN {plain(USER, 'wrong')}\r\n".encode(),
        b"AUTH LOGIN\r\n", f"{b64(USER)}\r\n".encode(), f"{b64(PASSWORD)}\r\n".encode(),
        b"AUTH PLAIN\r\nMAIL FROM:<dave@new.example>\r\nMAIL FROM:<CAROL@new.example>\r\n"])
    assert seen.text == (
        b"220 mx.test ESMTP migrating-proxy\r\n503 5.5.1 Send EHLO first\r\n"
        + EHLO.replace(b"250 STARTTLS", b"250-STARTTLS\r\n250 AUTH PLAIN LOGIN")
        + b"530 5.7.0 Authentication required\r\n535 5.7.8 Authentication credentials invalid\r\n"
          b"334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n235 2.7.0 Authentication successful\r\n"
          b"503 5.5.1 Already authenticated or in a mail transaction\r\n"
          b"553 5.7.1 Sender address not owned\r\n250 2.1.0 Ok\r\n")
