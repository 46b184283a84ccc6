"""The transparent cutover end to end (issue 9): a real Dovecot old server and store, the proxy's
CLI, `serve` and its copy workers as an operator runs them.

An account of a passthrough domain is served by the old server until its copy is complete;
its mail goes there too. Then the switch: a final mirror pass inside the hold, the flip, and
the "your mailbox has moved" notice after it. kill -9 of the worker at each point of the
switch leaves the account on one side only, and a restart finishes the job exactly.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from imapclient import IMAPClient

from tests.support.cutover import (
    MOVED,
    MOVING,
    User,
    count,
    events,
    import_and_migrate,
    last_in_inbox,
    passthrough_proxy,
    pool,
    send,
    stop,
    vault_entries,
    without,
    work_until_settled,
    worker,
)
from tests.support.dovecot import DovecotInstance


@pytest.fixture
def old(module_old: DovecotInstance) -> DovecotInstance:
    return module_old


@pytest.fixture
def store(module_store: DovecotInstance) -> DovecotInstance:
    return module_store


# --- served by the old server until the switch --------------------------------------------


def test_passthrough_account_is_served_by_the_old_server_until_its_switch(
        old: DovecotInstance, store: DovecotInstance, tmp_path: Path) -> None:
    user = User(old, store)
    proxy = passthrough_proxy(tmp_path / "proxy", old, store)
    with proxy:
        with IMAPClient("127.0.0.1", proxy.imap_port, ssl=False, timeout=30) as client:
            client.login(user.address, user.password)  # the first login: account, job
        [row] = proxy.status(user.address)
        assert (row["state"], row["served_by"], row["switched_at"]) == ("PENDING", "old", None)

        # Mail follows the account: to the old server while it serves it.
        send(proxy, user.address, "before the switch")
        assert user.has_message("old", "before the switch")
        user.change_something("changed at the old server")

        row = work_until_settled(proxy, user.address)
        assert row["state"] == "COMPLETED" and row["served_by"] == "store", row
        assert row["switched_at"] is not None and row["last_error"] is None
        assert (row["engine"], row["uids_kept"]) == ("imap", False)  # null only before a pass

        final = user.old_snapshot()
        moved = user.store_snapshot()
        assert without(moved, MOVED) == final  # every folder, message, flag and date
        assert count(moved, MOVED) == 1 and count(moved, MOVING) == 0
        assert MOVED in last_in_inbox(user)  # put in after the final pass
        assert count(moved, b"before the switch") == 1  # relayed there, copied once

        send(proxy, user.address, "after the switch")  # and now to the store
        assert user.has_message("store", "after the switch")
        assert not user.has_message("old", "after the switch")
    [done] = events(proxy, "switch_done")
    assert 0 < done["hold_seconds"] < 10
    assert vault_entries(proxy) == 0  # the password went with the switch
    assert user.password not in proxy.log_text()


def test_immediate_domain_keeps_today_s_behaviour(old: DovecotInstance, store: DovecotInstance,
                                                  tmp_path: Path) -> None:
    """No switch: served by the store from the first login, the "moving" notice first."""
    user = User(old, store)
    proxy = passthrough_proxy(tmp_path / "proxy", old, store)
    proxy.cli("domain", "set", "old.example", "--cutover", "immediate")
    import_and_migrate(proxy, user, tmp_path)
    [row] = proxy.status(user.address)
    assert row["served_by"] == "store"
    row = work_until_settled(proxy, user.address)
    assert (row["state"], row["served_by"], row["switched_at"]) == ("COMPLETED", "store", None)
    assert row["engine"] == "imap"  # null only before the first pass
    copied = user.store_snapshot()
    assert count(copied, MOVING) == 1 and count(copied, MOVED) == 0
    assert without(copied, MOVING) == user.old_snapshot()
    assert events(proxy, "switch_done") == []


# --- crash safety ---------------------------------------------------------------------------


@pytest.mark.parametrize("point", ["switch.held", "switch.final_pass_done", "switch.switched"])
def test_kill_9_of_the_worker_during_the_switch_leaves_one_side_and_restarts_exactly(
        old: DovecotInstance, store: DovecotInstance, tmp_path: Path, point: str) -> None:
    user = User(old, store)
    proxy = passthrough_proxy(tmp_path / "proxy", old, store)
    import_and_migrate(proxy, user, tmp_path)
    user.change_something("before the crash")

    crashed = worker(proxy, point)
    assert crashed.wait(timeout=60) == -signal.SIGKILL, proxy.log_text()[-3000:]
    [row] = proxy.status(user.address)
    if point == "switch.switched":
        # Flipped: wholly on the store, which holds the final state; the notice is owed, and
        # the pass that switched it did not complete.
        assert (row["served_by"], row["state"]) == ("store", "PENDING")
        assert without(user.store_snapshot(), MOVED) == user.old_snapshot()
        assert count(user.store_snapshot(), MOVED) == 0
        user.change_something("after the crash")  # mail still arriving at the old server
    else:
        # Not flipped: wholly on the old server; its hold runs out by itself.
        assert (row["served_by"], row["state"], row["switched_at"]) == ("old", "PENDING", None)
        user.change_something("after the crash")

    row = work_until_settled(proxy, user.address)  # `worker` restarted after the crash
    assert row["served_by"] == "store" and row["switched_at"] is not None
    moved = user.store_snapshot()
    assert count(moved, MOVED) == 1
    if point == "switch.switched":
        # After the switch the store is the user's mailbox: new mail at the old server is
        # still collected, the old server's other changes no longer matter.
        assert count(moved, b"after the crash") == 1
    else:
        assert without(moved, MOVED) == user.old_snapshot()
        assert MOVED in last_in_inbox(user)


# --- finish ---------------------------------------------------------------------------------


def test_finish_switches_every_account_before_it_turns_migration_off(
        old: DovecotInstance, store: DovecotInstance, tmp_path: Path) -> None:
    moving, never = User(old, store), User(old, store)
    proxy = passthrough_proxy(tmp_path / "proxy", old, store)
    import_and_migrate(proxy, moving, tmp_path)  # a pass queued, not run yet
    users = tmp_path / "never.csv"
    users.write_text(f"{never.address},{never.password}\n")
    proxy.cli("import", str(users))  # imported, never migrated
    assert [r["served_by"] for r in proxy.status(moving.address, never.address)] == [
        "old", "old"]
    workers = pool(proxy)
    try:
        report = json.loads(proxy.cli("finish", "old.example", "--yes", "--json").stdout)
    finally:
        stop(workers)
    assert report["migrated"] == [moving.address]
    assert report["never_migrated"] == [never.address]
    assert report["switched_without_final_pass"] == [never.address]
    rows = {r["address"]: r for r in proxy.status(moving.address, never.address)}
    assert {r["served_by"] for r in rows.values()} == {"store"}
    assert rows[never.address]["state"] == "NEW"  # switched as it was, reported
    assert without(moving.store_snapshot(), MOVED) == moving.old_snapshot()
    domain = json.loads(proxy.cli("domain", "list", "--json").stdout)[0]
    assert domain["migrating"] is False
