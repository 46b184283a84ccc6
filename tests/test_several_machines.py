"""Several machines on one PostgreSQL database: two `serve` processes, one `worker`, and a new
store whose Dovecot reads the accounts from that database (provision.kind = "none", the SQL
passdb of deploy/dovecot/ on the `dovecot_users` view), so no file is shared between machines.

Everything is real: PostgreSQL at 127.0.0.1:5432, Dovecot with its pgsql driver, the proxy and
the worker as subprocesses through their CLI, imapclient and poplib as clients.
"""

from __future__ import annotations

import imaplib
import json
import poplib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from imapclient import IMAPClient

from tests.support import dovecot
from tests.support.dovecot import DovecotInstance
from tests.support.mail import sample_corpus, seed_mailbox
from tests.support.postgres import scratch_database
from tests.support.proxy import ALL_LOGS, Proxy

ALICE, ALICE_PW = "alice@old.example", "alice-pw"
BOB, BOB_PW = "bob@old.example", "bob-pw"


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    """A PostgreSQL database of this module's own, dropped at the end."""
    with scratch_database("mp_machines_") as name:
        yield name


@pytest.fixture
def sql_store(database: str) -> Iterator[DovecotInstance]:
    """The new store, configured from deploy/dovecot/ with the SQL passdb on `database`."""
    root = dovecot.instance_root("mp-sql-")
    try:
        store = dovecot.new_store(root, root / "unused-provisioning-dir")
        dovecot.use_sql_passdb(
            store, f"host=127.0.0.1 port=5432 dbname={database} user=postgres")
        with store:
            yield store
    finally:
        dovecot.remove_root(root)


def machine(directory: Path, store: DovecotInstance, database: str, key: Path) -> Proxy:
    """One proxy machine's configuration: the shared database and vault key, no files to
    provision, no copy workers of its own (the `worker` machine copies)."""
    return Proxy(directory, store, overrides={
        "database": {"url": f"postgresql://postgres@127.0.0.1:5432/{database}"},
        "provision": {"kind": "none"},
        "migration": {"workers": 0, "vault_key_file": str(key)},
    })


@pytest.fixture
def worker(tmp_path: Path, sql_store: DovecotInstance, database: str) -> Iterator[Proxy]:
    """The worker machine: `migrating-proxy worker` with its own configuration file."""
    config = machine(tmp_path / "worker", sql_store, database, tmp_path / "vault.key")
    log = open(config.log_path, "ab")  # noqa: SIM115 - handed to the child process
    process = subprocess.Popen(
        [sys.executable, "-m", "migrating_proxy", "--config", str(config.config_path),
         "worker", "--processes", "2"], stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    log.close()
    try:
        yield config
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0


def store_login(store: DovecotInstance, address: str, password: str) -> bool:
    """A direct login at the store with the user's own password."""
    client = imaplib.IMAP4("127.0.0.1", store.imap_port)
    try:
        client.login(address, password)
    except imaplib.IMAP4.error:
        return False
    finally:
        client.shutdown()
    return True


def messages_by_master_login(store: DovecotInstance, address: str) -> int:
    """What the proxy does for every session: the master user logs in as the user."""
    client = IMAPClient("127.0.0.1", store.imap_port, ssl=False)
    assert store.master_user and store.master_password
    client.plain_login(store.master_user, store.master_password, authorization_identity=address)
    total = sum(client.folder_status(name, ["MESSAGES"])[b"MESSAGES"]
                for _flags, _delim, name in client.list_folders()
                if b"\\Noselect" not in _flags)
    client.logout()
    return total


def test_two_proxies_and_a_worker_on_one_database_with_dovecot_reading_it(
        tmp_path: Path, database: str, sql_store: DovecotInstance,
        old_server: DovecotInstance, worker: Proxy) -> None:
    seeded = seed_mailbox("127.0.0.1", old_server.imap_port, ALICE, ALICE_PW, sample_corpus())
    seed_mailbox("127.0.0.1", old_server.imap_port, BOB, BOB_PW, {"INBOX": []})
    key = tmp_path / "vault.key"
    first = machine(tmp_path / "proxy-a", sql_store, database, key)
    second = machine(tmp_path / "proxy-b", sql_store, database, key)
    first.cli("domain", "add", "old.example", "--source",
              f"imap://127.0.0.1:{old_server.imap_port}")
    with first, second:
        # First logins, one on each proxy: each session is relayed to the store at once (the
        # store found the account, still without its hash, through the view).
        with IMAPClient("127.0.0.1", first.imap_port, ssl=False) as client:
            client.login(ALICE, ALICE_PW)
            assert client.select_folder("INBOX")[b"EXISTS"] >= 0
        pop = poplib.POP3("127.0.0.1", second.pop3_port, timeout=10)
        pop.user(BOB)
        pop.pass_(BOB_PW)
        pop.stat()
        pop.quit()

        # The worker machine copies both mailboxes; the store serves them by master login.
        assert worker.wait_for_state(ALICE)["state"] == "COMPLETED"
        assert worker.wait_for_state(BOB)["state"] == "COMPLETED"
        assert messages_by_master_login(sql_store, ALICE) == sum(seeded.values()) + 1  # notice
        assert messages_by_master_login(sql_store, BOB) == 1  # the notice only

        # Dovecot reads each hash from the database: the users' own passwords work there.
        assert store_login(sql_store, ALICE, ALICE_PW)
        assert not store_login(sql_store, ALICE, "wrong")

        # A password change on one machine is seen by the store at once, no file written.
        second.cli("account", "passwd", ALICE, input="alice-new-pw\n")
        assert store_login(sql_store, ALICE, "alice-new-pw")
        assert not store_login(sql_store, ALICE, ALICE_PW)
        with IMAPClient("127.0.0.1", first.imap_port, ssl=False) as client:
            client.login(ALICE, "alice-new-pw")
            client.select_folder("INBOX")

        report = json.loads(first.cli("finish", "old.example", "--yes", "--json").stdout)
        assert sorted(report["migrated"]) == [ALICE, BOB], report
        assert report["errors"] == [] and report["migrating"] is False
        # After the cut-over the accounts are plain local ones, still read from the database.
        assert store_login(sql_store, ALICE, "alice-new-pw")
        with IMAPClient("127.0.0.1", second.imap_port, ssl=False) as client:
            client.login(BOB, BOB_PW)
    assert not sql_store.users_file.exists() or not any(sql_store.users_file.iterdir())
    assert "driver = sql" in subprocess.run(
        ["doveconf", "-c", str(sql_store.config_path), "-n", "passdb"],
        capture_output=True, text=True, check=True).stdout
    ALL_LOGS.append(sql_store.log_path)
