"""`migrating-proxy serve`: wire the configured listeners to the shared services and run.

Start-up runs in an order that makes every failure one line and a prompt exit, with nothing
left behind (an operator, or systemd's Restart=, must see a failed start, never a process that
looks alive while listening on nothing):

1. acquire what can be refused: the listening sockets, the TLS certificate (then, if started
   by root, become the state directory's owner, see privileges.py), the database, the store's
   user files, the files read later (master password, notice); each failure is a
   `StartupError` (or the store's own one-line errors) and undoes what was acquired before it;
2. only then build the services and hand the sockets to the reactor;
3. once the reactor runs (its SIGTERM/SIGINT handlers are installed by then, so a stop at any
   moment reaches the shutdown below) start the login thread pool and the copy workers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import structlog
from twisted.internet.protocol import Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.threadpool import ThreadPool

from migrating_proxy import lifeline, metrics
from migrating_proxy.config import Config, ListenConfig
from migrating_proxy.frontends.imap import IMAPSession
from migrating_proxy.frontends.leases import LeaseKeeper, this_process
from migrating_proxy.frontends.pop3 import POP3Session
from migrating_proxy.frontends.proxyheader import ProxyHeaderFactory
from migrating_proxy.frontends.registry import CloseRequestWatcher
from migrating_proxy.frontends.session import FrontendContext, SessionFactory
from migrating_proxy.frontends.smtp import SMTPSession
from migrating_proxy.frontends.submission import SubmissionSession
from migrating_proxy.frontends.tls import server_options
from migrating_proxy.login import LoginService, Placement, by_cutover
from migrating_proxy.onboarding import Onboarding
from migrating_proxy.privileges import become_service_user
from migrating_proxy.provision import make_provisioner
from migrating_proxy.startup import StartupError, check_files, files_refused
from migrating_proxy.store import Store, open_store
from migrating_proxy.throttle import FailureThrottle
from migrating_proxy.upstream import Upstream
from migrating_proxy.worker import pid_alive

log = structlog.get_logger(__name__)

IMPLICIT_TLS = ("imaps", "pop3s")


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


# Blocking work of the front-ends runs in thread pools, one per kind of client, so that logins
# stuck on a slow database or old server cannot take every thread from the SMTP front-end.
LOGIN_THREADS = 32  # IMAP and POP3 login decisions: database, old server, hashing processes
SMTP_THREADS = 16  # SMTP and submission: recipient lookups, submission AUTH
# A client waits for each login: a lock held elsewhere (an admin import, a backup) makes the
# login answer "try later" after this many seconds instead of 30 (store.db's default).
LOGIN_LOCK_TIMEOUT = 5.0


def serve(config: Config, placement: Callable[[Placement], Upstream] | None = None) -> int:
    """Run until SIGTERM/SIGINT. `placement`: where accepted logins are served (see
    login.LoginService; default: the store)."""
    from twisted.internet import reactor

    ctx, smtp_ctx, ports, store = acquire(config, reactor, placement)
    threadpool = ctx.threadpool
    pools = (threadpool, smtp_ctx.threadpool)
    watcher = CloseRequestWatcher(reactor, threadpool, store.sessions, ctx.registry)
    leases = ctx.leases
    children: list[tuple[subprocess.Popen[bytes], str]] = []  # stopped in reverse order

    def started() -> None:
        for pool in pools:
            pool.start()
        watcher.start()
        leases.start()
        if (pool := start_workers(config)) is not None:
            children.append((pool, "workers"))
        if (console := start_web(config)) is not None:
            children.append((console, "web"))
        log.info("started", listeners=[f"{p.getHost().host}:{p.getHost().port}" for p in ports])

    def shutdown() -> None:
        log.info("stopping", listeners=len(ports))
        watcher.stop()
        leases.stop()
        for port in ports:
            port.stopListening()
        for child, name in reversed(children):
            stop_child(child, name)
        for pool in pools:
            if pool.started:
                pool.stop()
        ctx.login_service.hasher.close()
        store.close()

    reactor.callWhenRunning(started)  # after the reactor's signal handlers are in place
    reactor.addSystemEventTrigger("before", "shutdown", shutdown)
    reactor.run()  # SIGTERM and SIGINT stop it
    return 0


# -- acquiring ----------------------------------------------------------------------------
def acquire(config: Config, reactor: Any, placement: Callable[[Placement], Upstream] | None
            ) -> tuple[FrontendContext, FrontendContext, list[Any], Store]:
    """Everything serve needs that can be refused, or StartupError with nothing left held:
    the contexts of the IMAP/POP3 and of the SMTP sessions (a thread pool each), the ports,
    the store."""
    with contextlib.ExitStack() as undo:  # on any failure below, release what was acquired
        sockets = bind_listeners(config.listen, config.limits.listen_backlog)
        undo.callback(close_sockets, sockets)
        monitoring = bind_monitoring(config)  # a privileged port, too, is bound before the drop
        undo.callback(close_sockets, monitoring)
        tls_options = load_server_tls(config)
        # Started by root (by hand: the units start it as its user), the ports below 1024 and a
        # key only root may read are ours now; the rest runs as the state directory's owner.
        become_service_user(config)
        check_files(config)  # cheap, and as this user: before the database and its helper
        # SQLite in a helper process: a storage fault (SIGBUS) must not take the sessions down.
        store = open_store(config.database_url, lock_timeout=LOGIN_LOCK_TIMEOUT,
                           isolate_sqlite=True)
        undo.callback(store.close)
        with files_refused():
            prepare_files(config, store)
            login_service = build_login_service(config, store, placement)
        undo.callback(login_service.hasher.close)
        # Old-server sessions of a predecessor killed on this machine died with it.
        store.cutover.drop_dead_leases(socket.gethostname(), pid_alive)
        # The pools are started later.
        threadpool = ThreadPool(minthreads=2, maxthreads=LOGIN_THREADS, name="login")
        ctx = FrontendContext(reactor=reactor, config=config, login_service=login_service,
                              threadpool=threadpool, tls_options=tls_options,
                              leases=LeaseKeeper(reactor, threadpool, store.cutover))
        smtp_ctx = dataclasses.replace(
            ctx, threadpool=ThreadPool(minthreads=2, maxthreads=SMTP_THREADS, name="smtp"))
        ports = adopt_listeners(ctx, sockets, smtp_ctx)
        ports += adopt_monitoring(reactor, config, store, monitoring)
        undo.pop_all()  # acquired: from here on, serve's shutdown() releases everything
    return ctx, smtp_ctx, ports, store


def bind_monitoring(config: Config) -> dict[str, socket.socket]:
    """`[metrics] listen`'s socket, bound now (StartupError if it cannot be), or none."""
    if config.metrics.listen is None:
        return {}
    host, port = config.metrics.listen
    return {"metrics": _bind("metrics.listen", host, port, config.limits.listen_backlog)}


