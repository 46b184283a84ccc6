"""Writing to the new store: write-ahead batches, MULTIAPPEND, refusals, reconciliation.

Shared by the IMAP and POP3 copies. The invariant: a copy_messages row exists for a message
*before* any APPEND that may save it, so after a crash at any point the row is either settled or
`inflight` with a lower bound of the store UID it can have, and `reconcile` finds out which.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import structlog
from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError

from migrating_proxy.migration.connections import (
    DestinationError,
    StoreSpec,
    TransientError,
    close_quietly,
    connect_store_imap,
)
from migrating_proxy.migration.messages import (
    HEADER_FIELDS,
    AppendOutcome,
    OutMessage,
    append_messages,
    comparable_flags,
    fetch_range,
    fingerprint,
    header_fields_of,
    uid_sets,
)
from migrating_proxy.migration.progress import Reporter
from migrating_proxy.store.copystate import INFLIGHT, CopyState, FolderState, MessageRecord

log = structlog.get_logger(__name__)


# Seconds to wait before each look for messages the store saved without saying where.
FIND_SAVED_DELAYS = (0.0, 0.1, 0.3, 1.0, 2.0)


@dataclass
class _Bounds:
    uidvalidity: int
    uidnext: int  # a lower bound of the next UID the store will assign


class StoreWriter:
    """One store connection (reopened on demand) and the state it keeps in step with.

    Not shared between threads: each copy lane has its own (see `sibling`).
    """

    def __init__(self, spec: StoreSpec, state: CopyState, reporter: Reporter,
                 timeout: float, pop3: bool = False) -> None:
        self.spec = spec
        self.state = state
        self.reporter = reporter
        self.timeout = timeout
        self.pop3 = pop3  # copied keys are UIDLs: also record them in pop3_uidls
        self._client: IMAPClient | None = None
        self._bounds: dict[str, _Bounds] = {}
        self._ready: set[str] = set()  # folders known to exist on the store

    def sibling(self) -> StoreWriter:
        """Another writer to the same store and state, with a connection of its own."""
        return StoreWriter(self.spec, self.state, self.reporter, self.timeout, self.pop3)

    @property
    def client(self) -> IMAPClient:
        if self._client is None:
            self._client = connect_store_imap(self.spec, self.timeout)
        return self._client

    def close(self) -> None:
        close_quietly(self._client)
        self.drop()

    def drop(self) -> None:
        """Forget the connection and what it told us (after an error, or before a retry)."""
        self._client = None
        self._bounds.clear()
        self._ready.clear()

    # --- folders ---------------------------------------------------------------------------

    def ensure_folder(self, name: str, subscribe: bool) -> None:
        """Create the folder unless it is usable (never touching one that is), subscribe if
        asked. A `\\Noselect` placeholder is not usable: Dovecot leaves one for a parent when a
        child was created first, and it must be created for real before it takes mail."""
        if name in self._ready:
            return
        if name.upper() != "INBOX" and not self._usable(name):
            try:
                self.client.create_folder(name)
            except Exception:
                if not self._usable(name):  # a concurrent creator is fine
                    raise
            if subscribe:
                self.client.subscribe_folder(name)
        self._ready.add(name)

    def _usable(self, name: str) -> bool:
        """Whether the store has `name` as a folder that takes mail. STATUS rather than LIST:
        LIST shows placeholders too, and a store may create its special folders on first use."""
        try:
            self.client.folder_status(name, [b"UIDVALIDITY"])
        except IMAPClientAbortError:
            raise
        except IMAPClientError:
            return False
        return True

    def _current_bounds(self, name: str) -> _Bounds:
        bounds = self._bounds.get(name)
        if bounds is None:
            status = self.client.folder_status(name, [b"UIDVALIDITY", b"UIDNEXT"])
            bounds = _Bounds(int(status[b"UIDVALIDITY"]), int(status[b"UIDNEXT"]))
            self._bounds[name] = bounds
        return bounds

    def rename_folder(self, old: str, new: str) -> None:
        """RENAME on the store (folders below `old` move with it, RFC 3501 6.3.5)."""
        self.client.rename_folder(old, new)
        self._bounds.pop(old, None)
        self._ready.discard(old)

    def delete_folder_if_empty(self, name: str) -> bool:
        """DELETE a folder the old server no longer has, unless something is left in it."""
        if not self.client.folder_exists(name):
            return False
        if int(self.client.folder_status(name, [b"MESSAGES"])[b"MESSAGES"]):
            return False
        try:
            self.client.delete_folder(name)
        except Exception as exc:  # e.g. a store that refuses to delete a folder with children
            log.warning("mirror_folder_kept", folder=name,
                        reason=str(exc)[:200])
            return False
        self._bounds.pop(name, None)
        self._ready.discard(name)
        return True

    # --- mirroring changes made at the old server -------------------------------------------

    def expunge(self, name: str, uids: Iterable[int]) -> None:
        """Remove exactly these messages from the store folder (UID EXPUNGE, RFC 4315).

        Never a plain EXPUNGE or CLOSE: other messages may carry \\Deleted because they carry
        it at the old server, and must stay.
        """
        sets = list(uid_sets(uids))
        if not sets:
            return
        if not self.client.has_capability("UIDPLUS"):
            raise DestinationError("the store lacks UIDPLUS (UID EXPUNGE): cannot mirror "
                                   "expunges exactly")
        with self._selected(name):
            for uid_set in sets:
                self.client.add_flags(uid_set, [b"\\Deleted"], silent=True)
                self.client.uid_expunge(uid_set)

    def flags_of(self, name: str, uids: Iterable[int]) -> dict[int, frozenset[bytes]]:
        """Store UID -> its flags (without \\Recent), for the UIDs that exist."""
        found: dict[int, frozenset[bytes]] = {}
        with self._selected(name, readonly=True):
            for uid_set in uid_sets(uids):
                for uid, item in fetch_range(self.client, uid_set, b"FLAGS").items():
                    found[uid] = comparable_flags(item.get(b"FLAGS", ()))
        return found

    def set_flags(self, name: str, flags_by_uid: dict[int, tuple[bytes, ...]]) -> None:
        """Give each store message exactly the flags listed (FLAGS.SILENT replaces them)."""
        groups: dict[tuple[bytes, ...], list[int]] = defaultdict(list)
        for uid, flags in flags_by_uid.items():
            groups[tuple(sorted(flags))].append(uid)
        if not groups:
            return
        with self._selected(name):
            for flags, uids in groups.items():
                for uid_set in uid_sets(uids):
                    self.client.set_flags(uid_set, list(flags), silent=True)

    @contextmanager
    def _selected(self, name: str, readonly: bool = False) -> Iterator[None]:
        """The folder selected for the duration; left with UNSELECT, which expunges nothing."""
        self.client.select_folder(name, readonly=readonly)
        try:
            yield
        finally:
            self.client.unselect_folder()

    # --- writing ---------------------------------------------------------------------------

    def write(self, folder: FolderState, messages: Sequence[OutMessage]) -> None:
        """Copy one batch: record it in flight, MULTIAPPEND, settle. Refusals are skipped."""
        if not messages:
            return
        bounds = self._current_bounds(folder.dest_name)
        self.state.begin_batch(folder.id, [
            MessageRecord(m.key, INFLIGHT, m.fingerprint, m.size, bounds.uidvalidity,
                          bounds.uidnext)
            for m in messages
        ])
        outcome = append_messages(self.client, folder.dest_name, messages)
        if outcome.ok:
            self._settle_appended(folder, messages, outcome, bounds)
        elif len(messages) == 1:
            self._skip(folder, messages[0], outcome.text)
        else:
            self._retry_one_by_one(folder, messages)

    def _settle_appended(self, folder: FolderState, messages: Sequence[OutMessage],
                         outcome: AppendOutcome, bounds: _Bounds) -> None:
        uids = outcome.uids or []
        if len(uids) != len(messages):
            self._find_saved(folder, messages)
            return
        if outcome.uidvalidity != bounds.uidvalidity:
            # The folder was made anew since we looked: APPENDUID still says where each
            # message went, under the UIDVALIDITY it names.
            log.info("store_uidvalidity_changed", folder=folder.dest_name)
            self._bounds.pop(folder.dest_name, None)
        self.state.finish(folder.id, copied=[(m.key, u) for m, u in zip(messages, uids,
                                                                        strict=True)],
                          pop3=self.pop3)
        bounds.uidnext = max(bounds.uidnext, max(uids) + 1)
        self.reporter.copied(len(messages), sum(len(m.raw) for m in messages))

    def _find_saved(self, folder: FolderState, messages: Sequence[OutMessage]) -> None:
        """The store said OK without (usable) APPENDUID: the messages are saved, and we must
        find them by fingerprint. Never forget one: a message the store saved where we cannot
        see it yet (Dovecot's maildir assigns no UID while another session holds its uidlist
        lock) would otherwise be recorded as never sent, and a folder marked synced after it
        would never be looked at again. They are looked for a few times; if some still do not
        show, their rows stay in flight and the folder is retried (TransientError), whose
        reconciliation settles them."""
        log.warning("appenduid_missing_reconciling", folder=folder.dest_name,
                    messages=len(messages))
        wanted = {m.key for m in messages}
        found: set[str] = set()
        for delay in FIND_SAVED_DELAYS:
            time.sleep(delay)
            self._bounds.pop(folder.dest_name, None)
            found |= self.reconcile(folder, keep_unmatched=True)
            if wanted <= found:
                return
        raise TransientError(f"the store saved {len(wanted - found)} message(s) without "
                             f"APPENDUID and they did not show up in {folder.dest_name}")

    def _skip(self, folder: FolderState, message: OutMessage, reason: str) -> None:
        log.warning("message_refused_by_store", folder=folder.source_name, key=message.key,
                    size=len(message.raw), reason=reason[:200])
        self.state.finish(folder.id, skipped=[(message.key, reason or "refused by the store")])
        self.reporter.skipped(1)

    def _retry_one_by_one(self, folder: FolderState, messages: Sequence[OutMessage]) -> None:
        """A MULTIAPPEND was refused: find the culprit(s) by appending singly.

        MULTIAPPEND is atomic, but a server that saved part of the batch anyway is caught by
        reconciling first (keeping the unmatched rows in flight, with their original bounds).
        """
        settled = self.reconcile(folder, keep_unmatched=True)
        for message in messages:
            if message.key in settled:
                continue
            outcome = append_messages(self.client, folder.dest_name, [message])
            if not outcome.ok:
                self._skip(folder, message, outcome.text)
            elif outcome.uids and len(outcome.uids) == 1:
                self.state.finish(folder.id, copied=[(message.key, outcome.uids[0])],
                                  pop3=self.pop3)
                self.reporter.copied(1, len(message.raw))
            else:
                self._find_saved(folder, [message])
        self._bounds.pop(folder.dest_name, None)

    # --- reconciliation --------------------------------------------------------------------

    def reconcile(self, folder: FolderState, keep_unmatched: bool = False) -> set[str]:
        """Settle the folder's in-flight rows by looking at what is on the store.

        Each row is matched (by fingerprint, as a multiset: two identical messages need two
        store messages) to a store message at or above the row's UIDNEXT bound that no other
        row claims. Matched rows become `copied`; the others never arrived and are forgotten
        (so they are copied again), or kept in flight when keep_unmatched. Returns the keys
        settled as copied.
        """
        rows = self.state.records(folder.id, INFLIGHT)
        if not rows:
            return set()
        self.ensure_folder(folder.dest_name, subscribe=False)
        bounds = self._current_bounds(folder.dest_name)
        live = [r for r in rows if r.dest_uidvalidity == bounds.uidvalidity]
        candidates = self._store_fingerprints(folder.dest_name, live)
        matched: list[tuple[str, int]] = []
        for row in sorted(live, key=lambda r: r.dest_uidnext or 0):
            uids = [u for u in candidates.get(row.fingerprint, []) if u >= (row.dest_uidnext or 0)]
            if uids:
                candidates[row.fingerprint].remove(uids[0])
                matched.append((row.source_key, uids[0]))
        keys = {k for k, _ in matched}
        dropped = [] if keep_unmatched else [r.source_key for r in rows if r.source_key not in keys]
        self.state.finish(folder.id, copied=matched, dropped=dropped, pop3=self.pop3)
        sizes = {r.source_key: r.size for r in rows}
        if matched:
            self.reporter.copied(len(matched), sum(sizes[k] for k in keys))
        log.info("in_flight_reconciled", folder=folder.dest_name, found=len(matched),
                 lost=len(rows) - len(matched))
        return keys

    def _store_fingerprints(self, name: str, rows: Sequence[MessageRecord]
                            ) -> dict[str, list[int]]:
        """Fingerprint -> unclaimed store UIDs (ascending) from the lowest bound upwards."""
        if not rows:
            return {}
        low = min(r.dest_uidnext or 1 for r in rows)
        self.client.select_folder(name, readonly=True)
        try:
            data = fetch_range(self.client, f"{low}:*", b"RFC822.SIZE " + HEADER_FIELDS)
        finally:
            self.client.unselect_folder()
        claimed = self.state.used_dest_uids(name)
        found: dict[str, list[int]] = defaultdict(list)
        for uid in sorted(data):
            if uid >= low and uid not in claimed:
                item = data[uid]
                found[fingerprint(header_fields_of(item), int(item[b"RFC822.SIZE"]))].append(uid)
        return found

