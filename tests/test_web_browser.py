"""The web console in a real Chromium, against a real `serve` (with its console child and a copy
worker), a real Dovecot old server and store, and a first login made with imaplib.

One browser page, one `serve` and one Dovecot pair for the whole module: the tests run in
order and each leaves the console as the next one expects it (logged in, the domain added...),
the way an admin's afternoon goes.
"""

from __future__ import annotations

import csv
import imaplib
import io
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from migrating_proxy.failpoints import ENV_VAR as FAILPOINTS
from tests.support import dovecot
from tests.support.dovecot import DovecotInstance, free_port
from tests.support.mail import sample_corpus, seed_mailbox, write_maildir
from tests.support.proxy import Proxy
from tests.support.tls import make_test_ca
from tests.support.web import ADMIN, ADMIN_PW, chromium, wait_for_log

DOMAIN = "old.example"
ALICE, ALICE_PW = f"alice@{DOMAIN}", "alice-pw-Zq8vK"
BOB, BOB_PW = f"bob@{DOMAIN}", "bob-pw-Zq8vK"
BIG, BIG_PW = f"big@{DOMAIN}", "big-pw-Zq8vK"
BIG_MESSAGES = 3000  # enough batches for a copy to be caught running and stopped midway
DOCS = Path(__file__).resolve().parents[1] / "docs" / "screenshots"
WAIT_MS = 60_000
# Closed (the file exists): a copy worker waits after each batch it writes.
COPY_GATE = Path(f"/tmp/mp-web-copy-gate-{os.getpid()}")


@pytest.fixture(scope="module")
def old() -> Iterator[DovecotInstance]:
    root = dovecot.instance_root("mp-webold-")
    try:
        with dovecot.old_server(root, {ALICE: ALICE_PW, BOB: BOB_PW, BIG: BIG_PW}) as instance:
            seed_mailbox("127.0.0.1", instance.imap_port, ALICE, ALICE_PW, sample_corpus())
            write_maildir(instance.maildir(BIG), (small_message(i) for i in range(BIG_MESSAGES)))
            yield instance
    finally:
        dovecot.remove_root(root)


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, module_store: DovecotInstance,
          old: DovecotInstance) -> Iterator[Proxy]:
    web_port = free_port()
    proxy = Proxy(tmp_path_factory.mktemp("webproxy"), module_store, overrides={
        "migration": {"workers": 1, "parallel_folders": 1},
        "web": {"listen": f"127.0.0.1:{web_port}"},
    })
    proxy.ports["web"] = web_port
    proxy.cli("admin-user", "add", ADMIN, input=ADMIN_PW + "\n")
    proxy.start(env={FAILPOINTS: f"copy.batch_written@{COPY_GATE}"})
    try:
        wait_for_log(proxy.log_path, '"event": "web_started"')
        yield proxy
    finally:
        COPY_GATE.unlink(missing_ok=True)
        proxy.stop()
    # serve stops its console child with its workers.
    with pytest.raises(OSError):
        __import__("socket").create_connection(("127.0.0.1", web_port), timeout=1)


@pytest.fixture(scope="module")
def page(proxy: Proxy) -> Iterator[Page]:
    with chromium() as browser:
        context = browser.new_context(viewport={"width": 1440, "height": 900},
                                      base_url=f"http://127.0.0.1:{proxy.ports['web']}",
                                      accept_downloads=True)
        page = context.new_page()
        yield page
        context.close()


def small_message(n: int) -> bytes:
    """A plain message, formatted directly: thousands of them in milliseconds."""
    return (f"From: Someone <someone@elsewhere.example>\r\nTo: {BIG}\r\n"
            f"Subject: Message {n}\r\nDate: Wed, 01 Mar 2023 09:00:00 +0000\r\n"
            f"Message-ID: <{n}.big@old.example>\r\n\r\nBody of message {n}.\r\n").encode()


def fill_login(page: Page, name: str, password: str) -> None:
    page.fill("input[name=name]", name)
    page.fill("input[name=password]", password)
    page.click("form[action='/login'] button[type=submit]")


def confirm(page: Page) -> None:
    dialog = page.locator("dialog#confirm")
    expect(dialog).to_be_visible()
    dialog.locator("#confirm-ok").click()


def row(page: Page, address: str) -> Any:
    return page.locator(f"#accounts tr[data-address='{address}']")


