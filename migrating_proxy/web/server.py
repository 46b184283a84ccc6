"""`migrating-proxy web`: the console's own process (uvicorn, one asyncio loop, no Twisted).

The socket is bound before anything else, so a port in use or a bad address is one line and
exit 1 at start-up. SIGTERM and SIGINT end it gracefully (uvicorn's own handlers); `serve`
starts it as a child when `[web] listen` is set and stops it with its workers.
"""

from __future__ import annotations

import ipaddress
import signal
import socket

import structlog
import uvicorn

from migrating_proxy import lifeline
from migrating_proxy.config import Config, WebConfig
from migrating_proxy.endpoints import EndpointError, parse_listen
from migrating_proxy.web.app import create_app
from migrating_proxy.web.console import Console

log = structlog.get_logger(__name__)


class WebStartError(Exception):
    """The console cannot start (address in use, not an address)."""


def listen_address(config: Config, override: str | None) -> tuple[str, int]:
    if override is not None:
        try:
            address = parse_listen(override)
        except EndpointError as exc:
            raise WebStartError(f"--listen: {exc}") from None
        if address is None:
            raise WebStartError("--listen: expected host:port")
        return address
    return config.web.listen or WebConfig.DEFAULT_LISTEN


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not implied: asyncio sets TCP_NODELAY on accepted connections only
    # when the listening socket says TCP, and without it every answer written in two parts
    # (headers, body) waits out the client's delayed ACK, 40 ms.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise WebStartError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _exit_cleanly(_signum: int, _frame: object) -> None:
    raise SystemExit(0)


def run_web(config: Config, listen_override: str | None = None) -> int:
    lifeline.follow_from_environment()  # started by serve: stop when serve is gone
    host, port = listen_address(config, listen_override)
    sock = bind(host, port)
    tls = config.tls
    if not is_loopback(host) and not tls.enabled:
        log.warning("web_without_tls", host=host,
                    reason="passwords and session cookies would cross the network in clear; "
                           "set [tls] cert and key")
    console = Console.open(config)
    server = uvicorn.Server(uvicorn.Config(
        create_app(console), log_config=None, access_log=False, server_header=False,
        ssl_certfile=str(tls.cert) if tls.cert else None,
        ssl_keyfile=str(tls.key) if tls.key else None,
        timeout_graceful_shutdown=5,
    ))
    # uvicorn stops gracefully on SIGTERM/SIGINT, then raises the signal again for the
    # handler it found: this one, so the process ends with status 0 as `serve` does.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_cleanly)
    scheme = "https" if tls.enabled else "http"
    log.info("web_started", url=f"{scheme}://{host}:{sock.getsockname()[1]}/")
    try:
        server.run(sockets=[sock])
    finally:
        console.close()
        sock.close()
    return 0
