"""A stop signal (SIGTERM, SIGINT) that arrives while a `spawn` child is being started.

Until its reactor runs, `serve` keeps Python's default for SIGTERM: the process ends at once,
whatever it was doing, and its children follow it (lifeline.py). That is the cleanest stop
there is, except in one window: a `spawn` child (the hashing processes, the SQLite helper)
that exists but has not yet been sent its start-up data then dies with "EOFError: Ran out of
input" and a traceback in the journal. `starting_a_child` holds a stop back for that window
only and delivers it, to whatever handler was in place, as soon as the child has its data.

(Raising an exception from the handler instead, to unwind start-up, was tried: it can land
inside concurrent.futures' or multiprocessing's own bookkeeping and leave them to fail at exit.)
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def starting_a_child() -> Iterator[None]:
    """Hold SIGTERM and SIGINT back while the block runs; then deliver the first that came.

    Python runs signal handlers in the main thread only, and only it may change them: other
    threads (a helper restarted by a login thread) pass through untouched.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        arrived.append(signum)

    previous = {sig: signal.signal(sig, hold) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if arrived:
            signal.raise_signal(arrived[0])  # as if it came now: default, or the reactor's
