"""The `migrating-proxy` command line. Its commands, flags and JSON keys are a public contract.

Conventions: data on stdout (tables, or JSON with `--json`), diagnostics on stderr, exit 0 on
success, 1 with a one-line `migrating-proxy: error: ...` on a refused request or bad
configuration, 2 on a usage error (argparse's own).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from migrating_proxy import config as config_module
from migrating_proxy import logs
from migrating_proxy.admin import Actor, domains, os_user
from migrating_proxy.admin.cutover import EXPORT_FORMATS
from migrating_proxy.admin.progress import watch
from migrating_proxy.admin.views import status_rows
from migrating_proxy.cacerts import CAFileError, read_ca_file
from migrating_proxy.config import ENGINES, Config, ConfigError
from migrating_proxy.console import CommandError, print_rows, read_password
from migrating_proxy.endpoints import EndpointError
from migrating_proxy.migration.connections import ADMIN_STYLES
from migrating_proxy.passwords import PasswordHasher
from migrating_proxy.privileges import become_service_user
from migrating_proxy.provision import Provisioner, make_provisioner
from migrating_proxy.startup import StartupError, check_worker_start
from migrating_proxy.store import AddressError, DatabaseError, Domain, Store, StoreError, open_store
from migrating_proxy.store.accounts import CUTOVER_MODES, DOMAIN_TYPES, utc_iso
from migrating_proxy.store.vault import VaultKeyError


class InputFile:
    """A file named on the command line, read when the arguments are parsed: before a
    command run by root switches to the service's user (privileges.py), who may not be
    allowed to read it. A failure to read is reported by the command, as one line."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._error: OSError | None = None
        try:
            self._data = Path(path).read_bytes()
        except OSError as exc:
            self._error, self._data = exc, b""

    def read(self) -> bytes:
        if self._error is not None:
            raise self._error
        return self._data

    def __str__(self) -> str:
        return self.path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="migrating-proxy", description="Transparent on-login mail migration proxy.",
        epilog=f"Without --config: ${config_module.ENV_VAR}, then "
               + ", then ".join(str(p) for p in config_module.SEARCH_PATH)
               + ", then built-in defaults.",
    )
    parser.add_argument("--config", metavar="PATH", help="configuration file (TOML)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {program_version()}")
    commands = _Subcommands(parser.add_subparsers(dest="command", required=True,
                                                  metavar="COMMAND"))
    commands.add("serve", help="run every configured listener until SIGTERM/SIGINT")
    worker = commands.add("worker", help="run copy workers only (no listeners)")
    worker.add_argument("--processes", type=int, metavar="N",
                        help="mailboxes copied at a time (default: migration.workers)")
    status = commands.add("status", help="migration state and progress per account")
    status.add_argument("addresses", nargs="*", metavar="ADDRESS")
    status.add_argument("--domain", metavar="DOMAIN", help="only this domain's accounts")
    status.add_argument("--json", action="store_true")
    status.add_argument("--watch", action="store_true", help="refresh on a terminal")
    _domain_commands(commands.add_group("domain", help="manage migrating domains",
                                        parser_class=OneLineUsageErrors))
    _account_commands(commands.add_group("account", help="manage local accounts"))
    _admin_commands(commands)
    _web_commands(commands)
    return parser


def program_version() -> str:
    try:
        return importlib.metadata.version("migrating-proxy")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout without installing
        return "(not installed)"


class _Subcommands:
    """Adds subcommands that also accept `--config` after their name (`status --config F`).

    The copy defaults to SUPPRESS so that a subcommand without it keeps the value given
    before the subcommand instead of overwriting it with None.
    """

    def __init__(self, action: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
        self.action = action

    def add(self, name: str, help: str) -> argparse.ArgumentParser:
        sub = self.action.add_parser(name, help=help, description=help[:1].upper() + help[1:])
        sub.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                         help="configuration file (TOML)")
        return sub

    def add_each(self, argument: str, actions: dict[str, str]) -> None:
        """Actions that take one `argument` each; `list` takes `--json` instead."""
        for action, text in actions.items():
            if action == "list":
                self.add(action, help=text).add_argument("--json", action="store_true")
            else:
                self.add(action, help=text).add_argument(argument)

    def add_group(self, name: str, help: str,
                  parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser,
                  ) -> _Subcommands:
        """A command with actions of its own (`domain add`, `account list`)."""
        parser = self.add(name, help)
        return _Subcommands(parser.add_subparsers(dest="action", required=True,
                                                  metavar="ACTION", parser_class=parser_class))


