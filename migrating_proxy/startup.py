"""What `serve` and `worker` check before they start anything: a failure is one line, exit 1.

Under systemd a long-running command that starts with a file it cannot use must fail at once
(Restart= then retries and the journal says why), not run on and fail at the first login or
the first copy, or restart its children in a loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from migrating_proxy.config import Config
from migrating_proxy.notice import load_template
from migrating_proxy.store import open_store
from migrating_proxy.store.vault import load_or_create_key


class StartupError(Exception):
    """A long-running command cannot start; worded for the operator (one line, exit 1)."""


@contextlib.contextmanager
def files_refused() -> Iterator[None]:
    """A file or directory we cannot use (permissions, a file where a directory should be)."""
    try:
        yield
    except OSError as exc:
        raise StartupError(f"cannot use {exc.filename}: {exc.strerror}") from None


def check_files(config: Config) -> None:
    """Read now the files read later on demand: the master password, the notice template."""
    with files_refused():
        config.backend.master_password()
        load_template(config.migration.notice)


def check_worker_start(config: Config) -> None:
    """What every copy worker opens first: the database (and its schema), the vault key."""
    check_files(config)
    store = open_store(config.database_url)  # DatabaseError: one line already
    store.close()
    load_or_create_key(config.vault_key_path)  # VaultKeyError: one line already
