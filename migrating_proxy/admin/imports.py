"""Bulk import of migration users from a CSV file: parsing and validation, then the import.

Two layouts are accepted:

- the hosted migration tools' file, with a header row
  `login_source;pass_source;host_source;type_messagerie;login_destination;subscribed_only`;
- a minimal `address,password` file (header row optional) for users of configured domains.

For domains with the old server's admin credentials (`domain set --source-admin`) the password
may be left out: address-only lines, or an empty `pass_source`. Such accounts exist for the
proxy (they can be pre-staged, `migrate --prestage`) but not yet for the store's user
database: until the user's first login proves a password at the old server, the store has only
a locked entry for them.

The separator (`;`, `,` or tab) is detected from the first line; UTF-8 with or without a BOM and
CRLF line ends are accepted. `parse_import` is pure: it sees the configured domains and the
existing accounts and returns either the rows to import or every bad line (line number, column,
reason). Nothing is imported unless every line is valid. A password never appears in an error:
errors name the column, never the value.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from migrating_proxy.admin import audit
from migrating_proxy.endpoints import Endpoint, EndpointError, parse_endpoint
from migrating_proxy.passwords import PENDING_HASH
from migrating_proxy.provision import Provisioner, make_provisioner
from migrating_proxy.specs import source_login_name
from migrating_proxy.store import AddressError, Domain, Store, StoreError, normalise
from migrating_proxy.store.accounts import DOMAIN_TYPES, address_key
from migrating_proxy.store.vault import Vault

if TYPE_CHECKING:
    from migrating_proxy.admin.operations import Operations

HOSTED_COLUMNS = ("login_source", "pass_source", "host_source", "type_messagerie",
                  "login_destination", "subscribed_only")
MINIMAL_COLUMNS = ("address", "password")
SEPARATORS = ";,\t"
BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False,
            "": None}


WHOLE_LINE = "line"  # BadLine.column of a fault of the whole line (its JSON says so)


@dataclass(frozen=True)
class BadLine:
    line: int
    column: str
    reason: str

    def __str__(self) -> str:
        if self.column == WHOLE_LINE:  # not "line 4: line: expected 2 columns"
            return f"line {self.line}: {self.reason}"
        return f"line {self.line}: {self.column}: {self.reason}"

    def as_dict(self) -> dict[str, Any]:
        return {"line": self.line, "column": self.column, "reason": self.reason}


class ImportRefused(StoreError):
    """Nothing was imported: the file is not text, or some lines are bad (all listed)."""

    def __init__(self, message: str, bad_lines: list[BadLine]) -> None:
        super().__init__(message)
        self.bad_lines = bad_lines


@dataclass(frozen=True)
class ImportRow:
    line: int
    address: str  # the account on the new store (login_destination)
    password: str | None = field(repr=False)  # None: unknown (a domain with an admin)
    source_url: str | None  # None: the domain's source
    source_login: str | None  # None: the domain's --source-user template
    existing: bool  # an existing migrating account: only its credentials are refreshed


@dataclass
class ImportPlan:
    rows: list[ImportRow] = field(default_factory=list)
    errors: list[BadLine] = field(default_factory=list)


class _Bad(Exception):
    def __init__(self, column: str, reason: str) -> None:
        super().__init__(reason)
        self.column, self.reason = column, reason


def decode(data: bytes) -> str:
    """UTF-8 with or without BOM; ValueError names the first undecodable byte's line."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ValueError(f"line {line}: not UTF-8 text") from None


def detect_separator(first_line: str) -> str:
    counts = {sep: first_line.count(sep) for sep in SEPARATORS}
    best = max(counts, key=lambda sep: counts[sep])
    return best if counts[best] else ","


