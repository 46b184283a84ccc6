"""POP3 continuity without mail servers: the relay's UIDL translation byte by byte, the
matching of the old server's listing to the store's copies, and what is kept in the account
store (issue 10). The end-to-end proof, with real Dovecot servers, poplib and fetchmail, is
tests/test_pop3_continuity.py."""

from __future__ import annotations

from migrating_proxy.frontends.uidl import UidlMap, UidlTranslator, answer_kind
from migrating_proxy.migration.messages import message_fingerprint
from migrating_proxy.migration.pop3_uidls import Copy, OldMessage, match, uid_in_uidl
from migrating_proxy.store import Store
from migrating_proxy.store.copystate import CopyState
from migrating_proxy.store.pop3uidls import KeptUidl, Pop3Uidls, unmatched_summary
from migrating_proxy.store.status import migration_status

UIDLS = UidlMap({"S1": "old-a", "S2": "old-b", "S3": "old-c"})

CLIENT = b"UIDL\r\nRETR 1\r\nUIDL 2\r\nLIST\r\nUIDL 9\r\nTOP 1 0\r\nUIDL\r\nNOOP\r\n"
BODY = b"Subject: x\r\n\r\n..UIDL 1 S1\r\n1 S2\r\n.\r\n"  # a dot-stuffed line, and a lookalike
SERVER = (b"+OK\r\n1 S1\r\n2 S2\r\n3 S3\r\n4 NEW\r\n.\r\n"
          b"+OK 60 octets\r\n" + BODY
          + b"+OK 2 S2\r\n"
          + b"+OK 2 messages\r\n1 60\r\n2 70\r\n.\r\n"
          + b"-ERR no such message\r\n"
          + b"+OK\r\nSubject: x\r\n\r\n.\r\n"
          + b"+OK\r\n1 S1\r\n.\r\n"
          + b"+OK\r\n")
EXPECTED = (b"+OK\r\n1 old-a\r\n2 old-b\r\n3 old-c\r\n4 NEW\r\n.\r\n"
            b"+OK 60 octets\r\n" + BODY
            + b"+OK 2 old-b\r\n"
            + b"+OK 2 messages\r\n1 60\r\n2 70\r\n.\r\n"
            + b"-ERR no such message\r\n"
            + b"+OK\r\nSubject: x\r\n\r\n.\r\n"
            + b"+OK\r\n1 old-a\r\n.\r\n"
            + b"+OK\r\n")


def relay(client_chunks: list[bytes], server_chunks: list[bytes]) -> bytes:
    translator = UidlTranslator(UIDLS)
    for chunk in client_chunks:
        translator.from_client(chunk)
    return b"".join(translator.from_server(chunk) for chunk in server_chunks)


def split_at_every_byte(data: bytes) -> list[bytes]:
    return [data[i:i + 1] for i in range(len(data))]


def test_only_uidl_answers_change_pipelined() -> None:
    assert relay([CLIENT], [SERVER]) == EXPECTED


def test_every_split_of_either_side_gives_the_same_bytes() -> None:
    assert relay(split_at_every_byte(CLIENT), split_at_every_byte(SERVER)) == EXPECTED
    for cut in range(1, len(SERVER)):
        assert relay([CLIENT], [SERVER[:cut], SERVER[cut:]]) == EXPECTED, cut


def test_commands_one_at_a_time_as_a_client_sends_them() -> None:
    translator = UidlTranslator(UIDLS)
    translator.from_client(b"STAT\r\n")
    assert translator.from_server(b"+OK 3 190\r\n") == b"+OK 3 190\r\n"
    translator.from_client(b"uidl 3\r\n")  # commands are case-insensitive
    assert translator.from_server(b"+OK 3 S3\r\n") == b"+OK 3 old-c\r\n"
    translator.from_client(b"RETR 3\r\n")
    body = b"+OK\r\n" + b"x" * 10_000 + b"\r\n.\r\n"
    assert translator.from_server(body) == body


def test_a_new_uidl_equal_to_an_old_one_is_made_unique() -> None:
    uidls = UidlMap({"S1": "old-a"}, frozenset({"old-a", "old-b"}))
    assert uidls.translate("S1") == "old-a"
    assert uidls.translate("old-b") == "~old-b"  # an unmatched copy or later mail, not old-b
    assert uidls.translate("S9") == "S9"
    translator = UidlTranslator(uidls)
    translator.from_client(b"UIDL\r\n")
    assert translator.from_server(b"+OK\r\n1 S1\r\n2 old-b\r\n.\r\n") == \
        b"+OK\r\n1 old-a\r\n2 ~old-b\r\n.\r\n"


