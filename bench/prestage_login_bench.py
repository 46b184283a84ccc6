"""First logins after a pre-stage: each user's first login switches a pre-staged account.

    .venv/bin/python bench/prestage_login_bench.py [--users N] [--min-messages N]
                                                   [--max-messages N] [--rate BYTES_PER_S]
                                                   [--workers N] [--late-every N]

Issue 13's Done-when, end to end, through one `migrating-proxy serve` (with --workers copy
workers, default 2) in front of a real Dovecot store:

1. N users (default 100) of a passthrough domain, each with --min-messages to --max-messages
   messages (default 20 to 50, 1 to 12 kB, in INBOX, Sent and Archive, mixed flags and dates) on
   a real Dovecot old server with an administrator (a Dovecot master user), are imported without
   passwords and pre-staged in the background (`migrate --domain D --prestage`) at
   `migration.prestage_rate` --rate (default 500 kB/s; 0: unlimited);
2. then mail arrives at the old server (LMTP): 1 to 3 messages for every --late-every-th user
   (default 3);
3. then the users log in one by one through `serve` (imaplib: LOGIN, SELECT INBOX, LOGOUT).

Printed: how many first logins were answered OK, the hold those logins saw (median, p99, max of
the login's wall time from LOGIN sent to its OK, and where it went, from the log; and of the
worker's `switch_done` hold_seconds), whether each store mailbox equals its old one exactly
(every folder, message bytes, flags, INTERNALDATE) plus exactly one "moved" notice, and the
pre-stage rate measured (bytes copied over the time from the first `copy_started` to the last
`copy_finished`) against the setting. Targets (issue 13): switch hold p99 under 2 s; the rate
within 10 % of the setting.
"""

from __future__ import annotations

import argparse
import datetime as dt
import imaplib
import itertools
import json
import os
import random
import shutil
import smtplib
import statistics
import sys
import tempfile
import time
from pathlib import Path

from imapclient import IMAPClient

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.prestage_rate_bench import (  # noqa: E402
    ADMIN,
    ADMIN_PW,
    DOMAIN,
    import_without_passwords,
    log_events,
)
from bench.switch_bench import MOVED, percentile  # noqa: E402
from tests.support import dovecot  # noqa: E402
from tests.support.mail import make_message, snapshot_folders, write_maildir  # noqa: E402
from tests.support.proxy import Proxy  # noqa: E402

HOST = "127.0.0.1"
FOLDERS = ("INBOX", "Sent", "Archive")
MOVING = b"Your mailbox is moving to a new mail server"


def named(proxy: Proxy, name: str) -> list[dict]:  # type: ignore[type-arg]
    return [e for e in log_events(proxy.log_text()) if e["event"] == name]


def stamp(event: dict) -> float:  # type: ignore[type-arg]
    return dt.datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def password(n: int) -> str:
    return f"pw-{n:03d}-bench"


def seed(old: dovecot.DovecotInstance, users: int, low: int, high: int) -> list[str]:
    """Every user's mailbox written as maildir files, with its own dates (INTERNALDATE)."""
    rng = random.Random(13)
    addresses = [f"user{n:03d}@{DOMAIN}" for n in range(users)]
    start = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    for n, address in enumerate(addresses):
        old.add_user(address, password(n))
        total = rng.randint(low, high)
        for f, folder in enumerate(FOLDERS):
            share = [n_ for n_ in range(total) if n_ % len(FOLDERS) == f]
            when = [start + dt.timedelta(hours=rng.randint(0, 24 * 600)) for _ in share]
            root = old.maildir(address) if folder == "INBOX" else old.maildir(address) / folder
            write_maildir(root, (make_message(f"{address} {folder} {m}", "bench\n", when[i],
                                              size=rng.randint(1_000, 12_000))
                                 for i, m in enumerate(share)),
                          flags=lambda k: ("", "S", "FS", "RS")[k % 4])
            for path, date in zip(sorted((root / "cur").iterdir(),
                                         key=lambda p: int(p.name.split(".")[0])),
                                  when, strict=True):
                os.utime(path, (date.timestamp(), date.timestamp()))
    return addresses


def late_mail(old: dovecot.DovecotInstance, addresses: list[str], every: int) -> int:
    """1 to 3 new messages for every `every`-th user, delivered at the old server."""
    rng, sent = random.Random(27), 0
    with smtplib.LMTP(HOST, old.lmtp_port) as lmtp:
        for address in addresses[::every]:
            for k in range(rng.randint(1, 3)):
                body = make_message(f"late {k} for {address}", "after the pre-stage pass\n",
                                    dt.datetime.now(dt.UTC), size=rng.randint(1_000, 8_000))
                lmtp.sendmail("sender@elsewhere.example", [address], body)
                sent += 1
    return sent


