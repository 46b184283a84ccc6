"""SMTP benchmark: messages per second into the new store, through the proxy vs LMTP directly.

    .venv/bin/python bench/smtp_bench.py [--quick] [--messages N] [--senders N] [--size BYTES]

Starts one throw-away new-store Dovecot (tests/support/dovecot.py) and one `migrating-proxy
serve` with its inbound SMTP listener delivering to that store's LMTP (tests/support/proxy.py).
N concurrent senders (default 10) each keep one connection and send their share of 20 KB
messages to one local account: directly over LMTP to the store, and through the proxy (which
routes each RCPT, forwards it to the same LMTP, and passes the message on when DATA ends).
Rounds alternate the two paths; the median of each is compared. Target: proxy >= 70 % of direct.

Exit status is 0 even when the target is missed: this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import smtplib
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support import dovecot  # noqa: E402
from tests.support.proxy import Proxy  # noqa: E402

USER, PASSWORD = "carol@bench.example", "carol-pw"
SENDER = "bench@elsewhere.example"


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
    share = messages // senders
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=senders) as pool:
        for future in [pool.submit(sender, connect, share, size) for _ in range(senders)]:
            future.result()
    return share * senders / (time.monotonic() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run (seconds)")
    parser.add_argument("--messages", type=int, help="messages per round and path (2000)")
    parser.add_argument("--senders", type=int, default=10, help="concurrent senders (10)")
    parser.add_argument("--size", type=int, default=20_000, help="bytes per message (20 KB)")
    parser.add_argument("--rounds", type=int, help="rounds per path (3)")
    args = parser.parse_args()
    messages = args.messages or (100 if args.quick else 2000)
    rounds = args.rounds or (1 if args.quick else 3)

    root = dovecot.instance_root("mp-sbench-")
    store = dovecot.new_store(root, root / "provisioned" / "users", master_password="master-pw")
    smtp_port = dovecot.free_port()
    proxy = Proxy(root / "proxy", store, overrides={
        "listen": {"smtp": f"127.0.0.1:{smtp_port}"},
        "backend": {"delivery": f"lmtp://127.0.0.1:{store.lmtp_port}"},
        "smtp": {"hostname": "mx.bench"},
        "log": {"level": "info"},  # the harness waits for the "started" event
    })
    results: dict[str, list[float]] = {"direct": [], "proxy": []}
    paths: dict[str, Callable[[], smtplib.SMTP]] = {
        "direct": lambda: smtplib.LMTP("127.0.0.1", store.lmtp_port),
        "proxy": lambda: smtplib.SMTP("127.0.0.1", smtp_port),
    }
    try:
        store.start()
        proxy.add_account(USER, PASSWORD)
        proxy.start()
        # One delivery first: the store creates the mailbox on it. Left to the first round,
        # ten concurrent first deliveries race to create it (451 4.2.0 Mailbox already exists).
        sender(paths["direct"], 1, args.size)
        for number in range(rounds):
            order = ("direct", "proxy") if number % 2 == 0 else ("proxy", "direct")
            for name in order:
                rate = run(paths[name], messages, args.senders, args.size)
                results[name].append(rate)
                print(f"round {number + 1} {name:6}: {rate:7.1f} msg/s", flush=True)
    finally:
        proxy.stop()
        store.stop()
        dovecot.remove_root(root)

    direct, through = (statistics.median(results[k]) for k in ("direct", "proxy"))
    print(f"\n{args.senders} senders, {args.size} B messages, {messages} per round, "
          f"median of {rounds}:")
    print(f"direct LMTP   : {direct:7.1f} msg/s")
    print(f"through proxy : {through:7.1f} msg/s = {through / direct:.0%} of direct "
          f"(target >= 70 %: {'met' if through >= 0.7 * direct else 'missed'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
