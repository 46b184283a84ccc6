"""Dovecot passwd-file provisioning: `user@domain:{SHA512-CRYPT}$6$...` lines.

The file is always rewritten whole from the account database, never edited in place: under an
exclusive lock, the current list of accounts is written to a temporary file that then replaces
the old one atomically. Dovecot therefore never reads a half-written file, two processes
provisioning at once cannot lose each other's accounts (the later one reads the database after
the earlier one committed), and a file damaged by hand is repaired by the next account change.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path

from migrating_proxy.passwords import dovecot_form


class PasswdFileProvisioner:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path.with_name(path.name + ".lock")

    def sync(self, accounts: list[tuple[str, str]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Dovecot looks users up lower-cased (auth_username_format = %Lu, its default), so the
        # file's keys are too: "Carol@new.example" must find her line, whoever typed the case.
        body = "".join(f"{address.lower()}:{dovecot_form(h)}\n" for address, h in accounts)
        with open(self.lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._replace(body)

    def _replace(self, body: str) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            self._keep_ownership(fd)
            with os.fdopen(fd, "w") as out:
                out.write(body)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _keep_ownership(self, fd: int) -> None:
        """The new file gets the old one's mode and group (the operator gave the store's auth
        process read access that way); a first file is 0640: hashes are nobody else's business.
        """
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            os.fchmod(fd, 0o640)
            return
        os.fchmod(fd, current.st_mode & 0o777)
        if current.st_gid != os.getegid():
            # Not root and not in that group: keep our own group; the file still works for us.
            with contextlib.suppress(PermissionError):
                os.fchown(fd, -1, current.st_gid)
