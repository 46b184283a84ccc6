"""The `migrating-proxy` command line. Its commands, flags and JSON keys are a public contract.

Conventions: data on stdout (tables, or JSON with `--json`), diagnostics on stderr, exit 0 on
success, 1 with a one-line `migrating-proxy: error: ...` on a refused request or bad
configuration, 2 on a usage error (argparse's own).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from migrating_proxy import config as config_module
from migrating_proxy import logs
from migrating_proxy.admin import Actor, domains
from migrating_proxy.admin.cutover import EXPORT_FORMATS
from migrating_proxy.admin.progress import watch
from migrating_proxy.admin.views import status_rows
from migrating_proxy.cacerts import CAFileError, read_ca_file
from migrating_proxy.config import Config, ConfigError
from migrating_proxy.console import CommandError, print_rows, read_password
from migrating_proxy.endpoints import EndpointError
from migrating_proxy.passwords import PasswordHasher
from migrating_proxy.provision import Provisioner, make_provisioner
from migrating_proxy.store import AddressError, DatabaseError, Store, StoreError, open_store
from migrating_proxy.store.accounts import DOMAIN_TYPES
from migrating_proxy.store.vault import VaultKeyError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="migrating-proxy", description="Transparent on-login mail migration proxy."
    )
    parser.add_argument("--config", metavar="PATH", help="configuration file (TOML)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("serve", help="run every configured listener until SIGTERM/SIGINT")
    worker = commands.add_parser("worker", help="run copy workers only (no listeners)")
    worker.add_argument("--processes", type=int, metavar="N",
                        help="mailboxes copied at a time (default: migration.workers)")
    status = commands.add_parser("status", help="migration state and progress per account")
    status.add_argument("addresses", nargs="*", metavar="ADDRESS")
    status.add_argument("--domain", metavar="DOMAIN", help="only this domain's accounts")
    status.add_argument("--json", action="store_true")
    status.add_argument("--watch", action="store_true", help="refresh on a terminal")
    _domain_commands(commands.add_parser("domain", help="manage migrating domains"))
    _account_commands(commands.add_parser("account", help="manage local accounts"))
    _admin_commands(commands)
    _web_commands(commands)
    return parser


def _web_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    web = commands.add_parser("web", help="run the web console and its JSON API")
    web.add_argument("--listen", metavar="HOST:PORT",
                     help="address to serve on (default: web.listen, else 127.0.0.1:8080)")
    users = commands.add_parser("admin-user", help="admin users of the web console and API")
    sub = users.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (("add", "create (password from stdin or a prompt)"),
                         ("passwd", "set a new password (stdin or prompt); ends sessions"),
                         ("remove", "delete, with the user's tokens and sessions")):
        sub.add_parser(action, help=text).add_argument("name")
    token = sub.add_parser("token", help="print a new API token for scripts (shown once)")
    token.add_argument("name")
    token.add_argument("--revoke", action="store_true", help="revoke all the user's tokens")
    sub.add_parser("list").add_argument("--json", action="store_true")
    trail = commands.add_parser("audit", help="the audit trail of admin actions, newest first")
    trail.add_argument("--action", metavar="ACTION", help="only this action (e.g. finish)")
    trail.add_argument("--limit", type=int, default=50, metavar="N")
    trail.add_argument("--json", action="store_true")


def _admin_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    imp = commands.add_parser("import", help="import migration users from a CSV file")
    imp.add_argument("file", metavar="FILE")
    imp.add_argument("--dry-run", action="store_true", help="validate only")
    imp.add_argument("--json", action="store_true")
    for name, text, waits in (
            ("migrate", "verify credentials, then queue full passes", True),
            ("resync", "queue incremental passes (mail that arrived since)", True),
            ("stop", "pause passes at the next batch boundary", False),
            ("start", "resume paused passes", False)):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("addresses", nargs="*", metavar="ADDRESS")
        sub.add_argument("--domain", metavar="DOMAIN")
        sub.add_argument("--all", action="store_true", help="every migrating account")
        sub.add_argument("--json", action="store_true")
        if waits:
            sub.add_argument("--wait", action="store_true", help="wait until every pass ends")
    fin = commands.add_parser("finish", help="final pass, switch the domain's migration off, "
                                             "report")
    fin.add_argument("domain", metavar="DOMAIN")
    fin.add_argument("--yes", action="store_true", help="don't ask for confirmation")
    fin.add_argument("--json", action="store_true")
    exp = commands.add_parser("export", help="a domain's accounts and password hashes")
    exp.add_argument("domain", metavar="DOMAIN")
    exp.add_argument("--format", required=True, choices=EXPORT_FORMATS)


def _domain_commands(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = sub.add_parser("add", help="add a domain and its old server")
    add.add_argument("name")
    add.add_argument("--source", required=True, metavar="URL",
                     help="old server: imap:// imap+starttls:// imaps:// pop3:// pop3+starttls:// "
                          "pop3s://")
    add.add_argument("--relay", metavar="URL", help="old SMTP server for not-yet-moved users")
    add.add_argument("--type", choices=DOMAIN_TYPES, default="default")
    add.add_argument("--source-user", default="%u", metavar="TEMPLATE",
                     help="old server's login name: %%u address, %%n local part, %%d domain")
    add.add_argument("--subscribed-only", action="store_true")
    add.add_argument("--disabled", action="store_true", help="add with migration switched off")
    add.add_argument("--no-notice", action="store_true",
                     help="don't put the 'your mail is moving' notice in migrated INBOXes")
    add.add_argument("--no-verify-tls", action="store_true",
                     help="accept the old server's certificate unverified (self-signed)")
    add_source_tls_options(add)
    for action in ("enable", "disable", "remove"):
        sub.add_parser(action).add_argument("name")
    sub.add_parser("list").add_argument("--json", action="store_true")


def add_source_tls_options(parser: argparse.ArgumentParser) -> None:
    """Options about trusting the old server, shared by the domain commands that set them."""
    parser.add_argument("--source-ca", metavar="FILE",
                        help="PEM file with the certificate(s) of the private CA that signed the "
                             "old server's certificate; its content is stored, trusted beside "
                             "the system's CAs ('' for none)")


def source_ca_from_args(args: argparse.Namespace) -> str | None:
    """--source-ca's PEM content: None if not given, "" for an explicit '' (none)."""
    if args.source_ca is None or args.source_ca == "":
        return args.source_ca
    try:
        return read_ca_file(args.source_ca)
    except CAFileError as exc:
        raise CommandError(str(exc)) from None


