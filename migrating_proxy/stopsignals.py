"""A stop signal (SIGTERM, SIGINT) during `serve`'s start-up, before the reactor handles them.

Python's default for SIGTERM kills the process wherever it is. If that is the moment a
`spawn` child (the hashing processes, the SQLite helper) is being started, the child finds
its start-up data cut short and prints a traceback ("EOFError: Ran out of input") to the
journal. So, while start-up runs, a stop signal raises `StopDuringStartup` at the next safe
point instead: held back while a child is being started (`starting_a_child`), raised at once
anywhere else, so that start-up undoes what it acquired and the command exits 0, as systemd
expects of a stop.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopDuringStartup(BaseException):
    """A stop signal arrived before start-up finished; BaseException so that no
    `except Exception` on the way mistakes it for a failure and carries on."""


_held = 0  # nesting depth of starting_a_child in the main thread
_pending: int | None = None  # a signal that arrived while held


def _on_stop_signal(signum: int, frame: FrameType | None) -> None:
    global _pending
    if _held:
        _pending = signum
        return
    raise StopDuringStartup(signum)


@contextlib.contextmanager
def end_startup_on_stop() -> Iterator[None]:
    """Around start-up: a stop signal raises StopDuringStartup; the previous handlers after."""
    previous = {sig: signal.signal(sig, _on_stop_signal) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def starting_a_child() -> Iterator[None]:
    """Hold a stop back until the child has its start-up data; then raise it, if one came.

    Python runs signal handlers in the main thread only, so other threads (a helper restarted
    by a login thread) pass through untouched.
    """
    global _held, _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _held += 1
    try:
        yield
    finally:
        _held -= 1
        if not _held and _pending is not None:
            signum, _pending = _pending, None
            raise StopDuringStartup(signum)
