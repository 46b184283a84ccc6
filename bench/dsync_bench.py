"""The dsync engine against the imap engine in the transparent cutover, same mailbox, same run.

    .venv/bin/python bench/dsync_bench.py [--messages N] [--changes C]

One old-server Dovecot with N messages (default 10,000, ~25 KB each, 10 folders, written as
maildir files like bench/copy_bench.py) and one store per engine, both built from
deploy/dovecot/ with the dsync snippet. For each engine, in the same run:

1. the first pass of a passthrough account (imap: a mirror pass; dsync: `backup -R` through
   the store's doveadm HTTP API, after the untouched-mailbox check and INBOX repair);
2. C changes at the old server (default 100: flags set and cleared, expunges, new mail), the
   same ones seen by both engines;
3. the switch as the workers run it (switch.py): the hold a login sees, which is the final
   pass plus the flip, and the final pass alone.

Both first passes run before the changes, and both switches after them, so both engines copy
exactly the same mailbox. Every store is checked to hold every message.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import sys
import time
from pathlib import Path

from imapclient import IMAPClient

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import copy_bench  # noqa: E402
from copy_bench import FOLDERS, PASSWORD, USER, seed_maildir, warm_up  # noqa: E402

from migrating_proxy.migration import SourceSpec, StoreSpec, run_copy  # noqa: E402
from migrating_proxy.migration.doveadm import HttpDoveadm  # noqa: E402
from migrating_proxy.migration.dsync import DsyncEngine  # noqa: E402
from migrating_proxy.migration.progress import CopyProgress, CopyResult  # noqa: E402
from migrating_proxy.provision.dsync_credentials import DsyncCredentials  # noqa: E402
from migrating_proxy.store import Domain, Store, open_store  # noqa: E402
from migrating_proxy.switch import MirrorPass, Switch  # noqa: E402
from tests.support import dovecot  # noqa: E402
from tests.support.mail import make_message  # noqa: E402

HOLD = 600.0  # seconds: long enough that no final pass is cut off; the figure is the hold used


def dsync_store() -> dovecot.DovecotInstance:
    root = dovecot.instance_root("mp-bench-ds-")
    inst = dovecot.new_store(root, root / "provisioned", master_password="master-pw",
                             dsync=True)
    inst.provision(USER, "{PLAIN}new-pw")
    inst.start()
    return inst


class Account:
    """One engine's account: its database, its store, and how it runs a pass."""

    def __init__(self, engine: str, old: dovecot.DovecotInstance, tmp: Path) -> None:
        self.engine, self.old = engine, old
        self.store_server = dsync_store()
        self.db: Store = open_store(f"sqlite:///{tmp / f'{engine}.db'}")
        self.db.accounts.add_domain(Domain("old.example", f"imap://127.0.0.1:{old.imap_port}"))
        self.account_id = self.db.accounts.add_account(USER, "x", migration_state="PENDING").id
        self.source = SourceSpec("imap", "127.0.0.1", old.imap_port, "none", False, USER,
                                 PASSWORD)
        server = self.store_server
        assert server.doveadm_key_file is not None and server.dsync_users is not None
        self.dsync = DsyncEngine(
            HttpDoveadm(f"http://127.0.0.1:{server.doveadm_port}/doveadm/v1",
                        server.doveadm_key_file.read_text().strip(), 30, 3600),
            DsyncCredentials(server.dsync_users))

    def one_pass(self, deadline: float | None) -> CopyResult:
        if self.engine == "dsync":
            result = self.dsync.run_pass(self.db.engine, self.account_id, USER, self.source,
                                         deadline=deadline)
            assert isinstance(result, CopyResult), result
        else:
            target = StoreSpec("127.0.0.1", self.store_server.imap_port, "none", USER,
                               "proxy-master", "master-pw")
            result = run_copy(self.db.engine, self.account_id, self.source, target,
                              mirror=True, parallel_folders=4)
        assert result.state == "completed", result.error
        return result

    def messages(self) -> int:
        return copy_bench.store_count(self.store_server)

    def close(self) -> None:
        self.db.close()
        self.store_server.stop()
        dovecot.remove_root(self.store_server.root)


