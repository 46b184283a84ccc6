"""The web console for tests: a real `migrating-proxy web` process, logins, a real Chromium.

`WebConsole` runs the console as an operator does (its own process, configured by a TOML file);
`Session` logs in through the login form as a browser would (double-submit cookie, form post)
and then calls the API with the session's CSRF token; `chromium()` launches Debian's Chromium
through Playwright with a fresh profile.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.support.dovecot import free_port
from tests.support.proxy import ALL_LOGS, render_toml

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
ADMIN, ADMIN_PW = "admin", "console-pw-Zq8vK"


def cli(config: Path, *args: str, input: str | None = None,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "migrating_proxy", "--config", str(config), *args],
        input=input, capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(f"CLI {args} failed ({result.returncode}): {result.stderr}")
    return result


@dataclass
class WebConsole:
    """`migrating-proxy web` on a free loopback port, with the given configuration sections."""

    directory: Path
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config_path = self.directory / "migrating-proxy.toml"
        self.log_path = self.directory / "web.log"
        ALL_LOGS.append(self.log_path)
        defaults: dict[str, dict[str, Any]] = {
            "database": {"url": f"sqlite:///{self.directory / 'proxy.db'}"},
            "provision": {"kind": "none", "rounds": 5000},
            "limits": {"auth_failure_delay": 0.1},
            "migration": {"workers": 0, "source_timeout": 3.0},
            "web": {"listen": f"127.0.0.1:{self.port}"},
            "log": {"format": "json", "level": "debug"},
        }
        for section, values in self.sections.items():
            defaults.setdefault(section, {}).update(values)
        self.config_path.write_text(render_toml(defaults))
        self.tls = "tls" in defaults

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def cli(self, *args: str, input: str | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        result = cli(self.config_path, *args, input=input, check=check)
        with open(self.log_path, "a") as log:
            log.write(result.stderr)
        return result

    def add_admin(self, name: str = ADMIN, password: str = ADMIN_PW) -> None:
        self.cli("admin-user", "add", name, input=password + "\n")

    def token(self, name: str = ADMIN) -> str:
        return self.cli("admin-user", "token", name).stdout.strip()

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process
        self.process = subprocess.Popen(
            [sys.executable, "-m", "migrating_proxy", "--config", str(self.config_path), "web"],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.close()
        wait_for_log(self.log_path, '"event": "web_started"', self.process)

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=15)
        code, self.process = self.process.returncode, None
        return code

    def __enter__(self) -> WebConsole:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_for_log(path: Path, needle: str, process: subprocess.Popen[bytes] | None = None,
                 timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while needle not in (path.read_text(errors="replace") if path.exists() else ""):
        if (process is not None and process.poll() is not None) or time.monotonic() > deadline:
            raise RuntimeError(f"{needle} not seen:\n{path.read_text(errors='replace')[-3000:]}")
        time.sleep(0.05)


CSRF_FIELD = re.compile(r'name="csrf_token" value="([^"]+)"')
CSRF_META = re.compile(r'<meta name="csrf-token" content="([^"]*)">')


class Session:
    """A logged-in browser session without the browser: cookies, the form, the CSRF token."""

    def __init__(self, base_url: str, verify: Any = True) -> None:
        self.http = httpx.Client(base_url=base_url, verify=verify, timeout=30,
                                 follow_redirects=False)
        self.csrf = ""

    def login(self, name: str = ADMIN, password: str = ADMIN_PW) -> httpx.Response:
        form = self.http.get("/login")
        token = CSRF_FIELD.search(form.text)
        assert token, form.text
        answer = self.http.post("/login", data={"name": name, "password": password,
                                                "csrf_token": token[1], "next": "/"})
        if answer.status_code == 303:
            page = self.http.get("/")
            meta = CSRF_META.search(page.text)
            assert meta, page.text
            self.csrf = meta[1]
        return answer

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.http.get(path, **kwargs)

    def post(self, path: str, csrf: bool = True, **kwargs: Any) -> httpx.Response:
        headers = {"X-CSRF-Token": self.csrf} if csrf else {}
        return self.http.post(path, headers=headers, **kwargs)

    def close(self) -> None:
        self.http.close()


@contextmanager
def chromium(downloads: Path | None = None) -> Iterator[Any]:
    """Debian's Chromium through Playwright (no browser download), a fresh profile each time."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                             downloads_path=str(downloads) if downloads else None)
        try:
            yield browser
        finally:
            browser.close()
