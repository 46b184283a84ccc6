"""The transparent cutover end to end (issue 9): a real Dovecot old server and store, the proxy's
CLI, `serve` and its copy workers as an operator runs them.

An account of a passthrough domain is served by the old server until its copy is complete;
its mail goes there too. Then the switch: a final mirror pass inside the hold, the flip, and
the "your mailbox has moved" notice after it. kill -9 of the worker at each point of the
switch leaves the account on one side only, and a restart finishes the job exactly.
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

import pytest
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


@pytest.fixture
def old(module_old: DovecotInstance) -> DovecotInstance:
    return module_old


@pytest.fixture
def store(module_store: DovecotInstance) -> DovecotInstance:
    return module_store


class User:
    """A user of the old server with a seeded mailbox, and their views of both servers."""

    def __init__(self, old: DovecotInstance, store: DovecotInstance) -> None:
        self.old, self.store = old, store
        self.address = f"user{next(_users)}-{secrets.token_hex(3)}@old.example"
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

    def change_something(self, subject: str) -> None:
        """A day's work at the old server: flags, an expunge, a move, a folder, new mail."""
        with self.at_old() as client:
            client.append("INBOX", _message(subject).raw)
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
            client.append(folder, _message(subject + " filed").raw, [r"\Seen"])

    def has_message(self, at: str, needle: str) -> bool:
        with (self.at_old() if at == "old" else self.at_store()) as client:
            client.select_folder("INBOX", readonly=True)
            return bool(client.search(["SUBJECT", needle]))


def _message(subject: str) -> SeedMessage:
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


def passthrough_proxy(directory: Path, old: DovecotInstance, store: DovecotInstance,
                      **migration: Any) -> Proxy:
    smtp_port = free_port()
    proxy = Proxy(directory, store, overrides={
        "listen": {"smtp": f"127.0.0.1:{smtp_port}"},
        "backend": {"delivery": f"lmtp://127.0.0.1:{store.lmtp_port}"},
        "migration": {"workers": 0, **migration},
    })
    proxy.ports["smtp"] = smtp_port
    proxy.cli("domain", "add", "old.example", "--source", f"imap://127.0.0.1:{old.imap_port}",
              "--relay", f"lmtp://127.0.0.1:{old.lmtp_port}")  # passthrough: the default
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


# --- served by the old server until the switch --------------------------------------------


def test_passthrough_account_is_served_by_the_old_server_until_its_switch(
        old: DovecotInstance, store: DovecotInstance, tmp_path: Path) -> None:
    user = User(old, store)
    proxy = passthrough_proxy(tmp_path / "proxy", old, store)
    with proxy:
        with IMAPClient("127.0.0.1", proxy.imap_port, ssl=False, timeout=30) as client:
            client.login(user.address, user.password)  # the first login: account, job
        [row] = proxy.status(user.address)
        assert (row["state"], row["served_by"], row["switched_at"]) == ("PENDING", "old", None)

        # Mail follows the account: to the old server while it serves it.
        send(proxy, user.address, "before the switch")
        assert user.has_message("old", "before the switch")
        user.change_something("changed at the old server")

        row = work_until_settled(proxy, user.address)
        assert row["state"] == "COMPLETED" and row["served_by"] == "store", row
        assert row["switched_at"] is not None and row["last_error"] is None

        final = user.old_snapshot()
        moved = user.store_snapshot()
        assert without(moved, MOVED) == final  # every folder, message, flag and date
        assert count(moved, MOVED) == 1 and count(moved, MOVING) == 0
        assert MOVED in last_in_inbox(user)  # put in after the final pass
        assert count(moved, b"before the switch") == 1  # relayed there, copied once

        send(proxy, user.address, "after the switch")  # and now to the store
        assert user.has_message("store", "after the switch")
        assert not user.has_message("old", "after the switch")
    [done] = events(proxy, "switch_done")
    assert 0 < done["hold_seconds"] < 10
    assert vault_entries(proxy) == 0  # the password went with the switch
    assert user.password not in proxy.log_text()