def wait_prestaged(proxy: Proxy, addresses: list[str], timeout: float) -> list[dict]:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while True:
        rows = proxy.status(*addresses)
        if all(row["job_state"] is None for row in rows):
            return rows
        if time.monotonic() > deadline:
            raise RuntimeError(f"pre-stage unfinished: {[r for r in rows if r['job_state']]}")
        time.sleep(1.0)


def first_login(proxy: Proxy, address: str, secret: str
                ) -> tuple[bool, float, float, float, str]:
    """(answered OK, when LOGIN was sent and answered (epoch seconds), seconds from LOGIN sent
    to its answer, what went wrong)."""
    client = imaplib.IMAP4(HOST, proxy.imap_port, timeout=60)
    try:
        sent, clock = time.time(), time.monotonic()
        try:
            client.login(address, secret)
        except imaplib.IMAP4.error as exc:
            return False, sent, time.time(), time.monotonic() - clock, str(exc)
        waited, answered = time.monotonic() - clock, time.time()
        kind, _ = client.select("INBOX", readonly=True)
        client.logout()
        return (kind == "OK", sent, answered, waited,
                "" if kind == "OK" else "SELECT INBOX failed")
    finally:
        if client.state != "LOGOUT":
            client.shutdown()


def check_exact(old: dovecot.DovecotInstance, store: dovecot.DovecotInstance, address: str,
                secret: str) -> str:
    """'' when the store holds exactly the old mailbox and one notice; else what differs."""
    with IMAPClient(HOST, old.imap_port, ssl=False, timeout=120) as client:
        client.login(address, secret)
        before = snapshot_folders(client)
    with IMAPClient(HOST, store.imap_port, ssl=False, timeout=120) as client:
        client.plain_login(store.master_user, store.master_password or "",
                           authorization_identity=address)
        after = snapshot_folders(client)
    inbox = after.get("INBOX", [])
    notices = sum(MOVED in m[0] for m in inbox)
    moving = sum(MOVING in m[0] for m in inbox)
    after["INBOX"] = [m for m in inbox if MOVED not in m[0]]
    problems = [f"{notices} moved notices"] if notices != 1 else []
    problems += [f"{moving} moving notices"] if moving else []
    for folder in sorted(set(before) | set(after)):
        if before.get(folder) != after.get(folder):
            problems.append(f"{folder}: {len(before.get(folder, []))} at the old server, "
                            f"{len(after.get(folder, []))} at the store (or contents differ)")
    return "; ".join(problems)


def summary(label: str, values: list[float]) -> str:
    if not values:
        return f"{label}: none"
    return (f"{label} (n={len(values)}): median {statistics.median(values):.0f} ms, "
            f"p99 {percentile(values, 99):.0f} ms, max {max(values):.0f} ms")


