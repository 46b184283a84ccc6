"""Where a logged-in IMAP or POP3 session is served: the answer the login decision gives.

An `Upstream` names the server a session is relayed to and how the proxy logs in there on the
user's behalf. The front-ends connect to whatever it names and know nothing else about it
(mitmproxy's "destination is data"). Two kinds exist:

- `store`: the new store (`backend.imap` / `backend.pop3`), logged in to as the configured
  master user with the user as authorization identity, or with the user's own password when no
  master user is configured;
- `old`: the user's old server, for an account whose mailbox has not been switched to the store
  yet (the transparent cutover): the domain's source for the client's protocol, its TLS mode
  and certificate checks, the user's own login name and password.

Built by `login.py` (the decision) with the constructors below; carried to the session in the
`LoginResult`. Secrets stay out of repr.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from migrating_proxy.config import BackendConfig
from migrating_proxy.endpoints import Endpoint

if TYPE_CHECKING:
    from migrating_proxy.frontends.uidl import UidlMap

ServedBy = Literal["store", "old"]


@dataclass(frozen=True)
class Upstream:
    served_by: ServedBy
    endpoint: Endpoint  # protocol (imap | pop3), TLS mode, host, port
    address: str  # the account, canonical: the session registry's key, the logs' address
    login: str  # whose mailbox: the SASL authorization identity, or the user name to log in as
    password: str = field(repr=False)  # the master password, or the user's own
    master_user: str | None = None  # log in as this master user on `login`'s behalf
    verify_tls: bool = True  # check the server's certificate (when the endpoint uses TLS)
    ca_pem: str | None = field(default=None, repr=False)  # a private CA, beside the system's
    # Seconds during which a refused login is tried again: the account was provisioned moments
    # ago and the store may not have read its user database yet. 0: a refusal is final.
    retry_refusals_for: float = 0.0
    # An old-server session's lease (store/cutover.py): the session gives it back when its
    # connection to the old server is gone, so a switch knows when none is left.
    lease: int | None = None
    # A POP3 session at the store of an account whose old POP3 UIDLs were kept at its switch:
    # what the relay answers UIDL with (frontends/uidl.py). None: the store's own answers.
    uidls: UidlMap | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        """How logs and errors call it."""
        return "store" if self.served_by == "store" else "old server"

    @classmethod
    def store(cls, backend: BackendConfig, protocol: str, address: str, user_password: str,
              retry_refusals_for: float = 0.0) -> Upstream:
        """The new store for `protocol` (imap | pop3); the master password is read now."""
        master = backend.master_user or None
        secret = backend.master_password() if master else user_password
        return cls("store", getattr(backend, protocol), address, address, secret or "",
                   master_user=master, retry_refusals_for=retry_refusals_for)

    @classmethod
    def old_server(cls, endpoint: Endpoint, address: str, login: str, password: str,
                   verify_tls: bool = True, ca_pem: str | None = None) -> Upstream:
        """The old server's service `endpoint`, with the user's own credentials there."""
        return cls("old", endpoint, address, login, password, verify_tls=verify_tls,
                   ca_pem=ca_pem)
