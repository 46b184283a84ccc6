"""Where an account's mail comes from and where it goes, as the other parts need it spelled.

The old server of an account is the per-user source an admin imported, else its domain's
`--source`; its login name is the imported one, else the domain's `--source-user` template.
From that: `source_spec` for the copy engine and the old-server login check, `source_host` for
the job queue's per-host cap, `old_server_upstream` for a session served by the old server
(the transparent cutover); `store_spec` is the new store for the copy engine and the notice.
"""

from __future__ import annotations

from migrating_proxy.config import Config
from migrating_proxy.endpoints import Endpoint, parse_endpoint
from migrating_proxy.migration.connections import AUTHZID, SourceAdmin, SourceSpec, StoreSpec
from migrating_proxy.store import Account, Domain
from migrating_proxy.upstream import Upstream


def source_login_name(template: str, address: str) -> str:
    """The old server's user name: %u whole address, %n local part, %d domain."""
    local, _, domain = address.rpartition("@")
    return template.replace("%u", address).replace("%n", local).replace("%d", domain)


def source_endpoint(domain: Domain, account: Account | None = None,
                    protocol: str | None = None) -> Endpoint:
    """The old server's service for a user: their own (imported per user), else the domain's
    service for `protocol` (a login's), else the one the copy reads (IMAP when offered)."""
    url = (account.source_url if account and account.source_url else None) \
        or domain.source_for(protocol)
    return parse_endpoint(url, allowed=("imap", "pop3"))


def source_login(domain: Domain, account: Account | None, address: str) -> str:
    """The user's login name at the old server."""
    return (account.source_login if account and account.source_login else None) \
        or source_login_name(domain.source_user, address)


def source_host(domain: Domain, account: Account | None = None) -> str:
    return source_endpoint(domain, account).host


def source_spec(domain: Domain, account: Account | None, address: str, password: str,
                protocol: str | None = None, admin: SourceAdmin | None = None) -> SourceSpec:
    """The old server to copy from (protocol None), or to check a `protocol` login at; with
    `admin`, logged in to as the user through the old server's administrator."""
    endpoint = source_endpoint(domain, account, protocol)
    return SourceSpec(
        protocol=endpoint.protocol,  # type: ignore[arg-type]
        host=endpoint.host, port=endpoint.port, tls=endpoint.tls, verify_tls=domain.verify_tls,
        login=source_login(domain, account, address), password=password, type=domain.type,
        subscribed_only=domain.subscribed_only, ca_pem=domain.source_ca, admin=admin,
    )


def source_admin(domain: Domain, password: str | None) -> SourceAdmin | None:
    """The domain's old-server administrator with its password (from the vault), if any."""
    if not domain.source_admin or password is None:
        return None
    return SourceAdmin(domain.source_admin, password, domain.source_admin_style or AUTHZID,
                       domain.source_admin_separator or "*")


def old_server_upstream(domain: Domain, account: Account, password: str,
                        protocol: str) -> Upstream | None:
    """The user's old server as the upstream of a `protocol` session (imap | pop3), with the
    user's own login and password and the domain's TLS settings; None when the old server
    does not offer that protocol."""
    endpoint = source_endpoint(domain, account, protocol)
    if endpoint.protocol != protocol:
        return None
    return Upstream.old_server(endpoint, account.address,
                               source_login(domain, account, account.address), password,
                               domain.verify_tls, domain.source_ca)


def store_spec(config: Config, address: str, user_password: str | None = None) -> StoreSpec:
    endpoint = config.backend.imap
    return StoreSpec(
        host=endpoint.host, port=endpoint.port, tls=endpoint.tls, address=address,
        master_user=config.backend.master_user or None,
        master_password=config.backend.master_password(), user_password=user_password,
    )
