"""POP3 continuity: the old server's UIDLs, matched to the store's copies at the switch.

A POP3 client that leaves mail on the server knows its messages by the old server's UIDLs.
Inside the switch's hold, after the final pass (nothing changes either mailbox then: the old
server's sessions are closed and the store's INBOX is written by nobody else), this reads

1. the old server's POP3 listing (LIST and UIDL, with the user's credentials): every message a
   POP3 client could have seen, in its order;
2. which store message is the copy of each: for a POP3 source the copy records are keyed by
   the UIDL itself; for an IMAP source by the source UID, which many servers' UIDL formats
   reveal (Dovecot's default `%08Xu%08Xv`, Cyrus's `uidvalidity.uid`) and is then checked
   against the folder's UIDVALIDITY; the rest are matched the way Dovecot's pop3-migration
   plugin does, by their headers (`TOP n 0`: Message-ID, Date and size, the copy records'
   fingerprint), duplicates in order;
3. the store's own UIDL of each copy (its POP3 UIDL listing, positions mapped to INBOX UIDs).

The result is kept per account (store/pop3uidls.py) and served by the relay (frontends/uidl.py).
An old message that cannot be matched is counted ("unmatched: N" in status, and logged): its
copy keeps the store's UIDL, so the client downloads it once more; nothing is lost.
"""

from __future__ import annotations

import base64
import itertools
import poplib
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog

from migrating_proxy.cacerts import client_context
from migrating_proxy.migration.connections import (
    SourcePOP3,
    SourceSpec,
    StoreSpec,
    TransientError,
    close_quietly,
    connect_source_pop3,
    connect_store_imap,
)
from migrating_proxy.migration.messages import fingerprint
from migrating_proxy.store.copystate import COPIED, CopyState
from migrating_proxy.store.pop3uidls import KeptUidl, Pop3Uidls, unmatched_summary

log = structlog.get_logger(__name__)

POP3_FOLDER = "POP3"  # copy_folders.source_name of a POP3 source (pop3_copy.py)
# UIDL formats that carry the IMAP UID and the folder's UIDVALIDITY: (pattern, group of the UID,
# group of the UIDVALIDITY, base).
_UID_FORMATS = (
    (re.compile(r"([0-9A-Fa-f]{8})([0-9A-Fa-f]{8})"), 1, 2, 16),  # Dovecot %08Xu%08Xv
    (re.compile(r"(\d{1,10})\.(\d{1,10})"), 2, 1, 10),  # Cyrus uidvalidity.uid
)


@dataclass(frozen=True)
class OldMessage:
    position: int  # its message number at the old server
    uidl: str
    size: int


@dataclass(frozen=True)
class Copy:
    key: str  # copy record's source key: the IMAP UID, or the POP3 UIDL
    dest_uid: int  # its UID in the store's INBOX
    fingerprint: str


def uid_in_uidl(uidl: str, uidvalidity: int | None) -> int | None:
    """The IMAP UID a UIDL names, when its format says so and names this UIDVALIDITY."""
    if uidvalidity is None:
        return None
    for pattern, uid_group, validity_group, base in _UID_FORMATS:
        found = pattern.fullmatch(uidl)
        if found and int(found[validity_group], base) == uidvalidity:
            return int(found[uid_group], base)
    return None


def match(old: Sequence[OldMessage], copies: Sequence[Copy], *, by_uidl: bool,
          uidvalidity: int | None,
          fingerprints: Callable[[list[OldMessage]], dict[int, str]]) -> dict[int, int]:
    """Old position -> the store UID of its copy, for every old message that can be matched.

    `fingerprints(messages)`: position -> header fingerprint, asked only for messages neither
    their UIDL (POP3 source) nor their UID (a revealing UIDL format) matched."""
    by_key = {c.key: c for c in copies}
    matched: dict[int, int] = {}
    taken: set[int] = set()
    for message in old:
        key = message.uidl if by_uidl else str(uid_in_uidl(message.uidl, uidvalidity))
        copy = by_key.get(key)
        if copy is not None and copy.dest_uid not in taken:
            matched[message.position] = copy.dest_uid
            taken.add(copy.dest_uid)
    rest = [m for m in old if m.position not in matched]
    if not rest:
        return matched
    pool: dict[str, list[int]] = defaultdict(list)
    for copy in sorted(copies, key=lambda c: c.dest_uid):
        if copy.dest_uid not in taken:
            pool[copy.fingerprint].append(copy.dest_uid)
    found = fingerprints(rest)
    for message in rest:  # duplicates pair up in order, as the copy appended them
        candidates = pool.get(found.get(message.position, ""))
        if candidates:
            matched[message.position] = candidates.pop(0)
    return matched


def old_listing(conn: poplib.POP3) -> list[OldMessage]:
    """Every message at the old server, in its order (LIST and UIDL)."""
    sizes = {}
    for line in conn.list()[1]:
        number, size = line.split()[:2]
        sizes[int(number)] = int(size)
    listing = []
    for line in conn.uidl()[1]:
        number, uidl = line.split()[:2]
        listing.append(OldMessage(int(number), uidl.decode("ascii", "replace"),
                                  sizes[int(number)]))
    return sorted(listing, key=lambda m: m.position)


