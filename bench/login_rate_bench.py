"""Logins per second, through the proxy vs Dovecot directly, with imaptest (Dovecot's own
stress tool): 30 clients that only log in and out, the same store measured both ways in one run.

    .venv/bin/python bench/login_rate_bench.py [--imaptest PATH] [--clients 30] [--seconds 10]
                                               [--rounds 3] [--profile DIR]

imaptest is found as --imaptest, $IMAPTEST or `imaptest` on PATH; without it the bench says so
and stops (exit 0). `bench/build-imaptest [DIR]` builds it outside this repository (the
2022-03 commit 924f619 against Debian 12's dovecot-dev, with the two fixes that needs).

One throw-away store (tests/support/dovecot.py, deploy/dovecot/ configuration) and one `serve`
in front of it; `--clients` accounts, each with the same 5,000-round sha512_crypt hash as the
test fixtures, checked once per login on both paths (directly by Dovecot's auth process from
the provisioned file; through the proxy by the proxy, which then logs in to Dovecot as the
master user). Rounds alternate the paths; medians are compared. Also printed: CPU per login
(from /proc) of serve, of serve with its helper processes and of Dovecot on each path; serve's
CPU per MB it relays (FETCH of ~50 KB messages, bench/proxy_bench.py's mailbox); with
--profile, where serve's reactor spent its CPU (py-spy). Target (issue 16): proxy >= 85 % of
direct.

Exit status is 0 even when the target is missed: this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import proxy_bench  # noqa: E402
from bench.sampling import (  # noqa: E402
    cpu_seconds,
    dovecot_master_pid,
    profiler,
    reactor_costs,
    tree_cpu_seconds,
)
from migrating_proxy.passwords import PasswordHasher  # noqa: E402
from migrating_proxy.store import open_store  # noqa: E402
from tests.support import dovecot  # noqa: E402
from tests.support.proxy import Proxy  # noqa: E402

HOST = "127.0.0.1"
PASSWORD = "bench-pw"
TARGET = 0.85
# imaptest's reports: a header naming the counters, their shares, then the counts.
HEADER = re.compile(r"^Logi\b")


def find_imaptest(given: str | None) -> str | None:
    for candidate in (given, os.environ.get("IMAPTEST"), shutil.which("imaptest")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def add_accounts(db_url: str, users: list[str]) -> None:
    """In-process (a CLI call each would take longer than the bench); `serve` provisions the
    store's files from the database when it starts."""
    hashed = PasswordHasher("sha512_crypt", 5000).hash(PASSWORD)
    store = open_store(db_url)
    try:
        for address in users:
            store.accounts.add_account(address, hashed)
    finally:
        store.close()


def imaptest(binary: str, port: int, userfile: Path, clients: int, seconds: int) -> float:
    """Logins per second over one imaptest run of `seconds`: clients log in and out only."""
    env = {**os.environ, "LD_LIBRARY_PATH": "/usr/lib/dovecot"}
    result = subprocess.run(
        # (`user=` only because imaptest insists on a template even with a userfile.)
        [binary, f"host={HOST}", f"port={port}", "user=unused", f"userfile={userfile}",
         f"clients={clients}", f"secs={seconds}", "no_tracking", "-", "select=0"],
        capture_output=True, text=True, env=env, timeout=seconds + 60)
    return logins_per_second(result.stdout, seconds, result.stderr)


def logins_per_second(output: str, seconds: int, errors: str = "") -> float:
    """LOGINs per second from imaptest's end report:

        Totals:
        Logi Logo
        100% 100%
         176  203
    """
    lines = output.split("Totals:", 1)[-1].splitlines()
    for header, _, counts in zip(lines, lines[1:], lines[2:], strict=False):
        if HEADER.match(header) and counts.split() and counts.split()[0].isdigit():
            return int(counts.split()[0]) / seconds
    raise RuntimeError(f"no totals from imaptest:\n{output[-2000:]}\n{errors[-2000:]}")


def cpu_now(pids: dict[str, int]) -> dict[str, float]:
    return {"serve": cpu_seconds(pids["serve"]),
            "serve+helpers": tree_cpu_seconds(pids["serve"]),
            "dovecot": tree_cpu_seconds(pids["dovecot"])}


