"""The old server's address and the user's credentials for the store's doveadm, per pass.

doveadm's HTTP API cannot pass settings with a call, so `backup -R imapc:` finds the old
server (imapc_host, ...) and the user's old password in the store's userdb. This adapter
writes them as a passwd-file userdb entry, one file per account (`DIR/<domain>/<local>`, read
by the userdb in deploy/dovecot/migrating-proxy-dsync.conf), **only for the duration of one
pass**: `present()` writes the file before the doveadm calls and deletes it after them,
whatever happens. Between passes no clear password exists anywhere on the store's side; the
proxy keeps it encrypted in its vault, as for the imap engine.

The files are written like provisioning's (0640, atomically replaced, the directory's setgid
group so Dovecot's auth process can read them). Values that a passwd-file line cannot carry
(whitespace, which separates extra fields) are refused with `UnwritableCredential`: the
engine then falls back to the imap engine for that account.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from pathlib import Path

from migrating_proxy.migration.connections import SourceSpec
from migrating_proxy.provision.passwd_dir import PasswdDirProvisioner
from migrating_proxy.provision.passwd_file import replace_file

# Where the pop3c namespace of the snippet is mounted; pop3_migration reads its UIDLs there.
POP3_NAMESPACE_INBOX = "POP3-MIGRATION-NS/INBOX"
_UNWRITABLE = re.compile(r"[\s\x00-\x1f\x7f]")


class UnwritableCredential(ValueError):
    """A value a passwd-file userdb line cannot hold (names the field, never the value)."""


def _ssl_mode(spec: SourceSpec) -> str:
    """imapc_ssl / pop3c_ssl: no, starttls, or imaps / pop3s for implicit TLS."""
    if spec.tls == "implicit":
        return "imaps" if spec.protocol == "imap" else "pop3s"
    return "starttls" if spec.tls == "starttls" else "no"


def userdb_fields(imap: SourceSpec, pop3: SourceSpec | None) -> dict[str, str]:
    """Settings the doveadm process of this user needs: where the old server is, and who."""
    fields = {
        "imapc_host": imap.host,
        "imapc_port": str(imap.port),
        "imapc_ssl": _ssl_mode(imap),
        "imapc_ssl_verify": "yes" if imap.verify_tls else "no",
        "imapc_user": imap.login,
        "imapc_password": imap.password,
    }
    if pop3 is not None:
        fields.update({
            "pop3c_host": pop3.host,
            "pop3c_port": str(pop3.port),
            "pop3c_ssl": _ssl_mode(pop3),
            "pop3c_ssl_verify": "yes" if pop3.verify_tls else "no",
            "pop3c_user": pop3.login,
            "pop3c_password": pop3.password,
            # The snippet's pop3c namespace is disabled unless a user's entry enables it, so
            # users without POP3 credentials never need them (pop3_migration would insist).
            "namespace/pop3c/disabled": "no",
            "pop3_migration_mailbox": POP3_NAMESPACE_INBOX,
        })
    return fields


class DsyncCredentials:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._paths = PasswdDirProvisioner(directory, accounts=None)  # type: ignore[arg-type]

    def entry(self, address: str) -> Path:
        return self._paths.entry(address)

    @staticmethod
    def line(address: str, fields: dict[str, str]) -> str:
        for name, value in fields.items():
            if not value or _UNWRITABLE.search(value):
                raise UnwritableCredential(
                    f"{name} is empty or contains whitespace, which Dovecot's userdb file "
                    f"cannot carry")
        extra = " ".join(f"userdb_{name}={value}" for name, value in fields.items())
        return f"{address.lower()}:::::::{extra}\n"

    @contextlib.contextmanager
    def present(self, address: str, imap: SourceSpec,
                pop3: SourceSpec | None = None) -> Iterator[None]:
        """The account's entry exists inside the block and is gone after it."""
        path = self.entry(address)
        line = self.line(address, userdb_fields(imap, pop3))
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            replace_file(path, line)
            yield
        finally:
            path.unlink(missing_ok=True)

    def erase(self, address: str) -> None:
        """Remove a leftover entry (a process killed inside `present`)."""
        self.entry(address).unlink(missing_ok=True)

    def sweep(self, older_than: float) -> int:
        """Delete entries older than any pass can be (left by killed processes)."""
        deadline, removed = time.time() - older_than, 0
        for path in self.directory.glob("*/*"):
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < deadline:
                    path.unlink()
                    removed += 1
        return removed
