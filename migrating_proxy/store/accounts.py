"""Domains and accounts: the part of the account store every front-end and the CLI use."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Connection, Engine, bindparam, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from migrating_proxy.endpoints import parse_endpoint
from migrating_proxy.store.schema import accounts, domains
from migrating_proxy.store.states import AccountState, account_state

DOMAIN_TYPES = ("default", "gmail", "exchange", "office", "domino")
# How a domain's accounts move to the store; see Domain.cutover.
PASSTHROUGH, IMMEDIATE = "passthrough", "immediate"
CUTOVER_MODES = (PASSTHROUGH, IMMEDIATE)
# Where an account's sessions and inbound mail go (accounts.served_by).
SERVED_BY_OLD, SERVED_BY_STORE = "old", "store"


class StoreError(Exception):
    """A request the store refuses, worded for the admin (unknown domain, duplicate, ...)."""


class AddressError(ValueError):
    """Not something we accept as a mail address."""


def now() -> datetime:
    return datetime.now(UTC)


def utc_iso(value: datetime | None) -> str | None:
    """ISO 8601 with the zone (+00:00); SQLite hands back naive datetimes, which are UTC."""
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()


# A host name label (RFC 1123): letters, digits and hyphens, no hyphen at either end.
_DOMAIN_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# The characters of an unquoted local part (RFC 5322 atext) that are also safe in a passwd-file
# line and as a file name below provision.path ("/" and "'" are atext but excluded).
_LOCAL_PART = re.compile(r"[A-Za-z0-9!#$%&*+=?^_`{|}~.-]+")


def check_domain(name: str) -> str:
    """A domain name in lower case, or AddressError: dot-separated host name labels."""
    domain = name.lower()
    if len(domain) > 253 or not all(_DOMAIN_LABEL.fullmatch(label)
                                    for label in domain.split(".")):
        raise AddressError(f"{name!r} is not a domain name")
    return domain


def split_address(address: str) -> tuple[str, str]:
    """Validate and normalise: domain lower-cased, local part kept as the user typed it.

    Rejects anything that could confuse a protocol or a passwd-file line (controls, spaces,
    quotes, colons, a second @) rather than trying to escape it: real mailbox addresses never
    need them, and quoted local parts are not accepted.
    """
    address = address.strip()
    local, sep, domain = address.rpartition("@")
    if not sep or not local or not domain or len(address) > 320:
        raise AddressError("not an address of the form user@domain")
    if "@" in local:
        raise AddressError("an address has exactly one @")
    forbidden = set(' "\\:\'()<>,;[]/') | {chr(c) for c in range(32)} | {"\x7f"}
    if any(ch in forbidden for ch in local) or not address.isascii():
        raise AddressError("address contains characters that are not allowed")
    if not _LOCAL_PART.fullmatch(local) or local.startswith(".") or local.endswith(".") \
            or ".." in local or len(local) > 64:
        raise AddressError("not a valid local part")
    return local, check_domain(domain)


def normalise(address: str) -> str:
    local, domain = split_address(address)
    return f"{local}@{domain}"


def address_key(address: str) -> str:
    return normalise(address).lower()


@dataclass(frozen=True)
class Domain:
    """A migrating domain and its old server.

    The old server may offer IMAP, POP3 or both: `source_url` is the service the copy reads
    (the IMAP one when there is one), `pop3_source_url` the POP3 one beside it. `sources`
    lists them; `source_for(protocol)` picks the one a login of that protocol is checked at.
    """

    name: str
    source_url: str
    migrating: bool = True
    relay_url: str | None = None
    type: str = "default"
    source_user: str = "%u"
    subscribed_only: bool = False
    notice: bool = True
    verify_tls: bool = True
    source_ca: str | None = None  # PEM certificates of the old server's private CA
    # passthrough: served by the old server until the copy is complete, then switched once.
    # immediate: served by the store from the first login while the copy fills it.
    cutover: str = PASSTHROUGH
    pop3_source_url: str | None = None
    engine: str | None = None  # imap | dsync; None: the configuration's migration.engine
    # The old server's administrator, through whom copies log in as each user (pre-stage);
    # its password is in the vault (`Vault.get_domain`), never in this object.
    source_admin: str | None = None
    source_admin_style: str | None = None  # authzid (None means it too) | separator
    source_admin_separator: str | None = None  # for the separator style; None: "*"

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.source_url,) + ((self.pop3_source_url,) if self.pop3_source_url else ())

    def source_for(self, protocol: str | None) -> str:
        """The service a login of `protocol` is checked at; the copy's source otherwise."""
        for url in self.sources:
            if parse_endpoint(url).protocol == protocol:
                return url
        return self.source_url


