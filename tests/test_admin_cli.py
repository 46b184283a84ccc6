"""The admin commands end to end: a real old server with 21 users, a real new store, the real
proxy (`serve` with copy workers) and the CLI run as a subprocess, the way an admin runs it.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import select
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from imapclient import IMAPClient

from migrating_proxy.failpoints import ENV_VAR as FAILPOINTS
from tests.support import dovecot
from tests.support.dovecot import DovecotInstance, free_port
from tests.support.mail import (
    SeedMessage,
    can_log_in,
    make_message,
    sample_corpus,
    seed_mailbox,
    write_maildir,
)
from tests.support.proxy import Proxy
from tests.test_migration_login import snapshot, store_snapshot, without_notice

DOMAIN = "old.example"
HEADER = "login_source;pass_source;host_source;type_messagerie;login_destination;subscribed_only"
USERS = {f"user{n:02d}@{DOMAIN}": f"pw-{n:02d}-Zq8vK" for n in range(1, 22)}
STRANGER, STRANGER_PW = f"zed@{DOMAIN}", "zed-pw-Zq8vK"  # at the old server, never imported
WRONG = {f"user{n:02d}@{DOMAIN}": f"wrong-{n:02d}-Zq8vK" for n in (3, 7, 11)}
UNREACHABLE = f"user15@{DOMAIN}"
MAPPED_FROM, MAPPED_TO = f"user20@{DOMAIN}", f"twenty@{DOMAIN}"  # an address map
LATE = f"user21@{DOMAIN}"  # imported after `migrate --all`: never migrated


def messages_of(n: int) -> dict[str, list[SeedMessage]]:
    when = datetime(2024, 1, 1, 9, 0, tzinfo=UTC) + timedelta(days=n)
    return {"INBOX": [SeedMessage(make_message(f"Message {i} for user {n}", f"body {i}\n",
                                               when + timedelta(hours=i)), ("\\Seen",), when)
                      for i in range(n % 4 + 1)],
            "Archive": [SeedMessage(make_message(f"Archived {n}", "old\n", when), (), when)]}


@pytest.fixture
def old21() -> Iterator[DovecotInstance]:
    root = dovecot.instance_root("mp-old21-")
    try:
        with dovecot.old_server(root, {**USERS, STRANGER: STRANGER_PW}) as instance:
            seed_mailbox("127.0.0.1", instance.imap_port, "user01@old.example",
                         USERS["user01@old.example"], sample_corpus())
            for n, (address, password) in enumerate(USERS.items(), start=1):
                if n > 1:
                    seed_mailbox("127.0.0.1", instance.imap_port, address, password,
                                 messages_of(n))
            yield instance
    finally:
        dovecot.remove_root(root)


def admin_proxy(directory: Path, store: DovecotInstance, old: DovecotInstance,
                workers: int = 2, **migration: Any) -> Proxy:
    smtp_port = free_port()
    proxy = Proxy(directory, store, overrides={
        "migration": {"workers": workers, **migration},
        "listen": {"smtp": f"127.0.0.1:{smtp_port}"},
        "backend": {"delivery": f"lmtp://127.0.0.1:{store.lmtp_port}"},
    })
    proxy.ports["smtp"] = smtp_port
    proxy.cli("domain", "add", DOMAIN, "--source", f"imap://127.0.0.1:{old.imap_port}",
              "--cutover", "immediate")
    return proxy


def rcpt_code(port: int, recipient: str) -> int:
    """What the proxy's inbound SMTP answers for a recipient (the MX's view)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.ehlo("sender.example")
        smtp.mail("someone@sender.example")
        return smtp.rcpt(recipient)[0]


def hosted_csv(path: Path, old: DovecotInstance) -> Path:
    """The hosted tools' layout, UTF-8 with BOM and CRLF, as their exports come."""
    lines = [HEADER]
    for address, password in USERS.items():
        if address == LATE:
            continue
        host = f"127.0.0.1:{free_port()}" if address == UNREACHABLE else ""
        target = MAPPED_TO if address == MAPPED_FROM else ""
        lines.append(f"{address};{WRONG.get(address, password)};{host};default;{target};False")
    path.write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n").encode())
    return path


