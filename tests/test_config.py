"""`config.load`: where the file comes from, what it resolves to, and how it is refused.

Every refusal must name the file, the key and the reason (`<file>: <key>: <reason>`), and the
CLI must turn it into exactly one line on stderr.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from migrating_proxy import config
from migrating_proxy.config import Config, ConfigError, load
from migrating_proxy.endpoints import parse_endpoint

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Neither the caller's $MIGRATING_PROXY_CONFIG nor the repository's cwd leaks in."""
    monkeypatch.delenv(config.ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def minimal(extra: str = "", users: str = "users") -> str:
    """A valid file (passwd-file provisioning needs a path) plus `extra`."""
    return f'[provision]\npath = "{users}"\n{extra}'


# --- where the file comes from ------------------------------------------------------------


def test_defaults_when_there_is_no_file() -> None:
    loaded = load(None)
    assert loaded == Config()
    assert loaded.source is None
    assert loaded.listen.imap == ("127.0.0.1", 1143)
    assert loaded.listen.pop3 == ("127.0.0.1", 1110)
    assert loaded.listen.imaps is None and loaded.listen.pop3s is None
    # Dovecot where the shipped snippet puts it, behind the proxy on the same machine.
    assert loaded.backend.imap == parse_endpoint("imap://127.0.0.1:10143")
    assert loaded.backend.pop3 == parse_endpoint("pop3://127.0.0.1:10110")
    assert loaded.provision.scheme == "sha512_crypt"
    assert loaded.limits.max_failures_per_connection == 3
    assert loaded.log.format == "auto"


def test_config_file_in_the_working_directory_is_used(tmp_path: Path) -> None:
    write(tmp_path / "config" / "migrating-proxy.toml", minimal('[log]\nlevel = "error"\n'))
    loaded = load(None)
    assert loaded.log.level == "error"
    assert loaded.source == Path("config/migrating-proxy.toml")


def test_environment_beats_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "config" / "migrating-proxy.toml", minimal('[log]\nlevel = "error"\n'))
    env_file = write(tmp_path / "env" / "mp.toml", minimal('[log]\nlevel = "warning"\n'))
    monkeypatch.setenv(config.ENV_VAR, str(env_file))
    assert load(None).log.level == "warning"


def test_explicit_option_beats_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "config" / "migrating-proxy.toml", minimal('[log]\nlevel = "error"\n'))
    env_file = write(tmp_path / "env" / "mp.toml", minimal('[log]\nlevel = "warning"\n'))
    explicit = write(tmp_path / "cli" / "mp.toml", minimal('[log]\nlevel = "debug"\n'))
    monkeypatch.setenv(config.ENV_VAR, str(env_file))
    loaded = load(str(explicit))
    assert loaded.log.level == "debug"
    assert loaded.source == explicit


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An installed configuration, where /etc/migrating-proxy/migrating-proxy.toml would be
    (tests/test_deploy.py uses the real path, in a mount namespace of its own)."""
    path = write(tmp_path / "etc" / "migrating-proxy.toml", minimal('[log]\nlevel = "info"\n'))
    monkeypatch.setattr(config, "INSTALLED_PATH", path)
    monkeypatch.setattr(config, "SEARCH_PATH", (config.CHECKOUT_PATH, path))
    return path


def test_the_installed_file_is_used_from_any_directory(installed: Path) -> None:
    loaded = load(None)
    assert loaded.source == installed
    assert config.search_note(loaded) is None  # nothing to warn about


def test_a_checkout_file_in_the_working_directory_beats_the_installed_one_and_says_so(
        tmp_path: Path, installed: Path) -> None:
    write(tmp_path / "config" / "migrating-proxy.toml", minimal('[log]\nlevel = "error"\n'))
    loaded = load(None)
    assert loaded.log.level == "error"
    note = config.search_note(loaded)
    assert note is not None and str(tmp_path / "config" / "migrating-proxy.toml") in note
    assert f"not {installed}" in note


def test_the_environment_beats_the_installed_file(
        tmp_path: Path, installed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_file = write(tmp_path / "env" / "mp.toml", minimal('[log]\nlevel = "warning"\n'))
    monkeypatch.setenv(config.ENV_VAR, str(env_file))
    assert load(None).source == env_file


def test_built_in_defaults_are_announced_with_their_database(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "SEARCH_PATH", (config.CHECKOUT_PATH, tmp_path / "no.toml"))
    note = config.search_note(load(None))
    assert note is not None and "built-in defaults" in note
    assert f"database {tmp_path / 'var' / 'migrating-proxy.db'}" in note


def test_missing_explicit_file_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"/nowhere\.toml: file not found$"):
        load(str(tmp_path / "nowhere.toml"))


# --- what it resolves to ------------------------------------------------------------------


def test_relative_paths_resolve_against_the_files_directory(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    write(etc / "tls" / "cert.pem", "cert")
    write(etc / "tls" / "key.pem", "key")
    write(etc / "master-password", "secret\n")
    path = write(etc / "mp.toml", minimal("""
