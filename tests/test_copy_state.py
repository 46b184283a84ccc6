"""CopyState on SQLite and (when reachable) PostgreSQL: write-ahead, settling, re-keying."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import Engine, select

from migrating_proxy.store import Store
from migrating_proxy.store.copystate import COPIED, INFLIGHT, SKIPPED, CopyState, MessageRecord
from migrating_proxy.store.schema import migrations, pop3_uidls


@pytest.fixture
def engine(store: Store) -> Engine:
    """An account store on SQLite and on PostgreSQL (conftest's `store`), with one account."""
    store.accounts.add_account(f"u{uuid.uuid4().hex[:8]}@old.example", "{PLAIN}x")
    return store.engine


def _state(engine: Engine) -> CopyState:
    from migrating_proxy.store.schema import accounts
    with engine.connect() as conn:
        account_id = conn.execute(select(accounts.c.id).order_by(accounts.c.id.desc())).scalar()
    return CopyState(engine, int(account_id))


def _rec(key: str, fp: str = "fp", size: int = 10) -> MessageRecord:
    return MessageRecord(key, INFLIGHT, fp, size, dest_uidvalidity=7, dest_uidnext=100)


def test_write_ahead_then_settle(engine: Engine) -> None:
    state = _state(engine)
    folder = state.folder("Reçus", "Reçus")
    assert state.folder("Reçus", "Reçus").id == folder.id
    state.begin_batch(folder.id, [_rec("1"), _rec("2"), _rec("3", size=2**33)])
    assert state.has_inflight(folder.id) and state.known_keys(folder.id) == {"1", "2", "3"}
    state.finish(folder.id, copied=[("1", 100), ("3", 101)], skipped=[("2", "too big")])
    assert not state.has_inflight(folder.id)
    assert {r.source_key: r.state for r in state.records(folder.id)} == {
        "1": COPIED, "2": SKIPPED, "3": COPIED}
    assert state.used_dest_uids("Reçus") == {100, 101}
    assert state.skipped() == [("Reçus", "2", "too big")]
    totals = state.totals()
    assert (totals.copied, totals.skipped, totals.bytes_copied) == (2, 1, 10 + 2**33)
    state.write_progress(messages_copied=2, bytes_copied=totals.bytes_copied)  # clamped, no error
    with engine.connect() as conn:
        assert conn.execute(select(migrations.c.messages_copied)).scalar() == 2


def test_dropped_rows_are_forgotten_and_rekey(engine: Engine) -> None:
    state = _state(engine)
    folder = state.folder("INBOX", "INBOX")
    state.begin_batch(folder.id, [_rec("5", "a"), _rec("6", "b")])
    state.finish(folder.id, copied=[("5", 1)], dropped=["6"])
    assert state.known_keys(folder.id) == {"5"}
    state.mark_synced(folder.id, 11, 7)
    old = state.records(folder.id)[0]
    state.rekey(folder.id, 12, [MessageRecord("1", old.state, old.fingerprint, old.size,
                                              dest_uid=old.dest_uid)])
    again = state.folder("INBOX", "INBOX")
    assert (again.uidvalidity, again.synced_uidnext) == (12, None)
    assert [(r.source_key, r.dest_uid) for r in state.records(folder.id)] == [("1", 1)]


def test_pop3_uidls_recorded_with_the_copy(engine: Engine) -> None:
    state = _state(engine)
    folder = state.folder("POP3", "INBOX")
    state.begin_batch(folder.id, [_rec("UID-a", size=123), _rec("UID-b", size=5)])
    state.finish(folder.id, copied=[("UID-a", 1), ("UID-b", 2)], pop3=True)
    state.finish(folder.id, copied=[("UID-a", 1)], pop3=True)  # idempotent
    with engine.connect() as conn:
        rows = sorted(conn.execute(select(pop3_uidls.c.uidl, pop3_uidls.c.size)).all())
    assert rows == [("UID-a", 123), ("UID-b", 5)]
