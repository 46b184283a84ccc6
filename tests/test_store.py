"""The account store on SQLite and PostgreSQL, and password hashing.

Store tests run once per database (`store_url`): a SQLite file under tmp_path, and a fresh
PostgreSQL database created for this test session on 127.0.0.1:5432 (skipped, with the reason
shown, when no server answers there).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from passlib.hash import sha512_crypt
from sqlalchemy import insert, select, update
from sqlalchemy.exc import OperationalError

from migrating_proxy.passwords import PasswordHasher, dovecot_form
from migrating_proxy.store import (
    AddressError,
    DatabaseError,
    Domain,
    Store,
    StoreError,
    logins,
    open_store,
)
from migrating_proxy.store.copystate import CopyState
from migrating_proxy.store.db import ensure_schema, make_engine
from migrating_proxy.store.pop3uidls import Pop3Uidls
from migrating_proxy.store.schema import SCHEMA_VERSION, pop3_uidls, schema_info
from tests.support.schemas import create_old_schema

REPO_ROOT = Path(__file__).resolve().parents[1]
def old_domain(name: str = "old.example", **changes: object) -> Domain:
    values: dict = {"name": name, "source_url": "imap://192.0.2.1:143"} | changes
    return Domain(**values)


# --- domains ------------------------------------------------------------------------------


def test_added_domain_reads_back_with_every_field(store: Store) -> None:
    domain = old_domain(
        migrating=False, relay_url="smtp://192.0.2.1:25", type="exchange",
        source_user="%n", subscribed_only=True, notice=False, verify_tls=False,
    )
    store.accounts.add_domain(domain)
    assert store.accounts.get_domain("old.example") == domain


def test_domain_names_are_lower_cased_and_looked_up_in_any_case(store: Store) -> None:
    store.accounts.add_domain(old_domain("Old.Example"))
    found = store.accounts.get_domain("OLD.EXAMPLE")
    assert found is not None
    assert found.name == "old.example"


def test_unknown_domain_is_none(store: Store) -> None:
    assert store.accounts.get_domain("nowhere.example") is None


def test_domains_are_listed_by_name(store: Store) -> None:
    for name in ("b.example", "c.example", "a.example"):
        store.accounts.add_domain(old_domain(name))
    names = [d.name for d in store.accounts.list_domains()]
    assert names == ["a.example", "b.example", "c.example"]


def test_duplicate_domain_in_another_case_is_refused(store: Store) -> None:
    store.accounts.add_domain(old_domain("old.example"))
    with pytest.raises(StoreError, match="already exists"):
        store.accounts.add_domain(old_domain("OLD.example", source_url="imap://192.0.2.9:143"))
    domain = store.accounts.get_domain("old.example")
    assert domain is not None and domain.source_url == "imap://192.0.2.1:143"


def test_domain_migration_can_be_disabled_and_enabled(store: Store) -> None:
    store.accounts.add_domain(old_domain())
    store.accounts.set_domain_migrating("OLD.example", False)
    assert store.accounts.get_domain("old.example").migrating is False  # type: ignore[union-attr]
    store.accounts.set_domain_migrating("old.example", True)
    assert store.accounts.get_domain("old.example").migrating is True  # type: ignore[union-attr]


def test_enabling_an_unknown_domain_is_refused(store: Store) -> None:
    with pytest.raises(StoreError, match="unknown domain"):
        store.accounts.set_domain_migrating("nowhere.example", True)


def test_removed_domain_is_gone(store: Store) -> None:
    store.accounts.add_domain(old_domain())
    store.accounts.remove_domain("Old.Example")
    assert store.accounts.get_domain("old.example") is None
    assert store.accounts.list_domains() == []


def test_removing_an_unknown_domain_is_refused(store: Store) -> None:
    with pytest.raises(StoreError, match="unknown domain"):
        store.accounts.remove_domain("nowhere.example")


def test_domain_with_accounts_cannot_be_removed(store: Store) -> None:
    store.accounts.add_domain(old_domain())
    store.accounts.add_account("alice@old.example", "$6$hash")
    with pytest.raises(StoreError, match="1 account"):
        store.accounts.remove_domain("old.example")
    assert store.accounts.get_domain("old.example") is not None


# --- accounts -----------------------------------------------------------------------------


def test_added_account_keeps_local_part_case_and_lower_cases_the_domain(store: Store) -> None:
    account = store.accounts.add_account("Alice@Example.COM", "$6$hash")
    assert account.address == "Alice@example.com"
    assert account.domain == "example.com"
    assert account.password_hash == "$6$hash"
    assert account.migration_state is None
    assert account.created_at is not None
    assert account.last_login_at is None


@pytest.mark.parametrize(
    "spelling", ["alice@example.com", "ALICE@EXAMPLE.COM", "aLiCe@Example.Com"]
)
def test_account_is_found_in_any_letter_case(store: Store, spelling: str) -> None:
    added = store.accounts.add_account("Alice@Example.COM", "$6$hash")
    found = store.accounts.get_account(spelling)
    assert found == added


def test_account_added_in_another_case_is_a_duplicate(store: Store) -> None:
    store.accounts.add_account("Alice@Example.COM", "$6$first")
    with pytest.raises(StoreError, match="already exists"):
        store.accounts.add_account("alice@example.com", "$6$second")
    accounts = store.accounts.list_accounts()
    assert [(a.address, a.password_hash) for a in accounts] == [("Alice@example.com", "$6$first")]


def test_unknown_account_is_none(store: Store) -> None:
    assert store.accounts.get_account("nobody@example.com") is None


def test_account_and_domain_are_read_together_as_each_alone(store: Store) -> None:
    """The login's one read: the same as get_account and get_domain, in any letter case."""
    store.accounts.add_domain(old_domain())
    added = store.accounts.add_account("Alice@Old.Example", "$6$hash")
    for address in ("alice@OLD.example", "nobody@old.example", "alice@nowhere.example"):
        assert store.accounts.get_account_and_domain(address) == (
            store.accounts.get_account(address),
            store.accounts.get_domain(address.rpartition("@")[2]))
    assert store.accounts.get_account_and_domain("ALICE@old.example") == (
        added, store.accounts.get_domain("old.example"))