def change_old_server(old: dovecot.DovecotInstance, changes: int) -> None:
    """`changes` changes spread over the folders: a quarter each of flags set, flags cleared,
    expunges and new messages."""
    rng = random.Random(7)
    with IMAPClient("127.0.0.1", port=old.imap_port, ssl=False, timeout=120) as client:
        client.login(USER, PASSWORD)
        for index in range(changes):
            folder = FOLDERS[index % len(FOLDERS)]
            client.select_folder(folder)
            uids = client.search("ALL")
            kind = index % 4
            if kind == 0:
                client.add_flags([rng.choice(uids)], [b"\\Flagged"])
            elif kind == 1:
                client.remove_flags([rng.choice(uids)], [b"\\Seen"])
            elif kind == 2:
                client.delete_messages([rng.choice(uids)])
                client.expunge()
            else:
                client.append(folder, make_message(f"Change {index}", "new\n",
                                                   dt.datetime.now(dt.UTC)))


def old_count(old: dovecot.DovecotInstance) -> int:
    with IMAPClient("127.0.0.1", port=old.imap_port, ssl=False, timeout=60) as client:
        client.login(USER, PASSWORD)
        return sum(int(client.folder_status(name, [b"MESSAGES"])[b"MESSAGES"])
                   for name in FOLDERS)


def timed(action: MirrorPass) -> tuple[float, CopyResult]:
    start = time.monotonic()
    result = action(None)
    return time.monotonic() - start, result


def switch(account: Account) -> tuple[float, float]:
    """(hold a login sees, final pass alone) of the switch as switch.py runs it."""
    final: list[float] = []

    def final_pass(deadline: float | None) -> CopyResult:
        start = time.monotonic()
        result = account.one_pass(deadline)
        final.append(time.monotonic() - start)
        return result

    # The copy is complete and in step (no changes): the switch goes straight to the hold.
    copied = CopyResult("completed", CopyProgress())
    outcome = Switch(account.db.cutover, account.account_id, USER, final_pass, HOLD).run(
        copied, 0.0)
    assert outcome.state == "switched" and outcome.hold_seconds is not None, outcome
    return outcome.hold_seconds, final[-1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--changes", type=int, default=100)
    args = parser.parse_args()
    old_root = dovecot.instance_root("mp-bench-old-")
    old = dovecot.old_server(old_root, {USER: PASSWORD})
    old.start()
    accounts: list[Account] = []
    try:
        total = seed_maildir(old, args.messages)
        warm_up(old)
        print(f"corpus: {args.messages} messages, {total / 1e6:.0f} MB, {len(FOLDERS)} folders;"
              f" load average {os.getloadavg()[0]:.2f}", flush=True)
        accounts = [Account("imap", old, old_root), Account("dsync", old, old_root)]
        firsts = {}
        for account in accounts:
            firsts[account.engine], _ = timed(account.one_pass)
            assert account.messages() == args.messages, account.engine
        change_old_server(old, args.changes)
        switches = {account.engine: switch(account) for account in accounts}
        expected = old_count(old)
        held = {account.engine: account.messages() for account in accounts}
        print(f"| engine | first pass | final pass ({args.changes} changes) | switch hold "
              f"| store after the switch (old server: {expected}) |")
        print("| --- | --- | --- | --- | --- |")
        for account in accounts:
            hold, final = switches[account.engine]
            count = held[account.engine]
            print(f"| {account.engine} | {firsts[account.engine]:.2f} s | {final:.2f} s "
                  f"| {hold:.2f} s | {count}{'' if count == expected else ' (MISMATCH)'} |")
        imap_first, dsync_first = firsts["imap"], firsts["dsync"]
        print(f"dsync ÷ imap: first pass {dsync_first / imap_first:.2f}, final pass "
              f"{switches['dsync'][1] / switches['imap'][1]:.2f}, hold "
              f"{switches['dsync'][0] / switches['imap'][0]:.2f}; "
              f"load average {os.getloadavg()[0]:.2f}")
    finally:
        for account in accounts:
            account.close()
        old.stop()
        dovecot.remove_root(old_root)


if __name__ == "__main__":
    main()
