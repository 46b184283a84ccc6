"""Where this process last relayed each user's sessions: a guess for the next login.

A login's upstream connection is opened when the login arrives, in parallel with the decision,
because the upstream's greeting (a Dovecot login process starting) takes about as long as the
decision itself. Before the decision only a guess is possible: the store, unless this process
last relayed the user's sessions somewhere else (a passthrough account still served by its old
server, whose every login would otherwise pay the old server's greeting after the decision).

Only a guess: the decision names the upstream as always, and a connection opened ahead to the
wrong one is dropped (what happened to every passthrough login before), after which the entry
follows the decision. Bounded, oldest first out; no credentials in it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from migrating_proxy.endpoints import Endpoint
from migrating_proxy.upstream import Upstream

DEFAULT_SIZE = 10_000  # users remembered per process


@dataclass(frozen=True)
class Hint:
    endpoint: Endpoint
    name: str
    verify_tls: bool
    ca_pem: str | None


class UpstreamHints:
    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        self.size = size
        self._hints: OrderedDict[tuple[str, str], Hint] = OrderedDict()

    @staticmethod
    def _key(protocol: str, username: str) -> tuple[str, str]:
        return protocol, username.strip().lower()

    def get(self, protocol: str, username: str) -> Hint | None:
        """Where the user's last session of this protocol went, if not to the store."""
        return self._hints.get(self._key(protocol, username))

    def remember(self, protocol: str, username: str, upstream: Upstream) -> None:
        key = self._key(protocol, username)
        if upstream.served_by == "store":  # the default guess: nothing to remember
            self._hints.pop(key, None)
            return
        self._hints[key] = Hint(upstream.endpoint, upstream.name, upstream.verify_tls,
                                upstream.ca_pem)
        self._hints.move_to_end(key)
        while len(self._hints) > self.size:
            self._hints.popitem(last=False)