def test_immediate_domain_keeps_today_s_behaviour(old: DovecotInstance, store: DovecotInstance,
                                                  tmp_path: Path) -> None:
    """No switch: served by the store from the first login, the "moving" notice first."""
    user = User(old, store)
    proxy = passthrough_proxy(tmp_path / "proxy", old, store)
    proxy.cli("domain", "set", "old.example", "--cutover", "immediate")
    import_and_migrate(proxy, user, tmp_path)
    [row] = proxy.status(user.address)
    assert row["served_by"] == "store"
    row = work_until_settled(proxy, user.address)
    assert (row["state"], row["served_by"], row["switched_at"]) == ("COMPLETED", "store", None)
    copied = user.store_snapshot()
    assert count(copied, MOVING) == 1 and count(copied, MOVED) == 0
    assert without(copied, MOVING) == user.old_snapshot()
    assert events(proxy, "switch_done") == []


# --- crash safety ---------------------------------------------------------------------------


@pytest.mark.parametrize("point", ["switch.held", "switch.final_pass_done", "switch.switched"])
def test_kill_9_of_the_worker_during_the_switch_leaves_one_side_and_restarts_exactly(
        old: DovecotInstance, store: DovecotInstance, tmp_path: Path, point: str) -> None:
    user = User(old, store)
    proxy = passthrough_proxy(tmp_path / "proxy", old, store)
    import_and_migrate(proxy, user, tmp_path)
    user.change_something("before the crash")

    crashed = worker(proxy, point)
    assert crashed.wait(timeout=60) == -signal.SIGKILL, proxy.log_text()[-3000:]
    [row] = proxy.status(user.address)
    if point == "switch.switched":
        # Flipped: wholly on the store, which holds the final state; the notice is owed, and
        # the pass that switched it did not complete.
        assert (row["served_by"], row["state"]) == ("store", "PENDING")
        assert without(user.store_snapshot(), MOVED) == user.old_snapshot()
        assert count(user.store_snapshot(), MOVED) == 0
        user.change_something("after the crash")  # mail still arriving at the old server
    else:
        # Not flipped: wholly on the old server; its hold runs out by itself.
        assert (row["served_by"], row["state"], row["switched_at"]) == ("old", "PENDING", None)
        user.change_something("after the crash")

    row = work_until_settled(proxy, user.address)  # `worker` restarted after the crash
    assert row["served_by"] == "store" and row["switched_at"] is not None
    moved = user.store_snapshot()
    assert count(moved, MOVED) == 1
    if point == "switch.switched":
        # After the switch the store is the user's mailbox: new mail at the old server is
        # still collected, the old server's other changes no longer matter.
        assert count(moved, b"after the crash") == 1
    else:
        assert without(moved, MOVED) == user.old_snapshot()
        assert MOVED in last_in_inbox(user)


# --- finish ---------------------------------------------------------------------------------


def test_finish_switches_every_account_before_it_turns_migration_off(
        old: DovecotInstance, store: DovecotInstance, tmp_path: Path) -> None:
    moving, never = User(old, store), User(old, store)
    proxy = passthrough_proxy(tmp_path / "proxy", old, store)
    import_and_migrate(proxy, moving, tmp_path)  # a pass queued, not run yet
    users = tmp_path / "never.csv"
    users.write_text(f"{never.address},{never.password}\n")
    proxy.cli("import", str(users))  # imported, never migrated
    assert [r["served_by"] for r in proxy.status(moving.address, never.address)] == [
        "old", "old"]
    workers = pool(proxy)
    try:
        report = json.loads(proxy.cli("finish", "old.example", "--yes", "--json").stdout)
    finally:
        stop(workers)
    assert report["migrated"] == [moving.address]
    assert report["never_migrated"] == [never.address]
    assert report["switched_without_final_pass"] == [never.address]
    rows = {r["address"]: r for r in proxy.status(moving.address, never.address)}
    assert {r["served_by"] for r in rows.values()} == {"store"}
    assert rows[never.address]["state"] == "NEW"  # switched as it was, reported
    assert without(moving.store_snapshot(), MOVED) == moving.old_snapshot()
    domain = json.loads(proxy.cli("domain", "list", "--json").stdout)[0]
    assert domain["migrating"] is False
