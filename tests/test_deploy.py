"""The README's deployment on Debian 12, performed as written (tests/support/deploy_driver.py).

The install steps of README.md "Deploying" run in a private mount and network namespace over
this machine's own Debian 12 (its /etc/dovecot as the distribution installed it, its Python,
adduser, install, systemd-analyze), with the example configuration and the Dovecot snippet
installed as the README says, on the ports they name. Then the units' ExecStart runs as their
User=, a user of a migrating domain logs in through the proxy, the mailbox is copied, and the
user logs in to Dovecot directly. The driver lists the few things that differ from an
operator's machine (a certificate, a log path, an offline wheelhouse, the old server's URL).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from migrating_proxy.config import WebConfig
from tests.support.deploy_driver import readme_install_block
from tests.support.dovecot import DSYNC_SNIPPET, SNIPPET_PORTS
from tests.support.processes import run_tree

REPO = Path(__file__).resolve().parents[1]

# The whole deployment (a venv, pip, Dovecot, a migration) runs in the module's fixture:
# about a minute alone, several on a machine busy with other test runs.
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def deployment() -> Iterator[dict[str, Any]]:
    if os.geteuid() != 0:
        pytest.skip("installs users and mounts: needs root")
    if not (REPO / ".venv" / "wheelhouse" / ".stamp").exists():
        pytest.skip("no wheelhouse: run scripts/bootstrap")
    work = Path(tempfile.mkdtemp(prefix="mp-deploy-"))
    work.chmod(0o755)
    try:
        tree = run_tree(["unshare", "--mount", "--net", "--propagation", "private", "--fork",
                         "--", sys.executable, "-m", "tests.support.deploy_driver", str(work)],
                        work / "driver.log", timeout=600)
        report = json.loads((work / "report.json").read_text())
        report["tree"] = tree
        yield report
    finally:
        shutil.rmtree(work, ignore_errors=True)


def step(report: dict[str, Any], name: str) -> dict[str, Any]:
    found = [s for s in report["steps"] if s["step"] == name]
    assert found, (name, report.get("error"), [s["step"] for s in report["steps"]])
    return found[-1]


def test_the_deployment_ran_to_the_end_and_left_nothing(deployment: dict[str, Any]) -> None:
    assert deployment.get("completed"), json.dumps(deployment, indent=2, default=str)[-8000:]
    assert deployment["tree"].status == 0, deployment["tree"].output
    assert deployment["tree"].left == []


def test_install_steps_work_as_written(deployment: dict[str, Any]) -> None:
    install = step(deployment, "install")
    assert install["status"] == 0, install
    installed = step(deployment, "installed")
    assert installed["documentation"]  # the units' Documentation= exists
    assert installed["/etc/migrating-proxy/master-password"] == [
        "root", "migrating-proxy", "0o640"]
    assert installed["/etc/dovecot/migrating-proxy-masters"] == ["root", "dovecot", "0o640"]
    assert installed["/var/lib/migrating-proxy/dovecot-users"] == [
        "migrating-proxy", "dovecot", "0o2750"]
    assert installed["/var/vmail"] == ["vmail", "vmail", "0o750"]


def test_units_verify_and_run_as_their_user(deployment: dict[str, Any]) -> None:
    for unit in ("migrating-proxy.service", "migrating-proxy-worker.service"):
        verify = step(deployment, f"verify {unit}")
        assert verify["status"] == 0 and verify["stderr"] == "", verify
        command = step(deployment, f"ExecStart of {unit}")["command"]
        assert "--reuid=migrating-proxy" in command
        assert "/opt/migrating-proxy/bin/migrating-proxy --config " \
               "/etc/migrating-proxy/migrating-proxy.toml" in command
        assert step(deployment, f"stop {unit}")["status"] == 0


def test_dovecot_moved_to_loopback_behind_the_proxy(deployment: dict[str, Any]) -> None:
    sockets = step(deployment, "dovecot listens")["sockets"]
    assert {"127.0.0.1:10143", "127.0.0.1:10110", "127.0.0.1:24"} <= set(sockets), sockets
    for port in ("143", "110", "993", "995"):  # free for the proxy; no TLS around it
        assert not any(s.rsplit(":", 1)[1] == port for s in sockets), sockets


def test_a_user_migrates_and_then_logs_in_to_dovecot_directly(
        deployment: dict[str, Any]) -> None:
    migrated = step(deployment, "migrated")
    assert migrated["state"] == "COMPLETED", migrated
    assert migrated["same_mail"] and migrated["messages"] >= 10, migrated


def test_admin_commands_as_printed_use_the_installed_configuration(
        deployment: dict[str, Any]) -> None:
    for name in ("domain add", "status", "status --domain"):
        result = step(deployment, name)
        assert result["status"] == 0 and "note:" not in result["stderr"], result
    assert "alice@old.example" in step(deployment, "status --domain")["stdout"]
    # serve started by hand as root binds its ports, then runs as the service's user.
    assert step(deployment, "serve by hand runs as")["users"] == ["migrating-proxy"] * 2
    assert step(deployment, "stop serve by hand")["status"] == 0
    # Run by root, they left nothing the service (migrating-proxy) could not write.
    owners = step(deployment, "owners")["owners"]
    state = {path: user for path, user in owners.items()
             if path.startswith("/var/lib/migrating-proxy")}
    assert set(state.values()) == {"migrating-proxy"}, state
    assert any(path.endswith("migrating-proxy.db") for path in state)
    mail = {path: user for path, user in owners.items() if path.startswith("/var/vmail/")}
    assert mail and set(mail.values()) == {"vmail"}, mail


def test_the_packages_the_readme_installs_are_those_the_deployment_ran_on() -> None:
    """The apt-get line is not run (no network in the namespace); scripts/bootstrap installs
    the same packages, and they must be the Debian ones this machine has."""
    text = (REPO / "README.md").read_text()
    deploying = text[text.index("## Deploying"):]
    line = next(line for line in deploying.splitlines() if line.startswith("apt-get install"))
    packages = line.split()[2:]
    assert {"dovecot-imapd", "dovecot-pop3d", "dovecot-lmtpd", "python3-venv"} <= set(packages)
    for package in packages:
        status = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package],
                                capture_output=True, text=True)
        assert status.stdout == "install ok installed", (package, status)


def test_the_install_steps_never_put_the_master_password_on_a_command_line() -> None:
    """Any local user reads every process's arguments (`ps`, /proc/PID/cmdline): the master
    password, which opens every mailbox of the store, may only go through a pipe. `printf` is
    bash's builtin (no process); every other command gets it on its standard input."""
    for line in readme_install_block().replace("\\\n", " ").splitlines():
        if line.lstrip().startswith("#"):
            continue
        for segment in re.split(r"\$\(|\||;|&&", line):
            if "$password" in segment:
                assert segment.split()[0] == "printf", (segment, line)


def test_the_dsync_snippet_listens_where_nothing_of_ours_does() -> None:
    """On the README's one machine, the store's doveadm HTTP listener (the dsync snippet) must
    not take a port the proxy or its web console uses by default: Dovecot refuses to start at
    all when one of its listeners cannot bind (`service(doveadm): listen(127.0.0.1, 8080)
    failed: Address already in use`), and the console would fail the other way round."""
    text = DSYNC_SNIPPET.read_text()
    match = re.search(r"inet_listener http \{[^}]*?\bport = (\d+)", text)
    assert match is not None
    http_port = int(match.group(1))
    assert http_port != WebConfig.DEFAULT_LISTEN[1]
    assert http_port not in SNIPPET_PORTS.values()
    assert http_port not in (143, 110, 993, 995, 25, 587, 9150)
    # What the configuration and the README tell the operator to point the proxy at.
    url = f"http://127.0.0.1:{http_port}/doveadm/v1"
    assert url in text
    assert url in (REPO / "config" / "migrating-proxy.example.toml").read_text()
    assert url in (REPO / "README.md").read_text()
