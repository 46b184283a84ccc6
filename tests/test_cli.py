"""The `migrating-proxy` command line, run as an administrator runs it: a subprocess.

Accounts are checked end to end: the provisioned users file of a real Dovecot store gets the
`{SHA512-CRYPT}` line, and the user can then log in to the store *directly*, with the same
password, so the proxy can be retired without a password reset.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.dovecot import DovecotInstance
from tests.support.mail import can_log_in
from tests.support.proxy import render_toml
from tests.support.tls import TLSFiles

PASSWORD = "Tr0ub4dor & 3 \"quoted\" pw"


@dataclass
class Admin:
    """One proxy installation's configuration (own database), driven through the CLI."""

    config_path: Path
    store: DovecotInstance

    def run(self, *args: str, input: str | None = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "migrating_proxy", "--config", str(self.config_path), *args],
            input=input, capture_output=True, text=True, timeout=60,
        )

    def ok(self, *args: str, input: str | None = "") -> subprocess.CompletedProcess[str]:
        result = self.run(*args, input=input)
        assert result.returncode == 0, f"{args}: {result.stderr}"
        return result

    def run_all(self, commands: list[list[str]], input: str | None = ""
                ) -> list[subprocess.CompletedProcess[str]]:
        """Several independent commands at once (each CLI start costs most of a second)."""
        with ThreadPoolExecutor(max_workers=8) as pool:
            return list(pool.map(lambda args: self.run(*args, input=input), commands))

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json").stdout)

    def domains(self) -> dict[str, dict[str, Any]]:
        return {row["name"]: row for row in self.json("domain", "list")}

    def accounts(self) -> dict[str, dict[str, Any]]:
        return {row["address"]: row for row in self.json("account", "list")}

    def user_lines(self) -> list[str]:
        return self.store.provisioned_text().splitlines()


def write_config(directory: Path, users_file: Path, database_url: str | None = None) -> Path:
    sections = {
        "database": {"url": database_url or f"sqlite:///{directory / 'proxy.db'}"},
        "provision": {"kind": "passwd-dir", "path": str(users_file), "rounds": 5000},
        "log": {"format": "json"},
        "migration": {"dsync_credentials": str(directory / "dsync-users")},
    }
    path = directory / "migrating-proxy.toml"
    path.write_text(render_toml(sections))
    return path


@pytest.fixture
def admin(tmp_path: Path, module_store: DovecotInstance) -> Admin:
    """A fresh installation provisioning the module's Dovecot store (emptied of other users)."""
    for entry in module_store.users_file.glob("*/*"):
        entry.unlink()
    return Admin(write_config(tmp_path, module_store.users_file), module_store)


def assert_refused(result: subprocess.CompletedProcess[str], reason: str, code: int = 1,
                   context: object = None) -> None:
    """Exit status `code`, one line on stderr naming the reason, nothing on stdout."""
    what = context or result.args[4:]
    assert result.returncode == code, (what, result)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, (what, result.stderr)
    assert lines[0].startswith("migrating-proxy: error: "), (what, lines[0])
    assert reason in lines[0], (what, lines[0])
    assert result.stdout == "", what




# --- the program --------------------------------------------------------------------------