def adopt_monitoring(reactor: Any, config: Config, store: Store,
                     sockets: dict[str, socket.socket]) -> list[Any]:
    """/metrics, /healthz, /readyz on the bound socket; the metric hooks count from now on."""
    if not sockets:
        return []
    from migrating_proxy.monitoring import monitoring_site

    metrics.enable()
    metrics.REGISTRY.register(metrics.DatabaseFigures(store.engine))
    sock = sockets["metrics"]
    listening = reactor.adoptStreamPort(sock.fileno(), sock.family,
                                        monitoring_site(reactor, config, store.engine))
    sock.close()  # the reactor holds its own duplicate
    log.info("listening", protocol="metrics", host=listening.getHost().host,
             port=listening.getHost().port)
    return [listening]


def bind_listeners(listen: ListenConfig, backlog: int) -> dict[str, socket.socket]:
    """Every configured listener's socket, bound and listening, or StartupError (none open).
    `backlog`: connections the kernel queues for accept() (limits.listen_backlog)."""
    bound: dict[str, socket.socket] = {}
    try:
        for name in ListenConfig.addresses():
            address = getattr(listen, name)
            if address is not None:
                bound[name] = _bind(f"listen.{name}", *address, backlog)
    except BaseException:
        close_sockets(bound)
        raise
    return bound


