"""The README's deployment, performed as written, inside a private mount and network namespace.

Run by tests/test_deploy.py as

    unshare --mount --net --propagation private --fork -- python -m tests.support.deploy_driver WORK

as root. Overlays on /etc, /opt, /usr and /var (upper layers below WORK) and a tmpfs on /run
give the steps a Debian 12 machine of their own: `adduser`, `install`, the venv in /opt, the
units in /etc/systemd/system all land in WORK, and the machine itself is left as it was. The
network namespace has only its own loopback, so the ports are exactly those the README and the
snippet name (143, 110, 10143, 10110, 24) and collide with nothing.

What differs from an operator's machine, and nothing else:
- the distribution's Dovecot certificate (Debian's postinst links the snakeoil one, which this
  machine lacks) is a test certificate at the stock path /etc/dovecot/private/dovecot.pem;
- /etc/dovecot/local.conf (which the stock dovecot.conf includes) sets `log_path`, as there is
  no syslog here: a path;
- pip installs from the wheels scripts/bootstrap downloaded (PIP_NO_INDEX, PIP_FIND_LINKS), as
  there is no network here;
- the old server is a test instance on a loopback port (`domain add --source`).

The steps, each recorded in WORK/report.json for the test to judge: the README's install block,
`systemd-analyze verify` of both units, Dovecot started from the stock configuration, the
units' ExecStart run as their User= with their capabilities, the admin commands as printed,
a first login through the proxy, the copy, a later direct login at Dovecot, a stop.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from imapclient import IMAPClient

from tests.support import dovecot
from tests.support.mail import sample_corpus, seed_mailbox, snapshot_folders
from tests.support.tls import make_test_ca

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
UNITS = ("migrating-proxy.service", "migrating-proxy-worker.service")
OVERLAID = ("etc", "opt", "usr", "var")
DEBIAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ALICE, ALICE_PW = "alice@old.example", "alice-pw"
INSTALL_MARKER = "<!-- tests/test_deploy.py runs the next block"


def readme_install_block() -> str:
    """The fenced block that follows the marker comment in README.md."""
    text = README.read_text()
    after = text[text.index(INSTALL_MARKER):]
    match = re.search(r"```sh\n(.*?)```", after, re.S)
    assert match is not None, "no ```sh block after the marker"
    return match.group(1)


def unit_settings(path: Path) -> dict[str, str]:
    """[Service] settings of a unit file (one value per key, continuation lines joined)."""
    settings: dict[str, str] = {}
    section = ""
    for line in path.read_text().replace("\\\n", " ").splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    return settings


# ProtectSystem=strict, ReadWritePaths=, PrivateTmp=yes and ProtectHome=yes, the way systemd
# makes them: in a mount namespace of the service's own, every mount read-only but the paths it
# may write, a private /tmp, empty /root and /home. Run as root, then exec's the rest.
SANDBOX = r"""
set -eu
mount --make-rprivate /
findmnt -rn -o TARGET | while read -r target; do
    case "$target" in /proc*|/sys*|/dev*) continue ;; esac
    mount -o remount,bind,ro "$target"
done
for path in $READ_WRITE_PATHS; do
    mount --bind "$path" "$path"
    mount -o remount,bind,rw "$path"
done
mount -t tmpfs -o mode=1777 tmpfs /tmp
for path in /root /home; do mount -t tmpfs -o mode=0 tmpfs "$path"; done
exec "$@"
"""


def sandbox(unit: dict[str, str]) -> list[str]:
    """The command prefix that reproduces the unit's file-system sandbox (see SANDBOX)."""
    expected = {"ProtectSystem": "strict", "PrivateTmp": "yes", "ProtectHome": "yes"}
    for key, value in expected.items():
        assert unit.get(key) == value, f"{key}={unit.get(key)}: the driver reproduces {value}"
    return ["env", f"READ_WRITE_PATHS={unit.get('ReadWritePaths', '')}", "unshare", "--mount",
            "--propagation", "private", "--", "sh", "-c", SANDBOX, "sandbox"]


