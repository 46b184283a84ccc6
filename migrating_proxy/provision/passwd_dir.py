"""Dovecot passwd-files, one per account: `DIR/<domain>/<local>` holding one line.

Dovecot reads them through `passwd-file` with a path of variables
(`args = scheme=SHA512-CRYPT DIR/%Ld/%Ln`, see deploy/dovecot/). Per account, because Dovecot
re-reads a changed passwd-file at most once a second: with one file for everyone, an account
created right after another login would stay unknown to the store for up to a second, and the
store login of a user's very first session would have to wait and try again. A file Dovecot has
never seen is read at once. It also keeps each change O(1) however many accounts there are.

Names are lower-cased as Dovecot's %L modifier does; addresses were validated by the store
(no "/", no "." or ".." local part), so a name can never leave the directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import zlib
from collections.abc import Iterator
from pathlib import Path

from migrating_proxy.passwords import dovecot_form
from migrating_proxy.provision.base import AccountSource
from migrating_proxy.provision.passwd_file import replace_file

# Accounts are locked in stripes (`DIR/.lock-<n>`): updates of different accounts run in
# parallel, each with its fsync, instead of queueing behind one lock during a burst of first
# logins. `sync` takes `DIR/.lock` exclusively; updates hold it shared.
LOCK_STRIPES = 64


class PasswdDirProvisioner:
    def __init__(self, directory: Path, accounts: AccountSource) -> None:
        self.directory = directory
        self.accounts = accounts

    def entry(self, address: str) -> Path:
        local, _, domain = address.lower().rpartition("@")
        if not local or local in (".", "..") or "/" in address or domain in ("", ".", ".."):
            raise ValueError("address cannot name a provisioning file")
        return self.directory / domain / local

    def update(self, address: str) -> None:
        # Read and write as one step (see the provision package), per account.
        stripe = zlib.crc32(address.lower().encode()) % LOCK_STRIPES
        with self._locked(".lock", fcntl.LOCK_SH), self._locked(f".lock-{stripe}"):
            self._write(address, self.accounts.password_hash_of(address))

    def sync(self) -> None:
        with self._locked(".lock"):
            wanted = {self.entry(a): (a, h) for a, h in self.accounts.all_password_hashes()}
            for address, passlib_hash in wanted.values():
                self._write(address, passlib_hash)
            for path in self.directory.glob("*/*"):
                if path not in wanted and not path.name.startswith("."):
                    path.unlink()

    def _write(self, address: str, passlib_hash: str | None) -> None:
        path = self.entry(address)
        if passlib_hash is None:
            path.unlink(missing_ok=True)
            return
        line = f"{address.lower()}:{dovecot_form(passlib_hash)}\n"
        if path.is_file() and path.read_text() == line:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_file(path, line)

    @contextlib.contextmanager
    def _locked(self, name: str, mode: int = fcntl.LOCK_EX) -> Iterator[None]:
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / name, "a") as lock:
            fcntl.flock(lock, mode)
            yield
