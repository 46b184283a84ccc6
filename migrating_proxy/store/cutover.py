"""Where an account is served, and the switch from the old server to the store.

An account of a passthrough domain is served by the old server (`served_by = "old"`) until its
copy is complete; then a worker switches it, once (see migrating_proxy/switch.py):

    served_by=old ──hold(until)──▶ held ──switch()──▶ served_by=store, switched_at
                     ▲              │
                     └──release()───┘   (the final pass did not fit in the hold: try later)

`served_by` is a dimension of its own beside the account's state (store/states.py): the switch
happens inside a pass, while the account is PENDING, and the pass completes it afterwards.

While held (hold_until in the future) new logins of the account wait instead of going to the
old server. The flip is one UPDATE guarded by the hold still being in force, so a worker that
overran its hold (or died and came back) can never switch an account whose logins were already
sent to the old server again: either every row changes or none does, whatever process dies.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, Engine, delete, exists, func, insert, select, update

from migrating_proxy.store.accounts import SERVED_BY_OLD, SERVED_BY_STORE, address_key, now
from migrating_proxy.store.schema import accounts, jobs, old_sessions
from migrating_proxy.store.states import JobState

LEASE_REFRESH = timedelta(seconds=1)  # how often a serve process refreshes its leases
LEASE_STALE = timedelta(seconds=10)  # a lease not refreshed for this long no longer counts
LEASE_FORGOTTEN = timedelta(hours=1)  # stale leases are deleted after this


def aware(value: datetime | None) -> datetime | None:
    """SQLite hands datetimes back naive (they are stored in UTC)."""
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


class CutoverStore:
    """The switch's transitions; each one is a single guarded UPDATE."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def hold(self, account_id: int, until: datetime) -> bool:
        """Start holding new logins of an account still served by the old server."""
        return self._update(account_id, accounts.c.served_by == SERVED_BY_OLD,
                            hold_until=until)

    def release(self, account_id: int) -> None:
        """The switch did not happen: logins go to the old server again at once."""
        self._update(account_id, accounts.c.served_by == SERVED_BY_OLD, hold_until=None)

    def switch(self, account_id: int, *, conn: Connection | None = None,
               held: bool = True) -> bool:
        """Flip the account to the store (switched_at now). With `held` (the switch after a
        final pass), only while its hold is still in force and no admin has paused its pass
        (`stop` holds the switch too): False means the hold ran out, the pass was paused, or
        it was switched already. Without, unconditionally (`finish` retiring the old server).

        The account's state is the lifecycle's: its pass is still running (PENDING) and
        completes after what the switch owes (store/lifecycle.py, `pass_completed`).
        """
        guards = [accounts.c.served_by == SERVED_BY_OLD]
        stamp = now()
        if held:
            guards.append(accounts.c.hold_until > stamp)
            guards.append(~exists().where(jobs.c.account_id == account_id,
                                          jobs.c.state == JobState.PAUSED.value))
        return self._update(account_id, *guards, conn=conn, served_by=SERVED_BY_STORE,
                            switched_at=stamp, hold_until=None)

    def held_until(self, address: str) -> datetime | None:
        """Until when a switch under way holds the account's logins; None if not held."""
        with self.engine.connect() as conn:
            until = aware(conn.execute(select(accounts.c.hold_until).where(
                accounts.c.address_key == address_key(address),
                accounts.c.served_by == SERVED_BY_OLD)).scalar())
        return until if _in_force(until) else None

    # -- sessions relayed to the old server ----------------------------------------------
    def lease(self, account_id: int, process: str) -> int | None:
        """A lease for a session about to be relayed to the account's old server, or None
        when the account is held or no longer served there (decide again)."""
        stamp = now()
        with self.engine.begin() as conn:
            row = conn.execute(select(accounts.c.served_by, accounts.c.hold_until)
                               .where(accounts.c.id == account_id).with_for_update()).first()
            if row is None or row.served_by != SERVED_BY_OLD or _in_force(row.hold_until):
                return None
            conn.execute(delete(old_sessions).where(
                old_sessions.c.seen_at < stamp - LEASE_FORGOTTEN))
            result = conn.execute(insert(old_sessions).values(
                account_id=account_id, process=process, seen_at=stamp))
            return int(result.inserted_primary_key[0])  # type: ignore[index]

    def release_leases(self, lease_ids: Collection[int]) -> None:
        """Their sessions' connections to the old server are gone."""
        with self.engine.begin() as conn:
            conn.execute(delete(old_sessions).where(old_sessions.c.id.in_(list(lease_ids))))

    def refresh_leases(self, lease_ids: Collection[int]) -> None:
        """Their sessions still live (every LEASE_REFRESH, by the process relaying them)."""
        with self.engine.begin() as conn:
            conn.execute(update(old_sessions).where(old_sessions.c.id.in_(list(lease_ids)))
                         .values(seen_at=now()))

    def drop_dead_leases(self, host: str, alive: Callable[[int], bool]) -> int:
        """Forget the leases of this host's processes that are gone (a `serve` killed and
        started again): their sessions died with them, and a switch need not wait for them
        to go stale. Process names are `host:pid`."""
        with self.engine.begin() as conn:
            rows = conn.execute(select(old_sessions.c.id, old_sessions.c.process).where(
                old_sessions.c.process.like(f"{host}:%"))).all()
            dead = [row.id for row in rows if not alive(_pid(row.process))]
            if dead:
                conn.execute(delete(old_sessions).where(old_sessions.c.id.in_(dead)))
        return len(dead)

    def old_server_sessions(self, account_id: int) -> int:
        """How many sessions of the account live processes relay to its old server."""
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(old_sessions).where(
                old_sessions.c.account_id == account_id,
                old_sessions.c.seen_at > now() - LEASE_STALE)).scalar_one())

    def _update(self, account_id: int, *guards: object, conn: Connection | None = None,
                **values: object) -> bool:
        if conn is None:
            with self.engine.begin() as own:
                return self._update(account_id, *guards, conn=own, **values)
        result = conn.execute(update(accounts).where(accounts.c.id == account_id, *guards)
                              .values(**values, updated_at=now()))
        return bool(result.rowcount)


def _in_force(hold_until: datetime | None) -> bool:
    until = aware(hold_until)
    return until is not None and until > now()


def _pid(process: str) -> int:
    try:
        return int(process.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return 0
