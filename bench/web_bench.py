"""The web console's accounts page with 100,000 accounts: how long one page takes to answer.

Builds a database with one domain of N accounts (every state, progress counters, a job for
the running and failed ones, errors), starts a real `migrating-proxy web`, and times what the
accounts page asks for: one page of 50 status rows (sorted, filtered, searched, first and last
page), the page's HTML, and the domain totals of its header (recomputed at most every 2 s, so
both the shared answer and a fresh computation are shown). The peer, measured in the same run:
`status --domain D --json` over the same accounts (the CLI's whole-domain answer).
Target (issue 12): a page in under 200 ms.

    .venv/bin/python bench/web_bench.py [--accounts N] [--rounds R] [--database-url URL]
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from sqlalchemy import insert

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from migrating_proxy.store import open_store
from migrating_proxy.store.schema import accounts, jobs, migrations
from tests.support.web import WebConsole

DOMAIN = "old.example"
STATES = ["COMPLETED"] * 6 + ["PENDING"] * 2 + ["NEW", "ERROR"]


def populate(url: str, count: int) -> None:
    """N accounts in one domain, inserted in bulk (the bench measures reads, not imports)."""
    store = open_store(url)
    now = dt.datetime.now(dt.UTC)
    rng = random.Random(12)
    account_rows, migration_rows, job_rows = [], [], []
    for n in range(1, count + 1):
        state = STATES[n % len(STATES)]
        address = f"user{n:06d}@{DOMAIN}"
        account_rows.append({"id": n, "address": address, "address_key": address,
                             "domain": DOMAIN, "password_hash": "$6$x", "created_at": now,
                             "updated_at": now, "migration_state": state})
        total = rng.randint(10, 20_000)
        copied = total if state == "COMPLETED" else rng.randint(0, total)
        migration_rows.append({
            "account_id": n, "folders_total": 12, "folders_done": 12 * copied // total,
            "messages_total": total, "messages_copied": copied, "messages_skipped": 0,
            "bytes_copied": copied * 40_000, "started_at": now, "last_pass_at": now,
            "finished_at": now if state == "COMPLETED" else None,
            "last_error": "the old server refused the password" if state == "ERROR" else None})
        if state in ("PENDING", "ERROR"):
            job_rows.append({"account_id": n, "kind": "full", "source_host": "mail.old.example",
                             "state": "running" if state == "PENDING" else "failed",
                             "not_before": now, "attempts": 1, "created_at": now,
                             "last_error": "timeout" if state == "ERROR" else None})
    with store.engine.begin() as conn:
        for table, rows in ((accounts, account_rows), (migrations, migration_rows),
                            (jobs, job_rows)):
            for start in range(0, len(rows), 5000):
                conn.execute(insert(table), rows[start:start + 5000])
    store.close()


def timed(fetch: callable, rounds: int) -> tuple[float, float]:  # type: ignore[valid-type]
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        fetch()
        samples.append((time.perf_counter() - started) * 1000)
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--database-url", help="default: a new SQLite file")
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="mp-webbench-"))
    url = args.database_url or f"sqlite:///{directory / 'proxy.db'}"
    web = WebConsole(directory, {"database": {"url": url}, "log": {"level": "info"}})
    web.cli("domain", "add", DOMAIN, "--source", "imaps://mail.old.example")
    started = time.perf_counter()
    populate(url, args.accounts)
    print(f"{args.accounts:,} accounts written in {time.perf_counter() - started:.1f} s")
    web.add_admin()
    token = web.token()
    base = {"domain": DOMAIN, "limit": 50}
    pages = {
        "first page, by address": {},
        "by progress, descending": {"sort": "-progress"},
        "by bytes copied": {"sort": "bytes_copied"},
        "last page": {"offset": args.accounts - 50},
        "state ERROR": {"state": "ERROR"},
        "search 'user0999'": {"q": "user0999"},
    }
    with web, httpx.Client(base_url=web.url, timeout=120,
                           headers={"Authorization": f"Bearer {token}"}) as http:
        def page(extra: dict[str, object]) -> None:
            http.get("/api/v1/status", params={**base, **extra}).raise_for_status()

        def totals() -> None:
            http.get("/api/v1/totals").raise_for_status()

        def fresh_totals() -> None:  # a change (here: a no-op stop) forgets the shared totals
            http.post("/api/v1/stop", json={"addresses": [f"user000001@{DOMAIN}"]})
            totals()

        for extra in pages.values():  # warm up: caches, the first connection
            page(extra)
        results = {name: timed(lambda extra=extra: page(extra), args.rounds)
                   for name, extra in pages.items()}
        html = timed(lambda: http.get(f"/domains/{DOMAIN}").raise_for_status(), args.rounds)
        shared = timed(totals, args.rounds)
        fresh = timed(fresh_totals, 10)
        whole_api = timed(lambda: http.get("/api/v1/status", params={"domain": DOMAIN}
                                           ).raise_for_status(), 3)
    whole_cli = timed(lambda: subprocess.run(
        [sys.executable, "-m", "migrating_proxy", "--config", str(web.config_path), "status",
         "--domain", DOMAIN, "--json"], check=True, capture_output=True), 3)
    print(f"machine: {platform.processor() or platform.machine()}, Python "
          f"{platform.python_version()}, {dt.date.today()}, database "
          f"{'SQLite' if url.startswith('sqlite') else 'PostgreSQL'}, {args.rounds} rounds")
    print(f"{'accounts page: 50 status rows':<48} {'median':>9} {'p95':>9}")
    for name, (median, p95) in results.items():
        verdict = "met" if p95 < 200 else "MISSED"
        print(f"  {name:<46} {median:7.1f} ms {p95:7.1f} ms  (< 200 ms: {verdict})")
    print(f"  {'the page HTML itself':<46} {html[0]:7.1f} ms {html[1]:7.1f} ms")
    print(f"  {'domain totals (shared, < 2 s old)':<46} {shared[0]:7.1f} ms {shared[1]:7.1f} ms")
    print(f"  {'domain totals, computed afresh (+ a POST)':<46} {fresh[0]:7.1f} ms "
          f"{fresh[1]:7.1f} ms")
    worst = max(p95 for _, p95 in results.values())
    print(f"peer: the whole domain, GET /api/v1/status (unpaged) {whole_api[0]:.0f} ms, "
          f"`status --domain --json` {whole_cli[0]:.0f} ms; slowest page p95 is "
          f"{worst / whole_cli[0]:.1%} of the CLI's whole-domain answer")


if __name__ == "__main__":
    main()