def test_entry_point_is_installed_next_to_the_interpreter() -> None:
    program = Path(sys.executable).parent / "migrating-proxy"
    assert program.is_file() and os.access(program, os.X_OK)
    result = subprocess.run([str(program), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for command in ("serve", "domain", "account"):
        assert command in result.stdout


def program(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    """The CLI without --config (Admin always passes one)."""
    return subprocess.run([sys.executable, "-m", "migrating_proxy", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("command", "actions"), [
    ("domain", ["add", "set", "enable", "disable", "remove", "list"]),
    ("account", ["add", "passwd", "remove", "list"]),
])
def test_help_of_a_command_lists_every_action(command: str, actions: list[str]) -> None:
    result = program(command, "--help")
    assert result.returncode == 0, result.stderr
    listed = [line.split()[0] for line in result.stdout.splitlines()
              if line.startswith("    ") and len(line.split()) > 1]
    assert listed == actions, result.stdout


def test_version_is_the_installed_distributions() -> None:
    from importlib.metadata import version

    result = program("--version")
    expected = f"migrating-proxy {version('migrating-proxy')}\n"
    assert (result.returncode, result.stdout) == (0, expected)


def test_config_is_accepted_after_the_command_too(admin: Admin) -> None:
    admin.ok("domain", "add", "old.example", "--source", "imap://192.0.2.1")
    config = str(admin.config_path)
    for args in (["domain", "list", "--json", "--config", config],
                 ["domain", "--config", config, "list", "--json"],
                 ["status", "--config", config, "--json"]):
        result = program(*args, cwd=admin.config_path.parent.parent)
        assert result.returncode == 0, (args, result.stderr)
        assert result.stderr == "", args
    listed = json.loads(program("domain", "list", "--json", "--config", config).stdout)
    assert [row["name"] for row in listed] == ["old.example"]


@pytest.mark.skipif(Path("/etc/migrating-proxy/migrating-proxy.toml").exists(),
                    reason="this machine has an installed configuration, which would be used")
def test_without_any_configuration_file_the_defaults_are_announced(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MIGRATING_PROXY_CONFIG"}
    result = program("domain", "list", "--json", cwd=tmp_path, env=env)
    assert result.returncode == 0 and result.stdout == "[]\n", result.stderr
    [note] = result.stderr.splitlines()
    assert note.startswith("migrating-proxy: note: no configuration file"), note
    assert "/etc/migrating-proxy/migrating-proxy.toml" in note
    assert f"database {tmp_path / 'var' / 'migrating-proxy.db'}" in note


def test_missing_command_is_a_usage_error(admin: Admin) -> None:
    result = admin.run()
    assert result.returncode == 2
    assert "usage: migrating-proxy" in result.stderr


# --- domains ------------------------------------------------------------------------------


def test_domain_add_with_every_option_is_listed_as_json(admin: Admin) -> None:
    admin.ok("domain", "add", "Old.Example", "--source", "imaps://mail.old.example",
             "--relay", "smtp+starttls://smtp.old.example:587", "--type", "exchange",
             "--source-user", "%n", "--subscribed-only", "--disabled", "--no-notice",
             "--no-verify-tls", "--engine", "dsync")
    assert admin.domains() == {"old.example": {
        "name": "old.example", "source_url": "imaps://mail.old.example:993",
        "relay_url": "smtp+starttls://smtp.old.example:587", "migrating": False,
        "type": "exchange", "source_user": "%n", "subscribed_only": True,
        "notice": False, "verify_tls": False, "source_ca": None, "cutover": "passthrough",
        "pop3_source_url": None, "sources": ["imaps://mail.old.example:993"],
        "engine": "dsync", "source_admin": None, "source_admin_style": None,
        "source_admin_separator": None,
    }}


def test_domain_add_defaults(admin: Admin) -> None:
    admin.ok("domain", "add", "old.example", "--source", "imap://192.0.2.1")
    domain = admin.domains()["old.example"]
    assert domain["migrating"] is True
    assert domain["relay_url"] is None
    assert (domain["type"], domain["source_user"], domain["subscribed_only"]) == (
        "default", "%u", False)
    assert domain["notice"] is True and domain["verify_tls"] is True


SOURCES = {
    "imap://old.example": "imap://old.example:143",
    "imap+starttls://old.example": "imap+starttls://old.example:143",
    "imaps://old.example": "imaps://old.example:993",
    "pop3://old.example": "pop3://old.example:110",
    "pop3+starttls://old.example": "pop3+starttls://old.example:110",
    "pop3s://old.example": "pop3s://old.example:995",
    "imaps://192.0.2.7:10993": "imaps://192.0.2.7:10993",
    "pop3://old.example:1110/": "pop3://old.example:1110",
}


def test_domain_source_schemes_get_their_default_ports(admin: Admin) -> None:
    names = {source: f"d{i}.example" for i, source in enumerate(SOURCES)}
    results = admin.run_all([["domain", "add", names[s], "--source", s] for s in SOURCES])
    assert [r.returncode for r in results] == [0] * len(SOURCES), [r.stderr for r in results]
    domains = admin.domains()
    assert {source: domains[names[source]]["source_url"] for source in SOURCES} == SOURCES


BAD_DOMAIN_ADDS = [
    (["old.example", "--source", "http://old.example"], "scheme must be one of"),
    (["old.example", "--source", "smtp://old.example"], "must be one of imap, pop3"),
    (["old.example", "--source", "old.example"], "scheme must be one of"),
    (["old.example", "--source", "imap://"], "no host"),
    (["old.example", "--source", "imap://user:pw@old.example"], "only scheme://host[:port]"),
    (["old.example", "--source", "imap://old.example/INBOX"], "only scheme://host[:port]"),
    (["old.example", "--source", "imap://old.example:99999"], "not a valid URL"),
    (["old.example", "--source", "imap://x", "--relay", "imap://x"], "smtp, lmtp"),
    (["old.example", "--source", "imap://x", "--relay", "mail.old.example"], "scheme must be"),
    (["old.example", "--source", "imap://x", "--source-user", "%x@old"], "--source-user"),
    (["old.example", "--source", "imap://x", "--source-user", "100%"], "--source-user"),
    (["user@old.example", "--source", "imap://x"], "not a domain name"),
    (["old example", "--source", "imap://x"], "not a domain name"),
    (["..", "--source", "imap://x"], "not a domain name"),
    (["-", "--source", "imap://x"], "not a domain name"),
    (["old_mail.example", "--source", "imap://x"], "not a domain name"),
]


def test_bad_domain_add_is_refused_in_one_line_and_creates_nothing(admin: Admin) -> None:
    results = admin.run_all([["domain", "add", *args] for args, _ in BAD_DOMAIN_ADDS])
    for (args, reason), result in zip(BAD_DOMAIN_ADDS, results, strict=True):
        assert_refused(result, reason, context=args)
    assert admin.domains() == {}


def test_domain_add_source_ca_keeps_the_certificate_not_the_path(
        admin: Admin, tls_files: TLSFiles, tmp_path: Path) -> None:
    """The CA's certificate is stored, so the file may go (and other machines need no copy)."""
    ca = tmp_path / "old-ca.pem"
    ca.write_text("Subject: our old CA\n" + tls_files.ca_cert.read_text())
    admin.ok("domain", "add", "old.example", "--source", "imaps://x", "--source-ca", str(ca))
    ca.unlink()
    assert admin.domains()["old.example"]["source_ca"] == tls_files.ca_cert.read_text()


def test_bad_source_ca_is_refused_in_one_line_and_creates_nothing(
        admin: Admin, tls_files: TLSFiles, tmp_path: Path) -> None:
    not_pem = tmp_path / "notes.txt"
    not_pem.write_text("the CA is on the old server somewhere\n")
    broken = tmp_path / "broken.pem"
    broken.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with_key = tmp_path / "bundle.pem"
    with_key.write_text(tls_files.cert.read_text() + tls_files.key.read_text())
    cases = [(tmp_path / "missing.pem", "No such file"), (not_pem, "no PEM certificate"),
             (broken, "not a usable certificate"), (with_key, "private key"),
             (tls_files.ca_cert, "--no-verify-tls")]
    results = admin.run_all([["domain", "add", "old.example", "--source", "imaps://x",
                              "--source-ca", str(path)]
                             + (["--no-verify-tls"] if path == tls_files.ca_cert else [])
                             for path, _ in cases])
    for (path, reason), result in zip(cases, results, strict=True):
        assert_refused(result, reason, context=path)
    assert admin.domains() == {}


def test_domain_set_source_ca_replaces_or_clears_it(
        admin: Admin, tls_files: TLSFiles, tmp_path: Path) -> None:
    ca = tmp_path / "old-ca.pem"
    ca.write_text(tls_files.ca_cert.read_text())
    admin.ok("domain", "add", "old.example", "--source", "imaps://x")
    admin.ok("domain", "set", "old.example", "--source-ca", str(ca))
    assert admin.domains()["old.example"]["source_ca"] == tls_files.ca_cert.read_text()
    assert_refused(admin.run("domain", "set", "old.example", "--source-ca", str(ca),
                             "--no-verify-tls"), "--no-verify-tls")
    assert_refused(admin.run("domain", "set", "old.example", "--source-ca",
                             str(tmp_path / "gone.pem")), "No such file")
    assert admin.domains()["old.example"]["source_ca"] == tls_files.ca_cert.read_text()
    admin.ok("domain", "set", "old.example", "--source-ca", "")
    assert admin.domains()["old.example"]["source_ca"] is None


def test_unknown_domain_type_is_a_usage_error(admin: Admin) -> None:
    result = admin.run("domain", "add", "old.example", "--source", "imap://x", "--type", "lotus")
    assert result.returncode == 2
    assert "invalid choice: 'lotus'" in result.stderr
    assert admin.domains() == {}


def test_missing_source_is_a_usage_error(admin: Admin) -> None:
    result = admin.run("domain", "add", "old.example")
    assert result.returncode == 2
    assert "--source" in result.stderr
    assert admin.domains() == {}


def test_duplicate_domain_is_refused(admin: Admin) -> None:
    admin.ok("domain", "add", "old.example", "--source", "imap://192.0.2.1")
    assert_refused(admin.run("domain", "add", "OLD.example", "--source", "imap://192.0.2.2"),
                   "already exists")
    assert admin.domains()["old.example"]["source_url"] == "imap://192.0.2.1:143"


def test_domain_disable_and_enable(admin: Admin) -> None:
    admin.ok("domain", "add", "old.example", "--source", "imap://192.0.2.1")
    admin.ok("domain", "disable", "old.example")
    assert admin.domains()["old.example"]["migrating"] is False
    admin.ok("domain", "enable", "OLD.EXAMPLE")
    assert admin.domains()["old.example"]["migrating"] is True


def test_unknown_domain_is_refused(admin: Admin) -> None:
    actions = ["enable", "disable", "remove"]
    results = admin.run_all([["domain", action, "nowhere.example"] for action in actions])
    for result in results:
        assert_refused(result, "unknown domain nowhere.example")


def test_domain_remove(admin: Admin) -> None:
    admin.ok("domain", "add", "old.example", "--source", "imap://192.0.2.1")
    admin.ok("domain", "add", "other.example", "--source", "pop3://192.0.2.1")
    assert admin.ok("domain", "remove", "old.example").stdout == ""
    assert list(admin.domains()) == ["other.example"]


def test_domain_with_accounts_cannot_be_removed(admin: Admin) -> None:
    admin.ok("domain", "add", "old.example", "--source", "imap://192.0.2.1")
    admin.ok("account", "add", "alice@old.example", input=PASSWORD + "\n")
    assert_refused(admin.run("domain", "remove", "old.example"), "remove them first")
    assert "old.example" in admin.domains()


def test_domain_list_as_a_table(admin: Admin) -> None:
    admin.ok("domain", "add", "old.example", "--source", "imap://192.0.2.1", "--disabled")
    lines = admin.ok("domain", "list").stdout.splitlines()
    assert lines[0].split() == ["name", "migrating", "source_url", "relay_url", "type",
                                "cutover"]
    assert lines[1].split() == ["old.example", "no", "imap://192.0.2.1:143", "-", "default",
                                "passthrough"]


# --- cutover modes and the old server's services (issue 9) ---------------------------------


def test_new_domains_default_to_passthrough(admin: Admin) -> None:
    admin.ok("domain", "add", "old.example", "--source", "imap://192.0.2.1")
    admin.ok("domain", "add", "now.example", "--source", "imap://192.0.2.1",
             "--cutover", "immediate")
    domains = admin.domains()
    assert domains["old.example"]["cutover"] == "passthrough"
    assert domains["now.example"]["cutover"] == "immediate"


def test_one_source_per_protocol_in_any_order(admin: Admin) -> None:
    admin.ok("domain", "add", "both.example", "--source", "pop3s://mail.both.example",
             "--source", "imaps://mail.both.example")
    admin.ok("domain", "add", "pop.example", "--source", "pop3://192.0.2.1")
    both, pop = admin.domains()["both.example"], admin.domains()["pop.example"]
    # The copy reads the IMAP service; POP3 logins are checked at the POP3 one.
    assert both["source_url"] == "imaps://mail.both.example:993"
    assert both["pop3_source_url"] == "pop3s://mail.both.example:995"
    assert both["sources"] == ["imaps://mail.both.example:993", "pop3s://mail.both.example:995"]
    assert (pop["source_url"], pop["pop3_source_url"]) == ("pop3://192.0.2.1:110", None)
    assert pop["sources"] == ["pop3://192.0.2.1:110"]


def test_two_sources_of_one_protocol_are_refused(admin: Admin) -> None:
    result = admin.run("domain", "add", "old.example", "--source", "imap://192.0.2.1",
                       "--source", "imaps://192.0.2.2")
    assert_refused(result, "two IMAP sources (imap://192.0.2.1:143 and imaps://192.0.2.2:993)")
    assert admin.domains() == {}


def test_domain_set_changes_only_what_is_given(admin: Admin) -> None:
    admin.ok("domain", "add", "old.example", "--source", "imap://192.0.2.1", "--no-notice",
             "--cutover", "immediate")
    before = admin.domains()["old.example"]
    admin.ok("domain", "set", "OLD.example", "--cutover", "passthrough")
    assert admin.domains()["old.example"] == {**before, "cutover": "passthrough"}
    admin.ok("domain", "set", "old.example", "--source", "pop3s://192.0.2.9",
             "--source", "imap+starttls://192.0.2.9", "--relay", "smtp://192.0.2.9",
             "--type", "gmail", "--source-user", "%n", "--subscribed-only", "--notice",
             "--no-verify-tls")
    after = admin.domains()["old.example"]
    assert after == {
        **before, "cutover": "passthrough", "source_url": "imap+starttls://192.0.2.9:143",
        "pop3_source_url": "pop3s://192.0.2.9:995",
        "sources": ["imap+starttls://192.0.2.9:143", "pop3s://192.0.2.9:995"],
        "relay_url": "smtp://192.0.2.9:25", "type": "gmail", "source_user": "%n",
        "subscribed_only": True, "notice": True, "verify_tls": False,
    }
    admin.ok("domain", "set", "old.example", "--all-folders", "--no-notice", "--verify-tls",
             "--source", "imap://192.0.2.3")
    again = admin.domains()["old.example"]
    assert (again["subscribed_only"], again["notice"], again["verify_tls"]) == (
        False, False, True)
    assert again["sources"] == ["imap://192.0.2.3:143"] and again["pop3_source_url"] is None
    assert again["migrating"] is True  # `set` never touches the migration switch


BAD_DOMAIN_SETS = [
    (["nowhere.example", "--cutover", "immediate"], "unknown domain nowhere.example", 1),
    (["old.example", "--cutover", "gradual"], "invalid choice: 'gradual'", 2),
    (["old.example", "--source", "pop3://a", "--source", "pop3s://b"], "two POP3 sources", 1),
    (["old.example", "--source", "smtp://a"], "must be one of imap, pop3", 1),
    (["old.example", "--relay", "imap://a"], "smtp, lmtp", 1),
    (["old.example", "--source-user", "%x"], "--source-user", 1),
    (["old.example", "--type", "lotus"], "invalid choice: 'lotus'", 2),
    (["old.example", "--notice", "--no-notice"], "not allowed with argument", 2),
    (["old.example", "--engine", "rsync"], "invalid choice: 'rsync'", 2),
    (["old.example", "--engine", "dsync", "--cutover", "immediate"],
     "--engine dsync needs --cutover passthrough", 1),
]


def test_bad_domain_set_is_refused_in_one_line_and_changes_nothing(admin: Admin) -> None:
    admin.ok("domain", "add", "old.example", "--source", "imap://192.0.2.1")
    before = admin.domains()
    results = admin.run_all([["domain", "set", *args] for args, _, _ in BAD_DOMAIN_SETS])
    for (args, reason, code), result in zip(BAD_DOMAIN_SETS, results, strict=True):
        assert_refused(result, reason, code=code, context=args)
    assert admin.domains() == before


def test_the_dsync_engine_is_for_passthrough_domains_only(admin: Admin) -> None:
    admin.ok("domain", "add", "old.example", "--source", "imap://192.0.2.1", "--engine", "dsync")
    admin.ok("domain", "add", "now.example", "--source", "imap://192.0.2.1",
             "--cutover", "immediate")
    assert admin.domains()["old.example"]["engine"] == "dsync"
    assert admin.domains()["now.example"]["engine"] is None  # migration.engine decides
    before = admin.domains()
    results = admin.run_all([
        ["domain", "set", "old.example", "--cutover", "immediate"],
        ["domain", "set", "now.example", "--engine", "dsync"],
        ["domain", "add", "new.example", "--source", "imap://192.0.2.1", "--engine", "dsync",
         "--cutover", "immediate"],
    ])
    for result in results:
        assert_refused(result, "--engine dsync needs --cutover passthrough")
    assert admin.domains() == before
    admin.ok("domain", "set", "old.example", "--engine", "imap", "--cutover", "immediate")
    assert admin.domains()["old.example"]["engine"] == "imap"


def test_empty_lists_are_empty_json_arrays(admin: Admin) -> None:
    assert admin.json("domain", "list") == []
    assert admin.json("account", "list") == []


# --- accounts -----------------------------------------------------------------------------


def test_account_add_provisions_the_store_for_a_direct_login(
    admin: Admin, module_store: DovecotInstance
) -> None:
    result = admin.ok("account", "add", "Carol@New.Example", input=PASSWORD + "\n")
    assert result.stdout == ""
    # Dovecot looks users up lower-cased (auth_username_format = %Lu), so the line is too.
    [line] = admin.user_lines()
    assert line.startswith("carol@new.example:{SHA512-CRYPT}$6$")
    assert admin.accounts().keys() == {"Carol@new.example"}
    assert can_log_in(module_store.imap_port, "Carol@new.example", PASSWORD)
    assert can_log_in(module_store.imap_port, "carol@new.example", PASSWORD)
    assert not can_log_in(module_store.imap_port, "Carol@new.example", PASSWORD + "x")


def test_account_list_json_has_the_documented_keys(admin: Admin) -> None:
    admin.ok("account", "add", "carol@new.example", input=PASSWORD + "\n")
    admin.ok("account", "add", "dave@new.example", input="other\n")
    accounts = admin.accounts()
    assert list(accounts) == ["carol@new.example", "dave@new.example"]
    carol = accounts["carol@new.example"]
    assert set(carol) == {"address", "migration_state", "created_at", "last_login_at"}
    assert carol["migration_state"] is None
    assert carol["last_login_at"] is None
    assert carol["created_at"][:4].isdigit() and "T" in carol["created_at"]


def test_account_list_as_a_table(admin: Admin) -> None:
    admin.ok("account", "add", "carol@new.example", input=PASSWORD + "\n")
    lines = admin.ok("account", "list").stdout.splitlines()
    assert lines[0].split() == ["address", "migration_state", "created_at", "last_login_at"]
    assert lines[1].split()[:2] == ["carol@new.example", "-"]


def test_account_passwd_changes_the_direct_login(
    admin: Admin, module_store: DovecotInstance
) -> None:
    admin.ok("account", "add", "carol@new.example", input=PASSWORD + "\n")
    admin.ok("account", "passwd", "CAROL@new.example", input="a brand new one\n")
    assert can_log_in(module_store.imap_port, "carol@new.example", "a brand new one")
    assert not can_log_in(module_store.imap_port, "carol@new.example", PASSWORD)
    assert len(admin.user_lines()) == 1


def test_account_remove_takes_the_user_off_the_store(
    admin: Admin, module_store: DovecotInstance
) -> None:
    admin.ok("account", "add", "carol@new.example", input=PASSWORD + "\n")
    admin.ok("account", "add", "dave@new.example", input=PASSWORD + "\n")
    admin.ok("account", "remove", "Carol@NEW.example")
    assert [line.split(":")[0] for line in admin.user_lines()] == ["dave@new.example"]
    assert not can_log_in(module_store.imap_port, "carol@new.example", PASSWORD)
    assert can_log_in(module_store.imap_port, "dave@new.example", PASSWORD)
    assert list(admin.accounts()) == ["dave@new.example"]


def test_duplicate_account_in_another_case_is_refused(admin: Admin) -> None:
    admin.ok("account", "add", "carol@new.example", input=PASSWORD + "\n")
    assert_refused(admin.run("account", "add", "CAROL@new.example", input="other\n"),
                   "already exists")
    assert list(admin.accounts()) == ["carol@new.example"]


@pytest.mark.parametrize(("password", "reason"), [
    ("\n", "empty password"),
    ("", "empty password"),
    ("bad\0password\n", "control characters"),
])
def test_unusable_password_is_refused(admin: Admin, password: str, reason: str) -> None:
    assert_refused(admin.run("account", "add", "carol@new.example", input=password), reason)


def test_refused_account_adds_create_nothing(admin: Admin) -> None:
    users_before = admin.user_lines()
    add = ["account", "add"]
    results = [
        *admin.run_all([[*add, "carol@new.example"]], input="\n"),
        *admin.run_all([[*add, "dave@new.example"]], input="bad\0password\n"),
        *admin.run_all([[*add, a] for a in ("eve", "eve smith@new.example", "eve:x@new.example",
                                            "eve\u00e9@new.example")], input=PASSWORD + "\n"),
    ]
    assert [r.returncode for r in results] == [1] * len(results)
    assert admin.accounts() == {}
    assert admin.user_lines() == users_before


def test_unusable_new_password_keeps_the_old_one(
    admin: Admin, module_store: DovecotInstance
) -> None:
    admin.ok("account", "add", "carol@new.example", input=PASSWORD + "\n")
    assert_refused(admin.run("account", "passwd", "carol@new.example", input="\n"),
                   "empty password")
    assert can_log_in(module_store.imap_port, "carol@new.example", PASSWORD)


INVALID_ADDRESSES = {
    "carol smith@new.example": "not allowed",
    "a@b@c": "exactly one @",
    "x@-": "'-' is not a domain name",
    ".carol@new.example": "not a valid local part",
}


def test_invalid_address_is_refused_and_creates_nothing(admin: Admin) -> None:
    results = admin.run_all([["account", "add", address] for address in INVALID_ADDRESSES],
                            input=PASSWORD + "\n")
    for (address, reason), result in zip(INVALID_ADDRESSES.items(), results, strict=True):
        assert_refused(result, reason, context=address)
    assert admin.accounts() == {}
    assert admin.user_lines() == []


def test_unknown_account_is_refused(admin: Admin) -> None:
    results = admin.run_all([["account", action, "nobody@new.example"]
                             for action in ("passwd", "remove")], input=PASSWORD + "\n")
    for result in results:
        assert_refused(result, "unknown account nobody@new.example")


# --- the database -------------------------------------------------------------------------


def test_unreachable_database_is_one_line_without_traceback(tmp_path: Path) -> None:
    config = write_config(tmp_path, tmp_path / "users", "postgresql://nobody@127.0.0.1:1/x")
    admin = Admin(config, tmp_path / "users")
    commands = [["domain", "list"], ["account", "list", "--json"],
                ["account", "add", "carol@new.example"]]
    for result in admin.run_all(commands, input=PASSWORD + "\n"):
        assert_refused(result, "cannot open database: OperationalError: connection failed")
        assert "Traceback" not in result.stderr


def test_database_directory_that_cannot_be_created_is_one_line(tmp_path: Path) -> None:
    config = write_config(tmp_path, tmp_path / "users", "sqlite:////proc/no-such/proxy.db")
    result = Admin(config, tmp_path / "users").run("domain", "list")
    assert_refused(result, "cannot create the directory of /proc/no-such/proxy.db")


def test_json_output_is_pure_json_on_stdout(admin: Admin) -> None:
    admin.ok("domain", "add", "old.example", "--source", "imap://192.0.2.1")
    admin.ok("account", "add", "carol@new.example", input=PASSWORD + "\n")
    for command in (["domain", "list", "--json"], ["account", "list", "--json"]):
        result = admin.ok(*command)
        assert isinstance(json.loads(result.stdout), list)
        assert result.stdout.endswith("]\n")


@pytest.mark.skipif(os.geteuid() != 0, reason="acts as the state directory's owner: needs root")
def test_the_audit_trail_names_root_not_the_user_it_switched_to() -> None:
    """Run by root, admin commands act as the state directory's owner (privileges.py), but the
    audit trail must still say who asked. Without LOGNAME or USER (a systemd timer, `env -i`,
    some cron set-ups) the name used to be looked up after the switch: every action read as
    the service's own."""
    import shutil
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="mp-audit-"))
    try:
        work.chmod(0o755)
        state = work / "state"
        state.mkdir()
        shutil.chown(state, "nobody", "nogroup")
        config = work / "migrating-proxy.toml"
        config.write_text(render_toml({"database": {"url": f"sqlite:///{state / 'proxy.db'}"},
                                       "provision": {"kind": "none"},
                                       "log": {"format": "json"}}))
        config.chmod(0o644)
        env = {name: value for name, value in os.environ.items()
               if name not in ("LOGNAME", "USER", "LNAME", "USERNAME")}
        added = program("--config", str(config), "domain", "add", "old.example", "--source",
                        "imap://192.0.2.1", env=env)
        assert added.returncode == 0, added.stderr
        assert state.joinpath("proxy.db").stat().st_uid != 0  # it did act as nobody
        trail = program("--config", str(config), "audit", "--json", env=env)
        assert trail.returncode == 0, trail.stderr
        assert [(e["who"], e["action"]) for e in json.loads(trail.stdout)] == [
            ("root", "domain_add")]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_libraries_own_warnings_are_lines_of_the_json_log() -> None:
    """`log.format = "json"` means JSON lines, whoever logs. imapclient warns through the
    standard library's logging (a store reply it cannot decode: `Mailbox doesn't exist:
    Reçus`, at every copy of a folder with a non-ASCII name), and that line used to reach the
    journal as plain text, breaking every JSON reader of the log."""
    code = (
        "import logging\n"
        "from migrating_proxy import logs\n"
        "logs.configure('json', 'info')\n"
        "logging.getLogger('imapclient.util').warning(\n"
        "    'An error occurred while decoding %s in ASCII strict mode', b'Re\\xc3\\xa7us')\n"
        "logging.getLogger('some.library').info('below the level: not shown')\n"
        "try:\n"
        "    raise ValueError('pw=hunter2')\n"
        "except ValueError:\n"
        "    logging.getLogger('uvicorn.error').exception('Exception in ASGI application')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines()]
    assert [(e["level"], e["logger"]) for e in events] == [
        ("warning", "imapclient.util"), ("error", "uvicorn.error")]
    assert "Re\\xc3\\xa7us" in events[0]["message"]
    assert events[1]["error"] == "ValueError"  # the exception's type: its text may hold secrets
    assert "hunter2" not in result.stderr


def test_an_installed_configuration_the_user_may_not_read_is_one_line() -> None:
    """An admin outside the group migrating-proxy runs `migrating-proxy status`: the README's
    /etc/migrating-proxy is 0750, so even looking for the file there is refused. That was a
    traceback (PermissionError from the search); it is the one line `--config` gives."""
    import shutil
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="mp-locked-"))
    try:
        work.chmod(0o755)
        locked = work / "etc-migrating-proxy"
        locked.mkdir()
        (locked / "migrating-proxy.toml").write_text("")
        locked.chmod(0)
        code = ("import sys\nfrom pathlib import Path\nfrom migrating_proxy import cli, config\n"
                "config.SEARCH_PATH = (Path(sys.argv[1]),)\nsys.exit(cli.main(['status']))\n")
        command = [sys.executable, "-c", code, str(locked / "migrating-proxy.toml")]
        if os.geteuid() == 0:  # root may read anything: ask as nobody
            command = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--",
                       *command]
        result = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=60)
        assert_refused(result, f"{locked / 'migrating-proxy.toml'}: cannot read: "
                               "Permission denied", context=result.stderr)
    finally:
        (work / "etc-migrating-proxy").chmod(0o755)
        shutil.rmtree(work, ignore_errors=True)
