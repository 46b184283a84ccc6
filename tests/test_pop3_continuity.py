"""POP3 continuity (issue 10, Done when): clients that leave mail on the server never download
a message twice across the switch. Real Dovecot old server and store, `serve`, copy workers,
and real clients: fetchmail (`keep`, its UIDL file) and a poplib client that remembers UIDLs.

Before the switch POP3 sessions are relayed to the old server; after it to the store, whose
UIDL answers the relay translates back to the old server's UIDLs (frontends/uidl.py) from what
the switch kept (migration/pop3_uidls.py). The dsync engine, whose store keeps the old UIDLs
itself, so that clients may later talk to Dovecot directly, is tested in
tests/test_dsync_cutover.py.
"""

from __future__ import annotations

import datetime as dt
import secrets
import smtplib
from pathlib import Path

import sqlalchemy

from tests.support.cutover import (
    MOVED,
    NY,
    User,
    events,
    passthrough_proxy,
    work_until_settled,
    worker,
)
from tests.support.dovecot import DovecotInstance
from tests.support.mail import make_message, sample_corpus, seed_mailbox
from tests.support.pop3 import (
    Fetchmail,
    LeaveOnServer,
    add_user_with_uidl_format,
    pop3_listing,
)
from tests.support.proxy import Proxy

HOST = "127.0.0.1"


def send_with_x_uidl(proxy: Proxy, recipient: str, subject: str, x_uidl: str) -> None:
    """Mail through the proxy's MX that claims an old message's UIDL in an X-UIDL header."""
    body = make_message(subject, "after the switch\n", dt.datetime(2025, 7, 1, tzinfo=NY))
    body = f"X-UIDL: {x_uidl}\r\n".encode() + body
    with smtplib.SMTP(HOST, proxy.ports["smtp"], timeout=30) as smtp:
        smtp.sendmail("sender@elsewhere.example", [recipient], body)


def store_listing(store: DovecotInstance, address: str) -> list[str]:
    """The store's own UIDLs (the master user, as the proxy logs in there)."""
    return [entry.uidl for entry in pop3_listing(
        store.pop3_port, f"{address}*{store.master_user}", store.master_password or "")]


def test_imap_sourced_pop3_users_download_nothing_twice(
        module_old: DovecotInstance, module_store: DovecotInstance, tmp_path: Path) -> None:
    old, store = module_old, module_store  # shared by the module: each test adds its users
    user = User(old, store)
    proxy = passthrough_proxy(tmp_path / "proxy", old, store)
    fetchmail = Fetchmail(tmp_path / "fetchmail", user.address, user.password)
    phone = LeaveOnServer(user.address, user.password)
    with proxy:
        before = pop3_listing(proxy.pop3_port, user.address, user.password)
        assert before == pop3_listing(old.pop3_port, user.address, user.password)  # relayed
        assert len(fetchmail.run(proxy.pop3_port)) == len(before) > 3
        assert len(phone.poll(proxy.pop3_port)) == len(before)

        row = work_until_settled(proxy, user.address)  # copy, hold, final pass, flip
        assert (row["state"], row["served_by"], row["pop3_uidls"]) == (
            "COMPLETED", "store", "kept"), row

        # UIDL and LIST: the old messages as before (UIDLs, sizes, order), the notice after.
        after = pop3_listing(proxy.pop3_port, user.address, user.password)
        assert after[:len(before)] == before
        [notice] = after[len(before):]
        assert notice.uidl not in {entry.uidl for entry in before}
        # The store's own UIDLs are not the old ones: the relay translated them.
        assert not set(store_listing(store, user.address)) & {e.uidl for e in before}

        [moved] = fetchmail.run(proxy.pop3_port)  # the notice only
        assert MOVED in moved
        assert [MOVED in m for m in phone.poll(proxy.pop3_port)] == [True]

        # New mail after the switch, even one claiming an old UIDL: downloaded exactly once.
        send_with_x_uidl(proxy, user.address, "new after the switch", before[0].uidl)
        [new] = fetchmail.run(proxy.pop3_port)
        assert b"new after the switch" in new
        [new] = phone.poll(proxy.pop3_port)
        assert b"new after the switch" in new
        assert fetchmail.run(proxy.pop3_port) == [] and phone.poll(proxy.pop3_port) == []
        final = pop3_listing(proxy.pop3_port, user.address, user.password)
        assert final[:len(after)] == after and len({e.uidl for e in final}) == len(final)
    [kept] = events(proxy, "pop3_uidls_kept")
    assert (kept["matched"], kept["unmatched"], kept["same_order"]) == (len(before), 0, True)