[tls]
cert = "tls/cert.pem"
key = "tls/key.pem"
[database]
url = "sqlite:///data/proxy.db"
[backend]
master_user = "proxy-master"
master_password_file = "master-password"
""", users="users/dovecot-users"))
    loaded = load(str(path.relative_to(tmp_path)))
    base = etc.resolve()
    assert loaded.provision.path == base / "users" / "dovecot-users"
    assert loaded.tls.cert == base / "tls" / "cert.pem"
    assert loaded.tls.key == base / "tls" / "key.pem"
    assert loaded.backend.master_password_file == base / "master-password"
    assert loaded.backend.master_password() == "secret"
    assert loaded.database_url == f"sqlite:///{base / 'data' / 'proxy.db'}"


def test_absolute_paths_and_server_urls_are_kept(tmp_path: Path) -> None:
    path = write(tmp_path / "mp.toml", minimal("""
[database]
url = "postgresql://mp@db.example/mp"
[backend]
imap = "imaps://store.example"
pop3 = "pop3s://store.example:1995"
""", users="/var/lib/migrating-proxy/dovecot-users"))
    loaded = load(str(path))
    assert loaded.provision.path == Path("/var/lib/migrating-proxy/dovecot-users")
    assert loaded.database_url == "postgresql://mp@db.example/mp"
    assert loaded.backend.imap == parse_endpoint("imaps://store.example:993")
    assert loaded.backend.pop3.tls == "implicit" and loaded.backend.pop3.port == 1995


def test_listeners_can_be_moved_and_disabled(tmp_path: Path) -> None:
    path = write(tmp_path / "mp.toml", minimal('[listen]\nimap = "[::1]:2143"\npop3 = ""\n'))
    loaded = load(str(path))
    assert loaded.listen.imap == ("::1", 2143)
    assert loaded.listen.pop3 is None


def test_integer_is_accepted_where_seconds_are_expected(tmp_path: Path) -> None:
    path = write(tmp_path / "mp.toml", minimal("[limits]\nidle_timeout = 5\n"))
    assert load(str(path)).limits.idle_timeout == 5.0


# --- how it is refused --------------------------------------------------------------------

TLS_FILES = '[tls]\ncert = "cert.pem"\nkey = "key.pem"\n'

BAD_CASES = {
    "unknown section": ("[lisen]\nimap = \"127.0.0.1:1143\"\n", "lisen", "unknown section"),
    "section not a table": ('listen = "127.0.0.1:1143"\n', "listen", "must be a table"),
    "unknown key": ("[listen]\nimap4 = \"127.0.0.1:1143\"\n", "listen.imap4", "unknown key"),
    "wrong type (string for int)": (
        '[limits]\nmax_line = "8k"\n', "limits.max_line", "must be an integer"),
    "wrong type (bool for int)": ("[limits]\nmax_line = true\n", "limits.max_line", "must be a"),
    "wrong type (float for int)": (
        "[limits]\nmax_failures_per_peer = 2.5\n", "limits.max_failures_per_peer", "must be a"),
    "wrong type (int for string)": ("[listen]\nimap = 1143\n", "listen.imap", "must be a"),
    "wrong type (string for bool)": (
        '[tls]\nrequire = "yes"\n', "tls.require", "must be true or false"),
    "listen address without port": (
        '[listen]\nimap = "127.0.0.1"\n', "listen.imap", "expected host:port"),
    "listen port out of range": (
        '[listen]\npop3 = "127.0.0.1:70000"\n', "listen.pop3", "expected host:port"),
    "backend URL with unknown scheme": (
        '[backend]\nimap = "http://store.example"\n', "backend.imap", "scheme must be one of"),
    "backend URL without host": ('[backend]\nimap = "imap://"\n', "backend.imap", "no host"),
    "backend URL with a path": (
        '[backend]\nimap = "imap://store.example/INBOX"\n', "backend.imap",
        "only scheme://host[:port]"),
    "backend URL of the wrong protocol": (
        '[backend]\npop3 = "imap://store.example"\n', "backend.pop3", "must be a pop3 URL"),
    "bad database URL": (
        '[database]\nurl = "mysql://db.example/mp"\n', "database.url",
        "must be a sqlite:/// or postgresql:// URL"),
    "passwd-file without a path": (
        '[provision]\nkind = "passwd-file"\n', "provision.path", "required"),
    "unknown provision kind": (
        '[provision]\nkind = "ldap"\npath = "users"\n', "provision.kind", "must be"),
    "unknown passlib scheme": (
        '[provision]\npath = "users"\nscheme = "rot13"\n', "provision.scheme",
        "unknown passlib scheme 'rot13'"),
    "tls.require without a certificate": (
        "[tls]\nrequire = true\n", "tls.require", "needs tls.cert and tls.key"),
    "certificate file missing": (
        '[tls]\ncert = "missing.pem"\n', "tls.cert", "missing.pem is not a readable file"),
    "key file missing": (
        '[tls]\ncert = "cert.pem"\nkey = "missing.pem"\n', "tls.key",
        "missing.pem is not a readable file"),
    "imaps listener without TLS": (
        '[listen]\nimaps = "127.0.0.1:1993"\n', "listen.imaps", "needs tls.cert and tls.key"),
    "pop3s listener without TLS": (
        '[listen]\npop3s = "127.0.0.1:1995"\n', "listen.pop3s", "needs tls.cert and tls.key"),
    "master_user without a password file": (
        '[backend]\nmaster_user = "proxy-master"\n', "backend.master_password_file",
        "required with backend.master_user"),
    "master password file missing": (
        '[backend]\nmaster_user = "m"\nmaster_password_file = "nope"\n',
        "backend.master_password_file", "nope is not a readable file"),
    "negative limit": (
        "[limits]\nmax_failures_per_peer = -1\n", "limits.max_failures_per_peer",
        "must not be negative"),
    "negative float limit": (
        "[limits]\nidle_timeout = -0.5\n", "limits.idle_timeout", "must not be negative"),
    "switch hold under a second": (
        "[migration]\nswitch_hold = 0.5\n", "migration.switch_hold", "must be at least 1"),
    "moved notice missing": (
        '[migration]\nmoved_notice = "nope.txt"\n', "migration.moved_notice",
        "nope.txt is not a readable file"),
    "listen backlog of zero": (
        "[limits]\nlisten_backlog = 0\n", "limits.listen_backlog", "must be at least 1"),
    "unknown log format": ('[log]\nformat = "xml"\n', "log.format", "must be"),
    "unknown log level": ('[log]\nlevel = "loud"\n', "log.level", "must be"),
    "unknown copy engine": (
        '[migration]\nengine = "rsync"\n', "migration.engine", 'must be "imap" or "dsync"'),
    "dsync without a credentials directory": (
        '[migration]\nengine = "dsync"\n', "migration.dsync_credentials",
        'required with engine = "dsync"'),
    "doveadm URL that is not HTTP": (
        '[backend]\ndoveadm_url = "imap://store:8080"\ndoveadm_api_key_file = "key.pem"\n',
        "backend.doveadm_url", "must be an http:// or https:// URL"),
    "doveadm URL without a key file": (
        '[backend]\ndoveadm_url = "http://127.0.0.1:8080/doveadm/v1"\n',
        "backend.doveadm_api_key_file", "required with backend.doveadm_url"),
    "doveadm key file missing": (
        '[backend]\ndoveadm_url = "http://127.0.0.1:8080/doveadm/v1"\n'
        'doveadm_api_key_file = "nokey"\n', "backend.doveadm_api_key_file",
        "nokey is not a readable file"),
    "PROXY networks not a list": (
        '[listen]\nproxy_protocol_from = "10.0.0.0/8"\n', "listen.proxy_protocol_from",
        "must be a list"),
    "PROXY network that is no network": (
        '[listen]\nproxy_protocol_from = ["10.0.0.0/8", "lb.example"]\n',
        "listen.proxy_protocol_from", "'lb.example' is not an IP network"),
    "PROXY network that is a number": (
        "[listen]\nproxy_protocol_from = [10]\n", "listen.proxy_protocol_from",
        "10 is not an IP network"),
    "metrics address without port": (
        '[metrics]\nlisten = "127.0.0.1"\n', "metrics.listen", "expected host:port"),
}


@pytest.mark.parametrize(("body", "key", "reason"), BAD_CASES.values(), ids=BAD_CASES.keys())
def test_bad_setting_names_file_key_and_reason(
    tmp_path: Path, body: str, key: str, reason: str
) -> None:
    write(tmp_path / "cert.pem", "cert")
    write(tmp_path / "key.pem", "key")
    # A valid provision section follows unless the case is about it (TOML forbids repeats).
    text = body if body.startswith("[provision]") else body + minimal()
    path = write(tmp_path / "mp.toml", text)
    with pytest.raises(ConfigError) as raised:
        load(str(path))
    message = str(raised.value)
    assert message.startswith(f"{path}: {key}: "), message
    assert reason in message.removeprefix(f"{path}: {key}: ")
    assert "\n" not in message


def test_the_dsync_engine_settings_resolve(tmp_path: Path) -> None:
    write(tmp_path / "doveadm-key", "k")
    path = write(tmp_path / "mp.toml", minimal(
        '[backend]\ndoveadm_url = "http://127.0.0.1:8080/doveadm/v1"\n'
        'doveadm_api_key_file = "doveadm-key"\n'
        '[migration]\nengine = "dsync"\ndsync_credentials = "dsync-users"\n'))
    loaded = load(str(path))
    assert loaded.migration.engine == "dsync"
    assert loaded.migration.dsync_credentials == tmp_path / "dsync-users"
    assert loaded.migration.dsync_timeout == 3600.0
    assert loaded.backend.doveadm_api_key_file == tmp_path / "doveadm-key"
    assert load(None).migration.engine == "imap"  # the default: any store


def test_tls_listeners_are_accepted_with_a_certificate(tmp_path: Path) -> None:
    write(tmp_path / "cert.pem", "cert")
    write(tmp_path / "key.pem", "key")
    listen = '[listen]\nimaps = "127.0.0.1:1993"\npop3s = "127.0.0.1:1995"\n'
    path = write(tmp_path / "mp.toml", minimal(TLS_FILES + listen))
    loaded = load(str(path))
    assert loaded.tls.enabled
    assert loaded.listen.imaps == ("127.0.0.1", 1993)


def test_invalid_toml_names_the_file_and_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "mp.toml", minimal('[listen]\nimap = "127.0.0.1:1143\n'))
    with pytest.raises(ConfigError) as raised:
        load(str(path))
    message = str(raised.value)
    assert message.startswith(f"{path}: not valid TOML: ")
    assert "line 4" in message


def test_file_that_is_not_utf8_is_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "mp.toml"
    path.write_bytes(b'[log]\nlevel = "\xff"\n')
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(str(path))


# --- through the command line -------------------------------------------------------------


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "migrating_proxy", *args],
        capture_output=True, text=True, timeout=60, cwd=cwd,
    )


@pytest.mark.parametrize(("body", "expected"), [
    ('[limits]\nmax_line = -5\n', "limits.max_line: must not be negative"),
    ('[backend]\nimap = "pop3://store.example"\n', "backend.imap: must be a imap URL"),
    ("[surprise]\n", "surprise: unknown section"),
])
def test_cli_reports_a_bad_config_in_one_line(tmp_path: Path, body: str, expected: str) -> None:
    path = write(tmp_path / "mp.toml", minimal(body))
    result = run_cli("--config", str(path), "domain", "list", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == f"migrating-proxy: error: {path}: {expected}\n"
    assert result.stdout == ""
    assert not (tmp_path / "var").exists()  # no database was created either


def test_cli_reports_invalid_toml_in_one_line(tmp_path: Path) -> None:
    path = write(tmp_path / "mp.toml", "[log\n")
    result = run_cli("--config", str(path), "serve", cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"migrating-proxy: error: {path}: not valid TOML: ")
    assert "Traceback" not in result.stderr


def test_cli_finds_the_config_through_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path / "env.toml", minimal("[limits]\nmax_line = -1\n"))
    result = subprocess.run(
        [sys.executable, "-m", "migrating_proxy", "account", "list"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={**os.environ, config.ENV_VAR: str(path)},
    )
    assert result.returncode == 1
    expected = f"migrating-proxy: error: {path}: limits.max_line: must not be negative\n"
    assert result.stderr == expected


def test_the_commented_example_configuration_is_valid(tmp_path: Path) -> None:
    """config/migrating-proxy.example.toml documents every key; it must stay loadable."""
    example = (REPO_ROOT / "config" / "migrating-proxy.example.toml").read_text()
    secret = tmp_path / "master-password"
    secret.write_text("x\n")
    path = tmp_path / "migrating-proxy.toml"
    path.write_text(example.replace("/etc/migrating-proxy/master-password", str(secret)))
    loaded = config.load(str(path))
    assert loaded.provision.kind == "passwd-dir"
    assert loaded.backend.master_user == "proxy-master"
    documented = {line.split("=")[0].strip() for line in example.splitlines()
                  if "=" in line and not line.lstrip().startswith("#")}
    for section in (loaded.listen, loaded.tls, loaded.backend, loaded.provision, loaded.limits,
                    loaded.migration, loaded.log, loaded.metrics):
        assert set(section.__dataclass_fields__) <= documented | {"url"}, section


def test_store_urls_with_starttls_are_refused_rather_than_used_in_clear(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[backend]\nimap = "imap+starttls://127.0.0.1:143"\n'
                    '[provision]\nkind = "none"\n')
    with pytest.raises(ConfigError, match=r"backend\.imap: use imap:// or imaps://"):
        load(str(path))


def test_login_timeout_defaults_to_dovecots_three_minutes(tmp_path: Path) -> None:
    assert config.Config().limits.login_timeout == 180.0
    path = tmp_path / "c.toml"
    path.write_text('[limits]\nlogin_timeout = 30\n[provision]\nkind = "none"\n')
    assert load(str(path)).limits.login_timeout == 30.0
    path.write_text('[limits]\nlogin_timeout = -1\n[provision]\nkind = "none"\n')
    with pytest.raises(ConfigError, match=r"limits\.login_timeout: must not be negative"):
        load(str(path))
