"""The admin commands' argument handling and output (the logic is in the sibling modules).

Data on stdout (a table, or JSON with `--json`), never a progress display unless stdout is a
terminal; errors as one line through cli.main. A command whose accounts ended in ERROR prints
its data first, then fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from migrating_proxy.admin import Actor, users
from migrating_proxy.admin.cutover import export, finish
from migrating_proxy.admin.imports import ImportRefused, import_users
from migrating_proxy.admin.operations import Operations, Outcome, select_accounts
from migrating_proxy.admin.progress import ProgressDisplay
from migrating_proxy.config import Config
from migrating_proxy.console import CommandError, print_rows, read_password
from migrating_proxy.passwords import PasswordHasher
from migrating_proxy.store import AccountState, Store
from migrating_proxy.store import audit as audit_trail
from migrating_proxy.store.admins import AdminStore

OUTCOME_COLUMNS = ["address", "result", "reason"]
WAIT_COLUMNS = [*OUTCOME_COLUMNS, "state", "messages_copied", "messages_skipped",
                "bytes_copied", "last_error"]


# -- import -------------------------------------------------------------------------------
def import_command(args: argparse.Namespace, config: Config, store: Store) -> int:
    try:
        data = args.file.read()  # cli.InputFile, read before privileges were dropped
    except OSError as exc:
        raise CommandError(f"cannot read {args.file}: {exc.strerror}") from None
    try:
        summary = import_users(Operations.open(config, store), data, str(args.file),
                               args.dry_run)
    except ImportRefused as refused:
        for bad in refused.bad_lines:  # every bad line first, then the one-line verdict
            print(f"{args.file}: {bad}", file=sys.stderr)
        raise CommandError(str(refused)) from None
    _print_summary(summary, args.json)
    return 0


def _print_summary(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        json.dump(summary, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        verb = "would import" if summary["dry_run"] else "imported"
        print(f"{verb} {summary['created']} new account(s), "
              f"updated {summary['updated']} existing account(s)")


# -- migrate / resync / stop / start ------------------------------------------------------
def pass_command(args: argparse.Namespace, config: Config, store: Store) -> int:
    targets = select_accounts(store, args.addresses, args.domain, args.all)
    operations = Operations.open(config, store)
    action = "prestage" if getattr(args, "prestage", False) else args.command
    outcomes: list[Outcome] = getattr(operations, action)(targets)
    rows = [outcome.as_dict() for outcome in outcomes]
    columns = OUTCOME_COLUMNS
    if getattr(args, "wait", False):
        final = {row["address"]: row for row in _wait(operations, [a.address for a in targets])}
        rows = [{**row, **_final_fields(final.get(row["address"]))} for row in rows]
        columns = WAIT_COLUMNS
    print_rows(rows, args.json, columns)
    failed = [row["address"] for row in rows
              if row["result"] == "error" or row.get("state") == AccountState.ERROR]
    if failed:
        raise CommandError(f"{len(failed)} account(s) in ERROR: {', '.join(failed[:5])}"
                           f"{' ...' if len(failed) > 5 else ''} (see status)")
    return 0


def _final_fields(row: dict[str, Any] | None) -> dict[str, Any]:
    keys = ("state", "messages_copied", "messages_skipped", "bytes_copied", "last_error")
    return {key: row[key] if row else None for key in keys}


def _wait(operations: Operations, addresses: list[str]) -> list[dict[str, Any]]:
    """Wait for the passes to end, with the live display on a terminal only."""
    display = ProgressDisplay(sys.stdout) if sys.stdout.isatty() else None
    return operations.wait(addresses, display.update if display else None)


# -- finish / export ----------------------------------------------------------------------
def finish_command(args: argparse.Namespace, config: Config, store: Store) -> int:
    if store.accounts.get_domain(args.domain) is None:
        raise CommandError(f"unknown domain {args.domain}")
    if not args.yes and sys.stdin.isatty() and not _confirm(args.domain):
        raise CommandError("not confirmed; nothing changed")
    operations = Operations.open(config, store)
    display = ProgressDisplay(sys.stdout) if sys.stdout.isatty() else None
    report = finish(operations, args.domain, display.update if display else None)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _print_report(report)
    return 0


def _confirm(domain: str) -> bool:
    sys.stderr.write(f"Finish the migration of {domain}: run a final pass, then refuse unknown "
                     "users and stop relaying to the old server? [y/N] ")
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def _print_report(report: dict[str, Any]) -> None:
    print(f"domain {report['domain']}: migration switched off")
    print(f"accounts: {report['accounts']}, migrated: {len(report['migrated'])}, "
          f"with errors: {len(report['errors'])}, "
          f"imported but never migrated: {len(report['never_migrated'])}")
    print(f"messages copied: {report['messages_copied']}, "
          f"skipped: {report['messages_skipped']}")
    for reason, count in report["skipped_reasons"].items():
        print(f"  skipped {count}: {reason}")
    for item in report["errors"]:
        print(f"error: {item['address']}: {item['last_error']}")
    for address in report["never_migrated"]:
        print(f"never migrated: {address}")
    for address in report["no_final_pass"]:
        print(f"no final pass (no stored password): {address}")
    for address in report["switched_without_final_pass"]:
        print(f"switched from the old server without a final pass: {address}")
    print(f"vault entries erased: {report['vault_entries_erased']}")


def export_command(args: argparse.Namespace, config: Config, store: Store) -> int:
    sys.stdout.write(export(store, args.domain, args.format))
    return 0


# -- admin users and the audit trail ------------------------------------------------------
def admin_user_command(args: argparse.Namespace, config: Config, store: Store) -> int:
    actor = Actor.command_line()
    if args.action in ("add", "passwd"):
        if args.action == "passwd":
            AdminStore(store.engine).require_user(args.name)  # before asking for a password
        change = users.add_user if args.action == "add" else users.set_password
        hasher = PasswordHasher(config.provision.scheme, config.provision.rounds)
        change(store, hasher, actor, args.name, read_password())
    elif args.action == "remove":
        users.remove_user(store, actor, args.name)
    elif args.action == "token" and args.revoke:
        print(f"revoked {users.revoke_tokens(store, actor, args.name)} token(s)")
    elif args.action == "token":
        print(users.new_token(store, actor, args.name))  # the only time it is ever shown
    elif args.action == "list":
        rows = [{"name": user.name, "created_at": user.created_at.isoformat()}
                for user in AdminStore(store.engine).list_users()]
        print_rows(rows, args.json, ["name", "created_at"])
    return 0


def audit_command(args: argparse.Namespace, config: Config, store: Store) -> int:
    if args.limit < 1:
        raise CommandError("--limit must be at least 1")
    _, entries = audit_trail.entries(store.engine, args.limit, 0, args.action)
    if not args.json:
        entries = [{**entry, "details": json.dumps(entry["details"], sort_keys=True)}
                   for entry in entries]
    print_rows(entries, args.json, ["at", "who", "via", "action", "details"])
    return 0