def test_accounts_are_listed_per_domain(store: Store) -> None:
    for address in ("bob@b.example", "alice@a.example", "Carol@A.example"):
        store.accounts.add_account(address, "$6$hash")
    assert [a.address for a in store.accounts.list_accounts()] == [
        "alice@a.example", "bob@b.example", "Carol@a.example"]
    assert [a.address for a in store.accounts.list_accounts("A.EXAMPLE")] == [
        "alice@a.example", "Carol@a.example"]


@pytest.mark.parametrize("address", [
    '"alice"@example.com',
    "alice smith@example.com",
    "ali:ce@example.com",
    "alice@exa:mple.com",
    "alice\r\n@example.com",
    "alice@example.com\nbob@example.com",
    "ali\0ce@example.com",
    "alicé@example.com",
    "alice@ex\xe4mple.com",
    "alice.example.com",
    "@example.com",
    "alice@",
    "alice@.example.com",
    "alice@example..com",
    "a@b@c",
    "x@-",
    "x@-old.example",
    "x@old-.example",
    "x@old_mail.example",
    "x@old.example.",
    "x@" + "a" * 64 + ".example",
    ".alice@example.com",
    "alice.@example.com",
    "ali..ce@example.com",
    "a" * 65 + "@example.com",
])
def test_invalid_addresses_are_refused(store: Store, address: str) -> None:
    with pytest.raises(AddressError):
        store.accounts.add_account(address, "$6$hash")
    with pytest.raises(AddressError):
        store.accounts.get_account(address)
    assert store.accounts.list_accounts() == []


