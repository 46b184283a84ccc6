"""Mirror passes against a real Dovecot old server and store: after a user's changes at the
old server (flags, keywords, expunges, a move, new, renamed and deleted folders, new mail), one
pass makes the store equal to it, and a second pass changes nothing (issue 9, item 2)."""

from __future__ import annotations

import datetime as dt
import itertools
import poplib
from collections.abc import Iterator
from pathlib import Path

import pytest
from imapclient import IMAPClient
from sqlalchemy import Engine

from migrating_proxy.migration import SourceSpec, StoreSpec, run_copy
from migrating_proxy.migration.progress import CopyResult
from migrating_proxy.store import open_store
from migrating_proxy.store.accounts import AccountStore
from tests.support import dovecot
from tests.support.dovecot import DovecotInstance
from tests.support.mail import (
    SeedMessage,
    Snapshot,
    add_old_user,
    imap_login,
    make_message,
    sample_corpus,
    seed_mailbox,
    snapshot_folders,
)

NY = dt.timezone(dt.timedelta(hours=-5))
_users = itertools.count()

# Dovecot's own capability list without CONDSTORE and QRESYNC: an old server that can only be
# swept (every message's FLAGS read at each pass).
NO_CONDSTORE = (
    "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE SORT SORT=DISPLAY THREAD=REFERENCES "
    "THREAD=REFS THREAD=ORDEREDSUBJECT MULTIAPPEND URL-PARTIAL CATENATE UNSELECT CHILDREN "
    "NAMESPACE UIDPLUS LIST-EXTENDED I18NLEVEL=1 ESEARCH ESORT SEARCHRES WITHIN CONTEXT=SEARCH "
    "LIST-STATUS BINARY MOVE LITERAL+ SPECIAL-USE"
)


@pytest.fixture(scope="module")
def old_without_condstore() -> Iterator[DovecotInstance]:
    root = dovecot.instance_root("mp-mnoc-")
    try:
        instance = dovecot.old_server(root, {})
        with instance.config_path.open("a") as config:
            config.write(f"protocol imap {{\n  imap_capability = {NO_CONDSTORE}\n}}\n")
        with instance:
            yield instance
    finally:
        dovecot.remove_root(root)


class Mailbox:
    """One user's old mailbox and its copy: run passes, change the old server, compare."""

    def __init__(self, old: DovecotInstance, store: DovecotInstance, db: Path,
                 protocol: str = "imap") -> None:
        self.old, self.store = old, store
        self.address = f"user{next(_users)}@old.example"
        self.password = "pw-" + self.address
        add_old_user(old, self.address, self.password)
        store.provision(self.address, "{PLAIN}unused")
        self.engine: Engine = open_store(f"sqlite:///{db}").engine
        self.account_id = AccountStore(self.engine).add_account(self.address, "x").id
        port = old.imap_port if protocol == "imap" else old.pop3_port
        self.source = SourceSpec(protocol, old.host, port, "none", False,  # type: ignore[arg-type]
                                 self.address, self.password)
        self.target = StoreSpec(store.host, store.imap_port, "none", self.address,
                                store.master_user, store.master_password)

    def seed(self, spec: dict[str, list[SeedMessage]]) -> None:
        seed_mailbox(self.old.host, self.old.imap_port, self.address, self.password, spec)

    def mirror(self) -> CopyResult:
        result = run_copy(self.engine, self.account_id, self.source, self.target, mirror=True)
        assert result.state == "completed", result.error
        return result

    def at_old(self) -> IMAPClient:
        return imap_login(self.old, self.address, self.password)

    def at_store(self) -> IMAPClient:
        return imap_login(self.store, self.address)

    def snapshots(self) -> tuple[Snapshot, Snapshot]:
        with self.at_old() as old, self.at_store() as store:
            return snapshot_folders(old), snapshot_folders(store)

    def assert_equal(self) -> None:
        old, store = self.snapshots()
        assert store == old


def _message(subject: str, flags: tuple[str, ...] = ()) -> SeedMessage:
    when = dt.datetime(2024, 5, 6, 7, 8, tzinfo=NY)
    return SeedMessage(make_message(subject, f"{subject}\n", when), flags,
                       when + dt.timedelta(minutes=2))


def _corpus() -> dict[str, list[SeedMessage]]:
    corpus = sample_corpus()
    corpus["INBOX"] += [_message(f"inbox {i}", (r"\Seen",) if i % 2 else ()) for i in range(8)]
    corpus["Clients"] = [_message("client list")]
    corpus["Clients/Big"] = [_message(f"big client {i}") for i in range(3)]
    corpus["Old Stuff"] = [_message(f"old {i}", (r"\Seen",)) for i in range(3)]
    corpus["Old Stuff/Deeper"] = [_message("deeper")]
    return corpus


