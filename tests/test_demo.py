"""`scripts/demo.py --once`: the demo stack comes up, says how to log in, and a login works."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_demo_wrapper_is_an_executable_bash_script() -> None:
    wrapper = REPO / "scripts" / "demo"
    assert os.access(wrapper, os.X_OK)
    text = wrapper.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "scripts/bootstrap" in text and "scripts/demo.py" in text


# Two Dovecot instances, the proxy, a first login that starts a copy, the stop: seconds alone,
# longer on a machine busy with other test runs. A bound on "it finished", not on speed.
@pytest.mark.timeout(300)
def test_demo_once_brings_the_stack_up_checks_a_login_and_cleans_up(tmp_path: Path) -> None:
    before = set(os.listdir("/tmp"))
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "demo.py"), "--once", "--dir",
         str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=280, cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "carol@new.example / carol-pw" in out
    assert "curl -s --user carol@new.example:carol-pw imap://127.0.0.1:" in out
    assert "alice@old.example / alice-pw" in out
    assert "demo: checked: carol@new.example logged in through the proxy" in out
    # Every command the instructions print was run as printed, and nothing else is suggested:
    # no tool that nothing installs (nc), no note meant for developers.
    for name in ("local_imap", "local_pop3", "first_login", "status"):
        assert f"demo: checked: {name} command works as printed" in out
    instructions = out[out.index("=== migrating-proxy demo ==="):out.index("demo: checked")]
    assert "nc " not in instructions and "checkout" not in instructions
    assert out.rstrip().endswith("demo: stopped")

    config = (tmp_path / "demo" / "migrating-proxy.toml").read_text()
    assert "[listen]" in config and "master_password_file" in config
    log = (tmp_path / "demo" / "proxy.log").read_text()
    assert '"event": "started"' in log and '"outcome": "ok"' in log
    leftovers = {name for name in set(os.listdir("/tmp")) - before if name.startswith("mp-demo")}
    assert leftovers == set()
    assert processes_mentioning(str(tmp_path)) == []


def processes_mentioning(text: str) -> list[str]:
    """Command lines of running processes that contain text (the proxy and its workers)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if proc.name.isdigit() and text in cmdline:
            found.append(cmdline)
    return found
