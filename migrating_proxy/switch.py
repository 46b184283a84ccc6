"""The switch: moving a passthrough account from the old server to the store, once.

Dovecot's documented cutover is "sync, flip, kick, final sync"; this is the same with the
kick and the final sync inside a short hold, so no change made at the old server is lost and
no client ever sees a half-copied store:

1. catch up: after the copy, repeat mirror passes while they keep finding changes and the last
   one took longer than CONVERGED_SECONDS (a pass that short fits in the hold);
2. hold (`migration.switch_hold`): new logins of the account wait (store/cutover.py);
3. close every session of the account relayed to the old server, on every proxy process, and
   wait until they are gone (their connections to the old server closed);
4. the final pass: one pluggable step (the IMAP mirror pass, a dsync `backup -R`, or the
   mirror pass followed by keeping the old POP3 UIDLs: worker.py, migration/pop3_uidls.py),
   stopped if it runs past the hold;
5. flip, in one guarded transaction: served by the store, switched_at, COMPLETED. If the final
   pass did not fit (or an admin paused the pass meanwhile), release the hold instead: logins
   go to the old server again, and the switch is tried again later (after `start`).

What the account owes after the flip (the "your mailbox has moved" notice, erasing the
password) is the caller's, after `run` returns "switched": nothing may write to the store
before the final pass.

Crash safety: the account is served by exactly one side at every instant, because the flip is
one UPDATE. A process killed before it leaves the account on the old server with a hold that
runs out by itself (at most `switch_hold`); killed after it, the account is on the store and
the store is exact, since the final pass completed before the flip. The next attempt starts
again at step 1 and mirror passes are idempotent.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal

import structlog

from migrating_proxy import failpoints
from migrating_proxy.migration.progress import CopyResult
from migrating_proxy.store import Store
from migrating_proxy.store.accounts import now
from migrating_proxy.store.cutover import CutoverStore

log = structlog.get_logger(__name__)

CONVERGED_SECONDS = 3.0  # a mirror pass this quick is small enough to repeat inside the hold
MAX_CATCH_UP_PASSES = 5  # a user who keeps changing mail must not hold off the switch forever
# Part of the hold kept free for the flip itself: the final pass must end before it.
FLIP_MARGIN = 0.2

# One mirror pass that stops at a batch boundary once time.monotonic() passes the deadline
# (None: no deadline), leaving "stopped" as its state.
MirrorPass = Callable[[float | None], CopyResult]


# What an IMAP client reads (`* BYE ...`) when its old-server session is closed at the switch.
MOVED_BYE = "Your mailbox has moved to the new mail server; please log in again."
SESSIONS_POLL = 0.05  # seconds between looks at whether the old-server sessions are gone


@dataclass
class OldServerSessions:
    """Ending an account's sessions relayed to its old server, on every `serve` process, and
    knowing when they are gone: the front-ends' close request (store/sessions.py), then their
    leases (store/cutover.py), each given back once its connection to the old server closed."""

    store: Store
    clock: Callable[[], float] = field(default=time.monotonic)
    sleep: Callable[[float], None] = field(default=time.sleep)

    def close(self, account_id: int, address: str, deadline: float) -> bool:
        """Close them; True once none is left, False if some still are at the deadline."""
        if not self.store.cutover.old_server_sessions(account_id):
            return True
        self.store.sessions.request_close(address, MOVED_BYE)
        while self.clock() < deadline:
            self.sleep(SESSIONS_POLL)
            if not self.store.cutover.old_server_sessions(account_id):
                return True
        return False


@dataclass
class SwitchOutcome:
    state: Literal["switched", "released", "stopped", "error", "gone"]
    result: CopyResult  # the last pass
    hold_seconds: float | None = None  # how long logins were held, when it got that far
    passes: int = 0  # mirror passes after the copy, the final one included


@dataclass
class Switch:
    cutover: CutoverStore
    account_id: int
    address: str
    mirror_pass: MirrorPass  # the catch-up passes
    hold: float  # migration.switch_hold, seconds
    # (account id, address, deadline) -> whether every old-server session was gone in time
    close_sessions: Callable[[int, str, float], bool]
    final_pass: MirrorPass | None = None  # default: mirror_pass
    clock: Callable[[], float] = field(default=time.monotonic)

    def run(self, copy: CopyResult, copy_seconds: float) -> SwitchOutcome:
        """Switch after a completed copy (`copy`, which took copy_seconds)."""
        result, took, passes = copy, copy_seconds, 0
        while result.changes and took > CONVERGED_SECONDS and passes < MAX_CATCH_UP_PASSES:
            started = self.clock()
            result = self.mirror_pass(None)
            took, passes = self.clock() - started, passes + 1
            log.info("switch_catch_up_pass", changes=result.changes, seconds=round(took, 3),
                     state=result.state)
            if result.state != "completed":
                return SwitchOutcome(result.state, result, passes=passes)
        return self._held_final_pass(result, passes)

    def _held_final_pass(self, last: CopyResult, passes: int) -> SwitchOutcome:
        started = self.clock()
        deadline = started + self.hold - FLIP_MARGIN
        if not self.cutover.hold(self.account_id, now() + timedelta(seconds=self.hold)):
            return SwitchOutcome("gone", last, passes=passes)  # switched by someone else
        failpoints.reach("switch.held")
        if not self.close_sessions(self.account_id, self.address, deadline):
            self.cutover.release(self.account_id)
            log.warning("switch_released", hold_seconds=round(self.clock() - started, 3),
                        reason="sessions at the old server did not close in time")
            return SwitchOutcome("released", last, self.clock() - started, passes)
        result = (self.final_pass or self.mirror_pass)(deadline)
        failpoints.reach("switch.final_pass_done")
        fits = result.state == "completed" and self.clock() < deadline
        if fits and self.cutover.switch(self.account_id):
            held = self.clock() - started
            failpoints.reach("switch.switched")
            log.info("switch_done", hold_seconds=round(held, 3), final_changes=result.changes,
                     passes=passes + 1)
            return SwitchOutcome("switched", result, held, passes + 1)
        self.cutover.release(self.account_id)
        held = self.clock() - started
        reason = result.error or ("the hold ran out, or an admin paused the pass" if fits
                                  else "the final pass did not fit in the hold")
        log.warning("switch_released", hold_seconds=round(held, 3), state=result.state,
                    reason=reason)
        state = "error" if result.state == "error" else "released"
        return SwitchOutcome(state, result, held, passes + 1)
