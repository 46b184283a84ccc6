"""What every provisioning adapter is (`Provisioner`) and what it reads (`AccountSource`)."""

from __future__ import annotations

from typing import Protocol


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