def parse_import(text: str, domains: dict[str, Domain],
                 existing: dict[str, str | None]) -> ImportPlan:
    """Validate every line. `existing` maps address keys to their migration_state."""
    plan = ImportPlan()
    lines = text.splitlines()
    if not any(line.strip() for line in lines):
        plan.errors.append(BadLine(1, "file", "no users in the file"))
        return plan
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=detect_separator(lines[0]))
    columns: tuple[str, ...] | None = None
    seen: dict[str, int] = {}
    try:
        for fields in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in fields):
                continue
            if columns is None:
                columns = _layout(fields)
                if tuple(cell.strip().lower() for cell in fields) in (columns, ("address",)):
                    continue  # the header row
            _parse_line(plan, line, fields, columns, domains, existing, seen)
    except csv.Error as exc:
        plan.errors.append(BadLine(reader.line_num, "file", f"malformed CSV: {exc}"))
    if not plan.rows and not plan.errors:
        plan.errors.append(BadLine(1, "file", "no users in the file"))
    return plan


def _layout(first_row: list[str]) -> tuple[str, ...]:
    header = tuple(cell.strip().lower() for cell in first_row)
    return HOSTED_COLUMNS if header == HOSTED_COLUMNS or len(header) > 2 else MINIMAL_COLUMNS


def _parse_line(plan: ImportPlan, line: int, fields: list[str], columns: tuple[str, ...],
                domains: dict[str, Domain], existing: dict[str, str | None],
                seen: dict[str, int]) -> None:
    if columns == MINIMAL_COLUMNS and len(fields) == 1:
        fields = [*fields, ""]  # an address alone: no password (see _password)
    if len(fields) != len(columns):
        plan.errors.append(BadLine(line, WHOLE_LINE, f"expected {len(columns)} columns "
                                                 f"({', '.join(columns)}), found {len(fields)}"))
        return
    try:
        row = _row(line, dict(zip(columns, fields, strict=True)), domains, existing)
    except _Bad as bad:
        plan.errors.append(BadLine(line, bad.column, bad.reason))
        return
    key = row.address.lower()
    if key in seen:
        plan.errors.append(BadLine(line, _address_column(columns),
                                   f"{row.address} already appears on line {seen[key]}"))
        return
    seen[key] = line
    plan.rows.append(row)


def _address_column(columns: tuple[str, ...]) -> str:
    return "login_destination" if columns == HOSTED_COLUMNS else "address"


def _row(line: int, cells: dict[str, str], domains: dict[str, Domain],
         existing: dict[str, str | None]) -> ImportRow:
    hosted = "login_source" in cells
    login_source = cells.get("login_source", "").strip()
    destination = (cells.get("login_destination") or cells.get("address") or "").strip()
    address_column = "login_destination" if hosted else "address"
    if hosted and not destination:
        destination, address_column = login_source, "login_source"
    if hosted and not login_source:
        raise _Bad("login_source", "empty")
    address = _address(destination, address_column)
    domain = domains.get(address.rpartition("@")[2])
    if domain is None:
        raise _Bad(address_column, f"domain {address.rpartition('@')[2]} is not configured "
                                   "(migrating-proxy domain add)")
    state = existing.get(address.lower(), "absent")
    if state is None:
        raise _Bad(address_column, f"{address} is a local account, not a migrating one")
    password = _password(cells.get("pass_source", cells.get("password", "")),
                         "pass_source" if hosted else "password", domain)
    if hosted:
        _same_as_domain(cells["type_messagerie"], domain)
        _same_subscribed(cells["subscribed_only"], domain)
    source_url = _source_url(cells.get("host_source", ""), domain)
    source_login = login_source or None
    if source_login == source_login_name(domain.source_user, address):
        source_login = None  # what the domain's template gives anyway
    return ImportRow(line, address, password, source_url, source_login, state != "absent")


def _address(text: str, column: str) -> str:
    if not text:
        raise _Bad(column, "empty")
    try:
        return normalise(text)
    except AddressError as exc:
        raise _Bad(column, str(exc)) from None


def _password(text: str, column: str, domain: Domain) -> str | None:
    # Kept exactly as written (spaces included): it is somebody's password.
    if not text:
        if domain.source_admin:
            return None  # pre-staged through the admin; the user's login brings the password
        raise _Bad(column, "empty password")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        raise _Bad(column, "password contains control characters")
    return text


