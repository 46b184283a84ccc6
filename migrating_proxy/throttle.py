"""The failed-login throttle: stop password guessing without letting anyone lock a user out.

Every login attempt first reserves a slot here, before its password is checked; the slot counts
as a failure from that moment. A success (or an attempt we could not decide) gives it back, a
failure keeps it. Reserving and counting are one step under one lock, so fifty simultaneous
guesses from one address get exactly `max_per_peer` password checks, not "whoever asked before
the first answer came back".

Two counts over a sliding `window`, both keyed by what the attacker cannot choose freely:

- per peer (the client's address, across all accounts): at `max_per_peer` failures the address
  is refused without a password check, for any account. Only the address that guessed pays.
- per account (across all addresses): at `max_per_account` failures the account is *under
  attack*. It is not locked: from then on an address that has failed on this account within the
  window is refused for it, and every other address still has its password checked. So the real
  user, from any address that has not guessed wrong, always gets in with the right password,
  while an attacker gets one more guess at the account per fresh address it can bring.

What an attacker can do in one window: `max_per_peer` guesses per address it controls, spread
over any accounts; against one account, `max_per_account` guesses in all plus one per further
address. What it cannot do: make the proxy refuse a correct password from an address that has
not failed on that account itself.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

Key = tuple[str, ...]


@dataclass(frozen=True)
class Attempt:
    """A reserved slot: counted as a failure unless given back (`succeeded`, `cancel`)."""

    peer: str
    account: str
    stamp: float

    def keys(self) -> tuple[Key, Key, Key]:
        return ("peer", self.peer), ("account", self.account), ("pair", self.account, self.peer)


class FailureThrottle:
    """Thread-safe (logins are decided in a thread pool); 0 switches a limit off."""

    def __init__(self, window: float, max_per_peer: int, max_per_account: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self.max_per_peer = max_per_peer
        self.max_per_account = max_per_account
        self.clock = clock
        self._failures: dict[Key, deque[float]] = {}
        self._lock = threading.Lock()
        self._swept = clock()

    def reserve(self, peer: str, account: str) -> Attempt | None:
        """A slot for checking this login's password, or None: refuse it unchecked."""
        with self._lock:
            self._sweep()
            attempt = Attempt(peer, account, self.clock())
            peer_key, account_key, pair_key = attempt.keys()
            if self.max_per_peer and self._count(peer_key) >= self.max_per_peer:
                return None
            if (self.max_per_account and self._count(account_key) >= self.max_per_account
                    and self._count(pair_key)):
                return None
            for key in self._tracked(attempt):
                self._failures.setdefault(key, deque()).append(attempt.stamp)
            return attempt

    def succeeded(self, attempt: Attempt) -> None:
        """Give the slot back, and forgive this address its earlier failures on this account
        (the user mistyped, then proved the password from there). Neither the address's count
        across accounts nor the account's count from other addresses is forgiven: a peer that
        owns one account must not reset its guesses at others, and the real user logging in
        must not reopen the account to the addresses that attacked it."""
        with self._lock:
            self._give_back(attempt)
            self._failures.pop(attempt.keys()[2], None)

    def cancel(self, attempt: Attempt) -> None:
        """Nothing was decided (database or old server unavailable): give the slot back."""
        with self._lock:
            self._give_back(attempt)

    def _tracked(self, attempt: Attempt) -> list[Key]:
        """The keys an attempt counts under: only those of limits that are switched on."""
        peer_key, account_key, pair_key = attempt.keys()
        return ([peer_key] if self.max_per_peer else []) \
            + ([account_key, pair_key] if self.max_per_account else [])

    def _give_back(self, attempt: Attempt) -> None:
        for key in self._tracked(attempt):
            stamps = self._failures.get(key)
            if stamps is not None and attempt.stamp in stamps:
                stamps.remove(attempt.stamp)
                if not stamps:
                    del self._failures[key]

    def _sweep(self) -> None:
        """Once per window, forget every key whose failures have all expired: a spray of
        random usernames (each failing once, never looked at again) must not pile up."""
        if self.clock() - self._swept < self.window:
            return
        self._swept = self.clock()
        for key in list(self._failures):
            self._count(key)

    def _count(self, key: Key) -> int:
        stamps = self._failures.get(key)
        if stamps is None:
            return 0
        horizon = self.clock() - self.window
        while stamps and stamps[0] < horizon:
            stamps.popleft()
        if not stamps:  # with _sweep, keeps memory bounded under a spray of random usernames
            del self._failures[key]
        return len(stamps)
