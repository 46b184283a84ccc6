"""Configuration: one TOML file, validated into frozen dataclasses.

The file's keys are a public contract (operators script against them): new keys may be added,
existing ones are never renamed. Every problem is reported as a `ConfigError` naming the file,
the key and the reason, so the CLI can print one line instead of a traceback.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from migrating_proxy.endpoints import Endpoint, EndpointError, parse_endpoint, parse_listen

ENV_VAR = "MIGRATING_PROXY_CONFIG"
# Where the file is looked for when neither --config nor $MIGRATING_PROXY_CONFIG names one: a
# checkout's own file (relative to the working directory, for development and the demo), then
# the installed one (the path the systemd units use). First found wins.
CHECKOUT_PATH = Path("config/migrating-proxy.toml")
INSTALLED_PATH = Path("/etc/migrating-proxy/migrating-proxy.toml")
SEARCH_PATH = (CHECKOUT_PATH, INSTALLED_PATH)
DEFAULT_STORE_IMAP = "imap://127.0.0.1:10143"
DEFAULT_STORE_POP3 = "pop3://127.0.0.1:10110"


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(Exception):
    """A configuration problem, worded for an operator: file, key, reason."""


@dataclass(frozen=True)
class ListenConfig:
    imap: tuple[str, int] | None = ("127.0.0.1", 1143)
    imaps: tuple[str, int] | None = None
    pop3: tuple[str, int] | None = ("127.0.0.1", 1110)
    pop3s: tuple[str, int] | None = None
    # Off unless configured, so existing deployments open no port they did not ask for.
    smtp: tuple[str, int] | None = None  # inbound (MX): no AUTH, local domains only
    submission: tuple[str, int] | None = None  # AUTH required
    # Load balancers: connections from these networks must start with a PROXY header (v1/v2).
    proxy_protocol_from: tuple[Network, ...] = ()

    @classmethod
    def addresses(cls) -> list[str]:
        """The listener keys (`host:port` values)."""
        return [name for name in cls.__dataclass_fields__ if name != "proxy_protocol_from"]


@dataclass(frozen=True)
class TLSConfig:
    cert: Path | None = None
    key: Path | None = None
    require: bool = False

    @property
    def enabled(self) -> bool:
        return self.cert is not None


@dataclass(frozen=True)
class BackendConfig:
    # Where deploy/dovecot/migrating-proxy.conf moves Dovecot, so that the proxy can take the
    # standard ports on the same machine.
    imap: Endpoint = field(default_factory=lambda: parse_endpoint(DEFAULT_STORE_IMAP))
    pop3: Endpoint = field(default_factory=lambda: parse_endpoint(DEFAULT_STORE_POP3))
    master_user: str = ""
    master_password_file: Path | None = None
    timeout: float = 10.0  # connect + greeting + login at the store, seconds
    # Where inbound mail for local accounts goes: LMTP (or SMTP) of the new store.
    delivery: Endpoint = field(default_factory=lambda: parse_endpoint("lmtp://127.0.0.1:24"))
    # The store's doveadm, for the dsync engine: its HTTP API (URL + key file), else the local
    # command (the proxy runs on the store's host).
    doveadm_url: str = ""
    doveadm_api_key_file: Path | None = None
    doveadm_command: str = "doveadm"

    def master_password(self) -> str | None:
        """Read on demand so the secret lives in memory only while a login needs it."""
        if not self.master_user or self.master_password_file is None:
            return None
        return self.master_password_file.read_text().strip()


@dataclass(frozen=True)
class ProvisionConfig:
    kind: str = "passwd-file"
    # Without any configuration file, beside the default database; a file must name it.
    path: Path | None = Path("var/dovecot-users")
    scheme: str = "sha512_crypt"
    rounds: int = 0  # 0: passlib's default cost for the scheme
    hash_processes: int = 2  # processes hashing for `serve` (crypt() would stall the relay)


@dataclass(frozen=True)
class LimitsConfig:
    """Pre-authentication limits. Post-login traffic is relayed untouched and unlimited."""

    max_line: int = 8192  # bytes in one command line before login
    max_literal: int = 8192  # bytes in one literal before login (usernames, passwords, SASL)
    idle_timeout: float = 60.0  # seconds of silence before login is finished
    # Seconds from connect to a finished login, however busy the client keeps the line
    # (Dovecot's limit too); 0: none. Submission counts until AUTH succeeds.
    login_timeout: float = 180.0
    auth_failure_delay: float = 2.0  # fixed delay before every failed-login answer
    max_failures_per_connection: int = 3
    throttle_window: float = 300.0  # seconds over which failures are counted
    max_failures_per_peer: int = 10
    max_failures_per_account: int = 20
    # Connections the kernel queues for accept(); Twisted's own default of 50 overflows under a
    # reconnect storm. 4096 is what Dovecot's login service asks for in its high-performance
    # mode (process_limit 100 x client_limit 1000, capped by net.core.somaxconn = 4096).
    listen_backlog: int = 4096


@dataclass(frozen=True)
class MigrationConfig:
    """On-login migration and the copy workers."""

    workers: int = 2  # mailboxes copied at a time by `serve`'s own workers; 0: none
    resync_interval: float = 3600.0  # at most one incremental pass per account this often
    notice: Path | None = None  # template of the "your mail is moving" message; None: built in
    vault_key_file: Path | None = None  # None: vault.key beside the SQLite database / config
    source_timeout: float = 20.0  # seconds for any one network step with an old server
    # Connections to one old server, all copies together (each copy uses `parallel_folders`).
    max_connections_per_host: int = 4
    parallel_folders: int = 2  # folders one copy reads at a time (one connection each)
    max_attempts: int = 8  # a copy that keeps failing for transient reasons ends in ERROR
    # false: a captured password is erased as soon as a pass completes (the user's next login
    # brings it back for the next pass). true: kept, encrypted, until `finish`, so workers run
    # an incremental pass every resync_interval on their own.
    keep_credentials: bool = False
    # Pre-stage passes (copies through the old server's admin credentials before the user
    # logs in): bytes per second per old host, all workers together; 0: unlimited. On-login
    # passes are never paced: a user is waiting for those.
    prestage_rate: int = 0
    # Passthrough switch: how long new logins of the account may be held while its old-server
    # sessions are closed and the final pass runs; a final pass that does not fit is retried.
    switch_hold: float = 10.0
    moved_notice: Path | None = None  # template of the notice put in at the switch; None: built in
    # The copy engine (a domain's `--engine` overrides it): "imap" appends through IMAP, any
    # store; "dsync" has the store's doveadm run `backup -R` from the old server, which keeps
    # the UIDs (Dovecot stores, passthrough domains; deploy/dovecot/migrating-proxy-dsync.conf).
    engine: str = "imap"
    # Where the dsync engine writes an account's old-server entry for the store's userdb
    # during a pass (the snippet's /var/lib/migrating-proxy/dsync-users).
    dsync_credentials: Path | None = None
    dsync_timeout: float = 3600.0  # seconds one `backup` call may take (a first pass: long)


# A wrong type named as TOML's reader would say it (`max_line = "8k"`: must be an integer).
TOML_KINDS: dict[type, str] = {int: "an integer", float: "a number", bool: "true or false",
                               str: "a string", list: "a list", dict: "a table"}
ENGINES = ("imap", "dsync")

SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def parse_size(value: int | str) -> int:
    """Bytes from an int or `"50MB"` / `"50M"` / `"512K"` (binary multiples, like Dovecot)."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)(?:I?B)?\s*", value.upper())
    if match is None:
        raise ValueError(f"{value!r} is not a size like 50MB")
    return int(match[1]) * SIZE_UNITS[match[2]]


