"""Where inbound mail for one recipient goes while its domain migrates. Plain blocking code.

Decided per recipient at RCPT time, from the account store only (no DNS, no next hop):

- an account exists on the new store        -> the store (`backend.delivery`)
- no account, domain migrating, relay known -> the domain's old SMTP server (`--relay`)
- no account, domain migrating, no relay    -> 451 4.3.0: an operator error to fix, and mail
                                               for a user who has not moved yet must not be
                                               refused for good meanwhile
- no account, domain not migrating          -> 550 5.1.1 (the user does not exist here)
- a domain this proxy does not serve        -> 550 5.7.1 (never an open relay)
- `%`, `!` or `@` in the local part of a recipient to relay -> 550 5.7.1 (old-style source
  routing, which an old server trusting the proxy might act on)
"""

from __future__ import annotations

from dataclasses import dataclass

from migrating_proxy.endpoints import Endpoint, EndpointError, parse_endpoint
from migrating_proxy.store.accounts import AccountStore, AddressError, normalise, split_address


@dataclass(frozen=True)
class Route:
    """Either a next hop (and the address to give it) or the SMTP reply refusing the recipient."""

    address: str
    next_hop: Endpoint | None = None
    reply: str = ""  # full reply line when next_hop is None, e.g. "550 5.1.1 ..."
    verify_tls: bool = True  # the domain's --no-verify-tls applies to its relay too
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
    if accounts.get_account(address) is not None:
        return Route(address, delivery, local=True)
    domain = accounts.get_domain(domain_name)
    if domain is None:
        return Route(address, reply="550 5.7.1 Relaying denied")
    if not domain.migrating:
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
    return Route(address, relay, verify_tls=domain.verify_tls)
