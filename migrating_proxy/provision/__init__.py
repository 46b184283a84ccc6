"""Provisioning: making accounts known to the new store's user database.

Adapters are narrow on purpose: "make the store's entry for this address match the account
database" (`update`: written, rewritten or removed), or "for every address" (`sync`, run at
every start to repair drift). They read the database themselves, under their own lock, so two
processes updating at once can never leave an older state behind. Dovecot first:

- `passwd-dir`: one small passwd-file per account (`DIR/<domain>/<local>`), read by Dovecot
  through a path with variables. Changing one account touches one file, and Dovecot sees a new
  account at once. The right kind for migrations, where accounts appear all day long.
- `passwd-file`: one file for every account, rewritten whole. Simple, but Dovecot re-reads a
  changed file at most once a second, so an account added right after another login can be
  unknown to the store for up to a second; fine for accounts an admin creates by hand.
- `none`: the store reads the account database itself (Dovecot's SQL passdb).
"""

from __future__ import annotations

from typing import Protocol

from migrating_proxy.config import ProvisionConfig


class AccountSource(Protocol):
    """What provisioners read (AccountStore): passlib hashes, PENDING_HASH for locked."""

    def password_hash_of(self, address: str) -> str | None: ...

    def all_password_hashes(self) -> list[tuple[str, str]]: ...


class Provisioner(Protocol):
    def update(self, address: str) -> None:
        """The store's entry for address now matches the database (or is gone with it)."""

    def sync(self) -> None:
        """The store's user database lists exactly the accounts in the database."""


class NoProvisioner:
    """The store reads the account database itself; nothing to write."""

    def update(self, address: str) -> None:
        return None

    def sync(self) -> None:
        return None


def make_provisioner(config: ProvisionConfig, accounts: AccountSource) -> Provisioner:
    if config.kind == "none":
        return NoProvisioner()
    assert config.path is not None  # enforced when the configuration is read
    if config.kind == "passwd-dir":
        from migrating_proxy.provision.passwd_dir import PasswdDirProvisioner

        return PasswdDirProvisioner(config.path, accounts)
    from migrating_proxy.provision.passwd_file import PasswdFileProvisioner

    return PasswdFileProvisioner(config.path, accounts)
