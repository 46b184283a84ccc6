"""The transitions that move an account and its copy job together, one transaction each.

See store/states.py for the table. Every method takes an optional `conn`: a caller that must
write something else in the same transaction (the vault entry of a captured password) passes
its own; otherwise the method opens and commits its own transaction.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, Engine, select, update

from migrating_proxy.store.accounts import AccountStore, now
from migrating_proxy.store.jobs import ACTIVE, JobQueue
from migrating_proxy.store.schema import jobs, migrations
from migrating_proxy.store.states import ACCOUNT_CREATED, move_account


class Lifecycle:
    def __init__(self, engine: Engine, accounts: AccountStore, queue: JobQueue) -> None:
        self.engine = engine
        self.accounts = accounts
        self.queue = queue

    @contextmanager
    def _transaction(self, conn: Connection | None) -> Iterator[Connection]:
        if conn is not None:
            yield conn
            return
        with self.engine.begin() as own:
            yield own

    # -- accounts appear -----------------------------------------------------------------
    def first_login(self, address: str, password_hash: str, source_host: str,
                    conn: Connection | None = None) -> int:
        """A migrating user's first login: the account (PENDING) and its full pass (queued).

        IntegrityError if the account exists (a concurrent first login won the race)."""
        with self._transaction(conn) as conn:
            account_id = self.accounts.insert_account(conn, address, password_hash,
                                                      ACCOUNT_CREATED["first_login"])
            self.queue.enqueue(account_id, "full", source_host, conn)
            return account_id

    def imported(self, address: str, password_hash: str, conn: Connection) -> int:
        """An account an admin imported: NEW, no pass until `migrate` (or the user's login)."""
        return self.accounts.insert_account(conn, address, password_hash,
                                            ACCOUNT_CREATED["imported"])

    # -- passes --------------------------------------------------------------------------
    def queue_pass(self, account_id: int, kind: str, source_host: str,
                   conn: Connection | None = None) -> int:
        """Queue a pass (or find the active one): the account is PENDING. The job's id."""
        with self._transaction(conn) as conn:
            move_account(conn, account_id, "pass_queued")
            return self.queue.enqueue(account_id, kind, source_host, conn)

    def check_failed(self, account_id: int, source_host: str, error: str,
                     conn: Connection | None = None) -> bool:
        """`migrate` found the password refused or the old server unreachable: ERROR, with
        a failed job saying why. False (nothing changed) if a pass got queued meanwhile: that
        pass decides the account's state."""
        with self._transaction(conn) as conn:
            active = conn.execute(select(jobs.c.id).where(
                jobs.c.account_id == account_id, jobs.c.state.in_(ACTIVE))).first()
            if active is not None:
                return False
            self.queue.record_failure(account_id, "full", source_host, error, conn)
            move_account(conn, account_id, "check_failed")
            return True

    def pass_completed(self, job_id: int, account_id: int) -> bool:
        """The pass completed: job done, account COMPLETED. False, and the account left
        PENDING, if an admin paused the job first: a pause `stop` reported stands until
        `start` (store/states.py)."""
        with self.engine.begin() as conn:
            if not self.queue.end(conn, job_id, "completed"):
                return False
            move_account(conn, account_id, "pass_completed")
            return True

    def prestaged(self, job_id: int, account_id: int) -> bool:
        """A pre-stage pass completed: the job is done, the account stays PENDING (COMPLETED
        needs its user's first login, and in passthrough mode the switch) and records when.
        False, nothing changed, if an admin paused the job first (as `pass_completed`)."""
        with self.engine.begin() as conn:
            if not self.queue.end(conn, job_id, "completed"):
                return False
            move_account(conn, account_id, "prestaged")
            conn.execute(update(migrations).where(migrations.c.account_id == account_id)
                         .values(prestaged_at=now()))
            return True

    def pass_failed(self, job_id: int, account_id: int, error: str | None) -> None:
        with self.engine.begin() as conn:
            self.queue.end(conn, job_id, "failed", error)
            move_account(conn, account_id, "pass_failed")
