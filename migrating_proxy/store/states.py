"""Named states of accounts and copy jobs, and the only transitions between them.

The database is the control plane shared by the front-ends, the workers and the admin commands
of every machine, so the state columns are written in one way only: through one store method
per transition (`Lifecycle` for the ones that move an account and its job together, `JobQueue`
for the job's own), each in one transaction, each checking the state it starts from. A write
from a state the table does not list raises `IllegalTransition`: a bug made loud, not a row
quietly put into a state nobody planned for (the style of h11's `_state.py`).

Account (`accounts.migration_state`, shown as `state` by `status --json`; the strings are a
public contract). NULL is a plain local account, which never migrates and has no transitions.

    event            from                          to          made by
    imported         (no account)                  NEW         admin `import`
    first_login      (no account)                  PENDING     the login decision
    pass_queued      NEW PENDING ERROR COMPLETED   PENDING     a login, `migrate`, `resync`
    pass_started     NEW PENDING ERROR COMPLETED   PENDING     a worker claiming the job
    pass_completed   PENDING                       COMPLETED   the worker, with the job: done
    prestaged        PENDING                       PENDING     the worker, with the job: done
                                                               (a pre-stage pass: the account
                                                               waits for its user's login)
    pass_failed      PENDING                       ERROR       the worker, with the job: failed
    check_failed     NEW PENDING ERROR             ERROR       `migrate`: the old server said no

An account with an active job is always PENDING: every transition that creates or starts a job
ends in PENDING, and the ones that leave PENDING end the job (or, for `check_failed`, require
that there is none). So a pass can only end from PENDING.

Where an account is served (`accounts.served_by`, store/cutover.py) is a second dimension:
"store" for every account except those of passthrough domains, which start "old" and are
switched to "store" once, during a pass (the account stays PENDING until the pass completes),
by `CutoverStore.switch` guarded by the switch's hold, or by `finish` for the ones left.

Job (`jobs.state`; `status --json` shows the active one as `job_state`):

    event        from                  to        made by
    queued       (no job)              queued    `pass_queued`, `first_login`
    refused      (no job)              failed    `check_failed` (a pass that never ran)
    claimed      queued                running   a worker
    completed    running               done      the worker
    failed       running paused        failed    the worker (an admin may have paused it
                                                 while its last batch was running)
    retried      running               queued    the worker, after a transient failure
    released     running               queued    a worker shutting down
    requeued     running               queued    the next claim, when the worker died
    paused       queued running        paused    admin `stop` (a running job keeps its claim
                                                 until its worker lets go)
    resumed      paused                running   admin `start`, worker still holding it
    unclaimed    paused                queued    admin `start`, nobody holding it

Queued, running and paused are active: at most one active job per account.

A pause is kept once `stop` has answered "paused": a pass that ends after it (its last batch
was running, or a transient failure) neither completes nor goes back to the queue. Its worker
lets go of the claim and the job stays paused, the account PENDING, until `start`; the pass
that then runs finds whatever is left (nothing, if the copy had got to the end) and completes.
Only a pass that failed for good (`failed`) ends a paused job.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from sqlalchemy import Connection, Table, select, update

from migrating_proxy.store.schema import accounts, jobs


class AccountState(StrEnum):
    NEW = "NEW"  # imported, never migrated
    PENDING = "PENDING"  # a pass is queued or running
    ERROR = "ERROR"  # the last pass (or credential check) failed; `status` says why
    COMPLETED = "COMPLETED"  # the last pass completed


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    DONE = "done"
    FAILED = "failed"


ACTIVE_JOB_STATES = (JobState.QUEUED, JobState.RUNNING, JobState.PAUSED)
MIGRATING = frozenset(AccountState)


class IllegalTransition(Exception):
    """A state change the transition table does not allow (a bug, never the user's fault)."""


class RowGone(LookupError):
    """The account or job was removed meanwhile (`account remove` deletes its jobs too)."""


@dataclass(frozen=True)
class Transition:
    event: str
    sources: frozenset[StrEnum]
    target: StrEnum

    def check(self, current: str | None) -> None:
        if current not in self.sources:
            raise IllegalTransition(f"{self.event}: not allowed from {current or 'no state'} "
                                    f"(only from {', '.join(sorted(self.sources))})")


def _table(*rows: tuple[str, frozenset[StrEnum], StrEnum]) -> dict[str, Transition]:
    return {event: Transition(event, sources, target) for event, sources, target in rows}


A = AccountState
ACCOUNT = _table(
    ("pass_queued", MIGRATING, A.PENDING),
    ("pass_started", MIGRATING, A.PENDING),
    ("pass_completed", frozenset({A.PENDING}), A.COMPLETED),
    ("prestaged", frozenset({A.PENDING}), A.PENDING),
    ("pass_failed", frozenset({A.PENDING}), A.ERROR),
    ("check_failed", frozenset({A.NEW, A.PENDING, A.ERROR}), A.ERROR),
)
# Account creation (imported, first_login) is an insert: its "from" is "no row".
ACCOUNT_CREATED = {"imported": A.NEW, "first_login": A.PENDING}

J = JobState
JOB = _table(
    ("claimed", frozenset({J.QUEUED}), J.RUNNING),
    ("completed", frozenset({J.RUNNING}), J.DONE),
    ("failed", frozenset({J.RUNNING, J.PAUSED}), J.FAILED),
    ("retried", frozenset({J.RUNNING}), J.QUEUED),
    ("released", frozenset({J.RUNNING}), J.QUEUED),
    ("requeued", frozenset({J.RUNNING}), J.QUEUED),
    ("paused", frozenset({J.QUEUED, J.RUNNING}), J.PAUSED),
    ("resumed", frozenset({J.PAUSED}), J.RUNNING),
    ("unclaimed", frozenset({J.PAUSED}), J.QUEUED),
)
JOB_CREATED = {"queued": J.QUEUED, "refused": J.FAILED}


def account_state(value: str | None) -> AccountState | None:
    return None if value is None else AccountState(value)


def move_account(conn: Connection, account_id: int, event: str, **values: object) -> None:
    """Apply an account transition to one row in the caller's transaction (or raise)."""
    _move(conn, accounts, accounts.c.migration_state, account_id, ACCOUNT[event],
          {"updated_at": datetime.now(UTC), **values})


def move_job(conn: Connection, job_id: int, event: str, **values: object) -> None:
    """Apply a job transition to one row in the caller's transaction (or raise)."""
    _move(conn, jobs, jobs.c.state, job_id, JOB[event], values)


def _move(conn: Connection, table: Table, column, row_id: int,  # type: ignore[no-untyped-def]
          transition: Transition, values: dict[str, object]) -> None:
    # One conditional UPDATE: atomic on both databases, whatever other processes do meanwhile.
    changed = conn.execute(
        update(table).where(table.c.id == row_id,
                            column.in_([str(s) for s in transition.sources]))
        .values({column.name: str(transition.target), **values})
    ).rowcount
    if changed:
        return
    current = conn.execute(select(column).where(table.c.id == row_id)).first()
    if current is None:
        raise RowGone(f"{transition.event}: {table.name} row {row_id} does not exist")
    transition.check(current[0])
