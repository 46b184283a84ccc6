"""`serve` and `worker` that cannot start: one line, exit 1, promptly, no process left behind.

Each case is a configuration that `config.load` accepts but the machine refuses when `serve`
acquires it: a port already taken, an address that is not ours, a certificate that is not one
or that the service user cannot read, a database that does not answer or whose driver is
missing, files the service cannot use. Every run goes through the real CLI under a subreaper
(tests/support/processes.py), with copy workers and hashing processes configured, so a process
started too early and left behind would be seen. Runs are independent and go in parallel.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.processes import TreeResult, run_tree
from tests.support.proxy import render_toml
from tests.support.tls import make_test_ca

# Each test starts the CLI several times; on a machine busy with other test runs that can
# take minutes. A bound on "it finished", not on speed.
pytestmark = pytest.mark.timeout(600)

IS_ROOT = os.geteuid() == 0


@pytest.fixture
def home() -> Iterator[Path]:
    """World-traversable (a case runs `serve` as nobody), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="mp-startup-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class Case:
    """A configuration that serve must refuse at start-up with `reason` in its one line."""

    name: str
    reason: str
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    as_nobody: bool = False  # run as an unprivileged user, as the systemd unit does
    prepare: Callable[[Path], None] | None = None
    command: str = "serve"  # or "worker"


def base_sections(directory: Path) -> dict[str, dict[str, Any]]:
    # Port 0: the kernel picks free ports as serve binds them, so no other test on this
    # machine can take them in between (as it could with a port probed beforehand).
    return {
        "listen": {"imap": "127.0.0.1:0", "pop3": "127.0.0.1:0"},
        "database": {"url": f"sqlite:///{directory / 'proxy.db'}"},
        "provision": {"kind": "passwd-dir", "path": str(directory / "users"), "rounds": 5000,
                      "hash_processes": 2},
        "migration": {"workers": 2},
        "log": {"format": "json"},
    }


def write_config(directory: Path, case: Case) -> Path:
    sections = base_sections(directory)
    for section, values in case.sections.items():
        sections.setdefault(section, {}).update(values)
    path = directory / "migrating-proxy.toml"
    path.write_text(render_toml(sections))
    path.chmod(0o644)
    return path


def cli_command(config: Path, case: Case) -> list[str]:
    command = [sys.executable, "-m", "migrating_proxy", "--config", str(config), case.command]
    if case.as_nobody and IS_ROOT:
        command = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--",
                   *command]
    return command


def assert_refused_at_start(result: TreeResult, reason: str, what: str) -> None:
    assert result.status == 1, (what, result.status, result.output)
    lines = result.output.splitlines()
    assert len(lines) == 1, (what, result.output)
    assert lines[0].startswith("migrating-proxy: error: "), (what, lines[0])
    assert reason in lines[0], (what, lines[0])
    assert result.left == [], (what, result.left)


def run_cases(home: Path, cases: list[Case]) -> None:
    def run(case: Case) -> TreeResult:
        directory = home / case.name
        directory.mkdir()
        directory.chmod(0o755)
        if case.prepare is not None:
            case.prepare(directory)
        config = write_config(directory, case)
        return run_tree(cli_command(config, case), directory / f"{case.command}.log",
                        timeout=60)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run, cases))
    for case, result in zip(cases, results, strict=True):
        assert_refused_at_start(result, case.reason, case.name)


# --- the listeners ------------------------------------------------------------------------