@pytest.mark.parametrize("address", [
    "first.last+tag@mail-1.old.example",
    "O_Brien-2@Old.Example",
    "x@localhost",
    "a!#$%&*=?^`{|}~@x.example",
    "a" * 64 + "@" + "b" * 63 + ".example",
])
def test_valid_addresses_are_accepted_with_the_domain_lower_cased(store: Store,
                                                                   address: str) -> None:
    local, domain = address.rsplit("@", 1)
    assert store.accounts.add_account(address, "$6$hash").address == f"{local}@{domain.lower()}"


def test_removed_account_is_gone_in_any_case(store: Store) -> None:
    store.accounts.add_account("Alice@example.com", "$6$hash")
    store.accounts.add_account("bob@example.com", "$6$hash")
    store.accounts.remove_account("ALICE@example.com")
    assert store.accounts.get_account("alice@example.com") is None
    assert [a.address for a in store.accounts.list_accounts()] == ["bob@example.com"]


def test_removing_an_unknown_account_is_refused(store: Store) -> None:
    with pytest.raises(StoreError, match="unknown account"):
        store.accounts.remove_account("nobody@example.com")


def test_password_hash_can_be_replaced(store: Store) -> None:
    store.accounts.add_account("alice@example.com", "$6$old")
    store.accounts.set_password_hash("Alice@Example.com", "$6$new")
    assert store.accounts.get_account("alice@example.com").password_hash == "$6$new"  # type: ignore[union-attr]
    assert store.accounts.all_password_hashes() == [("alice@example.com", "$6$new")]


def test_password_of_an_unknown_account_cannot_be_set(store: Store) -> None:
    with pytest.raises(StoreError, match="unknown account"):
        store.accounts.set_password_hash("nobody@example.com", "$6$new")


def test_record_login_sets_the_last_login_time(store: Store) -> None:
    added = store.accounts.add_account("alice@example.com", "$6$hash")
    store.accounts.record_login("ALICE@example.com")
    account = store.accounts.get_account("alice@example.com")
    assert account is not None and account.last_login_at is not None
    assert account.last_login_at >= added.created_at


def test_record_login_of_an_unknown_account_is_refused(store: Store) -> None:
    with pytest.raises(StoreError, match="unknown account"):
        store.accounts.record_login("nobody@example.com")


def test_last_logins_are_written_in_the_background(store: Store) -> None:
    store.accounts.add_account("alice@example.com", "$6$hash")
    store.accounts.add_account("bob@example.com", "$6$hash")
    for address in ("alice@example.com", "bob@example.com", "gone@example.com"):
        store.last_logins.note(address)  # an account removed meanwhile is skipped
    store.last_logins.close()  # writes what is pending
    for address in ("alice@example.com", "bob@example.com"):
        account = store.accounts.get_account(address)
        assert account is not None and account.last_login_at is not None


class RefusingAccounts:
    """An account store whose database refuses writes until told otherwise."""

    def __init__(self) -> None:
        self.refusing = True
        self.written: dict[str, object] = {}

    def set_last_logins(self, logins: dict[str, object]) -> None:
        if self.refusing:
            raise OSError("database is locked")
        self.written.update(logins)


def test_last_logins_wait_while_the_database_refuses_and_never_block_a_login(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logins, "RETRY_FIRST", 0.01)
    monkeypatch.setattr(logins, "RETRY_MAX", 0.05)
    accounts = RefusingAccounts()
    recorder = logins.LastLogins(accounts)  # type: ignore[arg-type]
    for n in range(50):
        recorder.note(f"user{n}@example.com")  # returns at once, however the database is
    accounts.refusing = False
    deadline = time.monotonic() + 10
    while len(accounts.written) < 50 and time.monotonic() < deadline:
        time.sleep(0.01)
    recorder.close()
    assert len(accounts.written) == 50


