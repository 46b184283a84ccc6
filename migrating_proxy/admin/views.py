"""What admins read: status rows and per-domain totals, for `status` and the web console alike.

The dicts are built by store/status.py, so `status --json`, `GET /api/v1/status` and the
console's accounts page always carry the same keys, new ones included.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from migrating_proxy.admin.domains import require_domain
from migrating_proxy.store import Store, StoreError
from migrating_proxy.store.status import StatusQuery, domain_totals, empty_totals, status_page


def status_rows(store: Store, addresses: list[str], domain: str | None) -> list[dict[str, Any]]:
    """`status [ADDRESS...] [--domain D]`: every row asked for; unknown names are refused."""
    return status_query(store, StatusQuery(domain=domain, addresses=tuple(addresses)))[1]


def status_query(store: Store, ask: StatusQuery) -> tuple[int, list[dict[str, Any]]]:
    """(rows matching, the page asked for); StoreError for an unknown domain or address."""
    if ask.domain is not None:
        ask = replace(ask, domain=require_domain(store, ask.domain).name)
    total, rows = status_page(store.engine, ask)
    if ask.addresses:
        known = {row["address"].lower() for row in rows}
        unknown = [a for a in ask.addresses if a.lower() not in known]
        if unknown and ask.limit is None and not (ask.state or ask.search):
            raise StoreError(f"unknown account {unknown[0]}")
    return total, rows


def totals(store: Store) -> dict[str, dict[str, Any]]:
    """Per configured domain: accounts per state and the progress counters summed."""
    found = domain_totals(store.engine)
    return {d.name: found.get(d.name) or empty_totals() for d in store.accounts.list_domains()}
