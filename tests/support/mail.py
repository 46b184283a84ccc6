"""Build test messages and seed mailboxes over IMAP (imapclient), for tests and the demo."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import imaplib
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, make_msgid
from pathlib import Path

from imapclient import IMAPClient

from tests.support.dovecot import DovecotInstance

# Under 76 characters, so quoted-printable bodies keep it as is and the size stays predictable.
FILLER = "The quick brown fox jumps over the lazy dog. 0123456789 abcdefghijklm"


@dataclass(frozen=True)
class SeedMessage:
    """One message to APPEND: raw RFC 5322 bytes, flags/keywords, INTERNALDATE (tz-aware)."""

    raw: bytes
    flags: tuple[str, ...] = ()
    internaldate: dt.datetime | None = None


# Folder name (IMAP name with "/" separator, Unicode allowed) -> messages, in APPEND order.
MailboxSpec = Mapping[str, Sequence[SeedMessage]]


def make_message(
    subject: str,
    body: str,
    date: dt.datetime,
    message_id: str | None = None,
    size: int | None = None,
    sender: str = "Alice Example <alice@old.example>",
    to: str = "Bob Example <bob@old.example>",
) -> bytes:
    """RFC 5322 message with CRLF line endings; Unicode subject/body are MIME-encoded.

    `size` pads the body with ASCII filler lines so the message is at least `size` bytes
    (a few bytes more at most), for tests that care about large messages.
    """
    if date.tzinfo is None:
        raise ValueError("date must be timezone-aware")
    raw = _render(subject, body, date, message_id or make_msgid(domain="old.example"), sender, to)
    if size is not None and len(raw) < size:
        padding = _filler(size - len(raw))
        raw = _render(subject, body + "\n" + padding, date, _message_id(raw), sender, to)
    return raw


def _render(
    subject: str, body: str, date: dt.datetime, message_id: str, sender: str, to: str
) -> bytes:
    msg = EmailMessage(policy=SMTP)  # SMTP policy: CRLF line endings
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = format_datetime(date)
    msg["Message-ID"] = message_id
    msg.set_content(body)
    return msg.as_bytes()


def _message_id(raw: bytes) -> str:
    for line in raw.split(b"\r\n"):
        if line.lower().startswith(b"message-id:"):
            return line.split(b":", 1)[1].strip().decode()
    raise ValueError("no Message-ID")


def _filler(nbytes: int) -> str:
    """Lines of ASCII text totalling about nbytes once written with CRLF."""
    line = FILLER
    count = nbytes // (len(line) + 2) + 1
    return "\n".join(line for _ in range(count))


def seed_mailbox(
    host: str, port: int, address: str, password: str, spec: MailboxSpec, ssl: bool = False
) -> dict[str, int]:
    """Create the folders in `spec` (if missing) and APPEND their messages.

    Returns the number of messages appended per folder. Flags may include keywords.
    """
    appended: dict[str, int] = {}
    with IMAPClient(host, port=port, ssl=ssl, timeout=30) as client:
        if password.isascii():
            client.login(address, password)
        else:  # imaplib's LOGIN is ASCII only; SASL PLAIN carries UTF-8
            client.plain_login(address, password)
        existing = {name for _flags, _sep, name in client.list_folders()}
        for folder, messages in spec.items():
            if folder not in existing and folder.upper() != "INBOX":
                client.create_folder(folder)
                client.subscribe_folder(folder)
            for message in messages:
                client.append(folder, message.raw, message.flags, message.internaldate)
            appended[folder] = len(messages)
        client.logout()
    return appended


def _tz(hours: float) -> dt.timezone:
    return dt.timezone(dt.timedelta(hours=hours))


def _msg(
    subject: str, body: str, when: dt.datetime, flags: Iterable[str] = (), size: int | None = None
) -> SeedMessage:
    # INTERNALDATE a few minutes after the Date: header, as on a real server.
    received = when + dt.timedelta(minutes=3)
    return SeedMessage(make_message(subject, body, when, size=size), tuple(flags), received)


def sample_corpus() -> dict[str, list[SeedMessage]]:
    """A small, realistic mailbox: special-use folders, nesting, non-ASCII names and text."""
    paris, tokyo, ny, kolkata = _tz(1), _tz(9), _tz(-5), _tz(5.5)
    return {
        "INBOX": [
            _msg("Welcome to the new mail system", "Hello Alice,\n\nwelcome!\n",
                 dt.datetime(2025, 3, 1, 9, 15, tzinfo=paris), [r"\Seen"]),
            _msg("Quarterly report", "Numbers attached in spirit.\n",
                 dt.datetime(2024, 12, 31, 23, 59, tzinfo=tokyo), [r"\Flagged", "$Important"]),
            _msg("Réunion demain à 10 h", "Salut,\n\non se voit demain ? Ça marche.\n",
                 dt.datetime(2025, 1, 14, 18, 2, tzinfo=paris), []),
            _msg("Big attachment-ish", "See below.\n",
                 dt.datetime(2023, 6, 5, 7, 30, tzinfo=ny), [r"\Seen", r"\Answered"],
                 size=200_000),
        ],
        "Sent": [
            _msg("Re: Quarterly report", "Thanks, looks good.\n",
                 dt.datetime(2025, 1, 2, 8, 0, tzinfo=kolkata), [r"\Seen", "$Forwarded"]),
        ],
        "Drafts": [
            _msg("Unfinished thoughts", "To be continued…\n",
                 dt.datetime(2025, 2, 2, 22, 45, tzinfo=dt.UTC), [r"\Draft"]),
        ],
        "Archive/2024": [
            _msg("Holiday plans 2024", "Beach or mountains?\n",
                 dt.datetime(2024, 7, 20, 12, 0, tzinfo=paris), [r"\Seen", "project-x"]),
            _msg("Old newsletter", "Issue #42.\n",
                 dt.datetime(2024, 2, 29, 6, 0, tzinfo=ny), [r"\Seen", r"\Deleted"]),
        ],
        "Reçus": [
            _msg("Facture n° 2024-117", "Veuillez trouver ci-joint la facture.\n",
                 dt.datetime(2024, 11, 3, 10, 30, tzinfo=paris), [r"\Seen"]),
        ],
        "Projects/Acme/Q1": [
            _msg("Acme kickoff", "Agenda: everything.\n",
                 dt.datetime(2022, 1, 10, 14, 0, tzinfo=tokyo), []),
        ],
    }


def sasl_plain(user: str, password: str, authzid: str = "") -> str:
    """The base64 SASL PLAIN response (RFC 4616) a client sends."""
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode()).decode()


# Folder -> sorted (bytes, flags without \Recent, INTERNALDATE in UTC) of every message.
Snapshot = dict[str, list[tuple[bytes, tuple[bytes, ...], dt.datetime]]]


def snapshot_folders(client: IMAPClient) -> Snapshot:
    """Everything a migration must preserve, read with PEEK so nothing changes at the source."""
    folders: Snapshot = {}
    for flags, _delimiter, name in client.list_folders():
        if b"\\Noselect" in flags or b"\\NonExistent" in flags:
            continue
        client.select_folder(name, readonly=True)
        uids = client.search("ALL")
        fetched = client.fetch(uids, ["BODY.PEEK[]", "FLAGS", "INTERNALDATE"]) if uids else {}
        folders[name] = sorted(
            (data[b"BODY[]"], tuple(sorted(f for f in data[b"FLAGS"] if f != b"\\Recent")),
             data[b"INTERNALDATE"].astimezone(dt.UTC))
            for data in fetched.values()
        )
    return folders


# Folder -> (UIDVALIDITY, UIDNEXT, {UID: (flags, INTERNALDATE, size, SHA-1 of the bytes)}):
# what a UID-exact copy must keep, and what caching IMAP clients remember.
UidView = dict[str, tuple[int, int, dict[int, tuple[tuple[bytes, ...], dt.datetime, int, str]]]]


def uid_view(client: IMAPClient, only: set[str] | None = None) -> UidView:
    """Every selectable folder (or those in `only`), read-only, UIDs as the server says."""
    view: UidView = {}
    for flags, _sep, name in client.list_folders():
        if b"\\Noselect" in flags or (only is not None and name not in only):
            continue
        status = client.folder_status(name, [b"UIDVALIDITY", b"UIDNEXT"])
        client.select_folder(name, readonly=True)
        uids = client.search("ALL")  # UIDs (imapclient's default)
        fetched = client.fetch(uids, ["FLAGS", "INTERNALDATE", "RFC822.SIZE",
                                      "BODY.PEEK[]"]) if uids else {}
        view[name] = (status[b"UIDVALIDITY"], status[b"UIDNEXT"], {
            uid: (tuple(sorted(f for f in data[b"FLAGS"] if f != b"\\Recent")),
                           data[b"INTERNALDATE"], data[b"RFC822.SIZE"],
                           hashlib.sha1(data[b"BODY[]"]).hexdigest())
            for uid, data in fetched.items()})
    return view



def can_log_in(port: int, address: str, password: str) -> bool:
    """Whether an IMAP LOGIN at 127.0.0.1:port succeeds (a store, an old server or the proxy)."""
    with IMAPClient("127.0.0.1", port, ssl=False, timeout=10) as client:
        try:
            client.login(address, password)
        except imaplib.IMAP4.error:
            return False
        client.logout()
        return True


def imap_login(server: DovecotInstance, address: str, password: str | None = None) -> IMAPClient:
    """A session as the user: at an old server with their password, at the new store through
    its master user."""
    client = IMAPClient(server.host, port=server.imap_port, ssl=False, timeout=30)
    if password is None:
        client.plain_login(server.master_user, server.master_password,
                           authorization_identity=address)
    else:
        client.login(address, password)
    return client


def add_old_user(server: DovecotInstance, address: str, password: str,
                 timeout: float = 5.0) -> None:
    """A new user at an old server, once it can log in (Dovecot re-reads its passwd-file at
    most once a second)."""
    server.add_user(address, password)
    deadline = time.monotonic() + timeout
    while not can_log_in(server.imap_port, address, password):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{address} cannot log in to the old server")
        time.sleep(0.2)


def write_maildir(root: Path, messages: Iterable[bytes],
                  flags: Callable[[int], str] = lambda _n: "S") -> int:
    """Put messages straight into the Maildir INBOX at `root` (its cur/, read), owned like the
    instance's mail directory above it: thousands in a second, where APPEND takes a minute.
    (A folder is `root / name` below the owner's INBOX, LAYOUT=fs.) `flags(n)` gives the n-th
    message's maildir flag letters ("S" \\Seen, "F" \\Flagged, "" none; n from 1).
    Dovecot indexes them at the first SELECT. Returns how many were written."""
    owner = next(parent for parent in root.parents if parent.exists()).stat()
    created = [p for p in [*reversed(root.parents), root] if not p.exists()]
    for sub in ("cur", "new", "tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    count = 0
    for count, raw in enumerate(messages, start=1):
        (root / "cur" / f"{1_700_000_000 + count}.M{count}P1.test,S={len(raw)}:2,"
                        f"{flags(count)}").write_bytes(raw)
    for path in [*created, *(root / sub for sub in ("cur", "new", "tmp")),
                 *(root / "cur").iterdir()]:
        os.chown(path, owner.st_uid, owner.st_gid)
    return count