def test_sqlite_reads_never_wait_for_the_write_lock_and_writes_take_it_at_begin(
        tmp_path: Path) -> None:
    """Reads get a snapshot (plain BEGIN); write transactions start with BEGIN IMMEDIATE, so a
    read-then-write transaction cannot lose its write to another process."""
    path = tmp_path / "store.db"
    store = open_store(f"sqlite:///{path}", lock_timeout=0.3)
    store.accounts.add_account("alice@example.com", "$6$hash")
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        assert store.accounts.get_account("alice@example.com") is not None
        with pytest.raises(OperationalError), store.engine.begin() as conn:
            conn.execute(select(1))  # never reached: BEGIN IMMEDIATE itself waits and fails
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    store.accounts.record_login("alice@example.com")  # and writes work again
    store.close()


# --- schema versioning --------------------------------------------------------------------


def test_ensure_schema_twice_keeps_data_and_version(store_url: str) -> None:
    store = open_store(store_url)
    try:
        store.accounts.add_account("alice@example.com", "$6$hash")
        ensure_schema(store.engine)
        ensure_schema(store.engine)
        with store.engine.connect() as conn:
            versions = conn.execute(schema_info.select()).all()
        assert [row.version for row in versions] == [SCHEMA_VERSION]
        assert store.accounts.get_account("alice@example.com") is not None
    finally:
        store.close()


def make_older(store_url: str, version: int, *undo: str) -> None:
    """Turn a current database into one of `version` by undoing the later steps."""
    engine = make_engine(store_url)
    try:
        with engine.begin() as conn:
            for statement in undo:
                conn.exec_driver_sql(statement)
            conn.execute(update(schema_info).values(version=version))
    finally:
        engine.dispose()


def test_version_1_database_is_upgraded_in_place_with_domain_source_ca(store_url: str) -> None:
    """A database of version 1 (no domains.source_ca) keeps its domains and gains the column."""
    create_old_schema(store_url, 1, (
        "INSERT INTO domains (name, migrating, source_url, type, source_user, subscribed_only, "
        "notice, verify_tls, created_at, updated_at) VALUES ('old.example', true, "
        "'imap://old.example:143', 'default', '%u', false, true, true, "
        "'2025-01-01 00:00:00+00', '2025-01-01 00:00:00+00')"))
    store = open_store(store_url)
    try:
        assert store.accounts.get_domain("old.example") == Domain(
            "old.example", "imap://old.example:143", cutover="immediate")
        store.accounts.add_domain(Domain("ca.example", "imaps://x:993", source_ca="PEM"))
        domain = store.accounts.get_domain("ca.example")
        assert domain is not None and domain.source_ca == "PEM"
        with store.engine.connect() as conn:
            assert conn.execute(select(schema_info.c.version)).scalar_one() == SCHEMA_VERSION
    finally:
        store.close()


def test_version_4_database_is_upgraded_in_place_with_copy_engines(store_url: str) -> None:
    """A database of version 4 keeps its domains and migrations and gains the engine columns."""
    stamp = "'2025-01-01 00:00:00+00'"
    create_old_schema(
        store_url, 4,
        "INSERT INTO domains (name, migrating, source_url, cutover, type, source_user, "
        "subscribed_only, notice, verify_tls, created_at, updated_at) VALUES ('old.example', "
        f"true, 'imap://old.example:143', 'passthrough', 'default', '%u', false, true, true, "
        f"{stamp}, {stamp})",
        "INSERT INTO accounts (id, address, address_key, domain, password_hash, created_at, "
        f"updated_at, served_by) VALUES (1, 'alice@old.example', 'alice@old.example', "
        f"'old.example', '$6$hash', {stamp}, {stamp}, 'old')",
        "INSERT INTO migrations (account_id, folders_total, folders_done, messages_total, "
        "messages_copied, messages_skipped, bytes_copied) VALUES (1, 0, 0, 3, 3, 0, 10)")
    store = open_store(store_url)
    try:
        domain = store.accounts.get_domain("old.example")
        assert domain is not None and domain.engine is None  # the configuration decides
        state = CopyState(store.engine, 1)
        assert state.copy_engine() is None
        state.write_progress(copy_engine="dsync")
        assert state.copy_engine() == "dsync"
        assert state.totals() is not None
        store.accounts.add_domain(Domain("d.example", "imap://x:143", engine="dsync"))
        assert store.accounts.get_domain("d.example").engine == "dsync"  # type: ignore[union-attr]
        with store.engine.connect() as conn:
            assert conn.execute(select(schema_info.c.version)).scalar_one() == SCHEMA_VERSION
    finally:
        store.close()


