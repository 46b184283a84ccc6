"""A stop signal at any moment of start-up stops everything: `worker`, `serve` and the demo.

SIGTERM is what systemd sends to stop a unit (and what `serve` sends its worker pool); the
worker pool used to lose one that arrived while it was starting its children, then waited
forever for children it had never signalled. Each test sends SIGTERM at a series of moments
from the very start to well after start-up, under a subreaper (tests/support/processes.py),
and requires the command to exit and every process it started to be gone. The bounds are
generous "it stopped" limits, not performance assertions.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support.processes import TreeResult, run_tree
from tests.support.proxy import render_toml

# Each test starts its command a dozen times; on a machine busy with other test runs that
# takes minutes. A bound on "it finished", not on speed.
pytestmark = pytest.mark.timeout(600)

REPO = Path(__file__).resolve().parents[1]
# A stop that took effect at some point: a clean exit, or death by SIGTERM itself when the
# signal came before Python had even set up its handlers (systemd counts that as clean too).
STOPPED = (0, -signal.SIGTERM)


def write_config(directory: Path, workers: int = 2) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "migrating-proxy.toml"
    path.write_text(render_toml({
        "listen": {"imap": "127.0.0.1:0", "pop3": "127.0.0.1:0"},
        "database": {"url": f"sqlite:///{directory / 'proxy.db'}"},
        "provision": {"kind": "passwd-dir", "path": str(directory / "users"), "rounds": 5000,
                      "hash_processes": 2},
        "migration": {"workers": workers},
        "log": {"format": "json"},
    }))
    return path


def terminate_after(delay: float):  # type: ignore[no-untyped-def]
    def send(pid: int) -> None:
        time.sleep(delay)
        os.kill(pid, signal.SIGTERM)
    return send


def terminate_once_logged(log: Path, needle: str, count: int = 1):  # type: ignore[no-untyped-def]
    """SIGTERM once start-up has visibly finished, however long a loaded machine takes."""
    def send(pid: int) -> None:
        deadline = time.monotonic() + 120
        while log.read_text(errors="replace").count(needle) < count:
            assert time.monotonic() < deadline, f"{needle!r} never logged"
            time.sleep(0.05)
        os.kill(pid, signal.SIGTERM)
    return send


def stop_once_settled(command: list[str], log: Path, needle: str, count: int = 1
                      ) -> TreeResult:
    return run_tree(command, log, after_start=terminate_once_logged(log, needle, count),
                    timeout=180)


def stop_at(command: list[str], log: Path, delay: float, timeout: float = 60.0) -> TreeResult:
    return run_tree(command, log, after_start=terminate_after(delay), timeout=timeout)


def stop_at_each(command: list[str], directory: Path, delays: list[float]
                 ) -> list[TreeResult]:
    """One run per delay, three at a time (each run mostly waits)."""
    with ThreadPoolExecutor(max_workers=3) as pool:
        return list(pool.map(
            lambda delay: stop_at(command, directory / f"run-{delay}.log", delay), delays))


def assert_stopped_cleanly(result: TreeResult, delay: float) -> None:
    assert result.status in STOPPED, (delay, result.status, result.output[-3000:])
    assert result.left == [], (delay, result.left)
    assert "Traceback" not in result.output, (delay, result.output[-3000:])
    # Workers the pool had started stopped on their own, however early the stop came.
    for line in result.output.splitlines():
        if '"worker_pool_stopped"' in line:
            assert set(json.loads(line)["exitcodes"]) <= {0}, (delay, line)


# Moments from "not yet running Python" through "children starting" to "settled".
DELAYS = [0.0, 0.2, 0.4, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.5, 2.0, 3.0]


def test_worker_pool_stops_at_any_moment(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    command = [sys.executable, "-m", "migrating_proxy", "--config", str(config),
               "worker", "--processes", "2"]
    results = stop_at_each(command, tmp_path, DELAYS)
    for delay, result in zip(DELAYS, results, strict=True):
        assert_stopped_cleanly(result, delay)
    # A settled pool stops in order: every child reports its stop.
    settled = stop_once_settled(command, tmp_path / "settled.log", '"worker_started"', 2)
    assert_stopped_cleanly(settled, -1)
    assert settled.status == 0
    assert settled.output.count('"event": "worker_stopped"') == 2, settled.output


def test_serve_stops_at_any_moment(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    command = [sys.executable, "-m", "migrating_proxy", "--config", str(config), "serve"]
    results = stop_at_each(command, tmp_path, DELAYS)
    for delay, result in zip(DELAYS, results, strict=True):
        assert_stopped_cleanly(result, delay)
    # Settled, with its workers running: the same, in order.
    settled = stop_once_settled(command, tmp_path / "settled.log", '"worker_started"', 2)
    assert_stopped_cleanly(settled, -1)
    assert settled.status == 0 and '"event": "stopping"' in settled.output


# `serve` with SIGTERM sent to itself at the narrowest moment of start-up: a `spawn` child (the
# SQLite helper, the hashing processes) exists but has not yet been given its start-up data.
# Python's default action there leaves the child to die with "EOFError: Ran out of input";
# stopsignals.py holds the stop back until the child has its data, then delivers it.
STOP_WHILE_SPAWNING = """
import os, signal, sys
from multiprocessing import util
spawn = util.spawnv_passfds
def spawn_then_stop(path, args, passfds):
    pid = spawn(path, args, passfds)
    if "spawn_main" in repr(args):  # a child, not the resource tracker
        os.kill(os.getpid(), signal.SIGTERM)
    return pid
util.spawnv_passfds = spawn_then_stop
from migrating_proxy.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_serve_stopped_while_starting_a_child(tmp_path: Path, database: str,
                                              postgres_url: str) -> None:
    config = write_config(tmp_path)
    if database == "postgresql":  # no SQLite helper: the stop lands in the hashing pool
        config.write_text(config.read_text().replace(
            f"sqlite:///{tmp_path / 'proxy.db'}", postgres_url))
    command = [sys.executable, "-c", STOP_WHILE_SPAWNING, "--config", str(config), "serve"]
    result = run_tree(command, tmp_path / "serve.log", timeout=120)
    assert result.status in STOPPED, (result.status, result.output[-3000:])
    assert result.left == [], result.left
    assert "Traceback" not in result.output, result.output[-3000:]


@pytest.mark.parametrize("delay", [0.5, 1.5, 3.0, 5.0])
def test_demo_stops_at_any_moment(tmp_path: Path, delay: float) -> None:
    """The demo brings up two Dovecot instances and the proxy (which starts workers)."""
    before = {name for name in os.listdir("/tmp") if name.startswith("mp-demo-")}
    command = [sys.executable, str(REPO / "scripts" / "demo.py"), "--dir",
               str(tmp_path / "demo")]
    result = stop_at(command, tmp_path / "demo.log", delay, timeout=90)
    assert result.status in (*STOPPED, 130), (delay, result.status, result.output[-3000:])
    assert result.left == [], (delay, result.left)
    assert "Traceback" not in result.output, result.output[-3000:]
    after = {name for name in os.listdir("/tmp") if name.startswith("mp-demo-")}
    assert after - before == set()  # the Dovecot instances' directories are gone too
