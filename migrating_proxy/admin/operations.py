"""migrate, resync, stop, start, wait and the per-account outcome of each.

Each operation takes the accounts the admin named and returns one `Outcome` per account, in the
order given, so the CLI can print a row per account whatever happened to it.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from migrating_proxy.admin import Actor, audit
from migrating_proxy.config import Config
from migrating_proxy.migration.connections import (
    SourceAdmin,
    SourceAuthError,
    SourceUnavailable,
    check_source_login,
)
from migrating_proxy.passwords import PENDING_HASH
from migrating_proxy.specs import source_admin, source_host, source_spec
from migrating_proxy.store import Account, AccountState, Domain, JobState, Store, StoreError
from migrating_proxy.store.jobs import FULL, INCREMENTAL, PRESTAGE
from migrating_proxy.store.status import migration_status
from migrating_proxy.store.vault import Vault, load_or_create_key

VERIFY_THREADS = 8  # credential checks in flight; each is one login at an old server
POLL_SECONDS = 0.5
SETTLED_JOB_STATES = (None, JobState.PAUSED, "pausing")  # nothing more will happen without an admin
NO_PASSWORD = ("no stored password: import the user's password again, or wait for the user's "
               "next login")
NO_ADMIN = ("the domain has no old-server admin credentials: pre-stage needs "
            "domain set --source-admin")


@dataclass(frozen=True)
class Outcome:
    address: str
    result: str  # queued | error | skipped | paused | resumed
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def select_accounts(store: Store, addresses: list[str], domain: str | None,
                    every: bool) -> list[Account]:
    """The migrating accounts an admin named: addresses, a domain, or --all (exactly one)."""
    if sum((bool(addresses), domain is not None, every)) != 1:
        raise StoreError("name accounts, or give --domain DOMAIN or --all")
    if domain is not None:
        if store.accounts.get_domain(domain) is None:
            raise StoreError(f"unknown domain {domain}")
        return store.accounts.list_migrating(domain)
    if every:
        return store.accounts.list_migrating()
    found = []
    for address in addresses:
        account = store.accounts.get_account(address)
        if account is None:
            raise StoreError(f"unknown account {address}")
        found.append(account)
    return found


@dataclass
class Operations:
    config: Config
    store: Store
    vault: Vault
    actor: Actor = field(default_factory=Actor.command_line)

    @classmethod
    def open(cls, config: Config, store: Store, actor: Actor | None = None) -> Operations:
        vault = Vault(store.engine, load_or_create_key(config.vault_key_path))
        return cls(config, store, vault, actor or Actor.command_line())

    # -- migrate -------------------------------------------------------------------------
    def migrate(self, targets: list[Account]) -> list[Outcome]:
        """Verify each user's password at the old server, then queue a full pass.

        Checked in parallel and before anything is queued, so a wrong password fails in
        seconds (state ERROR, reason in `status`) instead of after a worker's retries.
        """
        outcomes: dict[str, Outcome] = {}
        ready: list[tuple[Account, Domain, str]] = []
        for account in targets:
            domain, password = self._domain(account), self.vault.get(account.id)
            reason = _why_not_migrate(account, self._active(account), domain, password)
            if reason:
                outcomes[account.address] = Outcome(account.address, "skipped", reason)
            else:
                assert domain is not None and password is not None
                ready.append((account, domain, password))
        return self._check_then_queue("migrate", targets, outcomes, ready, self._verify, FULL)

    def _check_then_queue(self, action: str, targets: list[Account],
                          outcomes: dict[str, Outcome], ready: list[tuple[Account, Domain, Any]],
                          verify: Callable[..., tuple[str | None, bool]],
                          kind: str) -> list[Outcome]:
        """Check each ready account's credentials at the old server (in parallel), then queue
        a `kind` pass for each one accepted; a refused one is ERROR with the reason."""
        with concurrent.futures.ThreadPoolExecutor(VERIFY_THREADS) as pool:
            verdicts = list(pool.map(lambda item: verify(*item), ready))
        for (account, domain, _), (error, refused) in zip(ready, verdicts, strict=True):
            if error:
                self._fail(account, domain, error, erase=refused)
                outcomes[account.address] = Outcome(account.address, "error", error)
            else:
                self._queue(account, domain, kind)
                outcomes[account.address] = Outcome(account.address, "queued")
        return self._audited(action, targets, outcomes)

    def _verify(self, account: Account, domain: Domain, password: str) -> tuple[str | None, bool]:
        """(error, the old server refused the password) of one credential check."""
        spec = source_spec(domain, account, account.address, password)
        try:
            check_source_login(spec, self.config.migration.source_timeout)
        except SourceAuthError:
            return "the old server refused the password", True
        except SourceUnavailable as exc:
            return f"old server unreachable: {exc}", False
        return None, False

    # -- pre-stage -----------------------------------------------------------------------
    def prestage(self, targets: list[Account]) -> list[Outcome]:
        """`migrate --prestage`: queue a pre-stage pass of each account through the domain's
        old-server admin, after one login as the user through it (in parallel, like
        `migrate`'s checks): a user the old server does not know ends in ERROR at once."""
        outcomes: dict[str, Outcome] = {}
        ready: list[tuple[Account, Domain, SourceAdmin]] = []
        for account in targets:
            domain = self._domain(account)
            reason = _why_not_prestage(account, self._active(account), domain)
            admin = self._admin(domain) if reason is None and domain is not None else None
            if reason is None and admin is None:
                reason = NO_ADMIN
            if reason:
                outcomes[account.address] = Outcome(account.address, "skipped", reason)
            else:
                assert domain is not None and admin is not None
                ready.append((account, domain, admin))
        return self._check_then_queue("prestage", targets, outcomes, ready, self._verify_admin,
                                      PRESTAGE)

    def _verify_admin(self, account: Account, domain: Domain,
                      admin: SourceAdmin) -> tuple[str | None, bool]:
        """(error, False): a refusal is about the admin or the user, never a password of
        the user's to erase."""
        spec = source_spec(domain, account, account.address, "", admin=admin)
        try:
            check_source_login(spec, self.config.migration.source_timeout)
        except SourceAuthError as exc:
            return f"the old server refused the admin's login as {spec.login}: {exc}", False
        except SourceUnavailable as exc:
            return f"old server unreachable: {exc}", False
        return None, False

    def _admin(self, domain: Domain) -> SourceAdmin | None:
        return source_admin(domain, self.vault.get_domain(domain.name)) \
            if domain.source_admin else None

    def _fail(self, account: Account, domain: Domain, error: str, erase: bool) -> None:
        self.store.lifecycle.check_failed(account.id, source_host(domain, account), error)
        if erase:  # a password the old server refuses is of no use to anyone
            self.vault.erase(account.id)

    def _queue(self, account: Account, domain: Domain, kind: str) -> None:
        self.store.lifecycle.queue_pass(account.id, kind, source_host(domain, account))

    # -- resync --------------------------------------------------------------------------
    def resync(self, targets: list[Account], final: bool = False) -> list[Outcome]:
        """Queue an incremental pass for each account that has been migrated (or tried).

        `final` (finish): never a pre-stage pass, which would leave a passthrough account on
        the old server; a pass through the admin that ends in the switch instead."""
        outcomes = {}
        for account in targets:
            domain = self._domain(account)
            reason = _why_not_resync(account, self._active(account), domain)
            kind = INCREMENTAL
            if reason is None and self.vault.get(account.id) is None:
                assert domain is not None
                # Without the user's password the admin copies: for an account whose user has
                # not logged in yet, that is an incremental pre-stage pass.
                kind = PRESTAGE if account.password_hash == PENDING_HASH and not final \
                    else INCREMENTAL
                reason = None if self._admin(domain) is not None else NO_PASSWORD
            if reason:
                outcomes[account.address] = Outcome(account.address, "skipped", reason)
                continue
            assert domain is not None
            self._queue(account, domain, kind)
            outcomes[account.address] = Outcome(account.address, "queued")
        return self._audited("resync", targets, outcomes)

    def resync_due(self) -> int:
        """Queue a pass for migrated accounts of migrating domains whose last pass is older
        than resync_interval and whose password was kept; returns how many were queued."""
        horizon = datetime.now(UTC) - timedelta(seconds=self.config.migration.resync_interval)
        rows = migration_status(self.store.engine)
        stale = {row["address"] for row in rows if row["state"] == AccountState.COMPLETED
                 and (row["last_pass_at"] is None
                      or datetime.fromisoformat(row["last_pass_at"]) < horizon)}
        due = [account for account in self.store.accounts.list_migrating()
               if account.address in stale and (domain := self._domain(account)) is not None
               and domain.migrating and self.vault.get(account.id) is not None]
        if not due:
            return 0
        return sum(outcome.result == "queued" for outcome in self.resync(due))

    # -- stop / start --------------------------------------------------------------------
    def stop(self, targets: list[Account]) -> list[Outcome]:
        return self._switch("stop", targets, self.store.jobs.pause, "paused",
                            "no queued or running pass")

    def start(self, targets: list[Account]) -> list[Outcome]:
        return self._switch("start", targets, self.store.jobs.resume, "resumed",
                            "no paused pass")

    def _switch(self, action: str, targets: list[Account],
                change: Callable[[list[int]], Collection[int]], done: str,
                otherwise: str) -> list[Outcome]:
        changed = change([a.id for a in targets])
        outcomes = {a.address: Outcome(a.address, done) if a.id in changed else
                    Outcome(a.address, "skipped", otherwise) for a in targets}
        return self._audited(action, targets, outcomes)

    # -- waiting -------------------------------------------------------------------------
    def wait(self, addresses: list[str],
             on_tick: Callable[[list[dict[str, Any]]], None] | None = None
             ) -> list[dict[str, Any]]:
        """Poll `status` until no account has a queued or running pass; the final rows.

        Paused passes count as settled: they wait for an admin's `start`.
        """
        while True:
            rows = migration_status(self.store.engine, addresses) if addresses else []
            if on_tick:
                on_tick(rows)
            if all(row["job_state"] in SETTLED_JOB_STATES for row in rows):
                return rows
            time.sleep(POLL_SECONDS)

    # -- helpers -------------------------------------------------------------------------
    def _domain(self, account: Account) -> Domain | None:
        return self.store.accounts.get_domain(account.domain)

    def _active(self, account: Account) -> str | None:
        job = self.store.jobs.active_job(account.id)
        return job.state if job else None

    def _audited(self, action: str, targets: list[Account],
                 outcomes: dict[str, Outcome]) -> list[Outcome]:
        ordered = [outcomes[a.address] for a in targets]
        counts: dict[str, int] = {}
        for outcome in ordered:
            counts[outcome.result] = counts.get(outcome.result, 0) + 1
        audit(self.store.engine, self.actor, action, accounts=[a.address for a in targets],
              results=counts)
        return ordered


def _why_not_migrate(account: Account, active: str | None, domain: Domain | None,
                     password: str | None) -> str | None:
    if account.migration_state is None:
        return "a local account, not a migrating one"
    if account.migration_state is AccountState.COMPLETED:
        return "already migrated; use resync for mail that arrived since"
    if active:
        return f"a pass is already {active}"
    if domain is None:
        return f"domain {account.domain} is not configured"
    return NO_PASSWORD if password is None else None


def _why_not_prestage(account: Account, active: str | None,
                      domain: Domain | None) -> str | None:
    if account.migration_state is None:
        return "a local account, not a migrating one"
    if account.migration_state is AccountState.COMPLETED or account.switched_at is not None:
        return "already migrated; use resync for mail that arrived since"
    if active:
        return f"a pass is already {active}"
    return f"domain {account.domain} is not configured" if domain is None else None


def _why_not_resync(account: Account, active: str | None, domain: Domain | None) -> str | None:
    if account.migration_state is None:
        return "a local account, not a migrating one"
    if account.migration_state is AccountState.NEW:
        return "never migrated; use migrate"
    if active:
        return f"a pass is already {active}"
    return f"domain {account.domain} is not configured" if domain is None else None
