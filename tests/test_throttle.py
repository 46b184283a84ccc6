"""The failed-login throttle: guesses are capped, and nobody can lock a real user out.

Unit tests drive `FailureThrottle` with a fake clock. The end-to-end tests attack a real
`serve`: fifty simultaneous wrong passwords from one address (the old server's own log counts
the password checks that reached it), and an account attacked from several addresses whose
owner still logs in from a clean one. Loopback has all of 127.0.0.0/8, so clients bind to
127.0.0.2, 127.0.0.3... to be different peers.
"""

from __future__ import annotations

import imaplib
import json
import random
import socket
import string
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from migrating_proxy.throttle import Attempt, FailureThrottle
from tests.support import dovecot
from tests.support.dovecot import DovecotInstance
from tests.support.proxy import Proxy

PEER, OTHER_PEER, CLEAN_PEER = "192.0.2.1", "192.0.2.2", "198.51.100.7"
ALICE = "alice@x.example"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def throttle(clock: FakeClock, per_peer: int = 3, per_account: int = 5,
             window: float = 300.0) -> FailureThrottle:
    return FailureThrottle(window, per_peer, per_account, clock=clock)


def fail(limiter: FailureThrottle, peer: str, account: str = ALICE, times: int = 1) -> None:
    """Failed logins: each reserves a slot, then its password turns out wrong."""
    for _ in range(times):
        attempt = limiter.reserve(peer, account)
        assert attempt is not None
        limiter.failed(attempt)


def succeed(limiter: FailureThrottle, peer: str, account: str = ALICE) -> None:
    attempt = limiter.reserve(peer, account)
    assert attempt is not None
    limiter.succeeded(attempt)


