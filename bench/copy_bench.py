"""Copy benchmark: our run_copy vs mbsync vs `doveadm backup -R` (imapc), Dovecot to Dovecot.

    .venv/bin/python bench/copy_bench.py [--messages N]

Builds a corpus of N messages (default 10,000, ~25 KB each, ~250 MB) in 10 folders by writing
maildir files straight into a fresh old-server Dovecot, then copies it into three fresh new
stores and prints wall times, ratios and our peak RSS (run_copy runs in a child process).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support import dovecot  # noqa: E402
from tests.support.mail import make_message  # noqa: E402

USER, PASSWORD = "alice@old.example", "alice-pw"
FOLDERS = ["INBOX", *(f"Folder{i}" for i in range(1, 10))]


def seed_maildir(server: dovecot.DovecotInstance, count: int) -> int:
    """Write count messages as maildir files (much faster than APPEND); returns total bytes."""
    root = server.maildir(USER)
    rng = random.Random(1)
    total = 0
    uid, gid = root.parent.parent.stat().st_uid, root.parent.parent.stat().st_gid
    for index in range(count):
        folder = FOLDERS[index % len(FOLDERS)]
        directory = root if folder == "INBOX" else root / folder
        cur = directory / "cur"
        if not cur.exists():
            for sub in ("cur", "new", "tmp"):
                (directory / sub).mkdir(parents=True, exist_ok=True)
        when = dt.datetime(2015, 1, 1, tzinfo=dt.UTC) + dt.timedelta(hours=index)
        raw = make_message(f"Message {index}", "bench\n", when, size=rng.randint(5_000, 45_000))
        path = cur / f"{int(when.timestamp())}.M{index}P1.bench:2,S"
        path.write_bytes(raw)
        os.utime(path, (when.timestamp(), when.timestamp()))
        total += len(raw)
    subprocess.run(["chown", "-R", f"{uid}:{gid}", str(root.parent)], check=True)
    return total


def new_store() -> dovecot.DovecotInstance:
    root = dovecot.instance_root("mp-bench-new-")
    inst = dovecot.new_store(root, root / "provisioned" / "users", master_password="master-pw")
    with inst.users_file.open("a") as users:
        users.write(f"{USER}:{{PLAIN}}new-pw\n")
    inst.start()
    return inst


_CHILD = """
import resource, sys, time
from migrating_proxy.migration import SourceSpec, StoreSpec, run_copy
from migrating_proxy.store import open_store
store = open_store(sys.argv[1]); store.accounts.add_account("alice@old.example", "x")
src = SourceSpec("imap", "127.0.0.1", int(sys.argv[2]), "none", False, "alice@old.example",
                 "alice-pw")
dst = StoreSpec("127.0.0.1", int(sys.argv[3]), "none", "alice@old.example", "proxy-master",
                "master-pw")
start = time.monotonic()
result = run_copy(store.engine, 1, src, dst)
print("RESULT", result.state, result.progress.messages_copied, time.monotonic() - start,
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def run_ours(old: dovecot.DovecotInstance, new: dovecot.DovecotInstance, tmp: Path
             ) -> tuple[float, int, str]:
    url = f"sqlite:///{tmp / 'bench.db'}"
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", _CHILD, url, str(old.imap_port),
                          str(new.imap_port)], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    wall = time.monotonic() - start
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT")), "")
    if not line:
        raise RuntimeError(out.stdout[-2000:] + out.stderr[-2000:])
    _tag, state, copied, _t, rss = line.split()
    return wall, int(rss), f"{state}, {copied} messages"


def run_mbsync(old: dovecot.DovecotInstance, new: dovecot.DovecotInstance, tmp: Path) -> float:
    config = tmp / "mbsyncrc"
    config.write_text(f"""IMAPAccount old
Host 127.0.0.1
Port {old.imap_port}
User {USER}
Pass {PASSWORD}
SSLType None
AuthMechs LOGIN

IMAPStore old
Account old

IMAPAccount new
Host 127.0.0.1
Port {new.imap_port}
User {USER}*proxy-master
Pass master-pw
SSLType None
AuthMechs LOGIN

IMAPStore new
Account new

Channel copy
Far :old:
Near :new:
Patterns *
Create Near
Sync Pull
SyncState {tmp}/mbsync-state/
""")
    (tmp / "mbsync-state").mkdir()
    start = time.monotonic()
    subprocess.run(["mbsync", "-q", "-c", str(config), "copy"], check=True)
    return time.monotonic() - start


def run_doveadm(old: dovecot.DovecotInstance, new: dovecot.DovecotInstance) -> float:
    options = {"imapc_host": "127.0.0.1", "imapc_port": str(old.imap_port),
               "imapc_user": USER, "imapc_password": PASSWORD, "imapc_features": "fetch-headers",
               "mail_prefetch_count": "20", "mail_fsync": "never"}
    args = ["doveadm", "-c", str(new.config_path)]
    for key, value in options.items():
        args += ["-o", f"{key}={value}"]
    start = time.monotonic()
    subprocess.run([*args, "backup", "-R", "-u", USER, "imapc:"], check=True)
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000)
    count = parser.parse_args().messages
    old_root = dovecot.instance_root("mp-bench-old-")
    old = dovecot.old_server(old_root, {USER: PASSWORD})
    stores: list[dovecot.DovecotInstance] = []
    try:
        old.start()
        size = seed_maildir(old, count)
        print(f"corpus: {count} messages, {size / 1e6:.0f} MB, {len(FOLDERS)} folders")
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            stores = [new_store() for _ in range(3)]
            ours, rss_kb, detail = run_ours(old, stores[0], tmp)
            print(f"run_copy : {ours:6.1f} s   peak RSS {rss_kb / 1024:.0f} MB   ({detail})")
            try:
                mbsync = run_mbsync(old, stores[1], tmp)
                print(f"mbsync   : {mbsync:6.1f} s   ours/mbsync = {ours / mbsync:.2f}")
            except (subprocess.CalledProcessError, OSError) as exc:
                print(f"mbsync   : failed ({exc})")
            try:
                dsync = run_doveadm(old, stores[2])
                print(f"dsync    : {dsync:6.1f} s   ours/dsync  = {ours / dsync:.2f}")
            except (subprocess.CalledProcessError, OSError) as exc:
                print(f"dsync    : failed ({exc})")
    finally:
        for inst in [old, *stores]:
            inst.stop()
            dovecot.remove_root(inst.root)


if __name__ == "__main__":
    main()
