"""The notice dropped once into a migrating user's new INBOX: "your mail is moving" when the store
serves the user from the first login (immediate), "your mailbox has moved" at the switch
(passthrough).

Exactly once, across retries, restarts and concurrent logins: the notice's Message-ID is
derived from the account, and the store is searched for it before appending, so a crash
between APPEND and the database update is repaired by a search, not a second copy.
"""

from __future__ import annotations

import email.utils
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path

from migrating_proxy.migration.connections import StoreSpec, close_quietly, connect_store_imap

DEFAULT_TEMPLATE = "notice.txt"
MOVED_TEMPLATE = "moved-notice.txt"  # put in at the switch of a passthrough account


def load_template(path: Path | None, default: str = DEFAULT_TEMPLATE) -> str:
    if path is not None:
        return path.read_text(encoding="utf-8")
    packaged = resources.files("migrating_proxy").joinpath(default)
    return packaged.read_text(encoding="utf-8")


def message_id(account_id: int, domain: str) -> str:
    return f"<migration-notice.{account_id}@{domain}>"


def render(template: str, *, address: str, domain: str, old_server: str,
           account_id: int) -> bytes:
    """RFC 5322 bytes: the template's own headers (Subject) plus From, To, Date, Message-ID."""
    text = template.format(address=address, domain=domain, old_server=old_server)
    head, _, body = text.partition("\n\n")
    headers = [line for line in head.splitlines() if line.strip()]
    headers += [
        f"From: Postmaster <postmaster@{domain}>",
        f"To: <{address}>",
        # +0000, not formatdate()'s -0000, which RFC 5322 reserves for "zone unknown".
        f"Date: {email.utils.format_datetime(datetime.now(UTC))}",
        f"Message-ID: {message_id(account_id, domain)}",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
    ]
    lines = [*headers, "", *body.splitlines()]
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def insert_notice(store: StoreSpec, message: bytes, msgid: str, timeout: float) -> bool:
    """APPEND to INBOX unless it is already there; True if this call appended it."""
    client = connect_store_imap(store, timeout)
    try:
        client.select_folder("INBOX")
        if client.search(["HEADER", "Message-ID", msgid]):
            return False
        client.append("INBOX", message)
        return True
    finally:
        close_quietly(client)
