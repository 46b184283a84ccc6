"""Copying an IMAP source: plan the folders, then per folder newest first, in byte-bounded batches.

Per folder: STATUS (unchanged since the last complete pass? done), settle rows left in flight by
an interrupted run, EXAMINE (read-only, so nothing at the source changes), handle a changed
UIDVALIDITY by re-keying the records by fingerprint, list UID/RFC822.SIZE, and copy what is not
recorded yet, highest UID first, with BODY.PEEK[] so \\Seen never changes.

A mirror pass (`mirror=True`, for accounts still served by the old server) also makes the store
follow what changed there: folders renamed or deleted, messages expunged, flags (mirror.py).
"""

from __future__ import annotations

import queue
import threading
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import replace
from typing import Any

import structlog
from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError

from migrating_proxy import failpoints
from migrating_proxy.migration.connections import (
    Backoff,
    SourceSpec,
    TransientError,
    abort_quietly,
    close_quietly,
    connect_source_imap,
    is_transient,
)
from migrating_proxy.migration.destination import StoreWriter
from migrating_proxy.migration.folders import FolderMapping, Namespace, plan_folders
from migrating_proxy.migration.messages import (
    HEADER_FIELDS,
    OutMessage,
    batches,
    copyable_flags,
    crlf_size,
    fetch_range,
    fingerprint,
    header_fields_of,
    message_fingerprint,
    uid_sets,
)
from migrating_proxy.migration.mirror import mirror_messages, reflect_folders, store_uids
from migrating_proxy.migration.pipeline import ByteBudget, Pacing, Prefetcher, paced
from migrating_proxy.migration.progress import Reporter
from migrating_proxy.store.copystate import CopyState, FolderState, MessageRecord

log = structlog.get_logger(__name__)

BATCH_MESSAGES = 100
BATCH_BYTES = 8 * 1024 * 1024
_FETCH_ITEMS = [b"BODY.PEEK[]", b"FLAGS", b"INTERNALDATE"]
_STATUS_ITEMS = [b"MESSAGES", b"UIDNEXT", b"UIDVALIDITY"]
_MODSEQ = b"HIGHESTMODSEQ"


class Stopped(Exception):
    """should_stop() said so at a batch boundary; everything so far is recorded."""


class FoldersFailed(Exception):
    """Some folders could not be copied (the servers refused an operation on them); every
    other folder was. The message names each folder and the server's reason."""

    def __init__(self, failures: list[tuple[str, str]]) -> None:
        reasons = "; ".join(f"{name}: {reason[:200]}" for name, reason in failures)
        super().__init__(f"{len(failures)} folder(s) not copied: {reasons}")


def _namespace(client: IMAPClient) -> Namespace:
    """The personal namespace's prefix and delimiter (LIST's delimiter without NAMESPACE)."""
    if client.has_capability("NAMESPACE"):
        personal = client.namespace().personal
        if personal:
            prefix, delimiter = personal[0]
            return Namespace(prefix or "", _text(delimiter))
    listing = client.list_folders(pattern="%")
    return Namespace("", _text(listing[0][1]) if listing else None)


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


class _Lane:
    """One source connection and one store writer: what a worker copies a folder with.

    Both connections open on first use and are dropped after a failure (they may be half
    dead), to be reopened by the retry.
    """

    def __init__(self, source: SourceSpec, writer: StoreWriter, timeout: float) -> None:
        self.source = source
        self.writer = writer
        self.timeout = timeout
        self._client: IMAPClient | None = None

    @property
    def client(self) -> IMAPClient:
        if self._client is None:
            self._client = connect_source_imap(self.source, self.timeout)
        return self._client

    def drop_source(self) -> None:
        abort_quietly(self._client)
        self._client = None

    def drop(self) -> None:
        self.drop_source()
        self.writer.drop()

    def close(self) -> None:
        close_quietly(self._client)
        self._client = None
        self.writer.close()


