"""Last-login times, written in the background: a login never waits for this write.

The time of a login is worth recording, but not worth making the login wait for the
database's write lock (an admin import, a backup, another machine's long transaction) or fail
when the disk is full. So logins only `note` it; a background thread writes what was noted,
all of it in one transaction, at most every BATCH_WINDOW seconds. When the database refuses,
the times wait (newer ones replacing older) and the write is tried again, a little later each
time, up to RETRY_MAX seconds apart.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime

import structlog

from migrating_proxy.store.accounts import AccountStore, now

log = structlog.get_logger(__name__)

# Noted but not yet written; past this (the database has been refusing writes for a while),
# logins of further accounts are not recorded until it catches up.
MAX_PENDING = 100_000
RETRY_FIRST, RETRY_MAX = 1.0, 10.0
BATCH_WINDOW = 0.5  # seconds the first noted login waits for others to share its write


class LastLogins:
    def __init__(self, accounts: AccountStore) -> None:
        self.accounts = accounts
        self._pending: dict[str, datetime] = {}
        self._wake = threading.Condition()
        self._stopping = False
        self._failing = False
        self._thread = threading.Thread(target=self._run, name="last-logins", daemon=True)
        self._thread.start()

    def note(self, address: str) -> None:
        """Never blocks on the database, never raises."""
        with self._wake:
            if len(self._pending) < MAX_PENDING or address in self._pending:
                self._pending[address] = now()
                self._wake.notify()

    def close(self, timeout: float = 5.0) -> None:
        """Write what is still pending (within timeout), then stop."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        delay, retry_at = 0.0, 0.0  # after a failure: no new try before retry_at
        while True:
            with self._wake:
                while not self._stopping:
                    wait = retry_at - time.monotonic()
                    if self._pending and wait <= 0:
                        break
                    self._wake.wait(wait if wait > 0 else None)
                # Logins come in bursts: a moment's worth in one transaction, rather than a
                # write (three round trips to the SQLite helper process) per login.
                self._wake.wait_for(lambda: self._stopping, timeout=BATCH_WINDOW)
                batch, self._pending = self._pending, {}
            if not batch:
                return  # stopping, nothing left
            if self._write(batch):
                delay = 0.0
            elif self._stopping:
                return  # the database refuses: these times are lost, the logins were not
            else:
                with self._wake:  # kept for the next try; newer times win
                    self._pending = batch | self._pending
                delay = min(max(delay * 2, RETRY_FIRST), RETRY_MAX)
                retry_at = time.monotonic() + delay

    def _write(self, batch: dict[str, datetime]) -> bool:
        try:
            self.accounts.set_last_logins(batch)
        except Exception as exc:
            if not self._failing:
                log.warning("last_login_not_recorded", accounts=len(batch),
                            error=type(exc).__name__, retry="later")
            self._failing = True
            return False
        if self._failing:
            log.info("last_login_recorded_again", accounts=len(batch))
        self._failing = False
        return True
