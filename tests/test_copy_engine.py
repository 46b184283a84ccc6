"""The copy engine against real Dovecot servers: old server -> new store, no mocks."""

from __future__ import annotations

import datetime as dt
import os
import poplib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError
from sqlalchemy import Engine, select

from migrating_proxy.migration import (
    SourceAuthError,
    SourceSpec,
    SourceUnavailable,
    StoreSpec,
    check_source_login,
    run_copy,
)
from migrating_proxy.store import open_store
from migrating_proxy.store.copystate import copy_messages
from migrating_proxy.store.schema import migrations, pop3_uidls
from tests.support import dovecot
from tests.support.dovecot import DovecotInstance, free_port
from tests.support.mail import SeedMessage, Snapshot, make_message, seed_mailbox, snapshot_folders

REPO = Path(__file__).resolve().parents[1]
ALICE, ALICE_PW = "alice@old.example", "alice-pw"
TOKYO, NY = dt.timezone(dt.timedelta(hours=9)), dt.timezone(dt.timedelta(hours=-5))


def _seed(raw: bytes, flags: tuple[str, ...] = (), when: dt.datetime | None = None
          ) -> SeedMessage:
    return SeedMessage(raw, flags, when)


def corpus() -> dict[str, list[SeedMessage]]:
    d = dt.datetime
    long_line = b"x" * 10_000
    same_id = "<same@old.example>"
    dup = make_message("Exact duplicate", "twice\n", d(2021, 5, 5, 5, 5, tzinfo=NY))
    no_id = (b"From: a@old.example\r\nSubject: no id\r\nDate: Mon, 1 Jan 2018 10:00:00 +0000\r\n"
             b"\r\nbody\r\n")
    eight_bit = ("From: Jörg <j@old.example>\r\nSubject: Grüße aus Köln\r\n"
                 "Message-ID: <8bit@old.example>\r\n\r\nÄÖÜ\r\n").encode()
    return {
        "INBOX": [
            _seed(make_message("Tokyo", "konnichiwa\n", d(2024, 1, 2, 3, 4, tzinfo=TOKYO)),
                  (r"\Seen", "$Forwarded", "custom-kw"), d(2024, 1, 2, 3, 7, tzinfo=TOKYO)),
            _seed(make_message("New York", "hi\n", d(2019, 7, 8, 9, 10, tzinfo=NY)), (r"\Flagged",),
                  d(2019, 7, 8, 9, 12, tzinfo=NY)),
            _seed(no_id, (), d(2018, 1, 1, 10, 0, tzinfo=dt.UTC)),
            _seed(make_message("Same id 1", "first\n", d(2020, 1, 1, tzinfo=NY), same_id)),
            _seed(make_message("Same id 2", "second, longer\n", d(2020, 1, 2, tzinfo=NY), same_id)),
            _seed(dup, (r"\Seen",)), _seed(dup, (r"\Seen",)),
            _seed(eight_bit), _seed(make_message("Long", "", d(2022, 2, 2, tzinfo=NY)).replace(
                b"\r\n\r\n", b"\r\n\r\n" + long_line + b"\r\n", 1)),
        ],
        "Reçus": [_seed(make_message("Facture", "ci-joint\n", d(2023, 3, 3, tzinfo=NY)))],
        "日本語": [_seed(make_message("日本", "テスト\n", d(2023, 4, 4, tzinfo=TOKYO)))],
        "Projects/2024/Q1": [_seed(make_message("Q1", "plan\n", d(2024, 3, 3, tzinfo=NY)))],
        "Sent": [_seed(make_message("Sent one", "sent\n", d(2024, 5, 5, tzinfo=NY)), (r"\Seen",))],
        "Trash": [_seed(make_message("Binned", "gone\n", d(2024, 6, 6, tzinfo=NY)),
                        (r"\Seen", r"\Deleted"))],
        "Empty": [],
    }


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    return _open_db(f"sqlite:///{tmp_path / 'state.db'}")