def simultaneously(limiter: FailureThrottle, peer: str, count: int, right: bool,
                   account: str = ALICE) -> tuple[int, int]:
    """`count` logins from one peer at the same instant, each password checked as long as
    the slowest of a group (all wrong, or all right): (password checks, refusals)."""
    start = threading.Barrier(count)
    checks: list[Attempt] = []
    refused: list[None] = []
    lock = threading.Lock()

    def login() -> None:
        start.wait()
        attempt = limiter.reserve(peer, account)
        if attempt is None:
            refused.append(None)
            return
        with lock:
            checks.append(attempt)
        time.sleep(0.05)  # the password check
        (limiter.succeeded if right else limiter.failed)(attempt)

    threads = [threading.Thread(target=login) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(checks), len(refused)


# --- per peer -------------------------------------------------------------------------------
def test_peer_is_refused_at_its_limit_across_accounts() -> None:
    limiter = throttle(FakeClock(), per_peer=3, per_account=100)
    fail(limiter, PEER, "a@x.example")
    fail(limiter, PEER, "b@x.example", times=2)
    assert limiter.reserve(PEER, "c@x.example") is None
    assert limiter.reserve(OTHER_PEER, "c@x.example") is not None


def test_simultaneous_wrong_passwords_get_no_more_checks_than_the_limit() -> None:
    """The race of the old check-then-count design: every guess arrives at the same instant."""
    limiter = throttle(FakeClock(), per_peer=10, per_account=0)
    assert simultaneously(limiter, PEER, 50, right=False) == (10, 40)


def test_simultaneous_right_passwords_from_one_address_all_get_in() -> None:
    """An office behind one NAT logs in at 9:00: they wait for each other, nobody is refused."""
    limiter = throttle(FakeClock(), per_peer=10, per_account=20)
    assert simultaneously(limiter, PEER, 50, right=True) == (50, 0)


def test_an_attempt_waits_no_longer_than_max_wait() -> None:
    limiter = FailureThrottle(300, 1, 0, clock=FakeClock(), max_wait=0.2)
    held = limiter.reserve(PEER, ALICE)  # a check that never ends
    assert held is not None
    started = time.monotonic()
    assert limiter.reserve(PEER, ALICE) is None
    assert time.monotonic() - started >= 0.2


def test_window_slides_one_failure_at_a_time() -> None:
    clock = FakeClock()
    limiter = throttle(clock, per_peer=3, window=300)
    for _ in range(3):
        fail(limiter, PEER)
        clock.advance(100)
    # Failures at t0, t0+100, t0+200; now t0+300: all three are still inside the window.
    assert limiter.reserve(PEER, ALICE) is None
    clock.advance(1)  # the first one has left the window
    fail(limiter, PEER)
    assert limiter.reserve(PEER, ALICE) is None
    clock.advance(301)
    assert limiter.reserve(PEER, ALICE) is not None


def test_success_gives_its_slot_back_but_forgives_no_earlier_failure_of_the_peer() -> None:
    limiter = throttle(FakeClock(), per_peer=3, per_account=100)
    fail(limiter, PEER, "victim@x.example", times=2)
    for _ in range(5):  # a peer that owns an account logs in to it again and again
        succeed(limiter, PEER, "own@x.example")
    fail(limiter, PEER, "victim@x.example")
    assert limiter.reserve(PEER, "victim@x.example") is None


def test_an_undecided_attempt_gives_its_slot_back() -> None:
    limiter = throttle(FakeClock(), per_peer=2, per_account=0)
    for _ in range(10):  # the database or the old server is down: no password was found wrong
        attempt = limiter.reserve(PEER, ALICE)
        assert attempt is not None
        limiter.cancel(attempt)
    fail(limiter, PEER, times=2)
    assert limiter.reserve(PEER, ALICE) is None


# --- per account: under attack, never locked ----------------------------------------------
def test_attacked_account_refuses_the_addresses_that_failed_on_it() -> None:
    limiter = throttle(FakeClock(), per_peer=100, per_account=4)
    attackers = [f"203.0.113.{n}" for n in range(1, 5)]
    for peer in attackers:
        fail(limiter, peer)
    for peer in attackers:
        assert limiter.reserve(peer, ALICE) is None  # even if the guess would be right
        assert limiter.reserve(peer, "bob@x.example") is not None  # other accounts: per peer


def test_nobody_can_lock_a_user_out() -> None:
    """Failures from hundreds of addresses: a clean address still gets its password checked,
    and the user's success reopens nothing for the attackers."""
    limiter = throttle(FakeClock(), per_peer=10, per_account=20)
    attackers = [f"203.0.113.{n}" for n in range(200)]
    for peer in attackers:
        for _ in range(10):
            attempt = limiter.reserve(peer, ALICE)
            if attempt is not None:
                limiter.failed(attempt)
    succeed(limiter, CLEAN_PEER)
    assert all(limiter.reserve(peer, ALICE) is None for peer in attackers)
    succeed(limiter, CLEAN_PEER)  # and again next time


def test_an_attacker_gets_one_guess_per_fresh_address_once_the_account_is_attacked() -> None:
    limiter = throttle(FakeClock(), per_peer=10, per_account=5)
    checked = 0
    for n in range(50):
        for _ in range(10):
            attempt = limiter.reserve(f"203.0.113.{n}", ALICE)
            if attempt is not None:
                limiter.failed(attempt)
                checked += 1
    # 5 to reach the account's limit (all from the first address), then one per address.
    assert checked == 5 + 49


def test_simultaneous_guesses_at_an_attacked_account_get_one_check_per_address() -> None:
    limiter = throttle(FakeClock(), per_peer=0, per_account=5)
    fail(limiter, "203.0.113.1", times=5)
    assert simultaneously(limiter, PEER, 20, right=False) == (1, 19)
    # The owner's mail client opens several connections at once: one after the other, all in.
    assert simultaneously(limiter, CLEAN_PEER, 5, right=True) == (5, 0)


def test_the_users_own_typo_during_an_attack_closes_only_that_address() -> None:
    limiter = throttle(FakeClock(), per_peer=10, per_account=3)
    fail(limiter, CLEAN_PEER)  # the user mistypes
    fail(limiter, "203.0.113.1", times=2)  # the account is now under attack
    assert limiter.reserve(CLEAN_PEER, ALICE) is None  # that address waits out the window
    succeed(limiter, "198.51.100.99")  # another address of the user's works


def test_a_success_forgives_the_address_its_own_typos() -> None:
    limiter = throttle(FakeClock(), per_peer=10, per_account=3)
    fail(limiter, CLEAN_PEER)
    succeed(limiter, CLEAN_PEER)  # before the attack
    fail(limiter, "203.0.113.1", times=2)  # under attack now, the user's typo counted in
    assert limiter.reserve("203.0.113.1", ALICE) is None
    succeed(limiter, CLEAN_PEER)


def test_zero_limits_disable_throttling() -> None:
    limiter = throttle(FakeClock(), per_peer=0, per_account=0)
    fail(limiter, PEER, times=1000)
    assert limiter.reserve(PEER, ALICE) is not None
    assert limiter._failures == {}  # nothing is even tracked


def test_zero_peer_limit_keeps_the_account_limit() -> None:
    limiter = throttle(FakeClock(), per_peer=0, per_account=2)
    fail(limiter, PEER, times=2)
    assert limiter.reserve(PEER, ALICE) is None
    assert limiter.reserve(PEER, "b@x.example") is not None


def random_name(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_lowercase, k=12)) + "@spray.example"


def test_memory_does_not_grow_with_random_usernames_once_the_window_passes() -> None:
    clock = FakeClock()
    limiter = throttle(clock, per_peer=0, per_account=5, window=60)
    rng = random.Random(1)
    sizes = []
    for _ in range(5):  # five windows' worth of a spray of never-repeated usernames
        for _ in range(500):
            fail(limiter, f"198.51.100.{rng.randrange(256)}", random_name(rng))
            clock.advance(0.01)
        sizes.append(len(limiter._failures))
        clock.advance(61)
    # Each spray tracks at most its own 500 accounts and 500 (account, address) pairs.
    assert max(sizes) <= 1000
    fail(limiter, "198.51.100.1", random_name(rng))
    assert len(limiter._failures) <= 2
    assert not limiter._checking


