"""The copy engine's pure parts: folder planning, fingerprints, batching, APPENDUID sets,
the read-ahead pipeline."""

from __future__ import annotations

import threading

import pytest

from migrating_proxy.migration.connections import describe_error
from migrating_proxy.migration.folders import (
    Namespace,
    plan_folders,
    translate_name,
)
from migrating_proxy.migration.messages import (
    batches,
    crlf_size,
    fetch_range,
    fetch_responses,
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
    plan = plan_folders(listing, set(), source_ns, store or [], SLASH, preset)
    dests = [m.dest for m in plan]
    assert len(set(dests)) == len(dests), f"two source folders share a store folder: {plan}"
    return {m.source: m.dest for m in plan}


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


# --- no folder is ever merged into another (issue 8, item 2) --------------------------------

# (special folder with its attribute, a plain folder whose name means the same use)
PAIRS = [
    ("Drafts", b"\\Drafts", "Entwürfe"),  # German
    ("Sent", b"\\Sent", "Gesendete Objekte"),
    ("Trash", b"\\Trash", "Papierkorb"),
    ("Drafts", b"\\Drafts", "Brouillons"),  # French
    ("Sent", b"\\Sent", "Éléments envoyés"),
    ("Junk", b"\\Junk", "Courrier indésirable"),
    ("Drafts", b"\\Drafts", "Borradores"),  # Spanish
    ("Trash", b"\\Trash", "Papelera"),
    ("Sent", b"\\Sent", "Elementos enviados"),
    ("Drafts", b"\\Drafts", "Bozze"),  # Italian
    ("Sent", b"\\Sent", "Posta inviata"),
    ("Trash", b"\\Trash", "Cestino"),
    ("Sent", b"\\Sent", "Sent Items"),  # English variants
    ("Trash", b"\\Trash", "Deleted Items"),
    ("Junk", b"\\Junk", "Spam"),
    ("Sent", b"\\Sent", "Sent Messages"),
]


@pytest.mark.parametrize(("special", "attribute", "plain"), PAIRS)
def test_a_plain_folder_named_like_a_special_one_keeps_its_own_name(
        special: str, attribute: bytes, plain: str) -> None:
    for order in (1, -1):  # whichever LIST gives first
        listing = [((), "INBOX"), ((attribute,), special), ((), plain)]
        assert _plan([listing[0], *listing[1:][::order]]) == {
            "INBOX": "INBOX", special: special, plain: plain}


@pytest.mark.parametrize(("special", "attribute", "plain"), PAIRS)
def test_the_store_special_folder_is_taken_by_the_attribute_not_by_the_name(
        special: str, attribute: bytes, plain: str) -> None:
    """The store calls its special folder by the plain folder's name: the folder with the
    attribute goes there, the plain one beside it, under a name of its own."""
    store = [((attribute,), b"/", plain)]
    plan = _plan([((), "INBOX"), ((), plain), ((), f"{plain}/2019"), ((attribute,), special)],
                 store=store)
    assert plan == {"INBOX": "INBOX", special: plain, plain: f"{plain} (2)",
                    f"{plain}/2019": f"{plain} (2)/2019"}


@pytest.mark.parametrize(("guessed", "other", "store_folder"), [
    ("Sent", "Sent Items", "Sent"), ("Trash", "Deleted Items", "Trash"),
    ("Junk", "Spam", "Junk"), ("Drafts", "Entwürfe", "Drafts"),
    ("Gesendet", "Gesendete Objekte", "Sent"), ("Corbeille", "Éléments supprimés", "Trash"),
    ("Borradores", "Bozze", "Drafts"),
])
def test_without_attributes_one_folder_per_use_is_guessed(guessed: str, other: str,
                                                           store_folder: str) -> None:
    """Courier advertises no special use: a guess by name, for one folder only, the same
    one whatever LIST's order; the other keeps its name."""
    for names in ([guessed, other], [other, guessed]):
        plan = _plan([((), "INBOX"), *(((), n) for n in names)])
        assert plan == {"INBOX": "INBOX", guessed: store_folder, other: other}


def test_two_folders_with_one_attribute_are_both_kept() -> None:
    plan = _plan([((), "INBOX"), ((b"\\Sent",), "Sent"), ((b"\\Sent",), "Sent 2010")])
    assert plan == {"INBOX": "INBOX", "Sent": "Sent", "Sent 2010": "Sent 2010"}


def test_a_preset_name_beats_a_well_known_one_and_the_loser_keeps_its_name() -> None:
    plan = _plan([((), "INBOX"), ((), "Sent"), ((), "Sent Items")], "exchange")
    assert plan == {"INBOX": "INBOX", "Sent Items": "Sent", "Sent": "Sent (2)"}


def test_names_that_meet_after_translation_stay_apart() -> None:
    courier = Namespace("INBOX.", ".")
    plan = _plan([((), "INBOX"), ((), "INBOX.x/y"), ((), "INBOX.x_y"), ((), "INBOX.Inbox"),
                  ((), "INBOX.Inbox.old")], source_ns=courier)
    assert plan == {"INBOX": "INBOX", "INBOX.x/y": "x_y", "INBOX.x_y": "x_y (2)",
                    "INBOX.Inbox": "Inbox (2)", "INBOX.Inbox.old": "Inbox (2)/old"}


def test_parents_come_before_children_whatever_the_list_order() -> None:
    """Courier and Cyrus may list INBOX.Archive.2019 before INBOX.Archive."""
    courier = Namespace("INBOX.", ".")
    listing = [((), b".", "INBOX.Archive.2019.Q1"), ((), b".", "INBOX.Archive.2019"),
               ((), b".", "INBOX.Zeta"), ((), b".", "INBOX"), ((), b".", "INBOX.Archive")]
    plan = plan_folders(listing, set(), courier, [], SLASH)
    assert [m.dest for m in plan] == ["INBOX", "Archive", "Archive/2019", "Archive/2019/Q1",
                                      "Zeta"]


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


def test_error_descriptions_never_quote_what_we_sent() -> None:
    """A UnicodeEncodeError names a character of the password and its position; network
    errors and server replies are described in full."""
    try:
        "Grüße".encode("ascii")
    except UnicodeEncodeError as exc:
        assert describe_error(exc) == "UnicodeEncodeError"
    assert describe_error(ConnectionRefusedError(111, "Connection refused")) == \
        "ConnectionRefusedError: [Errno 111] Connection refused"


# --- FETCH responses: only those that name a UID (mirror passes depend on it) ---------------


class _FakeImap:
    """imaplib's side of one UID FETCH: the data it hands back, unsolicited responses too."""

    def __init__(self, data: list) -> None:  # type: ignore[type-arg]
        self.data = data
        self.untagged_responses = {"FETCH": [b"9 (FLAGS (\\Deleted))"]}  # from an earlier command
        self.sent: tuple = ()  # type: ignore[type-arg]

    def uid(self, *args: str) -> tuple[str, list]:  # type: ignore[type-arg]
        assert "FETCH" not in self.untagged_responses, "stale responses were not dropped"
        self.sent = args
        return "OK", self.data


class _FakeClient:
    normalise_times = False

    def __init__(self, data: list) -> None:  # type: ignore[type-arg]
        self._imap = _FakeImap(data)

    def _checkok(self, *_args: object) -> None:
        return None


def test_unsolicited_fetch_responses_are_never_taken_for_uids() -> None:
    # Another session of the user flagged the message at sequence number 257 while ours ran
    # UID FETCH: Dovecot tells us with a FETCH that names no UID. Sequence 257 is not UID 257.
    data = [
        (b"3 (UID 257 FLAGS (\\Seen) BODY[] {5}", b"hello"), b")",
        b"257 (FLAGS (\\Flagged))",
        b"700 (FLAGS (\\Flagged))",
        b"258 (UID 612 FLAGS ())",
        (b"4 (UID 613 BODY[HEADER.FIELDS (SUBJECT)] {4}", b"ab\r\n"),
        (b" BODY[] {3}", b"xyz"), b" FLAGS (\\Answered))",
        b"5 (UID 614 BODY[] NIL FLAGS (\\Deleted))",
    ]
    client = _FakeClient(data)
    got = fetch_range(client, "257,612:614", b"BODY.PEEK[] FLAGS",  # type: ignore[arg-type]
                      "(CHANGEDSINCE 7)")
    assert client._imap.sent == ("FETCH", "257,612:614", "(BODY.PEEK[] FLAGS)",
                                 "(CHANGEDSINCE 7)")
    assert sorted(got) == [257, 612, 613, 614]
    assert got[257][b"FLAGS"] == (b"\\Seen",) and got[257][b"BODY[]"] == b"hello"
    assert got[613][b"BODY[]"] == b"xyz" and got[613][b"FLAGS"] == (b"\\Answered",)
    assert got[614][b"BODY[]"] is None  # expunged by another session meanwhile
    assert [len(r) for r in fetch_responses(data)] == [2, 1, 1, 1, 3, 1]


def test_one_message_over_several_fetch_responses_keeps_its_body() -> None:
    # A server may split a message's data, or follow it with an unsolicited FETCH that has
    # the UID (CONDSTORE): the body read first must survive the FLAGS that come after.
    data = [
        (b"3 (UID 257 BODY[] {5}", b"hello"), b")",
        b"3 (UID 257 FLAGS (\\Seen \\Answered))",
    ]
    got = fetch_range(_FakeClient(data), "257", b"BODY.PEEK[] FLAGS")  # type: ignore[arg-type]
    assert got[257][b"BODY[]"] == b"hello" and got[257][b"FLAGS"] == (b"\\Seen", b"\\Answered")


class _SearchClient:
    def __init__(self, still: list[int]) -> None:
        self.still, self.calls = still, []  # type: ignore[var-annotated]

    def noop(self) -> None:
        self.calls.append("noop")

    def search(self, criteria: list[str]) -> list[int]:
        self.calls.append(criteria)
        return self.still


def test_a_message_without_a_body_is_skipped_only_when_expunged() -> None:
    from migrating_proxy.migration.connections import TransientError
    from migrating_proxy.migration.imap_copy import _confirm_expunged

    gone = _SearchClient([])
    _confirm_expunged(gone, [5, 6, 7])  # type: ignore[arg-type]
    assert gone.calls == ["noop", ["UID", "5:7"]]
    with pytest.raises(TransientError, match="still has"):
        _confirm_expunged(_SearchClient([6]), [5, 6, 7])  # type: ignore[arg-type]
