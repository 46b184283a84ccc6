"""Provisioning adapters: what the store's user database looks like after account changes.

The Dovecot side (a user provisioned here logs in to a real Dovecot) is covered by test_cli.py
and test_migration_login.py; these tests pin the files themselves.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from migrating_proxy.config import ProvisionConfig
from migrating_proxy.passwords import LOCKED_DOVECOT_ENTRY, PENDING_HASH
from migrating_proxy.provision import make_provisioner
from migrating_proxy.provision.passwd_dir import PasswdDirProvisioner
from migrating_proxy.store import Store


def provisioner(kind: str, path: Path, store: Store):  # type: ignore[no-untyped-def]
    return make_provisioner(ProvisionConfig(kind=kind, path=path), store.accounts)


def at_once(function: Callable[[str], None], addresses: list[str]) -> None:
    """function(address) for every address, each in a thread of its own, all at once."""
    threads = [threading.Thread(target=function, args=(a,)) for a in addresses]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def test_passwd_file_lists_every_account_lower_cased(store: Store, tmp_path: Path) -> None:
    users = tmp_path / "users"
    store.accounts.add_account("Carol@New.example", "$6$rounds=5000$salt$hash")
    store.accounts.add_account("dave@new.example", PENDING_HASH)
    provisioner("passwd-file", users, store).update("Carol@new.example")
    assert users.read_text() == (
        "carol@new.example:{SHA512-CRYPT}$6$rounds=5000$salt$hash\n"
        f"dave@new.example:{LOCKED_DOVECOT_ENTRY}\n"
    )
    assert stat.S_IMODE(os.stat(users).st_mode) == 0o640
    store.accounts.remove_account("dave@new.example")
    provisioner("passwd-file", users, store).update("dave@new.example")
    assert "dave" not in users.read_text()


def test_passwd_dir_writes_one_file_per_account(store: Store, tmp_path: Path) -> None:
    directory = tmp_path / "users"
    adapter = provisioner("passwd-dir", directory, store)
    store.accounts.add_account("Carol@New.example", "$6$x")
    adapter.update("carol@new.example")
    entry = directory / "new.example" / "carol"
    assert entry.read_text() == "carol@new.example:{SHA512-CRYPT}$6$x\n"
    store.accounts.set_password_hash("carol@new.example", "$6$y")
    adapter.update("CAROL@new.example")
    assert entry.read_text() == "carol@new.example:{SHA512-CRYPT}$6$y\n"
    store.accounts.remove_account("carol@new.example")
    adapter.update("carol@new.example")
    assert not entry.exists()


def test_passwd_dir_sync_repairs_drift(store: Store, tmp_path: Path) -> None:
    directory = tmp_path / "users"
    store.accounts.add_account("carol@new.example", "$6$x")
    (directory / "new.example").mkdir(parents=True)
    (directory / "new.example" / "mallory").write_text("mallory@new.example:{PLAIN}x\n")
    (directory / "new.example" / "carol").write_text("carol@new.example:{PLAIN}edited\n")
    provisioner("passwd-dir", directory, store).sync()
    assert sorted(p.name for p in directory.glob("*/*")) == ["carol"]
    assert (directory / "new.example" / "carol").read_text().endswith("$6$x\n")


@pytest.mark.parametrize("address", ["../x@new.example", "a/b@new.example", "..@new.example"])
def test_passwd_dir_never_leaves_its_directory(tmp_path: Path, address: str) -> None:
    with pytest.raises(ValueError):
        PasswdDirProvisioner(tmp_path, accounts=None).entry(address)  # type: ignore[arg-type]


def test_concurrent_updates_end_with_the_database_state(store: Store, tmp_path: Path) -> None:
    """The list is read under the lock: no writer can put back an older state."""
    users = tmp_path / "users"
    adapter = provisioner("passwd-file", users, store)
    addresses = [f"user{n}@new.example" for n in range(12)]

    def add(address: str) -> None:
        store.accounts.add_account(address, "$6$h")
        adapter.update(address)

    at_once(add, addresses)
    assert sorted(line.split(":")[0] for line in users.read_text().splitlines()) == sorted(
        addresses)


def test_passwd_dir_updates_of_many_accounts_at_once_all_land(store: Store,
                                                               tmp_path: Path) -> None:
    """Per-account locks: a burst of first logins provisions in parallel, and every entry
    ends as the database says."""
    directory = tmp_path / "users"
    adapter = provisioner("passwd-dir", directory, store)
    addresses = [f"user{n}@new.example" for n in range(40)]

    def add(address: str) -> None:
        store.accounts.add_account(address, PENDING_HASH)
        adapter.update(address)
        store.accounts.set_password_hash(address, f"$6${address}")
        adapter.update(address)

    at_once(add, addresses)
    for address in addresses:
        entry = directory / "new.example" / address.split("@")[0]
        assert entry.read_text() == f"{address}:{{SHA512-CRYPT}}$6${address}\n"
    adapter.sync()  # the lock files are no accounts
    assert len(list(directory.glob("*/*"))) == 40


def test_passwd_file_shares_rewrites_between_simultaneous_updates(store: Store,
                                                                  tmp_path: Path) -> None:
    """Forty updates at once cost a few rewrites of the whole file, not forty in a row; each
    returns only once a rewrite that read the database after its change is on disk."""
    users = tmp_path / "users"
    adapter = provisioner("passwd-file", users, store)
    rewrites = 0
    rewrite = adapter._rewrite

    def counted() -> None:
        nonlocal rewrites
        rewrites += 1
        time.sleep(0.02)  # a big file takes a while
        rewrite()

    adapter._rewrite = counted
    seen_after_update: dict[str, bool] = {}

    def add(address: str) -> None:
        store.accounts.add_account(address, "$6$h")
        adapter.update(address)
        seen_after_update[address] = f"{address}:" in users.read_text()

    addresses = [f"user{n}@new.example" for n in range(40)]
    at_once(add, addresses)
    assert all(seen_after_update.values()) and len(seen_after_update) == 40
    assert rewrites < 20