def status_of(proxy: Proxy, address: str) -> dict[str, Any]:
    with sqlite3.connect(proxy.directory / "proxy.db") as conn:
        conn.row_factory = sqlite3.Row
        found = conn.execute(
            "SELECT a.migration_state, m.messages_copied, j.state AS job FROM accounts a "
            "LEFT JOIN migrations m ON m.account_id = a.id LEFT JOIN jobs j ON j.account_id = a.id "
            "AND j.state IN ('queued', 'running', 'paused') WHERE a.address = ?",
            (address,)).fetchone()
    return dict(found) if found else {}


def poll(check: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, "condition never met"
        time.sleep(0.05)
    return value


def screenshot(page: Page, name: str, tmp_path: Path) -> None:
    """Into the test's directory; into docs/screenshots too with UPDATE_SCREENSHOTS=1."""
    targets = [tmp_path / name] + ([DOCS / name] if os.environ.get("UPDATE_SCREENSHOTS") else [])
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(target), full_page=True)
        assert target.read_bytes().startswith(b"\x89PNG")


# -- the admin's afternoon ----------------------------------------------------------------
def test_wrong_password_is_refused_then_login(page: Page) -> None:
    page.goto("/")
    expect(page.locator("h1")).to_have_text("Log in")
    fill_login(page, ADMIN, "not-the-password")
    expect(page.locator("#login-error")).to_have_text("Wrong name or password.")
    fill_login(page, ADMIN, ADMIN_PW)
    expect(page.locator("h1")).to_have_text("Domains")
    expect(page.locator("header .who")).to_have_text(ADMIN)


def test_requests_without_the_csrf_token_are_refused(page: Page, proxy: Proxy) -> None:
    proxy.cli("domain", "add", "legacy.example", "--source", "imap://127.0.0.1:1", "--disabled")
    status = page.evaluate("fetch('/api/v1/domains/legacy.example/enable', {method: 'POST'})"
                           ".then(r => r.status)")
    assert status == 403
    assert proxy.cli("domain", "list", "--json").stdout.count('"migrating": false') == 1
    with_token = page.evaluate(
        "fetch('/api/v1/domains', {headers: {'X-CSRF-Token': "
        "document.querySelector('meta[name=csrf-token]').content}}).then(r => r.status)")
    assert with_token == 200


def test_add_a_domain(page: Page, old: DovecotInstance) -> None:
    page.fill("#add-domain input[name=name]", DOMAIN)
    page.fill("#add-domain input[name=source]", f"imap://127.0.0.1:{old.imap_port}")
    page.check("#add-domain input[name=disabled]")
    page.click("#add-domain button[type=submit]")
    added = page.locator(f"#domains tr[data-domain='{DOMAIN}']")
    expect(added).to_contain_text(f"imap://127.0.0.1:{old.imap_port}")
    expect(added.locator("button[role=switch]")).to_have_text("off")


def test_add_a_domain_with_every_option_and_a_bad_ca_refused(page: Page, proxy: Proxy,
                                                             tmp_path: Path) -> None:
    """The form's options beyond the basics: a POP3 source beside the IMAP one, the cut-over
    mode, the copy engine and the old server's private CA (PEM pasted in)."""
    name, tls = "tls.example", make_test_ca(tmp_path / "ca")
    form = "#add-domain"
    page.fill(f"{form} input[name=name]", name)
    page.fill(f"{form} input[name=source]", "imaps://mail.tls.example")
    page.fill(f"{form} input[name=pop3_source]", "pop3s://mail.tls.example")
    page.select_option(f"{form} select[name=cutover]", "immediate")
    page.select_option(f"{form} select[name=engine]", "imap")
    # A private key pasted by mistake: refused in one line, nothing added.
    page.fill(f"{form} textarea[name=source_ca]", tls.key.read_text())
    page.click(f"{form} button[type=submit]")
    expect(page.locator("#flash")).to_contain_text("holds a private key")
    assert name not in [d["name"] for d in cli_domains(proxy)]

    page.fill(f"{form} textarea[name=source_ca]", tls.ca_cert.read_text())
    page.click(f"{form} button[type=submit]")
    expect(page.locator(f"#domains tr[data-domain='{name}']")).to_contain_text(
        "imaps://mail.tls.example")
    [added] = [d for d in cli_domains(proxy) if d["name"] == name]
    assert (added["sources"], added["cutover"], added["engine"]) == \
        (["imaps://mail.tls.example:993", "pop3s://mail.tls.example:995"], "immediate", "imap")
    assert added["source_ca"] == tls.ca_cert.read_text().strip() + "\n"
    proxy.cli("domain", "remove", name)  # the afternoon goes on with one domain


def cli_domains(proxy: Proxy) -> list[dict[str, Any]]:
    return json.loads(proxy.cli("domain", "list", "--json").stdout)  # type: ignore[no-any-return]


