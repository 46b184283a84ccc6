"""The copy engine's pure parts: folder planning, fingerprints, batching, APPENDUID sets,
the read-ahead pipeline."""

from __future__ import annotations

import threading

import pytest

from migrating_proxy.migration.folders import (
    FolderMapping,
    Namespace,
    plan_folders,
    translate_name,
)
from migrating_proxy.migration.imap_copy import by_destination
from migrating_proxy.migration.messages import (
    batches,
    crlf_size,
    fingerprint,
    message_fingerprint,
    parse_uid_set,
)
from migrating_proxy.migration.pipeline import ByteBudget, Prefetcher

SLASH = Namespace("", "/")


def _plan(names: list[tuple[tuple[bytes, ...], str]], preset: str = "default",
          source_ns: Namespace = SLASH, store: list | None = None) -> dict[str, str]:
    listing = [(flags, b"/" if source_ns.delimiter == "/" else b".", name)
               for flags, name in names]
    return {m.source: m.dest for m in plan_folders(listing, set(), source_ns, store or [],
                                                   SLASH, preset)}


def test_special_use_by_attribute_name_and_store_attribute() -> None:
    store = [((b"\\Sent",), b"/", "Sent Messages"), ((b"\\Junk",), b"/", "Spam")]
    plan = _plan([((), "INBOX"), ((b"\\Sent",), "Gesendet"), ((), "Junk"), ((), "Trash"),
                  ((b"\\Noselect",), "Projects"), ((), "Projects/Q1")], store=store)
    assert plan == {"INBOX": "INBOX", "Gesendet": "Sent Messages", "Junk": "Spam",
                    "Trash": "Trash", "Projects/Q1": "Projects/Q1"}


def test_exchange_preset_skips_non_mail_and_maps_names() -> None:
    plan = _plan([((), "INBOX"), ((), "Sent Items"), ((), "Deleted Items"), ((), "Junk Email"),
                  ((), "Calendar"), ((), "Calendar/Birthdays"), ((), "Sync Issues/Conflicts"),
                  ((), "Contacts"), ((), "Conversation History"), ((), "Kunden")], "exchange")
    assert plan == {"INBOX": "INBOX", "Sent Items": "Sent", "Deleted Items": "Trash",
                    "Junk Email": "Junk", "Kunden": "Kunden"}


def test_gmail_preset_by_name_and_attribute() -> None:
    plan = _plan([((), "INBOX"), ((b"\\All",), "[Gmail]/Alle Nachrichten"),
                  ((), "[Gmail]/Important"), ((), "[Gmail]/Sent Mail"), ((), "[Gmail]/Spam"),
                  ((b"\\Noselect",), "[Gmail]"), ((), "Work")], "gmail")
    assert plan == {"INBOX": "INBOX", "[Gmail]/Sent Mail": "Sent", "[Gmail]/Spam": "Junk",
                    "Work": "Work"}


def test_delimiter_and_namespace_translation() -> None:
    courier = Namespace("INBOX.", ".")
    plan = _plan([((), "INBOX"), ((), "INBOX.Sent"), ((), "INBOX.a.b"), ((), "INBOX.x/y")],
                 source_ns=courier)
    assert plan == {"INBOX": "INBOX", "INBOX.Sent": "Sent", "INBOX.a.b": "a/b",
                    "INBOX.x/y": "x_y"}
    assert translate_name("a.b", Namespace("", "."), Namespace("INBOX.", ".")) == "INBOX.a.b"


def test_inbox_first() -> None:
    listing = [((), b"/", "Zeta"), ((), b"/", "INBOX"), ((), b"/", "Alpha")]
    plan = plan_folders(listing, set(), SLASH, [], SLASH)
    assert [m.dest for m in plan] == ["INBOX", "Zeta", "Alpha"]


def test_fingerprint_same_from_full_message_and_header_fields() -> None:
    raw = (b"Subject: s\r\nMessage-ID:\r\n <a@b>\r\nDate: Mon, 1 Jan 2024 10:00:00 +0000\r\n"
           b"\r\nbody\r\n")
    fields = b"Message-ID:\r\n <a@b>\r\nDate: Mon, 1 Jan 2024 10:00:00 +0000\r\n\r\n"
    assert message_fingerprint(raw) == fingerprint(fields, len(raw))
    assert message_fingerprint(raw) != message_fingerprint(raw + b"x\r\n")
    assert crlf_size(b"a\nb\r\n") == 6


def test_batches_bound_bytes_and_count() -> None:
    sizes = [1, 1, 50, 1, 1, 1]
    assert list(batches(sizes, lambda s: s, 2, 10)) == [[1, 1], [50], [1, 1], [1]]


def test_uid_sets() -> None:
    assert parse_uid_set(b"3:5,9,12:11") == [3, 4, 5, 9, 11, 12]


# --- pipeline: read-ahead and the byte budget -------------------------------------------------


def test_prefetcher_keeps_order_and_bounds_memory() -> None:
    budget = ByteBudget(limit=25)
    peak = [0]

    def read(group: list[int]) -> list[int]:
        peak[0] = max(peak[0], budget._used)
        return group

    groups = [[10], [10], [10], [60], [10]]  # 60: bigger than the limit, travels alone
    with Prefetcher(groups, read, sum, budget) as fetched:
        out = [batch for batch in fetched]
    assert out == groups
    assert peak[0] <= 60 and budget._used == 0


def test_prefetcher_hands_on_read_errors_and_releases_on_early_exit() -> None:
    budget = ByteBudget(limit=100)

    def failing(group: list[int]) -> list[int]:
        if group == [3]:
            raise OSError("connection lost")
        return group

    seen = []
    with pytest.raises(OSError), Prefetcher([[1], [2], [3], [4]], failing, sum,
                                            budget) as fetched:
        for batch in fetched:
            seen.append(batch)
    assert seen == [[1], [2]] and budget._used == 0

    aborted = []
    with pytest.raises(RuntimeError), Prefetcher(([n] for n in range(100)), lambda g: g, sum,
                                                 budget, on_abort=lambda: aborted.append(1)
                                                 ) as fetched:
        for _batch in fetched:
            raise RuntimeError("the store failed")
    assert aborted == [1] and budget._used == 0


def test_budget_waits_until_released() -> None:
    budget, cancelled = ByteBudget(limit=10), threading.Event()
    assert budget.acquire(8, cancelled)
    got = threading.Event()
    waiter = threading.Thread(target=lambda: budget.acquire(5, cancelled) and got.set())
    waiter.start()
    assert not got.wait(0.3)  # 8 + 5 > 10: waits
    budget.release(8)
    assert got.wait(2)
    waiter.join()
    cancelled.set()
    assert not budget.acquire(20, cancelled)  # 5 held, 20 more never fits: gives up


def test_folders_sharing_a_store_name_go_to_one_lane() -> None:
    plan = [FolderMapping("INBOX", "INBOX", True), FolderMapping("Sent", "Sent", True, "sent"),
            FolderMapping("A", "A", True), FolderMapping("Sent Items", "Sent", True, "sent")]
    groups = by_destination(plan)
    assert [[m.source for m in g] for g in groups] == [["INBOX"], ["Sent", "Sent Items"], ["A"]]
