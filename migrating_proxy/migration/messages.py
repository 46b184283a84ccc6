"""Messages on the wire: fingerprints, MULTIAPPEND without copies, APPENDUID, raw FETCH ranges."""

from __future__ import annotations

import hashlib
import imaplib
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from imapclient import IMAPClient
from imapclient.datetime_util import datetime_to_INTERNALDATE
from imapclient.exceptions import IMAPClientAbortError
from imapclient.response_parser import parse_fetch_response

T = TypeVar("T")
HEADER_FIELDS = b"BODY.PEEK[HEADER.FIELDS (MESSAGE-ID DATE)]"
_FOLD = re.compile(rb"\r?\n[ \t]")
_APPENDUID = re.compile(rb"\[APPENDUID (\d+) ([0-9:,]+)\]", re.IGNORECASE)


@dataclass
class OutMessage:
    """One message on its way to the store."""

    key: str  # source UID (decimal) or POP3 UIDL
    raw: bytes = field(repr=False)
    flags: tuple[bytes, ...]
    date: datetime | None
    fingerprint: str
    size: int


def copyable_flags(flags: Iterable[bytes | str]) -> tuple[bytes, ...]:
    """Flags and keywords to set on a copy: all but \\Recent (which only the server sets)."""
    out = []
    for flag in flags:
        flag = flag if isinstance(flag, bytes) else str(flag).encode()
        if flag.lower() != b"\\recent":
            out.append(flag)
    return tuple(out)


def comparable_flags(flags: Iterable[bytes | str]) -> frozenset[bytes]:
    """A message's flags as a set to compare between servers (flag names are
    case-insensitive, RFC 3501 2.3.2)."""
    return frozenset(flag.lower() for flag in copyable_flags(flags))


def crlf_size(raw: bytes) -> int:
    """RFC822.SIZE of raw: the size with every line ending as CRLF (bare LFs count 2)."""
    return len(raw) + raw.count(b"\n") - raw.count(b"\r\n")


def header_block(raw: bytes) -> bytes:
    """The header section of a message (everything before the first empty line)."""
    ends = [i for i in (raw.find(b"\r\n\r\n"), raw.find(b"\n\n")) if i >= 0]
    return raw[: min(ends)] if ends else raw


def fingerprint(headers: bytes, size: int) -> str:
    """Identity of a message across servers: Message-ID, Date and RFC822.SIZE.

    `headers` may be a whole header section or a HEADER.FIELDS reply; folding and runs of
    white space are normalised so both give the same value for the same message.
    """
    fields: dict[bytes, bytes] = {}
    for line in _FOLD.sub(b" ", headers).splitlines():
        name, sep, value = line.partition(b":")
        name = name.strip().lower()
        if sep and name in (b"message-id", b"date") and name not in fields:
            fields[name] = b" ".join(value.split())
    digest = hashlib.sha256()
    for part in (fields.get(b"message-id", b""), fields.get(b"date", b""), str(size).encode()):
        digest.update(part + b"\0")
    return digest.hexdigest()[:40]


def message_fingerprint(raw: bytes) -> str:
    return fingerprint(header_block(raw), crlf_size(raw))


def header_fields_of(data: dict[bytes, Any]) -> bytes:
    """The HEADER.FIELDS item of a FETCH reply, whatever spelling the server echoed."""
    for key, value in data.items():
        if key.upper().startswith(b"BODY[HEADER.FIELDS"):
            return bytes(value or b"")
    return b""


def fetch_range(client: IMAPClient, uid_set: str, items: bytes,
                modifiers: str = "") -> dict[int, dict[bytes, Any]]:
    """UID FETCH of a UID set such as "17:*" or "3:5,9", keyed by UID; `modifiers` such as
    "(CHANGEDSINCE 42)" follow the items (RFC 7162).

    Only responses that carry a UID count. imaplib hands back every FETCH response the server
    sent since it was last asked, including unsolicited ones (another session of the user
    changed flags: `* 57 FETCH (FLAGS (...))`) that name a message by its sequence number only;
    imapclient would take that number for a UID, and flags of one message would be copied to
    another.
    """
    client._imap.untagged_responses.pop("FETCH", None)  # left from earlier commands
    arguments = ["(" + items.decode() + ")"] + ([modifiers] if modifiers else [])
    typ, data = client._imap.uid("FETCH", uid_set, *arguments)
    client._checkok("fetch", typ, data)  # imaplib already picked the FETCH responses
    by_uid: dict[int, dict[bytes, Any]] = {}
    for response in fetch_responses(data):
        for item in parse_fetch_response(response, client.normalise_times, False).values():
            if b"UID" in item:
                # A server may split one message's data over several FETCH responses, or
                # follow it with an unsolicited one (new FLAGS, with the UID under CONDSTORE):
                # merged, the later items win, and a body already read is never lost.
                by_uid.setdefault(int(item[b"UID"]), {}).update(item)
    return by_uid


