"""The old server's admin credentials of a domain (`domain add|set --source-admin ...`).

With them the copy logs in at the old server *as each user, through the admin*, so mailboxes
can be pre-staged before their users log in (issue 13). The password comes from a file (never
the command line), is checked at the old server before anything is saved, and is kept only in
the vault, encrypted. A refusal is one line and leaves the domain as it was.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import Connection

from migrating_proxy.migration.connections import (
    ADMIN_STYLES,
    SourceAuthError,
    SourceUnavailable,
    check_source_login,
)
from migrating_proxy.specs import source_admin, source_spec
from migrating_proxy.store import Domain, Store, StoreError
from migrating_proxy.store.vault import Vault

# The options of `domain add|set` that are about the admin (Domain field names).
ADMIN_FIELDS = ("source_admin", "source_admin_style", "source_admin_separator")
# Answers that mean "your credentials are right, but you may not be that user" (RFC 5530
# AUTHORIZATIONFAILED; Dovecot's POP3 says it in words): the admin itself was accepted.
_AUTHORIZATION_REFUSED = ("[AUTHORIZATIONFAILED]", "AUTHORIZATION FAILED")


def admin_changes(options: Mapping[str, Any]) -> dict[str, Any]:
    """Domain fields from the admin options given (validated); `--source-admin ''` clears."""
    changes: dict[str, Any] = {}
    if options.get("source_admin") is not None:
        user = options["source_admin"].strip()
        if any(ch.isspace() or ord(ch) < 32 for ch in user):
            raise StoreError("--source-admin must not contain spaces or control characters")
        changes["source_admin"] = user or None
        if not user:  # no admin: its style goes with it
            changes["source_admin_style"] = changes["source_admin_separator"] = None
    style = options.get("source_admin_style")
    if style is not None:
        if style not in ADMIN_STYLES:
            raise StoreError(f"--source-admin-style must be one of {', '.join(ADMIN_STYLES)}")
        changes["source_admin_style"] = style
    separator = options.get("source_admin_separator")
    if separator is not None:
        if not separator or len(separator) > 8 or any(ch.isspace() for ch in separator):
            raise StoreError("--source-admin-separator must be 1 to 8 characters, no spaces")
        changes["source_admin_separator"] = separator
    return changes


def needs_check(changes: Mapping[str, Any], password: str | None) -> bool:
    """Whether `domain set` must check the admin at the old server before saving: a new
    password, another admin or style, or another old server."""
    return password is not None or any(
        key in changes for key in (*ADMIN_FIELDS, "source_url", "source_user", "verify_tls",
                                   "source_ca"))


def password_for(domain: Domain, given: str | None, vault: Vault) -> str | None:
    """The admin password to check and keep: the one given, else the one kept."""
    if domain.source_admin is None:
        if given is not None:
            raise StoreError("--source-admin-password-file needs --source-admin USER")
        return None
    password = given if given is not None else vault.get_domain(domain.name)
    if password is None:
        raise StoreError("--source-admin needs --source-admin-password-file FILE")
    return password


def check_admin(store: Store, domain: Domain, password: str, timeout: float) -> None:
    """Log in at the old server as one of the domain's users through the admin (the first
    account, else postmaster): StoreError in one line if the old server refuses the admin.

    An existing user is not needed: "authorization failed" (the admin was authenticated but
    there is no such user) proves the admin's credentials as well as a login does."""
    admin = source_admin(domain, password)
    assert admin is not None
    probe = next(iter(store.accounts.list_migrating(domain.name)), None)
    address = probe.address if probe else f"postmaster@{domain.name}"
    spec = source_spec(domain, probe, address, "", admin=admin)
    try:
        check_source_login(spec, timeout)
    except SourceAuthError as exc:
        if not any(marker in str(exc).upper() for marker in _AUTHORIZATION_REFUSED):
            raise StoreError(f"the old server {spec.host} refused the admin credentials of "
                             f"{admin.user} ({admin.style}); nothing changed") from None
    except SourceUnavailable as exc:
        raise StoreError(f"cannot check the admin credentials: {exc}; nothing changed"
                         ) from None


def save_secret(vault: Vault, domain: Domain, password: str | None, conn: Connection) -> None:
    """Keep the checked password (or erase the old one with the admin), in the caller's
    transaction with the domain's own change."""
    if domain.source_admin is None:
        vault.erase_domain(domain.name, conn)
    elif password is not None:
        vault.put_domain(domain.name, password, conn)
