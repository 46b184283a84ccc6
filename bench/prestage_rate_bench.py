"""Pre-stage pacing benchmark: is `migration.prestage_rate` honoured, all workers together?

    .venv/bin/python bench/prestage_rate_bench.py [--users N] [--messages N] [--size BYTES]
                                                  [--rate BYTES_PER_S] [--workers N]

N users (default 8) of a passthrough domain, each with --messages messages (default 16) of
about --size bytes (default 150,000) in their INBOX, on a real Dovecot old server with an
administrator (a Dovecot master user), are imported without passwords and pre-staged
(`migrate --domain D --prestage`) by `migrating-proxy worker --processes N` (default 2; each
copy reads 2 folders at a time, up to 4 connections to the old server) into a real Dovecot store.
Run twice: unlimited (to show the copy could go faster), then with --rate (default 1 MB/s).

Measured, from the workers' log: the bytes copied divided by the time from the first
`copy_started` to the last `copy_finished`. Target (issue 13): within 10 % of --rate. Every
store mailbox is then checked equal to its old one.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support import dovecot  # noqa: E402
from tests.support.mail import make_message, snapshot_folders, write_maildir  # noqa: E402
from tests.support.proxy import Proxy  # noqa: E402

HOST = "127.0.0.1"
DOMAIN = "bench.example"
ADMIN, ADMIN_PW = "benchadmin", "bench-admin-pw"


def mailbox(user: int, messages: int, size: int) -> list[bytes]:
    when = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    return [make_message(f"user {user} message {n}", "x\n", when + dt.timedelta(minutes=n),
                         size=size) for n in range(messages)]


def seed(old: dovecot.DovecotInstance, users: int, messages: int, size: int) -> list[str]:
    addresses = [f"user{n:03d}@{DOMAIN}" for n in range(users)]
    for n, address in enumerate(addresses):
        old.add_user(address, f"pw-{n}")
        write_maildir(old.maildir(address), mailbox(n, messages, size))
    return addresses


def import_without_passwords(proxy: Proxy, old: dovecot.DovecotInstance, work: Path,
                             addresses: list[str]) -> None:
    """DOMAIN, passthrough, with the old server's admin; `addresses` imported, no passwords."""
    secret = work / "admin-password"
    secret.write_text(ADMIN_PW + "\n")
    proxy.cli("domain", "add", DOMAIN, "--source", f"imap://{HOST}:{old.imap_port}",
              "--source-admin", ADMIN, "--source-admin-password-file", str(secret))
    listing = work / "users.csv"
    listing.write_text("".join(f"{a}\n" for a in addresses))
    proxy.cli("import", str(listing))


def run(old: dovecot.DovecotInstance, store: dovecot.DovecotInstance, addresses: list[str],
        work: Path, rate: int, workers: int) -> dict[str, float]:
    """One pre-stage of every address at `rate` (0: unlimited); the figures."""
    proxy = Proxy(work, store, overrides={"migration": {
        "prestage_rate": rate, "max_connections_per_host": 4, "parallel_folders": 2}})
    import_without_passwords(proxy, old, work, addresses)
    proxy.cli("migrate", "--domain", DOMAIN, "--prestage")
    with proxy.log_path.open("ab") as log:
        pool = subprocess.Popen([sys.executable, "-m", "migrating_proxy", "--config",
                                 str(proxy.config_path), "worker", "--processes",
                                 str(workers)], stdout=log, stderr=log)
    try:
        while any(row["job_state"] is not None for row in proxy.status(*addresses)):
            time.sleep(0.5)
    finally:
        pool.terminate()
        pool.wait(timeout=60)
    rows = proxy.status(*addresses)
    assert all(row["prestaged_at"] for row in rows), rows
    copied = sum(row["bytes_copied"] for row in rows)
    started, finished = span(proxy.log_text())
    return {"bytes": copied, "seconds": finished - started,
            "rate": copied / (finished - started)}


def span(log: str) -> tuple[float, float]:
    """(first copy_started, last copy_finished), in seconds since the epoch."""
    times: dict[str, list[float]] = {"copy_started": [], "copy_finished": []}
    for event in log_events(log):
        if event["event"] in times:
            stamp = dt.datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))
            times[event["event"]].append(stamp.timestamp())
    return min(times["copy_started"]), max(times["copy_finished"])


def log_events(log: str) -> list[dict]:  # type: ignore[type-arg]
    """Every JSON event of a log that the proxy, its workers and the CLI all append to: their
    lines may run into each other, so each line is read object by object, fragments skipped."""
    decoder, found = json.JSONDecoder(), []
    for line in log.splitlines():
        at = line.find("{")
        while at != -1:
            try:
                event, end = decoder.raw_decode(line, at)
            except ValueError:
                at = line.find("{", at + 1)
                continue
            if isinstance(event, dict) and "event" in event:
                found.append(event)
            at = line.find("{", end)
    return found


def check_copies(old: dovecot.DovecotInstance, store: dovecot.DovecotInstance,
                 addresses: list[str]) -> None:
    from imapclient import IMAPClient

    for n, address in enumerate(addresses):
        with IMAPClient(HOST, old.imap_port, ssl=False) as at_old, \
                IMAPClient(HOST, store.imap_port, ssl=False) as at_store:
            at_old.login(address, f"pw-{n}")
            at_store.plain_login(store.master_user, store.master_password or "",
                                 authorization_identity=address)
            assert snapshot_folders(at_old) == snapshot_folders(at_store), address


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--messages", type=int, default=16)
    parser.add_argument("--size", type=int, default=150_000)
    parser.add_argument("--rate", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="mp-prebench-"))
    figures = {}
    try:
        for label, rate in (("unlimited", 0), ("paced", args.rate)):
            old_root, store_root = dovecot.instance_root("mp-pbo-"), dovecot.instance_root(
                "mp-pbn-")
            try:
                with dovecot.old_server(old_root, {}, masters={ADMIN: ADMIN_PW}) as old, \
                        dovecot.new_store(store_root, store_root / "provisioned" / "users") \
                        as store:
                    addresses = seed(old, args.users, args.messages, args.size)
                    figures[label] = run(old, store, addresses, base / label, rate,
                                         args.workers)
                    check_copies(old, store, addresses)
            finally:
                dovecot.remove_root(old_root)
                dovecot.remove_root(store_root)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    for label, result in figures.items():
        print(f"{label:>9}: {result['bytes'] / 1e6:7.2f} MB in {result['seconds']:6.2f} s = "
              f"{result['rate'] / 1e6:6.3f} MB/s")
    deviation = figures["paced"]["rate"] / args.rate - 1
    print(f"prestage_rate {args.rate / 1e6:.3f} MB/s: measured {deviation:+.1%} "
          f"({'within' if abs(deviation) <= 0.10 else 'NOT within'} 10 %)")
    return 0 if abs(deviation) <= 0.10 else 1


if __name__ == "__main__":
    sys.exit(main())