_RESPONSE_START = re.compile(rb"^\d+ \(")


def fetch_responses(data: Sequence[Any]) -> Iterator[list[Any]]:
    """imaplib's FETCH data split into one list per FETCH response: a response starts with
    "<n> (" (a line, or the head of a literal); what follows until the next one (more literals,
    the closing ")") belongs to it."""
    response: list[Any] = []
    for element in data:
        if element is None:
            continue
        head = element[0] if isinstance(element, tuple) else element
        if _RESPONSE_START.match(head) and response:
            yield response
            response = []
        response.append(element)
    if response:
        yield response


def uid_sets(uids: Iterable[int], max_length: int = 4000) -> Iterator[str]:
    """Compact IMAP sequence sets ("3:5,9") covering uids, each at most about max_length
    characters, so a command over thousands of messages stays within servers' line limits."""
    ordered = sorted(set(uids))
    parts: list[str] = []
    length = 0
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        part = str(ordered[i]) if i == j else f"{ordered[i]}:{ordered[j]}"
        if parts and length + len(part) + 1 > max_length:
            yield ",".join(parts)
            parts, length = [], 0
        parts.append(part)
        length += len(part) + 1
        i = j + 1
    if parts:
        yield ",".join(parts)


def parse_uid_set(text: bytes) -> list[int]:
    """"3:5,9" -> [3, 4, 5, 9] (ranges in either order)."""
    uids: list[int] = []
    for part in text.split(b","):
        low, _, high = part.partition(b":")
        a, b = int(low), int(high or low)
        uids.extend(range(min(a, b), max(a, b) + 1))
    return uids


@dataclass(frozen=True)
class AppendOutcome:
    ok: bool
    text: str  # the server's tagged reply text (the reason when refused)
    uidvalidity: int | None = None
    uids: list[int] | None = None  # from APPENDUID, in append order


def _outcome(typ: str, data: list[Any]) -> AppendOutcome:
    reply = b" ".join(d for d in data if isinstance(d, bytes))
    text = reply.decode(errors="replace")
    if typ != "OK":
        return AppendOutcome(False, text)
    match = _APPENDUID.search(reply)
    if match is None:
        return AppendOutcome(True, text)
    return AppendOutcome(True, text, int(match.group(1)), parse_uid_set(match.group(2)))


def append_messages(client: IMAPClient, folder: str, messages: Sequence[OutMessage]
                    ) -> AppendOutcome:
    """APPEND (MULTIAPPEND when several) streaming each literal as is.

    imapclient's multiappend builds the whole command in memory (two copies of every message);
    this sends each message's bytes straight to the socket. RFC 3502 makes MULTIAPPEND atomic:
    a NO means none of the messages was saved.
    """
    imap = client._imap
    literal_plus = client.has_capability("LITERAL+")
    tag = imap._new_tag()
    imap.send(tag + b" APPEND " + client._normalise_folder(folder))
    try:
        for message in messages:
            flags = b" ".join(message.flags)
            date = (b' "' + datetime_to_INTERNALDATE(message.date).encode() + b'"'
                    if message.date else b"")
            imap.send(b" (" + flags + b")" + date)
            if literal_plus:
                imap.send(b" {%d+}\r\n" % len(message.raw))
                imap.send(message.raw)
            else:
                client._send_literal(tag, message.raw, False)
        imap.send(b"\r\n")
    except IMAPClientAbortError as exc:  # refused at a continuation request (no LITERAL+)
        typ, data = imap.tagged_commands.pop(tag, None) or ("NO", [str(exc).encode()])
        return _outcome(typ, data)
    try:
        typ, data = imap._command_complete("APPEND", tag)
    except imaplib.IMAP4.abort:
        raise
    except imaplib.IMAP4.error as exc:  # BAD: the server could not parse this message's part
        return AppendOutcome(False, str(exc))
    return _outcome(typ, data)


def batches(items: Sequence[T], size_of: Callable[[T], int], max_count: int,
            max_bytes: int) -> Iterator[list[T]]:
    """Consecutive groups of at most max_count items and max_bytes bytes (a bigger item
    travels alone), so memory stays bounded whatever the message sizes."""
    batch: list[T] = []
    total = 0
    for item in items:
        size = size_of(item)
        if batch and (len(batch) >= max_count or total + size > max_bytes):
            yield batch
            batch, total = [], 0
        batch.append(item)
        total += size
    if batch:
        yield batch
