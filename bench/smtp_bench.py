"""SMTP benchmark: messages per second into the new store, through the proxy vs LMTP directly.

    .venv/bin/python bench/smtp_bench.py [--quick] [--messages N] [--senders 10,100]
                                         [--size BYTES] [--rounds N] [--profile DIR]

Starts one throw-away new-store Dovecot (tests/support/dovecot.py) and one `migrating-proxy
serve` with its inbound SMTP listener delivering to that store's LMTP (tests/support/proxy.py).
For each number of concurrent senders (default 10 and 100), each sender keeps one connection and
sends its share of 20 KB messages to one local account: directly over LMTP to the store, and
through the proxy (which routes each RCPT, forwards it to the same LMTP, and streams the message
on). Rounds alternate the two paths; the medians are compared, and the proxy's own CPU time
(from /proc) is given per message and per MB relayed, beside Dovecot's and the senders' CPU
per message on each path. Target: proxy >= 80 % of direct at
both concurrencies. `--profile DIR` records py-spy samples of `serve` during the proxy rounds
(`pip install '.[bench]'`) and prints where its CPU went.

Exit status is 0 even when the target is missed: this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import smtplib
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.sampling import (  # noqa: E402
    cpu_seconds,
    dovecot_master_pid,
    profiler,
    reactor_costs,
    tree_cpu_seconds,
)
from tests.support import dovecot  # noqa: E402
from tests.support.proxy import Proxy  # noqa: E402

USER, PASSWORD = "carol@bench.example", "carol-pw"
SENDER = "bench@elsewhere.example"
TARGET = 0.8


def make_message(size: int, index: int) -> bytes:
    head = (f"From: {SENDER}\r\nTo: {USER}\r\nSubject: bench {index}\r\n"
            f"Message-ID: <bench-{index}-{time.monotonic_ns()}@bench>\r\n\r\n").encode()
    line = b"0123456789" * 7 + b"\r\n"
    return head + line * max(0, (size - len(head)) // len(line))


def sender(connect: Callable[[], smtplib.SMTP], count: int, size: int) -> None:
    client = connect()
    try:
        for index in range(count):
            refused = client.sendmail(SENDER, [USER], make_message(size, index))
            if refused:
                raise RuntimeError(f"refused: {refused}")
    finally:
        with contextlib.suppress(smtplib.SMTPException, OSError):  # keep the first error
            client.quit()


def run(connect: Callable[[], smtplib.SMTP], messages: int, senders: int, size: int) -> float:
    """Messages per second with `senders` concurrent connections."""
    share = max(1, messages // senders)
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=senders) as pool:
        for future in [pool.submit(sender, connect, share, size) for _ in range(senders)]:
            future.result()
    return share * senders / (time.monotonic() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run (seconds)")
    parser.add_argument("--messages", type=int, help="messages per round and path (2000)")
    parser.add_argument("--senders", default="10,100",
                        help="concurrent senders, comma-separated (10,100)")
    parser.add_argument("--size", type=int, default=20_000, help="bytes per message (20 KB)")
    parser.add_argument("--rounds", type=int, help="rounds per path (3)")
    parser.add_argument("--profile", type=Path, help="directory for py-spy samples of serve")
    args = parser.parse_args()
    messages = args.messages or (200 if args.quick else 2000)
    rounds = args.rounds or (1 if args.quick else 3)
    concurrencies = [int(n) for n in args.senders.split(",")]
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)

    root = dovecot.instance_root("mp-sbench-")
    store = dovecot.new_store(root, root / "provisioned" / "users", master_password="master-pw")
    smtp_port = dovecot.free_port()
    proxy = Proxy(root / "proxy", store, overrides={
        "listen": {"smtp": f"127.0.0.1:{smtp_port}"},
        "backend": {"delivery": f"lmtp://127.0.0.1:{store.lmtp_port}"},
        "smtp": {"hostname": "mx.bench"},
        "log": {"level": "info"},  # the harness waits for the "started" event
    })
    paths: dict[str, Callable[[], smtplib.SMTP]] = {
        "direct": lambda: smtplib.LMTP("127.0.0.1", store.lmtp_port),
        "proxy": lambda: smtplib.SMTP("127.0.0.1", smtp_port),
    }
    print(f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at the start", flush=True)
    results: dict[int, dict[str, list[float]]] = {}
    cpu: dict[int, dict[str, float]] = {}
    try:
        store.start()
        proxy.add_account(USER, PASSWORD)
        proxy.start()
        assert proxy.process is not None
        # One delivery first: the store creates the mailbox on it. Left to the first round,
        # ten concurrent first deliveries race to create it (451 4.2.0 Mailbox already exists).
        sender(paths["direct"], 1, args.size)
        for senders in concurrencies:
            out = args.profile / f"serve-{senders}.txt" if args.profile else None
            pids = {"serve": proxy.process.pid, "dovecot": dovecot_master_pid(store)}
            results[senders], cpu[senders] = rounds_of(
                paths, pids, out, rounds, messages, senders, args.size)
            if out is not None:
                print(f"\nwhere serve's CPU went with {senders} senders (py-spy samples, "
                      "inclusive, idle left out):", *reactor_costs(out, 25), sep="\n")
    finally:
        proxy.stop()
        store.stop()
        dovecot.remove_root(root)
    report(results, cpu, messages, rounds, args.size)
    return 0


def rounds_of(paths: dict[str, Callable[[], smtplib.SMTP]], pids: dict[str, int],
              profile: Path | None, rounds: int, messages: int, senders: int, size: int
              ) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Alternating rounds of both paths: their rates, and CPU seconds per message of serve,
    of Dovecot and of the senders (this process) on each path."""
    rates: dict[str, list[float]] = {"direct": [], "proxy": []}
    used: dict[str, float] = {}
    for number in range(rounds):
        order = ("direct", "proxy") if number % 2 == 0 else ("proxy", "direct")
        for name in order:
            before = cpu_now(pids)
            rate = run(paths[name], messages, senders, size)
            for key, value in cpu_now(pids).items():
                if name == "proxy" or key != "serve":
                    used[f"{key} {name}"] = used.get(f"{key} {name}", 0.0) + value - before[key]
            rates[name].append(rate)
            print(f"{senders:3} senders, round {number + 1} {name:6}: {rate:7.1f} msg/s",
                  flush=True)
    if profile is not None:  # a round of its own: sampling slows serve down
        with profiler(pids["serve"], profile, "-r", "250", "--threads"):
            run(paths["proxy"], messages, senders, size)
    share = max(1, messages // senders) * senders
    return rates, {key: value / (rounds * share) for key, value in used.items()}


def cpu_now(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of serve, of every Dovecot process, and of this process (the
    senders' threads)."""
    times = os.times()
    return {"serve": cpu_seconds(pids["serve"]), "dovecot": tree_cpu_seconds(pids["dovecot"]),
            "senders": times.user + times.system}


def report(results: dict[int, dict[str, list[float]]], cpu: dict[int, dict[str, float]],
           messages: int, rounds: int, size: int) -> None:
    print(f"\n{size} B messages, {messages} per round and path, median of {rounds}; "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    print("(ratio: of the medians; per round: of each round's two runs, side by side, which a "
          "load changing between rounds moves less)")
    print("senders  direct LMTP   through proxy  ratio  per round (median)  serve CPU/msg  "
          f"serve CPU/MB   target >= {TARGET:.0%}")
    for senders, rates in results.items():
        direct, through = (statistics.median(rates[k]) for k in ("direct", "proxy"))
        ratio = through / direct
        paired = statistics.median(p / d for p, d in zip(rates["proxy"], rates["direct"],
                                                           strict=True))
        serve = cpu[senders]["serve proxy"]
        print(f"{senders:7}  {direct:7.1f} msg/s  {through:7.1f} msg/s  {ratio:5.0%}  "
              f"{paired:18.0%}  {serve * 1000:11.2f} ms  {serve * 1e9 / size:9.1f} ms   "
              f"{'met' if min(ratio, paired) >= TARGET else 'missed'}")
    for senders, used in cpu.items():
        print(f"CPU per message, {senders} senders: direct: Dovecot "
              f"{used['dovecot direct'] * 1000:.2f} ms, senders {used['senders direct'] * 1000:.2f}"
              f" ms; through the proxy: Dovecot {used['dovecot proxy'] * 1000:.2f} ms, senders "
              f"{used['senders proxy'] * 1000:.2f} ms, serve {used['serve proxy'] * 1000:.2f} ms")


if __name__ == "__main__":
    raise SystemExit(main())
