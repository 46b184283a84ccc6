"""Domains: the reading (`domain list`) and the changes (add, the migration switch, remove).

Shared by `migrating-proxy domain ...` and the web console, so both validate the same way and
both leave the same audit trail.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from migrating_proxy.admin import Actor, audit
from migrating_proxy.config import Config
from migrating_proxy.endpoints import parse_endpoint
from migrating_proxy.store import Domain, Store, StoreError
from migrating_proxy.store.accounts import (
    DOMAIN_TYPES,
    PASSTHROUGH,
    arrange_sources,
    check_domain,
)

# The table columns of `domain list` (the JSON has every field of the domain).
DOMAIN_COLUMNS = ["name", "migrating", "source_url", "relay_url", "type", "cutover"]


def domain_dict(domain: Domain) -> dict[str, Any]:
    """One domain as `domain list --json` and `GET /api/v1/domains` show it."""
    return {**domain.__dict__, "sources": list(domain.sources)}


def domain_rows(store: Store) -> list[dict[str, Any]]:
    return [domain_dict(domain) for domain in store.accounts.list_domains()]


def require_domain(store: Store, name: str) -> Domain:
    domain = store.accounts.get_domain(name)
    if domain is None:
        raise StoreError(f"unknown domain {name}")
    return domain


# What `domain add` gives the options not named (engine: the configuration's migration.engine).
DOMAIN_DEFAULTS: dict[str, Any] = {"type": "default", "source_user": "%u",
                                   "subscribed_only": False, "notice": True,
                                   "verify_tls": True, "cutover": PASSTHROUGH}


def build_domain(name: str, options: Mapping[str, Any], *, disabled: bool = False) -> Domain:
    """A domain from an admin's options (`domain add`'s flags, the console's form), validated;
    options not given (None or absent) take DOMAIN_DEFAULTS."""
    return Domain(name=check_domain(name), migrating=not disabled,
                  **DOMAIN_DEFAULTS | domain_changes(options))


def domain_changes(options: Mapping[str, Any]) -> dict[str, Any]:
    """Domain fields from the options given (validated); options None or absent are left out.

    Option names are `domain add|set`'s flags: `source` is a list of URLs (at most one IMAP
    and one POP3), `source_ca` the PEM text of the old server's CA ("" for none).
    """
    given = {key: value for key, value in options.items() if value is not None}
    changes: dict[str, Any] = {}
    if "source" in given:
        urls = [parse_endpoint(url, allowed=("imap", "pop3")).url for url in given["source"]]
        changes["source_url"], changes["pop3_source_url"] = arrange_sources(urls)
    if "relay" in given:
        changes["relay_url"] = parse_endpoint(given["relay"], allowed=("smtp", "lmtp")).url
    if "source_user" in given:
        if "%" in given["source_user"].replace("%u", "").replace("%n", "").replace("%d", ""):
            raise StoreError("--source-user may only use %u, %n and %d")
        changes["source_user"] = given["source_user"]
    if "source_ca" in given:
        if given["source_ca"] and given.get("verify_tls") is False:
            raise StoreError("--source-ca and --no-verify-tls contradict each other")
        changes["source_ca"] = given["source_ca"] or None
    for name in ("type", "cutover", "engine", "subscribed_only", "notice", "verify_tls"):
        if name in given:
            changes[name] = given[name]
    if changes.get("type", "default") not in DOMAIN_TYPES:
        raise StoreError(f"--type must be one of {', '.join(DOMAIN_TYPES)}")
    return changes


def check_engine(domain: Domain, config: Config) -> None:
    """dsync only where nothing writes to the store before the switch, and only configured."""
    if domain.engine != "dsync":
        return
    if domain.cutover != PASSTHROUGH:
        raise StoreError(
            "--engine dsync needs --cutover passthrough: with immediate the store mailbox is "
            "written to before the last pass, and dsync's backup would undo those writes")
    if config.migration.dsync_credentials is None:
        raise StoreError("--engine dsync needs migration.dsync_credentials in the "
                         "configuration (and deploy/dovecot/migrating-proxy-dsync.conf on "
                         "the store)")


def add_domain(store: Store, config: Config, actor: Actor, domain: Domain) -> Domain:
    check_engine(domain, config)
    store.accounts.add_domain(domain)
    audit(store.engine, actor, "domain_add", domain=domain.name, source=domain.source_url,
          migrating=domain.migrating)
    return require_domain(store, domain.name)


def update_domain(store: Store, config: Config, actor: Actor, name: str,
                  changes: dict[str, Any]) -> Domain:
    """`domain set`: change the options given, the others stay as they are."""
    current = require_domain(store, name)
    check_engine(replace(current, **changes), config)
    store.accounts.update_domain(name, **changes)
    audit(store.engine, actor, "domain_set", domain=current.name, changed=sorted(changes))
    return require_domain(store, name)


def set_migrating(store: Store, actor: Actor, name: str, migrating: bool) -> Domain:
    """The per-domain migration switch; takes effect at the next login."""
    store.accounts.set_domain_migrating(name, migrating)
    audit(store.engine, actor, "domain_enable" if migrating else "domain_disable",
          domain=name.lower())
    return require_domain(store, name)


def remove_domain(store: Store, actor: Actor, name: str) -> None:
    store.accounts.remove_domain(name)
    audit(store.engine, actor, "domain_remove", domain=name.lower())