@dataclass(frozen=True)
class SMTPConfig:
    """The SMTP front-ends (inbound MX and submission) and their next hops."""

    max_message_size: int = 50 * 1024**2  # bytes; advertised with SIZE and enforced
    hostname: str = ""  # banner and Received header; "": the machine's FQDN
    outbound: Endpoint | None = None  # submission relay for authenticated users' mail
    data_timeout: float = 180.0  # seconds of silence allowed inside DATA (RFC 5321 4.5.3.2.5)
    timeout: float = 60.0  # seconds for each step with a next hop (connect, RCPT, DATA end)
    max_recipients: int = 100  # RCPTs per transaction; more get 452 4.5.3

    @property
    def banner_name(self) -> str:
        return self.hostname or machine_fqdn()


@functools.cache
def machine_fqdn() -> str:
    """Once per process: getfqdn() may ask DNS, which must not happen per SMTP session."""
    return socket.getfqdn()


@dataclass(frozen=True)
class WebConfig:
    """The web console and its JSON API (`migrating-proxy web`, or a child of `serve`)."""

    # None: `serve` starts no console; `migrating-proxy web` then serves on DEFAULT_LISTEN.
    listen: tuple[str, int] | None = None
    session_lifetime: float = 3600.0  # seconds without a request before a login expires

    DEFAULT_LISTEN = ("127.0.0.1", 8080)


