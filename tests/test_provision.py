"""Provisioning adapters: what the store's user database looks like after account changes.

The Dovecot side (a user provisioned here logs in to a real Dovecot) is covered by test_cli.py
and test_migration_login.py; these tests pin the files themselves.
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from migrating_proxy.config import ProvisionConfig
from migrating_proxy.passwords import LOCKED_DOVECOT_ENTRY, PENDING_HASH
from migrating_proxy.provision import make_provisioner
from migrating_proxy.provision.passwd_dir import PasswdDirProvisioner
from migrating_proxy.store import Store


def provisioner(kind: str, path: Path, store: Store):  # type: ignore[no-untyped-def]
    return make_provisioner(ProvisionConfig(kind=kind, path=path), store.accounts)


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

    threads = [threading.Thread(target=add, args=(a,)) for a in addresses]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(line.split(":")[0] for line in users.read_text().splitlines()) == sorted(
        addresses)