class Transcript:
    """Every CLI output of a test, for the "no password anywhere" check."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.outputs: list[str] = []

    def run(self, *args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
        result = self.proxy.cli(*args, check=False)
        self.outputs += [result.stdout, result.stderr]
        assert result.returncode == code, (args, result.stdout, result.stderr)
        return result

    def json(self, *args: str, code: int = 0) -> Any:
        return json.loads(self.run(*args, "--json", code=code).stdout)




def add_mail(old: DovecotInstance, address: str, subject: str) -> None:
    client = IMAPClient("127.0.0.1", old.imap_port, ssl=False)
    client.login(address, USERS[address])
    client.append("INBOX", make_message(subject, "late\n", datetime(2025, 6, 1, tzinfo=UTC)))
    client.logout()


def test_import_migrate_resync_finish_export(tmp_path: Path, new_store: DovecotInstance,
                                             old21: DovecotInstance) -> None:
    proxy = admin_proxy(tmp_path / "proxy", new_store, old21)
    cli = Transcript(proxy)
    csv_file = hosted_csv(tmp_path / "users.csv", old21)

    # Import: a dry run changes nothing, the real one creates NEW accounts, hash pending.
    assert cli.json("import", str(csv_file), "--dry-run")["created"] == 20
    assert cli.json("account", "list") == []
    assert cli.json("import", str(csv_file)) | {"file": None} == {
        "file": None, "dry_run": False, "created": 20, "updated": 0}
    assert {row["migration_state"] for row in cli.json("account", "list")} == {"NEW"}

    with proxy:
        # Migrate everybody: credentials checked first, failures ERROR at once, exit 1.
        rows = {row["address"]: row for row in cli.json("migrate", "--all", "--wait", code=1)}
        assert "\x1b" not in json.dumps(rows)  # no progress display when piped
        failed = {a for a, row in rows.items() if row["state"] == "ERROR"}
        assert failed == {*WRONG, UNREACHABLE}
        assert all(rows[a]["result"] == "error" for a in failed)
        assert all(row["state"] == "COMPLETED" for a, row in rows.items() if a not in failed)
        status = {row["address"]: row for row in cli.json("status", "--domain", DOMAIN)}
        table = cli.run("status", "--domain", DOMAIN, "--watch").stdout.splitlines()
        assert table[0].split() == ["address", "state", "progress", "last_error", "last_pass"]
        assert len(table) == 21  # piped: the table once, no redrawing
        assert status["user03@old.example"]["last_error"] == "the old server refused the password"
        assert status[UNREACHABLE]["last_error"].startswith("old server unreachable")
        for address in ("user01@old.example", "user09@old.example"):
            assert without_notice(store_snapshot(new_store, address)) == \
                snapshot(old21.imap_port, address, USERS[address])
        assert without_notice(store_snapshot(new_store, MAPPED_TO)) == \
            snapshot(old21.imap_port, MAPPED_FROM, USERS[MAPPED_FROM])
        # The worker made the real hash: the user's password works at the store directly.
        assert can_log_in(new_store.imap_port, "user02@old.example", USERS["user02@old.example"])

        # The minimal form, for one more user; it stays NEW (nobody migrates it).
        minimal = tmp_path / "late.csv"
        minimal.write_text(f"address,password\n{LATE},{USERS[LATE]}\n")
        assert cli.json("import", str(minimal))["created"] == 1

        # Resync: the completed pass erased the password, so it must be supplied again.
        add_mail(old21, "user02@old.example", "Arrived after the migration")
        skipped = cli.json("resync", "user02@old.example")
        assert skipped[0]["result"] == "skipped" and "no stored password" in skipped[0]["reason"]
        again = tmp_path / "again.csv"
        again.write_text(f"user02@old.example,{USERS['user02@old.example']}\n")
        assert cli.json("import", str(again))["updated"] == 1
        resynced = cli.json("resync", "user02@old.example", "--wait")
        assert resynced[0]["result"] == "queued" and resynced[0]["state"] == "COMPLETED"
        assert without_notice(store_snapshot(new_store, "user02@old.example")) == \
            snapshot(old21.imap_port, "user02@old.example", USERS["user02@old.example"])

        assert cli.run("finish", "nope.example", "--yes", code=1).stderr.count("\n") == 1
        # Before the cut-over, mail for a user not seen yet belongs to the old server (no
        # relay configured here, so: try later); afterwards, nobody of that name exists.
        assert rcpt_code(proxy.ports["smtp"], STRANGER) == 451
        report = cli.json("finish", DOMAIN, "--yes")
        # After the cut-over an unknown user of the domain is refused; migrated ones are not.
        assert not can_log_in(proxy.imap_port, STRANGER, STRANGER_PW)
        assert can_log_in(proxy.imap_port, "user01@old.example", USERS["user01@old.example"])
        assert rcpt_code(proxy.ports["smtp"], STRANGER) == 550
        assert rcpt_code(proxy.ports["smtp"], "user01@old.example") == 250

    migrated = sorted(set(USERS) - failed - {LATE, MAPPED_FROM} | {MAPPED_TO})
    assert sorted(report["migrated"]) == migrated
    assert sorted(e["address"] for e in report["errors"]) == sorted(failed)
    assert report["never_migrated"] == [LATE]
    assert report["messages_copied"] == sum(status[a]["messages_copied"] for a in migrated) + 1
    assert report["messages_skipped"] == 0 and report["skipped_reasons"] == {}
    assert report["vault_entries_erased"] == 1  # the unreachable user's; LATE's is kept
    assert not cli.json("domain", "list")[0]["migrating"]

    exported = cli.run("export", DOMAIN, "--format", "dovecot-passwd").stdout.splitlines()
    assert len(exported) == 21
    assert f"{LATE}:{{SHA512-CRYPT}}!" in exported
    assert any(line.startswith("user01@old.example:{SHA512-CRYPT}$6$") for line in exported)
    csv_rows = cli.run("export", DOMAIN, "--format", "csv").stdout.splitlines()
    assert csv_rows[0] == "address,password_hash,migration_state,password_known"
    assert len(csv_rows) == 22

    everything = "".join(cli.outputs) + proxy.log_text()
    database = (proxy.directory / "proxy.db").read_bytes()
    for password in [*USERS.values(), *WRONG.values()]:
        assert password not in everything and password.encode() not in database
    assert '"event": "admin_action"' in proxy.log_text() and '"action": "finish"' in \
        proxy.log_text()


def test_bad_input_is_one_line_and_imports_nothing(tmp_path: Path,
                                                   module_store: DovecotInstance) -> None:
    proxy = Proxy(tmp_path / "proxy", module_store)
    proxy.cli("domain", "add", DOMAIN, "--source", "imap://127.0.0.1:143",
              "--cutover", "immediate")
    cli = Transcript(proxy)
    bad = tmp_path / "bad.csv"
    bad.write_text(f"{HEADER}\nok@{DOMAIN};pw-ok-Zq8vK;;;;\nx@other.example;pw-x-Zq8vK;;;;\n"
                   f"y@{DOMAIN};;;;;\n")
    result = cli.run("import", str(bad), code=1)
    assert result.stderr.splitlines() == [
        f"{bad}: line 3: login_source: domain other.example is not configured "
        "(migrating-proxy domain add)",
        f"{bad}: line 4: pass_source: empty password",
        f"migrating-proxy: error: {bad}: 2 bad line(s); nothing imported",
    ]
    assert cli.json("account", "list") == []
    assert "pw-ok-Zq8vK" not in "".join(cli.outputs) + proxy.log_text()
    for args in (("import", str(tmp_path / "missing.csv")), ("migrate", "ghost@old.example"),
                 ("stop", "--domain", "nope.example"), ("migrate",),
                 ("status", "--domain", "nope.example"), ("export", "nope.example",
                                                          "--format", "csv")):
        stderr = cli.run(*args, code=1).stderr
        assert stderr.startswith("migrating-proxy: error: ") and stderr.count("\n") == 1, args
    proxy.overrides = {"database": {"url": "sqlite:////proc/no-such-dir/proxy.db"}}
    proxy.write_config()
    assert cli.run("status", code=1).stderr.startswith("migrating-proxy: error: ")


BIG_FOLDER_MESSAGES = 2000  # per folder: 20 batches each


def seed_big_mailbox(old: DovecotInstance, address: str) -> int:
    """Two folders of small messages, half of them \\Seen, written straight into the old
    server's maildir (APPENDing thousands took minutes on a loaded machine). Returns how many."""
    when = datetime(2023, 3, 1, tzinfo=UTC)
    for folder in ("INBOX", "Big"):
        root = old.maildir(address) / ("" if folder == "INBOX" else folder)
        write_maildir(root, (make_message(f"{folder} {i}", f"n {i}\n",
                                          when + timedelta(minutes=i), size=1500)
                             for i in range(BIG_FOLDER_MESSAGES)),
                      flags=lambda n: "S" if n % 2 else "")
    return 2 * BIG_FOLDER_MESSAGES