def arrange_sources(urls: Sequence[str]) -> tuple[str, str | None]:
    """(source_url, pop3_source_url) from the old server's services, at most one per protocol:
    the copy reads the IMAP one when there is one, else the POP3 one."""
    by_protocol: dict[str, str] = {}
    for url in urls:
        protocol = parse_endpoint(url, allowed=("imap", "pop3")).protocol
        if protocol in by_protocol:
            raise StoreError(f"two {protocol.upper()} sources ({by_protocol[protocol]} and "
                             f"{url}): give at most one IMAP and one POP3 --source")
        by_protocol[protocol] = url
    if not by_protocol:
        raise StoreError("a domain needs a --source")
    if "imap" in by_protocol:
        return by_protocol["imap"], by_protocol.get("pop3")
    return by_protocol["pop3"], None


@dataclass(frozen=True)
class Account:
    id: int
    address: str
    domain: str
    password_hash: str
    migration_state: AccountState | None  # None: a plain local account (see states.py)
    created_at: datetime
    last_login_at: datetime | None
    source_url: str | None = None
    source_login: str | None = None
    notice_inserted_at: datetime | None = None
    served_by: str = SERVED_BY_STORE  # "old" until a passthrough account is switched
    switched_at: datetime | None = None
    hold_until: datetime | None = None

    @property
    def served_by_old_server(self) -> bool:
        return self.served_by == SERVED_BY_OLD


