"""Keeping both servers busy: read the next batch while the current one is being appended.

Copying one batch at a time leaves the source idle while the store saves and the store idle
while the source reads. A `Prefetcher` runs the reads in a thread of its own, one batch ahead,
and a `ByteBudget` shared by every copy lane of a run bounds the message bytes held in memory
(read but not yet appended), whatever the number of lanes and the size of the messages.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Generic, Protocol, TypeVar

T = TypeVar("T")  # what is read: a batch of OutMessage
K = TypeVar("K")  # what a read is asked for: a group of source UIDs / POP3 numbers

MEMORY_BUDGET = 64 * 1024 * 1024  # bytes of messages read and not yet appended, per run
_POLL = 0.1  # seconds: how often a waiting reader looks whether it was cancelled


class ByteBudget:
    """A counting limit on bytes in memory, served first come, first served (so a big request
    is not starved by smaller ones). A request larger than the whole limit is let through
    when nothing else is held, so one huge message still travels (alone)."""

    def __init__(self, limit: int = MEMORY_BUDGET) -> None:
        self.limit = limit
        self._used = 0
        self._queue: deque[object] = deque()
        self._changed = threading.Condition()

    def acquire(self, nbytes: int, cancelled: threading.Event) -> bool:
        """Wait until nbytes fit; False (nothing taken) if cancelled meanwhile."""
        me = object()
        with self._changed:
            self._queue.append(me)
            try:
                while self._queue[0] is not me or (self._used
                                                   and self._used + nbytes > self.limit):
                    if cancelled.is_set():
                        return False
                    self._changed.wait(_POLL)
                self._used += nbytes
                return True
            finally:
                self._queue.remove(me)
                self._changed.notify_all()

    def release(self, nbytes: int) -> None:
        if nbytes:
            with self._changed:
                self._used -= nbytes
                self._changed.notify_all()


class _End:
    """Marks the end of the reads in the queue."""


class Prefetcher(Generic[K, T]):
    """Iterates over read(group) for each group, reading one group ahead in a thread.

    Use as a context manager: leaving it (normally or by an exception) stops the reader and
    gives back its budget. On an exception, `on_abort` is called first (e.g. shutting the
    source socket) so a reader stuck on a dead connection does not hold up the retry.
    A batch's bytes stay counted until the caller asks for the next one. No deadlock between
    lanes sharing a budget: bytes are only held by batches a consumer is working on or will
    take next, and a consumer waiting for its reader holds none.
    """

    def __init__(self, groups: Iterable[K], read: Callable[[K], T],
                 size_of: Callable[[K], int], budget: ByteBudget,
                 on_abort: Callable[[], None] | None = None) -> None:
        self._groups = groups
        self._read = read
        self._size_of = size_of
        self._budget = budget
        self._on_abort = on_abort
        # One read batch waits while the next is being read: at most three per lane in memory.
        self._queue: queue.Queue[tuple[T, int] | BaseException | _End] = queue.Queue(maxsize=1)
        self._cancelled = threading.Event()
        self._thread = threading.Thread(target=self._reader, name="copy-reader", daemon=True)
        self._held = 0

    def __enter__(self) -> Prefetcher[K, T]:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._cancelled.set()
        if exc is not None and self._on_abort is not None:
            self._on_abort()
        self._thread.join()
        self._budget.release(self._held)
        self._held = 0
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, tuple):
                self._budget.release(item[1])

    def __iter__(self) -> Iterator[T]:
        while True:
            # Asking for the next batch means the caller is done with the previous one: give
            # its bytes back *before* waiting, or a reader waiting for budget would wait for us.
            self._budget.release(self._held)
            self._held = 0
            item = self._queue.get()
            if isinstance(item, _End):
                return
            if isinstance(item, BaseException):
                raise item
            batch, self._held = item
            yield batch

    # --- the reader thread -----------------------------------------------------------------

    def _reader(self) -> None:
        try:
            for group in self._groups:
                nbytes = self._size_of(group)
                if not self._budget.acquire(nbytes, self._cancelled):
                    return
                try:
                    batch = self._read(group)
                except BaseException:
                    self._budget.release(nbytes)
                    raise
                if not self._put((batch, nbytes)):
                    self._budget.release(nbytes)
                    return
            self._put(_End())
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self._put(exc)

    def _put(self, item: tuple[T, int] | BaseException | _End) -> bool:
        while not self._cancelled.is_set():
            try:
                self._queue.put(item, timeout=_POLL)
                return True
            except queue.Full:
                continue
        return False


class Pacing(Protocol):
    """Paces reads from an old server (store/pacing.py's HostPacer for pre-stage passes)."""

    def batch_bytes(self, default: int) -> int: ...

    def read(self, nbytes: int, action: Callable[[], T]) -> T: ...


def paced(pacing: Pacing | None, size: Callable[[K], int],
          read: Callable[[K], T]) -> Callable[[K], T]:
    """`read` of a group, inside a pacing slot of the group's size when pacing."""
    if pacing is None:
        return read
    return lambda group: pacing.read(size(group), lambda: read(group))
