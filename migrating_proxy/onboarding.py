"""Migrating users: proving a password at the old server, creating the account, queuing copies.

(Where an account's mail comes from and goes to, as connection specs for the copy engine and as
a session upstream, is specs.py.)

Used by the login decision (login.py) for users of domains whose migration switch is on, and by
the copy workers to finish what a login started. Everything here is blocking; callers run it in
threads or worker processes.

First login, in order, so the client's OK waits only for what the store needs to let it in:
  1. the old server accepts the password (one login there, bounded by source_timeout);
  2. one transaction: account (hash pending), vault entry, full copy job; a concurrent first
     login of the same user on any process loses the insert race and uses the winner's account;
  3. the store's user file lists the account (locked entry), so the master login works;
  -> the client gets OK and its session is relayed;
  4. in the background: hash the password and provision the real hash.
The copy worker that takes the job then inserts the notice (the queue runs one job per account
at a time, so there is exactly one inserter) and repeats step 4 if a crash interrupted it.
"""

from __future__ import annotations

import concurrent.futures
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import structlog
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from migrating_proxy import metrics
from migrating_proxy.config import Config
from migrating_proxy.migration.connections import (
    SourceAdmin,
    SourceAuthError,
    SourceSpec,
    SourceUnavailable,
    check_source_login,
)
from migrating_proxy.notice import (
    MOVED_TEMPLATE,
    insert_notice,
    load_template,
    message_id,
    render,
)
from migrating_proxy.passwords import PENDING_HASH, PasswordHasher
from migrating_proxy.provision import Provisioner, make_provisioner
from migrating_proxy.specs import source_admin, source_host, source_spec, store_spec
from migrating_proxy.store import Account, Domain, Store
from migrating_proxy.store.jobs import FULL
from migrating_proxy.store.schema import migrations
from migrating_proxy.store.vault import Vault, load_or_create_key

log = structlog.get_logger(__name__)

SWITCH_POLL = 0.1  # seconds between looks at a pre-staged account whose login waits for its switch


class OldServerVerdict:
    ACCEPTED = "accepted"
    REFUSED = "refused"
    UNREACHABLE = "unreachable"