def test_pop3_sourced_accounts_download_nothing_twice(
        module_old: DovecotInstance, module_store: DovecotInstance, tmp_path: Path) -> None:
    old, store = module_old, module_store  # shared by the module: each test adds its users
    user = User(old, store, "pop.example")
    proxy = passthrough_proxy(tmp_path / "proxy", old, store)
    proxy.cli("domain", "add", "pop.example", "--source", f"pop3://{HOST}:{old.pop3_port}",
              "--no-notice")
    fetchmail = Fetchmail(tmp_path / "fetchmail", user.address, user.password)
    with proxy:
        before = pop3_listing(proxy.pop3_port, user.address, user.password)
        assert len(fetchmail.run(proxy.pop3_port)) == len(before) > 3
        row = work_until_settled(proxy, user.address)
        assert (row["served_by"], row["pop3_uidls"]) == ("store", "kept"), row
        assert pop3_listing(proxy.pop3_port, user.address, user.password) == before
        assert fetchmail.run(proxy.pop3_port) == []  # nothing downloaded again


class OpaqueUidlUser:
    """A user whose old server gives UIDLs that do not reveal the IMAP UID (Dovecot's `%g`,
    the Maildir file name, set for this user alone): matching falls back to the headers."""

    def __init__(self, old: DovecotInstance) -> None:
        self.address = f"opaque-{secrets.token_hex(3)}@old.example"
        self.password = "pw-" + secrets.token_hex(6)
        add_user_with_uidl_format(old, self.address, self.password)
        seed_mailbox(old.host, old.imap_port, self.address, self.password, sample_corpus())


def spoil_fingerprint(proxy: Proxy, address: str, position: int) -> None:
    """Make the copy record of the INBOX's `position`-th message (its UID order) unmatchable,
    as a server whose POP3 view differs from its IMAP one would (Exchange converts messages)."""
    engine = sqlalchemy.create_engine(f"sqlite:///{proxy.directory / 'proxy.db'}")
    try:
        with engine.begin() as conn:
            folder = conn.execute(sqlalchemy.text(
                "SELECT f.id FROM copy_folders f JOIN accounts a ON a.id = f.account_id "
                "WHERE a.address_key = :a AND f.source_name = 'INBOX'"),
                {"a": address.lower()}).scalar_one()
            keys = sorted(conn.execute(sqlalchemy.text(
                "SELECT source_key FROM copy_messages WHERE folder_id = :f"),
                {"f": folder}).scalars(), key=int)
            conn.execute(sqlalchemy.text(
                "UPDATE copy_messages SET fingerprint = 'spoilt' WHERE folder_id = :f "
                "AND source_key = :k"), {"f": folder, "k": keys[position - 1]})
    finally:
        engine.dispose()


def test_an_unmatched_message_is_reported_and_downloaded_once_more_never_lost(
        module_old: DovecotInstance, module_store: DovecotInstance, tmp_path: Path) -> None:
    old, store = module_old, module_store  # shared by the module: each test adds its users
    user = OpaqueUidlUser(old)
    proxy = passthrough_proxy(tmp_path / "proxy", old, store,
                              overrides={"migration": {"switch_hold": 2}})
    phone = LeaveOnServer(user.address, user.password)
    with proxy:
        before = pop3_listing(proxy.pop3_port, user.address, user.password)
        downloaded = phone.poll(proxy.pop3_port)
        assert "," in before[0].uidl  # a Maildir file name: no UID in it
        # The first copy, then the worker dies in the hold; the hold runs out by itself.
        first = worker(proxy, "switch.held")
        first.wait(timeout=120)
        [row] = proxy.status(user.address)
        assert row["served_by"] == "old", row
        spoil_fingerprint(proxy, user.address, 2)

        row = work_until_settled(proxy, user.address)
        assert (row["served_by"], row["pop3_uidls"]) == ("store", "unmatched: 1"), row
        after = pop3_listing(proxy.pop3_port, user.address, user.password)
        kept = [e for e in after[:len(before)] if e.number != 2]
        assert kept == [e for e in before if e.number != 2]  # the others keep their UIDLs
        assert after[1].uidl != before[1].uidl and after[1].size == before[1].size
        again = phone.poll(proxy.pop3_port)  # the unmatched message once more, and the notice
        assert again[0] == downloaded[1] and MOVED in again[1] and len(again) == 2
        assert phone.poll(proxy.pop3_port) == []
    [unmatched] = events(proxy, "pop3_uidls_unmatched")
    assert unmatched["count"] == 1 and unmatched["uidls"] == [before[1].uidl]
