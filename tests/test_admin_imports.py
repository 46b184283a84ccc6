"""The CSV import's parsing and validation (pure: no database, no servers)."""

from __future__ import annotations

import pytest

from migrating_proxy.admin.imports import ImportPlan, decode, parse_import
from migrating_proxy.admin.progress import ProgressDisplay
from migrating_proxy.store import Domain

HEADER = "login_source;pass_source;host_source;type_messagerie;login_destination;subscribed_only"
DOMAINS = {
    "old.example": Domain("old.example", "imaps://mail.old.example:993"),
    "gm.example": Domain("gm.example", "imap://imap.gm.example:143", type="gmail",
                         source_user="%n"),
}


def parse(text: str, existing: dict[str, str | None] | None = None) -> ImportPlan:
    return parse_import(decode(text.encode()), DOMAINS, existing or {})


def errors(plan: ImportPlan) -> list[tuple[int, str]]:
    return [(bad.line, bad.column) for bad in plan.errors]


def test_hosted_format_with_bom_crlf_and_every_host_form() -> None:
    text = "\ufeff" + "\r\n".join([
        HEADER,
        "alice@old.example;a;;default;;False",            # the domain's own source
        "bob@old.example;b;other.example;;;",               # bare host: domain's scheme/port
        "carol@old.example;c;other.example:1993;;;",        # host:port
        "dave@old.example;d;pop3s://pop.example;;;false",   # a full URL
        "eve@old.example;e;mail.old.example:993;;;",        # the domain's source, spelt out
        "old-frank;f;;gmail;frank@gm.example;",             # address map: login differs
        "grace;g;;;grace@gm.example;",                      # the template gives the same login
    ]) + "\r\n"
    plan = parse(text)
    assert plan.errors == []
    rows = {row.address: row for row in plan.rows}
    assert rows["alice@old.example"].source_url is None
    assert rows["bob@old.example"].source_url == "imaps://other.example:993"
    assert rows["carol@old.example"].source_url == "imaps://other.example:1993"
    assert rows["dave@old.example"].source_url == "pop3s://pop.example:995"
    assert rows["eve@old.example"].source_url is None
    assert rows["frank@gm.example"].source_login == "old-frank"
    assert rows["grace@gm.example"].source_login is None
    assert rows["alice@old.example"].password == "a" and rows["alice@old.example"].line == 2


def test_minimal_comma_form_with_and_without_header() -> None:
    for text in ('address,password\nalice@old.example,"p,w"\n', 'alice@old.example,"p,w"\n'):
        plan = parse(text)
        assert plan.errors == [] and plan.rows[0].password == "p,w"


def test_every_bad_line_is_reported_with_its_column_and_no_password() -> None:
    text = "\n".join([
        HEADER,
        "alice@old.example;secret-1;;default;;False",       # fine
        "bob@nowhere.example;secret-2;;;;",                 # domain not configured
        "carol@old.example;;;;;",                           # empty password
        "dave@old.example;secret-3;ftp://x;;;",             # not an IMAP/POP3 URL
        "erin@old.example;secret-4;;exchange;;",            # differs from the domain's type
        "frank@old.example;secret-5;;;;maybe",              # not a boolean
        "alice@old.example;secret-6;;;;",                   # duplicate
        "too;few",                                          # wrong column count
        "not an address;secret-7;;;;",
        "local@old.example;secret-8;;;;",                   # a local account
    ])
    plan = parse(text, existing={"local@old.example": None})
    assert errors(plan) == [
        (3, "login_source"), (4, "pass_source"), (5, "host_source"), (6, "type_messagerie"),
        (7, "subscribed_only"), (8, "login_destination"), (9, "line"), (10, "login_source"),
        (11, "login_source"),
    ]
    text_of_errors = " ".join(str(bad) for bad in plan.errors)
    assert "secret" not in text_of_errors
    assert "line 9: expected 6 columns" in text_of_errors  # not "line 9: line: expected..."


def test_existing_migrating_accounts_are_updates() -> None:
    plan = parse("alice@old.example,new-pw\n", existing={"alice@old.example": "COMPLETED"})
    assert plan.errors == [] and plan.rows[0].existing


@pytest.mark.parametrize("text", ["", "\n\n", HEADER + "\n"])
def test_a_file_without_users_is_refused(text: str) -> None:
    assert errors(parse(text)) == [(1, "file")]


def test_not_utf8_names_the_line() -> None:
    with pytest.raises(ValueError, match="line 2"):
        decode(b"address,password\nb\xe9b@old.example,x\n")


def test_progress_display_total_rate_and_eta() -> None:
    ticks = iter([0.0, 10.0])
    display = ProgressDisplay(stream=None, clock=lambda: next(ticks))  # type: ignore[arg-type]
    row = {"address": "a@old.example", "state": "PENDING", "job_state": "running",
           "messages_total": 300, "messages_copied": 0, "messages_skipped": 0,
           "bytes_copied": 0}
    display.render([row])
    lines = display.render([{**row, "messages_copied": 100, "bytes_copied": 10 * 1024 * 1024}])
    assert "100/300 msgs" in lines[0] and "a@old.example" in lines[0]
    assert "1.0 MB/s" in lines[-1] and "10 msgs/s" in lines[-1]
    assert "ETA 0:00:20" in lines[-1]


# --- users without passwords (pre-stage, issue 13) -----------------------------------------

ADMIN_DOMAINS = {**DOMAINS, "pre.example": Domain("pre.example", "imap://mail.pre.example:143",
                                                  source_admin="mailadmin")}


def test_domains_with_an_admin_take_address_only_lines_and_empty_pass_source() -> None:
    for text in ("pre.example-a@pre.example\nb@pre.example,\n",
                 "address\nPre.example-a@pre.example\nb@pre.example\n",
                 f"{HEADER}\npre.example-a@pre.example;;;;;\nb@pre.example;;;;;\n"):
        plan = parse_import(decode(text.encode()), ADMIN_DOMAINS, {})
        assert plan.errors == [], text
        assert [row.password for row in plan.rows] == [None, None]
    mixed = parse_import(decode(b"a@pre.example,known\nb@pre.example\n"), ADMIN_DOMAINS, {})
    assert [row.password for row in mixed.rows] == ["known", None]


def test_domains_without_an_admin_still_need_a_password_on_every_line() -> None:
    plan = parse("alice@old.example\nbob@old.example,\n")
    assert errors(plan) == [(1, "password"), (2, "password")]
    assert all(bad.reason == "empty password" for bad in plan.errors)
