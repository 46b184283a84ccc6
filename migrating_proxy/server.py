"""`migrating-proxy serve`: wire the configured listeners to the shared services and run."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from collections.abc import Callable

import structlog
from twisted.internet.protocol import Protocol
from twisted.python.threadpool import ThreadPool

from migrating_proxy.config import Config
from migrating_proxy.frontends.imap import IMAPSession
from migrating_proxy.frontends.leases import LeaseKeeper, this_process
from migrating_proxy.frontends.pop3 import POP3Session
from migrating_proxy.frontends.registry import CloseRequestWatcher
from migrating_proxy.frontends.session import FrontendContext, SessionFactory
from migrating_proxy.frontends.smtp import SMTPSession
from migrating_proxy.frontends.submission import SubmissionSession
from migrating_proxy.frontends.tls import server_options
from migrating_proxy.login import FailureThrottle, LoginService, Placement, by_cutover
from migrating_proxy.onboarding import Onboarding
from migrating_proxy.provision import make_provisioner
from migrating_proxy.store import Store, open_store
from migrating_proxy.upstream import Upstream
from migrating_proxy.worker import pid_alive

log = structlog.get_logger(__name__)


# Listener name (config `listen.<name>`) -> what makes its sessions: (context, implicit TLS).
SESSIONS: dict[str, Callable[[FrontendContext, bool], Protocol]] = {
    "imap": IMAPSession, "imaps": IMAPSession, "pop3": POP3Session, "pop3s": POP3Session,
    "smtp": SMTPSession, "submission": SubmissionSession,
}


def build_login_service(config: Config, store: Store,
                        placement: Callable[[Placement], Upstream] | None = None) -> LoginService:
    """The login decision; by default sessions are placed by the transparent cutover: at the
    old server for accounts not switched yet, else at the store."""
    limits = config.limits
    throttle = FailureThrottle(
        limits.throttle_window, limits.max_failures_per_peer, limits.max_failures_per_account
    )
    onboarding = Onboarding.from_config(config, store, config.provision.hash_processes)
    return LoginService(store, onboarding.hasher, throttle, onboarding,
                        on_rehash=onboarding.provisioner.update, backend=config.backend,
                        placement=placement or by_cutover(config.backend, store, this_process()))


def serve(config: Config, placement: Callable[[Placement], Upstream] | None = None) -> int:
    """Run until SIGTERM/SIGINT. `placement`: where accepted logins are served (see
    login.LoginService; default: the store)."""
    from twisted.internet import reactor

    store = open_store(config.database_url)
    # Repair the store's user file from the database on every start.
    make_provisioner(config.provision, store.accounts).sync()
    # Old-server sessions of a predecessor killed on this machine died with it.
    store.cutover.drop_dead_leases(socket.gethostname(), pid_alive)
    threadpool = ThreadPool(minthreads=2, maxthreads=16, name="login")
    threadpool.start()
    leases = LeaseKeeper(reactor, threadpool, store.cutover)
    ctx = FrontendContext(
        reactor=reactor, config=config,
        login_service=build_login_service(config, store, placement),
        threadpool=threadpool, tls_options=server_options(config.tls), leases=leases,
    )
    ports = listen_all(ctx)
    watcher = CloseRequestWatcher(reactor, threadpool, store.sessions, ctx.registry)
    watcher.start()
    leases.start()
    workers = start_workers(config)

    def shutdown() -> None:
        log.info("stopping", listeners=len(ports))
        watcher.stop()
        leases.stop()
        for port in ports:
            port.stopListening()
        stop_workers(workers)
        threadpool.stop()
        ctx.login_service.hasher.close()
        store.close()

    reactor.addSystemEventTrigger("before", "shutdown", shutdown)
    log.info("started", listeners=[f"{p.getHost().host}:{p.getHost().port}" for p in ports])
    reactor.run()  # SIGTERM and SIGINT stop it
    return 0


def start_workers(config: Config) -> subprocess.Popen[bytes] | None:
    """The copy workers run in their own processes (`migrating-proxy worker`), never here."""
    if config.migration.workers < 1:
        return None
    command = [sys.executable, "-m", "migrating_proxy"]
    if config.source is not None:
        command += ["--config", str(config.source)]
    command += ["worker", "--processes", str(config.migration.workers)]
    return subprocess.Popen(command, stdin=subprocess.DEVNULL)


def stop_workers(workers: subprocess.Popen[bytes] | None) -> None:
    """Workers hand their jobs back at the next batch boundary; wait for that, briefly."""
    if workers is None or workers.poll() is not None:
        return
    workers.send_signal(signal.SIGTERM)
    try:
        workers.wait(timeout=30)
    except subprocess.TimeoutExpired:
        log.warning("workers_killed", reason="did not stop within 30 s")
        workers.kill()


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
