"""The pre-login dialogues of IMAP, POP3 and SMTP as sans-IO state machines.

A dialogue takes the client's bytes and answers with actions; it never touches a socket, a
thread or a clock (the style of h11). The Twisted sessions in `frontends/` feed it what arrives,
carry its actions out, and report back what happened outside (a login decided, a recipient
checked, a timer run out):

    dialogue = ImapPreLogin(settings)
    actions = dialogue.greeting()                  # [Reply(b"* OK [CAPABILITY ...] ...")]
    actions = dialogue.receive(b"a LOGIN u p\\r\\n")  # [Authenticate("u", "p", "LOGIN")]
    actions = dialogue.login_succeeded(caps)       # [Reply(b"a OK ..."), Relay(pipelined)]

Actions (actions.py): `Reply` bytes to write; `StartTLS` now (whatever the client pipelined
behind the command was dropped: CVE-2011-0411); `Authenticate` these credentials (the shared
login decision; the dialogue waits for `login_failed` / `login_succeeded`); `Relay` from here,
after sending the bytes the client pipelined behind its login to the upstream; `Close` the
connection after what was written. SMTP adds the mail transaction's (`AddRecipient`, `MessageData`,
`EndOfMessage`, `EndTransaction`, `MessageRefused`).

Framing is one helper (lines.py: bounded lines, exact-size reads for literals); SASL is one step
handler (sasl.py) that every protocol words in its own way. Because nothing here does I/O, the
tests feed every command byte by byte, split at every position and pipelined, in milliseconds.
"""

from migrating_proxy.dialogue.actions import (
    Action,
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

__all__ = [
    "Action",
    "AddRecipient",
    "Authenticate",
    "Close",
    "EndOfMessage",
    "EndTransaction",
    "MessageData",
    "MessageRefused",
    "Relay",
    "Reply",
    "SessionState",
    "StartTLS",
]
