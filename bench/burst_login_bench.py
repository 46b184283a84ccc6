"""First logins in a burst (a Monday morning): N users of a migrating domain, never seen by the
proxy, send LOGIN within the same instant. Measured in the same run: the old server's own login
latency for the same burst.

Each client connects and reads its greeting first; then all send LOGIN together, and the time
from LOGIN to the tagged OK is what a user waits. The clients come from one address (an office
behind one NAT) or from one address each. Target (issue 16): for a burst of 40, no failure on
any provisioning kind and p99 under 0.5 s, on SQLite and on PostgreSQL.

    .venv/bin/python bench/burst_login_bench.py [--users 40] [--rounds 3]
        [--provision passwd-dir passwd-file] [--database sqlite postgresql]
        [--peers one many]
        [--profile DIR]   # py-spy samples of serve during each burst, summarised at the end
                          # (.venv/bin/pip install -e '.[bench]')
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import secrets
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.sampling import cpu_seconds, profiler
from tests.support import dovecot
from tests.support.dovecot import DovecotInstance
from tests.support.proxy import Proxy

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=test connect_timeout=3"
TARGET_P99_MS = 500.0


def burst(port: int, users: dict[str, str], many_peers: bool = False
          ) -> tuple[list[float], list[str]]:
    """LOGIN -> tagged answer for every user at once: (latencies of the OKs in ms, failures)."""
    ready = threading.Barrier(len(users) + 1)
    latencies: list[float] = []
    failures: list[str] = []

    def one(n: int, user: str, password: str) -> None:
        source = (f"127.0.{1 + n // 250}.{1 + n % 250}", 0) if many_peers else None
        sock = socket.create_connection(("127.0.0.1", port), timeout=60, source_address=source)
        reader = sock.makefile("rb")
        reader.readline()  # greeting
        ready.wait()
        started = time.perf_counter()
        sock.sendall(f'a LOGIN "{user}" "{password}"\r\n'.encode())
        line = reader.readline()
        while line and not line.startswith(b"a "):
            line = reader.readline()
        elapsed = (time.perf_counter() - started) * 1000
        if line.startswith(b"a OK"):
            latencies.append(elapsed)
        else:
            failures.append(line.decode(errors="replace").strip() or "connection closed")
        with contextlib.suppress(OSError):
            sock.sendall(b"z LOGOUT\r\n")
        sock.close()

    threads = [threading.Thread(target=one, args=(n, *item))
               for n, item in enumerate(users.items())]
    for thread in threads:
        thread.start()
    ready.wait()
    for thread in threads:
        thread.join()
    return latencies, failures


def p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] if ordered else float("nan")


def median(samples: list[float]) -> float:
    return statistics.median(samples) if samples else float("nan")


@contextlib.contextmanager
def database(kind: str) -> Iterator[str | None]:
    """A fresh database URL for the proxy (None: the Proxy's own SQLite file)."""
    if kind == "sqlite":
        yield None
        return
    import psycopg

    name = f"mp_bench_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"postgresql://postgres@127.0.0.1:5432/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def where_the_time_goes(profiles: list[Path], top: int = 12) -> list[str]:
    """Where serve's login threads were (on CPU or waiting), by samples: the deepest
    migrating_proxy frame of each sample of a thread deciding a login."""
    counts: Counter[str] = Counter()
    for profile in profiles:
        for line in profile.read_text().splitlines():
            stack, _, samples = line.rpartition(" ")
            frames = stack.split(";")
            if len(frames) < 2 or "PoolThread-login" not in frames[1]:
                continue
            ours = [frame for frame in frames if "migrating_proxy/" in frame]
            if ours:
                counts[ours[-1].split(" (")[0] + " (" + ours[-1].rsplit("/", 1)[-1]] += \
                    int(samples)
    total = sum(counts.values()) or 1
    return [f"  {100 * n / total:5.1f} %  {name}" for name, n in counts.most_common(top)]


def new_store(root: Path, provision: str) -> DovecotInstance:
    """The store as deploy/dovecot/ configures it; for passwd-file, its passdb reads one file
    (`users_file`) instead of one file per account."""
    store = dovecot.new_store(root, root / "provisioned")
    if provision == "passwd-file":
        snippet = root / "conf.d" / "migrating-proxy.conf"
        single = store.users_file / "all-users"
        snippet.write_text(snippet.read_text().replace(f"{store.users_file}/%Ld/%Ln",
                                                       str(single)))
        store.users_file = single
    return store


def proxy_burst(old: DovecotInstance, store: DovecotInstance, users: dict[str, str],
                provision: str, db: str, many_peers: bool, profile: Path | None
                ) -> tuple[list[float], list[str], float]:
    """One burst at a fresh proxy: (latencies, failures, serve's CPU ms per login)."""
    directory = Path(tempfile.mkdtemp(prefix="mp-burst-"))
    try:
        with database(db) as url:
            overrides: dict = {
                "provision": {"kind": provision, "path": str(store.users_file), "rounds": 0},
                "log": {"level": "info"}, "migration": {"workers": 0},
            }
            if url:
                overrides["database"] = {"url": url}
            proxy = Proxy(directory, store, overrides=overrides)
            proxy.cli("domain", "add", "old.example", "--source",
                      f"imap://127.0.0.1:{old.imap_port}")
            with proxy:
                assert proxy.process is not None
                before = cpu_seconds(proxy.process.pid)
                with profiler(proxy.process.pid, profile, "--idle", "--threads",
                              "--subprocesses", "-r", "200"):
                    latencies, failures = burst(proxy.imap_port, users, many_peers)
                cpu = (cpu_seconds(proxy.process.pid) - before) / len(users) * 1000
        return latencies, failures, cpu
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--provision", nargs="+", default=["passwd-dir", "passwd-file"])
    parser.add_argument("--database", nargs="+", default=["sqlite", "postgresql"])
    parser.add_argument("--peers", nargs="+", choices=["one", "many"], default=["one", "many"])
    parser.add_argument("--profile", type=Path, default=None)
    args = parser.parse_args()
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    cases = [(provision, db, peers) for provision in args.provision
             for db in args.database for peers in args.peers]
    samples: dict[str, list[float]] = defaultdict(list)
    failures: dict[str, list[str]] = defaultdict(list)
    cpu: dict[str, list[float]] = defaultdict(list)
    profiles: list[Path] = []
    print(f"first logins in a burst of {args.users}, {dt.date.today()}, {platform.node()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}, {args.rounds} rounds, "
          f"load average {os.getloadavg()[0]:.1f} at the start")
    for round_no in range(args.rounds):
        users = {f"r{round_no}u{n}@old.example": f"pw-{round_no}-{n}" for n in range(args.users)}
        root = dovecot.instance_root("mp-bb-")
        try:
            with dovecot.running_old_server(users, "mp-bb-old-") as old:
                burst(old.imap_port, dict(list(users.items())[:3]))  # warm up
                latencies, failed = burst(old.imap_port, users)
                samples["old server's own login"] += latencies
                failures["old server's own login"] += failed
                for n, (provision, db, peers) in enumerate(cases):
                    where = "an address each" if peers == "many" else "one address"
                    name = f"proxy: {provision}, {db}, {where}"
                    profile = args.profile / f"{round_no}-{n}.txt" if args.profile else None
                    # A fresh proxy database and store each time: every login is a first one.
                    with new_store(root / str(n), provision) as store:
                        latencies, failed, used = proxy_burst(
                            old, store, users, provision, db, peers == "many", profile)
                    samples[name] += latencies
                    failures[name] += failed
                    cpu[name].append(used)
                    if profile is not None and profile.exists():
                        profiles.append(profile)
                    print(f"  round {round_no + 1}: {name}: median {median(latencies):.0f} ms,"
                          f" p99 {p99(latencies):.0f} ms, {len(failed)} failed", flush=True)
        finally:
            dovecot.remove_root(root)
    report(samples, failures, cpu, profiles)


def report(samples: dict[str, list[float]], failures: dict[str, list[str]],
           cpu: dict[str, list[float]], profiles: list[Path]) -> None:
    old = samples["old server's own login"]
    print(f"\n{'':48} {'median ms':>9} {'p99 ms':>8} {'failed':>7} {'p99 / old':>9} "
          f"{'CPU/login':>9}  p99 < {TARGET_P99_MS:.0f} ms")
    for name, latencies in samples.items():
        ratio = p99(latencies) / p99(old) if name != "old server's own login" else 1.0
        used = f"{median(cpu[name]):.1f} ms" if cpu.get(name) else ""
        verdict = "met" if p99(latencies) < TARGET_P99_MS and not failures[name] else "MISSED"
        print(f"{name:48} {median(latencies):9.0f} {p99(latencies):8.0f} "
              f"{len(failures[name]):7d} {ratio:9.2f} {used:>9}  {verdict}")
        for reason, count in Counter(failures[name]).most_common(3):
            print(f"    {count} x {reason}")
    if profiles:
        print("\nwhere serve's login threads spent the bursts (py-spy samples, on CPU or "
              "waiting):")
        print("\n".join(where_the_time_goes(profiles)))


if __name__ == "__main__":
    main()