def _bind(key: str, host: str, port: int, backlog: int) -> socket.socket:
    where = f"{key}: cannot listen on {host}:{port}"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise StartupError(f"{where}: {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        # As Twisted does: a restart must not wait for old connections in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise StartupError(f"{where}: {exc.strerror}") from None
    return sock


def close_sockets(sockets: dict[str, socket.socket]) -> None:
    for sock in sockets.values():
        sock.close()


def load_server_tls(config: Config) -> Any:
    """Our certificate and key, loaded now so that a bad one stops the start, not a session."""
    try:
        return server_options(config.tls)
    except OSError as exc:
        raise StartupError(f"tls: cannot read {exc.filename}: {exc.strerror}") from None
    except Exception as exc:  # pyOpenSSL's errors: not PEM, key and certificate don't match
        raise StartupError(f"tls: cannot use {config.tls.cert} and {config.tls.key}: "
                           f"{_openssl_reason(exc)}") from None


def _openssl_reason(exc: Exception) -> str:
    """The last reason OpenSSL gave (its error queue holds tuples), else the exception."""
    queue = exc.args[0] if exc.args and isinstance(exc.args[0], list) else []
    reasons = [entry[-1] for entry in queue if isinstance(entry, tuple) and entry]
    return reasons[-1] if reasons else (str(exc) or type(exc).__name__)


def prepare_files(config: Config, store: Store) -> None:
    """Repair the store's user files from the database."""
    make_provisioner(config.provision, store.accounts).sync()


def adopt_listeners(ctx: FrontendContext, sockets: dict[str, socket.socket],
                    smtp_ctx: FrontendContext | None = None) -> list[Any]:
    """Hand the bound sockets to the reactor, each with its protocol's factory (SMTP and
    submission sessions with `smtp_ctx`, whose thread pool is their own)."""
    if ctx.config.listen.smtp or ctx.config.listen.submission:
        ctx.config.smtp.banner_name  # noqa: B018 - resolve the FQDN now, not on the reactor
    ports = []
    for name, sock in sockets.items():
        implicit = name in IMPLICIT_TLS
        session_ctx = smtp_ctx if smtp_ctx and name in ("smtp", "submission") else ctx
        factory = listener_factory(
            ctx, SessionFactory(SESSIONS[name], session_ctx, implicit_tls=implicit), implicit)
        ports.append(ctx.reactor.adoptStreamPort(sock.fileno(), sock.family, factory))
        sock.close()  # the reactor holds its own duplicate
        host = ports[-1].getHost()
        log.info("listening", protocol=name, host=host.host, port=host.port)
    return ports


def listener_factory(ctx: FrontendContext, sessions: SessionFactory,
                     implicit_tls: bool) -> Any:
    """The layers of one listener, outermost first: the PROXY header (with
    listen.proxy_protocol_from), then TLS (imaps, pop3s: the header precedes the handshake,
    which is why TLS is a layer here and not listenSSL), then the session."""
    factory: Any = sessions
    if implicit_tls:
        factory = TLSMemoryBIOFactory(ctx.tls_options, False, factory)
    networks = ctx.config.listen.proxy_protocol_from
    if networks:
        timeout = ctx.config.limits.idle_timeout or 60.0
        factory = ProxyHeaderFactory(factory, networks, ctx.reactor, timeout)
    return factory


# -- child processes (the copy workers, the web console) -----------------------------------
def start_child(config: Config, *args: str) -> subprocess.Popen[bytes]:
    """`migrating-proxy [--config F] ARGS...` as a child process of this one.

    In a process group of their own: a Ctrl-C on a terminal reaches `serve` alone, which
    stops them in order; and should they ever have to be killed, the whole group goes.
    """
    command = [sys.executable, "-m", "migrating_proxy"]
    if config.source is not None:
        command += ["--config", str(config.source)]
    # The child ends with us, even if we are killed (lifeline.py).
    return subprocess.Popen([*command, *args], stdin=subprocess.DEVNULL, process_group=0,
                            env=lifeline.child_environment())


def stop_child(child: subprocess.Popen[bytes], name: str, timeout: float = 30) -> None:
    """SIGTERM, then wait (briefly) for the child to finish what it is doing."""
    if child.poll() is not None:
        return
    child.send_signal(signal.SIGTERM)
    try:
        child.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log.warning(f"{name}_killed", reason=f"did not stop within {timeout:.0f} s")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()


def start_workers(config: Config) -> subprocess.Popen[bytes] | None:
    """The copy workers run in their own processes (`migrating-proxy worker`), never here."""
    if config.migration.workers < 1:
        return None
    return start_child(config, "worker", "--processes", str(config.migration.workers))


def stop_workers(workers: subprocess.Popen[bytes]) -> None:
    """Workers hand their jobs back at the next batch boundary; wait for that, briefly."""
    stop_child(workers, "workers")


def start_web(config: Config) -> subprocess.Popen[bytes] | None:
    """The web console, with `[web] listen`: a process of its own (its own event loop, never
    this reactor), like the workers."""
    return None if config.web.listen is None else start_child(config, "web")
