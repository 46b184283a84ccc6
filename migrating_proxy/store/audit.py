"""The audit trail: every admin action, from the CLI, the web console and the API, in one table.

Rows are written by `migrating_proxy.admin.audit` (the one place every caller goes through) and
read by the console's audit page, `GET /api/v1/audit`, and `migrating-proxy audit`.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, func, insert, select

from migrating_proxy.store.accounts import now
from migrating_proxy.store.schema import admin_actions

# The JSON keys of one audit entry (`audit --json`, `GET /api/v1/audit`): extend only.
AUDIT_KEYS = ("id", "at", "who", "via", "action", "details")


def record(engine: Engine, who: str, via: str, action: str, details: dict[str, Any]) -> None:
    with engine.begin() as conn:
        conn.execute(insert(admin_actions).values(
            at=now(), who=who, via=via, action=action,
            details=json.dumps(details, default=str, sort_keys=True)))


def entries(engine: Engine, limit: int = 100, offset: int = 0,
            action: str | None = None) -> tuple[int, list[dict[str, Any]]]:
    """(how many there are, the newest first from `offset`), optionally of one action."""
    query = select(admin_actions)
    count = select(func.count()).select_from(admin_actions)
    if action:
        query = query.where(admin_actions.c.action == action)
        count = count.where(admin_actions.c.action == action)
    query = query.order_by(admin_actions.c.id.desc()).limit(limit).offset(offset)
    with engine.connect() as conn:
        total = conn.execute(count).scalar_one()
        rows = conn.execute(query).all()
    return total, [_entry(row) for row in rows]


def _entry(row) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    at: datetime = row.at if row.at.tzinfo else row.at.replace(tzinfo=UTC)
    return {"id": row.id, "at": at.isoformat(), "who": row.who, "via": row.via,
            "action": row.action, "details": json.loads(row.details)}
