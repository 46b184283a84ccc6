"""`migrating-proxy serve`: wire the configured listeners to the shared services and run."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable

import structlog
from twisted.internet.protocol import Protocol
from twisted.python.threadpool import ThreadPool

from migrating_proxy.config import Config
from migrating_proxy.frontends.imap import IMAPSession
from migrating_proxy.frontends.pop3 import POP3Session
from migrating_proxy.frontends.registry import CloseRequestWatcher
from migrating_proxy.frontends.session import FrontendContext, SessionFactory
from migrating_proxy.frontends.smtp import SMTPSession
from migrating_proxy.frontends.submission import SubmissionSession
from migrating_proxy.frontends.tls import server_options
from migrating_proxy.login import FailureThrottle, LoginService, Placement
from migrating_proxy.onboarding import Onboarding
from migrating_proxy.provision import make_provisioner
from migrating_proxy.store import Store, open_store
from migrating_proxy.upstream import Upstream

log = structlog.get_logger(__name__)


# Listener name (config `listen.<name>`) -> what makes its sessions: (context, implicit TLS).
SESSIONS: dict[str, Callable[[FrontendContext, bool], Protocol]] = {
    "imap": IMAPSession, "imaps": IMAPSession, "pop3": POP3Session, "pop3s": POP3Session,
    "smtp": SMTPSession, "submission": SubmissionSession,
}


def build_login_service(config: Config, store: Store,
                        placement: Callable[[Placement], Upstream] | None = None) -> LoginService:
    limits = config.limits
    throttle = FailureThrottle(
        limits.throttle_window, limits.max_failures_per_peer, limits.max_failures_per_account
    )
    onboarding = Onboarding.from_config(config, store, config.provision.hash_processes)
    return LoginService(store, onboarding.hasher, throttle, onboarding,
                        on_rehash=onboarding.provisioner.update, backend=config.backend,
                        placement=placement)


def serve(config: Config, placement: Callable[[Placement], Upstream] | None = None) -> int:
    """Run until SIGTERM/SIGINT. `placement`: where accepted logins are served (see
    login.LoginService; default: the store)."""
    from twisted.internet import reactor

    store = open_store(config.database_url)
    # Repair the store's user file from the database on every start.
    make_provisioner(config.provision, store.accounts).sync()
    threadpool = ThreadPool(minthreads=2, maxthreads=16, name="login")
    threadpool.start()
    ctx = FrontendContext(
        reactor=reactor, config=config,
        login_service=build_login_service(config, store, placement),
        threadpool=threadpool, tls_options=server_options(config.tls),
    )
    ports = listen_all(ctx)
    watcher = CloseRequestWatcher(reactor, threadpool, store.sessions, ctx.registry)
    watcher.start()
    workers = start_workers(config)
    console = start_web(config)

    def shutdown() -> None:
        log.info("stopping", listeners=len(ports))
        watcher.stop()
        for port in ports:
            port.stopListening()
        stop_child(console, "web")
        stop_workers(workers)
        threadpool.stop()
        ctx.login_service.hasher.close()
        store.close()

    reactor.addSystemEventTrigger("before", "shutdown", shutdown)
    log.info("started", listeners=[f"{p.getHost().host}:{p.getHost().port}" for p in ports])
    reactor.run()  # SIGTERM and SIGINT stop it
    return 0


def start_child(config: Config, *args: str) -> subprocess.Popen[bytes]:
    """`migrating-proxy [--config F] ARGS...` as a child process of this one."""
    command = [sys.executable, "-m", "migrating_proxy"]
    if config.source is not None:
        command += ["--config", str(config.source)]
    return subprocess.Popen([*command, *args], stdin=subprocess.DEVNULL)


def stop_child(child: subprocess.Popen[bytes] | None, name: str, timeout: float = 30) -> None:
    """SIGTERM, then wait (briefly) for the child to finish what it is doing."""
    if child is None or child.poll() is not None:
        return
    child.send_signal(signal.SIGTERM)
    try:
        child.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log.warning(f"{name}_killed", reason=f"did not stop within {timeout:.0f} s")
        child.kill()


def start_workers(config: Config) -> subprocess.Popen[bytes] | None:
    """The copy workers run in their own processes (`migrating-proxy worker`), never here."""
    if config.migration.workers < 1:
        return None
    return start_child(config, "worker", "--processes", str(config.migration.workers))


def stop_workers(workers: subprocess.Popen[bytes] | None) -> None:
    """Workers hand their jobs back at the next batch boundary; wait for that, briefly."""
    stop_child(workers, "workers")


def start_web(config: Config) -> subprocess.Popen[bytes] | None:
    """The web console, with `[web] listen`: a process of its own (its own event loop, never
    this reactor), like the workers."""
    return None if config.web.listen is None else start_child(config, "web")


def listen_all(ctx: FrontendContext) -> list:
    reactor, listen, ports = ctx.reactor, ctx.config.listen, []
    if listen.smtp or listen.submission:
        ctx.config.smtp.banner_name  # noqa: B018 - resolve the FQDN now, not on the reactor
    for name, session_class in SESSIONS.items():
        address = getattr(listen, name)
        if address is None:
            continue
        host, port = address
        implicit = name in ("imaps", "pop3s")
        factory = SessionFactory(session_class, ctx, implicit_tls=implicit)
        if implicit:
            if ctx.tls_options is None:
                raise ValueError(f"listen.{name} needs tls.cert and tls.key")
            ports.append(reactor.listenSSL(port, factory, ctx.tls_options, interface=host))
        else:
            ports.append(reactor.listenTCP(port, factory, interface=host))
        log.info("listening", protocol=name, host=host, port=ports[-1].getHost().port)
    return ports