def _change_everything(client: IMAPClient) -> None:
    """What a user does in a day at the old server, through an ordinary IMAP session."""
    client.select_folder("INBOX")
    uids = sorted(client.search("ALL"))
    client.add_flags(uids[:3], [r"\Flagged", "$label1"])  # flags and a keyword set
    client.remove_flags(uids[3:6], [r"\Seen"])  # cleared
    client.add_flags(uids[6:8], [r"\Seen", r"\Answered"])
    client.remove_flags(uids[1:2], ["$Important"])  # a keyword cleared
    client.add_flags(uids[8:10], [r"\Deleted"])  # expunged
    client.uid_expunge(uids[8:10])
    client.add_flags(uids[10:11], [r"\Deleted"])  # marked, never expunged: stays marked
    client.move(uids[11:12], "Archive/2024")  # moved to another folder
    client.append("INBOX", _message("new mail").raw)  # new mail
    client.create_folder("Neu/Ordner")  # a new folder, with a new parent
    client.append("Neu/Ordner", _message("in a new folder", (r"\Seen",)).raw, [r"\Seen"])
    client.rename_folder("Reçus", "Belege")  # renamed, messages kept
    client.rename_folder("Clients", "Customers")  # renamed with its child
    client.select_folder("Customers/Big")
    client.add_flags(client.search("ALL")[:1], [r"\Seen"])  # changed after its rename
    client.unselect_folder()
    client.delete_folder("Old Stuff/Deeper")  # deleted, children first as Dovecot wants
    client.delete_folder("Old Stuff")


@pytest.mark.parametrize("server", ["module_old", "old_without_condstore"])
def test_one_mirror_pass_makes_the_store_equal_to_the_old_server(
        request: pytest.FixtureRequest, server: str, module_store: DovecotInstance,
        tmp_path: Path) -> None:
    old = request.getfixturevalue(server)
    box = Mailbox(old, module_store, tmp_path / "state.db")
    box.seed(_corpus())
    first = box.mirror()
    assert first.changes == first.progress.messages_copied > 20
    box.assert_equal()

    with box.at_store() as client:
        renamed_before = client.folder_status("Reçus", [b"UIDVALIDITY", b"UIDNEXT"])
    with box.at_old() as client:
        _change_everything(client)
    second = box.mirror()
    # 2 expunged + 1 moved out + 1 moved in + 2 new + flags + 4 folders renamed or deleted
    assert second.changes >= 10
    box.assert_equal()
    old_snap, store_snap = box.snapshots()
    assert "Belege" in store_snap and "Reçus" not in store_snap
    assert "Customers/Big" in store_snap and "Clients" not in store_snap
    assert "Old Stuff" not in store_snap and "Old Stuff/Deeper" not in store_snap
    with box.at_store() as client:
        # Renamed at the store, not copied again: same UIDVALIDITY, nothing appended.
        assert client.folder_status("Belege", [b"UIDVALIDITY", b"UIDNEXT"]) == renamed_before
        client.select_folder("INBOX", readonly=True)
        assert len(client.search(["DELETED"])) == 1  # the one still marked at the old server

    third = box.mirror()
    assert third.changes == 0
    assert box.snapshots() == (old_snap, store_snap)


def test_a_folder_recreated_at_the_old_server_is_mirrored_exactly(
        module_old: DovecotInstance, module_store: DovecotInstance, tmp_path: Path) -> None:
    """Deleted and created again under the same name (a new UIDVALIDITY): messages that are
    still there are matched by fingerprint, the others expunged at the store."""
    box = Mailbox(module_old, module_store, tmp_path / "state.db")
    kept, dropped = _message("kept"), _message("dropped")
    box.seed({"Folder": [kept, dropped]})
    box.mirror()
    with box.at_old() as client:
        client.delete_folder("Folder")
    box.seed({"Folder": [kept, _message("new one")]})
    assert box.mirror().changes == 2  # one copied, one expunged
    box.assert_equal()


def test_pop3_mirror_pass_follows_deletions_and_new_mail(
        module_old: DovecotInstance, module_store: DovecotInstance, tmp_path: Path) -> None:
    box = Mailbox(module_old, module_store, tmp_path / "state.db", protocol="pop3")
    box.seed({"INBOX": [_message(f"pop {i}") for i in range(5)]})
    assert box.mirror().changes == 5
    pop = poplib.POP3(module_old.host, module_old.pop3_port, timeout=30)
    pop.user(box.address)
    pop.pass_(box.password)
    pop.dele(2)
    pop.dele(4)
    pop.quit()
    box.seed({"INBOX": [_message("pop new")]})
    assert box.mirror().changes == 3
    old_snap, store_snap = box.snapshots()
    assert sorted(m[0] for m in store_snap["INBOX"]) == sorted(m[0] for m in old_snap["INBOX"])
    assert box.mirror().changes == 0
