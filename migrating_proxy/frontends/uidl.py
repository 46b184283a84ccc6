"""POP3 continuity in the relay: a store session answers UIDL with the old server's UIDLs.

After a switch, a POP3 client that leaves mail on the server knows its messages by the old
server's UIDLs; the store gives its copies UIDLs of its own, so without this every such client
would download the whole mailbox again. `UidlTranslator` is a sans-IO filter between the store
and the client: it follows the client's commands (pipelined or not, RFC 2449) to know which
answer comes next, and rewrites only the answers to `UIDL` and `UIDL n`. Every other byte,
message bodies included, passes unchanged; a multi-line answer that is not UIDL's is skipped by
searching for its terminator, not parsed line by line.

The table (`UidlMap`) comes from the switch (migration/pop3_uidls.py): store UIDL -> old UIDL
for every old message matched to its copy. A store UIDL not in the table (mail that arrived
after the switch, an old message that could not be matched) is passed on as the store says,
unless it equals one of the old UIDLs: a client would then take a new message for an old one
and never download it, so such a UIDL gets a prefix that makes it unique.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

TERMINATOR = b"\r\n.\r\n"
COLLISION_PREFIX = "~"  # printable (RFC 1939: 0x21-0x7E), never first in Dovecot's formats
MAX_UIDL = 70  # RFC 1939


@dataclass(frozen=True)
class UidlMap:
    """What one account's store sessions answer: store UIDL -> old UIDL, and the old UIDLs."""

    translations: Mapping[str, str]
    old: frozenset[str] = field(default=frozenset())

    def __post_init__(self) -> None:
        if not self.old:
            object.__setattr__(self, "old", frozenset(self.translations.values()))

    def translate(self, store_uidl: str) -> str:
        old = self.translations.get(store_uidl)
        if old is not None:
            return old
        uidl = store_uidl
        # Deterministic, so every session of the account answers the same for the message.
        while uidl in self.old and len(uidl) < MAX_UIDL:
            uidl = COLLISION_PREFIX + uidl
        return uidl


# What the next answer of the server is, by the command that asked for it.
SINGLE, MULTI, UIDL_ALL, UIDL_ONE = "single", "multi", "uidl-all", "uidl-one"
_MULTI_COMMANDS = (b"RETR", b"TOP", b"CAPA")


def answer_kind(command: bytes) -> str:
    """The shape of the answer to one command line (without its line end)."""
    words = command.split()
    verb = words[0].upper() if words else b""
    if verb == b"UIDL":
        return UIDL_ALL if len(words) == 1 else UIDL_ONE
    if (verb == b"LIST" and len(words) == 1) or verb in _MULTI_COMMANDS:
        return MULTI
    return SINGLE


class UidlTranslator:
    """Sans-IO: `from_client(data)` observes what the client sends (the bytes go on
    unchanged); `from_server(data)` returns what the client must get instead of `data`."""

    def __init__(self, uidls: UidlMap) -> None:
        self.uidls = uidls
        self.expected: deque[str] = deque()  # answers still to come, oldest first
        self.client_line = b""  # an unfinished command line
        self.line = b""  # an unfinished status line or UIDL listing line
        self.state = "status"  # status | body (skipping) | listing (UIDL lines)
        self.tail = b""  # the end of the body so far, for a terminator split between chunks

    def from_client(self, data: bytes) -> None:
        lines = (self.client_line + data).split(b"\n")
        self.client_line = lines.pop()
        self.expected.extend(answer_kind(line.rstrip(b"\r")) for line in lines)

    def from_server(self, data: bytes) -> bytes:
        out: list[bytes] = []  # a body chunk passes as it came: join() of one part copies none
        while data:
            if self.state == "body":
                data = self._skip_body(data, out)
            else:
                end = data.find(b"\n")
                if end < 0:
                    self.line += data
                    break
                line, data = self.line + data[:end + 1], data[end + 1:]
                self.line = b""
                out.append(self._status(line) if self.state == "status" else self._listing(line))
        return b"".join(out)

    def _status(self, line: bytes) -> bytes:
        kind = self.expected.popleft() if self.expected else SINGLE
        if not line.startswith(b"+OK"):
            return line
        if kind == MULTI:
            self.state, self.tail = "body", b"\r\n"  # the body starts at a line start
        elif kind == UIDL_ALL:
            self.state = "listing"
        elif kind == UIDL_ONE:
            return b"+OK " + self._rewrite(line[3:].lstrip(b" "))
        return line

    def _listing(self, line: bytes) -> bytes:
        if line.rstrip(b"\r\n") == b".":
            self.state = "status"
            return line
        return self._rewrite(line)

    def _rewrite(self, line: bytes) -> bytes:
        """`n uidl` CRLF with the UIDL translated; anything else as it came."""
        body = line.rstrip(b"\r\n")
        number, _, uidl = body.partition(b" ")
        if not uidl or not number.isdigit():
            return line
        old = self.uidls.translate(uidl.strip().decode("ascii", "replace"))
        return number + b" " + old.encode("ascii", "replace") + line[len(body):]

    def _skip_body(self, data: bytes, out: list[bytes]) -> bytes:
        """Pass a multi-line answer's body on; what follows its terminator is returned."""
        keep = len(TERMINATOR) - 1
        # A terminator split between chunks is in the seam; any other one is in `data` alone
        # (searched without copying a chunk that may be 64 KB of a large message).
        seam = self.tail + data[:keep]
        found = seam.find(TERMINATOR)
        if found >= 0:
            end = found + len(TERMINATOR) - len(self.tail)  # the terminator's end, in `data`
        else:
            found = data.find(TERMINATOR)
            if found < 0:
                out.append(data)
                self.tail = (self.tail + data)[-keep:] if len(data) < keep else data[-keep:]
                return b""
            end = found + len(TERMINATOR)
        out.append(data[:end])
        self.state, self.tail = "status", b""
        return data[end:]
