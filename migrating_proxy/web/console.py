"""What the web console's requests share: configuration, store, vault, hasher, throttle."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from migrating_proxy.admin import Actor, views
from migrating_proxy.admin.operations import Operations
from migrating_proxy.config import Config
from migrating_proxy.passwords import PasswordHasher
from migrating_proxy.store import Store, open_store
from migrating_proxy.store.admins import AdminStore
from migrating_proxy.store.vault import Vault, load_or_create_key
from migrating_proxy.throttle import FailureThrottle

TOTALS_MAX_AGE = 2.0  # seconds


@dataclass
class Console:
    config: Config
    store: Store
    admins: AdminStore
    vault: Vault
    # Admin logins hash in a child process: a strong hash holds the GIL for a quarter second.
    hasher: PasswordHasher
    # Failed logins counted per peer and per user, with the mail front-ends' limits.
    throttle: FailureThrottle
    _totals: tuple[float, dict[str, dict[str, Any]]] | None = field(default=None, repr=False)
    _totals_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def open(cls, config: Config) -> Console:
        store = open_store(config.database_url)
        limits = config.limits
        return cls(
            config=config, store=store, admins=AdminStore(store.engine),
            vault=Vault(store.engine, load_or_create_key(config.vault_key_path)),
            hasher=PasswordHasher(config.provision.scheme, config.provision.rounds, processes=1),
            throttle=FailureThrottle(limits.throttle_window, limits.max_failures_per_peer,
                                     limits.max_failures_per_account),
        )

    @property
    def tls(self) -> bool:
        return self.config.tls.enabled

    def operations(self, actor: Actor) -> Operations:
        return Operations(self.config, self.store, self.vault, actor)

    def totals(self) -> dict[str, dict[str, Any]]:
        """Per-domain totals, recomputed at most every TOTALS_MAX_AGE seconds: summing a
        100,000-account domain costs a table scan, and every open page asks as often as it
        refreshes (POLL_MS in app.js), so viewers share one computation."""
        with self._totals_lock:
            if self._totals is None or time.monotonic() - self._totals[0] > TOTALS_MAX_AGE:
                self._totals = (time.monotonic(), views.totals(self.store))
            return self._totals[1]

    def forget_totals(self) -> None:
        """After a change an admin will want to see at once (a domain added or switched)."""
        with self._totals_lock:
            self._totals = None

    def close(self) -> None:
        self.hasher.close()
        self.store.close()
