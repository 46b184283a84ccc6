"""The live progress display of `migrate --wait`, `resync --wait`, `finish` and `status --watch`.

Only ever drawn on a terminal: redrawn in place with ANSI cursor movements. Rates and the ETA
are measured from the first sample this display saw, so a resync of mostly copied mailboxes
does not claim the whole history as its speed.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from migrating_proxy.store.states import JobState

BAR_WIDTH = 20
BUSY = (JobState.RUNNING, JobState.QUEUED)  # job states of a pass that is still going
MAX_USER_LINES = 20  # busiest first; the rest summed up in one line


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(count) < 1024 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def bar(done: int, total: int) -> str:
    filled = BAR_WIDTH * done // total if total else 0
    percent = f"{100 * done // total:3d}%" if total else "  -%"
    return f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {percent}"


def user_line(row: dict[str, Any]) -> str:
    done = row["messages_copied"] + row["messages_skipped"]
    activity = row["job_state"] or row["state"]
    return (f"{bar(done, row['messages_total'])} {row['address']}  "
            f"{done}/{row['messages_total']} msgs  {human_bytes(row['bytes_copied'])}  "
            f"{activity}")


@dataclass
class ProgressDisplay:
    stream: TextIO
    clock: Any = time.monotonic
    _drawn: int = 0
    _start: tuple[float, int, int] | None = None  # (time, messages, bytes) at the first sample
    _rows: list[dict[str, Any]] = field(default_factory=list)

    def update(self, rows: list[dict[str, Any]]) -> None:
        lines = self.render(rows)
        out = [f"\x1b[{self._drawn}F"] if self._drawn else []
        out.extend(f"\x1b[2K{line}\n" for line in lines)
        if len(lines) < self._drawn:  # clear what a longer previous frame left below
            out.append("\x1b[J")
        self.stream.write("".join(out))
        self.stream.flush()
        self._drawn = len(lines)

    def render(self, rows: list[dict[str, Any]]) -> list[str]:
        busy_first = sorted(rows, key=lambda r: (r["job_state"] not in BUSY,
                                                 r["address"]))
        lines = [user_line(row) for row in busy_first[:MAX_USER_LINES]]
        if len(rows) > MAX_USER_LINES:
            lines.append(f"... and {len(rows) - MAX_USER_LINES} more accounts")
        lines.append(self.total_line(rows))
        return lines

    def total_line(self, rows: list[dict[str, Any]]) -> str:
        done = sum(r["messages_copied"] + r["messages_skipped"] for r in rows)
        total = sum(r["messages_total"] for r in rows)
        copied_bytes = sum(r["bytes_copied"] for r in rows)
        now = self.clock()
        if self._start is None:
            self._start = (now, done, copied_bytes)
        elapsed = max(now - self._start[0], 1e-6)
        message_rate = (done - self._start[1]) / elapsed
        byte_rate = (copied_bytes - self._start[2]) / elapsed
        eta = duration((total - done) / message_rate) if message_rate > 0 and total > done \
            else "-"
        settled = sum(r["job_state"] not in BUSY for r in rows)
        return (f"{bar(done, total)} total  {done}/{total} msgs  {human_bytes(copied_bytes)}  "
                f"{human_bytes(byte_rate)}/s  {message_rate:.0f} msgs/s  ETA {eta}  "
                f"({settled}/{len(rows)} accounts settled)")


def watch(fetch: Callable[[], list[dict[str, Any]]],
          show: Callable[[list[dict[str, Any]]], None], interval: float = 2.0) -> None:
    """Redraw a view every `interval` seconds until Ctrl-C (terminal only).

    Ctrl-C only sets a flag, checked between redraws: a KeyboardInterrupt raised in the middle
    of a database read can leave the connection pool's lock taken, and the command then hung
    for ever in its clean-up instead of exiting.
    """
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        while not stop.is_set():
            rows = fetch()
            if stop.is_set():
                break
            sys.stdout.write("\x1b[H\x1b[2J")  # home, clear screen
            show(rows)
            sys.stdout.flush()
            stop.wait(interval)
    finally:
        signal.signal(signal.SIGINT, previous)
    sys.stdout.write("\n")
