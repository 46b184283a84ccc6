"""`[listen] proxy_protocol_from`: a real HAProxy in front of the proxy (v1 and v2, plain and
implicit TLS), and hand-made headers for what HAProxy never sends.

HAProxy connects to the proxy from 127.0.0.1, the only trusted network here; each client
connects to HAProxy from an address of its own in 127.0.0.0/8, so the tests can tell the
client's address from the balancer's in the proxy's log, its throttle and Dovecot's log.
"""

from __future__ import annotations

import contextlib
import imaplib
import json
import poplib
import smtplib
import socket
import ssl
import struct
import time
from collections.abc import Iterator
from typing import Any

import pytest

from migrating_proxy.frontends.proxyheader import REFUSALS
from tests.support.dovecot import DovecotInstance, free_port
from tests.support.haproxy import haproxy
from tests.support.metrics import scrape, value
from tests.support.proxy import Proxy, wait_for
from tests.support.tls import TLSFiles, client_context

ALICE, PASSWORD = "alice@new.example", "alice-pw"
MAX_FAILURES_PER_PEER = 3
HEADER_TIMEOUT = 2.0


class FromAddress:
    """imaplib/poplib clients that connect from a chosen loopback address."""

    source = "127.0.0.1"

    def _create_socket(self, timeout: Any) -> socket.socket:
        host, port = self.host, self.port  # type: ignore[attr-defined]
        sock = socket.create_connection((host, port), timeout, source_address=(self.source, 0))
        # IMAP4_SSL keeps its context as ssl_context, POP3_SSL as context.
        tls = getattr(self, "ssl_context", None) or getattr(self, "context", None)
        return tls.wrap_socket(sock, server_hostname=host) if tls else sock


def imap_from(source: str, port: int, tls: ssl.SSLContext | None = None) -> imaplib.IMAP4:
    base = imaplib.IMAP4_SSL if tls else imaplib.IMAP4
    cls = type("IMAP4From", (FromAddress, base), {"source": source})
    return cls("127.0.0.1", port, ssl_context=tls) if tls else cls("127.0.0.1", port)


def pop3_from(source: str, port: int) -> poplib.POP3:
    cls = type("POP3From", (FromAddress, poplib.POP3), {"source": source})
    return cls("127.0.0.1", port, timeout=10)


def login_events(proxy: Proxy, peer: str) -> list[dict[str, Any]]:
    events = [json.loads(line) for line in proxy.log_text().splitlines() if line.startswith("{")]
    return [e for e in events if e.get("event") == "login" and e.get("peer") == peer]


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, module_store: DovecotInstance,
          tls_files: TLSFiles) -> Iterator[Proxy]:
    ports = {"smtp": free_port(), "metrics": free_port()}
    proxy = Proxy(tmp_path_factory.mktemp("pp") / "proxy", module_store, tls=tls_files,
                  overrides={
                      "listen": {"smtp": f"127.0.0.1:{ports['smtp']}",
                                 "proxy_protocol_from": ["127.0.0.1/32"]},
                      "metrics": {"listen": f"127.0.0.1:{ports['metrics']}"},
                      "backend": {"delivery": f"lmtp://127.0.0.1:{module_store.lmtp_port}"},
                      "limits": {"max_failures_per_peer": MAX_FAILURES_PER_PEER,
                                 "idle_timeout": HEADER_TIMEOUT},
                  })
    proxy.ports.update(ports)
    proxy.add_account(ALICE, PASSWORD)
    with proxy:
        yield proxy


@pytest.fixture(scope="module")
def balancer(tmp_path_factory: pytest.TempPathFactory, proxy: Proxy) -> Iterator[dict[str, int]]:
    routes = {
        "imap_v1": (proxy.ports["imap"], "send-proxy"),
        "imap_v2": (proxy.ports["imap"], "send-proxy-v2"),
        "imaps_v2": (proxy.ports["imaps"], "send-proxy-v2"),
        "pop3_v1": (proxy.ports["pop3"], "send-proxy"),
        "pop3s_v2": (proxy.ports["pop3s"], "send-proxy-v2"),
        "smtp_v2": (proxy.ports["smtp"], "send-proxy-v2"),
    }
    with haproxy(tmp_path_factory.mktemp("haproxy"), routes) as ports:
        yield ports


@pytest.mark.parametrize(("route", "client"), [
    ("imap_v1", "127.0.0.5"), ("imap_v2", "127.0.0.6"), ("imaps_v2", "127.0.0.7")])
