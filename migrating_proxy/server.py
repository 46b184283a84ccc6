"""`migrating-proxy serve`: wire the configured listeners to the shared services and run."""

from __future__ import annotations

import structlog
from twisted.python.threadpool import ThreadPool

from migrating_proxy.config import Config
from migrating_proxy.frontends.imap import IMAPSession
from migrating_proxy.frontends.session import FrontendContext, ProxySession, SessionFactory
from migrating_proxy.frontends.tls import server_options
from migrating_proxy.login import FailureThrottle, LoginService
from migrating_proxy.passwords import PasswordHasher
from migrating_proxy.provision import make_provisioner
from migrating_proxy.store import Store, open_store

log = structlog.get_logger(__name__)


def session_classes() -> dict[str, type[ProxySession]]:
    """Listener name -> session class; POP3 joins when its module is importable."""
    classes: dict[str, type[ProxySession]] = {"imap": IMAPSession, "imaps": IMAPSession}
    try:
        from migrating_proxy.frontends.pop3 import POP3Session
    except ImportError:
        return classes
    classes.update(pop3=POP3Session, pop3s=POP3Session)
    return classes


def build_login_service(config: Config, store: Store) -> LoginService:
    provisioner = make_provisioner(config.provision)
    limits = config.limits
    throttle = FailureThrottle(
        limits.throttle_window, limits.max_failures_per_peer, limits.max_failures_per_account
    )
    return LoginService(
        store.accounts,
        PasswordHasher(config.provision.scheme, config.provision.rounds),
        throttle,
        on_rehash=lambda: provisioner.sync(store.accounts.all_password_hashes()),
    )


def serve(config: Config) -> int:
    from twisted.internet import reactor

    store = open_store(config.database_url)
    # Repair the store's user file from the database on every start.
    make_provisioner(config.provision).sync(store.accounts.all_password_hashes())
    threadpool = ThreadPool(minthreads=2, maxthreads=16, name="login")
    threadpool.start()
    ctx = FrontendContext(
        reactor=reactor, config=config, login_service=build_login_service(config, store),
        threadpool=threadpool, tls_options=server_options(config.tls),
    )
    ports = listen_all(ctx)

    def shutdown() -> None:
        log.info("stopping", listeners=len(ports))
        for port in ports:
            port.stopListening()
        threadpool.stop()
        store.close()

    reactor.addSystemEventTrigger("before", "shutdown", shutdown)
    log.info("started", listeners=[f"{p.getHost().host}:{p.getHost().port}" for p in ports])
    reactor.run()  # SIGTERM and SIGINT stop it
    return 0


def listen_all(ctx: FrontendContext) -> list:
    reactor, listen, ports = ctx.reactor, ctx.config.listen, []
    for name, session_class in session_classes().items():
        address = getattr(listen, name)
        if address is None:
            continue
        host, port = address
        implicit = name.endswith("s")
        factory = SessionFactory(session_class, ctx, implicit_tls=implicit)
        if implicit:
            if ctx.tls_options is None:
                raise ValueError(f"listen.{name} needs tls.cert and tls.key")
            ports.append(reactor.listenSSL(port, factory, ctx.tls_options, interface=host))
        else:
            ports.append(reactor.listenTCP(port, factory, interface=host))
        log.info("listening", protocol=name, host=host, port=ports[-1].getHost().port)
    return ports