def dovecot_users(store: Store) -> dict[str, str]:
    with store.engine.connect() as conn:
        return dict(conn.exec_driver_sql('SELECT "user", password FROM dovecot_users').all())


def test_dovecot_users_view_lists_every_account_as_the_passwd_files_would(store: Store) -> None:
    """The view the store's SQL passdb reads (provision.kind = "none") holds, for every
    account, the same `{SCHEME}hash` value the passwd-file provisioners write: pending hashes
    locked (the row must exist for the master login), keys lower-cased as Dovecot's %Lu."""
    hashes = {
        "Alice@Example.com": sha512_crypt.using(rounds=5000).hash("pw"),
        "bob@example.com": "$2b$12$" + "a" * 53,
        "carol@example.com": "$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA",
        "dave@example.com": "{PLAIN}not-for-production",
        "erin@example.com": "",  # pending: first login, hash still being computed
    }
    for address, passlib_hash in hashes.items():
        store.accounts.add_account(address, passlib_hash)
    assert dovecot_users(store) == {
        address.lower(): dovecot_form(passlib_hash) for address, passlib_hash in hashes.items()}
    assert dovecot_users(store)["erin@example.com"] == "{SHA512-CRYPT}!"
    store.accounts.set_password_hash("erin@example.com", "$6$rounds=5000$salt$x")
    store.accounts.remove_account("bob@example.com")
    view = dovecot_users(store)
    assert view["erin@example.com"] == "{SHA512-CRYPT}$6$rounds=5000$salt$x"
    assert "bob@example.com" not in view


def test_version_5_database_is_upgraded_in_place_with_the_dovecot_users_view(
        store_url: str) -> None:
    store = open_store(store_url)
    store.accounts.add_account("alice@example.com", "$6$rounds=5000$salt$x")
    store.close()
    make_older(store_url, 5, "DROP VIEW dovecot_users")
    store = open_store(store_url)
    try:
        assert dovecot_users(store) == {"alice@example.com": "{SHA512-CRYPT}$6$rounds=5000$salt$x"}
        with store.engine.connect() as conn:
            assert conn.execute(select(schema_info.c.version)).scalar_one() == SCHEMA_VERSION
    finally:
        store.close()


def test_version_7_database_is_upgraded_in_place_for_pop3_continuity(store_url: str) -> None:
    """Version 8 adds where each old POP3 UIDL was and what the store calls its copy; the UIDLs
    a POP3-sourced copy recorded before stay, and `status` says `pop3_uidls: none`."""
    store = open_store(store_url)
    account = store.accounts.add_account("alice@example.com", "$6$rounds=5000$salt$x")
    with store.engine.begin() as conn:
        conn.execute(insert(pop3_uidls).values(account_id=account.id, uidl="u1", size=10))
    store.close()
    make_older(store_url, 7, "ALTER TABLE pop3_uidls DROP COLUMN position",
               "ALTER TABLE pop3_uidls DROP COLUMN store_uidl",
               "ALTER TABLE migrations DROP COLUMN pop3_uidls")
    store = open_store(store_url)
    try:
        with store.engine.connect() as conn:
            assert conn.execute(select(pop3_uidls.c.uidl, pop3_uidls.c.position,
                                       pop3_uidls.c.store_uidl)).all() == [("u1", None, None)]
            assert conn.execute(select(schema_info.c.version)).scalar_one() == SCHEMA_VERSION
        assert Pop3Uidls(store.engine).translation(account.id) is None  # nothing kept yet
    finally:
        store.close()


