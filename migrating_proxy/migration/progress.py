"""Progress counters and the result of a copy run, and how they reach the database."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

from migrating_proxy.store.copystate import CopyState

PROGRESS_INTERVAL = 1.0  # seconds: the `migrations` row is written at most this often


@dataclass
class CopyProgress:
    folders_total: int = 0
    folders_done: int = 0
    messages_total: int = 0
    messages_copied: int = 0
    messages_skipped: int = 0
    bytes_copied: int = 0


@dataclass
class CopyResult:
    state: Literal["completed", "stopped", "error"]
    progress: CopyProgress
    error: str | None = None
    # (source folder, source UID or POP3 UIDL, the store's reason) per refused message.
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    # Why it failed: "auth" (wrong source password), "unavailable" (source down/timeout),
    # "store" (the new store failed), "folders" (some folders refused, the rest copied),
    # "internal". None unless state == "error".
    error_kind: Literal["auth", "unavailable", "store", "folders", "internal"] | None = None
    # What this run changed on the store: messages copied, plus (mirror passes) messages
    # expunged, flag changes applied and folders renamed or deleted. 0: already in step.
    changes: int = 0


class Reporter:
    """Keeps the counters, writes them to `migrations` at most once a second, calls back.

    Thread-safe: the copy lanes of a run report through one Reporter.
    """

    def __init__(self, state: CopyState,
                 on_progress: Callable[[CopyProgress], None] | None = None) -> None:
        self.state = state
        self.on_progress = on_progress
        totals = state.totals()  # earlier runs count: the admin sees the whole migration
        self.progress = CopyProgress(messages_copied=totals.copied,
                                     messages_skipped=totals.skipped,
                                     bytes_copied=totals.bytes_copied)
        self.changes = 0  # this run's, see CopyResult.changes
        self._last_write = 0.0
        self._lock = threading.RLock()

    def copied(self, count: int, nbytes: int) -> None:
        with self._lock:
            self.progress.messages_copied += count
            self.progress.bytes_copied += nbytes
            self.changes += count
            self.flush()

    def mirrored(self, count: int) -> None:
        """Changes made at the old server applied to the store (expunges, flags, folders)."""
        with self._lock:
            self.changes += count

    def skipped(self, count: int) -> None:
        with self._lock:
            self.progress.messages_skipped += count
            self.flush()

    def folder_done(self) -> None:
        with self._lock:
            self.progress.folders_done += 1
            self.flush()

    def flush(self, force: bool = False, *, finished: bool = False,
              error: str | None = None) -> None:
        with self._lock:
            now = time.monotonic()
            if not force and now - self._last_write < PROGRESS_INTERVAL:
                return
            self._last_write = now
            self._write(finished, error)

    def _write(self, finished: bool, error: str | None) -> None:
        p = self.progress
        self.state.write_progress(
            finished=finished, error=error,
            folders_total=p.folders_total, folders_done=p.folders_done,
            messages_total=p.messages_total, messages_copied=p.messages_copied,
            messages_skipped=p.messages_skipped, bytes_copied=p.bytes_copied,
        )
        if self.on_progress is not None:
            self.on_progress(replace(p))
