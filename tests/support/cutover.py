"""What the transparent cutover's end-to-end tests share: a user with a seeded mailbox at the old
server and views of both servers, a proxy whose domain is passthrough, mail through its SMTP
front-end, worker processes started and stopped as an operator (or a crash) would, and the log.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import secrets
import signal
import smtplib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import sqlalchemy
from imapclient import IMAPClient

from migrating_proxy.failpoints import ENV_VAR as FAILPOINTS
from tests.support.dovecot import DovecotInstance, free_port
from tests.support.mail import (
    SeedMessage,
    Snapshot,
    add_old_user,
    imap_login,
    make_message,
    sample_corpus,
    seed_mailbox,
    snapshot_folders,
)
from tests.support.proxy import Proxy

MOVED = b"Your mailbox has moved to a new mail server"
MOVING = b"Your mailbox is moving to a new mail server"
NY = dt.timezone(dt.timedelta(hours=-5))
_users = itertools.count()


class User:
    """A user of the old server with a seeded mailbox, and their views of both servers."""

    def __init__(self, old: DovecotInstance, store: DovecotInstance,
                 domain: str = "old.example") -> None:
        self.old, self.store = old, store
        self.address = f"user{next(_users)}-{secrets.token_hex(3)}@{domain}"
        self.password = "pw-" + secrets.token_hex(6)
        add_old_user(old, self.address, self.password)
        seed_mailbox(old.host, old.imap_port, self.address, self.password, sample_corpus())

    def at_old(self) -> IMAPClient:
        return imap_login(self.old, self.address, self.password)

    def at_store(self) -> IMAPClient:
        return imap_login(self.store, self.address)

    def old_snapshot(self) -> Snapshot:
        with self.at_old() as client:
            return snapshot_folders(client)

    def store_snapshot(self) -> Snapshot:
        with self.at_store() as client:
            return snapshot_folders(client)

    def change_something(self, subject: str, client: IMAPClient | None = None) -> None:
        """A day's work at the old server (directly, or through `client`, a session the proxy
        relays there): flags, an expunge, a move, a folder, new mail."""
        if client is None:
            with self.at_old() as direct:
                self.change_something(subject, direct)
            return
        client.append("INBOX", message(subject).raw)
        client.select_folder("INBOX")
        uids = sorted(client.search("ALL"))
        assert len(uids) >= 4
        client.move(uids[0:1], "Archive/2024")  # the oldest ones: new mail stays put
        client.add_flags(uids[1:2], [r"\Deleted"])
        client.uid_expunge(uids[1:2])
        client.add_flags(uids[2:3], [r"\Flagged", "$label1"])
        client.remove_flags(uids[3:4], [r"\Seen"])
        folder = f"Made {secrets.token_hex(2)}"
        client.create_folder(folder)
        client.append(folder, message(subject + " filed").raw, [r"\Seen"])

    def has_message(self, at: str, needle: str) -> bool:
        with (self.at_old() if at == "old" else self.at_store()) as client:
            client.select_folder("INBOX", readonly=True)
            return bool(client.search(["SUBJECT", needle]))


def message(subject: str) -> SeedMessage:
    when = dt.datetime(2025, 6, 1, 12, 0, tzinfo=NY)
    return SeedMessage(make_message(subject, f"{subject}\n", when), (), when)


def without(snapshot: Snapshot, subject: bytes) -> Snapshot:
    return {**snapshot, "INBOX": [m for m in snapshot.get("INBOX", []) if subject not in m[0]]}


def count(snapshot: Snapshot, subject: bytes) -> int:
    return sum(subject in m[0] for m in snapshot.get("INBOX", []))


def last_in_inbox(user: User) -> bytes:
    with user.at_store() as client:
        client.select_folder("INBOX", readonly=True)
        newest = max(client.search("ALL"))
        return client.fetch([newest], ["BODY.PEEK[]"])[newest][b"BODY[]"]


def passthrough_proxy(directory: Path, old: DovecotInstance, store: DovecotInstance, *,
                      workers: int = 0, overrides: dict[str, dict[str, Any]] | None = None,
                      add_domain: bool = True) -> Proxy:
    """A proxy (not started) with old.example as a passthrough domain (the default mode) whose
    old server offers IMAP and POP3, its SMTP front-end relaying there."""
    smtp_port = free_port()
    sections: dict[str, dict[str, Any]] = {
        "listen": {"smtp": f"127.0.0.1:{smtp_port}"},
        "backend": {"delivery": f"lmtp://127.0.0.1:{store.lmtp_port}"},
        "migration": {"workers": workers},
    }
    for section, values in (overrides or {}).items():
        sections[section] = {**sections.get(section, {}), **values}
    proxy = Proxy(directory, store, overrides=sections)
    proxy.ports["smtp"] = smtp_port
    if add_domain:
        proxy.cli("domain", "add", "old.example", "--source", f"imap://127.0.0.1:{old.imap_port}",
                  "--source", f"pop3://127.0.0.1:{old.pop3_port}",
                  "--relay", f"lmtp://127.0.0.1:{old.lmtp_port}")
    return proxy


def send(proxy: Proxy, recipient: str, subject: str) -> None:
    body = make_message(subject, "mail flow\n", dt.datetime(2025, 6, 2, tzinfo=NY))
    with smtplib.SMTP("127.0.0.1", proxy.ports["smtp"], timeout=30) as smtp:
        smtp.sendmail("sender@elsewhere.example", [recipient], body)


def worker(proxy: Proxy, *failpoints: str) -> subprocess.Popen[bytes]:
    """One copy worker process (the pool's own entry point), with crash points armed."""
    code = ("import sys\nfrom migrating_proxy import config, worker\n"
            "worker.worker_main(config.load(sys.argv[1]), 0)\n")
    return spawn(proxy, ["-c", code, str(proxy.config_path)], {FAILPOINTS: ",".join(failpoints)})


def pool(proxy: Proxy) -> subprocess.Popen[bytes]:
    """`migrating-proxy worker`, as an operator restarts it after a crash."""
    return spawn(proxy, ["-m", "migrating_proxy", "--config", str(proxy.config_path), "worker",
                         "--processes", "1"])


def spawn(proxy: Proxy, arguments: list[str], env: dict[str, str] | None = None
          ) -> subprocess.Popen[bytes]:
    with proxy.log_path.open("ab") as log:
        return subprocess.Popen([sys.executable, *arguments], stdout=log, stderr=log,
                                env={**os.environ, **(env or {})})


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def import_and_migrate(proxy: Proxy, user: User, tmp_path: Path) -> None:
    users = tmp_path / f"{user.address}.csv"
    users.write_text(f"{user.address},{user.password}\n")
    proxy.cli("import", str(users))
    assert json.loads(proxy.cli("migrate", user.address, "--json").stdout)[0]["result"] == \
        "queued"


def work_until_settled(proxy: Proxy, address: str, timeout: float = 60) -> dict[str, Any]:
    """Run `migrating-proxy worker` until the account's passes are over (no job left); the
    status row then."""
    workers = pool(proxy)
    try:
        deadline = time.monotonic() + timeout
        while True:
            [row] = proxy.status(address)
            if row["state"] in ("COMPLETED", "ERROR") and row["job_state"] is None:
                return row
            assert time.monotonic() < deadline, (row, proxy.log_text()[-3000:])
            time.sleep(0.3)
    finally:
        stop(workers)


def vault_entries(proxy: Proxy) -> int:
    engine = sqlalchemy.create_engine(f"sqlite:///{proxy.directory / 'proxy.db'}")
    try:
        with engine.connect() as conn:
            return int(conn.execute(sqlalchemy.text("SELECT count(*) FROM vault")).scalar_one())
    finally:
        engine.dispose()


def events(proxy: Proxy, name: str) -> list[dict[str, Any]]:
    found = []
    for line in proxy.log_text().splitlines():
        if f'"event": "{name}"' in line:
            found.append(json.loads(line))
    return found


