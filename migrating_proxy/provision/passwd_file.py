"""Dovecot passwd-file provisioning: `user@domain:{SHA512-CRYPT}$6$...` lines.

The file is always rewritten whole from the account database, never edited in place: under an
exclusive lock, the current list of accounts is written to a temporary file that then replaces
the old one atomically. Dovecot therefore never reads a half-written file, two processes
provisioning at once cannot lose each other's accounts (the later one reads the database after
the earlier one committed), and a file damaged by hand is repaired by the next account change.

Rewrites are shared between threads: a change waiting while another rewrite runs is covered by
the next rewrite to start, whoever asked for it. So a burst of forty first logins costs a few
rewrites (each O(accounts), with an fsync), not forty in a row.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import threading
from pathlib import Path

from migrating_proxy.passwords import dovecot_form
from migrating_proxy.provision.base import AccountSource


class PasswdFileProvisioner:
    def __init__(self, path: Path, accounts: AccountSource) -> None:
        self.path = path
        self.accounts = accounts
        self.lock_path = path.with_name(path.name + ".lock")
        self._turn = threading.Condition()
        self._started = 0  # rewrites begun in this process, numbered
        self._done = 0  # the number of the latest rewrite that completed
        self._running = False

    def update(self, address: str) -> None:
        self.sync()  # one file for all: the whole file follows the database

    def sync(self) -> None:
        """Return once a rewrite that read the database after this call has completed."""
        with self._turn:
            wanted = self._started + 1  # any rewrite numbered from here on starts later
            while self._running:
                self._turn.wait()
            if self._done >= wanted:
                return  # someone else's rewrite covered this change
            self._running, self._started = True, self._started + 1
            number = self._started
        completed = False
        try:
            self._rewrite()
            completed = True
        finally:
            with self._turn:  # after a failure, the next waiter tries its own rewrite
                self._running = False
                if completed:
                    self._done = number
                self._turn.notify_all()

    def _rewrite(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            # Read the database only now, holding the lock: a list read before it could be
            # older than the file another process just wrote, and would drop its account.
            # Dovecot looks users up lower-cased (auth_username_format = %Lu, its default), so
            # the file's keys are too: "Carol@new.example" must find her line.
            self._replace("".join(f"{address.lower()}:{dovecot_form(h)}\n"
                                  for address, h in self.accounts.all_password_hashes()))

    def _replace(self, body: str) -> None:
        replace_file(self.path, body)


def replace_file(path: Path, body: str) -> None:
    """Atomically replace path's content: Dovecot never reads a half-written file.

    Not fsynced: these files mirror the account database, `serve` rewrites any that differ
    from it at every start (so after a power failure too), and an fsync here cost a first
    login 10 to 30 ms on the critical path, queued behind the others' in the file system's
    journal during a burst."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        _keep_ownership(path, fd)
        with os.fdopen(fd, "w") as out:
            out.write(body)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _keep_ownership(path: Path, fd: int) -> None:
    """The new file gets the old one's mode and group (the operator gave the store's auth
    process read access that way); a first file is 0640: hashes are nobody else's business.
    A setgid directory hands its group to new files, which is how the store gets to read them.
    """
    try:
        current = os.stat(path)
    except FileNotFoundError:
        os.fchmod(fd, 0o640)
        return
    os.fchmod(fd, current.st_mode & 0o777)
    if current.st_gid != os.getegid():
        # Not root and not in that group: keep our own group; the file still works for us.
        with contextlib.suppress(PermissionError):
            os.fchown(fd, -1, current.st_gid)
