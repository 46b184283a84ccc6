"""A working demo stack on this machine: old server, new store and the proxy in front.

    scripts/demo                              # bootstrap, then run until Ctrl-C
    .venv/bin/python scripts/demo.py --once   # up, instructions, check a login, down, exit 0

Everything the proxy uses (configuration, database, log) is under ./demo/ (git-ignored); the two
Dovecot instances live in short directories under /tmp because of Dovecot's socket paths.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from imapclient import IMAPClient  # noqa: E402

from tests.support import dovecot, processes  # noqa: E402
from tests.support.mail import sample_corpus, seed_mailbox  # noqa: E402
from tests.support.proxy import render_toml  # noqa: E402

OLD_USERS = {"alice@old.example": "alice-pw", "bob@old.example": "bob-pw"}
LOCAL_USER, LOCAL_PASSWORD = "carol@new.example", "carol-pw"
PREFERRED_PORTS = {"imap": 1143, "pop3": 1110}


@dataclass
class Stack:
    directory: Path
    old: dovecot.DovecotInstance | None = None
    new: dovecot.DovecotInstance | None = None
    proxy: subprocess.Popen[bytes] | None = None
    fixed_ports: bool = True  # 1143/1110 when free; else (and with --once) any free port
    ports: dict[str, int] = field(default_factory=dict)
    roots: list[Path] = field(default_factory=list)

    @property
    def config_path(self) -> Path:
        return self.directory / "migrating-proxy.toml"

    @property
    def log_path(self) -> Path:
        return self.directory / "proxy.log"


def say(text: str) -> None:
    print(f"demo: {text}", flush=True)


def port_or_free(preferred: int) -> int:
    try:
        dovecot.wait_for_port(dovecot.HOST, preferred, timeout=0)
    except TimeoutError:
        return preferred  # nothing answers there: take it
    return dovecot.free_port()


# --- bringing it up -------------------------------------------------------------------------


def start_old_server(stack: Stack) -> None:
    root = dovecot.instance_root("mp-demo-old-")
    stack.roots.append(root)
    stack.old = dovecot.old_server(root, OLD_USERS)
    stack.old.start()
    for address, password in OLD_USERS.items():
        seed_mailbox(dovecot.HOST, stack.old.imap_port, address, password, sample_corpus())
    say(f"old server up (IMAP {stack.old.imap_port}, POP3 {stack.old.pop3_port}), "
        f"mailboxes of {', '.join(OLD_USERS)} seeded")


def start_new_store(stack: Stack) -> None:
    root = dovecot.instance_root("mp-demo-new-")
    stack.roots.append(root)
    stack.new = dovecot.new_store(root, root / "provisioned" / "dovecot-users")
    stack.new.start()
    say(f"new store up (IMAP {stack.new.imap_port}, POP3 {stack.new.pop3_port})")


def write_config(stack: Stack) -> None:
    new = stack.new
    assert new is not None and new.master_user and new.master_password
    secret = stack.directory / "master-password"
    secret.write_text(new.master_password + "\n")
    secret.chmod(0o600)
    stack.ports = {name: port_or_free(port) if stack.fixed_ports else dovecot.free_port()
                   for name, port in PREFERRED_PORTS.items()}
    stack.config_path.write_text(render_toml({
        "listen": {name: f"127.0.0.1:{port}" for name, port in stack.ports.items()},
        "database": {"url": "sqlite:///proxy.db"},
        "backend": {"imap": f"imap://127.0.0.1:{new.imap_port}",
                    "pop3": f"pop3://127.0.0.1:{new.pop3_port}",
                    "master_user": new.master_user, "master_password_file": "master-password"},
        "provision": {"kind": "passwd-dir", "path": str(new.users_file)},
        "log": {"format": "json", "level": "info"},
    }))


def cli(stack: Stack, *args: str, input: str | None = None) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "migrating_proxy", "--config", str(stack.config_path), *args],
        input=input, capture_output=True, text=True, timeout=120,
    )
    if result.returncode != 0:
        raise RuntimeError(f"migrating-proxy {' '.join(args)} failed: {result.stderr.strip()}")


def set_up_proxy(stack: Stack) -> None:
    assert stack.old is not None
    write_config(stack)
    source = f"imap://127.0.0.1:{stack.old.imap_port}"
    cli(stack, "domain", "add", "old.example", "--source", source)
    cli(stack, "account", "add", LOCAL_USER, input=LOCAL_PASSWORD + "\n")
    say(f"domain old.example registered; local account {LOCAL_USER} created")


def start_proxy(stack: Stack) -> None:
    with stack.log_path.open("ab") as log:
        stack.proxy = subprocess.Popen(
            [sys.executable, "-m", "migrating_proxy", "--config", str(stack.config_path),
             "serve"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    deadline = time.monotonic() + 30
    while '"event": "started"' not in stack.log_path.read_text(errors="replace"):
        if stack.proxy.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the proxy did not start; see {stack.log_path}")
        time.sleep(0.05)
    say(f"proxy up (IMAP {stack.ports['imap']}, POP3 {stack.ports['pop3']}), log {stack.log_path}")


# --- telling and checking -------------------------------------------------------------------


def commands(stack: Stack) -> dict[str, list[str]]:
    """What the instructions tell a visitor to run, by purpose; `--once` runs each of them."""
    imap, pop3 = stack.ports["imap"], stack.ports["pop3"]
    alice, alice_pw = next(iter(OLD_USERS.items()))
    return {
        "local_imap": ["curl", "-s", "--user", f"{LOCAL_USER}:{LOCAL_PASSWORD}",
                       f"imap://127.0.0.1:{imap}/INBOX", "-X", "EXAMINE INBOX"],
        "local_pop3": ["curl", "-s", "--user", f"{LOCAL_USER}:{LOCAL_PASSWORD}",
                       f"pop3://127.0.0.1:{pop3}/"],
        "first_login": ["curl", "-s", "--user", f"{alice}:{alice_pw}",
                        f"imap://127.0.0.1:{imap}/", "-X", 'LIST "" "*"'],
        "status": [str(REPO / ".venv" / "bin" / "migrating-proxy"), "--config",
                   str(stack.config_path), "status"],
    }


def instructions(stack: Stack) -> str:
    imap, pop3 = stack.ports["imap"], stack.ports["pop3"]
    old = ", ".join(f"{a} / {p}" for a, p in OLD_USERS.items())
    run = {name: shlex.join(command) for name, command in commands(stack).items()}
    return f"""
