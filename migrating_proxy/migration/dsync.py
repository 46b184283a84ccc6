"""The dsync engine: the store's own `doveadm backup -R imapc:` copies the old mailbox.

Why a second engine: IMAP APPEND cannot choose UIDs, so after the imap engine's copy every
IMAP client meets a new UIDVALIDITY and downloads everything again. Dovecot's dsync, pulling
from the old server over imapc (and pop3c with the pop3_migration plugin), keeps UIDVALIDITY,
every UID, flags, INTERNALDATE, bytes and POP3 UIDLs (measured on Dovecot 2.3.19; the
README's "UID-exact copies" says what an operator needs to know).

The rules this module enforces:

- **Untouched before the first pass.** dsync over imapc matches messages by UID only; a store
  mailbox that already holds mail (a notice, a delivery) either makes `backup` fail for good
  (exit 65, "INBOX can't be deleted") or loses the old server's message that gets the same UID.
  So before the first pass: any message anywhere in the store mailbox means the account falls
  back to the imap engine (nothing deleted, the reason recorded); an empty INBOX that was
  merely opened (it got a UIDVALIDITY of its own) is repaired with `mailbox update
  --uid-validity <old server's> --mailbox-guid <imapc's>`. The engine is recorded as "dsync"
  *before* the first backup starts: a failed first pass leaves dsync's own partial copy, which
  the next `backup` completes; it must never be taken for a touched mailbox.
- **Every pass is `backup -R`.** Stateless `sync -1` misses flag changes and can bring back
  expunged mail; `backup` makes the store exactly the old server's state, every time. That is
  also why nothing else may write to the store mailbox until the final pass (passthrough mode).
- **Failure is never success.** An exit code, a dropped HTTP connection or a timeout ends the
  pass in "error" with the reason doveadm gave (read back from the store's log for the HTTP
  API), never "completed".
- **No clear password between passes.** The credentials exist on the store only inside a
  pass (provision/dsync_credentials.py).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import structlog
from sqlalchemy import Engine

from migrating_proxy.config import Config
from migrating_proxy.migration.connections import (
    SourceAuthError,
    SourceSpec,
    SourceUnavailable,
    close_quietly,
    connect_source_imap,
    scrub,
)
from migrating_proxy.migration.doveadm import (
    Doveadm,
    DoveadmFailed,
    backup_from_old_server,
    from_settings,
    mailbox_status,
    mailbox_update,
)
from migrating_proxy.migration.progress import CopyProgress, CopyResult
from migrating_proxy.provision.dsync_credentials import (
    DsyncCredentials,
    UnwritableCredential,
    userdb_fields,
)
from migrating_proxy.store.copystate import CopyState

log = structlog.get_logger(__name__)

DSYNC, IMAP = "dsync", "imap"
ENGINES = (IMAP, DSYNC)


def imapc_mailbox_guid(name: str) -> str:
    """The GUID imapc gives a remote mailbox: the last 16 bytes of SHA-1 of its name.

    dsync compares mailbox GUIDs; a store INBOX repaired to this GUID (and the old server's
    UIDVALIDITY) is the same mailbox to dsync as the old server's INBOX.
    """
    return hashlib.sha1(name.encode()).hexdigest()[8:]


@dataclass(frozen=True)
class Fallback:
    """The dsync engine cannot serve this account; the imap engine copies it instead."""

    reason: str


@dataclass
class DsyncEngine:
    doveadm: Doveadm
    credentials: DsyncCredentials
    source_timeout: float = 20.0

    def run_pass(self, db: Engine, account_id: int, address: str, imap: SourceSpec,
                 pop3: SourceSpec | None = None, *,
                 deadline: float | None = None) -> CopyResult | Fallback:
        """One `backup -R` pass for the account: the first one or an incremental one.

        Returns a Fallback (already recorded: the account's engine is "imap" from now on)
        when dsync must not copy this account; otherwise the pass's CopyResult, "completed"
        or "error" with a readable reason. `deadline` (time.monotonic()): the backup may not
        run past it (the switch's final pass), and ends in "error" if it would.
        """
        state = CopyState(db, account_id)
        log_ = log.bind(account_id=account_id, store_address=address, engine=DSYNC)
        if state.copy_engine() == IMAP:
            return Fallback("the account already fell back to the imap engine")
        unusable = _unsupported(address, imap, pop3)
        if unusable is None and state.copy_engine() is None:
            unusable = self._prepare_first_pass(address, imap)
        if isinstance(unusable, CopyResult):  # could not even find out: an error, recorded
            log_.warning("dsync pass failed", error=unusable.error)
            state.write_progress(error=unusable.error)
            return unusable
        if unusable is not None:
            return self._fall_back(state, log_, unusable)
        if state.copy_engine() is None:
            state.write_progress(copy_engine=DSYNC)  # from now on the store copy is dsync's
        log_.info("dsync pass starting")
        secrets = tuple(s.password for s in (imap, pop3) if s is not None)
        try:
            # A quick call first: a store that does not answer (a wrong API key gets no
            # answer at all) fails within the short timeout, not the pass's.
            before = self._folders(address)
            with self.credentials.present(address, imap, pop3):
                self.doveadm.run(backup_from_old_server(address), _time_left(deadline))
            after = self._folders(address)
        except DoveadmFailed as exc:
            reason = scrub(str(exc), *secrets)
            log_.warning("dsync pass failed", error=reason, exit_code=exc.exit_code)
            state.write_progress(error=reason)
            # imapc/pop3c's login refused: the worker treats it as a wrong old password.
            kind = "auth" if "[AUTHENTICATIONFAILED]" in reason else "store"
            return CopyResult("error", CopyProgress(), reason, error_kind=kind)
        progress = _progress(after)
        changes = _changes(before, after)
        state.write_progress(finished=True, **vars(progress))
        log_.info("dsync pass finished", messages=progress.messages_total,
                  folders=progress.folders_total, changes=changes)
        return CopyResult("completed", progress, changes=changes)

    def _prepare_first_pass(self, address: str, imap: SourceSpec) -> str | CopyResult | None:
        """Make sure the store mailbox is untouched: None if ready, else why not (a
        Fallback reason) or the CopyResult of a failure to find out."""
        try:
            mailboxes = self.doveadm.run(mailbox_status(address, ["messages", "uidvalidity"]))
            holding = {row["mailbox"]: int(row.get("messages") or 0) for row in mailboxes}
            if any(holding.values()):
                names = ", ".join(f"{n} ({c})" for n, c in holding.items() if c)
                return (f"the store mailbox is not untouched (messages in {names}); dsync "
                        f"could lose mail there, so the imap engine copies this account")
            uid_validity = self._old_inbox_uid_validity(imap)
            self.doveadm.run(mailbox_update(address, "INBOX", uid_validity,
                                            imapc_mailbox_guid("INBOX")))
        except DoveadmFailed as exc:
            return CopyResult("error", CopyProgress(), str(exc), error_kind="store")
        except SourceAuthError as exc:
            return CopyResult("error", CopyProgress(), scrub(str(exc), imap.password),
                              error_kind="auth")
        except SourceUnavailable as exc:
            return CopyResult("error", CopyProgress(), scrub(str(exc), imap.password),
                              error_kind="unavailable")
        return None

    def _old_inbox_uid_validity(self, imap: SourceSpec) -> int:
        client = connect_source_imap(imap, self.source_timeout)
        try:
            status = client.folder_status("INBOX", [b"UIDVALIDITY"])
            return int(status[b"UIDVALIDITY"])
        finally:
            close_quietly(client)

    def _folders(self, address: str) -> dict[str, dict[str, int]]:
        """Every store folder's counters (messages, vsize, highestmodseq, uidnext)."""
        rows = self.doveadm.run(mailbox_status(address, FOLDER_FIELDS))
        return {row["mailbox"]: {f: int(row.get(f) or 0) for f in FOLDER_FIELDS}
                for row in rows}

    def _fall_back(self, state: CopyState, log_: structlog.BoundLogger, reason: str) -> Fallback:
        log_.warning("dsync_fallback_to_imap", reason=reason)
        state.write_progress(copy_engine=IMAP, engine_note=reason)
        return Fallback(reason)


FOLDER_FIELDS = ("messages", "vsize", "highestmodseq", "uidnext")


def _progress(folders: dict[str, dict[str, int]]) -> CopyProgress:
    """What the store mailbox holds after a pass, for the admin's counters."""
    messages = sum(f["messages"] for f in folders.values())
    size = sum(f["vsize"] for f in folders.values())
    return CopyProgress(folders_total=len(folders), folders_done=len(folders),
                        messages_total=messages, messages_copied=messages, bytes_copied=size)


def _changes(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> int:
    """About how many changes a pass made (dsync does not say): every flag change, expunge and
    new message raises a folder's HIGHESTMODSEQ by one or more; a folder made or removed
    counts once. 0 means the store was already in step (the switch's catch-up loop ends)."""
    changed = len(before.keys() ^ after.keys())
    for name in before.keys() & after.keys():
        changed += abs(after[name]["highestmodseq"] - before[name]["highestmodseq"])
        changed += after[name]["uidnext"] != before[name]["uidnext"] and \
            after[name]["highestmodseq"] == before[name]["highestmodseq"]
    return changed


def _time_left(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    return max(0.1, deadline - time.monotonic())


def engine_for(config: Config) -> DsyncEngine | str:
    """The dsync engine the configuration describes, or why there is none."""
    directory = config.migration.dsync_credentials
    if directory is None:
        return "migration.dsync_credentials is not set: the dsync engine cannot run"
    backend = config.backend
    try:
        doveadm = from_settings(backend.doveadm_url, backend.doveadm_api_key_file,
                                backend.doveadm_command, timeout=backend.timeout,
                                pass_timeout=config.migration.dsync_timeout)
    except DoveadmFailed as exc:
        return str(exc)
    credentials = DsyncCredentials(directory)
    # A process killed inside a pass leaves its entry behind: no clear password may outlive
    # the longest pass.
    credentials.sweep(older_than=config.migration.dsync_timeout + 60)
    return DsyncEngine(doveadm, credentials, config.migration.source_timeout)


def _unsupported(address: str, imap: SourceSpec, pop3: SourceSpec | None) -> str | None:
    """Why dsync cannot copy from this old server at all, or None."""
    try:
        DsyncCredentials.line(address, userdb_fields(imap, pop3))
    except UnwritableCredential as exc:
        return str(exc)
    if imap.protocol != "imap":
        return "dsync needs the old server's IMAP service; this domain's source is POP3 only"
    if imap.ca_pem or (pop3 is not None and pop3.ca_pem):
        return ("the old server's certificate comes from a private CA (--source-ca), which the "
                "store's doveadm does not know")
    return None
