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
  unknown to the store for up to a second (a first login then waits: the proxy tries the store
  login of a just-provisioned account again, see login.JUST_PROVISIONED_GRACE); fine for
  accounts an admin creates by hand.
- `none`: the store reads the account database itself (Dovecot's SQL passdb).
"""

from __future__ import annotations

from migrating_proxy.config import ProvisionConfig
from migrating_proxy.provision.base import AccountSource, NoProvisioner, Provisioner
from migrating_proxy.provision.passwd_dir import PasswdDirProvisioner
from migrating_proxy.provision.passwd_file import PasswdFileProvisioner

__all__ = ["AccountSource", "NoProvisioner", "Provisioner", "make_provisioner"]


def make_provisioner(config: ProvisionConfig, accounts: AccountSource) -> Provisioner:
    if config.kind == "none":
        return NoProvisioner()
    assert config.path is not None  # enforced when the configuration is read
    if config.kind == "passwd-dir":
        return PasswdDirProvisioner(config.path, accounts)
    return PasswdFileProvisioner(config.path, accounts)