def test_switch_on_and_watch_a_first_login_complete(page: Page, proxy: Proxy,
                                                    tmp_path: Path) -> None:
    page.click(f"#domains tr[data-domain='{DOMAIN}'] button[role=switch]")
    expect(page.locator("dialog#confirm .question")).to_contain_text("Switch migration ON")
    confirm(page)
    expect(page.locator(f"#domains tr[data-domain='{DOMAIN}'] button[role=switch]")
           ).to_have_text("on")
    page.click(f"#domains a[href='/domains/{DOMAIN}']")
    expect(page.locator("#accounts tbody")).to_contain_text("No account matches.")
    page.evaluate("window.stayedOnThisPage = true")  # gone if the page were reloaded
    client = imaplib.IMAP4("127.0.0.1", proxy.imap_port)
    assert client.login(ALICE, ALICE_PW)[0] == "OK"  # the first login: migration starts
    client.logout()
    expect(row(page, ALICE)).to_be_visible(timeout=WAIT_MS)
    bar = row(page, ALICE).locator(".bar")
    expect(bar).to_have_attribute("data-state", "COMPLETED", timeout=WAIT_MS)
    expect(bar).to_have_attribute("data-percent", "100")
    expect(row(page, ALICE).locator(".state")).to_contain_text("COMPLETED")
    assert page.evaluate("window.stayedOnThisPage") is True


def bad_csv(tmp_path: Path) -> Path:
    path = tmp_path / "bad.csv"
    path.write_text(f"{BOB},{BOB_PW}\nnot-an-address,x\n{BIG},\ncarol@nowhere.example,x\n"
                    f"{BOB},{BOB_PW}\n")
    return path


def test_import_with_bad_lines_imports_nothing_then_a_good_file(page: Page, proxy: Proxy,
                                                                tmp_path: Path) -> None:
    page.goto("/")
    page.set_input_files("#import input[type=file]", str(bad_csv(tmp_path)))
    page.click("#import button[value=check]")
    expect(page.locator("#import-error")).to_have_text("bad.csv: 4 bad line(s); nothing imported")
    lines = page.locator("#import-report tbody tr")
    expect(lines).to_have_count(4)
    assert [lines.nth(i).locator("td").first.inner_text() for i in range(4)] == ["2", "3", "4",
                                                                                  "5"]
    expect(lines.nth(0)).to_contain_text("address")
    expect(lines.nth(1)).to_contain_text("empty password")
    expect(lines.nth(2)).to_contain_text("domain nowhere.example is not configured")
    expect(lines.nth(3)).to_contain_text("already appears on line 1")
    expect(page.locator("#import-apply")).to_be_disabled()
    assert status_of(proxy, BOB) == {} and status_of(proxy, BIG) == {}  # nothing imported

    good = tmp_path / "good.csv"
    good.write_text(f"address,password\n{BOB},{BOB_PW}\n{BIG},{BIG_PW}\n")
    page.set_input_files("#import input[type=file]", str(good))
    page.click("#import button[value=check]")
    expect(page.locator("#import-summary")).to_contain_text("Would import 2 new account(s)")
    assert status_of(proxy, BOB) == {}  # a dry run writes nothing
    page.click("#import-apply")
    expect(page.locator("#import-summary")).to_contain_text("Imported 2 new account(s)")
    assert status_of(proxy, BOB)["migration_state"] == "NEW"


def test_stop_and_start_a_running_copy(page: Page, proxy: Proxy, tmp_path: Path) -> None:
    # The worker waits after its first batch while the gate is closed, so the stop lands in
    # the middle of the copy however fast the machine (3,000 messages can take under a second).
    COPY_GATE.touch()
    page.goto(f"/domains/{DOMAIN}")
    row(page, BIG).locator("input[type=checkbox]").check()
    expect(page.locator("#selected-count")).to_have_text("1 selected")
    page.click("#actions button[data-action=migrate]")
    expect(page.locator("#action-report")).to_contain_text("queued")
    wait_for_log(proxy.log_path, '"event": "failpoint_waiting"', timeout=60)  # a batch is in
    page.click("#actions button[data-action=stop]")
    expect(page.locator("#action-report tbody")).to_contain_text("paused")
    wait_for_log(proxy.log_path, '"event": "copy_pause_noticed"', timeout=60)
    COPY_GATE.unlink()
    # The worker stops at the next batch boundary and lets go: the console shows "paused"
    # (not "pausing"), and the account is not COMPLETED.
    expect(row(page, BIG)).to_have_attribute("data-job", "paused", timeout=WAIT_MS)
    paused = status_of(proxy, BIG)
    copied = paused["messages_copied"]
    assert paused["job"] == "paused" and paused["migration_state"] == "PENDING"
    assert 0 < copied < BIG_MESSAGES
    time.sleep(1.5)  # a paused copy copies nothing more
    assert status_of(proxy, BIG)["messages_copied"] == copied
    page.click("#actions button[data-action=start]")
    expect(page.locator("#action-report tbody")).to_contain_text("resumed")
    bar = row(page, BIG).locator(".bar")
    expect(bar).to_have_attribute("data-state", "COMPLETED", timeout=WAIT_MS)
    assert json.loads(proxy.cli("status", BIG, "--json").stdout)[0]["messages_copied"] == \
        BIG_MESSAGES
    screenshot(page, "accounts.png", tmp_path)
    page.goto("/")
    expect(page.locator(f"#domains tr[data-domain='{DOMAIN}']")).to_contain_text("COMPLETED 2")
    screenshot(page, "domains.png", tmp_path)