def header_fingerprints(conn: SourcePOP3, messages: list[OldMessage],
                        known: dict[str, str]) -> dict[int, str]:
    """TOP n 0 of each message, fingerprinted as the copy records are; a server without TOP
    (it is optional, RFC 1939) leaves them unmatched. `known`: UIDL -> fingerprint read
    before (a UIDL names one message for good), completed here."""
    found = {}
    for message in messages:
        if message.uidl not in known:
            try:
                with conn.message_lines(message.size):
                    lines = conn.top(message.position, 0)[1]
            except poplib.error_proto as exc:
                log.info("pop3_top_refused", position=message.position, reason=str(exc)[:200])
                continue
            known[message.uidl] = fingerprint(b"\r\n".join(lines) + b"\r\n", message.size)
        found[message.position] = known[message.uidl]
    return found


def connect_store_pop3(store: StoreSpec, timeout: float) -> poplib.POP3:
    """The store's POP3 service as store.address (AUTH PLAIN with an authzid for a master)."""
    context = client_context(store.verify_tls, None)
    try:
        if store.tls == "implicit":
            conn: poplib.POP3 = poplib.POP3_SSL(store.host, store.port, timeout=timeout,
                                                context=context)
        else:
            conn = poplib.POP3(store.host, store.port, timeout=timeout)
            if store.tls == "starttls":
                conn.stls(context)
        if store.master_user:
            token = f"{store.address}\0{store.master_user}\0{store.master_password or ''}"
            conn._shortcmd("AUTH PLAIN " + base64.b64encode(token.encode()).decode())
        else:
            conn.user(store.address)
            conn.pass_(store.user_password or "")
    except (OSError, poplib.error_proto) as exc:
        raise TransientError(f"store POP3 login failed for {store.address}: "
                             f"{type(exc).__name__}") from None
    return conn


@dataclass
class Pop3Continuity:
    """Reads, matches and keeps one account's old UIDLs (see the module docstring)."""

    state: CopyState
    pop3_source: SourceSpec
    store_imap: StoreSpec
    store_pop3: StoreSpec
    timeout: float
    # UIDL -> header fingerprint, read by `prepare` before the hold: the hold then reads the
    # headers of messages that arrived since, not of a whole mailbox whose UIDLs reveal no UID.
    fingerprints: dict[str, str] = field(default_factory=dict)

    def prepare(self) -> None:
        """Match once before the hold, keeping what was read; failures wait for `keep`."""
        try:
            self._match()
        except Exception as exc:  # the old server's POP3 service: `keep` tries again
            log.info("pop3_uidls_prepare_failed", error=type(exc).__name__)

    def keep(self) -> str:
        """Keep the UIDLs; the status summary (`kept` or `unmatched: N`)."""
        old, matched = self._match()
        store_uidls = self._store_uidls()
        entries = [KeptUidl(m.position, m.uidl, m.size, store_uidls.get(matched.get(m.position)))
                   for m in old]
        unmatched = [e.uidl for e in entries if e.store_uidl is None]
        summary = unmatched_summary(len(unmatched))
        Pop3Uidls(self.state.engine).keep(self.state.account_id, entries, summary)
        _log_kept(entries, matched, unmatched)
        return summary

    def _match(self) -> tuple[list[OldMessage], dict[int, int]]:
        """The old listing, and old position -> store UID of each matched copy."""
        folder = next((f for f in self.state.folders()
                       if f.source_name in ("INBOX", POP3_FOLDER)), None)
        copies = [Copy(r.source_key, r.dest_uid, r.fingerprint)
                  for r in (self.state.records(folder.id, COPIED) if folder else [])
                  if r.dest_uid is not None]
        source = connect_source_pop3(self.pop3_source, self.timeout)
        try:
            old = old_listing(source)
            return old, match(
                old, copies, by_uidl=folder is not None and folder.source_name == POP3_FOLDER,
                uidvalidity=folder.uidvalidity if folder else None,
                fingerprints=lambda rest: header_fingerprints(source, rest, self.fingerprints))
        finally:
            close_quietly(source)

    def _store_uidls(self) -> dict[int | None, str]:
        """INBOX UID -> the store's POP3 UIDL (its n-th message is the n-th UID)."""
        imap = connect_store_imap(self.store_imap, self.timeout)
        try:
            imap.select_folder("INBOX", readonly=True)
            uids = sorted(imap.search("ALL"))
        finally:
            close_quietly(imap)
        pop3 = connect_store_pop3(self.store_pop3, self.timeout)
        try:
            listing = old_listing(pop3)
        finally:
            close_quietly(pop3)
        if len(listing) != len(uids):  # someone wrote to the INBOX meanwhile: try again
            raise TransientError("the store's INBOX changed while its UIDLs were read")
        return {uid: m.uidl for uid, m in zip(uids, listing, strict=True)}


def _log_kept(entries: list[KeptUidl], matched: dict[int, int], unmatched: list[str]) -> None:
    # The store's order follows the old one when the matched copies' UIDs rise with position.
    dest = [matched[e.position] for e in entries if e.position in matched]
    in_order = all(a < b for a, b in itertools.pairwise(dest))
    if unmatched:
        log.warning("pop3_uidls_unmatched", count=len(unmatched), uidls=unmatched[:20])
    log.info("pop3_uidls_kept", messages=len(entries), matched=len(matched),
             unmatched=len(unmatched), same_order=in_order)
