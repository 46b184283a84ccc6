"""No password ever reaches a log, the database or the store's user file, in any encoding.

One real proxy (a `serve` subprocess) in front of a real Dovecot store goes through every way a
password travels: the CLI (account add, account passwd), IMAP LOGIN, AUTHENTICATE PLAIN (with
SASL-IR and with a continuation), AUTHENTICATE LOGIN, wrong passwords, a throttled attempt with
the right password, a client that hangs up mid-login, and POP3 USER/PASS and AUTH PLAIN. Then
the proxy is stopped and everything it and the CLI wrote is searched for the cleartext
passwords and their base64 SASL forms.
"""

from __future__ import annotations

import importlib.util
import json
import secrets
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from imapclient import IMAPClient

from tests.support.dovecot import DovecotInstance
from tests.support.proxy import Proxy
from tests.support.secrets import b64, plain_blob
from tests.support.secrets import find_secrets as secrets_in

USER = "Sally@new.example"
TOKEN = secrets.token_hex(6)
FIRST_PASSWORD = f"S3cr3t-Pa55-{TOKEN}"  # set by `account add`, replaced by `account passwd`
PASSWORD = f"S3cr3t-Pa55-n3w-{TOKEN}"  # the one that logs in
WRONG_PASSWORD = f"Wr0ng-Pa55-{TOKEN}"
ALL_PASSWORDS = (FIRST_PASSWORD, PASSWORD, WRONG_PASSWORD)
HAS_POP3 = importlib.util.find_spec("migrating_proxy.frontends.pop3") is not None
REQUIRED_FIELDS = ("address", "peer", "protocol", "outcome", "duration_ms")


def find_secrets(data: bytes) -> list[str]:
    return secrets_in(data, ALL_PASSWORDS, (USER, USER.lower()))


# --- the scenario ---------------------------------------------------------------------------


class RawIMAP:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")
        self.greeting = self.file.readline()

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\r\n")

    def tagged(self, tag: str) -> bytes:
        while True:
            line = self.file.readline()
            if not line or line.startswith(tag.encode() + b" "):
                return line

    def close(self) -> None:
        self.sock.close()


class RawPOP3(RawIMAP):
    def answer(self) -> bytes:
        return self.file.readline()


@dataclass
class Scenario:
    proxy: Proxy
    cli_output: list[str] = field(default_factory=list)
    answers: dict[str, bytes] = field(default_factory=dict)
    expected: list[tuple[str, str]] = field(default_factory=list)  # (protocol, outcome)

    def cli(self, *args: str, input: str | None = None) -> None:
        result = self.proxy.cli(*args, input=input)
        self.cli_output += [result.stdout, result.stderr]

    def login_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.proxy.log_text().splitlines():
            if line.startswith("{"):
                event = json.loads(line)
                if event.get("event") == "login":
                    events.append(event)
        return events

    def wait_for_events(self, count: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.login_events()) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"expected {count} login events: {self.login_events()}")
            time.sleep(0.05)


def imap_login(s: Scenario) -> None:
    with IMAPClient("127.0.0.1", s.proxy.imap_port, ssl=False, timeout=10) as client:
        client.login(USER, PASSWORD)
        client.logout()
    s.expected.append(("imap", "ok"))


def imap_authenticate(s: Scenario, name: str, steps: list[str], command: str) -> None:
    """`command`, then one continuation response per step; records the tagged answer."""
    client = RawIMAP(s.proxy.imap_port)
    client.send(command)
    for step in steps:
        assert client.file.readline().startswith(b"+"), name
        client.send(step)
    s.answers[name] = client.tagged("a")
    client.send("z LOGOUT")
    client.close()
    s.expected.append(("imap", "ok"))


def imap_mechanisms(s: Scenario) -> None:
    imap_authenticate(s, "sasl-ir", [], f"a AUTHENTICATE PLAIN {plain_blob(USER, PASSWORD)}")
    imap_authenticate(s, "plain", [plain_blob(USER, PASSWORD)], "a AUTHENTICATE PLAIN")
    imap_authenticate(s, "login", [b64(USER), b64(PASSWORD)], "a AUTHENTICATE LOGIN")


def pop3_logins(s: Scenario) -> None:
    client = RawPOP3(s.proxy.pop3_port)
    client.send(f"USER {USER}")
    client.answer()
    client.send(f"PASS {PASSWORD}")
    s.answers["pop3-pass"] = client.answer()
    client.send("QUIT")
    client.close()
    client = RawPOP3(s.proxy.pop3_port)
    client.send(f"AUTH PLAIN {plain_blob(USER, PASSWORD)}")
    s.answers["pop3-auth-plain"] = client.answer()
    client.send("QUIT")
    client.close()
    s.expected += [("pop3", "ok"), ("pop3", "ok")]


def hang_up_mid_login(s: Scenario) -> None:
    """Credentials sent, connection closed before the answer: still one (logged) attempt.
    A SASL exchange abandoned before the password is not an attempt at all."""
    before = len(s.login_events())
    client = RawIMAP(s.proxy.imap_port)
    client.send(f'a LOGIN {USER} "{PASSWORD}"')
    client.close()
    s.expected.append(("imap", "ok"))
    s.wait_for_events(before + 1)
    client = RawIMAP(s.proxy.imap_port)
    client.send("a AUTHENTICATE LOGIN")
    client.file.readline()
    client.send(b64(USER))
    client.close()


