"""The account store: the only state shared between proxy and worker processes."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from sqlalchemy import Engine

from migrating_proxy.store import copystate as _copystate  # noqa: F401  (registers its tables)
from migrating_proxy.store.accounts import (
    Account,
    AccountStore,
    AddressError,
    Domain,
    StoreError,
    normalise,
)
from migrating_proxy.store.cutover import CutoverStore
from migrating_proxy.store.db import (
    DEFAULT_LOCK_TIMEOUT,
    DatabaseError,
    ensure_schema,
    make_engine,
    sqlite_path,
)
from migrating_proxy.store.jobs import JobQueue
from migrating_proxy.store.lifecycle import Lifecycle
from migrating_proxy.store.logins import LastLogins
from migrating_proxy.store.sessions import SessionControl
from migrating_proxy.store.sqlite_process import SQLiteProcess
from migrating_proxy.store.states import AccountState, IllegalTransition, JobState, RowGone

__all__ = [
    "Account",
    "AccountState",
    "AccountStore",
    "AddressError",
    "DatabaseError",
    "Domain",
    "IllegalTransition",
    "JobState",
    "Lifecycle",
    "RowGone",
    "SessionControl",
    "Store",
    "StoreError",
    "normalise",
    "open_store",
]


@dataclass
class Store:
    engine: Engine
    accounts: AccountStore
    jobs: JobQueue
    lifecycle: Lifecycle  # the transitions that move an account and its job together
    sessions: SessionControl  # close an account's live sessions on every `serve` process
    cutover: CutoverStore  # where an account is served, and its switch
    sqlite_process: SQLiteProcess | None = None
    _last_logins: LastLogins | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def last_logins(self) -> LastLogins:
        """Background writer of last-login times, started on first use."""
        with self._lock:
            if self._last_logins is None:
                self._last_logins = LastLogins(self.accounts)
            return self._last_logins

    def close(self) -> None:
        if self._last_logins is not None:
            self._last_logins.close()
        self.engine.dispose()
        if self.sqlite_process is not None:
            self.sqlite_process.close()


def open_store(url: str, lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
               isolate_sqlite: bool = False) -> Store:
    """Connect, create or upgrade the schema, and return the store's facades.

    `lock_timeout`: seconds a statement waits for a lock held elsewhere before failing.
    `isolate_sqlite`: SQLite runs in a helper process (sqlite_process.py), for `serve`."""
    helper = None
    if isolate_sqlite and url.startswith("sqlite"):
        helper = SQLiteProcess(sqlite_path(url))
    engine = make_engine(url, lock_timeout, helper)
    try:
        ensure_schema(engine)
    except DatabaseError:
        if helper is not None:
            helper.close()
        raise
    accounts, jobs = AccountStore(engine), JobQueue(engine)
    return Store(engine=engine, accounts=accounts, jobs=jobs,
                 lifecycle=Lifecycle(engine, accounts, jobs), sessions=SessionControl(engine),
                 cutover=CutoverStore(engine), sqlite_process=helper)
