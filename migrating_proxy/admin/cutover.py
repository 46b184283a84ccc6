"""The end of a domain's migration: `finish` (final pass, switch off, report) and `export`."""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Callable
from typing import Any

from sqlalchemy import select

from migrating_proxy.admin import Actor, audit
from migrating_proxy.admin.operations import NO_PASSWORD, Operations
from migrating_proxy.passwords import PENDING_HASH, dovecot_form
from migrating_proxy.store import Account, AccountState, Domain, Store, StoreError
from migrating_proxy.store.copystate import CopyState
from migrating_proxy.store.schema import vault

EXPORT_FORMATS = ("dovecot-passwd", "csv")


def finish(ops: Operations, domain_name: str,
           on_tick: Callable[[list[dict[str, Any]]], None] | None = None) -> dict[str, Any]:
    """Final incremental pass for every migrated account, wait, switch migration off, report.

    Only accounts that completed a pass get a final one: an account in ERROR would make the
    cut-over wait out its retries, and is reported instead. Accounts still served by the old
    server (passthrough) get a pass too, which ends in their switch; those that cannot
    (no password, a pass in ERROR, never migrated) are switched to the store as they are, since
    the old server is going, and reported. Vault entries are erased afterwards, except those
    of imported users never migrated: `migrate` still needs them.
    """
    domain = ops.store.accounts.get_domain(domain_name)
    if domain is None:
        raise StoreError(f"unknown domain {domain_name}")
    accounts = ops.store.accounts.list_migrating(domain.name)
    finals = ops.resync([a for a in accounts if a.migration_state is AccountState.COMPLETED
                         or (a.served_by_old_server
                             and a.migration_state is not AccountState.NEW)], final=True)
    rows = ops.wait([a.address for a in accounts], on_tick)
    unswitched = _switch_the_rest(ops, domain.name)
    ops.store.accounts.set_domain_migrating(domain.name, False)
    erased = _erase_vault(ops, [a for a in accounts if a.migration_state is not AccountState.NEW])
    report = _report(ops.store, domain.name, accounts, rows)
    _separate_unknown_passwords(report, rows)
    report["admin_password_erased"] = _erase_admin(ops, domain)
    report["no_final_pass"] = [o.address for o in finals if o.reason == NO_PASSWORD]
    report["vault_entries_erased"] = erased
    report["switched_without_final_pass"] = unswitched
    audit(ops.store.engine, ops.actor, "finish", domain=domain.name, accounts=len(accounts),
          migrated=len(report["migrated"]), errors=len(report["errors"]))
    return report


def _switch_the_rest(ops: Operations, domain: str) -> list[str]:
    """Accounts the old server still serves after the final passes: to the store, as they are."""
    switched = []
    for account in ops.store.accounts.list_migrating(domain):
        if account.served_by_old_server and ops.store.cutover.switch(account.id, held=False):
            switched.append(account.address)
    return switched


def _separate_unknown_passwords(report: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Accounts imported without a password whose users never logged in (pre-staged through
    the admin): migrated or not, nobody can log in to them until an admin sets a password,
    so they are listed on their own (`export` marks them too) and in no other list."""
    unknown = [row["address"] for row in rows if not row["password_known"]]
    report["prestaged_never_logged_in"] = unknown
    for key in ("migrated", "never_migrated", "unfinished"):
        report[key] = [address for address in report[key] if address not in unknown]


def _erase_admin(ops: Operations, domain: Domain) -> bool:
    """The old server's admin password goes with the migration: nothing copies any more."""
    if ops.vault.get_domain(domain.name) is None:
        return False
    with ops.store.engine.begin() as conn:
        ops.vault.erase_domain(domain.name, conn)
    return True


def _erase_vault(ops: Operations, accounts: list[Account]) -> int:
    erased = 0
    for account in accounts:
        if ops.vault.get(account.id) is not None:
            ops.vault.erase(account.id)
            erased += 1
    return erased


def _report(store: Store, domain: str, accounts: list[Account],
            rows: list[dict[str, Any]]) -> dict[str, Any]:
    by_state: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_state.setdefault(row["state"], []).append(row)
    skipped = [
        {"address": account.address, "folder": folder, "message": key, "reason": reason}
        for account in accounts
        for folder, key, reason in CopyState(store.engine, account.id).skipped()
    ]
    return {
        "domain": domain,
        "migrating": False,
        "accounts": len(accounts),
        "migrated": [row["address"] for row in by_state.get(AccountState.COMPLETED, [])],
        "errors": [{"address": row["address"], "last_error": row["last_error"]}
                   for row in by_state.get(AccountState.ERROR, [])],
        "never_migrated": [row["address"] for row in by_state.get(AccountState.NEW, [])],
        "unfinished": [row["address"] for row in by_state.get(AccountState.PENDING, [])],
        "messages_copied": sum(row["messages_copied"] for row in rows),
        "messages_skipped": sum(row["messages_skipped"] for row in rows),
        "bytes_copied": sum(row["bytes_copied"] for row in rows),
        "skipped": skipped,
        "skipped_reasons": dict(Counter(item["reason"] for item in skipped)),
    }


def export(store: Store, domain: str, fmt: str, actor: Actor | None = None) -> str:
    """The domain's accounts and hashes, for loading into the new store directly.

    Accounts whose hash is still pending (imported, never migrated) get Dovecot's locked
    entry in dovecot-passwd form and an empty hash in CSV: nobody can log in with them yet.
    """
    if store.accounts.get_domain(domain) is None:
        raise StoreError(f"unknown domain {domain}")
    if fmt not in EXPORT_FORMATS:
        raise StoreError(f"--format must be one of {', '.join(EXPORT_FORMATS)}")
    accounts = store.accounts.list_accounts(domain)
    audit(store.engine, actor or Actor.command_line(), "export", domain=domain.lower(),
          format=fmt, accounts=len(accounts))
    if fmt == "dovecot-passwd":
        return "".join(f"{a.address.lower()}:{dovecot_form(a.password_hash)}\n"
                       for a in accounts)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    # password_known false: imported without a password, never logged in (pre-staged): an
    # admin must set one (the hash is empty and the dovecot-passwd entry locked meanwhile).
    writer.writerow(["address", "password_hash", "migration_state", "password_known"])
    known = _passwords_known(store, accounts)
    for a in accounts:
        pending = a.password_hash == PENDING_HASH
        writer.writerow([a.address, "" if pending else a.password_hash, a.migration_state or "",
                         "true" if a.id in known else "false"])
    return out.getvalue()


def _passwords_known(store: Store, accounts: list[Account]) -> set[int]:
    """Ids of the accounts with a hash or a password in the vault."""
    pending = [a.id for a in accounts if a.password_hash == PENDING_HASH]
    with store.engine.connect() as conn:
        vaulted = set(conn.execute(select(vault.c.account_id)
                                   .where(vault.c.account_id.in_(pending))).scalars())
    return {a.id for a in accounts if a.password_hash != PENDING_HASH or a.id in vaulted}
