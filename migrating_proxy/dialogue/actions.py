"""What a dialogue asks its session to do, and the states a session goes through.

Session states (`SessionState`), shared by every front-end:

    state           input                               left by
    COMMANDS        parsed as commands                  a login attempt, BUSY, DATA, CLOSED
    AUTHENTICATING  buffered (bounded) until decided    login_failed -> COMMANDS (or CLOSED),
                                                        login_succeeded -> RELAYING (IMAP,
                                                        POP3) or COMMANDS (submission)
    BUSY            buffered (bounded)                  SMTP: resume(reply) -> COMMANDS
    DATA            the message (SMTP)                  its final `.` -> BUSY or COMMANDS
    RELAYING        not the dialogue's any more         (end)
    CLOSED          ignored                             (end)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class SessionState(Enum):
    COMMANDS = "commands"
    AUTHENTICATING = "authenticating"
    BUSY = "busy"
    DATA = "data"
    RELAYING = "relaying"
    CLOSED = "closed"


@dataclass(frozen=True)
class Reply:
    """Bytes for the client (one or more whole lines)."""

    data: bytes


@dataclass(frozen=True)
class StartTLS:
    """Start the TLS handshake now; the dialogue already dropped what was pipelined behind."""


@dataclass(frozen=True)
class Authenticate:
    """Run the login decision with these credentials; answer with login_failed/_succeeded."""

    username: str
    password: str = field(repr=False)
    mechanism: str = "LOGIN"  # for the log: LOGIN, AUTHENTICATE PLAIN, USER, AUTH LOGIN...


@dataclass(frozen=True)
class Relay:
    """The login is complete: relay from here; `pipelined` goes to the upstream first."""

    pipelined: bytes


@dataclass(frozen=True)
class Close:
    """Close the connection once what was written before has been sent."""


@dataclass(frozen=True)
class AddRecipient:
    """SMTP: route this recipient and ask the transaction's next hop; answer with
    resume(reply). `txn` is the dialogue's `Transaction`."""

    txn: Any
    address: str


@dataclass(frozen=True)
class MessageData:
    """SMTP: the next whole lines of the message (dot-unstuffed; the trace header first),
    to stream to the transaction's next hop as they arrive. Bounded by what one read brings."""

    txn: Any
    data: bytes = field(repr=False)


@dataclass(frozen=True)
class EndOfMessage:
    """SMTP: the message ended and was accepted by the DATA rules; finish it at the next hop
    and answer with delivered(reply)."""

    txn: Any
    size: int


@dataclass(frozen=True)
class MessageRefused:
    """SMTP: the message was read to its end and refused whole (the reply follows); what
    was streamed of it must not be delivered."""

    txn: Any
    size: int
    reply: str


@dataclass(frozen=True)
class EndTransaction:
    """SMTP: the envelope is gone (delivered, RSET, EHLO, STARTTLS, QUIT, refused): its next
    hop's connection may serve the session's next transaction."""

    txn: Any


Action = (Reply | StartTLS | Authenticate | Relay | Close | AddRecipient | MessageData
          | EndOfMessage | MessageRefused | EndTransaction)