# A copy of thousands of messages, several times on a machine loaded by other test runs: a
# generous bound on "it finished", not a speed requirement.
@pytest.mark.timeout(600)
def test_stop_during_a_big_copy_then_start(tmp_path: Path, new_store: DovecotInstance,
                                           old_server: DovecotInstance) -> None:
    alice, alice_pw = "alice@old.example", "alice-pw"
    total = seed_big_mailbox(old_server, alice)
    proxy = admin_proxy(tmp_path / "proxy", new_store, old_server, workers=1,
                        parallel_folders=1)
    users = tmp_path / "users.csv"
    users.write_text(f"{alice},{alice_pw}\n")
    cli = Transcript(proxy)
    cli.run("import", str(users))
    # The worker waits after each batch while the gate file exists: the stop lands in the
    # middle of the copy however fast or slow the machine is.
    gate = tmp_path / "copy-gate"
    gate.touch()
    proxy.start(env={FAILPOINTS: f"copy.batch_written@{gate}"})
    try:
        assert cli.json("migrate", alice)[0]["result"] == "queued"
        proxy.wait_for_log('"event": "failpoint_waiting"', timeout=120)  # a batch is in
        assert cli.json("stop", alice)[0]["result"] == "paused"
        proxy.wait_for_log('"event": "copy_pause_noticed"', timeout=60)
        gate.unlink()
        row = _poll(proxy, alice, lambda r: r["job_state"] == "paused")  # its worker let go
        assert row["state"] == "PENDING" and 0 < row["messages_copied"] < total
        assert cli.json("stop", alice)[0]["result"] == "skipped"  # nothing left to pause
        assert proxy.status(alice)[0]["messages_copied"] == row["messages_copied"]  # it stays
        assert cli.json("start", alice)[0]["result"] == "resumed"
        final = proxy.wait_for_state(alice, ("COMPLETED",), timeout=480)
    finally:
        gate.unlink(missing_ok=True)
        proxy.stop()
    assert final["messages_copied"] == final["messages_total"] == total
    # Nothing twice, nothing missing: every folder equal to the old one, message by message.
    assert without_notice(store_snapshot(new_store, alice)) == \
        snapshot(old_server.imap_port, alice, alice_pw)