def _web_commands(commands: _Subcommands) -> None:
    web = commands.add("web", help="run the web console and its JSON API")
    web.add_argument("--listen", metavar="HOST:PORT",
                     help="address to serve on (default: web.listen, else 127.0.0.1:8080)")
    users = commands.add_group("admin-user", help="admin users of the web console and API")
    for action, text in (("add", "create (password from stdin or a prompt)"),
                         ("passwd", "set a new password (stdin or prompt); ends sessions"),
                         ("remove", "delete, with the user's tokens and sessions")):
        users.add(action, help=text).add_argument("name")
    token = users.add("token", help="print a new API token for scripts (shown once)")
    token.add_argument("name")
    token.add_argument("--revoke", action="store_true", help="revoke all the user's tokens")
    users.add("list", help="every admin user").add_argument("--json", action="store_true")
    trail = commands.add("audit", help="the audit trail of admin actions, newest first")
    trail.add_argument("--action", metavar="ACTION", help="only this action (e.g. finish)")
    trail.add_argument("--limit", type=int, default=50, metavar="N")
    trail.add_argument("--json", action="store_true")


def _admin_commands(commands: _Subcommands) -> None:
    imp = commands.add("import", help="import migration users from a CSV file")
    imp.add_argument("file", metavar="FILE", type=InputFile)
    imp.add_argument("--dry-run", action="store_true", help="validate only")
    imp.add_argument("--json", action="store_true")
    for name, text, waits in (
            ("migrate", "verify credentials, then queue full passes", True),
            ("resync", "queue incremental passes (mail that arrived since)", True),
            ("stop", "pause passes at the next batch boundary", False),
            ("start", "resume paused passes", False)):
        sub = commands.add(name, help=text)
        sub.add_argument("addresses", nargs="*", metavar="ADDRESS")
        sub.add_argument("--domain", metavar="DOMAIN")
        sub.add_argument("--all", action="store_true", help="every migrating account")
        sub.add_argument("--json", action="store_true")
        if waits:
            sub.add_argument("--wait", action="store_true", help="wait until every pass ends")
        if name == "migrate":
            sub.add_argument("--prestage", action="store_true",
                             help="copy through the domain's old-server admin "
                                  "(--source-admin) before the users log in")
    fin = commands.add("finish", help="final pass, switch the domain's migration off, report")
    fin.add_argument("domain", metavar="DOMAIN")
    fin.add_argument("--yes", action="store_true", help="don't ask for confirmation")
    fin.add_argument("--json", action="store_true")
    exp = commands.add("export", help="a domain's accounts and password hashes")
    exp.add_argument("domain", metavar="DOMAIN")
    exp.add_argument("--format", required=True, choices=EXPORT_FORMATS)


class OneLineUsageErrors(argparse.ArgumentParser):
    """A usage error as one line (exit 2), without the long usage text: what an operator
    scripting `domain add/set` with many options needs to see is which value was wrong."""

    def error(self, message: str) -> NoReturn:
        program = self.prog.split()[0]
        self.exit(2, f"{program}: error: {message} (see {self.prog} --help)\n")


def _domain_commands(sub: _Subcommands) -> None:
    add = sub.add("add", help="add a domain and its old server")
    add.add_argument("name")
    domain_options(add, adding=True)
    add.add_argument("--disabled", action="store_true", help="add with migration switched off")
    change = sub.add("set", help="change a domain's options (the others stay as they are)")
    change.add_argument("name")
    domain_options(change, adding=False)
    sub.add_each("name", {
        "enable": "switch migration on: unknown users are migrated at login",
        "disable": "switch migration off: unknown users are refused",
        "remove": "forget a domain that has no accounts left",
        "list": "every domain and its old server",
    })


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


def domain_options(parser: argparse.ArgumentParser, *, adding: bool) -> None:
    """The options `domain add` and `domain set` share, with the same meanings.

    Every default is None: `add` fills in the defaults (`domain_from_args`), `set` changes
    only what was given (`domain_changes`).
    """
    parser.add_argument("--source", action="append", required=adding, metavar="URL",
                        help="the old server's IMAP or POP3 service (at most one of each): "
                             "imap:// imap+starttls:// imaps:// pop3:// pop3+starttls:// "
                             "pop3s://" + ("" if adding else "; replaces every source"))
    parser.add_argument("--relay", metavar="URL", help="old SMTP server for not-yet-moved users")
    parser.add_argument("--type", choices=DOMAIN_TYPES, help="old server preset (default: "
                        "default)")
    parser.add_argument("--source-user", metavar="TEMPLATE",
                        help="old server's login name: %%u address (default), %%n local part, "
                             "%%d domain")
    parser.add_argument("--cutover", choices=CUTOVER_MODES,
                        help="passthrough (default): serve users from the old server until "
                             "their copy is complete, then switch; immediate: serve them "
                             "from the store at once")
    parser.add_argument("--engine", choices=ENGINES,
                        help="copy engine: imap (any store) or dsync (the Dovecot store's "
                             "doveadm backup -R: UIDs kept; passthrough only); default: "
                             "migration.engine of the configuration")
    _on_off(parser, "--subscribed-only", "--all-folders", "subscribed_only",
            "copy only subscribed folders", "copy every folder (default)")
    _on_off(parser, "--notice", "--no-notice", "notice",
            "put the 'your mail is moving' notice in migrated INBOXes (default)",
            "don't put the notice in migrated INBOXes")
    _on_off(parser, "--verify-tls", "--no-verify-tls", "verify_tls",
            "verify the old server's certificate (default)",
            "accept the old server's certificate unverified (self-signed)")
    add_source_tls_options(parser)
    add_source_admin_options(parser)


