"""The queue's admin controls (stop/start) on SQLite and PostgreSQL: never two workers on one
account's job, and an admin's start is not lost while a stopped copy winds down."""

from __future__ import annotations

from migrating_proxy.store import Store
from migrating_proxy.store.status import migration_status


def job_state(store: Store, address: str) -> str | None:
    return migration_status(store.engine, [address])[0]["job_state"]


def test_pause_and_resume_a_queued_job(store: Store) -> None:
    alice = store.accounts.add_account("alice@old.example", "", migration_state="NEW").id
    store.jobs.enqueue(alice, "full", "h")
    assert store.jobs.pause([alice]) == {alice}
    assert store.jobs.claim("w1", 4) is None  # paused: no worker takes it
    assert store.jobs.pause([alice]) == set()  # already paused
    assert store.jobs.resume([alice]) == {alice}
    assert job_state(store, "alice@old.example") == "queued"
    assert store.jobs.claim("w1", 4) is not None


def test_pausing_a_running_job_waits_for_its_worker(store: Store) -> None:
    alice = store.accounts.add_account("alice@old.example", "", migration_state="PENDING").id
    job_id = store.jobs.enqueue(alice, "full", "h")
    assert store.jobs.claim("w1", 4) is not None
    store.jobs.pause([alice])
    assert store.jobs.state_of(job_id) == "paused"
    assert job_state(store, "alice@old.example") == "pausing"  # the worker still holds it

    # start before the worker let go: the same worker carries on, nobody else may claim it.
    assert store.jobs.resume([alice]) == {alice}
    assert store.jobs.state_of(job_id) == "running"
    assert store.jobs.claim("w2", 4) is None

    # Paused again; the worker stops at a batch boundary and hands it back as the row says.
    store.jobs.pause([alice])
    store.jobs.release(job_id)
    assert job_state(store, "alice@old.example") == "paused"
    assert store.jobs.resume([alice]) == {alice}
    assert job_state(store, "alice@old.example") == "queued"
    claimed = store.jobs.claim("w2", 4)
    assert claimed is not None and claimed.id == job_id


def test_a_released_job_that_was_not_paused_is_queued_again(store: Store) -> None:
    alice = store.accounts.add_account("alice@old.example", "", migration_state="PENDING").id
    job_id = store.jobs.enqueue(alice, "full", "h")
    store.jobs.claim("w1", 4)
    store.jobs.release(job_id)  # a worker shutting down
    assert job_state(store, "alice@old.example") == "queued"


def test_a_pause_stands_when_the_pass_completes_after_it(store: Store) -> None:
    """`stop` answered "paused" while the last batch ran: the pass's completion must not
    overrule it (CI once saw the account COMPLETED right after `stop` reported it paused)."""
    alice = store.accounts.add_account("alice@old.example", "", migration_state="PENDING").id
    job_id = store.jobs.enqueue(alice, "full", "h")
    assert store.jobs.claim("w1", 4) is not None
    assert store.jobs.pause([alice]) == {alice}
    assert store.lifecycle.pass_completed(job_id, alice) is False
    row = migration_status(store.engine, ["alice@old.example"])[0]
    assert row["job_state"] == "paused" and row["state"] == "PENDING"  # let go, still paused
    assert store.jobs.claim("w2", 4) is None  # nobody copies until start
    assert store.jobs.resume([alice]) == {alice}
    assert store.jobs.claim("w2", 4) is not None  # start: a pass runs and may complete
    assert store.lifecycle.pass_completed(job_id, alice) is True
    assert migration_status(store.engine, ["alice@old.example"])[0]["state"] == "COMPLETED"


def test_a_pause_stands_when_the_pass_fails_transiently_after_it(store: Store) -> None:
    alice = store.accounts.add_account("alice@old.example", "", migration_state="PENDING").id
    job_id = store.jobs.enqueue(alice, "full", "h")
    store.jobs.claim("w1", 4)
    store.jobs.pause([alice])
    store.jobs.retry_later(job_id, "old server timed out", 0)  # not back to the queue
    assert job_state(store, "alice@old.example") == "paused"
    assert store.jobs.claim("w2", 4) is None
    assert store.jobs.resume([alice]) == {alice}
    assert job_state(store, "alice@old.example") == "queued"
