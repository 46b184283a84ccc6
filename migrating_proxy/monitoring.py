"""The `[metrics] listen` HTTP listener: `/metrics`, `/healthz`, `/readyz` (Twisted web).

- `/metrics`: the Prometheus text format of `metrics.REGISTRY` (rendered in a thread: the
  database figures are queried at scrape time).
- `/healthz`: 200 while the process's reactor turns; answering at all is the proof.
- `/readyz`: 200 when the account database answers a query and the store greets on every
  protocol a listener relays to; otherwise 503 with one line per reason. Checked at every
  request, in a thread, each check bounded by `READY_TIMEOUT`, so it turns back to 200 by itself
  when the database or the store returns.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import Engine
from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.web import resource, server

from migrating_proxy.config import Config
from migrating_proxy.endpoints import Endpoint
from migrating_proxy.metrics import REGISTRY

READY_TIMEOUT = 3.0  # seconds per check: a hung database must not hang the probe
GREETINGS = {"imap": b"* OK", "pop3": b"+OK"}


def database_problem(engine: Engine) -> str | None:
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except Exception as exc:  # any driver error means "not ready"
        return f"database unreachable: {type(exc).__name__}"
    return None


def store_problem(endpoint: Endpoint) -> str | None:
    """Connect to the store and read its greeting (through TLS for imaps/pop3s)."""
    where = f"store {endpoint.protocol} {endpoint.host}:{endpoint.port}"
    try:
        with socket.create_connection((endpoint.host, endpoint.port), READY_TIMEOUT) as sock:
            conn: Any = sock
            if endpoint.tls == "implicit":
                context = ssl.create_default_context()
                context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
                conn = context.wrap_socket(sock)
            greeting = conn.recv(512)
    except OSError as exc:
        return f"{where} unreachable: {exc.strerror or type(exc).__name__}"
    if not greeting.startswith(GREETINGS[endpoint.protocol]):
        return f"{where} did not greet"
    return None


def readiness_checks(config: Config, engine: Engine) -> list[Callable[[], str | None]]:
    """The database, and the store of every protocol a configured listener relays."""
    checks: list[Callable[[], str | None]] = [lambda: database_problem(engine)]
    listen = config.listen
    if listen.imap or listen.imaps:
        checks.append(lambda: store_problem(config.backend.imap))
    if listen.pop3 or listen.pop3s:
        checks.append(lambda: store_problem(config.backend.pop3))
    return checks


class _Metrics(resource.Resource):
    isLeaf = True

    def render_GET(self, request: server.Request) -> Any:
        rendered = deferToThread(generate_latest, REGISTRY)

        def write(body: bytes) -> None:
            request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
            request.write(body)
            request.finish()

        def fail(failure: Any) -> None:
            request.setResponseCode(500)
            request.write(f"metrics unavailable: {failure.type.__name__}\n".encode())
            request.finish()

        rendered.addCallbacks(write, fail)
        return server.NOT_DONE_YET


class _Health(resource.Resource):
    isLeaf = True

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"ok\n"


class _Ready(resource.Resource):
    isLeaf = True

    def __init__(self, reactor: Any, checks: list[Callable[[], str | None]]) -> None:
        super().__init__()
        self.reactor = reactor
        self.checks = checks

    def render_GET(self, request: server.Request) -> Any:
        runs = [deferToThread(check).addTimeout(READY_TIMEOUT + 1, self.reactor)
                for check in self.checks]
        done = defer.DeferredList(runs, consumeErrors=True)

        def answer(results: list[tuple[bool, Any]]) -> None:
            problems = [value if ok else "check timed out" for ok, value in results
                        if not ok or value is not None]
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            request.setResponseCode(503 if problems else 200)
            request.write(("\n".join(problems) if problems else "ready").encode() + b"\n")
            request.finish()

        done.addCallback(answer)
        return server.NOT_DONE_YET


def monitoring_site(reactor: Any, config: Config, engine: Engine) -> server.Site:
    root = resource.Resource()
    root.putChild(b"metrics", _Metrics())
    root.putChild(b"healthz", _Health())
    root.putChild(b"readyz", _Ready(reactor, readiness_checks(config, engine)))
    site = server.Site(root)
    site.displayTracebacks = False
    site.noisy = False
    return site
