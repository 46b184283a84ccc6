"""What admins see of each account's migration: state, progress counters, last error."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, select

from migrating_proxy.store.accounts import address_key, utc_iso
from migrating_proxy.store.jobs import ACTIVE
from migrating_proxy.store.schema import accounts, jobs, migrations
from migrating_proxy.store.states import AccountState, JobState

# The JSON keys of `migrating-proxy status --json`: a public contract, extend only.
STATUS_KEYS = (
    "address", "state", "folders_total", "folders_done", "messages_total", "messages_copied",
    "messages_skipped", "bytes_copied", "last_error", "started_at", "finished_at",
    # Added by the admin commands (issue 5):
    "last_pass_at", "job_state",
    # The transparent cutover (issue 9): "old" or "store", and when the switch happened.
    "served_by", "switched_at",
    # Added by the dsync engine (issue 14): "imap" | "dsync" (null before the first pass),
    # why an account fell back to imap, and after the switch whether the UIDs were kept.
    "engine", "engine_note", "uids_kept",
)
COUNTERS = STATUS_KEYS[2:8]


def migration_status(engine: Engine, addresses: list[str] | None = None,
                     domain: str | None = None) -> list[dict[str, Any]]:
    """One dict per account that is (or was) migrating, or per address asked for.

    `job_state` is the active job's state: queued, running, paused, or "pausing" while a
    paused job's worker is still finishing its batch; None without an active job.
    """
    query = (
        select(accounts.c.id, accounts.c.address, accounts.c.migration_state,
               accounts.c.served_by, accounts.c.switched_at,
               *(migrations.c[name] for name in COUNTERS), migrations.c.last_error,
               migrations.c.started_at, migrations.c.finished_at, migrations.c.last_pass_at,
               migrations.c.copy_engine, migrations.c.engine_note, migrations.c.uids_kept)
        .select_from(accounts.outerjoin(migrations, migrations.c.account_id == accounts.c.id))
        .order_by(accounts.c.address_key)
    )
    if addresses:
        query = query.where(accounts.c.address_key.in_([address_key(a) for a in addresses]))
    else:
        query = query.where(accounts.c.migration_state.is_not(None))
    if domain:
        query = query.where(accounts.c.domain == domain.lower())
    with engine.connect() as conn:
        rows = conn.execute(query).all()
        job_errors = _latest_job_errors(conn, [row.id for row in rows])
        job_states = _active_job_states(conn, [row.id for row in rows])
    return [_status(row, job_errors.get(row.id), job_states.get(row.id)) for row in rows]


def _active_job_states(conn, account_ids: list[int]) -> dict[int, str]:  # type: ignore[no-untyped-def]
    if not account_ids:
        return {}
    rows = conn.execute(
        select(jobs.c.account_id, jobs.c.state, jobs.c.claimed_by).where(
            jobs.c.account_id.in_(account_ids), jobs.c.state.in_(ACTIVE)))
    return {account_id: "pausing" if state == JobState.PAUSED and claimed else state
            for account_id, state, claimed in rows}


def _latest_job_errors(conn, account_ids: list[int]) -> dict[int, str]:  # type: ignore[no-untyped-def]
    if not account_ids:
        return {}
    rows = conn.execute(
        select(jobs.c.account_id, jobs.c.last_error).where(
            jobs.c.account_id.in_(account_ids), jobs.c.last_error.is_not(None))
        .order_by(jobs.c.id)
    )
    return {account_id: error for account_id, error in rows}  # the newest wins


def _status(row, job_error: str | None,  # type: ignore[no-untyped-def]
            job_state: str | None) -> dict[str, Any]:
    status: dict[str, Any] = {"address": row.address, "state": row.migration_state}
    status.update({name: getattr(row, name) or 0 for name in COUNTERS})
    error = row.last_error if row.migration_state != AccountState.COMPLETED else None
    status["last_error"] = error or (job_error if row.migration_state == AccountState.ERROR
                                     else None)
    status["started_at"] = utc_iso(row.started_at)
    status["finished_at"] = utc_iso(row.finished_at)
    status["last_pass_at"] = utc_iso(row.last_pass_at)
    status["job_state"] = job_state
    status["served_by"] = row.served_by
    status["switched_at"] = utc_iso(row.switched_at)
    status["engine"] = row.copy_engine
    status["engine_note"] = row.engine_note
    status["uids_kept"] = row.uids_kept
    return status
