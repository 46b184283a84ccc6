"""Child processes never outlive their parent.

`serve` starts hashing processes and a worker pool, and the pool starts copy workers. When a
parent dies without stopping its children (SIGKILL, a crash, the OOM killer), they must not run
on as orphans: hashing processes would idle forever, workers would copy with nobody watching.
A child calls `follow(parent_pid)` first thing; two mechanisms then end it with SIGTERM (so a
copy worker still hands its job back at the next batch boundary, as on a normal stop):

- `prctl(PR_SET_PDEATHSIG)`: the kernel signals the child the moment its parent dies. It
  watches the parent *thread* that started the child, so children are started from threads that
  live as long as their process (the main thread, or eagerly at start-up).
- a watcher thread that checks the parent pid every second: covers a parent that died before
  prctl ran, and systems without prctl.

Processes started with `subprocess` learn their parent from the environment (`PARENT_ENV`),
so that `migrating-proxy worker` started by hand or by systemd keeps running on its own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import threading
import time

PARENT_ENV = "MIGRATING_PROXY_PARENT_PID"
PR_SET_PDEATHSIG = 1
CHECK_SECONDS = 1.0


def follow(parent_pid: int, kernel_signal: bool = True) -> None:
    """End this process with SIGTERM as soon as `parent_pid` is no longer its parent.

    `kernel_signal=False` for a child that any thread of the parent may start: the watcher
    thread alone then ends it, within a second."""
    if kernel_signal:
        _set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect: nothing to
        os._exit(1)  # hand back yet
    threading.Thread(target=_watch, args=(parent_pid,), name="lifeline", daemon=True).start()


def follow_from_environment() -> None:
    """`follow` the parent named in the environment, if any (see `child_environment`)."""
    value = os.environ.pop(PARENT_ENV, "")
    if value.isdigit():
        follow(int(value))


def child_environment() -> dict[str, str]:
    """The environment for a child process started with `subprocess` that must follow us."""
    return {**os.environ, PARENT_ENV: str(os.getpid())}


def _set_parent_death_signal(signum: int) -> None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the watcher thread alone
        pass


def _watch(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(CHECK_SECONDS)
    os.kill(os.getpid(), signal.SIGTERM)  # a normal stop, as if the parent had asked
    time.sleep(60)  # still here: a stop that hangs must not keep an orphan alive
    os._exit(1)
