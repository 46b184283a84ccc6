"""The copy engine's own state: per-folder sync marks and per-message copy records.

The store and this database cannot share a transaction, so copying is write-ahead: a batch is
recorded `inflight` (with a lower bound of the UIDs the store will give it) *before* the APPEND,
and marked `copied` (with the store's UIDs) after it. Rows still in flight when a run starts are
reconciled against the store by fingerprint; see migration/imap_copy.py.

Tables (declared on the shared `metadata`, so importing this module is enough for create_all):

* `copy_folders`: one row per (account, source folder): the source UIDVALIDITY/UIDNEXT seen at
  the end of the last complete pass (the cheap "nothing changed" test) and the destination name.
* `copy_messages`: one row per source message handled: state inflight | copied | skipped, its
  fingerprint (kept so a changed UIDVALIDITY can be matched instead of copied again), size and
  destination UID. `source_key` is the IMAP UID as text, or the POP3 UIDL.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    DateTime,
    Engine,
    ForeignKey,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    bindparam,
    delete,
    func,
    insert,
    select,
    update,
)

from migrating_proxy.store.schema import metadata, migrations, pop3_uidls

INFLIGHT, COPIED, SKIPPED = "inflight", "copied", "skipped"
_INT32_MAX = 2**31 - 1

copy_folders = Table(
    "copy_folders",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("account_id", Integer, ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False),
    Column("source_name", String(1024), nullable=False),  # decoded (Unicode) source name
    Column("dest_name", String(1024), nullable=False),
    # Source UIDVALIDITY of the copy_messages keys; NULL until the folder was first selected.
    Column("uidvalidity", BigInteger, nullable=True),
    # Source UIDNEXT when the last pass over the folder completed; NULL while a pass is pending.
    Column("synced_uidnext", BigInteger, nullable=True),
    # Source HIGHESTMODSEQ (CONDSTORE) read before the last complete pass: every flag change
    # below it is on the store. NULL: unknown (no CONDSTORE, or never synced): sweep FLAGS.
    Column("synced_modseq", BigInteger, nullable=True),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("account_id", "source_name"),
)

copy_messages = Table(
    "copy_messages",
    metadata,
    Column(
        "folder_id", Integer, ForeignKey("copy_folders.id", ondelete="CASCADE"), primary_key=True
    ),
    Column("source_key", String(70), primary_key=True),  # IMAP UID (decimal) or POP3 UIDL
    Column("state", String(8), nullable=False),  # inflight | copied | skipped
    Column("fingerprint", String(64), nullable=False),
    Column("size", BigInteger, nullable=False),
    # Inflight: the store folder's UIDVALIDITY and a lower bound of the UIDs APPEND will assign.
    Column("dest_uidvalidity", BigInteger, nullable=True),
    Column("dest_uidnext", BigInteger, nullable=True),
    Column("dest_uid", BigInteger, nullable=True),  # copied: the UID on the store
    Column("reason", Text, nullable=True),  # skipped: why the store refused it
)


@dataclass(frozen=True)
class FolderState:
    id: int
    source_name: str
    dest_name: str
    uidvalidity: int | None
    synced_uidnext: int | None
    synced_modseq: int | None = None


@dataclass(frozen=True)
class MessageRecord:
    """One copy_messages row, as the engine needs it."""

    source_key: str
    state: str
    fingerprint: str
    size: int
    dest_uidvalidity: int | None = None
    dest_uidnext: int | None = None
    dest_uid: int | None = None
    reason: str | None = None


@dataclass(frozen=True)
class Totals:
    """What copy_messages says was done for an account, over all runs."""

    copied: int
    skipped: int
    bytes_copied: int


def _now() -> datetime:
    return datetime.now(UTC)


class CopyState:
    """Reads and writes one account's copy state. Every method is one short transaction."""

    def __init__(self, engine: Engine, account_id: int) -> None:
        self.engine = engine
        self.account_id = account_id

    # --- folders ---------------------------------------------------------------------------

    def folder(self, source_name: str, dest_name: str) -> FolderState:
        """The folder's row, created on first use; a changed mapping updates dest_name."""
        with self.engine.begin() as conn:
            row = self._folder_row(conn, source_name)
            if row is None:
                conn.execute(insert(copy_folders).values(
                    account_id=self.account_id, source_name=source_name, dest_name=dest_name,
                    updated_at=_now(),
                ))
                row = self._folder_row(conn, source_name)
            elif row.dest_name != dest_name:
                conn.execute(update(copy_folders).where(copy_folders.c.id == row.id)
                             .values(dest_name=dest_name, updated_at=_now()))
            assert row is not None
            return replace(_folder_state(row), dest_name=dest_name)

    def folders(self) -> list[FolderState]:
        """Every source folder the account's copy has a row for."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(copy_folders).where(
                copy_folders.c.account_id == self.account_id).order_by(copy_folders.c.id))
            return [_folder_state(row) for row in rows]

    def rename_folder(self, folder_id: int, source_name: str, dest_name: str, *,
                      moved_from: str, delimiter: str) -> None:
        """The source folder was renamed, and the store folder `moved_from` to dest_name
        with it: so were the store folders below it (RFC 3501 6.3.5), in one transaction."""
        below = moved_from + delimiter
        with self.engine.begin() as conn:
            if moved_from != dest_name:
                rows = conn.execute(select(copy_folders.c.id, copy_folders.c.dest_name).where(
                    copy_folders.c.account_id == self.account_id)).all()
                for row in rows:
                    if row.dest_name.startswith(below):
                        conn.execute(update(copy_folders).where(copy_folders.c.id == row.id)
                                     .values(dest_name=dest_name + row.dest_name[len(moved_from):],
                                             updated_at=_now()))
            conn.execute(update(copy_folders).where(copy_folders.c.id == folder_id).values(
                source_name=source_name, dest_name=dest_name, updated_at=_now()))

    def remove_folder(self, folder_id: int) -> None:
        """The source folder is gone: forget it and its message records."""
        with self.engine.begin() as conn:
            conn.execute(delete(copy_messages).where(copy_messages.c.folder_id == folder_id))
            conn.execute(delete(copy_folders).where(copy_folders.c.id == folder_id))

    def _folder_row(self, conn: Connection, source_name: str):  # type: ignore[no-untyped-def]
        return conn.execute(select(copy_folders).where(
            copy_folders.c.account_id == self.account_id,
            copy_folders.c.source_name == source_name,
        )).first()

    def mark_synced(self, folder_id: int, uidvalidity: int, uidnext: int | None,
                    modseq: int | None = None) -> None:
        """A pass over the folder completed: everything below uidnext is copied or skipped,
        and (mirror passes) every flag change up to modseq is on the store."""
        self._set_folder(folder_id, uidvalidity=uidvalidity, synced_uidnext=uidnext,
                         synced_modseq=modseq)

    def mark_unsynced(self, folder_id: int, uidvalidity: int) -> None:
        self._set_folder(folder_id, uidvalidity=uidvalidity, synced_uidnext=None)

    def _set_folder(self, folder_id: int, **values: object) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(copy_folders).where(copy_folders.c.id == folder_id)
                         .values(updated_at=_now(), **values))

    # --- messages --------------------------------------------------------------------------

    def records(self, folder_id: int, state: str | None = None) -> list[MessageRecord]:
        query = select(copy_messages).where(copy_messages.c.folder_id == folder_id)
        if state is not None:
            query = query.where(copy_messages.c.state == state)
        with self.engine.connect() as conn:
            return [_record(row) for row in conn.execute(query)]

    def known_keys(self, folder_id: int) -> set[str]:
        """Source keys already copied, skipped or in flight (in flight: reconcile first)."""
        with self.engine.connect() as conn:
            return set(conn.execute(select(copy_messages.c.source_key)
                                    .where(copy_messages.c.folder_id == folder_id)).scalars())

    def has_inflight(self, folder_id: int) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(select(copy_messages.c.source_key).where(
                copy_messages.c.folder_id == folder_id, copy_messages.c.state == INFLIGHT,
            ).limit(1)).first() is not None

    def begin_batch(self, folder_id: int, records: Sequence[MessageRecord]) -> None:
        """Write-ahead: the batch is about to be appended (records carry dest_uid* bounds)."""
        with self.engine.begin() as conn:
            conn.execute(insert(copy_messages), [
                {"folder_id": folder_id, "source_key": r.source_key, "state": INFLIGHT,
                 "fingerprint": r.fingerprint, "size": r.size,
                 "dest_uidvalidity": r.dest_uidvalidity, "dest_uidnext": r.dest_uidnext}
                for r in records
            ])

    def finish(
        self,
        folder_id: int,
        copied: Iterable[tuple[str, int | None]] = (),
        skipped: Iterable[tuple[str, str]] = (),
        dropped: Iterable[str] = (),
        *,
        pop3: bool = False,
    ) -> None:
        """Settle in-flight rows in one transaction: copied (key, dest UID), skipped (key,
        reason), dropped (never reached the store: forget them so they are copied again).

        With pop3, copied keys are UIDLs and also go into `pop3_uidls` in the same transaction.
        """
        copied, skipped, dropped = list(copied), list(skipped), list(dropped)
        key = copy_messages.c.source_key
        where = copy_messages.c.folder_id == folder_id
        by_key = update(copy_messages).where(where, key == bindparam("k"))
        with self.engine.begin() as conn:
            if copied:  # one executemany per kind: a batch settles in one round of statements
                conn.execute(by_key.values(state=COPIED, dest_uid=bindparam("u")),
                             [{"k": k, "u": u} for k, u in copied])
            if skipped:
                conn.execute(by_key.values(state=SKIPPED, reason=bindparam("r")),
                             [{"k": k, "r": r[:1000]} for k, r in skipped])
            if dropped:
                conn.execute(delete(copy_messages).where(where, key.in_(dropped)))
            if pop3 and copied:
                self._record_uidls(conn, folder_id, [k for k, _ in copied])

    def forget(self, folder_id: int, keys: Iterable[str], *, pop3: bool = False) -> None:
        """Messages expunged at the source (and at the store): drop their records (and,
        with pop3, their UIDLs: the message is gone for POP3 clients too)."""
        keys = list(keys)
        with self.engine.begin() as conn:
            for start in range(0, len(keys), 500):  # bounded IN lists
                chunk = keys[start:start + 500]
                conn.execute(delete(copy_messages).where(
                    copy_messages.c.folder_id == folder_id, copy_messages.c.source_key.in_(chunk)))
                if pop3:
                    conn.execute(delete(pop3_uidls).where(
                        pop3_uidls.c.account_id == self.account_id, pop3_uidls.c.uidl.in_(chunk)))

    def _record_uidls(self, conn: Connection, folder_id: int, uidls: list[str]) -> None:
        sizes = dict(conn.execute(select(copy_messages.c.source_key, copy_messages.c.size).where(
            copy_messages.c.folder_id == folder_id, copy_messages.c.source_key.in_(uidls))).all())
        existing = set(conn.execute(select(pop3_uidls.c.uidl).where(
            pop3_uidls.c.account_id == self.account_id, pop3_uidls.c.uidl.in_(uidls))).scalars())
        rows = [{"account_id": self.account_id, "uidl": u, "size": min(sizes[u], _INT32_MAX)}
                for u in uidls if u not in existing]
        if rows:
            conn.execute(insert(pop3_uidls), rows)

    def rekey(self, folder_id: int, uidvalidity: int, records: Sequence[MessageRecord]) -> None:
        """The source folder's UIDVALIDITY changed: replace every row by `records` (the old
        rows matched by fingerprint to the new UIDs) and remember the new UIDVALIDITY."""
        with self.engine.begin() as conn:
            conn.execute(delete(copy_messages).where(copy_messages.c.folder_id == folder_id))
            if records:
                conn.execute(insert(copy_messages), [
                    {"folder_id": folder_id, "source_key": r.source_key, "state": r.state,
                     "fingerprint": r.fingerprint, "size": r.size, "dest_uid": r.dest_uid,
                     "reason": r.reason}
                    for r in records
                ])
            conn.execute(update(copy_folders).where(copy_folders.c.id == folder_id).values(
                uidvalidity=uidvalidity, synced_uidnext=None, synced_modseq=None,
                updated_at=_now()))

    def used_dest_uids(self, dest_name: str) -> set[int]:
        """Store UIDs already accounted for in dest_name (by any source folder of the account),
        so reconciliation never claims the same store message twice."""
        query = (
            select(copy_messages.c.dest_uid)
            .join(copy_folders, copy_folders.c.id == copy_messages.c.folder_id)
            .where(copy_folders.c.account_id == self.account_id,
                   copy_folders.c.dest_name == dest_name,
                   copy_messages.c.dest_uid.is_not(None))
        )
        with self.engine.connect() as conn:
            return set(conn.execute(query).scalars())

    def skipped(self) -> list[tuple[str, str, str]]:
        """(source folder, source key, reason) of every message the store refused."""
        query = (
            select(copy_folders.c.source_name, copy_messages.c.source_key, copy_messages.c.reason)
            .join(copy_folders, copy_folders.c.id == copy_messages.c.folder_id)
            .where(copy_folders.c.account_id == self.account_id,
                   copy_messages.c.state == SKIPPED)
        )
        with self.engine.connect() as conn:
            return [(f, k, r or "") for f, k, r in conn.execute(query)]

    def totals(self) -> Totals:
        query = (
            select(copy_messages.c.state, func.count(), func.coalesce(func.sum(
                copy_messages.c.size), 0))
            .join(copy_folders, copy_folders.c.id == copy_messages.c.folder_id)
            .where(copy_folders.c.account_id == self.account_id)
            .group_by(copy_messages.c.state)
        )
        with self.engine.connect() as conn:
            by_state = {state: (int(n), int(size)) for state, n, size in conn.execute(query)}
        copied = by_state.get(COPIED, (0, 0))
        return Totals(copied[0], by_state.get(SKIPPED, (0, 0))[0], copied[1])

    # --- progress counters (the shared `migrations` table) ----------------------------------

    def copy_engine(self) -> str | None:
        """The engine recorded for the account (migration/dsync.py), None before any pass."""
        with self.engine.connect() as conn:
            return conn.execute(select(migrations.c.copy_engine).where(
                migrations.c.account_id == self.account_id)).scalar_one_or_none()

    def record_engine(self, engine: str) -> None:
        """Say which engine copies the account, unless one is recorded already (a dsync
        account, or one that fell back, keeps what it has)."""
        with self.engine.begin() as conn:
            changed = conn.execute(update(migrations).where(and_(
                migrations.c.account_id == self.account_id,
                migrations.c.copy_engine.is_(None))).values(copy_engine=engine)).rowcount
            if not changed and conn.execute(select(migrations.c.account_id).where(
                    migrations.c.account_id == self.account_id)).first() is None:
                conn.execute(insert(migrations).values(
                    account_id=self.account_id, started_at=_now(), copy_engine=engine))

    def write_progress(self, *, finished: bool = False, error: str | None = None,
                       **counters: int) -> None:
        """Upsert the account's `migrations` row with the given counters (or other columns)."""
        values: dict[str, object] = dict(counters)
        values["last_error"] = error
        if finished:
            values["finished_at"] = values["last_pass_at"] = _now()
        with self.engine.begin() as conn:
            exists = conn.execute(select(migrations.c.account_id).where(
                migrations.c.account_id == self.account_id)).first()
            if exists is None:
                conn.execute(insert(migrations).values(
                    account_id=self.account_id, started_at=_now(), **values))
            else:
                conn.execute(update(migrations).where(and_(
                    migrations.c.account_id == self.account_id)).values(**values))


def _folder_state(row) -> FolderState:  # type: ignore[no-untyped-def]
    return FolderState(row.id, row.source_name, row.dest_name, row.uidvalidity,
                       row.synced_uidnext, row.synced_modseq)


def _record(row) -> MessageRecord:  # type: ignore[no-untyped-def]
    return MessageRecord(
        source_key=row.source_key, state=row.state, fingerprint=row.fingerprint, size=row.size,
        dest_uidvalidity=row.dest_uidvalidity, dest_uidnext=row.dest_uidnext,
        dest_uid=row.dest_uid, reason=row.reason,
    )