================ migrating-proxy demo ================
Proxy:  IMAP 127.0.0.1:{imap}   POP3 127.0.0.1:{pop3}   (plain text, no TLS in the demo)
        or point any mail client at these ports.

Log in as the local account:  {LOCAL_USER} / {LOCAL_PASSWORD}
  {run["local_imap"]}
  {run["local_pop3"]}

Users still on the old server (IMAP 127.0.0.1:{stack.old.imap_port if stack.old else '?'}):
  {old}
  Their domain, old.example, is migrating: the first login through the proxy checks the
  password at the old server, creates the account and copies the mailbox to the new store
  in the background while the session goes on. Try:
  {run["first_login"]}
  then watch the copy:
  {run["status"]}

Proxy log: {stack.log_path}
=======================================================
"""


def check_login(stack: Stack) -> None:
    with IMAPClient("127.0.0.1", stack.ports["imap"], ssl=False, timeout=15) as client:
        client.login(LOCAL_USER, LOCAL_PASSWORD)
        client.select_folder("INBOX")
        client.logout()
    say(f"checked: {LOCAL_USER} logged in through the proxy")


def check_instructions(stack: Stack) -> None:
    """Every command the instructions print must work as printed."""
    for name, command in commands(stack).items():
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"{shlex.join(command)} failed ({result.returncode}): "
                               f"{result.stderr.strip()}")
        say(f"checked: {name} command works as printed")


# --- tearing it down ------------------------------------------------------------------------


def stop(stack: Stack) -> None:
    if stack.proxy is not None and stack.proxy.poll() is None:
        stack.proxy.send_signal(signal.SIGTERM)
        try:
            stack.proxy.wait(timeout=20)
        except subprocess.TimeoutExpired:
            stack.proxy.kill()
            stack.proxy.wait()
    for instance in (stack.new, stack.old):
        if instance is not None:
            instance.stop()
    for root in stack.roots:
        dovecot.remove_root(root)


@contextlib.contextmanager
def running(directory: Path, fixed_ports: bool) -> Iterator[Stack]:
    shutil.rmtree(directory, ignore_errors=True)  # every run starts from scratch
    directory.mkdir(parents=True)
    stack = Stack(directory, fixed_ports=fixed_ports)
    try:
        start_old_server(stack)
        start_new_store(stack)
        set_up_proxy(stack)
        start_proxy(stack)
        yield stack
    finally:
        # A second Ctrl-C must not cut the tear-down short and leave servers running.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        say("stopping")
        stop(stack)
        end_leftovers()
        say("stopped")


def end_leftovers() -> None:
    """Whatever is still running below us: a process started just as a stop signal came in
    (before the stack recorded it), or one its parent left behind when killed. As a
    subreaper, the demo is where such orphans end up."""
    if left := processes.wait_for_descendants(grace=5.0):
        say(f"stopping {len(left)} leftover process(es)")
        processes.kill_descendants()


def interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM like Ctrl-C: `running` tears down what is up


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--once", action="store_true",
                        help="bring everything up, check a login, stop and exit")
    parser.add_argument("--dir", type=Path, default=REPO / "demo",
                        help="where the proxy's files go (default: ./demo)")
    args = parser.parse_args(argv)
    # From here on a stop signal at any moment tears down what was started, and nothing
    # started can outlive the demo unnoticed.
    signal.signal(signal.SIGTERM, interrupt)
    with contextlib.suppress(OSError):
        processes.become_subreaper()
    with running(args.dir.resolve(), fixed_ports=not args.once) as stack:
        print(instructions(stack), flush=True)
        if args.once:
            check_login(stack)
            check_instructions(stack)
        else:
            say("running; press Ctrl-C to stop")
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    signal.pause()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
    except RuntimeError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        sys.exit(1)
