"""What admins see of each account's migration: state, progress counters, last error."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Engine, Float, case, cast, exists, func, or_, select

from migrating_proxy.passwords import PENDING_HASH
from migrating_proxy.store.accounts import address_key, utc_iso
from migrating_proxy.store.jobs import ACTIVE
from migrating_proxy.store.schema import accounts, jobs, migrations, vault
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
    # POP3 continuity (issue 10): "kept" | "unmatched: N" | "none", set at the switch.
    "pop3_uidls",
    # Pre-stage (issue 13): when the last pre-stage pass completed, and whether the proxy
    # knows the user's password (false: imported without one, the user never logged in).
    "prestaged_at", "password_known",
)
COUNTERS = STATUS_KEYS[2:8]


SORTABLE = ("address", "state", "progress", *COUNTERS, "last_error", "started_at",
            "finished_at", "last_pass_at")
STATES = ("NEW", "PENDING", "ERROR", "COMPLETED")


@dataclass(frozen=True)
class StatusQuery:
    """Which status rows, in which order: what the console's accounts page asks for."""

    domain: str | None = None
    addresses: tuple[str, ...] = ()
    state: str | None = None  # one of STATES
    search: str = ""  # part of the address, any letter case
    sort: str = "address"  # one of SORTABLE
    descending: bool = False
    limit: int | None = None  # None: every row
    offset: int = 0


def migration_status(engine: Engine, addresses: list[str] | None = None,
                     domain: str | None = None) -> list[dict[str, Any]]:
    """One dict per account that is (or was) migrating, or per address asked for.

    `job_state` is the active job's state: queued, running, paused, or "pausing" while a
    paused job's worker is still finishing its batch; None without an active job.
    """
    return status_page(engine, StatusQuery(domain, tuple(addresses or ())))[1]


def status_page(engine: Engine, ask: StatusQuery) -> tuple[int, list[dict[str, Any]]]:
    """(how many rows match, the rows of the page asked for). Filtering, sorting and paging
    happen in the database, so a page of a 100,000-account domain costs a page's worth."""
    where, order = _conditions(ask), _order(ask)
    joined = accounts.outerjoin(migrations, migrations.c.account_id == accounts.c.id)
    if ask.sort in ("address", "state"):
        # Page through `accounts` alone (an index walk), then join only the page's rows: a
        # late page need not look up the progress of every account before it.
        page = (select(accounts.c.id).where(*where).order_by(*order)
                .offset(ask.offset).limit(ask.limit).subquery())
        source = page.join(accounts, accounts.c.id == page.c.id).outerjoin(
            migrations, migrations.c.account_id == accounts.c.id)
        query = select(*_COLUMNS).select_from(source).order_by(*order)
    else:
        query = (select(*_COLUMNS).select_from(joined).where(*where).order_by(*order)
                 .offset(ask.offset).limit(ask.limit))
    with engine.connect() as conn:
        rows = conn.execute(query).all()
        if ask.limit is None and not ask.offset:
            total = len(rows)
        else:  # every condition is on `accounts`: no join needed to count
            total = conn.execute(select(func.count()).select_from(accounts).where(*where)
                                 ).scalar_one()
        job_errors = _latest_job_errors(conn, [row.id for row in rows])
        job_states = _active_job_states(conn, [row.id for row in rows])
    return total, [_status(row, job_errors.get(row.id), job_states.get(row.id)) for row in rows]


_COLUMNS = (accounts.c.id, accounts.c.address, accounts.c.migration_state,
            accounts.c.served_by, accounts.c.switched_at,
            *(migrations.c[name] for name in COUNTERS), migrations.c.last_error,
            migrations.c.started_at, migrations.c.finished_at, migrations.c.last_pass_at,
            migrations.c.copy_engine, migrations.c.engine_note, migrations.c.uids_kept,
            migrations.c.pop3_uidls,
            migrations.c.prestaged_at,
            # A hash, or a password in the vault (imported, or a first login being hashed).
            or_(accounts.c.password_hash != PENDING_HASH,
                exists().where(vault.c.account_id == accounts.c.id)).label("password_known"))


def _conditions(ask: StatusQuery) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = []
    if ask.addresses:
        where.append(accounts.c.address_key.in_([address_key(a) for a in ask.addresses]))
    else:
        where.append(accounts.c.migration_state.is_not(None))
    if ask.domain:
        where.append(accounts.c.domain == ask.domain.lower())
    if ask.state:
        where.append(accounts.c.migration_state == ask.state)
    if ask.search:
        literal = "".join(f"\\{ch}" if ch in "\\%_" else ch for ch in ask.search.lower())
        where.append(accounts.c.address_key.like(f"%{literal}%", escape="\\"))
    return where


def _order(ask: StatusQuery) -> list[Any]:
    if ask.sort not in SORTABLE:
        raise ValueError(f"sort must be one of {', '.join(SORTABLE)}")
    if ask.sort == "address":  # never NULL: plain order, so the (domain, address) index serves
        key = accounts.c.address_key
        return [key.desc() if ask.descending else key.asc()]
    if ask.sort == "state":
        key: Any = accounts.c.migration_state
    elif ask.sort == "progress":
        done = (func.coalesce(migrations.c.messages_copied, 0)
                + func.coalesce(migrations.c.messages_skipped, 0))
        key = case((func.coalesce(migrations.c.messages_total, 0) == 0, 0.0),
                   else_=cast(done, Float) / migrations.c.messages_total)
    else:
        key = migrations.c[ask.sort]
    key = key.desc() if ask.descending else key.asc()
    # NULLs (never started) last either way; the address breaks ties, so paging is stable.
    return [key.nulls_last(), accounts.c.address_key]


def empty_totals() -> dict[str, Any]:
    return {"accounts": 0, "states": dict.fromkeys(STATES, 0), **dict.fromkeys(COUNTERS, 0)}


def domain_totals(engine: Engine) -> dict[str, dict[str, Any]]:
    """Per domain: accounts in each state and the sums of the progress counters."""
    query = (
        select(accounts.c.domain, accounts.c.migration_state, func.count(),
               *(func.coalesce(func.sum(migrations.c[name]), 0) for name in COUNTERS))
        .select_from(accounts.outerjoin(migrations, migrations.c.account_id == accounts.c.id))
        .where(accounts.c.migration_state.is_not(None))
        .group_by(accounts.c.domain, accounts.c.migration_state)
    )
    totals: dict[str, dict[str, Any]] = {}
    with engine.connect() as conn:
        for domain, state, count, *sums in conn.execute(query):
            entry = totals.setdefault(domain, empty_totals())
            entry["accounts"] += count
            entry["states"][state] = entry["states"].get(state, 0) + count
            for name, value in zip(COUNTERS, sums, strict=True):
                entry[name] += int(value)
    return totals


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
    status["pop3_uidls"] = row.pop3_uidls or "none"
    status["prestaged_at"] = utc_iso(row.prestaged_at)
    status["password_known"] = bool(row.password_known)
    return status
