"""Account and job states: the public strings, the transition table, one transaction each.

On SQLite and PostgreSQL (the `store` fixture), since every transition is a conditional UPDATE
that must hold across processes on both.
"""

from __future__ import annotations

import pytest
from sqlalchemy import select, update

from migrating_proxy.store import AccountState, IllegalTransition, JobState, RowGone, Store
from migrating_proxy.store.schema import accounts, jobs
from migrating_proxy.store.states import ACCOUNT, JOB, move_account
from migrating_proxy.store.status import migration_status


def test_the_values_are_the_public_strings() -> None:
    # `status --json` shows these: the enum is the contract, not a new spelling of it.
    assert [s.value for s in AccountState] == ["NEW", "PENDING", "ERROR", "COMPLETED"]
    assert [s.value for s in JobState] == ["queued", "running", "paused", "done", "failed"]
    assert AccountState.COMPLETED == "COMPLETED" and JobState.PAUSED == "paused"


def test_every_event_name_is_snake_case() -> None:
    for event in [*ACCOUNT, *JOB]:
        assert event.isidentifier() and event == event.lower()


def first_login(store: Store, address: str = "alice@old.example") -> tuple[int, int]:
    account_id = store.lifecycle.first_login(address, "", "old-host")
    job = store.jobs.active_job(account_id)
    assert job is not None
    return account_id, job.id


def states(store: Store, address: str = "alice@old.example") -> tuple[str, str | None]:
    row = migration_status(store.engine, [address])[0]
    return row["state"], row["job_state"]


def test_a_pass_from_first_login_to_completed(store: Store) -> None:
    account_id, job_id = first_login(store)
    assert states(store) == ("PENDING", "queued")
    claimed = store.jobs.claim("w1", 4)
    assert claimed is not None and claimed.state is JobState.RUNNING
    store.lifecycle.pass_completed(job_id, account_id)
    assert states(store) == ("COMPLETED", None)
    assert store.jobs.state_of(job_id) is JobState.DONE
    assert store.accounts.get_account_by_id(account_id).migration_state \
        is AccountState.COMPLETED  # type: ignore[union-attr]


def test_a_pass_cannot_end_twice_or_before_it_ran(store: Store) -> None:
    account_id, job_id = first_login(store)
    with pytest.raises(IllegalTransition, match="completed: not allowed from queued"):
        store.lifecycle.pass_completed(job_id, account_id)
    assert states(store) == ("PENDING", "queued")  # the whole transaction was rolled back
    store.jobs.claim("w1", 4)
    store.lifecycle.pass_failed(job_id, account_id, "old server down")
    assert states(store) == ("ERROR", None)
    with pytest.raises(IllegalTransition):
        store.lifecycle.pass_completed(job_id, account_id)
    assert states(store) == ("ERROR", None)


def test_the_account_moves_with_its_job_or_not_at_all(store: Store) -> None:
    account_id, job_id = first_login(store)
    store.jobs.claim("w1", 4)
    # Something wrote the account behind the table's back: the job must not end alone.
    with store.engine.begin() as conn:
        conn.execute(update(accounts).values(migration_state="COMPLETED"))
    with pytest.raises(IllegalTransition, match="pass_failed: not allowed from COMPLETED"):
        store.lifecycle.pass_failed(job_id, account_id, "boom")
    assert store.jobs.state_of(job_id) is JobState.RUNNING


def test_a_claim_starts_the_pass_from_any_migrating_state(store: Store) -> None:
    first_login(store)
    with store.engine.begin() as conn:
        conn.execute(update(accounts).values(migration_state="ERROR"))
    assert store.jobs.claim("w1", 4) is not None
    assert states(store) == ("PENDING", "running")


def test_a_local_account_has_no_migration_transitions(store: Store) -> None:
    local = store.accounts.add_account("carol@new.example", "$6$x")
    with pytest.raises(IllegalTransition, match="from no state"):
        store.lifecycle.queue_pass(local.id, "full", "h")
    with store.engine.connect() as conn:
        assert conn.execute(select(jobs)).all() == []


def test_queue_pass_and_check_failed(store: Store) -> None:
    imported = store.accounts.add_account("bob@old.example", "", migration_state="NEW")
    assert store.lifecycle.check_failed(imported.id, "h", "the old server refused the password")
    assert states(store, "bob@old.example") == ("ERROR", None)
    job_id = store.lifecycle.queue_pass(imported.id, "full", "h")
    assert states(store, "bob@old.example") == ("PENDING", "queued")
    assert store.lifecycle.queue_pass(imported.id, "incremental", "h") == job_id  # not stacked
    # A pass queued meanwhile (the user logged in during `migrate`'s check) decides instead.
    assert not store.lifecycle.check_failed(imported.id, "h", "too late")
    assert states(store, "bob@old.example") == ("PENDING", "queued")


def test_an_account_removed_during_its_pass(store: Store) -> None:
    account_id, job_id = first_login(store)
    store.jobs.claim("w1", 4)
    store.accounts.remove_account("alice@old.example")
    with pytest.raises(RowGone):
        store.lifecycle.pass_completed(job_id, account_id)
    with store.engine.begin() as conn, pytest.raises(RowGone):
        move_account(conn, account_id, "pass_queued")


def test_pause_and_resume_only_move_jobs_in_their_source_states(store: Store) -> None:
    account_id, job_id = first_login(store)
    store.jobs.claim("w1", 4)
    store.lifecycle.pass_completed(job_id, account_id)
    assert store.jobs.pause([account_id]) == set()  # a finished job is not paused
    assert store.jobs.state_of(job_id) is JobState.DONE
    with pytest.raises(IllegalTransition):
        store.jobs.retry_later(job_id, "late", 1)