def test_imap_behind_haproxy_sees_the_client_address(
        proxy: Proxy, balancer: dict[str, int], module_store: DovecotInstance,
        tls_files: TLSFiles, route: str, client: str) -> None:
    tls = client_context(tls_files) if route.startswith("imaps") else None
    imap = imap_from(client, balancer[route], tls)
    imap.login(ALICE, PASSWORD)
    assert imap.select("INBOX")[0] == "OK"
    imap.logout()
    [event] = login_events(proxy, client)
    assert event["outcome"] == "ok" and event["address"] == ALICE
    # The store logs the client too (the proxy's IMAP ID x-originating-ip; trusted network).
    assert_store_logged(module_store, "imap", client)


def test_starttls_behind_haproxy(proxy: Proxy, balancer: dict[str, int],
                                 tls_files: TLSFiles) -> None:
    client = "127.0.0.13"
    imap = imap_from(client, balancer["imap_v1"])
    imap.starttls(client_context(tls_files))
    imap.login(ALICE, PASSWORD)
    imap.logout()
    [event] = login_events(proxy, client)
    assert event["outcome"] == "ok" and event["tls"] is True


@pytest.mark.parametrize(("route", "client"), [("pop3_v1", "127.0.0.8"),
                                               ("pop3s_v2", "127.0.0.9")])
def test_pop3_behind_haproxy_sees_the_client_address(
        proxy: Proxy, balancer: dict[str, int], module_store: DovecotInstance,
        tls_files: TLSFiles, route: str, client: str) -> None:
    if route == "pop3s_v2":
        cls = type("POP3SFrom", (FromAddress, poplib.POP3_SSL), {"source": client})
        pop = cls("127.0.0.1", balancer[route], context=client_context(tls_files), timeout=10)
    else:
        pop = pop3_from(client, balancer[route])
    pop.user(ALICE)
    pop.pass_(PASSWORD)
    pop.stat()
    pop.quit()
    [event] = login_events(proxy, client)
    assert event["outcome"] == "ok" and event["protocol"] == "pop3"
    assert_store_logged(module_store, "pop3", client)


def assert_store_logged(store: DovecotInstance, protocol: str, client: str) -> None:
    """Dovecot's login line names the client: the proxy passed its address on."""
    wait_for(lambda: any(f"{protocol}-login: Info: Login: user=<{ALICE}>" in line
                         and f"rip={client}," in line
                         for line in store.log_path.read_text().splitlines()),
             f"Dovecot logs a {protocol} login from rip={client}")


def test_pop3_sessions_reach_the_store_with_the_client_address(
        proxy: Proxy, module_store: DovecotInstance) -> None:
    """Without a balancer too: XCLIENT, which Dovecot offers the proxy's trusted network."""
    client = "127.0.0.31"
    pop = pop3_from(client, proxy.pop3_port)
    pop.user(ALICE)
    pop.pass_(PASSWORD)
    assert pop.stat()[0] >= 0
    pop.quit()
    assert_store_logged(module_store, "pop3", client)


def test_smtp_behind_haproxy_sees_the_client_address(proxy: Proxy,
                                                     balancer: dict[str, int]) -> None:
    client = "127.0.0.10"
    with smtplib.SMTP("127.0.0.1", balancer["smtp_v2"], source_address=(client, 0),
                      timeout=10) as smtp:
        smtp.sendmail("someone@elsewhere.example", [ALICE], b"Subject: hi\r\n\r\nhi\r\n")
    events = [json.loads(line) for line in proxy.log_text().splitlines() if line.startswith("{")]
    assert [e["peer"] for e in events if e.get("event") == "smtp_message"][-1] == client


def test_throttling_counts_the_client_behind_the_balancer(proxy: Proxy,
                                                          balancer: dict[str, int]) -> None:
    attacker, neighbour = "127.0.0.11", "127.0.0.12"
    for _ in range(MAX_FAILURES_PER_PEER):
        imap = imap_from(attacker, balancer["imap_v2"])
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            imap.login(ALICE, "wrong")
        imap.shutdown()
    imap = imap_from(attacker, balancer["imap_v2"])
    with pytest.raises(imaplib.IMAP4.error, match="UNAVAILABLE"):
        imap.login(ALICE, PASSWORD)  # the right password, but this client is throttled
    imap.shutdown()
    assert login_events(proxy, attacker)[-1]["outcome"] == "throttled"
    # Another client behind the same balancer is not: the throttle counts clients, not it.
    imap = imap_from(neighbour, balancer["imap_v2"])
    imap.login(ALICE, PASSWORD)
    imap.logout()


# --- hand-made headers: what a balancer never sends --------------------------------------

def v1(source: str = "192.0.2.1", port: int = 5555) -> bytes:
    return f"PROXY TCP4 {source} 127.0.0.1 {port} 143\r\n".encode()


