"""The switch's decisions (switch.py) with scripted passes and clock, on a real account store:
when it catches up, when it holds, when it flips and when it lets go. The same switch against
real servers and processes is in test_cutover.py."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from migrating_proxy.migration.progress import CopyProgress, CopyResult
from migrating_proxy.store import Domain, Store, open_store
from migrating_proxy.store.accounts import now
from migrating_proxy.store.cutover import LEASE_STALE
from migrating_proxy.store.schema import old_sessions
from migrating_proxy.switch import (
    CONVERGED_SECONDS,
    MAX_CATCH_UP_PASSES,
    OldServerSessions,
    Switch,
)

HOLD = 10.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Passes:
    """Scripted mirror passes: each takes `seconds` on the clock and reports `changes`."""

    def __init__(self, clock: Clock, script: list[tuple[float, int, str]]) -> None:
        self.clock, self.script = clock, list(script)
        self.deadlines: list[float | None] = []
        self.held_during: list[bool] = []
        self.store: Store | None = None

    def __call__(self, deadline: float | None) -> CopyResult:
        seconds, changes, state = self.script.pop(0)
        self.deadlines.append(deadline)
        assert self.store is not None
        self.held_during.append(self.store.cutover.held_until("alice@old.example") is not None)
        self.clock.now += seconds
        return CopyResult(state, CopyProgress(), changes=changes,  # type: ignore[arg-type]
                          error="boom" if state == "error" else None)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = open_store(f"sqlite:///{tmp_path / 's.db'}")
    store.accounts.add_domain(Domain("old.example", "imap://192.0.2.1:143"))
    store.accounts.add_account("alice@old.example", "", migration_state="PENDING")
    return store


def _switch(store: Store, script: list[tuple[float, int, str]], sessions_close: bool = True
            ) -> tuple[Switch, Passes, list[str]]:
    clock = Clock()
    passes = Passes(clock, script)
    passes.store = store
    closed: list[str] = []

    def close_sessions(_account_id: int, address: str, _deadline: float) -> bool:
        closed.append(address)
        return sessions_close

    account = store.accounts.get_account("alice@old.example")
    assert account is not None
    return (Switch(store.cutover, account.id, account.address, passes, HOLD, close_sessions,
                   clock=clock), passes, closed)


def _copy(changes: int = 500) -> CopyResult:
    return CopyResult("completed", CopyProgress(), changes=changes)


def _served_by(store: Store) -> str:
    account = store.accounts.get_account("alice@old.example")
    assert account is not None
    return account.served_by


def test_catches_up_while_passes_are_long_and_find_changes_then_holds(store: Store) -> None:
    switch, passes, closed = _switch(store, [
        (CONVERGED_SECONDS + 5, 40, "completed"),  # long, found changes: again
        (CONVERGED_SECONDS + 1, 3, "completed"),  # still long with changes: again
        (0.5, 2, "completed"),  # short: fits in the hold, so the next one is the final pass
        (0.3, 1, "completed"),  # the final pass
    ])
    outcome = switch.run(_copy(), copy_seconds=60)
    assert outcome.state == "switched" and outcome.passes == 4
    assert passes.held_during == [False, False, False, True]  # only the final pass is held
    assert passes.deadlines[:3] == [None, None, None] and passes.deadlines[3] is not None
    assert closed == ["alice@old.example"]
    assert outcome.hold_seconds == pytest.approx(0.3)
    account = store.accounts.get_account("alice@old.example")
    assert account is not None and account.served_by == "store"
    assert account.switched_at is not None
    assert store.cutover.held_until("alice@old.example") is None


def test_a_quick_copy_goes_straight_to_the_final_pass(store: Store) -> None:
    switch, passes, _ = _switch(store, [(0.2, 0, "completed")])
    assert switch.run(_copy(changes=12), copy_seconds=1.0).state == "switched"
    assert passes.held_during == [True]


def test_a_user_who_never_stops_changing_mail_gets_switched_anyway(store: Store) -> None:
    long_busy = [(CONVERGED_SECONDS + 1, 5, "completed")] * MAX_CATCH_UP_PASSES
    switch, passes, _ = _switch(store, [*long_busy, (0.4, 5, "completed")])
    assert switch.run(_copy(), copy_seconds=30).state == "switched"
    assert len(passes.deadlines) == MAX_CATCH_UP_PASSES + 1


def test_a_final_pass_that_overruns_the_hold_releases_it(store: Store) -> None:
    switch, _, closed = _switch(store, [(HOLD + 1, 3, "stopped")])
    outcome = switch.run(_copy(changes=0), copy_seconds=1)
    assert outcome.state == "released" and closed == ["alice@old.example"]
    assert _served_by(store) == "old"
    assert store.cutover.held_until("alice@old.example") is None  # logins go to the old server


def test_a_final_pass_completed_too_late_does_not_switch(store: Store) -> None:
    # Completed, but past the deadline: logins that waited may already have timed out there.
    switch, _, _ = _switch(store, [(HOLD, 0, "completed")])
    assert switch.run(_copy(changes=0), copy_seconds=1).state == "released"
    assert _served_by(store) == "old"


def test_sessions_that_do_not_close_in_time_release_the_hold_before_any_final_pass(
        store: Store) -> None:
    switch, passes, closed = _switch(store, [], sessions_close=False)
    assert switch.run(_copy(changes=0), copy_seconds=1).state == "released"
    assert closed == ["alice@old.example"] and passes.deadlines == []
    assert _served_by(store) == "old" and store.cutover.held_until("alice@old.example") is None


def test_a_failed_final_pass_releases_the_hold_and_reports_the_error(store: Store) -> None:
    switch, _, _ = _switch(store, [(0.1, 0, "error")])
    outcome = switch.run(_copy(changes=0), copy_seconds=1)
    assert outcome.state == "error" and outcome.result.error == "boom"
    assert _served_by(store) == "old" and store.cutover.held_until("alice@old.example") is None


def test_a_catch_up_pass_stopped_by_an_admin_ends_the_attempt_unheld(store: Store) -> None:
    switch, passes, closed = _switch(store, [(CONVERGED_SECONDS + 1, 0, "stopped")])
    outcome = switch.run(_copy(), copy_seconds=30)
    assert outcome.state == "stopped" and closed == [] and passes.held_during == [False]
    assert _served_by(store) == "old"


def test_an_account_switched_meanwhile_is_left_alone(store: Store) -> None:
    account = store.accounts.get_account("alice@old.example")
    assert account is not None and store.cutover.switch(account.id, held=False)
    switch, passes, closed = _switch(store, [])
    assert switch.run(_copy(changes=0), copy_seconds=1).state == "gone"
    assert passes.deadlines == [] and closed == []


# --- closing the old-server sessions (OldServerSessions, with leases) ------------------------


def test_closing_waits_for_every_lease_to_be_given_back(store: Store) -> None:
    account = store.accounts.get_account("alice@old.example")
    assert account is not None
    first = store.cutover.lease(account.id, "host-a:1")
    second = store.cutover.lease(account.id, "host-b:2")
    assert first is not None and second is not None
    waited: list[float] = []
    clock = Clock()

    def sleep(seconds: float) -> None:  # the sessions go one by one while the switch waits
        waited.append(seconds)
        clock.now += seconds
        if len(waited) == 3:
            store.cutover.release_leases([first])
        if len(waited) == 5:
            store.cutover.release_leases([second])

    sessions = OldServerSessions(store, clock=clock, sleep=sleep)
    assert sessions.close(account.id, account.address, deadline=clock.now + 5)
    assert len(waited) == 5
    [request] = store.sessions.requests_since(now() - timedelta(minutes=1))
    assert request.address_key == "alice@old.example" and "moved" in request.reason


def test_closing_gives_up_at_the_deadline(store: Store) -> None:
    account = store.accounts.get_account("alice@old.example")
    assert account is not None and store.cutover.lease(account.id, "host-a:1") is not None
    clock = Clock()

    def sleep(seconds: float) -> None:
        clock.now += seconds

    sessions = OldServerSessions(store, clock=clock, sleep=sleep)
    assert not sessions.close(account.id, account.address, deadline=clock.now + 1)


def test_no_lease_while_held_or_switched_and_stale_leases_do_not_count(store: Store) -> None:
    account = store.accounts.get_account("alice@old.example")
    assert account is not None
    lease = store.cutover.lease(account.id, "host-a:1")
    assert lease is not None and store.cutover.old_server_sessions(account.id) == 1
    assert store.cutover.hold(account.id, now() + timedelta(seconds=10))
    assert store.cutover.lease(account.id, "host-a:1") is None  # held: decide again later
    with store.engine.begin() as conn:  # its process stopped refreshing it long ago
        conn.execute(update(old_sessions).values(seen_at=now() - LEASE_STALE))
    assert store.cutover.old_server_sessions(account.id) == 0
    store.cutover.refresh_leases([lease])  # ...unless it is alive after all
    assert store.cutover.old_server_sessions(account.id) == 1
    assert store.cutover.switch(account.id)
    store.cutover.release(account.id)
    assert store.cutover.lease(account.id, "host-a:1") is None  # on the store now


def test_leases_of_a_dead_process_on_this_host_are_dropped_at_start(store: Store) -> None:
    account = store.accounts.get_account("alice@old.example")
    assert account is not None
    dead = store.cutover.lease(account.id, "here:111")
    alive = store.cutover.lease(account.id, "here:222")
    elsewhere = store.cutover.lease(account.id, "there:111")
    assert None not in (dead, alive, elsewhere)
    assert store.cutover.drop_dead_leases("here", lambda pid: pid == 222) == 1
    assert store.cutover.old_server_sessions(account.id) == 2  # another host's: its own
