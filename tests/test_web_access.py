"""The web console's access control and API contract, against a real `migrating-proxy web`.

One console process per module (SQLite, no Dovecot needed: nothing here logs in to a mail
server); the test that needs TLS or other limits starts its own. The browser tests
(test_web_browser.py) cover the same refusals through Chromium.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from migrating_proxy.config import Config, WebConfig
from migrating_proxy.web.server import listen_address
from tests.support.tls import TLSFiles, client_context
from tests.support.web import ADMIN, ADMIN_PW, Session, WebConsole

DOMAIN = "old.example"
VICTIM, VICTIM_PW = "victim", "victim-pw-Zq8vK"


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebConsole]:
    # Per-account throttling at 3 failures; per peer high, so one test's failures from
    # 127.0.0.1 do not lock the others out.
    web = WebConsole(tmp_path_factory.mktemp("web"), {
        "limits": {"max_failures_per_account": 3, "max_failures_per_peer": 1000}})
    web.add_admin()
    web.add_admin(VICTIM, VICTIM_PW)
    web.cli("domain", "add", DOMAIN, "--source", "imap://127.0.0.1:1")
    with web:
        yield web


@pytest.fixture
def session(console: WebConsole) -> Iterator[Session]:
    session = Session(console.url)
    assert session.login().status_code == 303
    yield session
    session.close()


def db(console: WebConsole) -> sqlite3.Connection:
    return sqlite3.connect(console.directory / "proxy.db")


def protected_routes(console: WebConsole) -> list[tuple[str, str]]:
    document = httpx.get(f"{console.url}/api/v1/openapi.json").json()
    routes = [(method.upper(), path.replace("{name}", DOMAIN))
              for path, operations in document["paths"].items() for method in operations]
    return [*routes, ("GET", "/"), ("GET", f"/domains/{DOMAIN}"), ("GET", "/audit")]


# -- admin users from the command line ----------------------------------------------------
def test_admin_user_password_is_hashed_and_never_logged(console: WebConsole) -> None:
    with db(console) as conn:
        (stored,) = conn.execute("SELECT password_hash FROM admin_users WHERE name = ?",
                                 (ADMIN,)).fetchone()
    assert stored.startswith("$6$") and ADMIN_PW not in stored
    assert ADMIN_PW not in console.log_path.read_text()
    listed = json.loads(console.cli("admin-user", "list", "--json").stdout)
    assert [user["name"] for user in listed] == [ADMIN, VICTIM]


@pytest.mark.parametrize(("args", "stdin", "message"), [
    (("admin-user", "add", ADMIN), "x\n", "admin user admin already exists"),
    (("admin-user", "add", "bad name"), "x\n", "is not an admin user name"),
    (("admin-user", "add", "someone"), "\n", "empty password"),
    (("admin-user", "passwd", "nobody"), "x\n", "unknown admin user nobody"),
    (("admin-user", "token", "nobody"), None, "unknown admin user nobody"),
    (("web", "--listen", "nonsense"), None, "--listen"),
])
def test_bad_admin_user_and_web_requests_are_one_line(console: WebConsole, args: tuple[str, ...],
                                                      stdin: str | None, message: str) -> None:
    result = console.cli(*args, input=stdin, check=False)
    assert result.returncode == 1, result
    assert result.stderr.startswith("migrating-proxy: error: ") and message in result.stderr
    assert result.stderr.count("\n") == 1
    listed = json.loads(console.cli("admin-user", "list", "--json").stdout)
    assert [user["name"] for user in listed] == [ADMIN, VICTIM]  # nothing created


def test_port_in_use_is_one_line_and_exit_1(console: WebConsole) -> None:
    result = console.cli("web", check=False)  # the module's console holds the port
    assert result.returncode == 1
    assert result.stderr == (f"migrating-proxy: error: cannot listen on 127.0.0.1:"
                             f"{console.port}: Address already in use\n")


def test_the_console_binds_to_loopback_unless_configured() -> None:
    assert listen_address(Config(), None) == ("127.0.0.1", 8080) == WebConfig.DEFAULT_LISTEN
    assert Config().web.listen is None  # serve starts no console unless asked


# -- who may ask --------------------------------------------------------------------------
def test_everything_but_the_openapi_document_needs_a_session_or_token(
        console: WebConsole) -> None:
    assert httpx.get(f"{console.url}/api/v1/openapi.json").status_code == 200
    routes = protected_routes(console)
    assert len(routes) >= 15
    for method, path in routes:
        answer = httpx.request(method, console.url + path, json={})
        assert answer.status_code == 401, (method, path, answer.status_code)
        if path.startswith("/api/"):
            assert answer.json() == {"error": "log in, or send an API token"}
        else:
            assert 'action="/login"' in answer.text  # the login form, in place
    bogus = {"Authorization": "Bearer mpt_not-a-token", "Cookie": "mp_session=forged"}
    for method, path in routes:
        assert httpx.request(method, console.url + path, headers=bogus,
                             json={}).status_code == 401, (method, path)


def test_tokens_work_for_scripts_without_csrf_and_are_stored_hashed(
        console: WebConsole) -> None:
    token = console.token()
    assert token.startswith("mpt_")
    with db(console) as conn:
        stored = [row[0] for row in conn.execute("SELECT token_hash FROM admin_tokens")]
    assert token not in stored and len(stored[-1]) == 64
    headers = {"Authorization": f"Bearer {token}"}
    assert httpx.get(f"{console.url}/api/v1/domains", headers=headers).status_code == 200
    answer = httpx.post(f"{console.url}/api/v1/stop", headers=headers, json={"domain": DOMAIN})
    assert answer.status_code == 200 and answer.json() == []
    assert "revoked" in console.cli("admin-user", "token", ADMIN, "--revoke").stdout
    assert httpx.get(f"{console.url}/api/v1/domains", headers=headers).status_code == 401
    assert token not in console.log_path.read_text()


def test_login_sets_a_strict_httponly_cookie(console: WebConsole) -> None:
    session = Session(console.url)
    answer = session.login()
    assert answer.status_code == 303 and answer.headers["location"] == "/"
    cookie = answer.headers["set-cookie"]
    assert cookie.startswith("mp_session=")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Secure" not in cookie
    assert session.get("/api/v1/domains").status_code == 200
    session.close()


def test_wrong_password_and_unknown_user_are_refused_alike(console: WebConsole) -> None:
    for name, password in ((ADMIN, "wrong"), ("nobody", ADMIN_PW)):
        session = Session(console.url)
        answer = session.login(name, password)
        assert answer.status_code == 401 and "Wrong name or password." in answer.text
        assert "mp_session" not in session.http.cookies
        assert session.get("/api/v1/domains").status_code == 401
        session.close()
    assert ADMIN_PW not in console.log_path.read_text()


def test_login_form_needs_its_csrf_cookie(console: WebConsole) -> None:
    answer = httpx.post(f"{console.url}/login", data={
        "name": ADMIN, "password": ADMIN_PW, "csrf_token": "made-up", "next": "/"})
    assert answer.status_code == 403 and "mp_session" not in answer.headers.get("set-cookie", "")


def test_state_changes_need_the_csrf_token(session: Session) -> None:
    for csrf in (False, "wrong"):
        if csrf:
            answer = session.http.post("/api/v1/domains/old.example/disable",
                                       headers={"X-CSRF-Token": csrf})
        else:
            answer = session.post("/api/v1/domains/old.example/disable", csrf=False)
        assert answer.status_code == 403
        assert answer.json() == {"error": "missing or wrong CSRF token; reload the page"}
    assert session.get("/api/v1/domains").json()[0]["migrating"] is True  # unchanged
    assert session.post("/logout", csrf=False).status_code == 403  # the form needs it too
    assert session.post("/api/v1/domains/old.example/enable").status_code == 200


def test_failed_logins_are_throttled_per_user(console: WebConsole) -> None:
    for _ in range(3):
        assert Session(console.url).login(VICTIM, "guess").status_code == 401
    throttled = Session(console.url).login(VICTIM, VICTIM_PW)  # the right password, too late
    assert throttled.status_code == 429 and "Too many failed logins" in throttled.text
    assert Session(console.url).login().status_code == 303  # other users are not locked out


def test_expired_session_is_refused(console: WebConsole, session: Session) -> None:
    assert session.get("/api/v1/domains").status_code == 200
    with db(console) as conn:  # as if session_lifetime seconds had passed without a request
        conn.execute("UPDATE web_sessions SET expires_at = '2000-01-01 00:00:00.000000'")
    assert session.get("/api/v1/domains").status_code == 401
    page = session.get("/")
    assert page.status_code == 401 and 'action="/login"' in page.text


def test_logout_ends_the_session(session: Session) -> None:
    answer = session.http.post("/logout", data={"csrf_token": session.csrf})
    assert answer.status_code == 303 and answer.headers["location"] == "/login"
    assert session.get("/api/v1/domains").status_code == 401


def test_pages_of_unknown_domains_and_paths(session: Session) -> None:
    page = session.get("/domains/nope.example")
    assert page.status_code == 404 and "unknown domain nope.example" in page.text
    assert session.get("/api/v1/nothing-here").json() == {"error": "Not Found"}
    wrong_method = session.http.put("/api/v1/domains", headers={"X-CSRF-Token": session.csrf})
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "GET, HEAD, POST"


def test_only_local_paths_after_login(console: WebConsole) -> None:
    session = Session(console.url)
    form = session.http.get("/login?next=//evil.example/x")
    assert 'name="next" value="/"' in form.text


# -- the API mirrors the CLI --------------------------------------------------------------
def test_api_answers_with_the_cli_json(console: WebConsole, session: Session,
                                       tmp_path: Path) -> None:
    users = tmp_path / "users.csv"
    users.write_text(f"carol@{DOMAIN},carol-pw\ndave@{DOMAIN},dave-pw\n")
    console.cli("import", str(users))
    cli_domains = json.loads(console.cli("domain", "list", "--json").stdout)
    assert session.get("/api/v1/domains").json() == cli_domains
    cli_status = json.loads(console.cli("status", "--domain", DOMAIN, "--json").stdout)
    api_status = session.get("/api/v1/status", params={"domain": DOMAIN})
    assert api_status.json() == cli_status and len(cli_status) >= 2
    assert api_status.headers["X-Total-Count"] == str(len(cli_status))
    one = session.get("/api/v1/status", params={"address": f"carol@{DOMAIN}"}).json()
    assert one == json.loads(console.cli("status", f"carol@{DOMAIN}", "--json").stdout)
    cli_stop = json.loads(console.cli("stop", "--domain", DOMAIN, "--json").stdout)
    assert session.post("/api/v1/stop", json={"domain": DOMAIN}).json() == cli_stop
    export = session.get("/api/v1/export", params={"domain": DOMAIN, "format": "csv"})
    assert export.text == console.cli("export", DOMAIN, "--format", "csv").stdout
    assert "attachment" in export.headers["content-disposition"]


@pytest.mark.parametrize(("path", "body", "status", "message"), [
    ("/api/v1/migrate", {}, 400, "name accounts, or give --domain DOMAIN or --all"),
    ("/api/v1/migrate", {"domain": "nope.example"}, 404, "unknown domain nope.example"),
    ("/api/v1/resync", {"addresses": ["nobody@old.example"]}, 404, "unknown account"),
    ("/api/v1/stop", {"domain": DOMAIN, "prestage": True}, 400,
     "prestage is an option of migrate only"),
    ("/api/v1/stop", {"addresses": ["not an address"]}, 404, "unknown account"),
    ("/api/v1/finish", {"domain": DOMAIN}, 400, "not confirmed; nothing changed"),
    ("/api/v1/finish", {"domain": "nope.example", "confirm": True}, 404, "unknown domain"),
    ("/api/v1/domains", {"name": "x.example", "source": "ftp://h"}, 400, "scheme must be"),
    ("/api/v1/domains", {"name": DOMAIN, "source": "imap://h"}, 400, "already exists"),
    ("/api/v1/domains", {"name": "a@b", "source": "imap://h"}, 400, "is not a domain name"),
    ("/api/v1/domains/nope.example/enable", None, 404, "unknown domain nope.example"),
])
def test_refusals_are_worded_as_the_cli(session: Session, path: str, body: object,
                                        status: int, message: str) -> None:
    before = session.get("/api/v1/domains").json()
    answer = session.post(path, json=body)
    assert answer.status_code == status, answer.text
    assert message in answer.json()["error"]
    assert session.get("/api/v1/domains").json() == before  # nothing changed


def test_csv_import_reports_every_bad_line_and_imports_nothing(session: Session) -> None:
    bad = (f"erin@{DOMAIN},erin-pw\nnot-an-address,pw\nfrank@{DOMAIN},\n"
           f"gina@unknown.example,pw\n")
    before = session.get("/api/v1/status", params={"domain": DOMAIN}).json()
    for dry_run in ("true", "false"):
        answer = session.post("/api/v1/import", files={"file": ("bad.csv", bad.encode())},
                              data={"dry_run": dry_run})
        assert answer.status_code == 400
        assert answer.json()["error"] == "bad.csv: 3 bad line(s); nothing imported"
        assert [(b["line"], b["column"]) for b in answer.json()["bad_lines"]] == [
            (2, "address"), (3, "password"), (4, "address")]
        assert "erin-pw" not in answer.text
    assert session.get("/api/v1/status", params={"domain": DOMAIN}).json() == before
    latin1 = session.post("/api/v1/import", files={"file": ("l.csv", b"h\xe9@old.example,pw\n")})
    assert latin1.json() == {"error": "l.csv: line 1: not UTF-8 text; nothing imported",
                             "bad_lines": []}
    good = session.post("/api/v1/import", files={"file": ("good.csv", f"erin@{DOMAIN},p\n")},
                        data={"dry_run": "true"})
    assert good.json() == {"file": "good.csv", "dry_run": True, "created": 1, "updated": 0}
    assert "erin@old.example" not in json.dumps(
        session.get("/api/v1/status", params={"domain": DOMAIN}).json())


def test_audit_trail_has_cli_and_web_actions(console: WebConsole, session: Session) -> None:
    console.cli("domain", "disable", DOMAIN)
    assert session.post(f"/api/v1/domains/{DOMAIN}/enable").status_code == 200
    entries = session.get("/api/v1/audit", params={"limit": 2}).json()
    assert [(e["action"], e["via"], e["who"], e["details"]) for e in entries] == [
        ("domain_enable", "web", ADMIN, {"domain": DOMAIN}),
        ("domain_disable", "cli", entries[1]["who"], {"domain": DOMAIN}),
    ]
    cli_view = json.loads(console.cli("audit", "--limit", "2", "--json").stdout)
    assert cli_view == entries


def test_paging_sorting_and_filtering(console: WebConsole, session: Session,
                                      tmp_path: Path) -> None:
    users = tmp_path / "many.csv"
    users.write_text("".join(f"page{n:03d}@{DOMAIN},pw-{n}\n" for n in range(120)))
    console.cli("import", str(users))
    params = {"domain": DOMAIN, "q": "page", "limit": 50}
    first = session.get("/api/v1/status", params={**params, "offset": 0})
    last = session.get("/api/v1/status", params={**params, "offset": 100, "sort": "-address"})
    assert first.headers["X-Total-Count"] == "120"
    assert [r["address"] for r in first.json()][:2] == [f"page000@{DOMAIN}", f"page001@{DOMAIN}"]
    assert [r["address"] for r in last.json()][-1] == f"page000@{DOMAIN}"
    assert len(last.json()) == 20
    literal = session.get("/api/v1/status", params={"domain": DOMAIN, "q": "page_"})
    assert literal.json() == []  # "_" is a character to find, not a wildcard
    states = session.get("/api/v1/status", params={"domain": DOMAIN, "state": "COMPLETED"})
    assert states.json() == [] and states.headers["X-Total-Count"] == "0"
    totals = session.get("/api/v1/totals").json()[DOMAIN]
    assert totals["states"]["NEW"] == totals["accounts"] >= 120


def test_tls_console_has_secure_cookies(tmp_path: Path, tls_files: TLSFiles) -> None:
    web = WebConsole(tmp_path / "tls", {"tls": {"cert": str(tls_files.cert),
                                                "key": str(tls_files.key)}})
    web.add_admin()
    with web:
        session = Session(web.url, verify=client_context(tls_files))
        answer = session.login()
        assert answer.status_code == 303 and "Secure" in answer.headers["set-cookie"]
        assert session.get("/api/v1/domains").status_code == 200
        session.close()
        with socket.create_connection(("127.0.0.1", web.port)) as plain:  # no clear text
            plain.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert not plain.recv(100).startswith(b"HTTP/1.1 200")


def test_sigterm_stops_the_console(tmp_path: Path) -> None:
    web = WebConsole(tmp_path / "stop")
    web.start()
    assert web.stop() == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", web.port), timeout=1)


def test_passwords_never_reach_the_logs(console: WebConsole) -> None:
    text = console.log_path.read_text()
    for secret in (ADMIN_PW, VICTIM_PW, "carol-pw", "erin-pw"):
        assert secret not in text
    assert subprocess.run(["grep", "-r", "-l", ADMIN_PW, str(console.directory)],
                          capture_output=True).stdout == b""


# -- configuration ------------------------------------------------------------------------
@pytest.mark.parametrize(("body", "message"), [
    ('[web]\nlisten = "8080"\n', "web.listen: '8080': expected host:port"),
    ("[web]\nsession_lifetime = 0\n", "web.session_lifetime: must be positive"),
    ('[web]\nsession_lifetime = "1h"\n', "web.session_lifetime: must be a number"),
    ('[web]\nport = 8080\n', "web.port: unknown key"),
])
def test_bad_web_settings_are_one_line(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "mp.toml"
    path.write_text(body + '[provision]\nkind = "none"\n')
    result = subprocess.run([sys.executable, "-m", "migrating_proxy", "--config", str(path),
                             "web"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr == f"migrating-proxy: error: {path}: {message}\n"


def test_the_example_configuration_documents_the_web_section() -> None:
    example = (Path(__file__).resolve().parents[1] / "config" /
               "migrating-proxy.example.toml").read_text()
    section = example[example.index("[web]"):example.index("[log]")]
    for key in ("listen", "session_lifetime"):
        assert f"\n{key} = " in section
