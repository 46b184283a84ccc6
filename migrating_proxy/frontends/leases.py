"""This process's leases on old-server sessions (store/cutover.py), kept alive and given back.

A session relayed to an account's old server (passthrough, before the account's switch) holds a
lease from the login decision until its connection to the old server is gone; the switch waits
for an account's leases to be gone before its final pass. `LeaseKeeper` knows the leases of this
process: about once a second it refreshes the live ones (so the leases of a process that died
stop counting) and deletes the ones given back since, trying again at the next tick if the
database did not answer. Database calls run in the session thread pool.
"""

from __future__ import annotations

import os
import socket

import structlog
from twisted.internet import task
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from migrating_proxy.store.cutover import LEASE_REFRESH, CutoverStore

log = structlog.get_logger("migrating_proxy.sessions")


def this_process() -> str:
    """How this process names itself on its leases (hosts may share a PostgreSQL database)."""
    return f"{socket.gethostname()}:{os.getpid()}"


class LeaseKeeper:
    def __init__(self, reactor, threadpool: ThreadPool,  # type: ignore[no-untyped-def]
                 cutover: CutoverStore) -> None:
        self.reactor, self.threadpool, self.cutover = reactor, threadpool, cutover
        self.live: set[int] = set()
        self.returned: set[int] = set()  # given back, not yet deleted
        self.busy = False
        self.loop = task.LoopingCall(self.tick)
        self.loop.clock = reactor

    def start(self) -> None:
        self.loop.start(LEASE_REFRESH.total_seconds(), now=False)

    def stop(self) -> None:
        if self.loop.running:
            self.loop.stop()

    def taken(self, lease: int) -> None:
        self.live.add(lease)

    def give_back(self, lease: int) -> None:
        """The session's connection to the old server is gone: tell the switch at once."""
        if lease in self.live:
            self.live.discard(lease)
            self.returned.add(lease)
            self.tick()

    def tick(self) -> None:
        if self.busy or not (self.live or self.returned):  # never stack up database writes
            return
        self.busy = True
        returned, live = set(self.returned), set(self.live)
        done = deferToThreadPool(self.reactor, self.threadpool, self._write, returned, live)
        done.addCallbacks(self._written, self._failed, callbackArgs=(returned,))
        done.addBoth(self._idle)

    def _write(self, returned: set[int], live: set[int]) -> None:
        if returned:
            self.cutover.release_leases(returned)
        if live:
            self.cutover.refresh_leases(live)

    def _written(self, _result: None, returned: set[int]) -> None:
        self.returned -= returned
        if self.returned:  # given back while this write ran: do not wait for the next tick
            self.reactor.callLater(0, self.tick)

    def _idle(self, _result: object) -> None:
        self.busy = False

    @staticmethod
    def _failed(failure: Failure) -> None:
        # A database hiccup: the leases are written again at the next tick.
        log.warning("lease_update_failed", error=failure.type.__name__)
