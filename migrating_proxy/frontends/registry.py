"""The live sessions of this process, per account, and the watcher that closes them on request.

`SessionRegistry` is the per-process list (Twisted's `WrappingFactory.protocols`, keyed by
account): a session is in it while it is relayed to its upstream. `CloseRequestWatcher` polls
the store's close requests (store/sessions.py) four times a second and closes the sessions of
each account named, so any process sharing the database (a worker switching an account, an
admin command) can end an account's sessions on every `serve` process:

    store.sessions.request_close("alice@example.org", "Your mailbox has moved.")

Everything here runs in the reactor thread except the database read, which runs in the
session thread pool like the login decisions.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import Protocol

import structlog
from twisted.internet import defer, task
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from migrating_proxy.store.accounts import now
from migrating_proxy.store.sessions import OVERLAP, CloseRequest, SessionControl
from migrating_proxy.upstream import ServedBy

log = structlog.get_logger("migrating_proxy.sessions")

# A switch waits for its account's old-server sessions to close: each second here is a second
# longer that the user's logins are held. One indexed read per tick.
POLL_SECONDS = 0.25
RECENT_CLOSE = 120.0  # seconds a close is remembered for sessions still logging in (> timeouts)


class LiveSession(Protocol):
    """What the registry needs of a session (ProxySession has it)."""

    served_by: ServedBy | None  # where it is relayed

    def close_on_request(self, reason: str) -> None:
        """End the session now, as cleanly as its protocol allows."""


class SessionRegistry:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._by_account: dict[str, set[LiveSession]] = {}
        # account -> (when, reason) of its last close: a session whose login was decided
        # before a close but that is relayed only after it must not escape it.
        self._closed: dict[str, tuple[float, str]] = {}
        self.clock = clock

    def add(self, address: str, session: LiveSession) -> None:
        self._by_account.setdefault(address.lower(), set()).add(session)

    def discard(self, address: str, session: LiveSession) -> None:
        sessions = self._by_account.get(address.lower())
        if sessions is not None:
            sessions.discard(session)
            if not sessions:
                del self._by_account[address.lower()]

    def sessions_of(self, address: str) -> list[LiveSession]:
        return list(self._by_account.get(address.lower(), ()))

    def close(self, address: str, reason: str, served_by: ServedBy | None = None) -> int:
        """Close the account's sessions (only those relayed to `served_by`, if given); how
        many were closed."""
        closing = [s for s in self.sessions_of(address)
                   if served_by is None or s.served_by == served_by]
        for session in closing:
            session.close_on_request(reason)
        stamp = self.clock()
        self._closed = {key: (at, why) for key, (at, why) in self._closed.items()
                        if stamp - at < RECENT_CLOSE}
        self._closed[address.lower()] = (stamp, reason)
        return len(closing)

    def closed_since(self, address: str, since: float) -> str | None:
        """The reason, if the account's sessions were closed at or after `since` (clock)."""
        at, reason = self._closed.get(address.lower(), (None, ""))
        return reason if at is not None and at >= since else None

    def __len__(self) -> int:
        return sum(map(len, self._by_account.values()))


class CloseRequestWatcher:
    """Polls the store's close requests and closes the sessions this process holds."""

    def __init__(self, reactor, threadpool: ThreadPool,  # type: ignore[no-untyped-def]
                 control: SessionControl, registry: SessionRegistry,
                 interval: float = POLL_SECONDS) -> None:
        self.reactor, self.threadpool = reactor, threadpool
        self.control, self.registry = control, registry
        self.interval = interval
        self.since = now()  # requests from before this process started concern nobody here
        self.handled: dict[int, datetime] = {}
        self.polling = False
        self.loop = task.LoopingCall(self.poll)
        self.loop.clock = reactor

    def start(self) -> None:
        self.loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self.loop.running:
            self.loop.stop()

    def poll(self) -> defer.Deferred[None] | None:
        if self.polling:  # the database is slow: never stack up reads
            return None
        self.polling = True
        started = now()
        read = deferToThreadPool(self.reactor, self.threadpool, self.control.requests_since,
                                 self.since - OVERLAP)
        read.addCallbacks(self._apply, self._failed, callbackArgs=(started,))
        read.addBoth(self._done)
        return None

    def _apply(self, requests: list[CloseRequest], started: datetime) -> None:
        for request in requests:
            if request.id in self.handled:
                continue
            self.handled[request.id] = request.created_at
            closed = self.registry.close(request.address_key, request.reason)
            log.info("sessions_closed", address=request.address_key, reason=request.reason,
                     sessions=closed, request=request.id)
        self.since = started
        horizon = started - 2 * OVERLAP
        self.handled = {rid: at for rid, at in self.handled.items() if at > horizon}

    def _failed(self, failure: Failure) -> None:
        # A database hiccup: try again at the next tick (since is unchanged, nothing is lost).
        log.warning("close_requests_unreadable", error=failure.type.__name__)

    def _done(self, _result: object) -> None:
        self.polling = False