@dataclass(frozen=True)
class LogConfig:
    format: str = "auto"  # auto | json | console
    level: str = "info"


@dataclass(frozen=True)
class MetricsConfig:
    # Prometheus /metrics, /healthz and /readyz; off unless configured (no port not asked for).
    listen: tuple[str, int] | None = None


@dataclass(frozen=True)
class Config:
    source: Path | None = None  # the file this came from, None for built-in defaults
    listen: ListenConfig = field(default_factory=ListenConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    database_url: str = "sqlite:///var/migrating-proxy.db"
    backend: BackendConfig = field(default_factory=BackendConfig)
    provision: ProvisionConfig = field(default_factory=ProvisionConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    migration: MigrationConfig = field(default_factory=MigrationConfig)
    smtp: SMTPConfig = field(default_factory=SMTPConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    web: WebConfig = field(default_factory=WebConfig)

    @property
    def vault_key_path(self) -> Path:
        """Where the vault's key lives: configured, else beside the SQLite file or config."""
        if self.migration.vault_key_file is not None:
            return self.migration.vault_key_file
        if self.database_url.startswith("sqlite:///"):
            return Path(self.database_url.removeprefix("sqlite:///")).parent / "vault.key"
        return (self.source.parent if self.source else Path.cwd()) / "vault.key"


def locate(explicit: str | None) -> Path | None:
    """`--config`, then $MIGRATING_PROXY_CONFIG, then the first of SEARCH_PATH that exists."""
    if explicit:
        return Path(explicit)
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    return next((path for path in SEARCH_PATH if _present(path)), None)


def _present(path: Path) -> bool:
    """A file there, or one this user may not even look for (the installed directory is
    0750 root:migrating-proxy): load() then says so in one line, as for --config."""
    try:
        return path.is_file()
    except PermissionError:
        return True


def _not_a_file(path: Path) -> str | None:
    """Why `path` cannot serve as a file, or None. A directory on the way that this user may
    not enter (the service's user and /etc/ssl/private, say) is a reason, not a traceback."""
    try:
        if path.is_file():
            return None
    except OSError as exc:
        return f"{path} is not a readable file: {exc.strerror}"
    return f"{path} is not a readable file"


def search_note(config: Config) -> str | None:
    """What an operator should be told about where the configuration came from, if anything.

    Built-in defaults put the database in ./var of whatever directory the command runs in, so
    an admin command run from the wrong place would otherwise quietly work on a database the
    service never sees. A checkout's file that hides the installed one is named too.
    """
    if config.source is None:
        tried = ", ".join(["--config", f"${ENV_VAR}", *(str(p) for p in SEARCH_PATH)])
        return (f"no configuration file (looked for {tried}); using built-in defaults, "
                f"database {database_location(config.database_url)}")
    if config.source == CHECKOUT_PATH and _present(INSTALLED_PATH):
        return f"using {CHECKOUT_PATH.resolve()} (working directory), not {INSTALLED_PATH}"
    return None


def database_location(url: str) -> str:
    """The database as an operator finds it: a SQLite file's absolute path, else the URL."""
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        return str(Path(url.removeprefix("sqlite:///")).resolve())
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def load(explicit: str | None = None) -> Config:
    path = locate(explicit)
    if path is None:
        return Config()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return _Reader(path, raw).config()


class _Reader:
    """Turns the parsed TOML into a Config, naming `file: section.key: reason` on errors."""

    KNOWN = {
        "listen": set(ListenConfig.__dataclass_fields__),
        "tls": {"cert", "key", "require"},
        "database": {"url"},
        "backend": {"imap", "pop3", "master_user", "master_password_file", "timeout",
                    "delivery", "doveadm_url", "doveadm_api_key_file", "doveadm_command"},
        "provision": {"kind", "path", "scheme", "rounds", "hash_processes"},
        "limits": set(LimitsConfig.__dataclass_fields__),
        "log": {"format", "level"},
        "migration": set(MigrationConfig.__dataclass_fields__),
        "smtp": set(SMTPConfig.__dataclass_fields__),
        "metrics": {"listen"},
        "web": {"listen", "session_lifetime"},
    }

    def __init__(self, path: Path, raw: dict[str, Any]) -> None:
        self.path = path
        self.base = path.resolve().parent
        self.raw = raw

    def fail(self, key: str, reason: str) -> ConfigError:
        return ConfigError(f"{self.path}: {key}: {reason}")

    def config(self) -> Config:
        self._check_known_keys()
        config = Config(
            source=self.path,
            listen=self._listen(),
            tls=self._tls(),
            database_url=self._database_url(),
            backend=self._backend(),
            provision=self._provision(),
            limits=self._limits(),
            log=self._log(),
            migration=self._migration(),
            smtp=self._smtp(),
            metrics=MetricsConfig(listen=self._address("metrics", "listen", None)),
            web=self._web(),
        )
        for name in ("imaps", "pop3s"):
            if getattr(config.listen, name) and not config.tls.enabled:
                raise self.fail(f"listen.{name}", "needs tls.cert and tls.key")
        if config.listen.submission and config.smtp.outbound is None:
            raise self.fail("smtp.outbound", "required with listen.submission")
        return config

    def _check_known_keys(self) -> None:
        for section, value in self.raw.items():
            if section not in self.KNOWN:
                raise self.fail(section, "unknown section")
            if not isinstance(value, dict):
                raise self.fail(section, "must be a table")
            for key in value:
                if key not in self.KNOWN[section]:
                    raise self.fail(f"{section}.{key}", "unknown key")

    def get(self, section: str, key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        value = self.raw.get(section, {}).get(key, default)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            name = TOML_KINDS.get(kind, "value") if isinstance(kind, type) else "value"
            raise self.fail(f"{section}.{key}", f"must be {name}")
        return value

    def path_or_none(self, section: str, key: str) -> Path | None:
        value = self.get(section, key, str, "")
        if not value:
            return None
        path = Path(value)
        return path if path.is_absolute() else self.base / path

    def _listen(self) -> ListenConfig:
        defaults = ListenConfig()
        return ListenConfig(
            **{key: self._address("listen", key, getattr(defaults, key))
               for key in ListenConfig.addresses()},
            proxy_protocol_from=self._networks("listen", "proxy_protocol_from"),
        )

    def _networks(self, section: str, key: str) -> tuple[Network, ...]:
        values = self.get(section, key, list, [])
        networks = []
        for value in values:
            try:
                if not isinstance(value, str):
                    raise TypeError
                networks.append(ipaddress.ip_network(value, strict=False))
            except (TypeError, ValueError):
                raise self.fail(f"{section}.{key}", f"{value!r} is not an IP network") from None
        return tuple(networks)

    def _address(self, section: str, key: str,
                 default: tuple[str, int] | None) -> tuple[str, int] | None:
        """A `host:port` to listen on; "" for none."""
        text = self.get(section, key, str, f"{default[0]}:{default[1]}" if default else "")
        try:
            return parse_listen(text)
        except EndpointError as exc:
            raise self.fail(f"{section}.{key}", str(exc)) from None

    def _tls(self) -> TLSConfig:
        tls = TLSConfig(
            cert=self.path_or_none("tls", "cert"),
            key=self.path_or_none("tls", "key"),
            require=self.get("tls", "require", bool, False),
        )
        for key in ("cert", "key"):
            path = getattr(tls, key)
            if path is not None and (why := _not_a_file(path)):
                raise self.fail(f"tls.{key}", why)
        if tls.cert is None and tls.require:
            raise self.fail("tls.require", "needs tls.cert and tls.key")
        return tls

    def _database_url(self) -> str:
        url = self.get("database", "url", str, Config.database_url)
        if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
            relative = url.removeprefix("sqlite:///")
            if relative and relative != ":memory:":
                url = f"sqlite:///{self.base / relative}"
        if not url.startswith(("sqlite:", "postgresql:", "postgresql+")):
            raise self.fail("database.url", "must be a sqlite:/// or postgresql:// URL")
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            make_url(url)
        except (ArgumentError, ValueError) as exc:
            raise self.fail("database.url", f"not a valid URL ({exc})") from None
        return url

    def _backend(self) -> BackendConfig:
        values = {}
        for key, default in (("imap", DEFAULT_STORE_IMAP), ("pop3", DEFAULT_STORE_POP3)):
            try:
                endpoint = parse_endpoint(self.get("backend", key, str, default))
            except EndpointError as exc:
                raise self.fail(f"backend.{key}", str(exc)) from None
            if endpoint.protocol != key:
                raise self.fail(f"backend.{key}", f"must be a {key} URL")
            if endpoint.tls == "starttls":
                # Not implemented towards the store: refuse rather than talk in clear text.
                raise self.fail(f"backend.{key}", f"use {key}:// or {key}s:// for the store")
            values[key] = endpoint
        backend = BackendConfig(
            **values,
            master_user=self.get("backend", "master_user", str, ""),
            master_password_file=self.path_or_none("backend", "master_password_file"),
            timeout=self.get("backend", "timeout", float, 10.0),
            delivery=self._endpoint("backend", "delivery", "lmtp://127.0.0.1:24",
                                    ("lmtp", "smtp")),
            doveadm_url=self.get("backend", "doveadm_url", str, ""),
            doveadm_api_key_file=self.path_or_none("backend", "doveadm_api_key_file"),
            doveadm_command=self.get("backend", "doveadm_command", str, "doveadm"),
        )
        self._check_doveadm(backend)
        if backend.master_user and backend.master_password_file is None:
            raise self.fail("backend.master_password_file", "required with backend.master_user")
        if backend.master_password_file and (why := _not_a_file(backend.master_password_file)):
            raise self.fail("backend.master_password_file", why)
        return backend

    def _check_doveadm(self, backend: BackendConfig) -> None:
        if backend.doveadm_url:
            if not re.fullmatch(r"https?://[^/\s]+/\S*", backend.doveadm_url):
                raise self.fail("backend.doveadm_url",
                                "must be an http:// or https:// URL such as "
                                "http://127.0.0.1:10180/doveadm/v1")
            if backend.doveadm_api_key_file is None:
                raise self.fail("backend.doveadm_api_key_file",
                                "required with backend.doveadm_url")
        key_file = backend.doveadm_api_key_file
        if key_file is not None and (why := _not_a_file(key_file)):
            raise self.fail("backend.doveadm_api_key_file", why)
        if not backend.doveadm_command.strip():
            raise self.fail("backend.doveadm_command", "must not be empty")

    def _endpoint(self, section: str, key: str, default: str,
                  allowed: tuple[str, ...]) -> Endpoint:
        try:
            return parse_endpoint(self.get(section, key, str, default), allowed)
        except EndpointError as exc:
            raise self.fail(f"{section}.{key}", str(exc)) from None

    def _size(self, section: str, key: str, default: int) -> int:
        """A byte count: an int or a string such as "2MB"; never negative."""
        try:
            value = parse_size(self.get(section, key, (int, str), default))
        except ValueError as exc:
            raise self.fail(f"{section}.{key}", str(exc)) from None
        if value < 0:
            raise self.fail(f"{section}.{key}", "must not be negative")
        return value

    def _smtp(self) -> SMTPConfig:
        defaults = SMTPConfig()
        try:
            size = parse_size(self.get("smtp", "max_message_size", (int, str),
                                       defaults.max_message_size))
        except ValueError as exc:
            raise self.fail("smtp.max_message_size", str(exc)) from None
        outbound = self.get("smtp", "outbound", str, "")
        values: dict[str, Any] = {
            "max_message_size": size,
            "hostname": self.get("smtp", "hostname", str, ""),
            "outbound": self._endpoint("smtp", "outbound", outbound, ("smtp",))
            if outbound else None,
        }
        for key in ("data_timeout", "timeout", "max_recipients"):
            default = getattr(defaults, key)
            values[key] = self.get("smtp", key, type(default), default)
            if values[key] <= 0:
                raise self.fail(f"smtp.{key}", "must be positive")
        if size <= 0:
            raise self.fail("smtp.max_message_size", "must be positive")
        if not re.fullmatch(r"[A-Za-z0-9.-]*", values["hostname"]):
            # It goes into every banner and Received header: letters, digits, dots, dashes.
            raise self.fail("smtp.hostname", "must be a plain host name")
        return SMTPConfig(**values)

    def _provision(self) -> ProvisionConfig:
        from migrating_proxy.passwords import known_scheme

        provision = ProvisionConfig(
            kind=self.get("provision", "kind", str, "passwd-file"),
            path=self.path_or_none("provision", "path"),
            scheme=self.get("provision", "scheme", str, "sha512_crypt"),
            rounds=self.get("provision", "rounds", int, 0),
            hash_processes=self.get("provision", "hash_processes", int, 2),
        )
        if provision.hash_processes < 0:
            raise self.fail("provision.hash_processes", "must not be negative")
        if provision.kind not in ("passwd-file", "passwd-dir", "none"):
            raise self.fail("provision.kind", 'must be "passwd-file", "passwd-dir" or "none"')
        if provision.kind != "none" and provision.path is None:
            raise self.fail("provision.path", f'required when provision.kind = "{provision.kind}"')
        if not known_scheme(provision.scheme):
            raise self.fail("provision.scheme", f"unknown passlib scheme {provision.scheme!r}")
        return provision

    def _limits(self) -> LimitsConfig:
        defaults = LimitsConfig()
        values = {}
        for key in LimitsConfig.__dataclass_fields__:
            default = getattr(defaults, key)
            value = self.get("limits", key, type(default), default)
            if value < 0:
                raise self.fail(f"limits.{key}", "must not be negative")
            values[key] = value
        if values["listen_backlog"] < 1:
            raise self.fail("limits.listen_backlog", "must be at least 1")
        return LimitsConfig(**values)

    def _migration(self) -> MigrationConfig:
        defaults = MigrationConfig()
        values: dict[str, Any] = {}
        for key in ("workers", "resync_interval", "source_timeout", "max_connections_per_host",
                    "parallel_folders", "max_attempts", "switch_hold",
                    "dsync_timeout"):
            default = getattr(defaults, key)
            value = self.get("migration", key, type(default), default)
            if value < 0:
                raise self.fail(f"migration.{key}", "must not be negative")
            values[key] = value
        for key in ("notice", "vault_key_file", "moved_notice", "dsync_credentials"):
            values[key] = self.path_or_none("migration", key)
        values["engine"] = self.get("migration", "engine", str, defaults.engine)
        if values["engine"] not in ENGINES:
            raise self.fail("migration.engine", 'must be "imap" or "dsync"')
        if values["engine"] == "dsync" and values["dsync_credentials"] is None:
            raise self.fail("migration.dsync_credentials", 'required with engine = "dsync"')
        values["keep_credentials"] = self.get("migration", "keep_credentials", bool, False)
        values["prestage_rate"] = self._size("migration", "prestage_rate", 0)
        for key in ("notice", "moved_notice"):
            if values[key] is not None and (why := _not_a_file(values[key])):
                raise self.fail(f"migration.{key}", why)
        if values["switch_hold"] < 1:
            raise self.fail("migration.switch_hold", "must be at least 1 (seconds)")
        return MigrationConfig(**values)

    def _web(self) -> WebConfig:
        try:
            listen = parse_listen(self.get("web", "listen", str, ""))
        except EndpointError as exc:
            raise self.fail("web.listen", str(exc)) from None
        lifetime = self.get("web", "session_lifetime", float, WebConfig.session_lifetime)
        if lifetime <= 0:
            raise self.fail("web.session_lifetime", "must be positive")
        return WebConfig(listen=listen, session_lifetime=lifetime)

    def _log(self) -> LogConfig:
        log = LogConfig(
            format=self.get("log", "format", str, "auto"),
            level=self.get("log", "level", str, "info"),
        )
        if log.format not in ("auto", "json", "console"):
            raise self.fail("log.format", 'must be "auto", "json" or "console"')
        if log.level not in ("debug", "info", "warning", "error"):
            raise self.fail("log.level", "must be debug, info, warning or error")
        return log