def wrong_passwords_then_throttled(s: Scenario) -> None:
    client = RawIMAP(s.proxy.imap_port)
    client.send(f'a LOGIN {USER} "{WRONG_PASSWORD}"')
    s.answers["wrong-login"] = client.tagged("a")
    client.send(f"b AUTHENTICATE PLAIN {plain_blob(USER, WRONG_PASSWORD)}")
    s.answers["wrong-plain"] = client.tagged("b")
    client.close()
    client = RawIMAP(s.proxy.imap_port)
    client.send("c AUTHENTICATE LOGIN")
    client.file.readline()
    client.send(b64(USER))
    client.file.readline()
    client.send(b64(WRONG_PASSWORD))
    s.answers["wrong-auth-login"] = client.tagged("c")
    # Three failures for the account (its limit): now even the right password is not tried.
    client.send(f'd LOGIN {USER} "{PASSWORD}"')
    s.answers["throttled"] = client.tagged("d")
    client.close()
    s.expected += [("imap", "failed")] * 3 + [("imap", "throttled")]


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory,
             module_store: DovecotInstance) -> Iterator[Scenario]:
    limits = {"max_failures_per_peer": 0, "max_failures_per_account": 3,
              "max_failures_per_connection": 5}
    proxy = Proxy(tmp_path_factory.mktemp("secrets") / "proxy", module_store,
                  overrides={"limits": limits})
    s = Scenario(proxy)
    s.cli("account", "add", USER, input=FIRST_PASSWORD + "\n")
    s.cli("account", "passwd", USER, input=PASSWORD + "\n")
    s.cli("account", "list", "--json")
    try:
        with proxy:
            imap_login(s)
            imap_mechanisms(s)
            if HAS_POP3:
                pop3_logins(s)
            hang_up_mid_login(s)
            wrong_passwords_then_throttled(s)
            s.wait_for_events(len(s.expected))
    finally:
        proxy.stop()
    yield s


# --- the checks -----------------------------------------------------------------------------


def test_the_scenario_got_the_answers_it_was_written_for(scenario: Scenario) -> None:
    answers = scenario.answers
    for name in ("sasl-ir", "plain", "login"):
        assert answers[name].startswith(b"a OK"), (name, answers[name])
    for name in ("wrong-login", "wrong-plain", "wrong-auth-login"):
        assert b"[AUTHENTICATIONFAILED]" in answers[name], (name, answers[name])
    assert answers["throttled"].split()[1] == b"NO", answers["throttled"]
    if HAS_POP3:
        assert answers["pop3-pass"].startswith(b"+OK"), answers["pop3-pass"]
        assert answers["pop3-auth-plain"].startswith(b"+OK"), answers["pop3-auth-plain"]


def test_secret_finder_recognises_every_form() -> None:
    blob = f"x {plain_blob(USER.lower(), PASSWORD).rstrip('=')} y".encode()
    assert find_secrets(blob)
    assert find_secrets(b64(WRONG_PASSWORD).encode())
    assert not find_secrets(f"{USER} {b64(USER)} S3cr3t-Pa55".encode())


def artifacts(scenario: Scenario, store: DovecotInstance) -> dict[str, bytes]:
    """Everything the proxy and the CLI wrote: every file in the proxy's directory (config,
    log, SQLite database with its WAL), the CLI's output, the store's user file and log."""
    found = {str(p): p.read_bytes() for p in scenario.proxy.directory.rglob("*") if p.is_file()}
    found["CLI stdout/stderr"] = "".join(scenario.cli_output).encode()
    found[str(store.users_file)] = store.provisioned_text().encode()
    found[str(store.log_path)] = store.log_path.read_bytes()
    return found


def test_no_password_in_any_form_anywhere(scenario: Scenario,
                                          module_store: DovecotInstance) -> None:
    files = artifacts(scenario, module_store)
    assert any(name.endswith("proxy.db") for name in files)
    assert USER.lower().encode() in files[str(module_store.users_file)]
    assert b'"event": "login"' in files[str(scenario.proxy.log_path)]
    leaks = {name: find_secrets(data) for name, data in files.items() if find_secrets(data)}
    assert leaks == {}


def test_one_login_event_per_attempt(scenario: Scenario) -> None:
    events = scenario.login_events()
    got = sorted((e["protocol"], e["outcome"]) for e in events)
    assert got == sorted(scenario.expected)


def test_login_events_carry_the_required_fields(scenario: Scenario) -> None:
    for event in scenario.login_events():
        missing = [name for name in REQUIRED_FIELDS if name not in event]
        assert missing == [], event
        assert event["address"] == USER
        assert event["peer"] == "127.0.0.1"
        assert isinstance(event["duration_ms"], int | float) and event["duration_ms"] >= 0


def test_throttled_and_failed_attempts_are_told_apart_in_the_log(scenario: Scenario) -> None:
    outcomes = [e["outcome"] for e in scenario.login_events() if e["outcome"] != "ok"]
    assert outcomes == ["failed", "failed", "failed", "throttled"]