def test_answer_shapes() -> None:
    assert [answer_kind(c) for c in (b"UIDL", b"UIDL 1", b"LIST", b"LIST 1", b"RETR 1",
                                     b"TOP 1 5", b"CAPA", b"DELE 1", b"QUIT", b"")] == [
        "uidl-all", "uidl-one", "multi", "single", "multi", "multi", "multi", "single",
        "single", "single"]


# --- matching the old listing to the copies --------------------------------------------------


def raw(subject: str, size_pad: int = 0) -> bytes:
    return (f"Message-ID: <{subject}@x>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
            f"Subject: {subject}\r\n\r\nbody{'x' * size_pad}\r\n").encode()


def test_dovecot_and_cyrus_uidl_formats_name_the_uid() -> None:
    assert uid_in_uidl("0000002a65a0b1c2", 0x65A0B1C2) == 42
    assert uid_in_uidl("0000002a65a0b1c2", 0x65A0B1C3) is None  # another UIDVALIDITY
    assert uid_in_uidl("1700000000.42", 1700000000) == 42
    assert uid_in_uidl("UID42-1700000000", 1700000000) is None
    assert uid_in_uidl("0000002a65a0b1c2", None) is None


def test_matched_by_uid_then_by_headers_and_the_rest_reported() -> None:
    validity = 0x65A0B1C2
    copies = [Copy("1", 101, message_fingerprint(raw("a"))),
              Copy("2", 102, message_fingerprint(raw("b"))),
              Copy("3", 103, message_fingerprint(raw("dup"))),
              Copy("4", 104, message_fingerprint(raw("dup")))]
    old = [OldMessage(1, f"00000001{validity:08x}", len(raw("a"))),
           OldMessage(2, "opaque-b", len(raw("b"))),
           OldMessage(3, "opaque-d1", len(raw("dup"))),
           OldMessage(4, "opaque-d2", len(raw("dup"))),
           OldMessage(5, "opaque-lost", 10)]
    headers = {2: raw("b"), 3: raw("dup"), 4: raw("dup"), 5: raw("never copied")}
    asked: list[int] = []

    def fingerprints(rest: list[OldMessage]) -> dict[int, str]:
        asked.extend(m.position for m in rest)
        return {m.position: message_fingerprint(headers[m.position]) for m in rest}

    matched = match(old, copies, by_uidl=False, uidvalidity=validity, fingerprints=fingerprints)
    assert matched == {1: 101, 2: 102, 3: 103, 4: 104}  # duplicates pair up in order
    assert asked == [2, 3, 4, 5]  # headers only where the UIDL said nothing


def test_a_pop3_source_matches_by_uidl_alone() -> None:
    copies = [Copy("u1", 7, "f"), Copy("u2", 8, "f")]
    old = [OldMessage(1, "u2", 1), OldMessage(2, "u1", 1)]

    def no_headers(rest: list[OldMessage]) -> dict[int, str]:
        raise AssertionError("not needed")

    assert match(old, copies, by_uidl=True, uidvalidity=None, fingerprints=no_headers) == {
        1: 8, 2: 7}


# --- what the switch keeps, in the account store (SQLite and PostgreSQL) ----------------------


def test_kept_uidls_replace_earlier_ones_and_become_the_relays_table(store: Store) -> None:
    account = store.accounts.add_account("pop@example.com", "x", migration_state="PENDING")
    CopyState(store.engine, account.id).write_progress()  # the migrations row of a copy
    uidls = Pop3Uidls(store.engine)
    uidls.keep(account.id, [KeptUidl(1, "gone", 5, "S0")], "kept")
    entries = [KeptUidl(1, "old-a", 10, "S1"), KeptUidl(2, "old-b", 20, None),
               KeptUidl(3, "old-c", 30, "S3")]
    uidls.keep(account.id, entries, unmatched_summary(1))
    assert uidls.kept(account.id) == entries
    table = uidls.translation(account.id)
    assert table == UidlMap({"S1": "old-a", "S3": "old-c"}, frozenset({"old-a", "old-b",
                                                                       "old-c"}))
    [row] = migration_status(store.engine, ["pop@example.com"])
    assert row["pop3_uidls"] == "unmatched: 1"
    other = store.accounts.add_account("none@example.com", "x", migration_state="PENDING")
    assert uidls.translation(other.id) is None
    assert migration_status(store.engine, ["none@example.com"])[0]["pop3_uidls"] == "none"
