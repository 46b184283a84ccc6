"""POP3 continuity: what keeping the old UIDLs costs at the switch, and in the relay.

    .venv/bin/python bench/pop3_uidl_bench.py [--messages N]

1. The switch: one old-server Dovecot with two users, each an INBOX of N messages (default
   2,000, written as maildir files): one whose UIDLs are Dovecot's default `%08Xu%08Xv` (they
   reveal the IMAP UID), one whose UIDLs are Maildir file names (`%g`: matched by headers, one
   `TOP n 0` each). Each is copied once (a mirror pass, as for a passthrough account), then
   the UIDLs are kept three ways: cold (everything inside the hold), `prepare` (before the
   hold: the header reads) and `keep` after it (what the hold pays).
2. The relay: a UIDL answer of N lines and a 50 MB RETR answer through the translator, in
   64 KB chunks (the plain splice does nothing to the bytes), three rounds each.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from migrating_proxy.frontends.uidl import UidlMap, UidlTranslator  # noqa: E402
from migrating_proxy.migration import SourceSpec, StoreSpec, run_copy  # noqa: E402
from migrating_proxy.migration.pop3_uidls import Pop3Continuity  # noqa: E402
from migrating_proxy.store import open_store  # noqa: E402
from migrating_proxy.store.copystate import CopyState  # noqa: E402
from tests.support import dovecot  # noqa: E402
from tests.support.mail import make_message, write_maildir  # noqa: E402
from tests.support.pop3 import add_user_with_uidl_format  # noqa: E402

PASSWORD = "bench-pw"
CHUNK = 65536


def seed(old: dovecot.DovecotInstance, address: str, count: int) -> None:
    when = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    write_maildir(old.maildir(address), (
        make_message(f"message {i}", f"body {i}\n" * 40, when + dt.timedelta(minutes=i))
        for i in range(count)))


def continuity(tmp: Path, old: dovecot.DovecotInstance, store: dovecot.DovecotInstance,
               address: str) -> Pop3Continuity:
    """The account copied once (a mirror pass), ready to keep its UIDLs."""
    db = open_store(f"sqlite:///{tmp / (address + '.db')}")
    account = db.accounts.add_account(address, "x", migration_state="PENDING").id
    imap = SourceSpec("imap", "127.0.0.1", old.imap_port, "none", False, address, PASSWORD)
    store_imap = StoreSpec("127.0.0.1", store.imap_port, "none", address, store.master_user,
                           store.master_password)
    started = time.monotonic()
    result = run_copy(db.engine, account, imap, store_imap, mirror=True)
    assert result.state == "completed", result.error
    print(f"  first pass (copy): {time.monotonic() - started:.2f} s")
    return Pop3Continuity(CopyState(db.engine, account),
                          replace(imap, protocol="pop3", port=old.pop3_port), store_imap,
                          replace(store_imap, port=store.pop3_port), 60)


def timed(what: str, action: object) -> float:
    started = time.monotonic()
    outcome = action()  # type: ignore[operator]
    took = time.monotonic() - started
    print(f"  {what}: {took:.3f} s{f'  ({outcome})' if outcome else ''}")
    return took


def bench_switch(count: int) -> None:
    roots = [dovecot.instance_root("mp-bench-po-"), dovecot.instance_root("mp-bench-ps-")]
    with tempfile.TemporaryDirectory() as tmp, \
            dovecot.old_server(roots[0], {}) as old, \
            dovecot.new_store(roots[1], roots[1] / "provisioned",
                              master_password="master-pw") as store:
        for kind, uidl_format in (("revealing", "%%08Xu%%08Xv"), ("opaque", "%%g")):
            address = f"{kind}@old.example"
            add_user_with_uidl_format(old, address, PASSWORD, uidl_format)
            store.provision(address, "{PLAIN}x")
            seed(old, address, count)
            print(f"{kind} UIDLs, {count} messages:")
            keeper = continuity(Path(tmp), old, store, address)
            timed("keep, cold (all of it inside the hold)", keeper.keep)
            keeper = replace(keeper, fingerprints={})
            timed("prepare (before the hold)", keeper.prepare)
            timed("keep after prepare (inside the hold)", keeper.keep)
    for root in roots:
        dovecot.remove_root(root)


def bench_relay(count: int) -> None:
    uidls = UidlMap({f"{i:08X}65A0B1C2": f"old-{i}" for i in range(1, count + 1)})
    answer = b"+OK\r\n" + b"".join(f"{i} {i:08X}65A0B1C2\r\n".encode()
                                   for i in range(1, count + 1)) + b".\r\n"
    body = b"+OK\r\n" + (b"x" * 998 + b"\r\n") * 50_000 + b".\r\n"
    for name, command, data in (("UIDL answer", b"UIDL\r\n", answer),
                                ("RETR of 50 MB", b"RETR 1\r\n", body)):
        chunks = [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)]
        for _round in range(3):
            translator = UidlTranslator(uidls)
            translator.from_client(command)
            started = time.perf_counter()
            out = [translator.from_server(chunk) for chunk in chunks]
            took = time.perf_counter() - started
            assert sum(map(len, out)) >= len(data) - count * 10
            print(f"relay, {name} ({len(data) / 1e6:.1f} MB): {took * 1000:.1f} ms, "
                  f"{len(data) / 1e6 / took:.0f} MB/s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=2000)
    count = parser.parse_args().messages
    bench_relay(count)
    bench_switch(count)


if __name__ == "__main__":
    main()
