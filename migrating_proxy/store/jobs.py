"""The copy job queue, shared by every worker process (and machine, on PostgreSQL).

A job is one pass over one account's old mailbox. At most one job per account is active
(queued, running or paused) at a time; asking for another while one is active returns the
active one, so a burst of logins never stacks up passes. Workers claim jobs in a serialised
transaction that also enforces the per-old-server connection cap, keep a heartbeat while they
run, and a job whose worker died (no heartbeat) is handed to the next worker.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    and_,
    case,
    func,
    insert,
    select,
    text,
    update,
)

from migrating_proxy.store.accounts import now
from migrating_proxy.store.schema import jobs
from migrating_proxy.store.states import (
    ACTIVE_JOB_STATES,
    JOB,
    JOB_CREATED,
    JobState,
    move_account,
    move_job,
)

ACTIVE = tuple(str(state) for state in ACTIVE_JOB_STATES)
# Kinds of pass, in the order workers take them: a first login's (a user is waiting), an
# incremental one (a login's or an admin's resync), a pre-stage one (nobody waits; issue 13).
FULL, INCREMENTAL, PRESTAGE = "full", "incremental", "prestage"
KIND_ORDER = {FULL: 0, INCREMENTAL: 1, PRESTAGE: 2}
# An on-login pass queued this long without a worker makes running pre-stage passes yield.
YIELD_AFTER_SECONDS = 2.0
CLAIM_LOCK = 7310421  # PostgreSQL advisory lock id serialising claims across machines


@dataclass(frozen=True)
class Job:
    id: int
    account_id: int
    kind: str
    state: JobState
    source_host: str
    attempts: int
    last_error: str | None


class JobQueue:
    """The queue's own transitions (see store/states.py); those that move the account along
    with its job (a pass queued, completed, failed) are `Lifecycle`'s."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def enqueue(self, account_id: int, kind: str, source_host: str,
                conn: Connection | None = None) -> int:
        """Queue a pass unless one is already active; returns the active job's id.

        Job only: callers that start a pass use `Lifecycle.queue_pass`, which moves the
        account to PENDING in the same transaction."""
        if conn is None:
            with self.engine.begin() as own:
                return self.enqueue(account_id, kind, source_host, own)
        active = conn.execute(
            select(jobs.c.id, jobs.c.kind).where(
                jobs.c.account_id == account_id, jobs.c.state.in_(ACTIVE)
            )
        ).first()
        if active is not None:
            # A more urgent kind takes over the active job: a first login during a pre-stage
            # pass makes it the login's pass (the worker reads the kind again at its end).
            if KIND_ORDER.get(kind, 1) < KIND_ORDER.get(active.kind, 1):
                conn.execute(update(jobs).where(jobs.c.id == active.id).values(kind=kind))
            return int(active.id)
        stamp = now()
        result = conn.execute(insert(jobs).values(
            account_id=account_id, kind=kind, state=str(JOB_CREATED["queued"]),
            source_host=source_host,
            not_before=stamp, attempts=0, created_at=stamp,
        ))
        return int(result.inserted_primary_key[0])  # type: ignore[index]

    def claim(self, worker_id: str, max_per_host: int, stale_after: float = 90.0) -> Job | None:
        """Take the next runnable job, respecting the per-host cap; None if there is none.

        The claim is the pass's start: the account is PENDING from here, in the same
        transaction."""
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": CLAIM_LOCK})
            self._requeue_stale(conn, now() - timedelta(seconds=stale_after))
            busy_hosts = self._running_per_host(conn)
            for row in self._candidates(conn):
                if max_per_host and busy_hosts.get(row.source_host, 0) >= max_per_host:
                    continue
                move_job(conn, row.id, "claimed", claimed_by=worker_id, heartbeat_at=now(),
                         attempts=row.attempts + 1)
                move_account(conn, row.account_id, "pass_started")
                return _job(row, state=JobState.RUNNING, attempts=row.attempts + 1)
        return None

    def _candidates(self, conn: Connection) -> list:  # type: ignore[type-arg]
        # First logins (full passes) before re-syncs: a user is waiting for those; pre-stage
        # passes last: nobody is.
        urgency = case((jobs.c.kind == FULL, 0), (jobs.c.kind == PRESTAGE, 2), else_=1)
        return list(conn.execute(
            select(jobs).where(jobs.c.state == JobState.QUEUED.value, jobs.c.not_before <= now())
            .order_by(urgency, jobs.c.created_at, jobs.c.id).limit(50)
        ))

    def _running_per_host(self, conn: Connection) -> dict[str, int]:
        rows = conn.execute(
            select(jobs.c.source_host, func.count())
            .where(jobs.c.state == JobState.RUNNING.value)
            .group_by(jobs.c.source_host)
        )
        return {host: count for host, count in rows}

    def _requeue_stale(self, conn: Connection, horizon: datetime) -> None:
        _move_all(conn, "requeued", jobs.c.heartbeat_at < horizon, claimed_by=None,
                  last_error="worker stopped responding")

    def requeue_dead_claims(self, host_prefix: str, alive: Callable[[int], bool]) -> int:
        """Hand back jobs claimed by workers of this machine whose process is gone.

        A restart after a crash (kill -9, OOM, power) then resumes at once instead of waiting
        for the heartbeat to go stale. Worker names are `host:pid:n`.
        """
        with self.engine.begin() as conn:
            rows = conn.execute(select(jobs.c.id, jobs.c.claimed_by).where(
                jobs.c.state == JobState.RUNNING.value,
                jobs.c.claimed_by.like(f"{host_prefix}:%"))).all()
            dead = [row.id for row in rows if not alive(_claimant_pid(row.claimed_by))]
            if dead:
                _move_all(conn, "requeued", jobs.c.id.in_(dead), claimed_by=None,
                          last_error="worker process died")
        return len(dead)

    def heartbeat(self, job_id: int) -> str | None:
        """Refresh a running job's heartbeat; returns its state (an admin may pause it)."""
        with self.engine.begin() as conn:
            conn.execute(update(jobs)
                         .where(jobs.c.id == job_id, jobs.c.state == JobState.RUNNING.value)
                         .values(heartbeat_at=now()))
            return _state(conn.execute(select(jobs.c.state).where(jobs.c.id == job_id))
                          .scalar())

    def end(self, conn: Connection, job_id: int, event: str, error: str | None = None) -> bool:
        """A job's last transition, "completed" or "failed", in the caller's transaction
        (`Lifecycle.pass_completed` / `pass_failed` move the account with it).

        False, and nothing ended, when an admin paused the job before its pass could complete:
        the pause stands (see `keep_paused`)."""
        assert JOB[event].target in (JobState.DONE, JobState.FAILED)
        values = {"last_error": error, "finished_at": now(), "claimed_by": None}
        if _move_all(conn, event, jobs.c.id == job_id, **values):
            return True
        if event == "completed" and _keep_paused(conn, job_id):
            return False
        move_job(conn, job_id, event, **values)  # raises: RowGone or IllegalTransition
        return True

    def release(self, job_id: int, *, paused: bool = False) -> None:
        """Hand a job back (worker shutting down, or paused by an admin).

        A job an admin paused while it ran is already "paused" but still claimed: clearing
        the claim is what tells `start` (and `status`) that its worker has let go.
        """
        with self.engine.begin() as conn:
            event = "paused" if paused else "released"
            _move_all(conn, event, jobs.c.id == job_id, claimed_by=None)
            # A paused job only lets go of its claim: its state is the admin's.
            conn.execute(update(jobs)
                         .where(jobs.c.id == job_id, jobs.c.state == JobState.PAUSED.value)
                         .values(claimed_by=None))

    def kind_of(self, job_id: int) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(select(jobs.c.kind).where(jobs.c.id == job_id)).scalar()

    def login_pass_waiting(self) -> bool:
        """Whether an on-login (or admin's) pass has waited YIELD_AFTER_SECONDS for a worker:
        pre-stage passes then stop at their next batch and go back to the queue, behind it."""
        horizon = now() - timedelta(seconds=YIELD_AFTER_SECONDS)
        with self.engine.connect() as conn:
            return conn.execute(select(jobs.c.id).where(
                jobs.c.state == JobState.QUEUED.value, jobs.c.kind != PRESTAGE,
                jobs.c.not_before <= horizon).limit(1)).first() is not None

    def state_of(self, job_id: int) -> JobState | None:
        """The job's state: one indexed read, cheap enough to poll every second."""
        with self.engine.connect() as conn:
            return _state(conn.execute(select(jobs.c.state).where(jobs.c.id == job_id))
                          .scalar())

    # -- admin controls ------------------------------------------------------------------
    def pause(self, account_ids: list[int]) -> set[int]:
        """Pause the accounts' queued or running jobs; the accounts whose job was paused.

        A running job keeps its claim: its worker sees the state within a second, stops at
        the next batch boundary and releases it (see `release`).
        """
        return self._switch(account_ids, "paused")

    def resume(self, account_ids: list[int]) -> set[int]:
        """Paused jobs back to work; the accounts whose job was resumed.

        A paused job whose worker has not let go yet goes back to "running" (the worker
        carries on), so two workers never hold one account's job.
        """
        with self.engine.begin() as conn:
            resumed = self._switch(account_ids, "resumed", conn, jobs.c.claimed_by.is_not(None))
            return resumed | self._switch(account_ids, "unclaimed", conn,
                                          jobs.c.claimed_by.is_(None))

    def _switch(self, account_ids: list[int], event: str, conn: Connection | None = None,
                *extra: ColumnElement[bool]) -> set[int]:
        """An admin's bulk transition: applied to the accounts whose job is in a state it
        starts from; the others are left alone and reported as not switched."""
        if conn is None:
            with self.engine.begin() as own:
                return self._switch(account_ids, event, own, *extra)
        return {row.account_id for row in
                _move_all(conn, event, jobs.c.account_id.in_(account_ids), *extra)}

    def record_failure(self, account_id: int, kind: str, source_host: str, error: str,
                       conn: Connection) -> None:
        """A pass that failed before it was queued (the old server refused the credentials);
        `Lifecycle.check_failed` moves the account to ERROR with it."""
        stamp = now()
        conn.execute(insert(jobs).values(
            account_id=account_id, kind=kind, state=str(JOB_CREATED["refused"]),
            source_host=source_host, not_before=stamp, attempts=0, created_at=stamp,
            finished_at=stamp, last_error=error))

    def active_states(self, account_ids: list[int]) -> dict[int, tuple[str, bool]]:
        """account id -> (state, still claimed by a worker) of its active job."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(jobs.c.account_id, jobs.c.state, jobs.c.claimed_by)
                                .where(jobs.c.account_id.in_(account_ids),
                                       jobs.c.state.in_(ACTIVE))).all()
        return {row.account_id: (row.state, row.claimed_by is not None) for row in rows}

    def retry_later(self, job_id: int, error: str, delay: float) -> None:
        """A transient failure: back to the queue, not before `delay` seconds. A job an
        admin paused meanwhile stays paused (its claim let go) and waits for `start`."""
        values = {"last_error": error, "not_before": now() + timedelta(seconds=delay)}
        with self.engine.begin() as conn:
            if _move_all(conn, "retried", jobs.c.id == job_id, claimed_by=None, **values):
                return
            if not _keep_paused(conn, job_id, **values):
                move_job(conn, job_id, "retried")  # raises: RowGone or IllegalTransition

    def active_job(self, account_id: int) -> Job | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(jobs).where(
                jobs.c.account_id == account_id, jobs.c.state.in_(ACTIVE))).first()
        return _job(row) if row else None


def _claimant_pid(claimed_by: str) -> int:
    try:
        return int(claimed_by.split(":")[1])
    except (IndexError, ValueError):
        return 0


def _state(value: str | None) -> JobState | None:
    return None if value is None else JobState(value)


def _keep_paused(conn: Connection, job_id: int, **values: object) -> bool:
    """A pass ended on a job an admin paused: the pause stands. The worker only lets go of
    its claim (so `start` queues the job again and `status` shows "paused", not "pausing");
    whether the job was paused."""
    return bool(conn.execute(update(jobs).where(jobs.c.id == job_id,
                                                jobs.c.state == JobState.PAUSED.value)
                             .values(claimed_by=None, **values)).rowcount)


def _move_all(conn: Connection, event: str, *where: ColumnElement[bool],
              **values: object) -> list:  # type: ignore[type-arg]
    """A transition applied to every job matching `where` that is in one of its source
    states (bulk: rows in other states are simply not matched); the rows it moved."""
    transition = JOB[event]
    condition = and_(jobs.c.state.in_([str(s) for s in transition.sources]), *where)
    return list(conn.execute(update(jobs).where(condition)
                             .values(state=str(transition.target), **values)
                             .returning(jobs.c.id, jobs.c.account_id)))


def _job(row, **override: object) -> Job:  # type: ignore[no-untyped-def]
    values = {
        "id": row.id, "account_id": row.account_id, "kind": row.kind,
        "state": JobState(row.state),
        "source_host": row.source_host, "attempts": row.attempts, "last_error": row.last_error,
    }
    values.update(override)
    return Job(**values)  # type: ignore[arg-type]
