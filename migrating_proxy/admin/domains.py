"""Domains: the reading (`domain list`) and the changes (add, the migration switch, remove).

Shared by `migrating-proxy domain ...` and the web console, so both validate the same way and
both leave the same audit trail.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from migrating_proxy.admin import Actor, audit
from migrating_proxy.admin.source_admin import (
    admin_changes,
    check_admin,
    needs_check,
    password_for,
    save_secret,
)
from migrating_proxy.config import Config
from migrating_proxy.endpoints import parse_endpoint
from migrating_proxy.store import Domain, Store, StoreError
from migrating_proxy.store.accounts import (
    DOMAIN_TYPES,
    PASSTHROUGH,
    arrange_sources,
    check_domain,
)
from migrating_proxy.store.vault import Vault, load_or_create_key

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
    changes.update(admin_changes(given))
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


def add_domain(store: Store, config: Config, actor: Actor, domain: Domain,
               admin_password: str | None = None) -> Domain:
    """`domain add`; with `--source-admin`, its credentials are checked at the old server
    first and saved (encrypted) with the domain, or neither is."""
    check_engine(domain, config)
    vault = _vault(store, config) if domain.source_admin or admin_password else None
    password = password_for(domain, admin_password, vault) if vault else None
    if password is not None:
        check_admin(store, domain, password, config.migration.source_timeout)
    with store.engine.begin() as conn:
        store.accounts.add_domain(domain, conn)
        if vault is not None:
            save_secret(vault, domain, password, conn)
    audit(store.engine, actor, "domain_add", domain=domain.name, source=domain.source_url,
          migrating=domain.migrating, source_admin=domain.source_admin)
    return require_domain(store, domain.name)


def update_domain(store: Store, config: Config, actor: Actor, name: str,
                  changes: dict[str, Any], admin_password: str | None = None) -> Domain:
    """`domain set`: change the options given, the others stay as they are. Admin
    credentials that would change are checked at the old server first (see add_domain)."""
    current = require_domain(store, name)
    wanted = replace(current, **changes)
    check_engine(wanted, config)
    vault = _vault(store, config)
    password = password_for(wanted, admin_password, vault)
    if password is not None and needs_check(changes, admin_password):
        check_admin(store, wanted, password, config.migration.source_timeout)
    with store.engine.begin() as conn:
        store.accounts.update_domain(name, conn, **changes)
        save_secret(vault, wanted, admin_password, conn)
    changed = sorted(changes) + (["source_admin_password"] if admin_password else [])
    audit(store.engine, actor, "domain_set", domain=current.name, changed=changed)
    return require_domain(store, name)


def _vault(store: Store, config: Config) -> Vault:
    return Vault(store.engine, load_or_create_key(config.vault_key_path))


def set_migrating(store: Store, actor: Actor, name: str, migrating: bool) -> Domain:
    """The per-domain migration switch; takes effect at the next login."""
    store.accounts.set_domain_migrating(name, migrating)
    audit(store.engine, actor, "domain_enable" if migrating else "domain_disable",
          domain=name.lower())
    return require_domain(store, name)


def remove_domain(store: Store, actor: Actor, name: str) -> None:
    store.accounts.remove_domain(name)
    audit(store.engine, actor, "domain_remove", domain=name.lower())