class ImapCopier:
    """Copies one account from an IMAP source, up to `parallel_folders` folders at a time.

    Each lane (a source and a store connection) copies whole folders; INBOX is handed out
    first, and inside a folder the newest message goes first (the oldest in a mirror pass:
    see copy_folder). A folder the servers refuse to handle (a NO that retrying won't change)
    is recorded and the others are copied; the run then raises FoldersFailed. Any other
    failure (login, connection, after retries) stops the other lanes at their next batch
    boundary, and the run reports it.
    """

    def __init__(self, state: CopyState, source: SourceSpec, writer: StoreWriter,
                 reporter: Reporter, should_stop: Callable[[], bool], timeout: float,
                 backoff: Backoff | None = None, parallel_folders: int = 1,
                 mirror: bool = False, pacing: Pacing | None = None) -> None:
        self.state = state
        self.pacing = pacing  # pre-stage passes: reads within the old host's rate
        self.source = source
        self.reporter = reporter
        self.mirror = mirror
        self.should_stop = should_stop
        self.backoff = backoff or Backoff()
        self.budget = ByteBudget()
        self.lanes = [_Lane(source, writer if i == 0 else writer.sibling(), timeout)
                      for i in range(max(1, parallel_folders))]
        self._failed = threading.Event()
        self.failed_folders: list[tuple[str, str]] = []  # (source name, reason)

    def close(self) -> None:
        for lane in self.lanes:
            lane.close()

    def run(self) -> None:
        first = self.lanes[0]
        plan = self.backoff.run(lambda: self.plan(first), on_retry=first.drop)
        if self.mirror:
            self.backoff.run(lambda: reflect_folders(self.state, first.client, first.writer,
                                                     plan, self.reporter),
                             on_retry=first.drop)
        self.reporter.progress.folders_total = len(plan)
        self.reporter.progress.messages_total = self.backoff.run(
            lambda: self._count(first.client, plan), on_retry=first.drop)
        self.reporter.flush(force=True)
        # Every folder has a store folder of its own (plan_folders), so lanes never meet.
        idle: queue.SimpleQueue[_Lane] = queue.SimpleQueue()
        for lane in self.lanes[:len(plan)]:
            idle.put(lane)
        with ThreadPoolExecutor(max_workers=max(1, min(len(self.lanes), len(plan))),
                                thread_name_prefix="copy-lane") as pool:
            futures = [pool.submit(self._copy_one, mapping, idle) for mapping in plan]
            self._wait(futures)
        if self.failed_folders:
            raise FoldersFailed(self.failed_folders)

    def _wait(self, futures: list[Future[None]]) -> None:
        """Wait for every lane; on the first failure, stop the others and raise it."""
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        if any(f.exception() is not None for f in done):
            self._failed.set()
        wait(futures)
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:  # the real failure rather than the Stopped it caused elsewhere
            raise next((e for e in errors if not isinstance(e, Stopped)), errors[0])

    def _copy_one(self, mapping: FolderMapping, idle: queue.SimpleQueue[_Lane]) -> None:
        lane = idle.get()
        try:
            self._check_stop()
            try:
                self.backoff.run(lambda: self.copy_folder(lane, mapping), on_retry=lane.drop)
            except IMAPClientError as exc:
                if is_transient(exc):
                    raise
                log.warning("folder_not_copied", folder=mapping.source, dest=mapping.dest,
                            reason=str(exc)[:300])
                self.failed_folders.append((mapping.source, str(exc)))
                return
            self.reporter.folder_done()
        finally:
            idle.put(lane)

    def _check_stop(self) -> None:
        if self._failed.is_set() or self.should_stop():
            raise Stopped

    def plan(self, lane: _Lane) -> list[FolderMapping]:
        client = lane.client
        if client.has_capability("XLIST") and not client.has_capability("SPECIAL-USE"):
            listing = client.xlist_folders()  # Gmail of old: roles only through XLIST
        else:
            listing = client.list_folders()
        subscribed = {name for _flags, _delim, name in client.list_sub_folders()}
        store = lane.writer.client
        plan = plan_folders(listing, subscribed, _namespace(client), store.list_folders(),
                            _namespace(store), self.source.type, self.source.subscribed_only)
        log.info("folder_plan", folders=len(plan),
                 mapping=[(m.source, m.dest) for m in plan if m.source != m.dest][:50])
        return plan

    @staticmethod
    def _count(client: IMAPClient, plan: list[FolderMapping]) -> int:
        total = 0
        for mapping in plan:
            try:
                total += int(client.folder_status(mapping.source, [b"MESSAGES"])[b"MESSAGES"])
            except IMAPClientError as exc:  # counted as empty; its copy will say what failed
                if is_transient(exc):
                    raise
        return total

    # --- one folder ------------------------------------------------------------------------

    def copy_folder(self, lane: _Lane, mapping: FolderMapping) -> None:
        client, writer = lane.client, lane.writer
        folder = self.state.folder(mapping.source, mapping.dest)
        condstore = self.mirror and client.has_capability("CONDSTORE")
        status = client.folder_status(mapping.source,
                                      _STATUS_ITEMS + ([_MODSEQ] if condstore else []))
        # Read before anything else: every flag change after it is seen by the next pass.
        modseq = int(status.get(_MODSEQ) or 0) or None
        if self._unchanged(folder, status, modseq):
            return
        writer.ensure_folder(mapping.dest, mapping.subscribed)
        writer.reconcile(folder)
        selected = client.select_folder(mapping.source, readonly=True)
        uidvalidity = int(selected[b"UIDVALIDITY"])
        since = folder.synced_modseq
        if folder.uidvalidity is not None and folder.uidvalidity != uidvalidity:
            self._rekey(client, writer, folder, uidvalidity)
            since = None
        elif folder.uidvalidity is None:
            self.state.mark_unsynced(folder.id, uidvalidity)
        sizes = _inventory(client, int(selected.get(b"EXISTS", 1)))
        current = replace(folder, uidvalidity=uidvalidity)
        if self.mirror:
            mirror_messages(self.state, client, writer, current, sizes, since, self.reporter)
        known = self.state.known_keys(folder.id)
        # Newest first, so a user working on the store while it fills sees new mail first;
        # but nobody sees a mirrored (passthrough) account's store before its switch, so that
        # goes oldest first: the old order, which POP3 message numbers follow (pop3_uidls.py).
        pending = sorted((uid for uid in sizes if str(uid) not in known), reverse=not self.mirror)
        log.info("folder_copy_started", folder=mapping.source, dest=mapping.dest,
                 pending=len(pending), known=len(known))
        batch_bytes = self.pacing.batch_bytes(BATCH_BYTES) if self.pacing else BATCH_BYTES
        groups = batches(pending, sizes.__getitem__, BATCH_MESSAGES, batch_bytes)
        size_of = lambda uids: sum(sizes[u] for u in uids)  # noqa: E731
        with Prefetcher(groups, paced(self.pacing, size_of, lambda uids: _fetch(client, uids)),
                        size_of, self.budget, on_abort=lane.drop_source) as fetched:
            for messages in fetched:
                self._check_stop()
                writer.write(current, messages)
                failpoints.reach("copy.batch_written")
        uidnext = selected.get(b"UIDNEXT")
        self.state.mark_synced(folder.id, uidvalidity, int(uidnext) if uidnext else None,
                               modseq)

    def _unchanged(self, folder: FolderState, status: dict[bytes, Any],
                   modseq: int | None) -> bool:
        """Nothing to do since the last complete pass: no new message (and, for a mirror
        pass, no expunge or flag change: only CONDSTORE can tell, else every pass looks)."""
        if (folder.uidvalidity != status[b"UIDVALIDITY"]
                or folder.synced_uidnext != status[b"UIDNEXT"]
                or self.state.has_inflight(folder.id)):
            return False
        return not self.mirror or (modseq is not None and folder.synced_modseq == modseq)

    def _rekey(self, client: IMAPClient, writer: StoreWriter, folder: FolderState,
               uidvalidity: int) -> None:
        """The source folder was recreated: carry each record over to the new UID of the
        message with the same fingerprint (one record per message, so duplicates stay two).
        A mirror pass expunges the store copies of messages the new folder no longer has."""
        exists = int(client.folder_status(folder.source_name, [b"MESSAGES"])[b"MESSAGES"])
        data = fetch_range(client, "1:*", b"RFC822.SIZE " + HEADER_FIELDS) if exists else {}
        pool: dict[str, list[MessageRecord]] = defaultdict(list)
        for record in self.state.records(folder.id):
            pool[record.fingerprint].append(record)
        carried = []
        for uid in sorted(data):
            fp = _source_fingerprint(data[uid])
            if pool.get(fp):
                carried.append(replace(pool[fp].pop(0), source_key=str(uid)))
        # Earlier copies were matched to the new UIDs by fingerprint.
        log.warning("source_uidvalidity_changed", folder=folder.source_name,
                    matched=len(carried), messages=len(data))
        left = [r for records in pool.values() for r in records]
        if self.mirror and left and writer.client.folder_exists(folder.dest_name):
            writer.expunge(folder.dest_name, store_uids(left))
            self.reporter.mirrored(len(left))
        self.state.rekey(folder.id, uidvalidity, carried)