def test_sort_filter_and_search(page: Page) -> None:
    page.goto(f"/domains/{DOMAIN}")
    expect(page.locator("#accounts tbody tr")).to_have_count(3)
    page.select_option("#state-filter", "NEW")
    expect(page.locator("#accounts tbody tr")).to_have_count(1)
    expect(row(page, BOB)).to_be_visible()
    page.select_option("#state-filter", "")
    page.fill("#search", "ali")
    expect(page.locator("#accounts tbody tr")).to_have_count(1)
    expect(row(page, ALICE)).to_be_visible()
    page.fill("#search", "")
    page.click("#accounts th[data-sort=address]")  # descending now
    expect(page.locator("#accounts tbody tr").first).to_have_attribute("data-address", BOB)
    expect(page.locator("#page-info")).to_have_text("1\u20133 of 3")  # an en dash


def test_export_and_finish_with_the_report(page: Page, proxy: Proxy, tmp_path: Path) -> None:
    with page.expect_download() as exported:
        page.click("#export-csv")
    text = Path(exported.value.path()).read_text()
    assert text == proxy.cli("export", DOMAIN, "--format", "csv").stdout
    page.click("#finish")
    expect(page.locator("dialog#confirm .question")).to_contain_text("Finish the migration")
    confirm(page)
    expect(page.locator("#finish-summary")).to_contain_text("migration switched off",
                                                            timeout=WAIT_MS)
    with page.expect_download() as as_json:
        page.click("#report-json")
    report = json.loads(Path(as_json.value.path()).read_text())
    assert report["domain"] == DOMAIN and report["migrating"] is False
    assert sorted(report["migrated"]) == [ALICE, BIG] and report["never_migrated"] == [BOB]
    with page.expect_download() as as_csv:
        page.click("#report-csv")
    lines = list(csv.reader(io.StringIO(Path(as_csv.value.path()).read_text())))
    assert lines[0] == ["address", "result", "detail"]
    assert [ALICE, "migrated", ""] in lines and [BOB, "never_migrated", ""] in lines
    expect(page.locator("#domain-summary button[role=switch]")).to_have_text("off",
                                                                             timeout=WAIT_MS)
    audit = json.loads(proxy.cli("audit", "--json").stdout)
    web_actions = [(e["action"], e["via"], e["who"]) for e in audit if e["via"] == "web"]
    assert ("finish", "web", ADMIN) in web_actions and ("import", "web", ADMIN) in web_actions


def test_the_audit_page_lists_cli_and_web_actions(page: Page) -> None:
    page.goto("/audit")
    expect(page.locator("#audit tbody tr[data-action=finish]")).to_contain_text("web")
    added = page.locator("#audit tbody tr[data-action=domain_add]")
    expect(added.filter(has_text="legacy.example")).to_contain_text("cli")
    expect(added.filter(has_text=f"domain: {DOMAIN}")).to_contain_text("web")


def test_an_expired_session_is_refused(page: Page, proxy: Proxy) -> None:
    page.goto(f"/domains/{DOMAIN}")
    expect(page.locator("h1")).to_contain_text(DOMAIN)
    with sqlite3.connect(proxy.directory / "proxy.db") as conn:  # as if a day had passed
        conn.execute("UPDATE web_sessions SET expires_at = '2000-01-01 00:00:00.000000'")
    # The page's next refresh is refused and the login form takes its place.
    expect(page.locator("h1")).to_have_text("Log in", timeout=WAIT_MS)
    assert page.evaluate("fetch('/api/v1/domains').then(r => r.status)") == 401
    fill_login(page, ADMIN, ADMIN_PW)  # and back to where the admin was
    expect(page.locator("h1")).to_contain_text(DOMAIN)
