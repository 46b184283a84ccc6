"""Provisioning: making accounts known to the new store's user database.

Adapters are narrow on purpose: the proxy tells the store "these accounts exist with these
hashes" and nothing else. Dovecot's passwd-file is the first adapter; a store that reads the
account database directly (Dovecot's sql passdb) needs kind "none".
"""

from __future__ import annotations

from typing import Protocol

from migrating_proxy.config import ProvisionConfig


class Provisioner(Protocol):
    def sync(self, accounts: list[tuple[str, str]]) -> None:
        """Make the store's user database list exactly these (address, passlib hash) pairs."""


class NoProvisioner:
    """The store reads the account database itself; nothing to write."""

    def sync(self, accounts: list[tuple[str, str]]) -> None:
        return None


def make_provisioner(config: ProvisionConfig) -> Provisioner:
    if config.kind == "none":
        return NoProvisioner()
    from migrating_proxy.provision.passwd_file import PasswdFileProvisioner

    assert config.path is not None  # enforced when the configuration is read
    return PasswdFileProvisioner(config.path)
