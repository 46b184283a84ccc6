"""Talking to the new store's doveadm: its HTTP API, or the local `doveadm` command.

The dsync engine (dsync.py) needs three doveadm mail commands: `backup -R` (the copy),
`mailbox status` (is the store mailbox untouched?) and `mailbox update` (repair an INBOX that
was opened before the first pass). Each is a `Command` carrying both spellings, the HTTP API's
JSON form and the command line, so the engine never knows which transport runs it.

doveadm reports failure badly, and the engine must never take a failure for success:

- the HTTP API answers a failed command with its exit code only (`exitCode` 65, 75, ...), and a
  worker that crashes (a setting missing for the user) drops the connection without an answer.
  The reason is only in the store's log, so it is read back with `logErrors` (the master
  keeps the latest errors in memory) and put into the `DoveadmFailed` message;
- the command line prints the reason on stderr and exits non-zero.
"""

from __future__ import annotations

import base64
import http.client
import json
import shlex
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

# sysexits.h, as doveadm uses them; 2 is dsync's own "run me again".
EXIT_MEANINGS = {
    1: "failed",
    2: "some changes could not be synced (dsync asks to run it again)",
    64: "usage error",
    65: "data error (the store mailbox conflicts with the old server's)",
    67: "unknown user",
    68: "unknown host",
    75: "temporary failure",
    77: "permission denied",
    78: "configuration error",
}
MAX_REASON = 600  # characters of read-back log text kept in an error


class DoveadmFailed(Exception):
    """A doveadm command did not succeed; the message says why, as far as doveadm told."""

    def __init__(self, reason: str, exit_code: int | None = None) -> None:
        super().__init__(reason)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Command:
    """One doveadm mail command, in the HTTP API's spelling and on the command line."""

    name: str  # HTTP API command name, e.g. "mailboxStatus"
    params: dict[str, Any]
    argv: tuple[str, ...]  # after `doveadm`
    user: str
    secrets: tuple[str, ...] = field(default=(), repr=False)  # scrubbed from any error text
    long: bool = False  # a copy: may run for as long as the pass timeout allows


def backup_from_old_server(user: str) -> Command:
    """`backup -R imapc:`: make the store mailbox an exact copy of the old server's."""
    return Command("backup", {"user": user, "destination": ["imapc:"], "reverseSync": True},
                   ("backup", "-R", "-u", user, "imapc:"), user, long=True)


def mailbox_status(user: str, fields: Sequence[str], mask: str = "*") -> Command:
    return Command("mailboxStatus",
                   {"user": user, "field": list(fields), "mailboxMask": [mask]},
                   ("-f", "tab", "mailbox", "status", "-u", user, " ".join(fields), mask), user)


def mailbox_update(user: str, mailbox: str, uid_validity: int, guid: str) -> Command:
    return Command("mailboxUpdate",
                   {"user": user, "mailbox": mailbox, "uidValidity": str(uid_validity),
                    "mailboxGuid": guid},
                   ("mailbox", "update", "-u", user, "--uid-validity", str(uid_validity),
                    "--mailbox-guid", guid, mailbox), user)


class Doveadm(Protocol):
    def run(self, command: Command, timeout: float | None = None) -> list[dict[str, str]]:
        """Run command; its result rows (field -> value). DoveadmFailed otherwise.

        `timeout` replaces the transport's own for this call (a final pass inside the
        switch hold must not outlive the hold)."""


def describe_exit(code: int) -> str:
    return f"exit code {code}: {EXIT_MEANINGS.get(code, 'failed')}"


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_REASON else text[:MAX_REASON] + "..."