def test_version_8_database_gains_the_pre_stage_columns(store_url: str) -> None:
    """Version 9 (pre-stage): the old server's admin per domain, prestaged_at per account."""
    store = open_store(store_url)
    store.accounts.add_domain(Domain("old.example", "imap://old.example:143"))
    store.close()
    make_older(store_url, 8, *(f"ALTER TABLE {table} DROP COLUMN {column}" for table, column in (
        ("domains", "source_admin"), ("domains", "source_admin_style"),
        ("domains", "source_admin_separator"), ("migrations", "prestaged_at"))))
    store = open_store(store_url)
    try:
        store.accounts.update_domain("old.example", source_admin="admin")
        domain = store.accounts.get_domain("old.example")
        assert domain is not None and domain.source_admin == "admin"
        with store.engine.connect() as conn:
            assert conn.execute(select(schema_info.c.version)).scalar_one() == SCHEMA_VERSION
    finally:
        store.close()


def test_database_from_a_newer_program_is_refused_with_a_clear_message(store_url: str) -> None:
    open_store(store_url).close()
    engine = make_engine(store_url)
    try:
        with engine.begin() as conn:
            conn.execute(update(schema_info).values(version=SCHEMA_VERSION + 1))
        with pytest.raises(DatabaseError) as raised:
            ensure_schema(engine)
    finally:
        engine.dispose()
    message = str(raised.value)
    assert f"version {SCHEMA_VERSION + 1} is newer" in message
    assert "upgrade migrating-proxy" in message


def test_unreachable_database_is_a_database_error() -> None:
    with pytest.raises(DatabaseError, match="cannot open database") as raised:
        open_store("postgresql://nobody@127.0.0.1:1/x")
    assert "\n" not in str(raised.value)  # the CLI prints it as one line


# --- two processes ------------------------------------------------------------------------

RACER = """
import sys, time
from pathlib import Path
from migrating_proxy.store import StoreError, open_store
url, go, addresses = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
store = open_store(url)
store.accounts.get_account(addresses[0])  # connected and ready before the start signal
print("ready", flush=True)
while not go.exists():
    time.sleep(0.001)
for address in addresses:
    try:
        store.accounts.add_account(address, "$6$" + str(sys.argv.index(address)))
        print("added", address, flush=True)
    except StoreError:
        print("refused", address, flush=True)
store.close()
"""


def test_two_processes_adding_the_same_accounts_each_succeed_exactly_once(
    store_url: str, tmp_path: Path
) -> None:
    open_store(store_url).close()  # schema first, so the racers only race on accounts
    go = tmp_path / "go"
    addresses = [f"user{i}@race.example" for i in range(20)]
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, store_url, str(go), *variant],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
        )
        for variant in (addresses, [a.upper() for a in addresses])
    ]
    for racer in racers:
        assert racer.stdout is not None and racer.stdout.readline() == "ready\n"
    go.touch()
    outputs = [racer.communicate(timeout=60) for racer in racers]
    assert [racer.returncode for racer in racers] == [0, 0], [err for _, err in outputs]

    added = [line.split()[1].lower() for out, _ in outputs for line in out.splitlines()
             if line.startswith("added")]
    refused = [line.split()[1].lower() for out, _ in outputs for line in out.splitlines()
               if line.startswith("refused")]
    assert sorted(added) == sorted(refused) == sorted(addresses)
    store = open_store(store_url)
    try:
        assert len(store.accounts.list_accounts()) == len(addresses)
    finally:
        store.close()


# --- password hashing ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def hasher() -> PasswordHasher:
    return PasswordHasher("sha512_crypt", rounds=5000)