def _poll(proxy: Proxy, address: str, done: Callable[[dict[str, Any]], bool],
          timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        row = proxy.status(address)[0]
        if done(row):
            return row
        assert time.monotonic() < deadline, row
        time.sleep(0.1)


# Several CLI runs on a pseudo-terminal, each a Python start: seconds alone, minutes on a
# machine busy with other test runs. Bounds on "it finished", not on speed.
@pytest.mark.timeout(600)
def test_progress_display_on_a_terminal(tmp_path: Path, new_store: DovecotInstance,
                                        old_server: DovecotInstance) -> None:
    seed_mailbox("127.0.0.1", old_server.imap_port, "alice@old.example", "alice-pw",
                 sample_corpus())
    proxy = admin_proxy(tmp_path / "proxy", new_store, old_server)
    users = tmp_path / "users.csv"
    users.write_text("address;password\r\nalice@old.example;alice-pw\r\nbob@old.example;bob-pw\r\n")
    proxy.cli("import", str(users))
    with proxy:
        output, code = run_in_pty([sys.executable, "-m", "migrating_proxy", "--config",
                                   str(proxy.config_path), "migrate", "--all", "--wait"])
        watched, watch_code = watch_in_pty([sys.executable, "-m", "migrating_proxy", "--config",
                                            str(proxy.config_path), "status", "--watch"])
        # finish asks first on a terminal; anything but yes changes nothing.
        refused, refused_code = run_in_pty([sys.executable, "-m", "migrating_proxy", "--config",
                                            str(proxy.config_path), "finish", DOMAIN],
                                           answer=b"n\n")
    assert code == 0, output
    assert "\x1b[2K" in output  # redrawn in place
    assert "alice@old.example" in output and "bob@old.example" in output
    total = [line for line in output.splitlines() if " total " in line][-1]
    assert "msgs/s" in total and "ETA" in total and "(2/2 accounts settled)" in total
    assert refused_code == 1 and "[y/N]" in refused and "not confirmed" in refused
    # status --watch redraws the table in place until Ctrl-C, which ends it cleanly.
    assert watched.count(CLEAR_SCREEN) >= 2 and watch_code == 0, watched
    assert watched.split(CLEAR_SCREEN)[1].split()[:5] == [
        "address", "state", "progress", "last_error", "last_pass"]
    assert json.loads(proxy.cli("domain", "list", "--json").stdout)[0]["migrating"]


CLEAR_SCREEN = "\x1b[H\x1b[2J"


def watch_in_pty(argv: list[str], redraws: int = 2) -> tuple[str, int | None]:
    """Run a redrawing command on a pseudo-terminal until it redrew `redraws` times, then
    press Ctrl-C; everything it wrote, and its exit code."""
    master, slave = pty.openpty()
    process = subprocess.Popen(argv, stdout=slave, stderr=slave, stdin=subprocess.DEVNULL,
                               close_fds=True)
    os.close(slave)
    output = ""

    def read(seconds: float) -> None:
        nonlocal output
        ready, _, _ = select.select([master], [], [], seconds)
        if ready:
            with contextlib.suppress(OSError):  # EIO: the child closed the terminal
                output += os.read(master, 65536).decode(errors="replace")

    deadline = time.monotonic() + 240
    while output.count(CLEAR_SCREEN) < redraws + 1 and time.monotonic() < deadline:
        read(1)
    process.send_signal(signal.SIGINT)
    # Keep reading until it exits: a child whose last writes found the terminal's buffer full
    # would otherwise wait for a reader that waits for it. A bound on "it ended", with what it
    # wrote in the failure (the exit code is None then), instead of an exception.
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        read(0.2)
    if process.poll() is None:
        process.kill()
        process.wait()
        os.close(master)
        return output, None
    os.close(master)
    return output, process.returncode


def run_in_pty(argv: list[str], answer: bytes | None = None) -> tuple[str, int]:
    """Run on a pseudo-terminal (stdin too when there is an answer to type); everything it
    wrote, and its exit code."""
    master, slave = pty.openpty()
    stdin = slave if answer is not None else subprocess.DEVNULL
    process = subprocess.Popen(argv, stdout=slave, stderr=slave, stdin=stdin, close_fds=True)
    os.close(slave)
    if answer is not None:
        os.write(master, answer)  # the terminal buffers it until the prompt reads
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 120)
        if not ready:
            process.kill()
            break
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return b"".join(chunks).decode(errors="replace"), process.wait(timeout=120)
