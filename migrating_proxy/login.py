"""The login decision, shared by every protocol: local account, old server, or refuse.

Front-ends parse their protocol's login dialogue, build `Credentials` and call
`LoginService.authenticate` in a worker thread (it blocks: database, password hashing, and for
migrating domains a login at the old server). The answer is a `LoginResult`; the front-end turns
it into its protocol's words and, on success, relays the session to the `Upstream` it names:
where a session is served is decided here too, once (`LoginService.placement`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum

import structlog

from migrating_proxy import metrics
from migrating_proxy.config import BackendConfig
from migrating_proxy.onboarding import OldServerVerdict, Onboarding
from migrating_proxy.passwords import PENDING_HASH, PasswordHasher
from migrating_proxy.specs import old_server_upstream
from migrating_proxy.store import Account, AddressError, Domain, Store, normalise
from migrating_proxy.store.accounts import now
from migrating_proxy.store.pop3uidls import Pop3Uidls
from migrating_proxy.throttle import FailureThrottle
from migrating_proxy.upstream import Upstream

log = structlog.get_logger(__name__)


class Outcome(Enum):
    OK = "ok"
    FAILED = "failed"  # wrong password, unknown user: the same answer for both
    UNAVAILABLE = "unavailable"  # we could not decide (database, old server down): try later
    THROTTLED = "throttled"  # too many recent failures from this peer or for this account


RELAYED_PROTOCOLS = ("imap", "pop3")  # sessions that continue at an upstream after login


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)
    protocol: str = "imap"  # imap | pop3 | submission
    peer: str = ""


@dataclass(frozen=True)
class LoginResult:
    outcome: Outcome
    address: str | None = None  # the account's canonical address
    reason: str = ""  # for the log only; never shown to the client, never a secret
    # Where the session is served (OK results of IMAP and POP3 logins only).
    upstream: Upstream | None = None

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.OK


@dataclass(frozen=True)
class Placement:
    """What the decision knows when it chooses an upstream for an accepted login."""

    account: Account  # as it was read at the start of the decision
    domain: Domain | None
    credentials: Credentials
    just_provisioned: bool  # the store's entry was written by this very decision


def on_the_store(backend: BackendConfig) -> Callable[[Placement], Upstream]:
    """Today's placement: every session is served by the new store."""

    def place(placement: Placement) -> Upstream:
        creds = placement.credentials
        grace = JUST_PROVISIONED_GRACE if placement.just_provisioned else 0.0
        return Upstream.store(backend, creds.protocol, placement.account.address,
                              creds.password, retry_refusals_for=grace)

    return place


HOLD_POLL = 0.05  # seconds between looks at an account whose switch holds its logins


def by_cutover(backend: BackendConfig, store: Store, process: str,
               sleep: Callable[[float], None] = time.sleep) -> Callable[[Placement], Upstream]:
    """The transparent cutover's placement (issue 9).

    An account the old server still serves (passthrough, not switched yet) has its session
    relayed to the old server's service for the client's protocol, with the user's own
    credentials and the domain's TLS settings, under a lease that lets a switch know when such
    sessions are gone (store/cutover.py). A login that arrives while the account's switch holds
    it waits for the outcome (at most `migration.switch_hold`) and goes where that says: held,
    not refused. A protocol the old server does not offer, and every other account, is served
    by the store (`on_the_store`).
    """
    on_store = on_the_store(backend)

    def place(placement: Placement) -> Upstream:
        account, creds = placement.account, placement.credentials
        held_since: float | None = None
        upstream: Upstream | None = None
        while account.served_by_old_server and placement.domain is not None:
            held = store.cutover.held_until(account.address)
            if held is not None:
                held_since = held_since or time.monotonic()
                sleep(min(HOLD_POLL, max(0.0, (held - now()).total_seconds())))
            else:
                upstream = old_server_upstream(placement.domain, account, creds.password,
                                               creds.protocol)
                if upstream is None:  # a protocol the old server does not offer
                    break
                lease = store.cutover.lease(account.id, process)
                if lease is not None:
                    upstream = replace(upstream, lease=lease)
                    break
                upstream = None
            current = store.accounts.get_account_by_id(account.id)
            if current is None:  # removed meanwhile: the store refuses the login
                break
            account = current
        upstream = upstream or on_store(replace(placement, account=account))
        if upstream.served_by == "store" and creds.protocol == "pop3" and account.switched_at:
            # The old server's UIDLs, kept at the switch, for the relay to answer UIDL with.
            upstream = replace(upstream, uidls=Pop3Uidls(store.engine).translation(account.id))
        if held_since is not None:
            log.info("login_held", address=account.address, served_by=upstream.served_by,
                     waited_ms=round((time.monotonic() - held_since) * 1000, 1))
        return upstream

    return place


# A first login must never fail because the store has not read the account it was just given:
# Dovecot re-reads a changed passwd-file at most once a second (provision.kind = "passwd-file"
# with a burst of first logins), and without a master user the store knows the password only
# once the background hash is provisioned. So the store login of an account provisioned by the
# same decision is tried again when refused, for this long (a refusal takes Dovecot its
# auth_failure_delay, 2 s by default, so this allows a second try even then).
JUST_PROVISIONED_GRACE = 5.0


