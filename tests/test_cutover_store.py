"""The transparent cutover's part of the account store (issue 9), on SQLite and PostgreSQL:
the schema upgrade from version 1, cutover modes and sources of domains, where accounts are
served, and the switch's guarded transitions."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import select

from migrating_proxy.endpoints import parse_endpoint
from migrating_proxy.routing import route
from migrating_proxy.store import Domain, Store, StoreError, open_store
from migrating_proxy.store.accounts import arrange_sources, now
from migrating_proxy.store.copystate import CopyState, copy_folders
from migrating_proxy.store.schema import SCHEMA_VERSION, accounts, schema_info
from tests.support.schemas import create_old_schema

# --- upgrading a database made before the cutover ------------------------------------------


STAMP = "2025-01-01 00:00:00+00"
ROWS = [
    "INSERT INTO domains (name, migrating, source_url, type, source_user, subscribed_only, "
    "notice, verify_tls, created_at, updated_at) VALUES ('old.example', true, "
    f"'imap://192.0.2.1:143', 'default', '%u', false, true, true, '{STAMP}', '{STAMP}')",
    *(f"INSERT INTO accounts (address, address_key, domain, password_hash, created_at, "
      f"updated_at, migration_state) VALUES ('{address}', '{address}', 'old.example', '$6$x', "
      f"'{STAMP}', '{STAMP}', {state})"
      for address, state in (("alice@old.example", "'COMPLETED'"), ("local@old.example", "NULL"))),
    "INSERT INTO copy_folders (account_id, source_name, dest_name, uidvalidity, synced_uidnext, "
    f"updated_at) VALUES (1, 'INBOX', 'INBOX', 7, 12, '{STAMP}')",
]


# 3: the schema just before the cutover's (version 4); 1: the first one.
@pytest.mark.parametrize("version", [3, 2, 1])
def test_database_from_before_the_cutover_upgrades_in_place_keeping_today_s_behaviour(
        store_url: str, version: int) -> None:
    # A domain, an account that was migrated, a local account and a copied folder.
    create_old_schema(store_url, version, *ROWS)
    store = open_store(store_url)
    try:
        with store.engine.connect() as conn:
            assert conn.execute(select(schema_info.c.version)).scalar_one() == SCHEMA_VERSION
            folder = conn.execute(select(copy_folders)).one()
        domain = store.accounts.get_domain("old.example")
        assert domain is not None and domain.cutover == "immediate"  # existing: as before
        assert domain.sources == ("imap://192.0.2.1:143",)
        for address in ("alice@old.example", "local@old.example"):
            account = store.accounts.get_account(address)
            assert account is not None and account.served_by == "store"
            assert account.switched_at is None and account.hold_until is None
        assert (folder.synced_uidnext, folder.synced_modseq) == (12, None)
        # Domains added from now on default to passthrough; old rows keep working.
        store.accounts.add_domain(Domain("new.example", "imap://192.0.2.2:143"))
        assert store.accounts.get_domain("new.example").cutover == "passthrough"  # type: ignore[union-attr]
        store.accounts.add_account("carol@old.example", "$6$y", migration_state="NEW")
        assert store.accounts.get_account("carol@old.example").served_by == "store"  # type: ignore[union-attr]
    finally:
        store.close()
    open_store(store_url).close()  # opening again changes nothing


# --- domains ------------------------------------------------------------------------------


def test_sources_are_arranged_one_per_protocol() -> None:
    assert arrange_sources(["pop3://a:110", "imaps://a:993"]) == ("imaps://a:993", "pop3://a:110")
    assert arrange_sources(["pop3s://a:995"]) == ("pop3s://a:995", None)
    assert arrange_sources(["imap://a:143"]) == ("imap://a:143", None)
    with pytest.raises(StoreError, match="two IMAP sources"):
        arrange_sources(["imap://a:143", "imap+starttls://b:143"])
    with pytest.raises(StoreError, match="needs a --source"):
        arrange_sources([])


def test_each_protocol_is_checked_at_its_own_source() -> None:
    both = Domain("d.example", "imaps://a:993", pop3_source_url="pop3s://a:995")
    assert both.source_for("imap") == "imaps://a:993"
    assert both.source_for("pop3") == "pop3s://a:995"
    assert both.source_for("smtp") == "imaps://a:993"  # submission: the copy's source
    pop_only = Domain("p.example", "pop3://a:110")
    assert pop_only.source_for("imap") == "pop3://a:110"


def test_domain_update_changes_the_given_fields_only(store: Store) -> None:
    store.accounts.add_domain(Domain("old.example", "imap://192.0.2.1:143", notice=False))
    updated = store.accounts.update_domain("OLD.example", cutover="immediate",
                                           pop3_source_url="pop3://192.0.2.1:110")
    assert updated == Domain("old.example", "imap://192.0.2.1:143", notice=False,
                             cutover="immediate", pop3_source_url="pop3://192.0.2.1:110")
    with pytest.raises(StoreError, match="unknown domain"):
        store.accounts.update_domain("nowhere.example", cutover="immediate")
    with pytest.raises(StoreError, match="cannot change colour"):
        store.accounts.update_domain("old.example", colour="red")


# --- where accounts are served, and the switch --------------------------------------------


@pytest.fixture
def passthrough(store: Store) -> Store:
    store.accounts.add_domain(Domain("old.example", "imap://192.0.2.1:143"))
    store.accounts.add_domain(Domain("now.example", "imap://192.0.2.1:143",
                                     cutover="immediate"))
    return store


def test_migrating_accounts_of_passthrough_domains_start_at_the_old_server(
        passthrough: Store) -> None:
    accounts_ = passthrough.accounts
    migrating = accounts_.add_account("alice@old.example", "", migration_state="PENDING")
    local = accounts_.add_account("admin@old.example", "$6$x")
    immediate = accounts_.add_account("bob@now.example", "", migration_state="PENDING")
    unknown_domain = accounts_.add_account("carol@other.example", "", migration_state="NEW")
    assert migrating.served_by == "old" and migrating.served_by_old_server
    assert (local.served_by, immediate.served_by, unknown_domain.served_by) == (
        "store", "store", "store")


def test_switch_needs_a_hold_in_force_and_happens_once(passthrough: Store) -> None:
    account = passthrough.accounts.add_account("alice@old.example", "", migration_state="PENDING")
    cutover = passthrough.cutover
    assert cutover.held_until("alice@old.example") is None
    assert not cutover.switch(account.id)  # never without a hold
    until = now() + timedelta(seconds=10)
    assert cutover.hold(account.id, until)
    held = cutover.held_until("ALICE@old.example")
    assert held is not None and abs((held - until).total_seconds()) < 1
    assert cutover.switch(account.id)
    switched = passthrough.accounts.get_account("alice@old.example")
    assert switched is not None and switched.served_by == "store"
    assert switched.switched_at is not None
    assert switched.migration_state == "PENDING"  # its pass completes it (store/lifecycle.py)
    assert switched.hold_until is None and cutover.held_until("alice@old.example") is None
    assert not cutover.switch(account.id) and not cutover.hold(account.id, until)


def test_an_expired_hold_cannot_switch(passthrough: Store) -> None:
    account = passthrough.accounts.add_account("alice@old.example", "", migration_state="PENDING")
    cutover = passthrough.cutover
    assert cutover.hold(account.id, now() - timedelta(milliseconds=1))
    assert cutover.held_until("alice@old.example") is None  # logins go to the old server
    assert not cutover.switch(account.id)
    assert passthrough.accounts.get_account("alice@old.example").served_by == "old"  # type: ignore[union-attr]
    assert cutover.hold(account.id, now() + timedelta(seconds=5))
    cutover.release(account.id)
    assert cutover.held_until("alice@old.example") is None
    assert not cutover.switch(account.id)


def test_a_paused_pass_is_not_switched(passthrough: Store) -> None:
    """`stop` landing during the final pass, before the worker noticed: the flip must not
    happen (the pause stands, store/states.py); after `start` it may."""
    account = passthrough.accounts.add_account("alice@old.example", "", migration_state="PENDING")
    passthrough.jobs.enqueue(account.id, "full", "h")
    passthrough.jobs.claim("w1", 4)
    cutover = passthrough.cutover
    assert cutover.hold(account.id, now() + timedelta(seconds=10))
    assert passthrough.jobs.pause([account.id]) == {account.id}
    assert not cutover.switch(account.id)
    assert cutover.switch(account.id, held=False)  # `finish` all the same
    other = passthrough.accounts.add_account("bob@old.example", "", migration_state="PENDING")
    passthrough.jobs.enqueue(other.id, "full", "h")
    passthrough.jobs.claim("w1", 4)
    passthrough.jobs.pause([other.id])
    passthrough.jobs.resume([other.id])
    assert cutover.hold(other.id, now() + timedelta(seconds=10))
    assert cutover.switch(other.id)


def test_finish_may_switch_without_a_hold(passthrough: Store) -> None:
    account = passthrough.accounts.add_account("alice@old.example", "", migration_state="ERROR")
    assert passthrough.cutover.switch(account.id, held=False)
    assert passthrough.accounts.get_account("alice@old.example").served_by == "store"  # type: ignore[union-attr]


def test_folder_modseq_is_kept_with_the_sync_mark(passthrough: Store) -> None:
    account = passthrough.accounts.add_account("alice@old.example", "", migration_state="PENDING")
    state = CopyState(passthrough.engine, account.id)
    folder = state.folder("INBOX", "INBOX")
    assert folder.synced_modseq is None
    state.mark_synced(folder.id, 5, 10, modseq=42)
    assert state.folder("INBOX", "INBOX").synced_modseq == 42
    state.mark_unsynced(folder.id, 5)  # an interrupted pass keeps the last complete mark
    assert state.folder("INBOX", "INBOX").synced_modseq == 42
    with passthrough.engine.connect() as conn:
        assert conn.execute(select(accounts.c.served_by)).scalar() == "old"


# --- mail flow follows (routing.py) --------------------------------------------------------

DELIVERY = parse_endpoint("lmtp://127.0.0.1:24")


def test_mail_for_an_account_the_old_server_serves_goes_to_its_relay(store: Store) -> None:
    store.accounts.add_domain(Domain("old.example", "imap://192.0.2.1:143",
                                     relay_url="smtp://192.0.2.1:25"))
    account = store.accounts.add_account("alice@old.example", "", migration_state="PENDING")
    relayed = route(store.accounts, DELIVERY, "alice@old.example")
    assert relayed.next_hop == parse_endpoint("smtp://192.0.2.1:25") and not relayed.local
    store.accounts.set_domain_migrating("old.example", False)  # its mailbox is still there
    assert route(store.accounts, DELIVERY, "alice@old.example").next_hop == relayed.next_hop
    assert store.cutover.switch(account.id, held=False)
    delivered = route(store.accounts, DELIVERY, "alice@old.example")
    assert delivered.next_hop == DELIVERY and delivered.local


def test_mail_during_a_switch_waits_for_its_outcome(store: Store) -> None:
    store.accounts.add_domain(Domain("old.example", "imap://192.0.2.1:143",
                                     relay_url="smtp://192.0.2.1:25"))
    account = store.accounts.add_account("alice@old.example", "", migration_state="PENDING")
    assert store.cutover.hold(account.id, now() + timedelta(seconds=30))
    flipped = threading.Timer(0.3, store.cutover.switch, [account.id])
    flipped.start()
    try:
        # Asked while the account was still the old server's: answered once it switched.
        assert route(store.accounts, DELIVERY, "alice@old.example").next_hop == DELIVERY
    finally:
        flipped.join()
    other = store.accounts.add_account("bob@old.example", "", migration_state="PENDING")
    assert store.cutover.hold(other.id, now() + timedelta(seconds=30))
    released = threading.Timer(0.3, store.cutover.release, [other.id])
    released.start()
    try:
        assert route(store.accounts, DELIVERY, "bob@old.example").next_hop != DELIVERY
    finally:
        released.join()
