"""Mail server addresses written as URLs: `imap://`, `imaps://`, `pop3+starttls://` ...

One parser for every place an operator names a server (backend, domain sources, relays), so the
spelling rules and the default ports are the same everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

TLSMode = Literal["none", "starttls", "implicit"]

# scheme -> (protocol, TLS mode, default port)
SCHEMES: dict[str, tuple[str, TLSMode, int]] = {
    "imap": ("imap", "none", 143),
    "imap+starttls": ("imap", "starttls", 143),
    "imaps": ("imap", "implicit", 993),
    "pop3": ("pop3", "none", 110),
    "pop3+starttls": ("pop3", "starttls", 110),
    "pop3s": ("pop3", "implicit", 995),
    "smtp": ("smtp", "none", 25),
    "smtp+starttls": ("smtp", "starttls", 25),
    "smtps": ("smtp", "implicit", 465),
    "lmtp": ("lmtp", "none", 24),
}


class EndpointError(ValueError):
    """An address an operator wrote that does not name a server we can talk to."""


@dataclass(frozen=True)
class Endpoint:
    protocol: str  # imap | pop3 | smtp | lmtp
    tls: TLSMode
    host: str
    port: int

    @property
    def url(self) -> str:
        scheme = next(
            name for name, (proto, tls, _) in SCHEMES.items()
            if proto == self.protocol and tls == self.tls
        )
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"


def parse_endpoint(url: str, allowed: tuple[str, ...] | None = None) -> Endpoint:
    """Parse `scheme://host[:port]`; `allowed` restricts the protocols (e.g. ("imap", "pop3"))."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise EndpointError(f"{url!r} is not a valid URL: {exc}") from None
    if parts.scheme not in SCHEMES:
        names = ", ".join(f"{s}://" for s in SCHEMES if allowed is None or SCHEMES[s][0] in allowed)
        raise EndpointError(f"{url!r}: scheme must be one of {names}")
    protocol, tls, default_port = SCHEMES[parts.scheme]
    if allowed is not None and protocol not in allowed:
        raise EndpointError(f"{url!r}: must be one of {', '.join(allowed)}")
    if not parts.hostname:
        raise EndpointError(f"{url!r}: no host")
    if parts.username or parts.password or parts.path not in ("", "/") or parts.query:
        raise EndpointError(f"{url!r}: only scheme://host[:port] is allowed")
    return Endpoint(protocol, tls, parts.hostname, port or default_port)


def parse_listen(text: str) -> tuple[str, int] | None:
    """`host:port` (or `[v6]:port`) for a listener; an empty string disables it."""
    text = text.strip()
    if not text:
        return None
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise EndpointError(f"{text!r}: expected host:port")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port_text)