def phases(proxy: Proxy, logins: dict[str, tuple[float, float]]
           ) -> dict[str, list[float]]:
    """Where a first login's wait goes, from the log's timestamps (ms): the old server's check
    of the password and the provisioning; waiting for a worker to take the final pass; the
    final pass and the switch; noticing the switch and logging in at the store."""
    seen: dict[str, dict[str, float]] = {}
    for event in log_events(proxy.log_text()):
        address, name = event.get("address"), event["event"]
        if address not in logins or name not in (
                "prestaged_first_login", "copy_started", "switch_done"):
            continue
        at = stamp(event)
        if at >= logins[address][0]:
            seen.setdefault(address, {}).setdefault(name, at)  # the first after the LOGIN
    steps: dict[str, list[float]] = {
        "LOGIN -> accepted at the old server, provisioned": [],
        "-> a worker takes the final pass": [],
        "-> final pass and switch done": [], "-> OK from the store": []}
    for address, (sent, answered) in logins.items():
        got = seen.get(address, {})
        if len(got) == 3:
            marks = [sent, got["prestaged_first_login"], got["copy_started"],
                     got["switch_done"], answered]
            for label, (a, b) in zip(steps, itertools.pairwise(marks), strict=True):
                steps[label].append((b - a) * 1000)
    return steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--min-messages", type=int, default=20)
    parser.add_argument("--max-messages", type=int, default=50)
    parser.add_argument("--rate", type=int, default=500_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--late-every", type=int, default=3)
    args = parser.parse_args()
    print(f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; {args.users} users x {args.min_messages}-"
          f"{args.max_messages} messages, prestage_rate {args.rate} B/s, {args.workers} "
          f"workers", flush=True)
    work = Path(tempfile.mkdtemp(prefix="mp-plbench-"))
    old_root, store_root = dovecot.instance_root("mp-plb-old-"), dovecot.instance_root(
        "mp-plb-new-")
    failures: list[str] = []
    try:
        with dovecot.old_server(old_root, {}, masters={ADMIN: ADMIN_PW}) as old, \
                dovecot.new_store(store_root, store_root / "provisioned" / "users") as store:
            addresses = seed(old, args.users, args.min_messages, args.max_messages)
            proxy = Proxy(work, store, overrides={
                "migration": {"workers": args.workers, "prestage_rate": args.rate,
                              "max_connections_per_host": 4, "parallel_folders": 2},
                "log": {"level": "info"},
                "limits": {"max_failures_per_peer": 0, "max_failures_per_account": 0}})
            import_without_passwords(proxy, old, work, addresses)
            with proxy:
                began = time.monotonic()
                queued = json.loads(proxy.cli("migrate", "--domain", DOMAIN, "--prestage",
                                              "--json").stdout)
                assert {o["result"] for o in queued} == {"queued"}, queued
                rows = wait_prestaged(proxy, addresses, timeout=3600)
                staged = time.monotonic() - began
                waiting = sum(r["state"] == "PENDING" and r["served_by"] == "old"
                              and r["prestaged_at"] is not None for r in rows)
                copied = sum(r["bytes_copied"] for r in rows)
                messages = sum(r["messages_copied"] for r in rows)
                first = min(stamp(e) for e in named(proxy, "copy_started"))
                last = max(stamp(e) for e in named(proxy, "copy_finished"))
                print(f"pre-stage: {waiting} of {len(rows)} accounts pre-staged and waiting, "
                      f"{messages} messages, {copied / 1e6:.2f} MB in {staged:.1f} s "
                      f"(copies: {last - first:.1f} s), load average "
                      f"{os.getloadavg()[0]:.1f}", flush=True)
                late = late_mail(old, addresses, args.late_every)
                print(f"late mail at the old server: {late} messages for "
                      f"{len(addresses[::args.late_every])} users", flush=True)
                oks, walls, logins = 0, [], {}
                for n, address in enumerate(addresses):
                    ok, sent, answered, waited, error = first_login(proxy, address,
                                                                    password(n))
                    oks += ok
                    walls.append(waited * 1000)
                    logins[address] = (sent, answered)
                    if not ok:
                        failures.append(f"{address}: {error}")
                    if n % 20 == 19:
                        print(f"  {n + 1} logins, load average {os.getloadavg()[0]:.1f}",
                              flush=True)
                rows = proxy.status(*addresses)
                switched = sum(r["served_by"] == "store" and r["state"] == "COMPLETED"
                               for r in rows)
            unequal = {}
            for n, address in enumerate(addresses):
                problem = check_exact(old, store, address, password(n))
                if problem:
                    unequal[address] = problem
    finally:
        dovecot.remove_root(old_root)
        dovecot.remove_root(store_root)
    holds = [e["hold_seconds"] * 1000 for e in named(proxy, "switch_done")]
    steps = phases(proxy, logins)
    shutil.rmtree(work, ignore_errors=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    print(f"first logins answered OK: {oks} of {len(addresses)}; switched (COMPLETED, served by "
          f"the store): {switched}")
    for failure in failures[:5]:
        print(f"  refused: {failure}")
    print(summary("login wall time, LOGIN sent -> OK", walls) + "  (target p99 < 2000 ms)")
    print(summary("switch_done hold_seconds, worker side", holds))
    for label, values in steps.items():
        print("  " + summary(label, values))
    print(f"store mailboxes exactly the old ones plus one notice: "
          f"{len(addresses) - len(unequal)} of {len(addresses)}")
    for address, problem in list(unequal.items())[:5]:
        print(f"  {address}: {problem}")
    if args.rate:
        measured = copied / (last - first)
        deviation = measured / args.rate - 1
        print(f"prestage_rate {args.rate / 1e6:.3f} MB/s: measured {measured / 1e6:.3f} MB/s, "
              f"{deviation:+.1%} ({'within' if abs(deviation) <= 0.10 else 'NOT within'} 10 %)")
    return 0 if oks == len(addresses) and not unequal else 1


if __name__ == "__main__":
    sys.exit(main())
