"""The copy engine: copies a user's old mailbox (IMAP or POP3) to the new store.

Plain blocking Python (imapclient, poplib), no Twisted: workers call `run_copy` in their own
processes. State lives in the database (store/copystate.py), so a run can be killed at any
moment and started again: every message ends up on the store exactly once.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog
from sqlalchemy import Engine

from migrating_proxy.migration.connections import (
    DestinationError,
    SourceAuthError,
    SourceSpec,
    SourceUnavailable,
    StoreSpec,
    check_source_login,
    scrub,
)
from migrating_proxy.migration.destination import StoreWriter
from migrating_proxy.migration.imap_copy import FoldersFailed, ImapCopier, Stopped
from migrating_proxy.migration.pipeline import Pacing
from migrating_proxy.migration.pop3_copy import Pop3Copier
from migrating_proxy.migration.progress import CopyProgress, CopyResult, Reporter
from migrating_proxy.store.copystate import CopyState

__all__ = [
    "CopyProgress",
    "CopyResult",
    "DestinationError",
    "SourceAuthError",
    "SourceSpec",
    "SourceUnavailable",
    "StoreSpec",
    "check_source_login",
    "run_copy",
]

log = structlog.get_logger(__name__)

DEFAULT_TIMEOUT = 60.0  # seconds, for every network operation (connect, each read and write)
# Folders copied at once (IMAP): each needs a connection to the source and one to the store.
# Four keeps both servers busy without looking like abuse to a provider's connection limits.
DEFAULT_PARALLEL_FOLDERS = 4


def run_copy(
    engine: Engine,
    account_id: int,
    source: SourceSpec,
    store: StoreSpec,
    *,
    on_progress: Callable[[CopyProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    parallel_folders: int = DEFAULT_PARALLEL_FOLDERS,
    mirror: bool = False,
    pacing: Pacing | None = None,
) -> CopyResult:
    """Copy (or continue copying) account_id's old mailbox to the store.

    Never raises for mail-server trouble: the result says "completed" (possibly with skipped
    messages the store refused), "stopped" (should_stop() returned true at a batch boundary;
    run again to continue) or "error" with `error_kind` auth | unavailable | store | folders |
    internal ("folders": the folders named in `error` were refused, every other one copied).
    The account's `migrations` row is kept up to date throughout.

    An IMAP source is copied up to `parallel_folders` folders at a time, each over its own
    source and store connection: that is also the most connections opened to either server.
    on_progress and should_stop may be called from the copy's worker threads.

    `mirror`: the old server is the truth (an account it still serves, which nothing else
    writes to on the store): expunges, flag changes and folder renames and deletions there are
    applied too (mirror.py). Otherwise a pass only adds what is new. `CopyResult.changes` says
    how much the run changed on the store.

    `pacing`: every read of messages from the source waits for its slot (pre-stage passes,
    `migration.prestage_rate`; store/pacing.py).
    """
    state = CopyState(engine, account_id)
    reporter = Reporter(state, on_progress)
    writer = StoreWriter(store, state, reporter, timeout, pop3=source.protocol == "pop3")
    stop = should_stop or (lambda: False)
    copier: ImapCopier | Pop3Copier
    if source.protocol == "pop3":
        copier = Pop3Copier(state, source, writer, reporter, stop, timeout, mirror=mirror,
                            pacing=pacing)
    else:
        copier = ImapCopier(state, source, writer, reporter, stop, timeout,
                            parallel_folders=parallel_folders, mirror=mirror, pacing=pacing)
    log_ = log.bind(account_id=account_id, source=f"{source.protocol}://{source.host}:{source.port}",
                    store_address=store.address)
    log_.info("copy_started")
    result = _run(copier.run, reporter, (*source.secrets, store.master_password,
                                         store.user_password))
    copier.close()
    result.skipped = state.skipped()
    result.changes = reporter.changes
    reporter.flush(force=True, finished=result.state == "completed", error=result.error)
    log_.info("copy_finished", state=result.state, error=result.error, mirror=mirror,
              changes=result.changes, copied=result.progress.messages_copied,
              skipped=result.progress.messages_skipped)
    return result


def _run(action: Callable[[], None], reporter: Reporter,
         secrets: tuple[str | None, ...]) -> CopyResult:
    """Run the copy and turn its outcome into a CopyResult (messages scrubbed of secrets)."""
    progress = reporter.progress
    try:
        action()
    except Stopped:
        return CopyResult("stopped", progress)
    except SourceAuthError as exc:
        return CopyResult("error", progress, scrub(str(exc), *secrets), error_kind="auth")
    except SourceUnavailable as exc:
        return CopyResult("error", progress, scrub(str(exc), *secrets), error_kind="unavailable")
    except DestinationError as exc:
        return CopyResult("error", progress, scrub(str(exc), *secrets), error_kind="store")
    except FoldersFailed as exc:  # everything else was copied
        return CopyResult("error", progress, scrub(str(exc), *secrets), error_kind="folders")
    except Exception as exc:
        # After retries: a source that keeps failing mid-copy counts as unavailable.
        text = scrub(f"{type(exc).__name__}: {exc}", *secrets)
        log.exception("copy_failed", error=text)
        return CopyResult("error", progress, text, error_kind="internal")
    return CopyResult("completed", progress)
