"""Copy benchmark: our run_copy vs mbsync vs `doveadm backup -R` (imapc), Dovecot to Dovecot.

    .venv/bin/python bench/copy_bench.py [--messages N] [--rounds R] [--parallel P]

Builds a corpus of N messages (default 10,000, ~25 KB each, ~250 MB) in 10 folders by writing
maildir files straight into a fresh old-server Dovecot, then copies it R times (default 3) with
each tool, each time into a fresh new store, and prints every wall time, the medians, ratios of
medians and our peak RSS (run_copy runs in a child process, like the other tools).

Fairness: every store uses the same settings (tests/support/dovecot.py: mail_fsync = never; the
dsync run is given the same explicitly); the old server is read once before any timing, so no
tool pays for Dovecot indexing 10,000 fresh maildir files; the order of the tools rotates from
round to round; and every run is checked to have copied all N messages. The machine's load
average is printed: other work on the machine shows up in every tool's times.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from imapclient import IMAPClient

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
    inst.provision(USER, "{PLAIN}new-pw")
    inst.start()
    return inst


def warm_up(old: dovecot.DovecotInstance) -> None:
    """Read every message once, so Dovecot's indexes and the page cache are built for all."""
    with IMAPClient("127.0.0.1", port=old.imap_port, ssl=False, timeout=120) as client:
        client.login(USER, PASSWORD)
        for name in FOLDERS:
            client.select_folder(name, readonly=True)
            uids = client.search("ALL")
            if uids:
                client.fetch(uids, ["RFC822.SIZE", "FLAGS", "INTERNALDATE", "BODY.PEEK[]"])


def store_count(store: dovecot.DovecotInstance) -> int:
    """Messages on the store, over all folders (checked after every run)."""
    with IMAPClient("127.0.0.1", port=store.imap_port, ssl=False, timeout=60) as client:
        client.plain_login("proxy-master", "master-pw", authorization_identity=USER)
        return sum(int(client.folder_status(name, [b"MESSAGES"])[b"MESSAGES"])
                   for flags, _d, name in client.list_folders() if b"\\Noselect" not in flags)


@dataclass
class Run:
    wall: float
    rss_kb: int | None = None


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
result = run_copy(store.engine, 1, src, dst, parallel_folders=int(sys.argv[4]))
print("RESULT", result.state, result.progress.messages_copied, time.monotonic() - start,
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def run_ours(old: dovecot.DovecotInstance, new: dovecot.DovecotInstance, tmp: Path,
             parallel: int) -> Run:
    url = f"sqlite:///{tmp / f'bench-{new.imap_port}.db'}"
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", _CHILD, url, str(old.imap_port),
                          str(new.imap_port), str(parallel)], cwd=REPO, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    wall = time.monotonic() - start
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT")), "")
    if not line or line.split()[1] != "completed":
        raise RuntimeError(out.stdout[-2000:] + out.stderr[-2000:])
    return Run(wall, int(line.split()[4]))


def run_mbsync(old: dovecot.DovecotInstance, new: dovecot.DovecotInstance, tmp: Path,
               _parallel: int) -> Run:
    state = tmp / f"mbsync-state-{new.imap_port}"
    config = tmp / f"mbsyncrc-{new.imap_port}"
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
SyncState {state}/
""")
    state.mkdir()
    start = time.monotonic()
    subprocess.run(["mbsync", "-q", "-c", str(config), "copy"], check=True,
                   stderr=subprocess.DEVNULL)
    return Run(time.monotonic() - start)


def run_doveadm(old: dovecot.DovecotInstance, new: dovecot.DovecotInstance, _tmp: Path,
                _parallel: int) -> Run:
    options = {"imapc_host": "127.0.0.1", "imapc_port": str(old.imap_port),
               "imapc_user": USER, "imapc_password": PASSWORD, "imapc_features": "fetch-headers",
               "mail_prefetch_count": "20", "mail_fsync": "never"}
    args = ["doveadm", "-c", str(new.config_path)]
    for key, value in options.items():
        args += ["-o", f"{key}={value}"]
    start = time.monotonic()
    subprocess.run([*args, "backup", "-R", "-u", USER, "imapc:"], check=True,
                   stderr=subprocess.DEVNULL)
    return Run(time.monotonic() - start)


TOOLS: dict[str, Callable[[dovecot.DovecotInstance, dovecot.DovecotInstance, Path, int], Run]]
TOOLS = {"run_copy": run_ours, "mbsync": run_mbsync, "dsync": run_doveadm}


def one_run(name: str, old: dovecot.DovecotInstance, tmp: Path, count: int,
            parallel: int) -> Run | str:
    """A run of one tool into a fresh store: its Run, or why it failed."""
    store = new_store()
    try:
        run = TOOLS[name](old, store, tmp, parallel)
        copied = store_count(store)
        return run if copied == count else f"copied {copied} of {count} messages"
    except (subprocess.CalledProcessError, OSError, RuntimeError) as exc:
        return str(exc)[-300:]
    finally:
        store.stop()
        dovecot.remove_root(store.root)


def benchmark(old: dovecot.DovecotInstance, count: int, rounds: int, parallel: int
              ) -> dict[str, list[Run]]:
    runs: dict[str, list[Run]] = {name: [] for name in TOOLS}
    names = list(TOOLS)
    with tempfile.TemporaryDirectory() as tmp_name:
        for index in range(rounds):
            order = names[index % len(names):] + names[:index % len(names)]
            for name in order:
                outcome = one_run(name, old, Path(tmp_name), count, parallel)
                if isinstance(outcome, str):
                    print(f"  round {index + 1} {name:8}: FAILED ({outcome})")
                    continue
                runs[name].append(outcome)
                print(f"  round {index + 1} {name:8}: {outcome.wall:6.1f} s")
    return runs


def report(runs: dict[str, list[Run]]) -> None:
    medians = {n: statistics.median(r.wall for r in rs) for n, rs in runs.items() if rs}
    ours = medians.get("run_copy")
    for name, median in medians.items():
        walls = ", ".join(f"{r.wall:.1f}" for r in runs[name])
        ratio = f"   ours/{name} = {ours / median:.2f}" if ours and name != "run_copy" else ""
        print(f"{name:8} median {median:6.1f} s  ({walls}){ratio}")
    rss = [r.rss_kb for r in runs["run_copy"] if r.rss_kb]
    if rss:
        print(f"run_copy peak RSS {max(rss) / 1024:.0f} MB (max over runs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--parallel", type=int, default=4, help="run_copy's parallel_folders")
    args = parser.parse_args()
    old_root = dovecot.instance_root("mp-bench-old-")
    old = dovecot.old_server(old_root, {USER: PASSWORD})
    try:
        old.start()
        size = seed_maildir(old, args.messages)
        warm_up(old)
        print(f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f}, run_copy parallel_folders "
              f"{args.parallel}")
        print(f"corpus: {args.messages} messages, {size / 1e6:.0f} MB, {len(FOLDERS)} folders")
        runs = benchmark(old, args.messages, args.rounds, args.parallel)
        print(f"load average at the end {os.getloadavg()[0]:.1f}")
        report(runs)
    finally:
        old.stop()
        dovecot.remove_root(old.root)


if __name__ == "__main__":
    main()
