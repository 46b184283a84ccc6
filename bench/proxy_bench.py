"""Proxy benchmark: login latency, bulk FETCH throughput and idle-session memory, proxy vs direct.

    .venv/bin/python bench/proxy_bench.py [--quick] [--logins N] [--messages N] [--sessions N]
                                          [--upstream store|old]

With `--upstream old` the same login and FETCH measurements are made for a passthrough session
(transparent cutover): a user of a passthrough domain not switched yet, whose session the proxy
relays to the old server, against that old server directly. The old server checks the same
sha512_crypt hash as the proxy (its passwd-file has the {SHA512-CRYPT} form of the account's
hash), so through the proxy the hash is checked twice: by the proxy, then by the old server at
the proxy's login there. The idle-session memory test is the store's only (same relay code).

Starts one throw-away new-store Dovecot (tests/support/dovecot.py) and one `migrating-proxy
serve` in front of it (tests/support/proxy.py), then measures, against that same store:

1. LOGIN latency (LOGIN sent -> tagged OK, and connect -> tagged OK), N sequential logins each
   way, interleaved. Both paths check the same sha512_crypt hash once: directly, Dovecot's auth
   process checks the provisioned `{SHA512-CRYPT}` line; through the proxy, the proxy checks the
   account's hash and logs in to Dovecot as the master user ({PLAIN} master password, and the
   user is only looked up, not verified). So proxy - direct is the proxy's cost beyond the hash.
   The hash alone (passlib, as the proxy calls it) is timed as well.
2. FETCH 1:* BODY.PEEK[] of one large INBOX over one connection, read with a raw socket.
3. Proxy RSS before and after opening N logged-in, SELECTed, idle IMAP sessions.
4. Metrics overhead: a second `serve` on the same database and store with `[metrics] listen`
   on (and /metrics scraped every SCRAPE_INTERVAL seconds meanwhile) takes part in (1) and (2),
   interleaved with the others; its medians divided by the first proxy's must stay within 2 %.

Exit status is 0 even when a target is missed: this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import random
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from migrating_proxy.passwords import PasswordHasher, dovecot_form  # noqa: E402
from migrating_proxy.store import AccountState, Domain, open_store  # noqa: E402
from tests.support import dovecot  # noqa: E402
from tests.support.mail import make_message  # noqa: E402
from tests.support.proxy import Proxy  # noqa: E402

HOST = "127.0.0.1"
SCHEME, ROUNDS = "sha512_crypt", 5000  # the test fixture's cost; see --rounds
USER, PASSWORD = "alice@bench.example", "alice-pw"
IDLE_PASSWORD = "idle-pw"
FETCH_TAG = b"Zf9"
SCRAPE_INTERVAL = 5.0  # seconds; Prometheus' default is 15 s, scraping more often is harsher

LIMITS_CONF = """# Written by bench/proxy_bench.py: room for {n} concurrent sessions
# (one user and IP, or many users), instead of Dovecot's defaults: 10 per user+IP,
# 1024 imap processes, 1000 clients per service (log, stats and anvil each hold one
# connection per imap process).
mail_max_userip_connections = {n}
default_process_limit = {n}
default_client_limit = {clients}
service imap {{
  process_limit = {n}
}}
"""


# --- small helpers -------------------------------------------------------------------------


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[int(rank) - 1]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def proc_status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def children(ppid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            if int(stat.rpartition(")")[2].split()[1]) == ppid:
                out.append(int(entry.name))
    return out


def dovecot_imap_pss_kb(master_pid: int) -> tuple[int, int]:
    """(number of `imap` mail processes below the master, their summed PSS in KB)."""
    count = total = 0
    for pid in children(master_pid):
        with contextlib.suppress(OSError, ValueError):
            if Path(f"/proc/{pid}/comm").read_text().strip() != "imap":
                continue
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    count += 1
    return count, total


def master_pid(store: dovecot.DovecotInstance) -> int:
    return int((store.base_dir / "master.pid").read_text().split()[0])


class IMAPConn:
    """Just enough raw IMAP: lines, tagged completion, no parsing of the payload."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.pending = b""

    def readline(self) -> bytes:
        while b"\r\n" not in self.pending:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed; last data {self.pending[-200:]!r}")
            self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\r\n")
        return line

    def command(self, tag: str, text: str) -> bytes:
        """Send one command, skip untagged lines, return the tagged completion line."""
        self.sock.sendall(f"{tag} {text}\r\n".encode())
        return self.until_tag(tag)

    def until_tag(self, tag: str) -> bytes:
        prefix = tag.encode() + b" "
        while True:
            line = self.readline()
            if line.startswith(prefix):
                return line

    def expect_ok(self, tag: str, text: str) -> None:
        answer = self.command(tag, text)
        if not answer.startswith(f"{tag} OK".encode()):
            raise RuntimeError(f"{text.split()[0]} failed: {answer[:200]!r}")

    def close(self, logout: bool = True) -> None:
        with contextlib.suppress(OSError):
            if logout:
                self.command("Q", "LOGOUT")
        self.sock.close()


