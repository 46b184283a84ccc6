"""Where inbound mail for one recipient goes while its domain migrates. Plain blocking code.

Decided per recipient at RCPT time, from the account store only (no DNS, no next hop):

- an account the new store serves           -> the store (`backend.delivery`)
- an account the old server still serves (passthrough, until its switch), or no account and
  the domain migrating; relay known         -> the domain's old SMTP server (`--relay`), where
                                               the mirror passes pick the mail up
- no account, domain migrating, no relay    -> 451 4.3.0: an operator error to fix, and mail
                                               for a user who has not moved yet must not be
                                               refused for good meanwhile
- no account, domain not migrating          -> 550 5.1.1 (the user does not exist here)
- a domain this proxy does not serve        -> 550 5.7.1 (never an open relay)
- `%`, `!` or `@` in the local part of a recipient to relay -> 550 5.7.1 (old-style source
  routing, which an old server trusting the proxy might act on)

While an account is being switched (its logins held, its final pass running), its RCPT is
answered late, once the switch is decided: mail written to either side during the final pass
could be missed by it or written before it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from migrating_proxy.cacerts import VERIFIED, UpstreamTrust
from migrating_proxy.endpoints import Endpoint, EndpointError, parse_endpoint
from migrating_proxy.store.accounts import (
    Account,
    AccountStore,
    AddressError,
    normalise,
    now,
    split_address,
)
from migrating_proxy.store.cutover import aware

HOLD_POLL = 0.1  # seconds between looks at an account whose switch is under way


@dataclass(frozen=True)
class Route:
    """Either a next hop (and the address to give it) or the SMTP reply refusing the recipient."""

    address: str
    next_hop: Endpoint | None = None
    reply: str = ""  # full reply line when next_hop is None, e.g. "550 5.1.1 ..."
    trust: UpstreamTrust = VERIFIED  # the domain's TLS options apply to its relay too
    local: bool = False  # an account exists: the store, whatever the domain's state

    @property
    def accepted(self) -> bool:
        return self.next_hop is not None


def route(accounts: AccountStore, delivery: Endpoint, address: str) -> Route:
    try:
        address = normalise(address)
        _, domain_name = split_address(address)
    except AddressError:
        return Route(address, reply="553 5.1.3 Bad recipient address syntax")
    account = _after_any_switch(accounts, address)
    if account is not None and not account.served_by_old_server:
        return Route(address, delivery, local=True)
    domain = accounts.get_domain(domain_name)
    if domain is None:
        return Route(address, reply="550 5.7.1 Relaying denied")
    if account is None and not domain.migrating:
        return Route(address, reply="550 5.1.1 No such user here")
    if any(c in address.rpartition("@")[0] for c in "@%!"):
        # Old-style routing (`user%other@domain`, `host!user@domain`): an old server that
        # trusts the proxy's address might relay it anywhere. Nobody's mailbox needs it.
        return Route(address, reply="550 5.7.1 Relaying denied")
    if not domain.relay_url:
        return Route(address, reply="451 4.3.0 No relay configured for this domain, try later")
    try:
        relay = parse_endpoint(domain.relay_url, ("smtp", "lmtp"))
    except EndpointError:
        # `domain add --relay` validates; a bad row is an operator problem, not the sender's.
        return Route(address, reply="451 4.3.0 Relay misconfigured for this domain, try later")
    return Route(address, relay, trust=UpstreamTrust(domain.verify_tls, domain.source_ca))


def _after_any_switch(accounts: AccountStore, address: str,
                      sleep: Callable[[float], None] = time.sleep) -> Account | None:
    """The account, once no switch of it is under way (at most `migration.switch_hold`)."""
    account = accounts.get_account(address)
    while account is not None and account.served_by_old_server:
        until = aware(account.hold_until)
        if until is None or until <= now():
            break
        sleep(max(0.0, min(HOLD_POLL, (until - now()).total_seconds())))
        account = accounts.get_account(address)
    return account
