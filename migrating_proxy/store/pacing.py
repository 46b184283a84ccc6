"""Pacing pre-stage copies: `migration.prestage_rate` bytes per second per old host, in all.

Pre-stage passes run in many worker processes, on several machines, against one old server
that must not notice the migration. So the budget is kept where they all meet, the database:
one row per old host holding the moment from which the next bytes may be read (the "virtual
time" of a GCRA token bucket). Before a batch is read a worker reserves its slot, from that
moment for size / rate seconds, and moves the moment on; it waits for the slot's start and reads.
Slots never overlap, so the host never serves more than the rate over any stretch longer than
one batch plus BURST_SECONDS, however many workers share it. (The worker does not wait for
its slot's end: the rest of its pass, writing to the store, finishing one account and starting
the next, overlaps the slots that follow, which the next reservations already hold. Waiting
for the end made those moments come on top: 2 copies of small mailboxes reached only 88 % of
the rate.) One short
write per batch (batches are limited to about a second's worth while pacing, see `batch_bytes`).

A host left idle for a moment (every worker between two accounts: logging in, planning
folders) keeps up to BURST_SECONDS of credit, a token bucket of a second's worth: without it
those moments are lost for good, and the rate over a pre-stage of many small mailboxes came out
14 % below the one configured (bench/prestage_rate_bench.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import IntegrityError

from migrating_proxy.store.schema import host_pacing

T = TypeVar("T")
# The smallest batch while pacing: below this the reservation's write costs more than it paces.
MIN_BATCH_BYTES = 64 * 1024
SLEEP_STEP = 0.2  # seconds: how soon a waiting copy notices it should stop
BURST_SECONDS = 1.0  # idle time a host's budget may make up for (see above)


@dataclass
class HostPacer:
    """Paces reads from one old host at `rate` bytes per second across every process.

    `active()` false (the pass became a user's, say) or `stopping()` true: no more waiting.
    """

    engine: Engine
    host: str
    rate: int
    active: Callable[[], bool] = lambda: True
    stopping: Callable[[], bool] = lambda: False
    clock: Callable[[], float] = time.time

    def batch_bytes(self, default: int) -> int:
        """A batch of about a second's worth: a slot is then short, and pacing even."""
        return max(MIN_BATCH_BYTES, min(default, self.rate))

    def read(self, nbytes: int, action: Callable[[], T]) -> T:
        """Run `action` (reading `nbytes` from the host) inside a slot of its own."""
        if self.rate <= 0 or not self.active():
            return action()
        start, _end = self.reserve(nbytes)
        self._wait_until(start)
        return action()

    def reserve(self, nbytes: int) -> tuple[float, float]:
        """The slot (start, end) for `nbytes`, taken from the host's shared budget."""
        for _ in range(3):  # the first reservation for a host may race another's insert
            try:
                return self._reserve_once(nbytes)
            except IntegrityError:
                continue
        return self._reserve_once(nbytes)

    def _reserve_once(self, nbytes: int) -> tuple[float, float]:
        with self.engine.begin() as conn:
            current = conn.execute(select(host_pacing.c.next_at).where(
                host_pacing.c.host == self.host).with_for_update()).scalar()
            start = max(self.clock() - BURST_SECONDS, current or 0.0)
            end = start + nbytes / self.rate
            if current is None:
                conn.execute(insert(host_pacing).values(host=self.host, next_at=end))
            else:
                conn.execute(update(host_pacing).where(host_pacing.c.host == self.host)
                             .values(next_at=end))
        return start, end

    def _wait_until(self, moment: float) -> None:
        while not self.stopping() and self.active():
            left = moment - self.clock()
            if left <= 0:
                return
            time.sleep(min(left, SLEEP_STEP))