def _without_body(data: dict[int, dict[bytes, Any]], uids: list[int]) -> list[int]:
    return [uid for uid in uids if (data.get(uid) or {}).get(b"BODY[]") is None]


def _confirm_expunged(client: IMAPClient, uids: list[int]) -> None:
    """Messages the old server sent no body for: fine if another session expunged them
    (Dovecot answers `BODY[] NIL` until it may tell us), else the batch must be read again.
    Skipping one that still exists would lose it for good: the folder is marked synced up to
    its UIDNEXT at the end of the pass, and later passes only look above that."""
    client.noop()  # lets the server report the expunges it was holding back
    still = set(client.search(["UID", ",".join(uid_sets(uids))])) & set(uids)
    if still:
        raise TransientError(f"the old server sent no body for {len(still)} message(s) it "
                             f"still has (UID {min(still)}...)")
    log.info("messages_expunged_meanwhile", uids=len(uids))


def _inventory(client: IMAPClient, exists: int) -> dict[int, int]:
    """UID -> RFC822.SIZE of every message in the selected folder."""
    if exists == 0:
        return {}
    data = fetch_range(client, "1:*", b"RFC822.SIZE")
    return {uid: int(item[b"RFC822.SIZE"]) for uid, item in data.items()}


def _fetch(client: IMAPClient, uids: list[int]) -> list[OutMessage]:
    items = b" ".join(_FETCH_ITEMS)
    data = fetch_range(client, ",".join(uid_sets(uids)), items)
    if missing := _without_body(data, uids):  # asked again once, on their own
        data.update(fetch_range(client, ",".join(uid_sets(missing)), items))
        if missing := _without_body(data, missing):
            _confirm_expunged(client, missing)
    messages = []
    for uid in uids:  # keep the batch's order; a UID expunged meanwhile is absent
        item = data.get(uid)
        if item is None or item.get(b"BODY[]") is None:  # confirmed expunged just above
            continue
        raw = bytes(item[b"BODY[]"])
        messages.append(OutMessage(
            key=str(uid), raw=raw, flags=copyable_flags(item.get(b"FLAGS", ())),
            date=item.get(b"INTERNALDATE"), fingerprint=message_fingerprint(raw),
            size=crlf_size(raw),
        ))
    return messages


def _source_fingerprint(item: dict[bytes, Any]) -> str:
    return fingerprint(header_fields_of(item), int(item[b"RFC822.SIZE"]))