def test_no_failure_is_lost_between_threads() -> None:
    limiter = throttle(FakeClock(), per_peer=0, per_account=400)

    def fail_many() -> None:
        for _ in range(100):
            fail(limiter, PEER)

    threads = [threading.Thread(target=fail_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert limiter.reserve(PEER, ALICE) is None
    assert limiter.reserve(OTHER_PEER, ALICE) is not None


# --- through a real serve ---------------------------------------------------------------------
OLD_USER, OLD_PASSWORD = "alice@old.example", "alice-pw"
LOCAL_USER, LOCAL_PASSWORD = "dora@new.example", "dora's real password"


class IMAPFrom(imaplib.IMAP4):
    """imaplib from a chosen source address (127.0.0.0/8 is all loopback)."""

    def __init__(self, port: int, source: str) -> None:
        self.source = source
        super().__init__("127.0.0.1", port, timeout=30)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout,
                                        source_address=(self.source, 0))


def login_answer(port: int, source: str, user: str, password: str) -> str:
    """"OK", or the bracketed code of the refusal (AUTHENTICATIONFAILED, UNAVAILABLE)."""
    client = IMAPFrom(port, source)
    try:
        client.login(user, password)
    except imaplib.IMAP4.error as exc:
        return str(exc).split("[", 1)[1].split("]", 1)[0] if "[" in str(exc) else str(exc)
    finally:
        client.shutdown()
    return "OK"


def login_outcomes(proxy: Proxy) -> Counter[str]:
    events = (json.loads(line) for line in proxy.log_text().splitlines() if line.startswith("{"))
    return Counter(e["outcome"] for e in events if e.get("event") == "login")


@pytest.fixture(scope="module")
def module_old_server() -> Iterator[DovecotInstance]:
    with dovecot.running_old_server({OLD_USER: OLD_PASSWORD}, "mp-thr-") as instance:
        yield instance


def test_fifty_simultaneous_guesses_from_one_address_get_ten_password_checks(
        tmp_path: Path, module_store: DovecotInstance, module_old_server: DovecotInstance) -> None:
    old_server = module_old_server
    limits = {"max_failures_per_peer": 10, "max_failures_per_account": 20,
              "auth_failure_delay": 0.5}
    proxy = Proxy(tmp_path / "p", module_store, overrides={"limits": limits})
    proxy.cli("domain", "add", "old.example", "--source",
              f"imap://127.0.0.1:{old_server.imap_port}")
    checks_before = old_server.log_path.read_text().count("Password mismatch")
    with proxy:
        start = threading.Barrier(50)
        answers: list[str] = []

        def guess(n: int) -> None:
            start.wait()
            answers.append(login_answer(proxy.imap_port, "127.0.0.2", OLD_USER, f"guess-{n}"))

        threads = [threading.Thread(target=guess, args=(n,)) for n in range(50)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        # The old server's own log: how many of the guesses it was asked to check.
        checks = old_server.log_path.read_text().count("Password mismatch") - checks_before
        assert checks == 10
        assert Counter(answers) == {"AUTHENTICATIONFAILED": 10, "UNAVAILABLE": 40}
        proxy.wait_for_log('"outcome": "throttled"')
        assert login_outcomes(proxy) == {"failed": 10, "throttled": 40}
        # The account was never created, and the real user is not locked out.
        assert login_answer(proxy.imap_port, "127.0.0.3", OLD_USER, OLD_PASSWORD) == "OK"


def test_attackers_on_other_addresses_cannot_lock_the_user_out(
        tmp_path: Path, module_store: DovecotInstance) -> None:
    limits = {"max_failures_per_peer": 10, "max_failures_per_account": 4,
              "auth_failure_delay": 0.0}
    with Proxy(tmp_path / "p", module_store, overrides={"limits": limits}) as proxy:
        proxy.add_account(LOCAL_USER, LOCAL_PASSWORD)
        attackers = ["127.0.0.2", "127.0.0.3"]
        for attacker in attackers:  # two addresses, each well under its own limit of 10
            for n in range(3):
                answer = login_answer(proxy.imap_port, attacker, LOCAL_USER, f"guess {n}")
                assert answer in ("AUTHENTICATIONFAILED", "UNAVAILABLE")
        # The account is under attack: the addresses that guessed are refused even when right,
        assert login_answer(proxy.imap_port, attackers[0], LOCAL_USER, LOCAL_PASSWORD) \
            == "UNAVAILABLE"
        # but the user, from an address that has not failed on the account, gets in and works.
        client = IMAPFrom(proxy.imap_port, "127.0.0.9")
        client.login(LOCAL_USER, LOCAL_PASSWORD)
        assert client.select("INBOX")[0] == "OK"
        client.logout()
        assert login_answer(proxy.imap_port, "127.0.0.10", LOCAL_USER, LOCAL_PASSWORD) == "OK"
