"""Domains: the reading (`domain list`) and the changes (add, the migration switch, remove).

Shared by `migrating-proxy domain ...` and the web console, so both validate the same way and
both leave the same audit trail.
"""

from __future__ import annotations

from typing import Any

from migrating_proxy.admin import Actor, audit
from migrating_proxy.endpoints import parse_endpoint
from migrating_proxy.store import Domain, Store, StoreError
from migrating_proxy.store.accounts import DOMAIN_TYPES

# The table columns of `domain list` (the JSON has every field of the domain).
DOMAIN_COLUMNS = ["name", "migrating", "source_url", "relay_url", "type"]


def domain_dict(domain: Domain) -> dict[str, Any]:
    """One domain as `domain list --json` and `GET /api/v1/domains` show it."""
    return dict(domain.__dict__)


def domain_rows(store: Store) -> list[dict[str, Any]]:
    return [domain_dict(domain) for domain in store.accounts.list_domains()]


def require_domain(store: Store, name: str) -> Domain:
    domain = store.accounts.get_domain(name)
    if domain is None:
        raise StoreError(f"unknown domain {name}")
    return domain


def build_domain(name: str, source: str, relay: str | None = None, type: str = "default",
                 source_user: str = "%u", subscribed_only: bool = False,
                 disabled: bool = False, notice: bool = True,
                 verify_tls: bool = True, source_ca: str | None = None) -> Domain:
    """A domain from an admin's options (the flags of `domain add`), validated.
    `source_ca` is the PEM text of the old server's CA (cacerts.read_ca_file)."""
    source_url = parse_endpoint(source, allowed=("imap", "pop3")).url
    relay_url = parse_endpoint(relay, allowed=("smtp", "lmtp")).url if relay else None
    if "%" in source_user.replace("%u", "").replace("%n", "").replace("%d", ""):
        raise StoreError("--source-user may only use %u, %n and %d")
    if type not in DOMAIN_TYPES:
        raise StoreError(f"--type must be one of {', '.join(DOMAIN_TYPES)}")
    if "@" in name or not name.strip(". ") or any(ch.isspace() for ch in name):
        raise StoreError(f"{name!r} is not a domain name")
    if source_ca and not verify_tls:
        raise StoreError("--source-ca and --no-verify-tls contradict each other")
    return Domain(
        name=name.lower(), source_url=source_url, migrating=not disabled, relay_url=relay_url,
        type=type, source_user=source_user, subscribed_only=subscribed_only, notice=notice,
        verify_tls=verify_tls, source_ca=source_ca,
    )


def add_domain(store: Store, actor: Actor, domain: Domain) -> Domain:
    store.accounts.add_domain(domain)
    audit(store.engine, actor, "domain_add", domain=domain.name, source=domain.source_url,
          migrating=domain.migrating)
    return require_domain(store, domain.name)


def set_migrating(store: Store, actor: Actor, name: str, migrating: bool) -> Domain:
    """The per-domain migration switch; takes effect at the next login."""
    store.accounts.set_domain_migrating(name, migrating)
    audit(store.engine, actor, "domain_enable" if migrating else "domain_disable",
          domain=name.lower())
    return require_domain(store, name)


def remove_domain(store: Store, actor: Actor, name: str) -> None:
    store.accounts.remove_domain(name)
    audit(store.engine, actor, "domain_remove", domain=name.lower())