@dataclass
class Onboarding:
    config: Config
    store: Store
    vault: Vault
    hasher: PasswordHasher
    provisioner: Provisioner

    @classmethod
    def from_config(cls, config: Config, store: Store, hash_processes: int = 0) -> Onboarding:
        provision = config.provision
        return cls(
            config=config, store=store,
            vault=Vault(store.engine, load_or_create_key(config.vault_key_path)),
            hasher=PasswordHasher(provision.scheme, provision.rounds, hash_processes),
            provisioner=make_provisioner(config.provision, store.accounts),
        )

    def __post_init__(self) -> None:
        # Step 4 of a first login runs here, off the login's critical path.
        self._background = concurrent.futures.ThreadPoolExecutor(2, "onboarding")

    # -- the old server ------------------------------------------------------------------
    def ask_old_server(self, domain: Domain, account: Account | None, address: str,
                       password: str, protocol: str | None = None) -> str:
        """Whether the old server takes the password, asked at its service for `protocol`."""
        started = time.monotonic()
        verdict = self._check_at_old_server(
            source_spec(domain, account, address, password, protocol), address)
        metrics.old_server_checked(verdict, started)
        return verdict

    def _check_at_old_server(self, spec: SourceSpec, address: str) -> str:
        try:
            check_source_login(spec, self.config.migration.source_timeout)
        except SourceAuthError:
            return OldServerVerdict.REFUSED
        except SourceUnavailable as exc:
            log.warning("old_server_unreachable", address=address, host=spec.host,
                        error=str(exc))
            return OldServerVerdict.UNREACHABLE
        return OldServerVerdict.ACCEPTED

    def source_admin(self, domain: Domain) -> SourceAdmin | None:
        """The domain's old-server admin with its password from the vault, if it has one."""
        if not domain.source_admin:
            return None
        return source_admin(domain, self.vault.get_domain(domain.name))

    # -- first login ---------------------------------------------------------------------
    def create_account(self, domain: Domain, address: str, password: str) -> Account:
        """Account + vault + job in one transaction; the existing account if we lost a race."""
        host = source_host(domain)
        try:
            with self.store.engine.begin() as conn:
                account_id = self.store.lifecycle.first_login(address, PENDING_HASH, host, conn)
                self.vault.put(account_id, password, conn)
        except IntegrityError:
            log.info("first_login_race_lost", address=address)
        # Also after a lost race: the winner may not have provisioned yet, and our session's
        # store login needs the entry now.
        self.provisioner.update(address)
        account = self.store.accounts.get_account(address)
        assert account is not None
        return account

    def hash_in_background(self, account: Account, password: str) -> None:
        self._background.submit(self._hash_quietly, account, password)

    def _hash_quietly(self, account: Account, password: str) -> None:
        try:
            self.complete_hash(account, password)
        except Exception as exc:  # the worker does it before copying
            log.warning("hashing_deferred", address=account.address, error=type(exc).__name__)

    def complete_hash(self, account: Account, password: str) -> None:
        if account.password_hash == PENDING_HASH and self.store.accounts.set_hash_if_pending(
                account.address, self.hasher.hash(password, background=True)):
            self.provisioner.update(account.address)

    def finish_onboarding(self, account: Account, password: str | None) -> None:
        """Before a copy (worker only): real hash provisioned, and the notice in the INBOX,
        once, if the store already serves the account. An account the old server still serves
        (passthrough) gets it after its switch: nothing may write to its store mailbox before
        the final pass (see `owed_after_switch`). Without a password (a pre-staged account,
        copied through the admin) the login that proved one made the hash."""
        if password is not None:
            self.complete_hash(account, password)
        if account.notice_inserted_at is None and not account.served_by_old_server:
            self.insert_notice(account)

    def owed_after_switch(self, account: Account) -> None:
        """Right after the switch: the "your mailbox has moved" notice, once."""
        if account.notice_inserted_at is None and not account.served_by_old_server:
            self.insert_notice(account)

    def insert_notice(self, account: Account) -> None:
        domain = self.store.accounts.get_domain(account.domain)
        if domain is None or not domain.notice:
            return
        old_server = source_host(domain, account)
        migration = self.config.migration
        template = (load_template(migration.moved_notice, MOVED_TEMPLATE)
                    if account.switched_at is not None else load_template(migration.notice))
        message = render(template, address=account.address, domain=account.domain,
                         old_server=old_server, account_id=account.id)
        insert_notice(store_spec(self.config, account.address), message,
                      message_id(account.id, account.domain), self.config.migration.source_timeout)
        self.store.accounts.mark_notice_inserted(account.address)

    # -- the first login of an account imported without a password (pre-stage) ------------
    def first_login_after_prestage(self, account: Account, domain: Domain) -> Account:
        """The old server has just accepted the user's password (and its hash is provisioned):
        the pass that ends the migration starts now, ahead of every pre-stage pass (it takes
        over a pre-stage pass already queued or running). In passthrough mode, an account that
        was pre-staged is switched by that pass within seconds, so the login waits for the
        switch (at most `switch_hold`) and is then served by the store; without a pre-stage
        pass to finish from it goes to the old server as any first login. The account now."""
        self.store.lifecycle.queue_pass(account.id, FULL, source_host(domain, account))
        log.info("prestaged_first_login", address=account.address)
        if not account.served_by_old_server or self._prestaged_at(account.id) is None:
            return account
        deadline = time.monotonic() + self.config.migration.switch_hold
        current: Account | None = account
        while time.monotonic() < deadline:
            current = self.store.accounts.get_account_by_id(account.id)
            if current is None or not current.served_by_old_server:
                break
            time.sleep(SWITCH_POLL)
        return current or account

    def _prestaged_at(self, account_id: int) -> datetime | None:
        with self.store.engine.connect() as conn:
            return conn.execute(select(migrations.c.prestaged_at)
                                .where(migrations.c.account_id == account_id)).scalar()

    # -- later logins --------------------------------------------------------------------
    def accept_new_password(self, account: Account, password: str) -> None:
        """The old server accepted a password our hash did not: the user changed it there."""
        self.store.accounts.set_password_hash(account.address, self.hasher.hash(password))
        self.provisioner.update(account.address)

    def maybe_resync(self, account: Account, domain: Domain, password: str) -> None:
        """Queue an incremental pass with this password, at most once per resync_interval, in
        the background: the login it comes from never waits for these writes (the database's
        write lock may be held elsewhere) and never fails because of them."""
        self._background.submit(self._resync_quietly, account, domain, password)

    def _resync_quietly(self, account: Account, domain: Domain, password: str) -> None:
        try:
            self.queue_resync(account, domain, password)
        except Exception as exc:  # the next login tries again
            log.warning("resync_not_queued", address=account.address, error=type(exc).__name__)

    def queue_resync(self, account: Account, domain: Domain, password: str) -> None:
        if self.store.jobs.active_job(account.id) is not None:
            return
        last = self._last_pass(account.id)
        interval = timedelta(seconds=self.config.migration.resync_interval)
        if last is not None and datetime.now(UTC) - last < interval:
            return
        host = source_host(domain, account)
        with self.store.engine.begin() as conn:
            self.vault.put(account.id, password, conn)
            self.store.lifecycle.queue_pass(account.id, "incremental", host, conn)
        log.info("resync_queued", address=account.address)

    def _last_pass(self, account_id: int) -> datetime | None:
        with self.store.engine.connect() as conn:
            last = conn.execute(select(migrations.c.last_pass_at)
                                .where(migrations.c.account_id == account_id)).scalar()
        if last is not None and last.tzinfo is None:  # SQLite hands back naive UTC
            last = last.replace(tzinfo=UTC)
        return last
