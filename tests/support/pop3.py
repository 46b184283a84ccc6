"""POP3 clients that leave mail on the server, as the continuity tests (issue 10) use them:
real fetchmail with `keep` and its UIDL file, and a poplib client that remembers UIDLs the way
Thunderbird or a phone does."""

from __future__ import annotations

import os
import poplib
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from tests.support.dovecot import DovecotInstance
from tests.support.mail import can_log_in

HOST = "127.0.0.1"
# Dovecot's `%g`: the Maildir file name, a UIDL that reveals no IMAP UID (escaped for the
# passwd-file, which expands variables in its fields).
OPAQUE_UIDLS = "%%g"


def add_user_with_uidl_format(old: DovecotInstance, address: str, password: str,
                              uidl_format: str = OPAQUE_UIDLS) -> None:
    """A user of the old server whose POP3 UIDLs have a format of their own (a userdb field
    from the passwd-file), once the user can log in."""
    with old.users_file.open("a") as users:
        users.write(f"{address}:{{PLAIN}}{password}::::::userdb_pop3_uidl_format={uidl_format}\n")
    deadline = time.monotonic() + 5
    while not can_log_in(old.imap_port, address, password):
        assert time.monotonic() < deadline, f"{address} cannot log in to the old server"
        time.sleep(0.2)


class Listed(NamedTuple):
    number: int
    uidl: str
    size: int


def pop3_login(port: int, login: str, password: str) -> poplib.POP3:
    client = poplib.POP3(HOST, port, timeout=30)
    client.user(login)
    client.pass_(password)
    return client


def pop3_listing(port: int, login: str, password: str) -> list[Listed]:
    """The UIDL and LIST answers together, in the server's order."""
    client = pop3_login(port, login, password)
    try:
        sizes = dict(line.split()[:2] for line in client.list()[1])
        return [Listed(int(n), uidl.decode(), int(sizes[n]))
                for n, uidl in (line.split()[:2] for line in client.uidl()[1])]
    finally:
        client.quit()


@dataclass
class LeaveOnServer:
    """A poplib client with "leave messages on server": downloads what it has not seen."""

    login: str
    password: str
    seen: set[str] = field(default_factory=set)

    def poll(self, port: int) -> list[bytes]:
        client = pop3_login(port, self.login, self.password)
        new = []
        try:
            for line in client.uidl()[1]:
                number, uidl = line.decode().split()[:2]
                if uidl not in self.seen:
                    new.append(b"\r\n".join(client.retr(int(number))[1]) + b"\r\n")
                    self.seen.add(uidl)
        finally:
            client.quit()
        return new


class Fetchmail:
    """fetchmail with `keep` and `uidl`: its UIDL file (`--idfile`) says what it already has.

    Each message is delivered by an MDA script into its own file below `directory/mail`."""

    def __init__(self, directory: Path, login: str, password: str) -> None:
        self.directory, self.login, self.password = directory, login, password
        self.mail = directory / "mail"
        self.mail.mkdir(parents=True)
        self.mda = directory / "deliver"
        self.mda.write_text(f'#!/bin/sh\nexec cat > "$(mktemp {self.mail}/msg.XXXXXXXX)"\n')
        self.mda.chmod(0o755)
        self.idfile = directory / "fetchids"

    def run(self, port: int) -> list[bytes]:
        """One poll of `port`; the messages it downloaded."""
        before = set(self.mail.iterdir())
        rc = self.directory / "fetchmailrc"
        rc.write_text(f'poll {HOST} service {port} protocol pop3 uidl auth password\n'
                      f'  user "{self.login}" there with password "{self.password}"\n'
                      f'  keep mda "{self.mda}"\n')
        rc.chmod(0o600)  # fetchmail refuses a run control file others can read
        done = subprocess.run(
            ["fetchmail", "-f", str(rc), "--idfile", str(self.idfile), "--nosyslog", "-N",
             "--sslproto", ""],
            capture_output=True, text=True, timeout=120,
            env={**os.environ, "FETCHMAILHOME": str(self.directory), "HOME": str(self.directory)})
        # 0: mail was retrieved; 1: there was none.
        assert done.returncode in (0, 1), done.stdout + done.stderr
        return [path.read_bytes() for path in sorted(set(self.mail.iterdir()) - before)]