def unit_command(path: Path) -> list[str]:
    """ExecStart as written, run as the unit's User=/Group= with its umask, capabilities and
    file-system sandbox.

    systemd sets the user's supplementary groups, the umask, the capability bounding set and
    the ambient capabilities, and no_new_privs; setpriv does the same here. ProtectSystem=,
    ReadWritePaths=, PrivateTmp= and ProtectHome= are reproduced with a mount namespace; the
    other hardening directives (system call filter, address families, ...) are not.
    """
    unit = unit_settings(path)
    caps = [c.strip().lower().removeprefix("cap_") for c in
            unit.get("AmbientCapabilities", "").split() if c.strip()]
    bounding = [c.strip().lower().removeprefix("cap_") for c in
                unit.get("CapabilityBoundingSet", "").split() if c.strip()]
    kept = ",".join(["-all", *(f"+{c}" for c in bounding)])
    setpriv = ["setpriv", f"--reuid={unit['User']}", f"--regid={unit['Group']}",
               "--init-groups", f"--bounding-set={kept}"]
    if caps:
        wanted = ",".join(f"+{c}" for c in caps)
        setpriv += [f"--inh-caps=-all,{wanted}", f"--ambient-caps={wanted}"]
    if unit.get("NoNewPrivileges") == "yes":
        setpriv.append("--no-new-privs")
    umask = unit.get("UMask", "0022")
    return [*sandbox(unit), "sh", "-c", f'umask {umask} && exec "$@"', "sh", *setpriv, "--",
            *shlex.split(unit["ExecStart"])]


