"""The PROXY protocol (HAProxy's, v1 text and v2 binary) in front of every listener.

`[listen] proxy_protocol_from` names the load balancers' networks. A connection from one of
them must start with a PROXY header, and the client address in it becomes the session's peer
(`transport.getPeer()`), so throttling, the login log line and the store (IMAP ID, POP3
XCLIENT) all see the client, not the balancer. A connection from anywhere else is an ordinary
client and must not send one: a header there would be a spoofing attempt, and is refused.

Twisted's parsers (`twisted.protocols.haproxy`) read the header; this wrapper differs from
Twisted's own `HAProxyProtocolWrapper` where mail needs it to:

- the session starts only once the header is read: IMAP, POP3 and SMTP servers speak first,
  and the greeting must not go out (nor the peer be read) before the client's address is known;
- a header may arrive in pieces of any size (Twisted's wants the signature in the first read);
- a trusted sender has `idle_timeout` seconds to send it, then the connection is closed;
- with implicit TLS (imaps, pop3s) the wrapper sits outside the TLS layer: the header comes
  before the handshake, as HAProxy sends it.

`PROXY UNKNOWN` (v1) and v2's LOCAL command (a balancer's own health check) carry no client
address: the session keeps the balancer's.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

import structlog
from twisted.internet import interfaces
from twisted.protocols import policies
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._info import ProxyInfo
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from zope.interface import directlyProvides, providedBy

from migrating_proxy import metrics
from migrating_proxy.config import Network

log = structlog.get_logger(__name__)

V1_SIGNATURE = b"PROXY "
V2_SIGNATURE = V2Parser.PREFIX  # 12 bytes; the header's fixed part is 16
V2_FIXED = 16


def trusted(host: str, networks: Sequence[Network]) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


class _V1Parser(V1Parser):
    """Twisted's, plus the bare `PROXY UNKNOWN` line (no addresses) the specification allows."""

    @classmethod
    def parse(cls, line: bytes) -> ProxyInfo:
        if line == b"PROXY UNKNOWN" or line.startswith(b"PROXY UNKNOWN "):
            return ProxyInfo(line, None, None)
        return super().parse(line)


def valid_addresses(info: ProxyInfo) -> bool:
    """Twisted's v1 parser takes any word for an address ("999.0.2.1"); we don't."""
    for address in (info.source, info.destination):
        if address is None:
            continue
        try:
            ipaddress.ip_address(address.host)  # type: ignore[attr-defined]
        except ValueError:
            return False
    return True


def header_signature(data: bytes) -> bool | None:
    """Does data start with a PROXY signature? None while too short to tell."""
    for signature in (V1_SIGNATURE, V2_SIGNATURE):
        if data[:len(signature)] == signature[:len(data)]:
            return True if len(data) >= len(signature) else None
    return False


# Why a connection was refused: metric label -> log text.
REFUSALS = {
    "untrusted": "PROXY header from an address not in listen.proxy_protocol_from",
    "missing": "no PROXY header from a trusted address",
    "malformed": "malformed PROXY header",
    "timeout": "no PROXY header in time",
}


class ProxyHeaderReceiver(policies.ProtocolWrapper):
    """One connection: read (or refuse) the PROXY header, then start the wrapped session.

    mode: "header" (a trusted sender's header is due), "sniff" (an ordinary client's first
    bytes, checked for a header), "pass" (the session has the connection), "refused"."""

    factory: ProxyHeaderFactory

    def __init__(self, factory: ProxyHeaderFactory, wrappedProtocol: Any) -> None:
        super().__init__(factory, wrappedProtocol)
        self.info: ProxyInfo | None = None
        self.mode = "sniff"
        self.buffer = b""
        self.parser: _V1Parser | V2Parser | None = None
        self.deadline: Any = None

    def makeConnection(self, transport: Any) -> None:
        # ProtocolWrapper.makeConnection would start the session at once; see the module doc.
        directlyProvides(self, providedBy(transport))  # ITLSTransport for STARTTLS, ...
        self.transport = transport
        self.connected = 1
        self.factory.registerProtocol(self)
        if trusted(getattr(transport.getPeer(), "host", ""), self.factory.networks):
            self.mode = "header"
            self.deadline = self.factory.reactor.callLater(
                self.factory.timeout, self.refuse, "timeout")
        else:
            self.wrappedProtocol.makeConnection(self)

    def dataReceived(self, data: bytes) -> None:
        if self.mode == "pass":
            self.wrappedProtocol.dataReceived(data)
        elif self.mode == "header":
            self.buffer += data
            self.read_header()
        elif self.mode == "sniff":
            self.buffer += data
            self.sniff_untrusted()

    def sniff_untrusted(self) -> None:
        """An ordinary client: refuse a PROXY header, pass anything else to the session."""
        looks = header_signature(self.buffer)
        if looks is None and b"\n" not in self.buffer:
            return  # "PRO": wait for more before passing it on
        if looks:
            self.refuse("untrusted")
            return
        self.pass_on(self.buffer)

    def read_header(self) -> None:
        if self.parser is None:
            self.parser = self.choose_parser()
            if self.parser is None:
                return
        data, self.buffer = self.buffer, b""
        try:
            info, rest = self.parser.feed(data)
        except InvalidProxyHeader:
            self.refuse("malformed")
            return
        if info is None:
            return
        if not valid_addresses(info):
            self.refuse("malformed")
            return
        self.deadline.cancel()
        self.info = info
        self.wrappedProtocol.makeConnection(self)
        self.pass_on(rest or b"")

    def choose_parser(self) -> _V1Parser | V2Parser | None:
        """The parser for the header's version; None while it cannot tell (or refused)."""
        looks = header_signature(self.buffer)
        if looks is False:
            self.refuse("missing")
            return None
        if looks is None or (self.buffer.startswith(V2_SIGNATURE) and
                             len(self.buffer) < V2_FIXED):
            return None  # Twisted's V2Parser wants the 16-byte fixed part in its first feed
        return V2Parser() if self.buffer.startswith(V2_SIGNATURE) else _V1Parser()

    def pass_on(self, data: bytes) -> None:
        self.mode, self.buffer = "pass", b""
        if data:
            self.wrappedProtocol.dataReceived(data)

    def refuse(self, why: str) -> None:
        if self.deadline is not None and self.deadline.active():
            self.deadline.cancel()
        log.warning("proxy_header_refused", peer=getattr(self.transport.getPeer(), "host", ""),
                    reason=REFUSALS[why])
        metrics.proxy_header_refused(why)
        self.mode, self.buffer = "refused", b""
        self.transport.loseConnection()

    def getPeer(self) -> interfaces.IAddress:
        if self.info is not None and self.info.source is not None:
            return self.info.source
        return self.transport.getPeer()

    def getHost(self) -> interfaces.IAddress:
        if self.info is not None and self.info.destination is not None:
            return self.info.destination
        return self.transport.getHost()

    def connectionLost(self, reason: Any) -> None:
        if self.deadline is not None and self.deadline.active():
            self.deadline.cancel()
        self.factory.unregisterProtocol(self)
        if self.wrappedProtocol.transport is not None:  # the session was started
            self.wrappedProtocol.connectionLost(reason)


class ProxyHeaderFactory(policies.WrappingFactory):
    """Wraps a listener's factory: PROXY headers required from `networks`, refused elsewhere."""

    protocol = ProxyHeaderReceiver

    def __init__(self, wrapped: Any, networks: Sequence[Network], reactor: Any,
                 timeout: float) -> None:
        super().__init__(wrapped)
        self.networks = list(networks)
        self.reactor = reactor
        self.timeout = timeout
