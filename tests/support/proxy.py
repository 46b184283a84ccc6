"""Running migrating-proxy itself for tests: a real `serve` subprocess and real CLI calls.

The proxy runs as a separate process, exactly as an operator starts it, so tests cover the
command line, the configuration file, signal handling and the log output (which the secrets test
greps). Its stderr goes to a file under the test's directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.dovecot import REPO_ROOT, DovecotInstance, free_port
from tests.support.processes import descendants
from tests.support.tls import TLSFiles

# Everything the suite's proxies logged, for the "no secret in any log" test.
ALL_LOGS: list[Path] = []


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_toml(sections: dict[str, dict[str, Any]]) -> str:
    out = []
    for section, values in sections.items():
        out.append(f"[{section}]")
        out.extend(f"{key} = {toml_value(value)}" for key, value in values.items())
        out.append("")
    return "\n".join(out)


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Poll until predicate() holds; AssertionError naming `what` after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"never: {what}")
        time.sleep(0.05)


@dataclass
class Proxy:
    directory: Path
    store: DovecotInstance
    tls: TLSFiles | None = None
    master: bool = True
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    # The module `python -m` runs for `serve`: the product, or a test harness around it.

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config_path = self.directory / "migrating-proxy.toml"
        self.log_path = self.directory / "proxy.log"
        ALL_LOGS.append(self.log_path)
        names = ["imap", "pop3"] + (["imaps", "pop3s"] if self.tls else [])
        self.ports = {name: free_port() for name in names}
        self.write_config()

    @property
    def imap_port(self) -> int:
        return self.ports["imap"]

    @property
    def pop3_port(self) -> int:
        return self.ports["pop3"]

    def sections(self) -> dict[str, dict[str, Any]]:
        listen = {name: f"127.0.0.1:{port}" for name, port in self.ports.items()}
        backend: dict[str, Any] = {
            "imap": f"imap://127.0.0.1:{self.store.imap_port}",
            "pop3": f"pop3://127.0.0.1:{self.store.pop3_port}",
            "timeout": 5.0,
        }
        if self.master:
            secret = self.directory / "master-password"
            secret.write_text(f"{self.store.master_password}\n")
            secret.chmod(0o600)
            backend |= {"master_user": self.store.master_user,
                        "master_password_file": str(secret)}
        sections: dict[str, dict[str, Any]] = {
            "listen": listen,
            "database": {"url": f"sqlite:///{self.directory / 'proxy.db'}"},
            "backend": backend,
            # Few rounds keep the suite fast; production uses passlib's default cost.
            "provision": {"kind": "passwd-dir", "path": str(self.store.users_file),
                          "scheme": "sha512_crypt", "rounds": 5000},
            "limits": {"auth_failure_delay": 0.2, "idle_timeout": 10.0},
            # Copy workers only where a test migrates mail: they are processes of their own.
            "migration": {"workers": 0, "source_timeout": 5.0},
            "log": {"format": "json", "level": "debug"},
        }
        if self.tls:
            sections["tls"] = {"cert": str(self.tls.cert), "key": str(self.tls.key)}
        for section, values in self.overrides.items():
            sections.setdefault(section, {}).update(values)
        return sections

    def write_config(self) -> None:
        self.config_path.write_text(render_toml(self.sections()))

    def cli(self, *args: str, input: str | None = None, check: bool = True
            ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "migrating_proxy", "--config", str(self.config_path), *args],
            input=input, capture_output=True, text=True, timeout=60,
        )
        with open(self.log_path, "a") as log:
            log.write(result.stderr)
        if check and result.returncode != 0:
            raise AssertionError(f"CLI {args} failed ({result.returncode}): {result.stderr}")
        return result

    def add_account(self, address: str, password: str) -> None:
        self.cli("account", "add", address, input=password + "\n")

    def status(self, *addresses: str) -> list[dict[str, Any]]:
        return json.loads(self.cli("status", "--json", *addresses).stdout)

    def wait_for_state(self, address: str, states: tuple[str, ...] = ("COMPLETED", "ERROR"),
                       timeout: float = 60.0) -> dict[str, Any]:
        """Poll `status --json` (as an admin would) until the account reaches one of states."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.cli("status", "--json", address, check=False)
            rows = json.loads(result.stdout) if result.returncode == 0 else []
            if rows and rows[0]["state"] in states:
                return rows[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"{address} still {rows} after {timeout}s:\n"
                                     f"{self.log_text()[-3000:]}")
            time.sleep(0.2)

    def start(self, env: dict[str, str] | None = None) -> None:
        """Run `serve` (with `env` added to its environment) until its listeners are bound."""
        started = self.log_text().count('"event": "started"')  # a restart logs it again
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process
        self.process = subprocess.Popen(
            [sys.executable, "-m", "migrating_proxy", "--config", str(self.config_path), "serve"],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1",
                 "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO_ROOT),
                                                             os.environ.get("PYTHONPATH")))),
                 **(env or {})},
        )
        log.close()
        # "started" is logged once every listener is bound; a dead process won't log it.
        deadline = time.monotonic() + 20
        while self.log_text().count('"event": "started"') <= started:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"proxy did not start:\n{self.log_text()[-3000:]}")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        code, self.process = self.process.returncode, None
        return code

    def crash(self) -> None:
        """kill -9 the proxy and every process it started (workers included), like a crash."""
        assert self.process is not None
        for pid in [self.process.pid, *descendants(self.process.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait()
        self.process = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, needle: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_text()
            if needle in text:
                return text
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} never appeared in the proxy log")

    def __enter__(self) -> Proxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