def _scrub(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


class HttpDoveadm:
    """The store's doveadm HTTP API (`service doveadm { inet_listener http {} }`).

    The API takes no settings per call (no `-o`): everything a command needs for a user comes
    from the store's configuration and userdb (see deploy/dovecot/).
    """

    def __init__(self, url: str, api_key: str, timeout: float, pass_timeout: float) -> None:
        self.url = url
        self._auth = "X-Dovecot-API " + base64.b64encode(api_key.encode()).decode()
        self.timeout = timeout
        self.pass_timeout = pass_timeout

    def run(self, command: Command, timeout: float | None = None) -> list[dict[str, str]]:
        started = int(time.time())
        timeout = timeout or (self.pass_timeout if command.long else self.timeout)
        try:
            reply = self._post([[command.name, command.params, "mp"]], timeout)
        except DoveadmFailed as exc:
            if exc.exit_code is None and "without an answer" in str(exc):
                raise DoveadmFailed(self._with_log(str(exc), started, command)) from None
            raise
        kind, body, _tag = reply[0]
        if kind == "doveadmResponse":
            return [{k: str(v) for k, v in row.items()} for row in body or []]
        code = body.get("exitCode") if isinstance(body, dict) else None
        what = describe_exit(code) if isinstance(code, int) else f"error {body!r}"
        reason = f"doveadm {command.argv[0]} for {command.user}: {what}"
        raise DoveadmFailed(self._with_log(reason, started, command), code)

    def recent_errors(self, since: int) -> list[str]:
        """The store's errors logged since `since` (Unix time), oldest first."""
        reply = self._post([["logErrors", {"since": since}, "log"]], self.timeout)
        kind, body, _tag = reply[0]
        if kind != "doveadmResponse":
            return []
        # Panics and their backtraces say where Dovecot crashed, not why: the Error before
        # them ("missing imapc_password") is the reason.
        return [f"{row.get('prefix', '')}: {row.get('text', '')}" for row in body or []
                if row.get("type") in ("Error", "Fatal")
                and not str(row.get("text", "")).startswith("Raw backtrace")]

    def _with_log(self, reason: str, since: int, command: Command) -> str:
        try:
            errors = self.recent_errors(since - 1)
        except DoveadmFailed:
            errors = []
        mine = [e for e in errors if command.user in e] or errors
        if not mine:
            return reason
        return _scrub(_clip(f"{reason}; the store logged: {' | '.join(mine[-3:])}"),
                      command.secrets)

    def _post(self, body: list[list[Any]], timeout: float) -> list[list[Any]]:
        request = urllib.request.Request(
            self.url, data=json.dumps(body).encode(), method="POST",
            headers={"Authorization": self._auth, "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                answer = json.loads(response.read())
        except TimeoutError:
            # Dovecot 2.3 logs a wrong key and never answers: say so, it is the usual cause.
            raise DoveadmFailed(
                f"no answer from the doveadm HTTP API at {self.url} within {timeout:g} s "
                f"(Dovecot does not answer a wrong API key at all: check "
                f"backend.doveadm_api_key_file)") from None
        except urllib.error.HTTPError as exc:
            hint = " (the API key is refused)" if exc.code in (401, 403) else ""
            raise DoveadmFailed(f"doveadm HTTP API at {self.url}: HTTP {exc.code}{hint}") from None
        except (http.client.RemoteDisconnected, ConnectionResetError):
            raise DoveadmFailed(
                f"doveadm HTTP API at {self.url} closed the connection without an answer "
                f"(the store's doveadm process died)") from None
        except (urllib.error.URLError, OSError) as exc:
            why = getattr(exc, "reason", exc)
            raise DoveadmFailed(f"cannot reach the doveadm HTTP API at {self.url}: {why}") from None
        except ValueError:
            raise DoveadmFailed(f"doveadm HTTP API at {self.url}: not a JSON answer") from None
        if not isinstance(answer, list) or not answer or len(answer[0]) != 3:
            raise DoveadmFailed(f"doveadm HTTP API at {self.url}: unexpected answer")
        return answer


class LocalDoveadm:
    """The `doveadm` command on the store's own host (the proxy runs beside Dovecot)."""

    def __init__(self, command: str, timeout: float, pass_timeout: float) -> None:
        self.base = shlex.split(command) or ["doveadm"]
        self.timeout = timeout
        self.pass_timeout = pass_timeout

    def run(self, command: Command, timeout: float | None = None) -> list[dict[str, str]]:
        argv = [*self.base, *command.argv]
        timeout = timeout or (self.pass_timeout if command.long else self.timeout)
        try:
            done = subprocess.run(argv, capture_output=True, text=True, errors="replace",
                                  timeout=timeout, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise DoveadmFailed(f"cannot run {self.base[0]}: no such program") from None
        except subprocess.TimeoutExpired:
            raise DoveadmFailed(
                f"doveadm {command.argv[0]} for {command.user}: no answer after "
                f"{timeout:g} s") from None
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines()
                     if any(w in line for w in ("Error", "Fatal", "Panic"))]
            said = "; ".join(lines[-3:]) or done.stderr.strip()
            reason = f"doveadm {command.argv[0]} for {command.user}: " \
                     f"{describe_exit(done.returncode)}"
            if said:
                reason += f"; {said}"
            raise DoveadmFailed(_scrub(_clip(reason), command.secrets), done.returncode)
        return _parse_tab(done.stdout) if "tab" in command.argv[:2] else []


def _parse_tab(text: str) -> list[dict[str, str]]:
    """`doveadm -f tab` output: a header line of field names, then one line per row."""
    lines = text.splitlines()
    if not lines:
        return []
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"), strict=False)) for line in lines[1:] if line]


def from_settings(url: str, api_key_file: Path | None, command: str,
                  timeout: float, pass_timeout: float) -> Doveadm:
    """The HTTP API when a URL is configured, else the local command."""
    if url:
        if api_key_file is None:
            raise DoveadmFailed("backend.doveadm_url is set but backend.doveadm_api_key_file "
                                "is not")
        try:
            key = api_key_file.read_text().strip()
        except OSError as exc:
            raise DoveadmFailed(f"cannot read {api_key_file}: {exc.strerror}") from None
        return HttpDoveadm(url, key, timeout, pass_timeout)
    return LocalDoveadm(command, timeout, pass_timeout)
