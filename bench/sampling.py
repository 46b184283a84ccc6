"""What the benches measure of a running `serve`: its CPU time (/proc) and py-spy samples.

py-spy is the `bench` extra: `.venv/bin/pip install -e '.[bench]'`.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Where an idle reactor or thread waits: not CPU, whatever py-spy's heuristics say.
IDLE = ("Condition.wait", "select (", "doPoll", "untilConcludes", "Queue.get")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def dovecot_master_pid(store: Any) -> int:
    """The master process of a tests.support.dovecot instance: its tree is all of Dovecot."""
    return int((store.base_dir / "master.pid").read_text().split()[0])


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process and everything below it: its own, its reaped children's (a
    Dovecot login process that served one connection), and its live descendants'."""
    from tests.support.processes import descendants

    total = 0.0
    for member in (pid, *descendants(pid)):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile: its parent counts it once reaped
        total += sum(int(field) for field in fields[11:15])
    return total / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def profiler(pid: int, out: Path | None, *flags: str) -> Iterator[None]:
    """py-spy samples (collapsed stacks, `flags` added) of process pid while the block runs."""
    if out is None:
        yield
        return
    spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", *flags,
                            "-f", "raw", "-o", str(out), "-p", str(pid)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # py-spy attaches
    try:
        yield
    finally:
        time.sleep(0.5)
        spy.send_signal(2)
        spy.wait(timeout=30)


def reactor_costs(profile: Path, top: int = 15) -> list[str]:
    """Where serve's reactor thread spent its CPU (samples taken with `--threads`): each
    function counted for every sample it was on the stack of (inclusive), idle waits left
    out."""
    inclusive: Counter[str] = Counter()
    total = 0
    for line in profile.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        frames = [f for f in stack.split(";") if f]
        if len(frames) < 2 or not frames[0].endswith("MainThread") \
                or any(idle in frames[-1] for idle in IDLE):
            continue
        total += int(samples)
        for name in {f.split(" (")[0] + " (" + f.rsplit("/", 1)[-1] for f in frames[1:]}:
            inclusive[name] += int(samples)
    return [f"  {100 * n / max(total, 1):5.1f} %  {name}" for name, n in inclusive.most_common(top)]