def _open_db(url: str) -> Engine:
    store = open_store(url)
    store.accounts.add_account(ALICE, "{PLAIN}x")
    return store.engine


def _account_id(engine: Engine) -> int:
    from migrating_proxy.store.schema import accounts
    with engine.connect() as conn:
        return int(conn.execute(select(accounts.c.id)).scalar_one())


def source_spec(server: DovecotInstance, password: str = ALICE_PW, **kw: object) -> SourceSpec:
    args: dict = dict(protocol="imap", host=server.host, port=server.imap_port, tls="none",
                      verify_tls=False, login=ALICE, password=password)
    args.update(kw)
    return SourceSpec(**args)


def store_spec(store: DovecotInstance) -> StoreSpec:
    store.provision(ALICE, "{PLAIN}new-pw")  # as migrating-proxy would
    return StoreSpec(host=store.host, port=store.imap_port, tls="none", address=ALICE,
                     master_user=store.master_user, master_password=store.master_password)


def login(server: DovecotInstance, password: str = ALICE_PW) -> IMAPClient:
    client = IMAPClient(server.host, port=server.imap_port, ssl=False, timeout=30)
    client.normalise_times = False
    if server.kind == "new":
        client.plain_login(server.master_user, server.master_password,
                           authorization_identity=ALICE)
    else:
        client.login(ALICE, password)
    return client


def snapshot(server: DovecotInstance) -> Snapshot:
    """Folder -> sorted (body, flags, INTERNALDATE) of every message, read with PEEK."""
    with login(server) as client:
        return snapshot_folders(client)


def _nonempty(snap: Snapshot) -> Snapshot:
    return {k: v for k, v in snap.items() if v}


# --- the full copy ---------------------------------------------------------------------------


def test_full_copy_incremental_and_idempotent(old_server: DovecotInstance,
                                              new_store: DovecotInstance, engine: Engine) -> None:
    spec = corpus()
    spec["INBOX"].append(_seed(make_message("Big", "big\n", dt.datetime(2017, 1, 1, tzinfo=NY),
                                            size=20_000_000)))
    seed_mailbox(old_server.host, old_server.imap_port, ALICE, ALICE_PW, spec)
    before = snapshot(old_server)
    store = store_spec(new_store)
    seen: list[int] = []
    result = run_copy(engine, _account_id(engine), source_spec(old_server), store,
                      on_progress=lambda p: seen.append(p.messages_copied))
    assert result.state == "completed", result.error
    total = sum(len(v) for v in spec.values())
    assert result.progress.messages_copied == total and result.progress.messages_skipped == 0
    assert seen and seen[-1] == total

    after_source, copied = snapshot(old_server), snapshot(new_store)
    assert after_source == before  # nothing at the source changed (no \Seen from reading)
    assert _nonempty(copied) == _nonempty(before)  # same names, bytes, flags, dates (offsets)
    assert "Empty" in copied and "Projects/2024/Q1" in copied
    with login(new_store) as client:
        subscribed = {name for _f, _d, name in client.list_sub_folders()}
    assert {"Reçus", "日本語", "Projects/2024/Q1", "Sent", "Trash"} <= subscribed

    # A second run copies nothing; a new message at the source is copied alone.
    again = run_copy(engine, _account_id(engine), source_spec(old_server), store)
    assert again.state == "completed" and again.progress.messages_copied == total
    seed_mailbox(old_server.host, old_server.imap_port, ALICE, ALICE_PW, {"Reçus": [
        _seed(make_message("Later", "new\n", dt.datetime(2025, 1, 1, tzinfo=NY)))]})
    third = run_copy(engine, _account_id(engine), source_spec(old_server), store)
    assert third.progress.messages_copied == total + 1
    assert _nonempty(snapshot(new_store)) == _nonempty(snapshot(old_server))
    with engine.connect() as conn:
        row = conn.execute(select(migrations)).one()
    assert row.messages_copied == total + 1 and row.folders_done == row.folders_total


