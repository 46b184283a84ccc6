"""Mirror passes: the old server is the truth, and the store is made equal to it.

An ordinary pass only adds what is new at the old server: right for accounts the store already
serves, whose users change their mail on the store. While an account is still served by the
old server (passthrough, until its switch), the user changes their mail *there*, and nothing
else writes to the store, so each pass also reflects those changes:

* messages expunged at the old server are expunged at the store (UID EXPUNGE of exactly the
  copies the copy state recorded, never a plain EXPUNGE);
* flag and keyword changes are applied: with CONDSTORE (RFC 7162) only messages changed since
  the HIGHESTMODSEQ of the last complete pass are read; without it, every message's FLAGS are
  compared (a sweep);
* folders renamed at the old server are renamed at the store when the folder kept its
  UIDVALIDITY (a rename, not a new folder), so nothing is copied again; folders deleted there
  are emptied and deleted at the store (not INBOX or the store's special-use folders).

Messages are matched only through the copy state's source UID -> store UID records, never by
guessing. Every step is idempotent and ordered so that a crash at any point is repaired by the
next pass (see `reflect_folders`).
"""

from __future__ import annotations

from collections.abc import Iterable

import structlog
from imapclient import IMAPClient

from migrating_proxy.migration.destination import StoreWriter
from migrating_proxy.migration.folders import FolderMapping, store_special_folders
from migrating_proxy.migration.messages import comparable_flags, copyable_flags, fetch_range
from migrating_proxy.migration.progress import Reporter
from migrating_proxy.store.copystate import COPIED, CopyState, FolderState, MessageRecord

log = structlog.get_logger(__name__)


def mirror_messages(state: CopyState, source: IMAPClient, writer: StoreWriter,
                    folder: FolderState, current: Iterable[int], since_modseq: int | None,
                    reporter: Reporter) -> None:
    """Expunges and flag changes of one folder, selected at the source (current: its UIDs).

    since_modseq: the folder's HIGHESTMODSEQ at the last complete pass (CONDSTORE), or None
    for a sweep of every message's flags.
    """
    present = set(current)
    records = state.records(folder.id)
    gone = [r for r in records if int(r.source_key) not in present]
    if gone:
        if writer.client.folder_exists(folder.dest_name):
            writer.expunge(folder.dest_name, store_uids(gone))
        state.forget(folder.id, [r.source_key for r in gone])
        reporter.mirrored(len(gone))
        log.info("mirror_expunged", folder=folder.source_name, expunged=len(gone))
    copies = {int(r.source_key): r.dest_uid for r in records
              if r.state == COPIED and r.dest_uid is not None and int(r.source_key) in present}
    if not copies:
        return
    modifier = f"(CHANGEDSINCE {since_modseq})" if since_modseq else ""
    changed = fetch_range(source, "1:*", b"FLAGS", modifier)
    wanted = {copies[uid]: copyable_flags(item.get(b"FLAGS", ()))
              for uid, item in changed.items() if uid in copies}
    if not wanted:
        return
    have = writer.flags_of(folder.dest_name, wanted)
    different = {uid: flags for uid, flags in wanted.items()
                 if uid in have and comparable_flags(flags) != have[uid]}
    writer.set_flags(folder.dest_name, different)
    reporter.mirrored(len(different))
    if different:
        log.info("mirror_flags_changed", folder=folder.source_name, messages=len(different),
                 read=len(wanted), sweep=since_modseq is None)


def reflect_folders(state: CopyState, source: IMAPClient, writer: StoreWriter,
                    plan: list[FolderMapping], reporter: Reporter) -> None:
    """Folders copied before that the old server no longer lists: renamed or deleted there.

    Crash safety: the store is changed first and the copy state after, and each step
    recognises the store state an interrupted earlier attempt left (a store folder already
    renamed, already emptied or already deleted), so the next pass finishes the job.
    """
    planned = {m.source for m in plan}
    rows = state.folders()
    vanished = [r for r in rows if r.source_name not in planned]
    if not vanished:
        return
    known = {r.source_name for r in rows}
    fresh = {m.source: m for m in plan if m.source not in known}
    validity = {name: int(source.folder_status(name, [b"UIDVALIDITY"])[b"UIDVALIDITY"])
                for name in fresh}
    store_list = writer.client.list_folders()
    delimiter = next((_text(d) for _f, d, _n in store_list if d), None) or "/"
    protected = {"INBOX"} | set(store_special_folders(store_list).values())
    deleted = []
    for stale in sorted(vanished, key=lambda r: r.dest_name.count(delimiter)):  # parents first
        row = next(r for r in state.folders() if r.id == stale.id)  # a parent's move updates it
        match = next((fresh[name] for name in fresh
                      if row.uidvalidity is not None and validity[name] == row.uidvalidity), None)
        if match is not None and _renamed(state, writer, row, match, plan, protected,
                                          delimiter):
            del fresh[match.source]
        else:
            deleted.append(row)
        reporter.mirrored(1)
    # Children first: a store refuses to delete a folder that still has children.
    for row in sorted(deleted, key=lambda r: -r.dest_name.count(delimiter)):
        _deleted(state, writer, row, plan, protected)


def _renamed(state: CopyState, writer: StoreWriter, row: FolderState, match: FolderMapping,
             plan: list[FolderMapping], protected: set[str], delimiter: str) -> bool:
    """Follow a rename at the store; False if it cannot be a plain rename there (the store
    folder is shared with another source folder, special, or the new name is taken)."""
    if match.dest != row.dest_name:
        shared = row.dest_name in protected or any(
            m.dest == row.dest_name for m in plan if m.source != match.source)
        if shared:
            return False
        old_exists = writer.client.folder_exists(row.dest_name)
        new_exists = writer.client.folder_exists(match.dest)
        if old_exists and not new_exists:
            writer.rename_folder(row.dest_name, match.dest)
        elif old_exists or not new_exists:
            return False
        # (not old_exists and new_exists: an interrupted pass renamed it already)
    state.rename_folder(row.id, match.source, match.dest, moved_from=row.dest_name,
                        delimiter=delimiter)
    log.info("mirror_folder_renamed", source=(row.source_name, match.source),
             store=(row.dest_name, match.dest))
    return True


def _deleted(state: CopyState, writer: StoreWriter, row: FolderState,
             plan: list[FolderMapping], protected: set[str]) -> None:
    """Expunge the folder's copies at the store, delete the store folder when nothing else
    uses it, then forget the folder."""
    if writer.client.folder_exists(row.dest_name):
        writer.expunge(row.dest_name, store_uids(state.records(row.id)))
        still_used = row.dest_name in protected or any(m.dest == row.dest_name for m in plan) \
            or any(r.dest_name == row.dest_name and r.id != row.id for r in state.folders())
        if not still_used:
            writer.delete_folder_if_empty(row.dest_name)
    state.remove_folder(row.id)
    log.info("mirror_folder_deleted", source=row.source_name, store=row.dest_name)


def store_uids(records: Iterable[MessageRecord]) -> list[int]:
    """The store UIDs of the records' copies."""
    return [r.dest_uid for r in records if r.state == COPIED and r.dest_uid is not None]


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value
