"""The credential vault: captured and imported passwords, encrypted at rest.

A copy job needs the user's password for the old server, and the process that runs it is not
the one that saw the login. The password travels through the database, encrypted with a key
that is not in the database (Fernet: AES-CBC + HMAC), and is erased as soon as the migration no
longer needs it. Losing the key only means waiting for each user's next login.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import time
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken
from sqlalchemy import Connection, Engine, delete, insert, select, update

from migrating_proxy.store.accounts import now
from migrating_proxy.store.schema import domain_vault, domains, vault


class VaultKeyError(Exception):
    """The key file is missing, unreadable or not a key."""


def load_or_create_key(path: Path) -> bytes:
    """Read the key; create it (0600, exclusively) on first use by any process."""
    with contextlib.suppress(FileNotFoundError):
        return _read_key(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process is creating it right now
        return _read_key(path, wait=True)
    except OSError as exc:
        raise VaultKeyError(f"{path}: cannot create the vault key: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as out:
        out.write(Fernet.generate_key() + b"\n")
    return _read_key(path)


def _read_key(path: Path, wait: bool = False) -> bytes:
    deadline = time.monotonic() + (5 if wait else 0)
    while True:
        try:
            key = path.read_bytes().strip()
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise VaultKeyError(f"{path}: cannot read the vault key: {exc.strerror}") from None
        if key or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    try:
        Fernet(key)
    except ValueError:
        raise VaultKeyError(f"{path}: not a vault key") from None
    return key


class Vault:
    def __init__(self, engine: Engine, key: bytes) -> None:
        self.engine = engine
        self.fernet = Fernet(key)

    def put(self, account_id: int, password: str, conn: Connection | None = None) -> None:
        if conn is None:
            with self.engine.begin() as own:
                return self.put(account_id, password, own)
        token = self.fernet.encrypt(password.encode())
        updated = conn.execute(
            update(vault).where(vault.c.account_id == account_id)
            .values(ciphertext=token, created_at=now())
        ).rowcount
        if not updated:
            conn.execute(insert(vault).values(account_id=account_id, ciphertext=token,
                                              created_at=now()))
        return None

    def get(self, account_id: int) -> str | None:
        with self.engine.connect() as conn:
            token = conn.execute(
                select(vault.c.ciphertext).where(vault.c.account_id == account_id)
            ).scalar_one_or_none()
        return self._decrypt(token)

    def _decrypt(self, token: bytes | None) -> str | None:
        if token is None:
            return None
        try:
            return self.fernet.decrypt(token).decode()
        except InvalidToken:  # written with another key: as good as absent
            return None

    def matches(self, account_id: int, password: str) -> bool:
        stored = self.get(account_id)
        return stored is not None and hmac.compare_digest(stored.encode(), password.encode())

    def erase(self, account_id: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(vault).where(vault.c.account_id == account_id))

    # -- domain secrets: the old server's admin password ------------------------------------
    def put_domain(self, domain: str, password: str, conn: Connection) -> None:
        """The admin password of `domain`, in the caller's transaction (with the domain's
        own change, so that a refused or failed change leaves neither)."""
        domain_id = _domain_id(conn, domain)
        token = self.fernet.encrypt(password.encode())
        conn.execute(delete(domain_vault).where(domain_vault.c.domain_id == domain_id))
        conn.execute(insert(domain_vault).values(domain_id=domain_id, ciphertext=token,
                                                 created_at=now()))

    def get_domain(self, domain: str) -> str | None:
        with self.engine.connect() as conn:
            token = conn.execute(
                select(domain_vault.c.ciphertext).select_from(
                    domain_vault.join(domains, domains.c.id == domain_vault.c.domain_id))
                .where(domains.c.name == domain.lower())).scalar_one_or_none()
        return self._decrypt(token)

    def erase_domain(self, domain: str, conn: Connection) -> None:
        conn.execute(delete(domain_vault).where(
            domain_vault.c.domain_id == _domain_id(conn, domain)))


def _domain_id(conn: Connection, domain: str) -> int:
    return int(conn.execute(select(domains.c.id).where(domains.c.name == domain.lower()))
               .scalar_one())