def _same_as_domain(kind: str, domain: Domain) -> None:
    # The copy presets are per domain (no per-account column): a row may only repeat them.
    kind = kind.strip().lower()
    if kind and kind not in DOMAIN_TYPES:
        raise _Bad("type_messagerie", f"must be one of {', '.join(DOMAIN_TYPES)}")
    if kind and kind != domain.type:
        raise _Bad("type_messagerie", f"{kind} differs from domain {domain.name}'s type "
                                      f"{domain.type}; per-user types are not supported")


def _same_subscribed(text: str, domain: Domain) -> None:
    value = text.strip().lower()
    if value not in BOOLEANS:
        raise _Bad("subscribed_only", "must be True or False")
    wanted = BOOLEANS[value]
    if wanted is not None and wanted != domain.subscribed_only:
        raise _Bad("subscribed_only", f"differs from domain {domain.name}'s setting; "
                                      "per-user settings are not supported")


def _source_url(text: str, domain: Domain) -> str | None:
    """The row's old server as a URL, or None when it is the domain's own."""
    text = text.strip()
    if not text:
        return None
    own = parse_endpoint(domain.source_url, allowed=("imap", "pop3"))
    try:
        endpoint = (parse_endpoint(text, allowed=("imap", "pop3")) if "://" in text
                    else _bare_host(text, own))
    except EndpointError as exc:
        raise _Bad("host_source", str(exc)) from None
    return None if endpoint == own else endpoint.url


def _bare_host(text: str, own: Endpoint) -> Endpoint:
    """`host` or `host:port` (`[v6]:port`): the domain's protocol, TLS mode and port."""
    try:
        parts = urlsplit(f"//{text}")
        port = parts.port
    except ValueError:
        raise EndpointError(f"{text!r}: expected host, host:port or a URL") from None
    if not parts.hostname or parts.path or parts.username:
        raise EndpointError(f"{text!r}: expected host, host:port or a URL")
    return Endpoint(own.protocol, own.tls, parts.hostname, port or own.port)


# -- the import ---------------------------------------------------------------------------
def import_users(ops: Operations, data: bytes, name: str, dry_run: bool) -> dict[str, Any]:
    """`import FILE [--dry-run]` and the console's upload: validate every line, then (unless
    a dry run) import them all in one transaction. The summary is `import --json`'s."""
    try:
        text = decode(data)
    except ValueError as exc:
        raise ImportRefused(f"{name}: {exc}; nothing imported", []) from None
    store = ops.store
    domains = {d.name: d for d in store.accounts.list_domains()}
    plan = parse_import(text, domains, existing_states(store))
    if plan.errors:
        raise ImportRefused(f"{name}: {len(plan.errors)} bad line(s); nothing imported",
                            plan.errors)
    created = sum(not row.existing for row in plan.rows)
    if not dry_run:
        created, _ = apply_import(store, ops.vault,
                                  make_provisioner(ops.config.provision, store.accounts),
                                  plan.rows)
    summary = {"file": name, "dry_run": dry_run, "created": created,
               "updated": len(plan.rows) - created}
    audit(store.engine, ops.actor, "import", **summary,
          accounts=[row.address for row in plan.rows])
    return summary


def existing_states(store: Store) -> dict[str, str | None]:
    return {address_key(a.address): a.migration_state for a in store.accounts.list_accounts()}


def apply_import(store: Store, vault: Vault, provisioner: Provisioner,
                 rows: list[ImportRow]) -> tuple[int, int]:
    """Create the new accounts (state NEW, hash pending) and vault their passwords.

    All rows in one transaction: a failure imports nothing. Existing migrating accounts only
    get their password and source refreshed (re-importing a corrected file is how an admin
    fixes a wrong password, or supplies one for a resync). Returns (created, updated).
    """
    created = [row for row in rows if not row.existing]
    ids = {address_key(a.address): a.id for a in store.accounts.list_accounts()}
    with store.engine.begin() as conn:
        for row in rows:
            account_id = ids[row.address.lower()] if row.existing else \
                store.lifecycle.imported(row.address, PENDING_HASH, conn)
            store.accounts.set_source(conn, account_id, row.source_url, row.source_login)
            if row.password is not None:
                vault.put(account_id, row.password, conn)
    # A locked entry, so the store knows the account; the worker provisions the real hash.
    for row in created:
        provisioner.update(row.address)
    return len(created), len(rows) - len(created)