class LoginService:
    """The decision. `onboarding` is None when no migration is configured (plain proxy).

    `placement` chooses the upstream of every accepted IMAP or POP3 login (`on_the_store` by
    default); the transparent cutover replaces it with one that names the old server for
    accounts not switched yet."""

    def __init__(self, store: Store, hasher: PasswordHasher, throttle: FailureThrottle,
                 onboarding: Onboarding | None = None,
                 on_rehash: Callable[[str], None] | None = None, *,
                 backend: BackendConfig | None = None,
                 placement: Callable[[Placement], Upstream] | None = None) -> None:
        self.store = store
        self.accounts = store.accounts
        self.hasher = hasher
        self.throttle = throttle
        self.onboarding = onboarding
        self.on_rehash = on_rehash  # provisioning re-sync after a hash upgrade
        self.placement = placement or on_the_store(backend or BackendConfig())

    def authenticate(self, creds: Credentials) -> LoginResult:
        """Blocking; call from a worker thread. Never raises for bad input."""
        try:
            address = normalise(creds.username)
        except AddressError as exc:
            # Counted like a wrong password: a spray of junk names costs the peer too.
            junk = self.throttle.reserve(creds.peer, creds.username.lower()[:320])
            if junk is None:
                return LoginResult(Outcome.THROTTLED, reason="too many recent failures")
            self.throttle.failed(junk)
            return LoginResult(Outcome.FAILED, reason=f"invalid username: {exc}")
        # The slot is taken before the password is looked at and counts against the limits
        # until settled: simultaneous guesses cannot slip past them while others are checked.
        attempt = self.throttle.reserve(creds.peer, address.lower())
        if attempt is None:
            return LoginResult(Outcome.THROTTLED, address, "too many recent failures")
        try:
            result = self._decide(address, creds)
        except Exception as exc:  # database trouble: don't guess, ask the client to retry
            self.throttle.cancel(attempt)
            log.error("login_error", address=address, error=type(exc).__name__)
            reason = f"internal error: {type(exc).__name__}"
            return LoginResult(Outcome.UNAVAILABLE, address, reason)
        if result.ok:
            self.throttle.succeeded(attempt)
        elif result.outcome is Outcome.FAILED:
            self.throttle.failed(attempt)
        else:
            self.throttle.cancel(attempt)  # undecided: no password was found wrong
        return result

    def _decide(self, address: str, creds: Credentials) -> LoginResult:
        password = creds.password
        account, domain = self.accounts.get_account_and_domain(address)
        migrating = self.onboarding is not None and domain is not None and domain.migrating
        if account is None:
            if not migrating:
                return LoginResult(Outcome.FAILED, address, "unknown user")
            assert domain is not None
            started = time.monotonic()
            result = self._first_login(domain, address, creds)
            metrics.first_login(result.outcome.value, started)
            return result
        provisioned = account.password_hash == PENDING_HASH
        if not self._password_matches(account, password):
            if not (migrating and account.migration_state is not None):
                return LoginResult(Outcome.FAILED, account.address, "wrong password")
            assert domain is not None
            refused = self._recheck_at_old_server(domain, account, password, creds.protocol)
            if refused is not None:
                return refused
            provisioned = True  # the new hash was just provisioned
            if account.password_hash == PENDING_HASH:  # imported without one: pre-stage
                assert self.onboarding is not None
                account = self.onboarding.first_login_after_prestage(account, domain)
        self.store.last_logins.note(account.address)  # written in the background
        if migrating and account.migration_state is not None:
            assert self.onboarding is not None and domain is not None
            self.onboarding.maybe_resync(account, domain, password)
        return self._accepted(account, domain, creds, "local account", provisioned)

    def _accepted(self, account: Account, domain: Domain | None, creds: Credentials,
                  reason: str, just_provisioned: bool) -> LoginResult:
        upstream = None
        if creds.protocol in RELAYED_PROTOCOLS:
            upstream = self.placement(Placement(account, domain, creds, just_provisioned))
        return LoginResult(Outcome.OK, account.address, reason, upstream)

    def _password_matches(self, account: Account, password: str) -> bool:
        if account.password_hash == PENDING_HASH:
            # First login moments ago; its hash is still being made. The vault has the password.
            if self.onboarding is None or not self.onboarding.vault.matches(account.id, password):
                return False
            # That first login may not have provisioned the store yet (it commits first): make
            # sure the store knows the account before this session logs in there.
            self.onboarding.provisioner.update(account.address)
            return True
        verification = self.hasher.verify(password, account.password_hash)
        if verification.ok and verification.new_hash:
            self.accounts.set_password_hash(account.address, verification.new_hash)
            if self.on_rehash:
                self.on_rehash(account.address)
        return verification.ok

    def _recheck_at_old_server(self, domain: Domain, account: Account, password: str,
                               protocol: str) -> LoginResult | None:
        """The user may have changed the password at the old server: accept only if it does."""
        assert self.onboarding is not None
        verdict = self.onboarding.ask_old_server(domain, account, account.address, password,
                                                 protocol)
        if verdict != OldServerVerdict.ACCEPTED:
            return LoginResult(Outcome.FAILED, account.address, f"wrong password (old server "
                               f"{verdict})")
        self.onboarding.accept_new_password(account, password)
        return None

    def _first_login(self, domain: Domain, address: str, creds: Credentials) -> LoginResult:
        assert self.onboarding is not None
        password = creds.password
        verdict = self.onboarding.ask_old_server(domain, None, address, password,
                                                 creds.protocol)
        if verdict == OldServerVerdict.REFUSED:
            return LoginResult(Outcome.FAILED, address, "old server refused the password")
        if verdict == OldServerVerdict.UNREACHABLE:
            return LoginResult(Outcome.UNAVAILABLE, address, "old server unreachable")
        account = self.onboarding.create_account(domain, address, password)
        if not self._password_matches(account, password):
            # Lost a race against a first login with another password that the old server
            # also accepted moments ago (changed meanwhile): the winner's password stands.
            return LoginResult(Outcome.FAILED, account.address, "concurrent first login")
        self.store.last_logins.note(account.address)  # written in the background
        self.onboarding.hash_in_background(account, password)
        return self._accepted(account, domain, creds, "first login: migration started", True)