class AccountStore:
    """Domains and accounts. Every method is one short transaction; safe across processes."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # -- domains -------------------------------------------------------------------------
    def add_domain(self, domain: Domain, conn: Connection | None = None) -> None:
        """Insert a domain (in the caller's transaction if `conn`); StoreError if it exists."""
        if conn is None:
            with self.engine.begin() as own:
                return self.add_domain(domain, own)
        values = {**domain.__dict__, "name": domain.name.lower()}
        stamp = now()
        try:  # the caller's transaction is lost with it: nothing else of it may stand
            conn.execute(insert(domains).values(**values, created_at=stamp, updated_at=stamp))
        except IntegrityError:
            raise StoreError(f"domain {domain.name} already exists") from None
        return None

    def get_domain(self, name: str) -> Domain | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(domains).where(domains.c.name == name.lower())).first()
        return _domain(row) if row else None

    def list_domains(self) -> list[Domain]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(domains).order_by(domains.c.name)).all()
        return [_domain(row) for row in rows]

    def set_domain_migrating(self, name: str, migrating: bool) -> None:
        self._update_domain(name, migrating=migrating)

    def update_domain(self, name: str, conn: Connection | None = None,
                      **changes: object) -> Domain:
        """Change some of a domain's options (Domain field names); the domain as it is now."""
        unknown = set(changes) - set(Domain.__dataclass_fields__)
        if unknown:
            raise StoreError(f"cannot change {', '.join(sorted(unknown))} of a domain")
        if changes:
            self._update_domain(name, conn, **changes)
        if conn is not None:
            return self._domain_in(conn, name)
        domain = self.get_domain(name)
        if domain is None:
            raise StoreError(f"unknown domain {name}")
        return domain

    def remove_domain(self, name: str) -> None:
        with self.engine.begin() as conn:
            in_use = conn.execute(
                select(func.count()).select_from(accounts).where(accounts.c.domain == name.lower())
            ).scalar_one()
            if in_use:
                raise StoreError(f"domain {name} still has {in_use} account(s); remove them first")
            if not conn.execute(delete(domains).where(domains.c.name == name.lower())).rowcount:
                raise StoreError(f"unknown domain {name}")

    def _update_domain(self, name: str, conn: Connection | None = None,
                       **values: object) -> None:
        if conn is None:
            with self.engine.begin() as own:
                return self._update_domain(name, own, **values)
        result = conn.execute(
            update(domains).where(domains.c.name == name.lower())
            .values(**values, updated_at=now())
        )
        if not result.rowcount:
            raise StoreError(f"unknown domain {name}")
        return None

    @staticmethod
    def _domain_in(conn: Connection, name: str) -> Domain:
        row = conn.execute(select(domains).where(domains.c.name == name.lower())).first()
        if row is None:
            raise StoreError(f"unknown domain {name}")
        return _domain(row)

    # -- accounts ------------------------------------------------------------------------
    def add_account(self, address: str, password_hash: str, *,
                    migration_state: str | None = None) -> Account:
        """Insert an account (a local one unless a state is given); StoreError if it exists
        (in any letter case). Migrating accounts are normally created by `Lifecycle`."""
        try:
            with self.engine.begin() as conn:
                self.insert_account(conn, address, password_hash,
                                    account_state(migration_state))
        except IntegrityError:
            raise StoreError(f"account {normalise(address)} already exists") from None
        account = self.get_account(address)
        assert account is not None
        return account

    def insert_account(self, conn: Connection, address: str, password_hash: str,
                       migration_state: AccountState | None = None) -> int:
        """Insert within the caller's transaction; IntegrityError if the account exists.

        A migrating account of a passthrough domain starts served by the old server (until
        its switch); every other account is served by the store from the start.
        """
        address = normalise(address)
        domain = address.rpartition("@")[2]
        cutover = conn.execute(select(domains.c.cutover).where(domains.c.name == domain)
                               ).scalar()
        passthrough = migration_state is not None and cutover == PASSTHROUGH
        stamp = now()
        result = conn.execute(insert(accounts).values(
            address=address, address_key=address.lower(), domain=domain,
            password_hash=password_hash,
            migration_state=None if migration_state is None else str(migration_state),
            served_by=SERVED_BY_OLD if passthrough else SERVED_BY_STORE,
            created_at=stamp, updated_at=stamp,
        ))
        return int(result.inserted_primary_key[0])  # type: ignore[index]

    def set_hash_if_pending(self, address: str, password_hash: str) -> bool:
        """Store the first hash of a migrating account unless someone already did."""
        with self.engine.begin() as conn:
            return bool(conn.execute(
                update(accounts).where(accounts.c.address_key == address_key(address),
                                       accounts.c.password_hash == "")
                .values(password_hash=password_hash, updated_at=now())
            ).rowcount)

    def set_source(self, conn: Connection, account_id: int, source_url: str | None,
                   source_login: str | None) -> None:
        """A per-user old server and login (None: the domain's), in the caller's transaction."""
        conn.execute(update(accounts).where(accounts.c.id == account_id).values(
            source_url=source_url, source_login=source_login, updated_at=now()))

    def list_migrating(self, domain: str | None = None) -> list[Account]:
        """Accounts that are (or were) migrating, optionally of one domain."""
        return [a for a in self.list_accounts(domain) if a.migration_state is not None]

    def mark_notice_inserted(self, address: str) -> None:
        self._update_account(address, notice_inserted_at=now())

    def get_account(self, address: str) -> Account | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(accounts).where(accounts.c.address_key == address_key(address))
            ).first()
        return _account(row) if row else None

    def get_account_and_domain(self, address: str) -> tuple[Account | None, Domain | None]:
        """The account and its address's domain, read together: one connection and one
        transaction instead of two (every login asks for both, and with SQLite in `serve`
        each begin, statement and end is a round trip to the helper process)."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(accounts).where(accounts.c.address_key == address_key(address))
            ).first()
            domain = conn.execute(select(domains).where(
                domains.c.name == address.rpartition("@")[2].lower())).first()
        return (_account(row) if row else None), (_domain(domain) if domain else None)

    def get_account_by_id(self, account_id: int) -> Account | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(accounts).where(accounts.c.id == account_id)).first()
        return _account(row) if row else None

    def list_accounts(self, domain: str | None = None) -> list[Account]:
        query = select(accounts).order_by(accounts.c.address_key)
        if domain:
            query = query.where(accounts.c.domain == domain.lower())
        with self.engine.connect() as conn:
            return [_account(row) for row in conn.execute(query).all()]

    def all_password_hashes(self) -> list[tuple[str, str]]:
        """(address, passlib hash) of every account, for provisioning the store's user file."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(accounts.c.address, accounts.c.password_hash)
                .order_by(accounts.c.address_key)
            ).all()
        return [(row.address, row.password_hash) for row in rows]

    def password_hash_of(self, address: str) -> str | None:
        account = self.get_account(address)
        return account.password_hash if account else None

    def set_password_hash(self, address: str, password_hash: str) -> None:
        self._update_account(address, password_hash=password_hash)

    def record_login(self, address: str) -> None:
        self._update_account(address, last_login_at=now())

    def set_last_logins(self, logins: dict[str, datetime]) -> None:
        """Several accounts' last-login times in one transaction; accounts gone meanwhile are
        skipped (see store/logins.py)."""
        if not logins:
            return
        with self.engine.begin() as conn:
            conn.execute(
                update(accounts).where(accounts.c.address_key == bindparam("key"))
                .values(last_login_at=bindparam("stamp")),
                [{"key": address_key(a), "stamp": stamp} for a, stamp in logins.items()],
            )

    def remove_account(self, address: str) -> None:
        with self.engine.begin() as conn:
            result = conn.execute(
                delete(accounts).where(accounts.c.address_key == address_key(address))
            )
            if not result.rowcount:
                raise StoreError(f"unknown account {address}")

    def _update_account(self, address: str, conn: Connection | None = None,
                        **values: object) -> None:
        if conn is None:
            with self.engine.begin() as own:
                return self._update_account(address, own, **values)
        result = conn.execute(
            update(accounts).where(accounts.c.address_key == address_key(address))
            .values(**values, updated_at=now())
        )
        if not result.rowcount:
            raise StoreError(f"unknown account {address}")
        return None


def _domain(row) -> Domain:  # type: ignore[no-untyped-def]
    return Domain(
        name=row.name, source_url=row.source_url, migrating=row.migrating,
        relay_url=row.relay_url, type=row.type, source_user=row.source_user,
        subscribed_only=row.subscribed_only, notice=row.notice, verify_tls=row.verify_tls,
        source_ca=row.source_ca,
        cutover=row.cutover, pop3_source_url=row.pop3_source_url, engine=row.engine,
        source_admin=row.source_admin, source_admin_style=row.source_admin_style,
        source_admin_separator=row.source_admin_separator,
    )


def _account(row) -> Account:  # type: ignore[no-untyped-def]
    return Account(
        id=row.id, address=row.address, domain=row.domain, password_hash=row.password_hash,
        migration_state=account_state(row.migration_state), created_at=row.created_at,
        last_login_at=row.last_login_at, source_url=row.source_url,
        source_login=row.source_login, notice_inserted_at=row.notice_inserted_at,
        served_by=row.served_by, switched_at=row.switched_at, hold_until=row.hold_until,
    )