# --- no message lost to a server that answers unexpectedly (issue 8: once, under load, the
# copy completed without the 20 MB message). Each fault is forced in-process, against the real
# Dovecot pair; before the fix each of them ended a "completed" pass with a message missing, in
# a folder marked synced, which no later pass would have looked at again.


def _small_mailbox(old_server: DovecotInstance) -> tuple[Snapshot, int]:
    when = dt.datetime(2024, 2, 2, tzinfo=NY)
    messages = [_seed(make_message(f"m{i}", f"body {i}\n", when + dt.timedelta(hours=i),
                                   size=200_000 if i == 3 else 2_000), (r"\Seen",) * (i % 2))
                for i in range(6)]
    seed_mailbox(old_server.host, old_server.imap_port, ALICE, ALICE_PW, {"INBOX": messages})
    return snapshot(old_server), len(messages)


def test_a_fetch_without_the_body_is_read_again_not_skipped(
        old_server: DovecotInstance, new_store: DovecotInstance, engine: Engine,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from migrating_proxy.migration import imap_copy

    before, total = _small_mailbox(old_server)
    real, dropped = imap_copy.fetch_range, []

    def body_lost_once(client, uid_set, items, *args):  # type: ignore[no-untyped-def]
        data = real(client, uid_set, items, *args)
        if b"BODY.PEEK[]" in items and not dropped:
            uid = max(data, key=lambda u: len(data[u].get(b"BODY[]") or b""))
            data[uid].pop(b"BODY[]")  # e.g. the answer came in two FETCH responses
            dropped.append(uid)
        return data

    monkeypatch.setattr(imap_copy, "fetch_range", body_lost_once)
    result = run_copy(engine, _account_id(engine), source_spec(old_server), store_spec(new_store))
    assert dropped and result.state == "completed", result.error
    assert result.progress.messages_copied == total
    assert _nonempty(snapshot(new_store)) == _nonempty(before)


def test_a_message_saved_without_appenduid_is_found_not_forgotten(
        old_server: DovecotInstance, new_store: DovecotInstance, engine: Engine,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from migrating_proxy.migration import destination

    before, total = _small_mailbox(old_server)
    real_append = destination.append_messages
    real_find = destination.StoreWriter._store_fingerprints
    hidden = []

    def no_appenduid(client, folder, messages):  # type: ignore[no-untyped-def]
        outcome = real_append(client, folder, messages)
        return destination.AppendOutcome(outcome.ok, outcome.text)  # OK, no APPENDUID

    def not_visible_at_first(self, name, rows):  # type: ignore[no-untyped-def]
        if not hidden:  # like Dovecot's maildir while another session holds its uidlist lock
            hidden.append(name)
            return {}
        return real_find(self, name, rows)

    monkeypatch.setattr(destination, "append_messages", no_appenduid)
    monkeypatch.setattr(destination.StoreWriter, "_store_fingerprints", not_visible_at_first)
    result = run_copy(engine, _account_id(engine), source_spec(old_server), store_spec(new_store))
    assert hidden and result.state == "completed", result.error
    assert result.progress.messages_copied == total
    assert _nonempty(snapshot(new_store)) == _nonempty(before)  # each once, none missing
    with engine.connect() as conn:  # every record knows its store UID
        assert all(row.dest_uid for row in conn.execute(select(copy_messages)))


def test_special_use_and_presets(old_server: DovecotInstance, new_store: DovecotInstance,
                                 engine: Engine) -> None:
    msg = make_message("m", "m\n", dt.datetime(2024, 1, 1, tzinfo=NY))
    seed_mailbox(old_server.host, old_server.imap_port, ALICE, ALICE_PW, {
        "INBOX": [_seed(msg)], "[Gmail]/All Mail": [_seed(msg)], "[Gmail]/Starred": [_seed(msg)],
        "[Gmail]/Sent Mail": [_seed(msg)], "[Gmail]/Spam": [_seed(msg)], "Label": [_seed(msg)],
    })
    result = run_copy(engine, _account_id(engine), source_spec(old_server, type="gmail"),
                      store_spec(new_store))
    assert result.state == "completed", result.error
    counts = {k: len(v) for k, v in snapshot(new_store).items() if v}
    # This old server marks its own Sent and Junk with \\Sent and \\Junk: the preset's names
    # are only guesses, so "[Gmail]/Sent Mail" and "[Gmail]/Spam" keep their own folders.
    assert counts == {"INBOX": 1, "[Gmail]/Sent Mail": 1, "[Gmail]/Spam": 1, "Label": 1}


def test_no_folder_is_merged_into_a_special_one(old_server: DovecotInstance,
                                                new_store: DovecotInstance,
                                                engine: Engine) -> None:
    """The old server has Drafts (\\Drafts) and the user's own Entwürfe, Sent (\\Sent) and
    Sent Items, Trash and Deleted Items, Junk and Spam: each arrives with exactly its own
    messages, nothing merged."""
    when = dt.datetime(2024, 4, 4, tzinfo=NY)
    folders = {name: [_seed(make_message(f"{name} {i}", f"in {name}\n", when))
                      for i in range(1 + n % 3)]
               for n, name in enumerate(["INBOX", "Drafts", "Entwürfe", "Sent", "Sent Items",
                                         "Gesendet", "Trash", "Deleted Items", "Junk", "Spam"])}
    seed_mailbox(old_server.host, old_server.imap_port, ALICE, ALICE_PW, folders)
    with login(old_server) as client:
        drafts = [n for flags, _d, n in client.list_folders() if b"\\Drafts" in flags]
    assert drafts == ["Drafts"]  # the old server really says which one is the drafts folder
    result = run_copy(engine, _account_id(engine), source_spec(old_server),
                      store_spec(new_store))
    assert result.state == "completed", result.error
    copied, source = snapshot(new_store), snapshot(old_server)
    assert copied == source
    assert len(copied["Entwürfe"]) == 3 and len(copied["Drafts"]) == 2


# --- old servers that are not Dovecot: INBOX. namespace, parents listed after children ------


@pytest.fixture
def courier_old() -> Iterator[DovecotInstance]:
    """An old server with Courier's (and Cyrus's) namespace: "INBOX." and "." as separator,
    Maildir++, no SPECIAL-USE. (Dovecot configured that way; see the report of issue 8.)"""
    root = dovecot.instance_root("mp-courier-")
    try:
        with dovecot.old_server(root, {ALICE: ALICE_PW}, courier_style=True) as instance:
            yield instance
    finally:
        dovecot.remove_root(root)


def test_inbox_namespace_with_store_placeholders_loses_no_folder(
        courier_old: DovecotInstance, new_store: DovecotInstance, engine: Engine) -> None:
    """Children created before their parents (as a copy of a child-first LIST did) leave
    \\Noselect placeholders on the store; the parents must still be created and filled."""
    when = dt.datetime(2024, 5, 5, tzinfo=NY)
    names = ["INBOX", "INBOX.Projects.2019", "INBOX.Projects", "INBOX.Archive.2019",
             "INBOX.Archive", "INBOX.Sent", "INBOX.Drafts", "INBOX.Entwürfe", "INBOX.a.b.c"]
    seed_mailbox(courier_old.host, courier_old.imap_port, ALICE, ALICE_PW,
                 {name: [_seed(make_message(f"{name} {i}", "x\n", when)) for i in range(2)]
                  for name in names})
    store = store_spec(new_store)
    with login(new_store) as client:
        for child in ("Projects/2019", "a/b/c"):
            client.create_folder(child)
        placeholders = [n for f, _d, n in client.list_folders() if b"\\Noselect" in f]
    assert sorted(placeholders) == ["Projects", "a", "a/b"]
    result = run_copy(engine, _account_id(engine), source_spec(courier_old), store)
    assert result.state == "completed", result.error
    source = snapshot(courier_old)
    expected = {("INBOX" if n == "INBOX" else n.removeprefix("INBOX.").replace(".", "/")):
                source[n] for n in names}
    assert _nonempty(snapshot(new_store)) == expected


def test_a_folder_the_old_server_refuses_is_reported_and_the_rest_copied(
        old_server: DovecotInstance, new_store: DovecotInstance, engine: Engine) -> None:
    when = dt.datetime(2024, 6, 6, tzinfo=NY)
    folders = {name: [_seed(make_message(f"{name} {i}", "x\n", when)) for i in range(3)]
               for name in ["INBOX", "Broken", "Fine", "Later"]}
    seed_mailbox(old_server.host, old_server.imap_port, ALICE, ALICE_PW, folders)
    before = snapshot(old_server)
    broken = old_server.maildir(ALICE) / "Broken"
    broken.chmod(0)  # the old server fails STATUS and SELECT on it: "[SERVERBUG] ..."
    try:
        result = run_copy(engine, _account_id(engine), source_spec(old_server),
                          store_spec(new_store), parallel_folders=1)
    finally:
        broken.chmod(0o700)
    assert result.state == "error" and result.error_kind == "folders", result.error
    assert "Broken" in (result.error or "") and "SERVERBUG" in (result.error or "")
    copied = _nonempty(snapshot(new_store))
    assert copied == {k: v for k, v in _nonempty(before).items() if k != "Broken"}
    assert result.progress.folders_done == result.progress.folders_total - 1
    again = run_copy(engine, _account_id(engine), source_spec(old_server), store_spec(new_store))
    assert again.state == "completed", again.error
    assert _nonempty(snapshot(new_store)) == _nonempty(before)


# --- crashes, UIDVALIDITY, refusals ----------------------------------------------------------

_CHILD = """
import sys
from migrating_proxy.migration import SourceSpec, StoreSpec, run_copy
from migrating_proxy.migration import imap_copy
from migrating_proxy.store.db import make_engine
imap_copy.BATCH_MESSAGES = 3   # many batches, so the kill lands between or inside them
url, sport, dport, master, mpw = sys.argv[1:6]
src = SourceSpec("imap", "127.0.0.1", int(sport), "none", False, "alice@old.example", "alice-pw")
dst = StoreSpec("127.0.0.1", int(dport), "none", "alice@old.example", master, mpw)
parallel = int(sys.argv[6]) if len(sys.argv) > 6 else 4
print(run_copy(make_engine(url), 1, src, dst, parallel_folders=parallel).state)
"""


def _store_count(store: DovecotInstance) -> int:
    with login(store) as client:
        return sum(_messages(client, n) for f, _d, n in client.list_folders()
                   if b"\\Noselect" not in f)


def _messages(client: IMAPClient, name: str) -> int:
    try:
        return int(client.folder_status(name, [b"MESSAGES"])[b"MESSAGES"])
    except IMAPClientError:  # LIST can show a folder that a lane is still creating
        return 0


def test_kill_9_and_resume_gives_exactly_one_copy(old_server: DovecotInstance,
                                                  new_store: DovecotInstance, engine: Engine,
                                                  tmp_path: Path) -> None:
    msgs = [_seed(make_message(f"n{i}", f"body {i}\n" * 50, dt.datetime(2024, 1, 1 + i % 27,
                                                                         tzinfo=NY)))
            for i in range(60)]
    msgs += [msgs[0], msgs[1]]  # exact duplicates too
    seed_mailbox(old_server.host, old_server.imap_port, ALICE, ALICE_PW,
                 {"INBOX": msgs[:40], "Archive": msgs[40:]})
    _kill_and_resume(old_server, new_store, tmp_path, (7, 25, 45))
    assert _nonempty(snapshot(new_store)) == _nonempty(snapshot(old_server))


def _kill_and_resume(old_server: DovecotInstance, new_store: DovecotInstance, tmp_path: Path,
                     thresholds: tuple[int, ...], parallel: int = 4) -> None:
    """Kill -9 a copy once the store holds each threshold of messages, then let one finish.
    (The `engine` fixture must have created the account in tmp_path/state.db.)"""
    store = store_spec(new_store)
    url = f"sqlite:///{tmp_path / 'state.db'}"
    args = [sys.executable, "-c", _CHILD, url, str(old_server.imap_port), str(new_store.imap_port),
            store.master_user or "", store.master_password or "", str(parallel)]
    for threshold in thresholds:
        child = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while _store_count(new_store) < threshold and time.monotonic() < deadline:
            time.sleep(0.005)
        assert child.poll() is None, "the copy finished before it could be killed"
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    finished = subprocess.run(args, cwd=REPO, capture_output=True, timeout=60)
    assert finished.stdout.splitlines()[-1] == b"completed"


def test_parallel_folders_kill_9_gives_exactly_one_copy(old_server: DovecotInstance,
                                                        new_store: DovecotInstance,
                                                        engine: Engine, tmp_path: Path) -> None:
    """Three lanes, killed mid-batch in several folders at once; the same message in several
    folders, so one folder's reconciliation must not claim another's copies."""
    msgs = [_seed(make_message(f"p{i}", f"parallel {i}\n" * 40,
                               dt.datetime(2023, 1 + i % 12, 1 + i % 27, tzinfo=NY)))
            for i in range(100)]
    folders = {"INBOX": msgs[:25], "Sent": [*msgs[25:45], msgs[0]],
               "Sent Items": [*msgs[45:60], msgs[0], msgs[25]], "A": msgs[60:80],
               "B": [*msgs[80:], msgs[80]]}
    seed_mailbox(old_server.host, old_server.imap_port, ALICE, ALICE_PW, folders)
    _kill_and_resume(old_server, new_store, tmp_path, (10, 40, 75), parallel=3)
    source, copied = snapshot(old_server), snapshot(new_store)
    assert _nonempty(copied) == _nonempty(source)


def test_changed_uidvalidity_copies_nothing_twice(old_server: DovecotInstance,
                                                  new_store: DovecotInstance,
                                                  engine: Engine) -> None:
    when = dt.datetime(2024, 2, 2, tzinfo=NY)
    dup = _seed(make_message("dup", "same\n", when))
    folder = [_seed(make_message(f"f{i}", "x\n", when), (r"\Seen",), when) for i in range(4)]
    folder += [dup, dup]
    seed_mailbox(old_server.host, old_server.imap_port, ALICE, ALICE_PW, {"Folder": folder})
    store = store_spec(new_store)
    assert run_copy(engine, _account_id(engine), source_spec(old_server), store).state == \
        "completed"
    with login(old_server) as client:
        client.delete_folder("Folder")
    seed_mailbox(old_server.host, old_server.imap_port, ALICE, ALICE_PW,
                 {"Folder": [*folder, _seed(make_message("new", "y\n", when))]})
    result = run_copy(engine, _account_id(engine), source_spec(old_server), store)
    assert result.state == "completed"
    assert len(snapshot(new_store)["Folder"]) == 7


def test_refused_message_is_skipped_and_recorded(old_server: DovecotInstance,
                                                 new_store: DovecotInstance,
                                                 engine: Engine) -> None:
    # Dovecot refuses to APPEND a zero-byte message; put one straight into the old maildir.
    when = dt.datetime(2024, 3, 3, tzinfo=NY)
    seed_mailbox(old_server.host, old_server.imap_port, ALICE, ALICE_PW,
                 {"INBOX": [_seed(make_message(f"ok{i}", "fine\n", when)) for i in range(3)]})
    new_dir = old_server.maildir(ALICE) / "new"
    empty = new_dir / "1700000000.M1P1.broken"
    empty.write_bytes(b"")
    os.chown(empty, new_dir.stat().st_uid, new_dir.stat().st_gid)
    result = run_copy(engine, _account_id(engine), source_spec(old_server), store_spec(new_store))
    assert result.state == "completed", result.error
    assert result.progress.messages_copied == 3 and result.progress.messages_skipped == 1
    assert len(result.skipped) == 1 and "zero byte" in result.skipped[0][2]
    assert len(snapshot(new_store)["INBOX"]) == 3


# --- source errors ---------------------------------------------------------------------------


def test_wrong_password_and_down_source(old_server: DovecotInstance) -> None:
    check_source_login(source_spec(old_server), timeout=5)
    with pytest.raises(SourceAuthError) as info:
        check_source_login(source_spec(old_server, password="wrong-secret"), timeout=5)
    assert "wrong-secret" not in str(info.value)
    down = source_spec(old_server, port=free_port())
    started = time.monotonic()
    with pytest.raises(SourceUnavailable):
        check_source_login(down, timeout=2)
    with pytest.raises(SourceAuthError):
        check_source_login(source_spec(old_server, protocol="pop3", port=old_server.pop3_port,
                                       password="nope-nope"), timeout=5)
    assert time.monotonic() - started < 5


def test_wrong_password_reported_by_run_copy(old_server: DovecotInstance,
                                             new_store: DovecotInstance, engine: Engine) -> None:
    result = run_copy(engine, _account_id(engine),
                      source_spec(old_server, password="wrong-secret"), store_spec(new_store))
    assert result.state == "error" and result.error_kind == "auth"
    assert "wrong-secret" not in (result.error or "")


# --- POP3 ------------------------------------------------------------------------------------


def test_pop3_source(old_server: DovecotInstance, new_store: DovecotInstance,
                     engine: Engine) -> None:
    msgs = [_seed(make_message(f"p{i}", "pop\n", dt.datetime(2020, 1, 1 + i, tzinfo=TOKYO)))
            for i in range(5)]
    seed_mailbox(old_server.host, old_server.imap_port, ALICE, ALICE_PW, {"INBOX": msgs})
    spec = source_spec(old_server, protocol="pop3", port=old_server.pop3_port)
    store = store_spec(new_store)
    result = run_copy(engine, _account_id(engine), spec, store)
    assert result.state == "completed", result.error
    inbox = snapshot(new_store)["INBOX"]
    assert sorted(m[0] for m in inbox) == sorted(m.raw for m in msgs)
    assert all(m[1] == (b"\\Seen",) for m in inbox)
    assert {m[2].astimezone(dt.UTC) for m in inbox} == {
        dt.datetime(2020, 1, 1 + i, tzinfo=TOKYO).astimezone(dt.UTC) for i in range(5)}
    with engine.connect() as conn:
        uidls = conn.execute(select(pop3_uidls.c.uidl, pop3_uidls.c.size)).all()
        states = set(conn.execute(select(copy_messages.c.state)).scalars())
    assert len(uidls) == 5 and states == {"copied"}
    assert run_copy(engine, _account_id(engine), spec, store).progress.messages_copied == 5
    assert len(snapshot(new_store)["INBOX"]) == 5


def test_pop3_source_with_lines_far_over_poplibs_limit(old_server: DovecotInstance,
                                                       new_store: DovecotInstance,
                                                       engine: Engine) -> None:
    """Lines of 20,000 and 200,000 bytes (poplib refuses more than 2,048 by default), newest
    first among ordinary messages: every message arrives, byte for byte, and poplib's own
    module-wide limit is left as it was for the rest of the process."""
    limit = poplib._MAXLINE
    msgs = []
    for i, line in enumerate([0, 20_000, 0, 200_000, 0]):
        raw = make_message(f"long {i}", "short body\n", dt.datetime(2021, 3, 1 + i, tzinfo=NY))
        if line:
            raw = raw.replace(b"\r\n\r\n", b"\r\n\r\n" + b"A" * line + b"\r\n", 1)
        msgs.append(_seed(raw))
    seed_mailbox(old_server.host, old_server.imap_port, ALICE, ALICE_PW, {"INBOX": msgs})
    spec = source_spec(old_server, protocol="pop3", port=old_server.pop3_port)
    result = run_copy(engine, _account_id(engine), spec, store_spec(new_store))
    assert result.state == "completed", result.error
    assert sorted(m[0] for m in snapshot(new_store)["INBOX"]) == sorted(m.raw for m in msgs)
    assert limit == poplib._MAXLINE
