"""What the web console's requests share: configuration, store, vault, hasher, throttle."""

from __future__ import annotations

from dataclasses import dataclass

from migrating_proxy.admin import Actor
from migrating_proxy.admin.operations import Operations
from migrating_proxy.config import Config
from migrating_proxy.login import FailureThrottle
from migrating_proxy.passwords import PasswordHasher
from migrating_proxy.store import Store, open_store
from migrating_proxy.store.admins import AdminStore
from migrating_proxy.store.vault import Vault, load_or_create_key


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

    def close(self) -> None:
        self.hasher.close()
        self.store.close()