def v2(source: str = "192.0.2.2", command: int = 0x21) -> bytes:
    body = socket.inet_aton(source) + socket.inet_aton("127.0.0.1") + struct.pack("!HH", 5555, 143)
    return (b"\r\n\r\n\x00\r\nQUIT\n" + bytes([command, 0x11])
            + struct.pack("!H", len(body)) + body)


def raw(proxy: Proxy, source: str, *chunks: bytes, port: str = "imap") -> bytes:
    """Connect from `source`, send the chunks (a pause between), return all the proxy sent
    until it closed the connection."""
    with socket.create_connection(("127.0.0.1", proxy.ports[port]), timeout=10,
                                  source_address=(source, 0)) as sock:
        received = b""
        with contextlib.suppress(ConnectionResetError):  # the proxy may close while we send
            for chunk in chunks:
                sock.sendall(chunk)
                time.sleep(0.05)
            while data := sock.recv(4096):
                received += data
        return received


def refusals(proxy: Proxy) -> list[str]:
    events = [json.loads(line) for line in proxy.log_text().splitlines() if line.startswith("{")]
    return [e["reason"] for e in events if e.get("event") == "proxy_header_refused"]


@pytest.mark.parametrize(("name", "source", "chunks", "reason"), [
    ("untrusted v1", "127.0.0.20", [v1(), b"a LOGIN alice@new.example alice-pw\r\n"],
     "untrusted"),
    ("untrusted v2", "127.0.0.21", [v2(), b"a LOGIN alice@new.example alice-pw\r\n"],
     "untrusted"),
    ("missing", "127.0.0.1", [b"a LOGIN alice@new.example alice-pw\r\n"], "missing"),
    ("malformed v1 address", "127.0.0.1", [b"PROXY TCP4 999.0.2.1 127.0.0.1 1 143\r\n"
                                           b"a LOGIN alice@new.example alice-pw\r\n"],
     "malformed"),
    ("malformed v1 protocol", "127.0.0.1", [b"PROXY SCTP 192.0.2.1 127.0.0.1 1 143\r\n"],
     "malformed"),
    ("v1 without end", "127.0.0.1", [b"PROXY TCP4 " + b"1" * 120],
     "malformed"),
    ("malformed v2 version", "127.0.0.1", [v2(command=0x31)], "malformed"),
    ("silence", "127.0.0.1", [], "timeout"),
])
def test_bad_headers_are_refused_before_any_login(proxy: Proxy, name: str, source: str,
                                                  chunks: list[bytes], reason: str) -> None:
    before = len(refusals(proxy))
    counted = value(scrape(proxy.ports["metrics"]), "migrating_proxy_proxy_header_refusals_total",
                    reason=reason)
    logins_before = len(login_events(proxy, source)) + len(login_events(proxy, "192.0.2.1"))
    received = raw(proxy, source, *chunks)
    wait_for(lambda: len(refusals(proxy)) > before, f"{name} refused")
    assert refusals(proxy)[-1] == REFUSALS[reason]
    assert value(scrape(proxy.ports["metrics"]), "migrating_proxy_proxy_header_refusals_total",
                 reason=reason) == counted + 1
    if source == "127.0.0.1":
        assert received == b""  # no greeting: the session never started
    assert b"OK" not in received.split(b"\r\n", 1)[-1]  # never a login answer
    after = len(login_events(proxy, source)) + len(login_events(proxy, "192.0.2.1"))
    assert after == logins_before


def test_a_header_in_pieces_and_pipelined_commands_are_read(proxy: Proxy) -> None:
    header = v2("198.51.100.7")
    chunks = [bytes([b]) for b in header] + [b"a LOGIN alice@new.example alice-pw\r\n",
                                             b"b LOGOUT\r\n"]
    received = raw(proxy, "127.0.0.1", *chunks)
    assert received.startswith(b"* OK")
    assert b"a OK" in received
    [event] = login_events(proxy, "198.51.100.7")
    assert event["outcome"] == "ok"


def test_unknown_and_local_headers_keep_the_balancer_address(proxy: Proxy) -> None:
    """HAProxy's health checks: `PROXY UNKNOWN` and v2 LOCAL carry no client address."""
    for header in (b"PROXY UNKNOWN\r\n", v2(command=0x20)):
        received = raw(proxy, "127.0.0.1", header, b"a LOGOUT\r\n")
        assert received.startswith(b"* OK") and b"a OK" in received


def test_ordinary_clients_outside_the_networks_need_no_header(proxy: Proxy) -> None:
    imap = imap_from("127.0.0.30", proxy.imap_port)
    imap.login(ALICE, PASSWORD)
    imap.logout()
    assert login_events(proxy, "127.0.0.30")[-1]["outcome"] == "ok"