def login_conn(port: int, user: str, password: str) -> IMAPConn:
    conn = IMAPConn(port)
    conn.readline()
    conn.expect_ok("L", f'LOGIN "{user}" "{password}"')
    return conn


# --- environment ---------------------------------------------------------------------------


def machine_info() -> list[str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    dovecot_version = subprocess.run(["dovecot", "--version"], capture_output=True,
                                     text=True).stdout.strip()
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or "?"
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"],
                           capture_output=True, text=True).stdout.strip()
    versions = ", ".join(f"{name} {metadata.version(name)}"
                         for name in ("twisted", "passlib", "sqlalchemy", "structlog"))
    from passlib.hash import sha512_crypt
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return [
        f"date     : {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"machine  : {os.cpu_count()} CPUs ({cpu}), {mem_gb:.0f} GiB RAM, "
        f"Linux {platform.release()}, load avg {os.getloadavg()[0]:.2f} at start",
        f"software : Python {platform.python_version()}, {versions}, Dovecot {dovecot_version},"
        f" passlib sha512_crypt backend {sha512_crypt.get_backend()}",
        f"code     : commit {commit}{' + uncommitted changes' if dirty else ''}",
    ]


def raise_fd_limit(needed: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def seed_maildir(store: dovecot.DovecotInstance, count: int, size: int) -> int:
    """Write count messages of ~size bytes into USER's INBOX as maildir files; total bytes."""
    root = store.maildir(USER)
    cur = root / "cur"
    for sub in ("cur", "new", "tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = random.Random(1)
    total = 0
    start = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    for index in range(count):
        when = start + dt.timedelta(hours=index)
        raw = make_message(f"Bench message {index}", "bench\n", when,
                           size=int(size * rng.uniform(0.8, 1.2)))
        stamp = int(when.timestamp())
        path = cur / f"{stamp}.M{index}P1.bench:2,S"
        path.write_bytes(raw)
        os.utime(path, (stamp, stamp))
        total += len(raw)
    mail = store.root / "mail"
    owner = f"{mail.stat().st_uid}:{mail.stat().st_gid}"
    subprocess.run(["chown", "-R", owner, str(mail)], check=True)
    return total


def add_accounts(db_url: str, idle_users: list[str], old_server: str | None = None) -> str:
    """Accounts in the proxy's database, in-process (one CLI call each would take minutes).
    `serve` writes the store's provisioned file from the database when it starts. Returns
    the stored hash of USER. With old_server (an IMAP URL), USER belongs to a passthrough
    domain whose old server that is, and is not switched: its sessions go there."""
    hasher = PasswordHasher(SCHEME, ROUNDS)
    store = open_store(db_url)
    try:
        alice = hasher.hash(PASSWORD)
        if old_server is None:
            store.accounts.add_account(USER, alice)
        else:
            store.accounts.add_domain(Domain(USER.partition("@")[2], old_server, notice=False))
            store.accounts.add_account(USER, alice, migration_state=AccountState.PENDING)
        idle_hash = hasher.hash(IDLE_PASSWORD)  # one salt for all: the bench needs no more
        for address in idle_users:
            store.accounts.add_account(address, idle_hash)
    finally:
        store.close()
    return alice


# --- measurements --------------------------------------------------------------------------


@dataclass
class Row:
    metric: str
    direct: str
    proxy: str
    relation: str
    target: str
    ok: bool | None  # None: informational

    @property
    def verdict(self) -> str:
        return "info" if self.ok is None else ("PASS" if self.ok else "** FAIL **")


def time_hash(stored: str, count: int) -> list[float]:
    hasher = PasswordHasher(SCHEME, ROUNDS)
    times = []
    for _ in range(count):
        start = time.perf_counter()
        if not hasher.verify(PASSWORD, stored).ok:
            raise RuntimeError("hash does not verify")
        times.append(time.perf_counter() - start)
    return times


def one_login(port: int) -> tuple[float, float]:
    """(LOGIN -> tagged OK, connect -> tagged OK) in seconds; the session is then logged out."""
    started = time.perf_counter()
    conn = IMAPConn(port)
    conn.readline()
    sent = time.perf_counter()
    conn.sock.sendall(f'L LOGIN "{USER}" "{PASSWORD}"\r\n'.encode())
    answer = conn.until_tag("L")
    done = time.perf_counter()
    if not answer.startswith(b"L OK"):
        raise RuntimeError(f"login failed: {answer[:200]!r}")
    conn.close()
    return done - sent, done - started


def rotated(sides: dict[str, int], index: int) -> list[tuple[str, int]]:
    """The sides in a different order each round, so drift hits every side alike."""
    order = list(sides.items())
    shift = index % len(order)
    return order[shift:] + order[:shift]


def measure_logins(sides: dict[str, int], count: int) -> dict[str, dict[str, list[float]]]:
    """sides: name -> IMAP port ("direct", "proxy", and "metrics" for the metrics-on proxy)."""
    results: dict[str, dict[str, list[float]]] = {
        side: {"login": [], "connect": []} for side in sides
    }
    for _ in range(5):  # warm-up: processes spawned, caches filled, threads started
        for port in sides.values():
            one_login(port)
    for index in range(count):
        for side, port in rotated(sides, index):
            login, total = one_login(port)
            results[side]["login"].append(login)
            results[side]["connect"].append(total)
    return results


def cpu_ticks() -> tuple[int, int]:
    """(all, idle) jiffies of the whole machine, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields), fields[3] + fields[4]


def fetch_everything(port: int) -> tuple[int, float, float]:
    """Bytes received, seconds, and how busy the machine's CPUs were (0..1) during
    FETCH 1:* BODY.PEEK[] (login and SELECT not timed)."""
    conn = login_conn(port, USER, PASSWORD)
    conn.expect_ok("S", "SELECT INBOX")
    sock = conn.sock
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    marker = b"\r\n" + FETCH_TAG + b" "
    tail = b""
    total = 0
    ticks = cpu_ticks()
    start = time.perf_counter()
    sock.sendall(FETCH_TAG + b" FETCH 1:* BODY.PEEK[]\r\n")
    while True:
        n = sock.recv_into(buf)
        if not n:
            raise ConnectionError("connection closed during FETCH")
        total += n
        tail = (tail + bytes(view[max(0, n - 1024):n]))[-2048:]
        at = tail.rfind(marker)
        if at >= 0 and tail.endswith(b"\r\n"):
            break
    elapsed = time.perf_counter() - start
    all_ticks, idle_ticks = (b - a for a, b in zip(ticks, cpu_ticks(), strict=True))
    busy = 1 - idle_ticks / all_ticks if all_ticks else 0.0
    status = tail[at + 2:].split(b"\r\n", 1)[0]
    if not status.startswith(FETCH_TAG + b" OK"):
        raise RuntimeError(f"FETCH failed: {status[:200]!r}")
    conn.close()
    return total, elapsed, busy


def measure_fetch(sides: dict[str, int], repeats: int
                  ) -> dict[str, list[tuple[int, float, float]]]:
    fetch_everything(sides["direct"])  # untimed: builds Dovecot's index, fills the page cache
    runs: dict[str, list[tuple[int, float, float]]] = {side: [] for side in sides}
    for index in range(repeats):
        for side, port in rotated(sides, index):
            runs[side].append(fetch_everything(port))
    return runs


@contextlib.contextmanager
def scraping(port: int, interval: float) -> Iterator[list[int]]:
    """GET /metrics every `interval` seconds in a thread, as Prometheus would; yields the
    list of response sizes (one per scrape)."""
    sizes: list[int] = []
    stop = threading.Event()

    def scrape() -> None:
        while not stop.wait(interval):
            with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as answer:
                sizes.append(len(answer.read()))

    thread = threading.Thread(target=scrape, daemon=True)
    thread.start()
    try:
        yield sizes
    finally:
        stop.set()
        thread.join(timeout=15)


@contextlib.contextmanager
def idle_sessions(port: int, users: list[str]) -> Iterator[list[IMAPConn]]:
    """Every user logged in through `port`, INBOX selected, left idle; all closed at the end."""
    conns: list[IMAPConn] = []

    def open_one(user: str) -> IMAPConn:
        conn = login_conn(port, user, IDLE_PASSWORD)
        conn.expect_ok("S", "SELECT INBOX")
        return conn

    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            for conn in pool.map(open_one, users):
                conns.append(conn)
        yield conns
    finally:
        for conn in conns:
            conn.close(logout=False)


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def measure_memory(proxy: Proxy, store: dovecot.DovecotInstance, users: list[str]
                   ) -> dict[str, float]:
    assert proxy.process is not None
    pid, master = proxy.process.pid, master_pid(store)
    wait_until(lambda: dovecot_imap_pss_kb(master)[0] == 0, 20)
    time.sleep(0.5)
    before = proc_status_kb(pid, "VmRSS")
    hwm_before = proc_status_kb(pid, "VmHWM")
    store_before = dovecot_imap_pss_kb(master)
    start = time.monotonic()
    with idle_sessions(proxy.imap_port, users) as conns:
        opened = time.monotonic() - start
        time.sleep(1.0)
        after = proc_status_kb(pid, "VmRSS")
        hwm_after = proc_status_kb(pid, "VmHWM")
        store_after = dovecot_imap_pss_kb(master)
        # The sessions are alive: one NOOP round trip on a sample of them.
        for conn in conns[:: max(1, len(conns) // 20)]:
            conn.expect_ok("N", "NOOP")
    wait_until(lambda: dovecot_imap_pss_kb(master)[0] == 0, 30)
    return {
        "sessions": len(users), "before": before, "after": after, "hwm_before": hwm_before,
        "hwm_after": hwm_after, "opened_s": opened,
        "store_processes": store_after[0] - store_before[0],
        "store_pss": store_after[1] - store_before[1],
        "after_close": proc_status_kb(pid, "VmRSS"),
    }


# --- report --------------------------------------------------------------------------------


def print_table(rows: list[Row]) -> None:
    headers = Row("metric", "direct", "proxy", "proxy vs direct", "target", None)
    cells = [[r.metric, r.direct, r.proxy, r.relation, r.target, r.verdict]
             for r in [headers, *rows]]
    cells[0][-1] = "result"
    widths = [max(len(c[i]) for c in cells) for i in range(6)]
    for index, row in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if index == 0:
            print("  ".join("-" * w for w in widths))


def login_rows(hash_times: list[float], logins: dict[str, dict[str, list[float]]]
               ) -> list[Row]:
    rows = [Row("sha512_crypt verify alone (median)", "", ms(statistics.median(hash_times)),
                f"p99 {ms(percentile(hash_times, 99))}", f"{ROUNDS} rounds", None)]
    for kind, label in (("login", "LOGIN -> OK"), ("connect", "connect -> LOGIN OK")):
        direct, proxied = logins["direct"][kind], logins["proxy"][kind]
        for name, stat in (("median", statistics.median), ("p99", lambda v: percentile(v, 99))):
            d, p = stat(direct), stat(proxied)
            is_target = name == "median"
            rows.append(Row(
                f"{label} ({name}, n={len(direct)})", ms(d), ms(p), f"+{ms(p - d)}",
                "< +5 ms" if is_target else "", (p - d < 0.005) if is_target else None,
            ))
    return rows


def fetch_rows(runs: dict[str, list[tuple[int, float, float]]]) -> list[Row]:
    def rates(side: str) -> list[float]:
        return [size / 1e6 / seconds for size, seconds, _busy in runs[side]]

    direct, proxied = rates("direct"), rates("proxy")
    rows = []
    for name, stat in (("best", max), ("median", statistics.median)):
        d, p = stat(direct), stat(proxied)
        rows.append(Row(f"FETCH 1:* BODY.PEEK[] ({name} of {len(direct)})", f"{d:.0f} MB/s",
                        f"{p:.0f} MB/s", f"{p / d:.1%}", ">= 90 %" if name == "best" else "",
                        p / d >= 0.9 if name == "best" else None))
    return rows


def overhead_rows(logins: dict[str, dict[str, list[float]]],
                  runs: dict[str, list[tuple[int, float, float]]]) -> list[Row]:
    """Metrics on vs off, both through the proxy: columns "direct"/"proxy" hold off/on."""
    rows = []
    for kind, label in (("login", "LOGIN -> OK"), ("connect", "connect -> LOGIN OK")):
        off, on = (statistics.median(logins[side][kind]) for side in ("proxy", "metrics"))
        rows.append(Row(f"metrics on vs off: {label} median", ms(off), ms(on),
                        f"{on / off:.1%}", "<= 102 %", on / off <= 1.02))
    off_rate, on_rate = (statistics.median(size / 1e6 / seconds for size, seconds, _b in
                                           runs[side]) for side in ("proxy", "metrics"))
    rows.append(Row("metrics on vs off: FETCH median", f"{off_rate:.0f} MB/s",
                    f"{on_rate:.0f} MB/s", f"{on_rate / off_rate:.1%}", ">= 98 %",
                    on_rate / off_rate >= 0.98))
    return rows


def memory_rows(mem: dict[str, float]) -> list[Row]:
    n = int(mem["sessions"])
    per = (mem["after"] - mem["before"]) / n
    store_per = mem["store_pss"] / max(1, mem["store_processes"])
    return [
        Row(f"proxy RSS, {n} idle sessions", "", f"{mem['before'] / 1024:.1f} -> "
            f"{mem['after'] / 1024:.1f} MB", f"VmHWM {mem['hwm_after'] / 1024:.1f} MB", "",
            None),
        Row("proxy memory per idle session", "", f"{per:.1f} KB", "", "< 20 KB", per < 20),
        Row("store (Dovecot imap) PSS per session", f"{store_per:.0f} KB", "", "separate "
            f"({int(mem['store_processes'])} procs)", "", None),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run (seconds)")
    parser.add_argument("--logins", type=int, help="sequential logins each way (200)")
    parser.add_argument("--messages", type=int, help="messages in the FETCH mailbox (2000)")
    parser.add_argument("--size", type=int, default=50_000, help="bytes per message (~50 KB)")
    parser.add_argument("--repeats", type=int, help="FETCH runs each way (5)")
    parser.add_argument("--sessions", type=int, help="idle sessions for the memory test (1000)")
    parser.add_argument("--keep", action="store_true", help="keep the instance directory")
    parser.add_argument("--upstream", choices=("store", "old"), default="store",
                        help="where the measured sessions are relayed: the store (default) or, "
                             "for a passthrough account, its old server")
    args = parser.parse_args()
    passthrough = args.upstream == "old"
    quick = args.quick
    n_logins = args.logins or (20 if quick else 200)
    n_messages = args.messages or (100 if quick else 2000)
    repeats = args.repeats or (1 if quick else 5)
    n_sessions = args.sessions or (50 if quick else 1000)

    print("migrating-proxy benchmark" + (" (--quick: smoke run, figures not meaningful)"
                                        if quick else "")
          + (": passthrough sessions, relayed to the old server" if passthrough else ""))
    print("\n".join(machine_info()))
    # The proxy (started by Popen from here) inherits the limit: 2 fds per session, plus ours.
    fd_limit = raise_fd_limit(4 * n_sessions + 1024)

    root = dovecot.instance_root("mp-pbench-")
    store = dovecot.new_store(root, root / "provisioned" / "users", master_password="master-pw")
    n = n_sessions + 200
    extra = root / "bench-limits.conf"
    extra.write_text(LIMITS_CONF.format(n=n, clients=3 * n + 1000))
    with store.config_path.open("a") as config:
        config.write(f"!include {extra}\n")
    proxy = Proxy(root / "proxy", store, overrides={"log": {"level": "info"}})
    metrics_port = dovecot.free_port()
    # The same database and store, metrics on: only the [metrics] section differs.
    metered = Proxy(root / "proxy-metrics", store, overrides={
        "log": {"level": "info"}, "metrics": {"listen": f"{HOST}:{metrics_port}"},
        "database": {"url": f"sqlite:///{proxy.directory / 'proxy.db'}"}})
    idle_users = [] if passthrough else [f"idle{i:04d}@bench.example" for i in range(n_sessions)]
    # What the proxy's sessions are relayed to, and what is measured directly beside it.
    direct = dovecot.old_server(root / "old", {USER: PASSWORD}) if passthrough else store
    sections: dict[str, list[Row]] = {}
    runs: dict[str, list[tuple[int, float, float]]] = {}
    try:
        started = time.monotonic()
        alice_hash = add_accounts(f"sqlite:///{proxy.directory / 'proxy.db'}", idle_users,
                                  f"imap://{HOST}:{direct.imap_port}" if passthrough else None)
        if passthrough:  # the old server checks the very hash the proxy checks
            direct.users_file.write_text(f"{USER}:{dovecot_form(alice_hash)}\n")
        size = seed_maildir(direct, n_messages, args.size)
        store.start()
        direct.start()
        proxy.start()
        metered.start()
        print(f"setup    : {n_messages} messages ({size / 1e6:.0f} MB) in one INBOX, "
              f"{n_sessions + 1} accounts, fd limit {fd_limit}, "
              f"{time.monotonic() - started:.1f} s")
        print(f"hashing  : {SCHEME}, {ROUNDS} rounds, for the proxy's accounts and the store's "
              "provisioned file alike")
        print()

        step = time.monotonic()
        sides = {"direct": direct.imap_port, "proxy": proxy.imap_port,
                 "metrics": metered.imap_port}
        hash_times = time_hash(alice_hash, n_logins)
        with scraping(metrics_port, SCRAPE_INTERVAL) as scrapes:
            logins = measure_logins(sides, n_logins)
        sections["login"] = login_rows(hash_times, logins)
        print(f"[logins done in {time.monotonic() - step:.1f} s; /metrics scraped "
              f"{len(scrapes)} times]", flush=True)

        if not passthrough:
            step = time.monotonic()
            mem = measure_memory(proxy, store, idle_users)
            sections["memory"] = memory_rows(mem)
            print(f"[memory done in {time.monotonic() - step:.1f} s: {n_sessions} sessions "
                  f"opened in {mem['opened_s']:.1f} s; proxy RSS after closing them "
                  f"{mem['after_close'] / 1024:.1f} MB]", flush=True)

        step = time.monotonic()
        with scraping(metrics_port, SCRAPE_INTERVAL):
            runs = measure_fetch(sides, repeats)
        sections["fetch"] = fetch_rows(runs)
        sections["metrics"] = overhead_rows(logins, runs)
        print(f"[fetch done in {time.monotonic() - step:.1f} s: "
              + "; ".join(f"{side} " + ", ".join(f"{b / 1e6 / s:.0f} MB/s (CPUs {u:.0%} busy)"
                                                for b, s, u in r)
                          for side, r in runs.items()) + "]", flush=True)
    finally:
        metered.stop()
        proxy.stop()
        store.stop()
        direct.stop()
        if args.keep:
            print(f"kept {root}")
        else:
            dovecot.remove_root(root)

    rows = [row for name in ("login", "fetch", "memory", "metrics")
            for row in sections.get(name, [])]
    print()
    print_table(rows)
    print()
    print("Notes:")
    if passthrough:
        print(f"- Passthrough: direct, the old server verifies the {SCHEME} hash ({ROUNDS} "
              "rounds) once; via the")
        print("  proxy it is verified twice: by the proxy (passlib), then by the old server at "
              "the proxy's login")
        print("  there with the user's own password. 'proxy - direct' includes one hash.")
    else:
        print(f"- Both login paths verify the same {SCHEME} hash ({ROUNDS} rounds) once: "
              "direct, Dovecot's auth process")
        print("  does; via the proxy, the proxy does (passlib) and then logs in to Dovecot as "
              "the master user,")
        print("  whose {PLAIN} password costs nothing. So 'proxy - direct' is the overhead "
              "beyond the hash.")
    print("- 'LOGIN -> OK' excludes connect+greeting; the proxy greets at once and connects to "
          "Dovecot only")
    print("  after LOGIN, so it pays Dovecot's greeting inside LOGIN -> OK. 'connect -> LOGIN OK'"
          " is what")
    print("  a client waits for in total.")
    print(f"- Everything (client, proxy, Dovecot) shares {os.cpu_count()} CPUs; the proxy "
          "relays in one process.")
    print("- Per-session memory is the proxy's RSS growth; kernel socket buffers are not in it.")
    print("- 'metrics on vs off': the 'direct' column is the proxy without metrics, 'proxy' a "
          "second serve")
    print(f"  with [metrics] listen, same database and store, /metrics scraped every "
          f"{SCRAPE_INTERVAL:.0f} s.")
    busy = [u for side in runs.values() for _b, _s, u in side] if runs else []
    if busy and statistics.median(busy) >= 0.95:
        print(f"- WARNING: the CPUs were {statistics.median(busy):.0%} busy (median) during the "
              "FETCH runs: with the")
        print("  proxy as a third busy process on a saturated machine, the FETCH ratio measures "
              "CPU contention,")
        print(f"  not the relay. Re-run on an idle machine (load avg now "
              f"{os.getloadavg()[0]:.2f}).")
    failed = [r.metric for r in rows if r.ok is False]
    print()
    print("RESULT: " + ("all targets met" if not failed else
                        f"{len(failed)} TARGET(S) MISSED: " + "; ".join(failed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
