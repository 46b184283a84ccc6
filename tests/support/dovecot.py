"""Private, throw-away Dovecot instances for the tests and the demo.

Two kinds:

* `old_server()`: the server users are migrated *from* (IMAP, POP3, LMTP; plain passwd-file).
* `new_store()`: the store users are migrated *to*. Everything that makes it the proxy's store
  (master passdb, provisioned passwd-files, the migrated users' userdb and mail location, the
  IMAP/POP3/LMTP listeners, trusted networks) comes from the checked-in
  `deploy/dovecot/migrating-proxy.conf`, with only paths, ports and the mail owner replaced
  (`render_snippet`), so the documented setup is the tested one. tests/test_deploy.py goes
  further: the snippet in a copy of the distribution's own /etc/dovecot.

Everything an instance needs lives below its `root` directory. When running as root, Dovecot's
unprivileged processes (auth as `dovecot`, mail as `nobody`) must be able to reach that directory,
which rules out pytest's `tmp_path` (below a 0700 directory); use `instance_root()`, which makes a
short, world-traversable directory under /tmp. Short also matters because Dovecot's UNIX sockets
live in `<root>/run` and socket paths are limited to ~107 bytes.

No pytest imports here: the demo script uses this module too.
"""

from __future__ import annotations

import atexit
import contextlib
import grp
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal

from tests.support.tls import TLSFiles

REPO_ROOT = Path(__file__).resolve().parents[2]
SNIPPET = REPO_ROOT / "deploy" / "dovecot" / "migrating-proxy.conf"
DSYNC_SNIPPET = REPO_ROOT / "deploy" / "dovecot" / "migrating-proxy-dsync.conf"

# Literals in the snippet that the fixtures replace with instance-specific values.
SNIPPET_MASTERS_PATH = "/etc/dovecot/migrating-proxy-masters"
SNIPPET_USERS_PATH = "/var/lib/migrating-proxy/dovecot-users"
SNIPPET_MAIL_ROOT = "/var/vmail"
SNIPPET_MAIL_OWNER = "uid=vmail gid=vmail"
SNIPPET_PORTS = {"imap": 10143, "imaps": 0, "pop3": 10110, "pop3s": 0, "lmtp": 24}
DSYNC_KEY_PATH = "/etc/dovecot/migrating-proxy-doveadm-key"
DSYNC_USERS_PATH = "/var/lib/migrating-proxy/dsync-users"
_DSYNC_HTTP_PORT = re.compile(r"(inet_listener http \{[^}]*?\bport = )10180\b")

SPECIAL_USE = {
    "Sent": r"\Sent",
    "Drafts": r"\Drafts",
    "Trash": r"\Trash",
    "Junk": r"\Junk",
    "Archive": r"\Archive",
}
HOST = "127.0.0.1"
_MAX_BASE_DIR = 60  # leaves room for Dovecot's longest socket names below base_dir
_IS_ROOT = os.geteuid() == 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Return once something accepts TCP connections on host:port; TimeoutError otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s") from None
            time.sleep(0.05)


