"""Copying a POP3 source: every message into INBOX, newest first (mirrored: oldest first), keyed
by UIDL.

POP3 has no folders, flags or arrival dates:
* the date is the message's Date: header (the time of the copy when missing or unparsable);
* every message is marked \\Seen: a POP3 user has already downloaded it into their mail
  program, so an IMAP client on the new store should not present years of mail as unread.
The UIDL of each copied message is recorded in `pop3_uidls` (in the same transaction that marks
it copied), so the proxy can later serve the old UIDLs to POP3 clients.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import structlog

from migrating_proxy.migration.connections import (
    Backoff,
    SourcePOP3,
    SourceSpec,
    abort_quietly,
    close_quietly,
    connect_source_pop3,
)
from migrating_proxy.migration.destination import StoreWriter
from migrating_proxy.migration.imap_copy import BATCH_BYTES, BATCH_MESSAGES, Stopped
from migrating_proxy.migration.messages import (
    OutMessage,
    batches,
    crlf_size,
    header_block,
    message_fingerprint,
)
from migrating_proxy.migration.mirror import store_uids
from migrating_proxy.migration.pipeline import ByteBudget, Pacing, Prefetcher, paced
from migrating_proxy.migration.progress import Reporter
from migrating_proxy.store.copystate import CopyState, FolderState

log = structlog.get_logger(__name__)

POP3_FOLDER = "POP3"  # copy_folders.source_name of a POP3 source
POP3_FLAGS = (b"\\Seen",)


def _date_of(raw: bytes) -> datetime:
    for line in header_block(raw).replace(b"\r\n", b"\n").split(b"\n"):
        if line.lower().startswith(b"date:"):
            try:
                date = parsedate_to_datetime(line[5:].decode("latin-1").strip())
            except (TypeError, ValueError, IndexError):
                break
            return date if date.tzinfo else date.replace(tzinfo=UTC)
    return datetime.now(UTC)


class Pop3Copier:
    """Copies one account from a POP3 source into the store's INBOX."""

    def __init__(self, state: CopyState, source: SourceSpec, writer: StoreWriter,
                 reporter: Reporter, should_stop: Callable[[], bool], timeout: float,
                 backoff: Backoff | None = None, mirror: bool = False,
                 pacing: Pacing | None = None) -> None:
        self.state = state
        self.pacing = pacing  # pre-stage passes: reads within the old host's rate
        self.mirror = mirror  # messages deleted at the old server are expunged at the store
        self.source = source
        self.writer = writer
        self.reporter = reporter
        self.should_stop = should_stop
        self.timeout = timeout
        self.backoff = backoff or Backoff()
        self.budget = ByteBudget()
        self._conn: SourcePOP3 | None = None

    @property
    def conn(self) -> SourcePOP3:
        if self._conn is None:
            self._conn = connect_source_pop3(self.source, self.timeout)
        return self._conn

    def _drop_source(self) -> None:
        abort_quietly(self._conn)
        self._conn = None

    def drop(self) -> None:
        self._drop_source()
        self.writer.drop()

    def close(self) -> None:
        close_quietly(self._conn)
        self._conn = None
        self.writer.close()

    def run(self) -> None:
        self.reporter.progress.folders_total = 1
        self.backoff.run(self._copy, on_retry=self.drop)
        self.reporter.folder_done()

    def _listing(self) -> list[tuple[int, str, int]]:
        """(message number, UIDL, size), newest (highest number) first; oldest first for a
        mirrored account, whose store nobody sees before the switch: the old POP3 order."""
        sizes = {}
        for line in self.conn.list()[1]:
            number, size = line.split()[:2]
            sizes[int(number)] = int(size)
        listing = []
        for line in self.conn.uidl()[1]:
            number, uidl = line.split()[:2]
            listing.append((int(number), uidl.decode("ascii", "replace"), sizes[int(number)]))
        return sorted(listing, reverse=not self.mirror)

    def _copy(self) -> None:
        folder = self.state.folder(POP3_FOLDER, "INBOX")
        listing = self._listing()
        self.reporter.progress.messages_total = len(listing)
        self.writer.ensure_folder("INBOX", subscribe=False)
        self.writer.reconcile(folder)
        if self.mirror:
            self._mirror_deletions(folder, {uidl for _number, uidl, _size in listing})
        known = self.state.known_keys(folder.id)
        pending = [entry for entry in listing if entry[1] not in known]
        log.info("pop3_mailbox_copy", pending=len(pending), known=len(known))
        batch_bytes = self.pacing.batch_bytes(BATCH_BYTES) if self.pacing else BATCH_BYTES
        groups = batches(pending, lambda e: e[2], BATCH_MESSAGES, batch_bytes)
        size_of = lambda g: sum(e[2] for e in g)  # noqa: E731
        with Prefetcher(groups, paced(self.pacing, size_of, self._retrieve_all), size_of,
                        self.budget, on_abort=self._drop_source) as fetched:
            for messages in fetched:
                if self.should_stop():
                    raise Stopped
                self.writer.write(folder, messages)
        self.state.mark_synced(folder.id, 0, None)

    def _mirror_deletions(self, folder: FolderState, present: set[str]) -> None:
        gone = [r for r in self.state.records(folder.id) if r.source_key not in present]
        if gone:
            self.writer.expunge("INBOX", store_uids(gone))
            self.state.forget(folder.id, [r.source_key for r in gone], pop3=True)
            self.reporter.mirrored(len(gone))
            log.info("mirror_pop3_deleted", expunged=len(gone))

    def _retrieve_all(self, group: list[tuple[int, str, int]]) -> list[OutMessage]:
        return [self._retrieve(number, uidl, size) for number, uidl, size in group]

    def _retrieve(self, number: int, uidl: str, size: int) -> OutMessage:
        conn = self.conn
        with conn.message_lines(size):  # a line may be as long as the message
            _resp, lines, _octets = conn.retr(number)  # poplib undoes the dot-stuffing
        raw = b"\r\n".join(lines) + b"\r\n"
        return OutMessage(key=uidl, raw=raw, flags=POP3_FLAGS, date=_date_of(raw),
                          fingerprint=message_fingerprint(raw), size=crlf_size(raw))
