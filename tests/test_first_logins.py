"""A burst of first logins never fails, whatever the provisioning kind (issue 8, item 1).

Monday morning: many users of a migrating domain log in for the first time within a second.
Each first login provisions the store's user database moments before the proxy logs in there
as the master user. With `provision.kind = "passwd-file"` (the default) Dovecot re-reads the
changed file at most once a second, so it may not know the account yet and refuse; the proxy
knows it just provisioned the account and must make the session succeed anyway. Real Dovecot
old server and store, the real `serve`, 20 different users at once per protocol and kind.
"""

from __future__ import annotations

import poplib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from imapclient import IMAPClient
from imapclient.exceptions import LoginError

from tests.support import dovecot
from tests.support.dovecot import DovecotInstance
from tests.support.proxy import Proxy

BURST = 20
KINDS = ("passwd-file", "passwd-dir")
USERS = {f"{protocol}{n}.{kind}@old.example": f"pw-{protocol}-{n}-{kind}"
         for kind in KINDS for protocol in ("imap", "pop") for n in range(BURST)}


@pytest.fixture(scope="module")
def old() -> Iterator[DovecotInstance]:
    root = dovecot.instance_root("mp-burst-old-")
    try:
        with dovecot.old_server(root, dict(USERS)) as instance:
            yield instance
    finally:
        dovecot.remove_root(root)


@pytest.fixture(params=KINDS)
def proxy(request: pytest.FixtureRequest, tmp_path: Path,
          old: DovecotInstance) -> Iterator[tuple[str, Proxy]]:
    kind = request.param
    root = dovecot.instance_root("mp-burst-new-")
    users = root / "provisioned" / "dovecot-users"
    try:
        with dovecot.new_store(root, users, single_file=kind == "passwd-file") as store:
            proxy = Proxy(tmp_path / "proxy", store, overrides={
                "provision": {"kind": kind, "path": str(users)},
                "limits": {"max_failures_per_peer": 0, "max_failures_per_account": 0}})
            proxy.cli("domain", "add", "old.example", "--source",
                      f"imap://127.0.0.1:{old.imap_port}", "--no-notice")
            with proxy:
                yield kind, proxy
    finally:
        dovecot.remove_root(root)


def at_once(work: Callable[[str, str], object], users: list[str]) -> list[str]:
    """Run work(user, password) for every user in its own thread, all released together;
    the outcome of each, "ok" or what went wrong."""
    start = threading.Barrier(len(users))
    outcomes: dict[str, str] = {}

    def one(user: str) -> None:
        start.wait()
        try:
            work(user, USERS[user])
            outcomes[user] = "ok"
        except Exception as exc:  # collected: every failure is reported, not just the first
            outcomes[user] = f"{type(exc).__name__}: {exc}"

    threads = [threading.Thread(target=one, args=(user,)) for user in users]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [outcomes[user] for user in users]


def imap_session(port: int) -> Callable[[str, str], object]:
    def work(user: str, password: str) -> object:
        client = IMAPClient("127.0.0.1", port, ssl=False, timeout=30)
        client.login(user, password)
        selected = client.select_folder("INBOX")  # a working session at the store
        client.logout()
        return selected

    return work


def pop3_session(port: int) -> Callable[[str, str], object]:
    def work(user: str, password: str) -> object:
        client = poplib.POP3("127.0.0.1", port, timeout=30)
        client.user(user)
        client.pass_(password)
        stat = client.stat()
        client.quit()
        return stat

    return work


def test_a_burst_of_first_logins_all_succeed(proxy: tuple[str, Proxy]) -> None:
    kind, running = proxy
    for protocol, session in (("imap", imap_session(running.imap_port)),
                              ("pop", pop3_session(running.pop3_port))):
        users = [user for user in USERS if user.startswith(protocol) and f".{kind}@" in user]
        outcomes = at_once(session, users)
        assert outcomes == ["ok"] * BURST, \
            [*[o for o in outcomes if o != "ok"][:3], running.log_text()[-2000:]]
        status = {row["address"]: row["state"] for row in running.status(*users)}
        assert status == dict.fromkeys(users, "PENDING")  # migrating, every one of them
    if kind == "passwd-dir":
        a_refusal_for_anyone_else_is_final(running)


def a_refusal_for_anyone_else_is_final(proxy: Proxy) -> None:
    """Only a just-provisioned account's store login is tried again: an account the store
    has lost (its entry removed behind the proxy's back) is refused at once, as before."""
    proxy.add_account("carol@new.example", "carol-pw")
    (proxy.store.users_file / "new.example" / "carol").unlink()
    retried = proxy.log_text().count("upstream_login_retried")
    client = IMAPClient("127.0.0.1", proxy.imap_port, ssl=False, timeout=30)
    with pytest.raises(LoginError, match=r"\[UNAVAILABLE\]"):
        client.login("carol@new.example", "carol-pw")
    log = proxy.wait_for_log("store refused login")
    assert log.count("upstream_login_retried") == retried
