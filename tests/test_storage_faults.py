"""Storage faults under a running `serve`: logins get a temporary failure and a log line,
relayed sessions live on, the proxy recovers when storage returns, and no child process
outlives its parent.

The account database lives on a small ext4 file system of its own (a loop device), which the
tests make unwritable the ways storage fails: files that stop being writable while the proxy
has them mapped (`chattr +i`: with SQLite's WAL this is what turned into SIGBUS and killed the
whole proxy), and a full disk. Needs root (mount, chattr); skipped otherwise, with the reason.
"""

from __future__ import annotations

import contextlib
import imaplib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from imapclient import IMAPClient

from tests.support import dovecot
from tests.support.dovecot import DovecotInstance
from tests.support.proxy import Proxy, descendants
from tests.support.waiting import eventually

LOCAL, LOCAL_PW = "dora@new.example", "dora-pw"
OLD_USERS = {"alice@old.example": "alice-pw", "bob@old.example": "bob-pw",
             "carol@old.example": "carol-pw"}


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, check=True)


@contextlib.contextmanager
def small_file_system(directory: Path, size_mb: int = 16) -> Iterator[Path]:
    """An ext4 file system of its own, mounted at directory/mnt."""
    if os.geteuid() != 0:
        pytest.skip("mounting a file system needs root")
    for tool in ("mkfs.ext4", "chattr", "mount"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    image, mount_point = directory / "fs.img", directory / "mnt"
    mount_point.mkdir()
    with open(image, "wb") as out:
        out.truncate(size_mb * 1024 * 1024)
    run("mkfs.ext4", "-q", "-F", "-m", "0", str(image))  # no blocks reserved for root
    try:
        run("mount", "-o", "loop", str(image), str(mount_point))
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot loop-mount a file system here: {exc.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["chattr", "-R", "-i", str(mount_point)], capture_output=True)
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


@pytest.fixture(scope="module")
def old_server() -> Iterator[DovecotInstance]:
    with dovecot.running_old_server(OLD_USERS, "mp-sf-") as instance:
        yield instance


@pytest.fixture
def proxy(tmp_path: Path, module_store: DovecotInstance,
          old_server: DovecotInstance) -> Iterator[tuple[Proxy, Path]]:
    """A proxy whose database (and vault key) live on a file system of their own."""
    with small_file_system(tmp_path) as mount_point:
        proxy = Proxy(tmp_path / "p", module_store, overrides={
            "database": {"url": f"sqlite:///{mount_point / 'proxy.db'}"}})
        proxy.add_account(LOCAL, LOCAL_PW)
        proxy.cli("domain", "add", "old.example", "--source",
                  f"imap://127.0.0.1:{old_server.imap_port}")
        with proxy:
            yield proxy, mount_point


def login(proxy: Proxy, user: str, password: str) -> str:
    """"OK", or the refusal's response code (UNAVAILABLE, AUTHENTICATIONFAILED...)."""
    client = imaplib.IMAP4("127.0.0.1", proxy.imap_port, timeout=30)
    try:
        client.login(user, password)
    except imaplib.IMAP4.error as exc:
        return str(exc).split("[", 1)[-1].split("]", 1)[0]
    finally:
        client.shutdown()
    return "OK"


def relayed_session(proxy: Proxy) -> IMAPClient:
    session = IMAPClient("127.0.0.1", proxy.imap_port, ssl=False, timeout=30)
    session.login(LOCAL, LOCAL_PW)
    session.select_folder("INBOX")
    return session


def session_works(session: IMAPClient) -> bool:
    session.noop()
    return session.select_folder("INBOX")[b"EXISTS"] >= 0


def log_events(proxy: Proxy, event: str) -> list[dict]:
    lines = (line for line in proxy.log_text().splitlines() if line.startswith("{"))
    return [record for record in map(json.loads, lines) if record.get("event") == event]




def test_files_that_stop_being_writable_fail_logins_not_the_proxy(
        proxy: tuple[Proxy, Path]) -> None:
    server, mount_point = proxy
    session = relayed_session(server)
    assert login(server, "alice@old.example", "alice-pw") == "OK"
    files = sorted(str(path) for path in mount_point.glob("proxy.db*"))
    assert len(files) == 3, files  # the database, its WAL and the mapped -shm file
    # The fault meets the proxy the way it does in life: SQLite has checkpointed the WAL (as
    # its auto-checkpoint does every 1000 pages), the pages of the mapped -shm file are
    # written back to disk (clean again: the kernel asks the file system before the next write
    # to them), then the files stop being writable. The next write transaction starts the WAL
    # over, and writes that to the -shm mapping first, before any write to a file: that write
    # is what the kernel answers with SIGBUS.
    time.sleep(1.0)  # the proxy's own writes after the first login are done
    with contextlib.closing(sqlite3.connect(mount_point / "proxy.db", isolation_level=None)) as db:
        busy, frames, backfilled = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    assert busy == 0 and frames == backfilled > 0
    shm = os.open(mount_point / "proxy.db-shm", os.O_RDONLY)
    try:
        os.fsync(shm)
    finally:
        os.close(shm)
    run("chattr", "+i", *files)
    try:
        # Told to try again, never refused, never a crash: a first login (it writes), then a
        # local one (its reads need a new helper, which cannot set up without writing).
        for user, password in (("bob@old.example", "bob-pw"), (LOCAL, LOCAL_PW)):
            assert login(server, user, password) == "UNAVAILABLE"
        assert server.process is not None and server.process.poll() is None
        assert session_works(session)
        died = log_events(server, "database_process_died")
        assert died and "SIGBUS" in died[0]["reason"], died
    finally:
        run("chattr", "-i", *files)
    # Storage is back: the same first login goes through, and so does everything else.
    assert eventually(lambda: login(server, "bob@old.example", "bob-pw") == "OK")
    assert login(server, LOCAL, LOCAL_PW) == "OK"
    assert session_works(session)
    session.logout()


def test_a_full_disk_fails_first_logins_only_until_space_returns(
        proxy: tuple[Proxy, Path]) -> None:
    server, mount_point = proxy
    session = relayed_session(server)
    # Writes that fit in the WAL's existing pages need no new blocks: empty it first, so the
    # next write must grow it, as writes eventually do.
    with contextlib.closing(sqlite3.connect(mount_point / "proxy.db")) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    fillers = [mount_point / "filler-1", mount_point / "filler-2"]
    for filler, block in zip(fillers, ("64k", "1k"), strict=True):  # to the last block
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", f"bs={block}"],
                       capture_output=True)
    try:
        assert login(server, "carol@old.example", "carol-pw") == "UNAVAILABLE"
        assert [e for e in log_events(server, "login_error")
                if e["address"] == "carol@old.example"]
        # A local account only reads: it still logs in (its last-login time waits).
        assert login(server, LOCAL, LOCAL_PW) == "OK"
        assert session_works(session)
    finally:
        for filler in fillers:
            filler.unlink()
    assert login(server, "carol@old.example", "carol-pw") == "OK"
    assert "carol@old.example" in accounts(server)
    assert login(server, LOCAL, LOCAL_PW) == "OK"
    assert eventually(lambda: accounts(server)[LOCAL]["last_login_at"] is not None)
    session.logout()


def accounts(proxy: Proxy) -> dict[str, dict]:
    return {a["address"]: a for a in json.loads(proxy.cli("account", "list", "--json").stdout)}


def test_no_child_outlives_a_killed_serve(tmp_path: Path, module_store: DovecotInstance) -> None:
    """serve's hashing processes, its SQLite helper, the worker pool and the workers: after
    kill -9 of serve, every one of them is gone within seconds."""
    proxy = Proxy(tmp_path / "p", module_store, overrides={"migration": {"workers": 2}})
    proxy.add_account(LOCAL, LOCAL_PW)
    proxy.start()
    assert proxy.process is not None
    assert login(proxy, LOCAL, LOCAL_PW) == "OK"  # the SQLite helper and hashing are up
    assert eventually(lambda: len(descendants(proxy.process.pid)) >= 6)  # type: ignore[union-attr]
    children = descendants(proxy.process.pid)
    proxy.process.send_signal(signal.SIGKILL)
    proxy.process.wait()
    proxy.process = None
    assert eventually(lambda: not [pid for pid in children if alive(pid)]), \
        [Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ") for pid in children
         if alive(pid)]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")
