"""Asking every proxy process that shares this database to close an account's live sessions.

Sessions live in the `serve` processes (frontends/registry.py keeps them per account); the
database is the only thing those processes, and the workers and admin commands that may want a
session closed, all share. So a request is a row: `request_close(address, reason)` from any
process on any machine, and each `serve` polls `requests_since` four times a second (as a
running copy polls its job's pause), then closes the account's sessions it holds.

Polling by time, not by id: on PostgreSQL ids are handed out before commit, so a request with a
smaller id can become visible after a larger one was already seen. A poller asks for everything
newer than its last poll minus `OVERLAP` and ignores the ids it handled; that also absorbs clock
differences between machines up to `OVERLAP`. Rows older than `RETAIN` are deleted by the next
request.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, delete, insert, select

from migrating_proxy.store.accounts import address_key, now
from migrating_proxy.store.schema import close_requests

OVERLAP = timedelta(seconds=30)  # how far back each poll looks again
RETAIN = timedelta(hours=1)
MAX_REASON = 200


@dataclass(frozen=True)
class CloseRequest:
    id: int
    address_key: str  # lower-cased address
    reason: str  # shown to IMAP clients in the BYE: plain words, no secrets
    created_at: datetime


class SessionControl:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def request_close(self, address: str, reason: str) -> int:
        """Ask every `serve` process to close `address`'s sessions (within about a second).

        `reason` is what an IMAP client sees (`* BYE <reason>`): printable ASCII, cut to 200
        characters. Returns the request's id."""
        text = "".join(ch if " " <= ch <= "~" else " " for ch in reason)[:MAX_REASON].strip()
        stamp = now()
        with self.engine.begin() as conn:
            conn.execute(delete(close_requests).where(close_requests.c.created_at
                                                      < stamp - RETAIN))
            result = conn.execute(insert(close_requests).values(
                address_key=address_key(address), reason=text or "Session closed.",
                created_at=stamp))
        return int(result.inserted_primary_key[0])  # type: ignore[index]

    def requests_since(self, since: datetime) -> list[CloseRequest]:
        """Requests made after `since` (one indexed read: cheap enough to poll every second)."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(close_requests)
                                .where(close_requests.c.created_at > since)
                                .order_by(close_requests.c.id)).all()
        return [CloseRequest(row.id, row.address_key, row.reason, _aware(row.created_at))
                for row in rows]


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)  # SQLite hands back naive