class Driver:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.report: dict[str, Any] = {"steps": []}
        self.processes: list[subprocess.Popen[bytes]] = []
        self.old: dovecot.DovecotInstance | None = None
        self.env = {**os.environ, "PATH": DEBIAN_PATH, "PIP_NO_INDEX": "1",
                    "PIP_FIND_LINKS": str(REPO / ".venv" / "wheelhouse"),
                    "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        self.env.pop("MIGRATING_PROXY_CONFIG", None)
        self.env.pop("VIRTUAL_ENV", None)

    # -- recording ------------------------------------------------------------------------
    def note(self, name: str, **facts: Any) -> None:
        self.report["steps"].append({"step": name, **facts})
        (self.work / "report.json").write_text(json.dumps(self.report, indent=2))

    def run(self, name: str, command: list[str] | str, *, cwd: Path | str = "/",
            input: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        shell = isinstance(command, str)
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", command] if shell else command,
            cwd=cwd, env=self.env, input=input, capture_output=True, text=True,
            timeout=timeout)
        self.note(name, command=command if shell else shlex.join(command),
                  status=result.returncode, stdout=result.stdout[-4000:],
                  stderr=result.stderr[-4000:])
        if result.returncode != 0:
            raise RuntimeError(f"{name} failed")
        return result

    # -- the machine -----------------------------------------------------------------------
    def private_machine(self) -> None:
        for name in OVERLAID:
            upper, scratch = self.work / "overlay" / name, self.work / "overlay" / f"{name}.work"
            upper.mkdir(parents=True)
            scratch.mkdir(parents=True)
            subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                            f"lowerdir=/{name},upperdir={upper},workdir={scratch}", f"/{name}"],
                           check=True)
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/run"], check=True)
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        # What Debian's postinst leaves, and a log file instead of syslog (see the docstring).
        tls = make_test_ca(self.work / "tls")
        private = Path("/etc/dovecot/private")
        private.mkdir(mode=0o700, exist_ok=True)
        (private / "dovecot.pem").write_bytes(tls.cert.read_bytes())
        (private / "dovecot.key").write_bytes(tls.key.read_bytes())
        (private / "dovecot.key").chmod(0o600)
        Path("/etc/dovecot/local.conf").write_text("log_path = /var/log/dovecot.log\n")
        self.note("machine", overlays=list(OVERLAID))

    def checkout(self) -> Path:
        """The repository's files as an operator's clone has them (no .venv, no build)."""
        target = self.work / "checkout"
        files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                                "--exclude-standard"], cwd=REPO, capture_output=True,
                               check=True).stdout.decode().split("\0")
        for name in filter(None, files):
            source = REPO / name
            if source.is_file():
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                (target / name).write_bytes(source.read_bytes())
                (target / name).chmod(source.stat().st_mode & 0o777)
        return target

    # -- the steps -------------------------------------------------------------------------
    def install(self) -> None:
        self.run("install", readme_install_block(), cwd=self.checkout())
        facts = {"documentation": Path("/usr/share/doc/migrating-proxy/README.md").is_file()}
        for path in ("/etc/migrating-proxy/master-password", "/etc/dovecot/migrating-proxy-masters",
                     "/etc/migrating-proxy/migrating-proxy.toml", "/var/lib/migrating-proxy",
                     "/var/lib/migrating-proxy/dovecot-users", "/var/vmail"):
            st = os.stat(path)
            facts[path] = [_user(st.st_uid), _group(st.st_gid), oct(st.st_mode & 0o7777)]
        self.note("installed", **facts)

    def verify_units(self) -> None:
        for unit in UNITS:
            self.run(f"verify {unit}", ["systemd-analyze", "verify",
                                        f"/etc/systemd/system/{unit}"])

    def start_dovecot(self) -> None:
        self.start("dovecot", ["dovecot", "-F"])
        for port, banner in ((10143, b"* OK"), (10110, b"+OK"), (24, b"220 ")):
            self.wait_for_banner("dovecot", port, banner)
        listening = subprocess.run(["ss", "-Hltn"], capture_output=True, text=True).stdout
        self.note("dovecot listens", sockets=sorted({line.split()[3] for line in
                                                    listening.splitlines()}))

    def start_old_server(self) -> None:
        root = dovecot.instance_root("mp-deploy-old-")
        self.old = dovecot.old_server(root, {ALICE: ALICE_PW})
        self.old.start()
        seed_mailbox("127.0.0.1", self.old.imap_port, ALICE, ALICE_PW, sample_corpus())

    def start_unit(self, unit: str) -> subprocess.Popen[bytes]:
        command = unit_command(Path("/etc/systemd/system") / unit)
        self.note(f"ExecStart of {unit}", command=shlex.join(command))
        return self.start(unit, command)

    def admin(self) -> None:
        assert self.old is not None
        migrating_proxy = "migrating-proxy"  # on PATH: the README's symlink in /usr/local/bin
        self.run("domain add", [migrating_proxy, "domain", "add", "old.example", "--source",
                                f"imap://127.0.0.1:{self.old.imap_port}"])
        self.run("status", [migrating_proxy, "status"])

    def migrate(self) -> None:
        assert self.old is not None
        with IMAPClient("127.0.0.1", 143, ssl=False, timeout=30) as client:
            client.login(ALICE, ALICE_PW)  # the first login, through the proxy
            client.select_folder("INBOX")
        deadline = time.monotonic() + 120
        while True:
            result = self.run("status --json", ["migrating-proxy", "status", ALICE, "--json"])
            [row] = json.loads(result.stdout)
            if row["state"] in ("COMPLETED", "ERROR") or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        old = _snapshot(self.old.imap_port, ALICE, ALICE_PW)
        with IMAPClient("127.0.0.1", 10143, ssl=False, timeout=30) as direct:
            direct.login(ALICE, ALICE_PW)  # later: straight at Dovecot, the proxy retired
            new = snapshot_folders(direct)
        # The notice: "is moving" (immediate cutover) or "has moved" (passthrough, the default).
        notices = (b"Subject: Your mailbox is moving", b"Subject: Your mailbox has moved")
        new["INBOX"] = [m for m in new.get("INBOX", [])
                        if not any(notice in m[0] for notice in notices)]
        self.note("migrated", state=row["state"], last_error=row["last_error"],
                  same_mail=new == old, folders=sorted(old),
                  messages=sum(len(v) for v in old.values()))
        for port, banner in ((110, b"+OK"),):
            self.wait_for_banner("proxy", port, banner)
        self.run("status --domain", ["migrating-proxy", "status", "--domain", "old.example"])

    def serve_by_hand(self) -> None:
        """`migrating-proxy serve` started by root, as an operator might try it."""
        serve = self.start("serve by hand", ["migrating-proxy", "serve"])
        self.wait_for_log("serve by hand", '"event": "started"')
        with IMAPClient("127.0.0.1", 143, ssl=False, timeout=30) as client:
            client.login(ALICE, ALICE_PW)  # a later login: written to the database
            client.select_folder("INBOX")
        uids = Path(f"/proc/{serve.pid}/status").read_text().split("Uid:")[1].split()[:2]
        self.note("serve by hand runs as", users=[_user(int(uid)) for uid in uids])
        self.stop("serve by hand", serve)

    def ownership(self) -> None:
        owners = {}
        for root in ("/var/lib/migrating-proxy", "/var/vmail"):
            for path in [Path(root), *Path(root).rglob("*")]:
                owners[str(path)] = _user(path.lstat().st_uid)
        self.note("owners", owners=owners)

    def stop(self, name: str, process: subprocess.Popen[bytes]) -> None:
        process.send_signal(signal.SIGTERM)
        try:
            status = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            status = None
        self.note(f"stop {name}", status=status)

    # -- processes -------------------------------------------------------------------------
    def start(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        log = (self.work / f"{name}.log").open("ab")
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                   env=self.env, cwd="/")
        log.close()
        self.processes.append(process)
        return process

    def wait_for_banner(self, name: str, port: int, banner: bytes, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not dovecot._greets("127.0.0.1", port, banner):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: nothing greets on port {port}")
            time.sleep(0.1)

    def wait_for_log(self, name: str, needle: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while needle not in (self.work / f"{name}.log").read_text(errors="replace"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: no {needle!r} in its log")
            time.sleep(0.1)

    def tear_down(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=30)
        if self.old is not None:
            self.old.stop()
            dovecot.remove_root(self.old.root)
        for name in ("dovecot", *UNITS):
            with contextlib.suppress(OSError):
                self.report[f"{name} log"] = (self.work / f"{name}.log").read_text()[-6000:]
        with contextlib.suppress(OSError):
            self.report["dovecot.log"] = Path("/var/log/dovecot.log").read_text()[-6000:]
        (self.work / "report.json").write_text(json.dumps(self.report, indent=2))

    def main(self) -> int:
        try:
            self.private_machine()
            self.install()
            self.verify_units()
            self.start_dovecot()
            self.start_old_server()
            serve = self.start_unit("migrating-proxy.service")
            self.wait_for_log("migrating-proxy.service", '"event": "started"')
            self.wait_for_banner("proxy", 143, b"* OK")
            worker = self.start_unit("migrating-proxy-worker.service")
            self.wait_for_log("migrating-proxy-worker.service", '"event": "worker_started"')
            self.admin()
            self.migrate()
            self.stop("migrating-proxy-worker.service", worker)
            self.stop("migrating-proxy.service", serve)
            self.serve_by_hand()
            self.ownership()
            self.report["completed"] = True
        except Exception:
            self.report["error"] = traceback.format_exc()
        finally:
            self.tear_down()
        return 0


def _snapshot(port: int, address: str, password: str) -> dict[str, Any]:
    with IMAPClient("127.0.0.1", port, ssl=False, timeout=30) as client:
        client.login(address, password)
        return snapshot_folders(client)


def _user(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group(gid: int) -> str:
    import grp

    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


if __name__ == "__main__":
    sys.exit(Driver(Path(sys.argv[1])).main())