def cpu_per_mb(pid: int, port: int) -> float:
    """serve's CPU seconds per MB it relays, store to client (FETCH 1:* BODY.PEEK[]); the
    best of three, as other work on the machine only ever adds."""
    proxy_bench.fetch_everything(port)  # untimed: Dovecot's index and the page cache
    costs = []
    for _ in range(3):
        before = cpu_seconds(pid)
        size, _seconds, _busy = proxy_bench.fetch_everything(port)
        costs.append((cpu_seconds(pid) - before) / (size / 1e6))
    return min(costs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--imaptest", help="the imaptest binary")
    parser.add_argument("--clients", type=int, default=30, help="concurrent clients (30)")
    parser.add_argument("--seconds", type=int, default=10, help="seconds per round (10)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per path (3)")
    parser.add_argument("--profile", type=Path, help="directory for py-spy samples of serve")
    parser.add_argument("--fetch-messages", type=int, default=1000,
                        help="messages of ~50 KB fetched through serve for its CPU per MB (1000)")
    args = parser.parse_args()
    binary = find_imaptest(args.imaptest)
    if binary is None:
        print("skipped: imaptest not found (--imaptest, $IMAPTEST or PATH); "
              "bench/build-imaptest builds it")
        return 0

    root = dovecot.instance_root("mp-lbench-")
    store = dovecot.new_store(root, root / "provisioned" / "users", master_password="master-pw")
    proxy = Proxy(root / "proxy", store, overrides={"log": {"level": "info"}})
    users = [f"user{i:03d}@bench.example" for i in range(args.clients)]
    userfile = root / "imaptest-users"
    userfile.write_text("".join(f"{user}:{PASSWORD}\n" for user in users))
    print(f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at the start; imaptest {binary}", flush=True)
    rates: dict[str, list[float]] = {"direct": [], "proxy": []}
    # CPU ms per login, per path: serve alone, serve with its helper processes (hashing,
    # SQLite), Dovecot (every process of the store).
    cpu: dict[str, list[float]] = {key: [] for key in ("serve", "serve+helpers", "dovecot direct",
                                                       "dovecot via proxy")}
    try:
        add_accounts(f"sqlite:///{proxy.directory / 'proxy.db'}", users)
        # proxy_bench's FETCH account and mailbox, for serve's CPU per relayed MB.
        proxy_bench.add_accounts(f"sqlite:///{proxy.directory / 'proxy.db'}", [])
        proxy_bench.seed_maildir(store, args.fetch_messages, 50_000)
        store.start()
        proxy.start()
        assert proxy.process is not None
        ports = {"direct": store.imap_port, "proxy": proxy.imap_port}
        imaptest(binary, ports["direct"], userfile, args.clients, 2)  # warm both up
        imaptest(binary, ports["proxy"], userfile, args.clients, 2)
        pids = {"serve": proxy.process.pid, "dovecot": dovecot_master_pid(store)}
        for number in range(args.rounds):
            order = ("direct", "proxy") if number % 2 == 0 else ("proxy", "direct")
            for name in order:
                before = cpu_now(pids)
                rate = imaptest(binary, ports[name], userfile, args.clients, args.seconds)
                used = {k: v - before[k] for k, v in cpu_now(pids).items()}
                per_login = 1000 / (rate * args.seconds)
                if name == "proxy":
                    cpu["serve"].append(used["serve"] * per_login)
                    cpu["serve+helpers"].append(used["serve+helpers"] * per_login)
                cpu[f"dovecot {'direct' if name == 'direct' else 'via proxy'}"].append(
                    used["dovecot"] * per_login)
                rates[name].append(rate)
                print(f"round {number + 1} {name:6}: {rate:7.1f} logins/s", flush=True)
        relayed = cpu_per_mb(proxy.process.pid, proxy.imap_port)
        if args.profile:  # a round of its own: sampling slows serve down
            args.profile.mkdir(parents=True, exist_ok=True)
            out = args.profile / "serve-logins.txt"
            with profiler(proxy.process.pid, out, "-r", "250", "--threads"):
                imaptest(binary, ports["proxy"], userfile, args.clients, args.seconds)
            print("\nwhere serve's reactor spent its CPU (py-spy samples, inclusive, idle left "
                  "out):", *reactor_costs(out, 30), sep="\n")
    finally:
        proxy.stop()
        store.stop()
        dovecot.remove_root(root)
    direct, through = (statistics.median(rates[k]) for k in ("direct", "proxy"))
    ratio = through / direct
    print(f"\n{args.clients} clients, logins only, {args.seconds} s rounds, median of "
          f"{args.rounds}; load average {os.getloadavg()[0]:.1f} at the end")
    paired = statistics.median(p / d for p, d in zip(rates["proxy"], rates["direct"],
                                                       strict=True))
    print(f"direct Dovecot : {direct:7.1f} logins/s")
    print(f"through proxy  : {through:7.1f} logins/s = {ratio:.0%} of direct; per round "
          f"(each round's two runs side by side, which a load changing between rounds moves "
          f"less): median {paired:.0%} (target >= {TARGET:.0%}: "
          f"{'met' if min(ratio, paired) >= TARGET else 'missed'})")
    print(f"serve CPU per relayed MB (FETCH of {args.fetch_messages} messages through it, "
          f"best of 3): {relayed * 1000:.1f} ms")
    print("CPU per login, medians of the rounds: " + ", ".join(
        f"{name} {statistics.median(values):.2f} ms" for name, values in cpu.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