def test_right_password_verifies_without_rehash(hasher: PasswordHasher) -> None:
    stored = hasher.hash("correct horse")
    assert sha512_crypt.from_string(stored).rounds == 5000  # the configured cost is used
    result = hasher.verify("correct horse", stored)
    assert result.ok and result.new_hash is None


def test_wrong_password_does_not_verify(hasher: PasswordHasher) -> None:
    result = hasher.verify("wrong horse", hasher.hash("correct horse"))
    assert not result.ok and result.new_hash is None


def test_hash_of_an_older_scheme_is_upgraded_on_a_correct_password(hasher: PasswordHasher) -> None:
    legacy = PasswordHasher("md5_crypt").hash("correct horse")
    assert legacy.startswith("$1$")
    result = hasher.verify("correct horse", legacy)
    assert result.ok
    assert result.new_hash is not None and result.new_hash.startswith("$6$")
    upgraded = hasher.verify("correct horse", result.new_hash)
    assert upgraded.ok and upgraded.new_hash is None


def test_hash_of_an_older_scheme_is_not_upgraded_on_a_wrong_password(
    hasher: PasswordHasher,
) -> None:
    legacy = PasswordHasher("md5_crypt").hash("correct horse")
    result = hasher.verify("wrong horse", legacy)
    assert not result.ok and result.new_hash is None


@pytest.mark.parametrize("stored", [
    "", "nonsense", "$6$", "$6$rounds=5000$abc$", "$2b$12$short", "{PLAIN}correct horse",
    "correct horse",
])
def test_malformed_stored_hash_never_verifies(hasher: PasswordHasher, stored: str) -> None:
    result = hasher.verify("correct horse", stored)
    assert not result.ok and result.new_hash is None


@pytest.mark.parametrize(("passlib_hash", "expected"), [
    ("$6$rounds=5000$salt$abc", "{SHA512-CRYPT}$6$rounds=5000$salt$abc"),
    ("$5$salt$abc", "{SHA256-CRYPT}$5$salt$abc"),
    ("$1$salt$abc", "{MD5-CRYPT}$1$salt$abc"),
    ("$2b$12$abc", "{BLF-CRYPT}$2b$12$abc"),
    ("$argon2id$v=19$m=65536$abc", "{ARGON2ID}$argon2id$v=19$m=65536$abc"),
    ("{SSHA}abcdef", "{SSHA}abcdef"),
])
def test_dovecot_form_prefixes_the_scheme(passlib_hash: str, expected: str) -> None:
    assert dovecot_form(passlib_hash) == expected


@pytest.mark.parametrize("passlib_hash", ["plaintext", "$9$unknown", "6$no-dollar"])
def test_dovecot_form_refuses_unknown_hashes(passlib_hash: str) -> None:
    with pytest.raises(ValueError):
        dovecot_form(passlib_hash)


def test_dovecot_form_of_a_real_hash_is_read_back_by_passlib(hasher: PasswordHasher) -> None:
    stored = hasher.hash("correct horse")
    form = dovecot_form(stored)
    assert form == "{SHA512-CRYPT}" + stored
    assert hasher.verify("correct horse", form.removeprefix("{SHA512-CRYPT}")).ok


def test_hashes_nobody_waits_for_run_at_low_cpu_priority() -> None:
    """A first login's hash is made after its OK: it must not take the CPU from the logins of
    a burst still waiting for theirs."""
    hasher = PasswordHasher("sha512_crypt", 5000, processes=1)
    try:
        made_later = hasher.hash("correct horse", background=True)
        assert hasher.verify("correct horse", made_later).ok
        ours = os.getpriority(os.PRIO_PROCESS, 0)
        assert hasher._pool is not None and hasher._background is not None
        for pid in hasher._pool._processes:
            assert os.getpriority(os.PRIO_PROCESS, pid) == ours
        for pid in hasher._background._processes:
            assert os.getpriority(os.PRIO_PROCESS, pid) == ours + PasswordHasher.BACKGROUND_NICENESS
    finally:
        hasher.close()