def test_a_port_already_taken(home: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # imap binds first, then pop3 fails: the imap socket must be released too.
        run_cases(home, [
            Case("taken", f"listen.pop3: cannot listen on 127.0.0.1:{port}: "
                          "Address already in use", {"listen": {"pop3": f"127.0.0.1:{port}"}}),
            # Bound with the others, before the privileges are dropped, and named by its key.
            Case("metrics", f"metrics.listen: cannot listen on 127.0.0.1:{port}: "
                            "Address already in use", {"metrics": {"listen": f"127.0.0.1:{port}"}}),
        ])


def test_an_address_that_is_not_this_machines(home: Path) -> None:
    # Binding sends nothing: the kernel refuses an address no interface has.
    run_cases(home, [Case("foreign", "listen.imap: cannot listen on 192.0.2.1:1143: Cannot "
                                     "assign requested address",
                          {"listen": {"imap": "192.0.2.1:1143"}})])


# --- TLS, the database, files -------------------------------------------------------------


def _tls_cases() -> list[Case]:
    def garbage(directory: Path) -> None:
        (directory / "cert.pem").write_text("not a certificate\n")
        (directory / "key.pem").write_text("not a key\n")

    def mismatched(directory: Path) -> None:
        first, second = make_test_ca(directory / "a"), make_test_ca(directory / "b")
        shutil.copy(first.cert, directory / "cert.pem")
        shutil.copy(second.key, directory / "key.pem")

    def unreadable_key(directory: Path) -> None:
        files = make_test_ca(directory / "a")
        for path in (directory / "a", files.cert):
            path.chmod(0o755 if path.is_dir() else 0o644)
        shutil.copy(files.cert, directory / "cert.pem")
        shutil.copy(files.key, directory / "key.pem")
        (directory / "key.pem").chmod(0o600)  # root's, as a careless install leaves it

    def locked_directory(directory: Path) -> None:
        # /etc/ssl/private (0710 root:ssl-cert) or /etc/dovecot/private (0700 root): the
        # service's user may not even look inside, which used to be a traceback.
        files = make_test_ca(directory / "private")
        (directory / "private").chmod(0o700)
        files.cert.chmod(0o644)

    tls = {"tls": {"cert": "cert.pem", "key": "key.pem"}}
    private = {"tls": {"cert": "private/server.pem", "key": "private/server.key"}}
    return [
        Case("tls-garbage", "tls: cannot use", tls, prepare=garbage),
        Case("tls-mismatch", "tls: cannot use", tls, prepare=mismatched),
        Case("tls-unreadable", "tls: cannot read", tls, as_nobody=True, prepare=unreadable_key),
        Case("tls-locked-directory", "tls.cert: ", private, as_nobody=True,
             prepare=locked_directory),
    ]


def _file_cases() -> list[Case]:
    def a_file(directory: Path) -> None:
        (directory / "a-file").write_text("not a directory\n")

    def secret_of_root(directory: Path) -> None:
        (directory / "master-password").write_text("secret\n")
        (directory / "master-password").chmod(0o600)
        (directory / "users").mkdir(mode=0o777)  # the rest is usable by nobody
        (directory / "users").chmod(0o777)
        (directory / "var").mkdir(mode=0o777)
        (directory / "var").chmod(0o777)

    return [
        Case("users-under-a-file", "a-file", {"provision": {"path": "a-file/users"}},
             prepare=a_file),
        Case("vault-under-a-file", "cannot read the vault key: Not a directory",
             {"migration": {"vault_key_file": "a-file/vault.key"}}, prepare=a_file),
        Case("master-password-unreadable", "master-password: Permission denied",
             {"backend": {"master_user": "proxy-master",
                          "master_password_file": "master-password"},
              "database": {"url": "sqlite:///var/proxy.db"}},
             as_nobody=True, prepare=secret_of_root),
    ]


def _database_cases() -> list[Case]:
    return [
        Case("db-unreachable", "cannot open database: OperationalError: connection failed",
             {"database": {"url": "postgresql://nobody@127.0.0.1:1/x"}}),
        Case("db-driver-missing", "cannot use the database URL",
             {"database": {"url": "postgresql+nodriver://nobody@127.0.0.1/x"}}),
        Case("db-url-malformed", "database.url: not a valid URL",
             {"database": {"url": "postgresql://nobody@127.0.0.1:port/x"}}),
        Case("store-url-malformed", "backend.imap",
             {"backend": {"imap": "imap://127.0.0.1:port"}}),
    ]


def test_worker_checks_what_its_children_would_fail_on(home: Path) -> None:
    """Else the pool would start children that die at once, and restart them for ever."""
    cases = [Case(f"worker-{case.name}", case.reason, case.sections, case.as_nobody,
                  case.prepare, command="worker")
             for case in [*_file_cases(), *_database_cases()]
             if case.name not in ("users-under-a-file", "store-url-malformed")]
    if not IS_ROOT:
        cases = [case for case in cases if not case.as_nobody]
    run_cases(home, cases)


def test_tls_files_it_cannot_use(home: Path) -> None:
    cases = _tls_cases()
    if not IS_ROOT and pwd.getpwuid(os.geteuid()).pw_name != "nobody":
        cases = [case for case in cases if not case.as_nobody]  # setpriv needs root
    run_cases(home, cases)


def test_databases_and_store_urls_it_cannot_use(home: Path) -> None:
    run_cases(home, _database_cases())


def test_files_and_directories_it_cannot_use(home: Path) -> None:
    cases = _file_cases()
    if not IS_ROOT:
        cases = [case for case in cases if not case.as_nobody]
    run_cases(home, cases)
