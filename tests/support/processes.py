"""Process trees: what a command leaves behind after it exits.

`python -m tests.support.processes LOG TIMEOUT -- COMMAND...` runs COMMAND as the child of a
*subreaper* (Linux PR_SET_CHILD_SUBREAPER): every process COMMAND starts that outlives its own
parent is handed to this wrapper instead of to init, so nothing can slip away unseen, whatever
sessions or process groups it makes. COMMAND's output goes to LOG. The wrapper prints `pid N`
(COMMAND's pid, for the test to signal), then, once COMMAND has exited (or been killed after TIMEOUT
seconds: status null) and its descendants had GRACE seconds to follow, one JSON line:
COMMAND's exit status and the command lines of the descendants still alive, which it then
kills so that a failing test leaves nothing behind.

`run_tree()` drives it from a test.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

GRACE = 15.0  # seconds the descendants get to exit after the command itself has
PR_SET_CHILD_SUBREAPER = 36


def descendants(pid: int) -> list[int]:
    """Children, grandchildren... of pid, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":  # a zombie has exited; only its parent's wait() is missing
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def command_line(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return f"(pid {pid} gone)"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def become_subreaper() -> None:
    """Orphans among our descendants become our children (not init's), so we can find them."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def reap_orphans() -> None:
    """Collect the exit status of orphans handed to us, so they don't linger as zombies."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def wait_for_descendants(grace: float) -> list[int]:
    """Give our descendants up to `grace` seconds to exit; the ones still alive."""
    deadline = time.monotonic() + grace
    while (left := descendants(os.getpid())) and time.monotonic() < deadline:
        reap_orphans()
        time.sleep(0.05)
    return left


def kill_descendants() -> None:
    """SIGKILL every descendant, including those orphaned by the killing itself."""
    for _ in range(5):
        if not (left := descendants(os.getpid())):
            return
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
        reap_orphans()


def _wrapper(log: Path, timeout: float, command: list[str]) -> int:
    become_subreaper()
    with log.open("ab") as out:
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    print(f"pid {child.pid}", flush=True)
    status: int | None
    try:
        status = child.wait(timeout)
    except subprocess.TimeoutExpired:
        status = None
        child.kill()
        child.wait()
    left = wait_for_descendants(GRACE)
    print(json.dumps({"status": status, "left": [command_line(pid) for pid in left]}),
          flush=True)
    kill_descendants()
    return 0


@dataclass
class TreeResult:
    status: int | None  # exit status (negative: killed by that signal; None: hung, killed)
    left: list[str]  # command lines of descendants still alive GRACE s after it exited
    output: str  # what the command wrote to stdout and stderr


def run_tree(command: list[str], log: Path, *, after_start: Callable[[int], None] | None = None,
             timeout: float = 120.0) -> TreeResult:
    """Run command under the subreaper; after_start(pid) may signal it. Waits for the end."""
    wrapper = subprocess.Popen(
        [sys.executable, "-m", "tests.support.processes", str(log), str(timeout), "--",
         *command],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2],
    )
    assert wrapper.stdout is not None
    try:
        first = wrapper.stdout.readline()
        pid = int(first.removeprefix("pid "))
        if after_start is not None:
            after_start(pid)
        rest, _ = wrapper.communicate(timeout=timeout + GRACE + 30)
    except BaseException:
        wrapper.kill()  # the command goes on its own: the wrapper's children are its problem
        wrapper.wait()
        raise
    report = json.loads(rest.strip().splitlines()[-1])
    return TreeResult(report["status"], report["left"], log.read_text(errors="replace"))


if __name__ == "__main__":
    separator = sys.argv.index("--")
    sys.exit(_wrapper(Path(sys.argv[1]), float(sys.argv[2]), sys.argv[separator + 1:]))