def add_source_admin_options(parser: argparse.ArgumentParser) -> None:
    """The old server's administrator, for pre-stage copies (issue 13)."""
    parser.add_argument("--source-admin", metavar="USER",
                        help="the old server's admin (master) user: copies log in as each "
                             "user through it, so mailboxes can be pre-staged ('' for none)")
    parser.add_argument("--source-admin-password-file", metavar="FILE", type=InputFile,
                        help="file whose first line is the admin's password (never give it "
                             "on the command line); checked at the old server, kept encrypted")
    parser.add_argument("--source-admin-style", choices=ADMIN_STYLES,
                        help="authzid (default): SASL PLAIN with the user as authorization "
                             "identity; separator: log in as USER<separator>ADMIN")
    parser.add_argument("--source-admin-separator", metavar="SEP",
                        help="the separator of the separator style (default: *)")


def admin_password_from_args(args: argparse.Namespace) -> str | None:
    """The first line of --source-admin-password-file, without its line end."""
    given = getattr(args, "source_admin_password_file", None)
    if given is None:
        return None
    try:
        text = given.read().decode("utf-8")
    except OSError as exc:
        raise CommandError(f"cannot read {given}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise CommandError(f"{given}: the password is not UTF-8 text") from None
    password = text.splitlines()[0] if text else ""
    if not password:
        raise CommandError(f"{given}: no password on its first line")
    return password


def _on_off(parser: argparse.ArgumentParser, on: str, off: str, dest: str, on_help: str,
            off_help: str) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(on, dest=dest, action="store_true", default=None, help=on_help)
    group.add_argument(off, dest=dest, action="store_false", default=None, help=off_help)


def _account_commands(sub: _Subcommands) -> None:
    sub.add_each("address", {
        "add": "create (password from stdin or a prompt)",
        "passwd": "set a new password (stdin or prompt)",
        "remove": "delete from the proxy and the store's user file",
        "list": "every account, its state and its last login",
    })


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_module.load(args.config)
        if (note := config_module.search_note(config)) is not None:
            print(f"migrating-proxy: note: {note}", file=sys.stderr)
        if args.command != "serve":  # serve does it itself, once its ports are bound
            os_user()  # the audit trail's "who": root, not the user it switches to
            become_service_user(config)
        logs.configure(config.log.format, config.log.level)
        return run(args, config)
    except (ConfigError, CommandError, StoreError, AddressError, DatabaseError,
            EndpointError, VaultKeyError, StartupError) as exc:
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
        check_worker_start(config)  # else each child would fail the same way, again and again
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
        domain = domain_from_args(args)
        domains.add_domain(store, config, actor, domain, admin_password_from_args(args))
    elif args.action == "set":
        domains.update_domain(store, config, actor, args.name, domain_changes(args),
                              admin_password_from_args(args))
    elif args.action in ("enable", "disable"):
        domains.set_migrating(store, actor, args.name, args.action == "enable")
    elif args.action == "remove":
        domains.remove_domain(store, actor, args.name)
    elif args.action == "list":
        print_rows(domains.domain_rows(store), args.json, domains.DOMAIN_COLUMNS)
    return 0


# The domain options live in admin/domains.py, shared with the web console; these names stay.
DOMAIN_DEFAULTS = domains.DOMAIN_DEFAULTS


def domain_from_args(args: argparse.Namespace) -> Domain:
    return domains.build_domain(args.name, _domain_options(args), disabled=args.disabled)


def domain_changes(args: argparse.Namespace) -> dict[str, Any]:
    """Domain fields from the options given (validated); options not given are left out."""
    return domains.domain_changes(_domain_options(args))


def _domain_options(args: argparse.Namespace) -> dict[str, Any]:
    return {**vars(args), "source_ca": source_ca_from_args(args)}


def check_engine(domain: Domain, config: Config) -> None:
    """dsync only where nothing writes to the store before the switch, and only configured."""
    domains.check_engine(domain, config)


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
             "created_at": utc_iso(a.created_at), "last_login_at": utc_iso(a.last_login_at)}
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