def _account_commands(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (("add", "create (password from stdin or a prompt)"),
                         ("passwd", "set a new password (stdin or prompt)"),
                         ("remove", "delete from the proxy and the store's user file")):
        sub.add_parser(action, help=text).add_argument("address")
    sub.add_parser("list").add_argument("--json", action="store_true")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_module.load(args.config)
        logs.configure(config.log.format, config.log.level)
        return run(args, config)
    except (ConfigError, CommandError, StoreError, AddressError, DatabaseError,
            EndpointError, VaultKeyError) as exc:
        print(f"migrating-proxy: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def run(args: argparse.Namespace, config: Config) -> int:
    if args.command == "serve":
        from migrating_proxy.server import serve

        logs.forward_twisted_logs()
        return serve(config)
    if args.command == "worker":
        from migrating_proxy.worker import run_pool

        processes = config.migration.workers if args.processes is None else args.processes
        if processes < 1:
            raise CommandError("--processes must be at least 1")
        return run_pool(config, processes)
    if args.command == "web":
        from migrating_proxy.web.server import WebStartError, run_web

        try:
            return run_web(config, args.listen)
        except WebStartError as exc:
            raise CommandError(str(exc)) from None
    # Imported only for the admin commands: `serve` and `worker` need none of it.
    from migrating_proxy.admin import cli as admin_cli

    handler: Callable[[argparse.Namespace, Config, Store], int] = {
        "domain": domain_command,
        "account": account_command,
        "status": status_command,
        "import": admin_cli.import_command,
        "migrate": admin_cli.pass_command,
        "resync": admin_cli.pass_command,
        "stop": admin_cli.pass_command,
        "start": admin_cli.pass_command,
        "finish": admin_cli.finish_command,
        "export": admin_cli.export_command,
        "admin-user": admin_cli.admin_user_command,
        "audit": admin_cli.audit_command,
    }[args.command]
    store = open_store(config.database_url)
    try:
        return handler(args, config, store)
    finally:
        store.close()


# -- domain -------------------------------------------------------------------------------
def domain_command(args: argparse.Namespace, config: Config, store: Store) -> int:
    actor = Actor.command_line()
    if args.action == "add":
        domains.add_domain(store, actor, domains.build_domain(
            args.name, args.source, args.relay, args.type, args.source_user,
            args.subscribed_only, args.disabled, notice=not args.no_notice,
            verify_tls=not args.no_verify_tls, source_ca=source_ca_from_args(args) or None))
    elif args.action in ("enable", "disable"):
        domains.set_migrating(store, actor, args.name, args.action == "enable")
    elif args.action == "remove":
        domains.remove_domain(store, actor, args.name)
    elif args.action == "list":
        print_rows(domains.domain_rows(store), args.json, domains.DOMAIN_COLUMNS)
    return 0


# -- account ------------------------------------------------------------------------------
def account_command(args: argparse.Namespace, config: Config, store: Store) -> int:
    accounts = store.accounts
    hasher = PasswordHasher(config.provision.scheme, config.provision.rounds)
    provisioner = make_provisioner(config.provision, accounts)
    if args.action == "add":
        address = accounts.add_account(args.address, hasher.hash(read_password())).address
        _provision_or_undo(provisioner, address, undo=lambda: accounts.remove_account(address))
    elif args.action == "passwd":
        if accounts.get_account(args.address) is None:
            raise CommandError(f"unknown account {args.address}")
        accounts.set_password_hash(args.address, hasher.hash(read_password()))
        provisioner.update(args.address)
    elif args.action == "remove":
        accounts.remove_account(args.address)
        provisioner.update(args.address)
    elif args.action == "list":
        rows = [
            {"address": a.address, "migration_state": a.migration_state,
             "created_at": a.created_at.isoformat(),
             "last_login_at": a.last_login_at.isoformat() if a.last_login_at else None}
            for a in accounts.list_accounts()
        ]
        print_rows(rows, args.json, ["address", "migration_state", "created_at", "last_login_at"])
    return 0


def _provision_or_undo(provisioner: Provisioner, address: str,
                       undo: Callable[[], None]) -> None:
    try:
        provisioner.update(address)
    except OSError as exc:
        undo()
        raise CommandError(f"cannot write the store's user file: {exc.strerror}") from None


# -- status -------------------------------------------------------------------------------
def status_command(args: argparse.Namespace, config: Config, store: Store) -> int:
    rows = status_rows(store, args.addresses, args.domain)
    if args.json:
        print_rows(rows, True, [])
    elif args.watch and sys.stdout.isatty():
        watch(lambda: status_rows(store, args.addresses, args.domain), print_status)
    else:
        print_status(rows)
    return 0


def print_status(rows: list[dict[str, Any]]) -> None:
    table = [{**row, "progress": _progress(row), "last_pass": row["last_pass_at"]}
             for row in rows]
    print_rows(table, False, ["address", "state", "progress", "last_error", "last_pass"])


def _progress(row: dict[str, Any]) -> str:
    total = row["messages_total"]
    done = row["messages_copied"] + row["messages_skipped"]
    folders = f"{row['folders_done']}/{row['folders_total']} folders"
    percent = f" ({100 * done // total}%)" if total else ""
    return f"{done}/{total} messages{percent}, {folders}, {row['bytes_copied']} bytes"