def instance_root(prefix: str = "mp-dovecot-") -> Path:
    """A fresh, short, world-traversable directory for one instance (caller removes it)."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp" if Path("/tmp").is_dir() else None))
    root.chmod(0o755)
    return root


def _greets(host: str, port: int, banner: bytes) -> bool:
    """True if host:port accepts a connection and its first line starts with banner."""
    try:
        with socket.create_connection((host, port), timeout=1.0) as sock:
            if not banner:
                return True
            return sock.makefile("rb").readline().startswith(banner)
    except OSError:
        return False


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no file)"


@dataclass
class DovecotInstance:
    """One Dovecot master process and everything it uses, below `root`."""

    root: Path
    imap_port: int
    pop3_port: int
    lmtp_port: int
    imaps_port: int | None
    pop3s_port: int | None
    # Old server: its plain passwd-file. New store: the directory migrating-proxy provisions
    # (`passwd-dir`: one passwd-file per account, <dir>/<domain>/<local>).
    users_file: Path
    master_user: str | None
    master_password: str | None
    log_path: Path
    config_path: Path
    kind: Literal["old", "new"]
    tls: TLSFiles | None = None
    host: str = HOST
    # A store with deploy/dovecot/migrating-proxy-dsync.conf: the doveadm HTTP API's port and
    # key file, and the directory the dsync engine writes its per-pass userdb entries to.
    doveadm_port: int | None = None
    doveadm_key_file: Path | None = None
    dsync_users: Path | None = None
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def base_dir(self) -> Path:
        return self.root / "run"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the master in the foreground (so we reap it) and wait until all ports answer."""
        if self.running:
            return
        output = (self.root / "dovecot.out").open("ab")
        with output:
            # A session of its own: Ctrl-C in a demo terminal must not kill Dovecot before the
            # script's own clean-up has had a chance to use it.
            self._process = subprocess.Popen(
                ["dovecot", "-F", "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        atexit.register(self.stop)
        try:
            self._wait_ready(timeout=15.0)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        """Wait for the greetings, not just open ports: login processes accept connections
        before auth is ready and only greet once it is. Stopping an instance before its
        children have met the stats process also makes them hang for 5 s on shutdown.
        """
        deadline = time.monotonic() + timeout
        banners = {self.imap_port: b"* OK", self.pop3_port: b"+OK", self.lmtp_port: b"220 "}
        if self.doveadm_port:
            banners[self.doveadm_port] = b""
        plain_tls = [p for p in (self.imaps_port, self.pop3s_port) if p]
        for port, banner in [*banners.items(), *((p, b"") for p in plain_tls)]:
            while not _greets(self.host, port, banner):
                assert self._process is not None
                if (code := self._process.poll()) is not None:
                    raise RuntimeError(self._failure(f"dovecot exited with status {code}"))
                if time.monotonic() >= deadline:
                    raise RuntimeError(self._failure(f"no greeting on port {port}"))
                time.sleep(0.05)

    def _failure(self, what: str) -> str:
        return (
            f"Dovecot instance {self.root} failed to start: {what}\n"
            f"--- {self.root / 'dovecot.out'}\n{_tail(self.root / 'dovecot.out')}\n"
            f"--- {self.log_path}\n{_tail(self.log_path)}"
        )

    def stop(self) -> None:
        """SIGTERM the master's process group and wait until the master has exited.

        The master alone takes over a second to shut down: it signals its children and waits for
        them. Signalling the whole group (the master leads it: `-F` plus a session of its own)
        stops everything at once, in milliseconds.
        """
        atexit.unregister(self.stop)
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        pid = process.pid
        with contextlib.suppress(FileNotFoundError, ValueError):
            pid = int((self.base_dir / "master.pid").read_text().split()[0])
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def add_user(self, address: str, password: str) -> None:
        """Old server only: append `address:{PLAIN}password` (Dovecot re-reads the file)."""
        if self.kind != "old":
            raise RuntimeError("new-store users are provisioned by migrating-proxy, not by tests")
        with self.users_file.open("a", encoding="utf-8") as users:
            users.write(f"{address}:{{PLAIN}}{password}\n")

    def provision(self, address: str, entry: str) -> None:
        """New store only: put `address:entry` (e.g. `{PLAIN}pw`) where the proxy would."""
        local, _, domain = address.lower().rpartition("@")
        path = self.users_file / domain / local
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{address.lower()}:{entry}\n")

    def provisioned_text(self) -> str:
        """New store only: every provisioned line, as one passwd-file would list them."""
        files = sorted(p for p in self.users_file.glob("*/*") if not p.name.startswith("."))
        return "".join(path.read_text() for path in files)

    def maildir(self, address: str) -> Path:
        """The user's maildir root (INBOX's cur/new/tmp; folders below it, LAYOUT=fs)."""
        local, _, domain = address.partition("@")
        home = self.root / "mail" / domain / local
        return home / "Maildir" if self.kind == "new" else home  # the snippet's mail location

    def __enter__(self) -> DovecotInstance:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --- configuration -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Identity:
    """Who Dovecot's processes run as, and who owns the mail."""

    login_user: str
    internal_user: str
    internal_group: str
    mail_uid: int
    mail_gid: int

    @classmethod
    def for_current_user(cls) -> _Identity:
        if _IS_ROOT:
            # Login processes refuse root and mail must not belong to uid 0.
            return cls(
                "dovenull", "dovecot", "dovecot",
                pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid,
            )
        me = pwd.getpwuid(os.geteuid())
        group = grp.getgrgid(os.getegid()).gr_name
        return cls(me.pw_name, me.pw_name, group, me.pw_uid, os.getegid())

    @property
    def internal_gid(self) -> int:
        return grp.getgrnam(self.internal_group).gr_gid


def _check_reachable(root: Path) -> None:
    """Dovecot's unprivileged processes must be able to traverse every directory above root."""
    if not _IS_ROOT:
        return
    for directory in root.resolve().parents:
        if not directory.stat().st_mode & 0o001:
            raise ValueError(
                f"{directory} is not world-traversable, so Dovecot's unprivileged processes "
                f"cannot reach {root}; use tests.support.dovecot.instance_root()"
            )


def _ssl_settings(tls: TLSFiles | None) -> str:
    if tls is None:
        return "ssl = no\n"
    return f"ssl = yes\nssl_cert = <{tls.cert}\nssl_key = <{tls.key}\n"


def _mailboxes() -> str:
    return "".join(
        f"  mailbox {name} {{\n    special_use = {flag}\n    auto = subscribe\n  }}\n"
        for name, flag in SPECIAL_USE.items()
    )


def _namespace(courier_style: bool) -> str:
    """The personal namespace.

    Dovecot's own style: "/" separator, SPECIAL-USE folders (and folders as directories,
    LAYOUT=fs, in the mail location). Courier's (and Cyrus's default): everything below "INBOX."
    with "." as separator, Maildir++ on disk, no SPECIAL-USE.
    """
    if courier_style:
        return """namespace inbox {
  inbox = yes
  prefix = INBOX.
  separator = .
}
"""
    return f"""namespace inbox {{
  inbox = yes
  separator = /
{_mailboxes()}}}
"""


def _base_config(inst: DovecotInstance, ident: _Identity, courier_style: bool = False) -> str:
    """Settings every instance has: paths below root, identities, auth and mail details."""
    return f"""# Generated by tests/support/dovecot.py ({inst.kind} server); do not edit.
instance_name = mp-{inst.kind}-{inst.imap_port}
base_dir = {inst.base_dir}
state_dir = {inst.root / "state"}
log_path = {inst.log_path}
listen = {inst.host}
protocols = imap pop3 lmtp
default_login_user = {ident.login_user}
default_internal_user = {ident.internal_user}
default_internal_group = {ident.internal_group}
first_valid_uid = 1
disable_plaintext_auth = no
auth_mechanisms = plain login
# A wrong password in a test must not cost the default 2 s.
auth_failure_delay = 0
auth_verbose = yes
mail_fsync = never
{_ssl_settings(inst.tls)}
{_namespace(courier_style)}
# Dovecot's per-IP penalty for failed logins (up to 15 s) would make tests that try wrong
# passwords from 127.0.0.1 ever slower. Auth silently disables it when this socket is missing.
service anvil {{
  unix_listener anvil-auth-penalty {{
    path = anvil-auth-penalty-disabled-for-tests
  }}
}}
# Mail processes run as the mail user, not in the dovecot group; without this they log
# "stats-writer: Permission denied" on every login.
service stats {{
  unix_listener stats-writer {{
    mode = 0666
  }}
}}
"""


def _old_server_masters(masters_file: Path | None) -> str:
    """An administrator of the old server (a Dovecot master user): it logs in as any user with
    SASL PLAIN's authzid or as `user*admin` (the pre-stage copies' two styles)."""
    if masters_file is None:
        return ""
    return f"""
auth_master_user_separator = *
passdb {{
  driver = passwd-file
  master = yes
  args = scheme=PLAIN {masters_file}
  pass = yes
}}
"""


def _old_server_config(inst: DovecotInstance, ident: _Identity, courier_style: bool,
                       masters_file: Path | None = None) -> str:
    """The old server's users, mail and listeners (the new store's come from the snippet)."""
    mail = inst.root / "mail"
    layout = "" if courier_style else ":LAYOUT=fs"
    return _old_server_masters(masters_file) + f"""
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {inst.users_file}
}}
mail_location = maildir:{mail}/%d/%n{layout}
userdb {{
  driver = static
  args = uid={ident.mail_uid} gid={ident.mail_gid} home={mail}/%d/%n
}}
service imap-login {{
  inet_listener imap {{
    port = {inst.imap_port}
  }}
  inet_listener imaps {{
    port = {inst.imaps_port or 0}
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    port = {inst.pop3_port}
  }}
  inet_listener pop3s {{
    port = {inst.pop3s_port or 0}
  }}
}}
"""


def _old_lmtp_config(port: int) -> str:
    return f"""
service lmtp {{
  inet_listener lmtp {{
    address = {HOST}
    port = {port}
  }}
}}
"""


def render_snippet(replacements: dict[str, str], ports: dict[str, int]) -> str:
    """The checked-in snippet with literals replaced (`replacements`: literal -> value) and the
    listeners' ports (`ports`: listener name -> port). Nothing else changes; a literal or a
    listener the snippet no longer has is an error, so that the tests keep up with it."""
    text = SNIPPET.read_text()
    for literal, value in replacements.items():
        if literal not in text:
            raise ValueError(f"{SNIPPET} no longer has {literal!r}; update {__file__}")
        text = text.replace(literal, value)
    for name, port in ports.items():
        pattern = re.compile(rf"(inet_listener {name} \{{[^}}]*?\bport = ){SNIPPET_PORTS[name]}\b")
        text, count = pattern.subn(rf"\g<1>{port}", text)
        if count != 1:
            raise ValueError(f"{SNIPPET}: expected one {name} listener, port {SNIPPET_PORTS[name]}")
    return text


def render_dsync_snippet(key_file: Path, dsync_users: Path, http_port: int) -> str:
    """The checked-in dsync snippet with its paths and HTTP port replaced for one instance."""
    text = DSYNC_SNIPPET.read_text()
    for literal in (DSYNC_KEY_PATH, DSYNC_USERS_PATH):
        if literal not in text:
            raise ValueError(f"{DSYNC_SNIPPET} no longer uses {literal}; update {__file__}")
    text = text.replace(DSYNC_KEY_PATH, str(key_file)).replace(DSYNC_USERS_PATH, str(dsync_users))
    text, count = _DSYNC_HTTP_PORT.subn(rf"\g<1>{http_port}", text)
    if count != 1:
        raise ValueError(f"{DSYNC_SNIPPET}: expected one HTTP listener with port = 10180")
    return text


def _make_instance(
    root: Path, kind: Literal["old", "new"], users_file: Path, tls: TLSFiles | None,
    master_user: str | None = None, master_password: str | None = None,
) -> DovecotInstance:
    return DovecotInstance(
        root=root,
        imap_port=free_port(),
        pop3_port=free_port(),
        lmtp_port=free_port(),
        imaps_port=free_port() if tls else None,
        pop3s_port=free_port() if tls else None,
        users_file=users_file,
        master_user=master_user,
        master_password=master_password,
        log_path=root / "dovecot.log",
        config_path=root / "dovecot.conf",
        kind=kind,
        tls=tls,
    )


def _prepare_root(root: Path, ident: _Identity) -> None:
    if len(str(root / "run")) > _MAX_BASE_DIR:
        raise ValueError(f"{root} is too long for Dovecot's socket paths; use instance_root()")
    root.mkdir(parents=True, exist_ok=True)
    _check_reachable(root)
    mail = root / "mail"
    mail.mkdir(exist_ok=True)
    if _IS_ROOT:
        os.chown(mail, ident.mail_uid, ident.mail_gid)


def _write_readable_by_auth(path: Path, text: str, ident: _Identity) -> None:
    """A file Dovecot's auth process (internal user/group) can read, but not everybody."""
    path.write_text(text)
    path.chmod(0o640)
    if _IS_ROOT:
        os.chown(path, -1, ident.internal_gid)


def old_server(
    root: Path, users: dict[str, str], tls: TLSFiles | None = None, courier_style: bool = False,
    masters: dict[str, str] | None = None,
) -> DovecotInstance:
    """Configure (not start) the old IMAP/POP3 server with `users` (address -> password).

    `courier_style`: the namespace of Courier and Cyrus ("INBOX." prefix, "." separator,
    Maildir++, no SPECIAL-USE) instead of Dovecot's own. `masters`: administrators (name ->
    password) who may log in as any user (Dovecot master users).
    """
    ident = _Identity.for_current_user()
    _prepare_root(root, ident)
    users_file = root / "users"
    users_file.write_text("".join(f"{a}:{{PLAIN}}{p}\n" for a, p in users.items()),
                          encoding="utf-8")  # Dovecot compares a password's UTF-8 bytes
    masters_file = None
    if masters is not None:
        masters_file = root / "masters"
        _write_readable_by_auth(masters_file, "".join(
            f"{name}:{{PLAIN}}{password}\n" for name, password in masters.items()), ident)
    inst = _make_instance(root, "old", users_file, tls)
    config = _base_config(inst, ident, courier_style) + _old_server_config(
        inst, ident, courier_style, masters_file)
    inst.config_path.write_text(config + _old_lmtp_config(inst.lmtp_port))
    return inst


@contextlib.contextmanager
def running_old_server(users: dict[str, str], prefix: str = "mp-old-"
                       ) -> Iterator[DovecotInstance]:
    """An old server in a directory of its own, running for the block, then removed."""
    root = instance_root(prefix)
    try:
        with old_server(root, users) as instance:
            yield instance
    finally:
        remove_root(root)


def _prepare_provisioned_dir(path: Path, ident: _Identity) -> None:
    """Make the proxy's future files readable by Dovecot's auth process, as in production.

    The proxy writes each file 0640 and replaces it atomically, so a chmod of today's files
    would not last. Instead the directory gets the setgid bit and the auth process's group,
    which every new directory and file below it inherits (the documented
    `install -d -g dovecot -m 2750`).
    """
    path.mkdir(parents=True, exist_ok=True)
    if _IS_ROOT:
        os.chown(path, -1, ident.internal_gid)
        path.chmod(path.stat().st_mode & 0o7777 | 0o2750)


def new_store(
    root: Path,
    provisioned_users: Path,
    master_user: str = "proxy-master",
    master_password: str | None = None,
    tls: TLSFiles | None = None,
    single_file: bool = False,
    dsync: bool = False,
) -> DovecotInstance:
    """Configure (not start) the new store from deploy/dovecot/migrating-proxy.conf.

    `provisioned_users` is the directory where the proxy's provisioning (`passwd-dir`) writes one
    `user:{SCHEME}hash` file per account; it is created if missing. With `single_file` it is
    the one passwd-file `passwd-file` provisioning writes (its directory is created), which the
    passdb then reads, as the snippet's comment explains. `master_password` defaults to a
    random one. `dsync`: with deploy/dovecot/migrating-proxy-dsync.conf too (read
    before the store's own userdb, as the snippet asks), its API key and entry directory
    below root.
    """
    ident = _Identity.for_current_user()
    _prepare_root(root, ident)
    provisioned_users.parent.mkdir(parents=True, exist_ok=True)
    _check_reachable(provisioned_users.parent)
    _prepare_provisioned_dir(provisioned_users.parent if single_file else provisioned_users,
                             ident)
    password = master_password or secrets.token_urlsafe(16)
    masters = root / "masters"
    # {PLAIN} overrides the snippet's default scheme, as a {SCHEME} prefix always does.
    _write_readable_by_auth(masters, f"{master_user}:{{PLAIN}}{password}\n", ident)

    inst = _make_instance(root, "new", provisioned_users, tls, master_user, password)
    conf_d = root / "conf.d"
    conf_d.mkdir(exist_ok=True)
    snippet = conf_d / "migrating-proxy.conf"
    ports = {"imap": inst.imap_port, "pop3": inst.pop3_port, "lmtp": inst.lmtp_port,
             "imaps": inst.imaps_port or 0, "pop3s": inst.pop3s_port or 0}
    per_account = {f"{SNIPPET_USERS_PATH}/%Ld/%Ln": str(provisioned_users)} if single_file else {}
    snippet.write_text(render_snippet({
        SNIPPET_MASTERS_PATH: str(masters),
        **per_account,  # before the directory itself: the passdb reads the one file
        SNIPPET_USERS_PATH: str(provisioned_users),
        SNIPPET_MAIL_ROOT: str(root / "mail"),
        # As root the mail belongs to nobody (no vmail user needed on a test machine).
        SNIPPET_MAIL_OWNER: f"uid={ident.mail_uid} gid={ident.mail_gid}",
    }, ports))
    before = _configure_dsync(inst, ident, conf_d) if dsync else ""
    inst.config_path.write_text(before + _base_config(inst, ident) + f"\n!include {snippet}\n")
    return inst


def _configure_dsync(inst: DovecotInstance, ident: _Identity, conf_d: Path) -> str:
    """Write the dsync snippet, its key and entry directory; the line that includes it."""
    inst.doveadm_port = free_port()
    inst.doveadm_key_file = inst.root / "doveadm-key"
    inst.doveadm_key_file.write_text(secrets.token_hex(16))
    inst.doveadm_key_file.chmod(0o600)
    inst.dsync_users = inst.root / "dsync-users"
    _prepare_provisioned_dir(inst.dsync_users, ident)
    snippet = conf_d / "05-migrating-proxy-dsync.conf"
    snippet.write_text(render_dsync_snippet(inst.doveadm_key_file, inst.dsync_users,
                                            inst.doveadm_port))
    return f"!include {snippet}\n"


SQL_PASSDB = REPO_ROOT / "deploy" / "dovecot" / "auth-sql-migrating-proxy.conf.ext"
SQL_CONNECT = REPO_ROOT / "deploy" / "dovecot" / "dovecot-sql-migrating-proxy.conf.ext"
_SQL_CONNECT_LINE = re.compile(r"^connect = .*$", re.MULTILINE)


def use_sql_passdb(store: DovecotInstance, connect: str) -> None:
    """Switch a configured new store to the SQL passdb as the README says for several machines:
    the snippet's passwd-file passdb replaced by `!include auth-sql-migrating-proxy.conf.ext`,
    the checked-in files with only the paths and the `connect` line changed."""
    ident = _Identity.for_current_user()
    conf_d = store.root / "conf.d"
    sql_conf = store.root / "dovecot-sql-migrating-proxy.conf.ext"
    text, count = _SQL_CONNECT_LINE.subn(f"connect = {connect}", SQL_CONNECT.read_text())
    if count != 1:
        raise ValueError(f"{SQL_CONNECT}: expected one `connect =` line")
    _write_readable_by_auth(sql_conf, text, ident)
    passdb = SQL_PASSDB.read_text().replace(
        "/etc/dovecot/dovecot-sql-migrating-proxy.conf.ext", str(sql_conf))
    (conf_d / SQL_PASSDB.name).write_text(passdb)
    snippet = conf_d / "migrating-proxy.conf"
    users_passdb = re.compile(r"passdb \{\n  driver = passwd-file\n  args = [^\n]*"
                              + re.escape(str(store.users_file)) + r"[^\n]*\n(?:  [^\n]*\n)*\}\n")
    text, count = users_passdb.subn(
        f"!include {conf_d / SQL_PASSDB.name}\n", snippet.read_text())
    if count != 1:
        raise ValueError(f"{SNIPPET}: expected one passwd-file passdb for the provisioned users")
    snippet.write_text(text)


def remove_root(root: Path) -> None:
    """Delete an instance directory (after stop())."""
    shutil.rmtree(root, ignore_errors=True)
