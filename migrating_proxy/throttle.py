"""The failed-login throttle: stop password guessing without letting anyone lock a user out.

Every login reserves a slot here before its password is checked and settles it afterwards:
a failure keeps counting, a success or an undecided login (database or old server down) gives
the slot back. Deciding and reserving are one step under one lock, and a reserved slot counts
against the limits while its password is being checked. So fifty simultaneous guesses from one
address get exactly `max_per_peer` password checks: the first ten proceed, the others wait for
them, and once those ten have failed the waiting ones are refused unchecked. Fifty simultaneous
*right* passwords from one address (an office behind one NAT on a Monday morning) are not
refused: they proceed ten at a time, as earlier ones succeed and give their slots back.

Two counts over a sliding `window`:

- per peer (the client's address, across all accounts): at `max_per_peer` failures the address
  is refused without a password check, for any account. Only the address that guessed pays.
- per account (across all addresses): at `max_per_account` failures the account is *under
  attack*. It is not locked: from then on an address that has failed on this account within
  the window is refused for it, and every other address still has its password checked (one
  attempt at a time per address). So the real user, from any address that has not guessed
  wrong, gets in with the right password, while an attacker gets one more guess at the account
  per fresh address it can bring.

What an attacker can do in one window: `max_per_peer` guesses per address it controls, spread
over any accounts; against one account, `max_per_account` guesses in all plus one per further
address. What it cannot do: make the proxy refuse a correct password from an address that has
not failed on that account itself.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

Key = tuple[str, ...]

# How long an attempt may wait for a slot held by a login still being checked (an old server
# answers within its source_timeout, 20 s by default): past this it is refused as throttled.
MAX_WAIT = 30.0


class _Verdict(Enum):
    PROCEED = "proceed"
    WAIT = "wait"  # within the limits only if attempts being checked now succeed
    REFUSE = "refuse"


@dataclass(frozen=True)
class Attempt:
    """A reserved slot, held while the password is checked, until settled."""

    peer: str
    account: str

    @property
    def peer_key(self) -> Key:
        return ("peer", self.peer)

    @property
    def account_key(self) -> Key:
        return ("account", self.account)

    @property
    def pair_key(self) -> Key:
        return ("pair", self.account, self.peer)


class FailureThrottle:
    """Thread-safe (logins are decided in a thread pool); 0 switches a limit off."""

    def __init__(self, window: float, max_per_peer: int, max_per_account: int,
                 clock: Callable[[], float] = time.monotonic, max_wait: float = MAX_WAIT) -> None:
        self.window = window
        self.max_per_peer = max_per_peer
        self.max_per_account = max_per_account
        self.clock = clock  # for the window (tests pass a fake one)
        self.max_wait = max_wait  # real seconds
        self._failures: dict[Key, deque[float]] = {}
        self._checking: Counter[Key] = Counter()  # slots held by attempts being checked
        self._changed = threading.Condition()
        self._swept = clock()

    def reserve(self, peer: str, account: str) -> Attempt | None:
        """A slot for checking this login's password, or None: refuse it unchecked."""
        attempt = Attempt(peer, account)
        deadline = time.monotonic() + self.max_wait
        with self._changed:
            while True:
                self._sweep()
                verdict = self._verdict(attempt)
                if verdict is _Verdict.REFUSE:
                    return None
                if verdict is _Verdict.PROCEED:
                    self._checking.update(self._tracked(attempt))
                    return attempt
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._changed.wait(remaining)

    def failed(self, attempt: Attempt) -> None:
        """The password was wrong: the slot becomes a failure, counted for `window`."""
        with self._changed:
            self._release(attempt)
            stamp = self.clock()
            for key in self._tracked(attempt):
                self._failures.setdefault(key, deque()).append(stamp)

    def succeeded(self, attempt: Attempt) -> None:
        """Give the slot back, and forgive this address its earlier failures on this account
        (the user mistyped, then proved the password from there). Neither the address's count
        across accounts nor the account's count from other addresses is forgiven: a peer that
        owns one account must not reset its guesses at others, and the real user logging in
        must not reopen the account to the addresses that attacked it."""
        with self._changed:
            self._release(attempt)
            self._failures.pop(attempt.pair_key, None)

    def cancel(self, attempt: Attempt) -> None:
        """Nothing was decided (database or old server unavailable): give the slot back."""
        with self._changed:
            self._release(attempt)

    def _verdict(self, attempt: Attempt) -> _Verdict:
        verdicts = []
        if self.max_per_peer:
            verdicts.append(self._limit(self._count(attempt.peer_key),
                                        self._checking[attempt.peer_key], self.max_per_peer))
        if self.max_per_account:
            verdicts.append(self._account_verdict(attempt))
        for verdict in (_Verdict.REFUSE, _Verdict.WAIT):
            if verdict in verdicts:
                return verdict
        return _Verdict.PROCEED

    @staticmethod
    def _limit(failed: int, checking: int, limit: int) -> _Verdict:
        if failed >= limit:
            return _Verdict.REFUSE
        return _Verdict.PROCEED if failed + checking < limit else _Verdict.WAIT

    def _account_verdict(self, attempt: Attempt) -> _Verdict:
        account = self._limit(self._count(attempt.account_key),
                              self._checking[attempt.account_key], self.max_per_account)
        if account is _Verdict.PROCEED:
            return account
        # Under attack (or about to be): an address gets its own attempts checked only while
        # it has no failure on the account, and one at a time.
        if self._count(attempt.pair_key):
            return _Verdict.REFUSE if account is _Verdict.REFUSE else _Verdict.WAIT
        return _Verdict.WAIT if self._checking[attempt.pair_key] else _Verdict.PROCEED

    def _tracked(self, attempt: Attempt) -> list[Key]:
        """The keys an attempt counts under: only those of limits that are switched on."""
        return ([attempt.peer_key] if self.max_per_peer else []) \
            + ([attempt.account_key, attempt.pair_key] if self.max_per_account else [])

    def _release(self, attempt: Attempt) -> None:
        self._checking.subtract(self._tracked(attempt))
        for key in self._tracked(attempt):
            if self._checking[key] <= 0:
                del self._checking[key]
        self._changed.notify_all()

    def _sweep(self) -> None:
        """Once per window, forget every key whose failures have all expired: a spray of
        random usernames (each failing once, never looked at again) must not pile up."""
        if self.clock() - self._swept < self.window:
            return
        self._swept = self.clock()
        for key in list(self._failures):
            self._count(key)

    def _count(self, key: Key) -> int:
        """Failures of key within the window."""
        stamps = self._failures.get(key)
        if stamps is None:
            return 0
        horizon = self.clock() - self.window
        while stamps and stamps[0] < horizon:
            stamps.popleft()
        if not stamps:  # with _sweep, keeps memory bounded under a spray of random usernames
            del self._failures[key]
        return len(stamps)
