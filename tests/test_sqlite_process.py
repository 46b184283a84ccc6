"""`serve`'s SQLite in a helper process (store/sqlite_process.py): the store behaves exactly as
with SQLite in the process, and a helper that dies (SIGBUS on a storage fault) costs the
statements in flight, never the caller, and is replaced.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import structlog
from sqlalchemy import insert
from sqlalchemy.exc import OperationalError

from migrating_proxy.store import Domain, Store, open_store, sqlite_process
from migrating_proxy.store.schema import accounts
from migrating_proxy.store.status import migration_status
from migrating_proxy.store.vault import Vault

KEY = b"x" * 32


@pytest.fixture
def isolated(tmp_path: Path) -> Iterator[Store]:
    store = open_store(f"sqlite:///{tmp_path / 'isolated.db'}", lock_timeout=2,
                       isolate_sqlite=True)
    yield store
    store.close()


def scenario(store: Store) -> list[Any]:
    """Every kind of statement the store makes, and what each returned."""
    vault = Vault(store.engine, base64.urlsafe_b64encode(KEY))
    seen: list[Any] = []
    store.accounts.add_domain(Domain(name="old.example", source_url="imap://old.example"))
    for n in range(3):
        account_id = store.lifecycle.first_login(f"user{n}@old.example", "$6$h", "old.example")
        vault.put(account_id, f"pässword {n}\0bytes")  # blobs, non-ASCII, NUL
    seen.append([dataclasses.replace(a, created_at=None) for a in store.accounts.list_accounts()])
    seen.append([vault.get(n) for n in (1, 2, 3, 99)])
    job = store.jobs.claim("worker-1", 4)
    assert job is not None
    store.lifecycle.pass_completed(job.id, job.account_id)
    seen.append((job.account_id, job.kind, store.jobs.state_of(job.id)))
    store.accounts.set_last_logins({"user1@old.example": datetime(2026, 1, 1, tzinfo=UTC)})
    seen.append(store.accounts.get_account("user1@old.example").last_login_at)  # type: ignore[union-attr]
    store.accounts.remove_account("user2@old.example")
    seen.append([(row["address"], row["state"], row["job_state"])
                 for row in migration_status(store.engine)])
    return seen


def test_the_store_behaves_the_same_with_sqlite_in_a_helper(tmp_path: Path,
                                                          isolated: Store) -> None:
    direct = open_store(f"sqlite:///{tmp_path / 'direct.db'}")
    try:
        assert scenario(isolated) == scenario(direct)
    finally:
        direct.close()


def kill_helper(store: Store, signum: signal.Signals = signal.SIGBUS) -> int:
    helper = store.sqlite_process
    assert helper is not None and helper._process is not None
    pid = helper._process.pid
    assert pid is not None
    os.kill(pid, signum)
    helper._process.join(5)
    return pid


def eventually(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_a_helper_killed_by_sigbus_fails_the_statement_and_is_replaced(isolated: Store) -> None:
    isolated.accounts.add_account("alice@example.com", "$6$h")
    with structlog.testing.capture_logs() as logged:
        old_pid = kill_helper(isolated)
        with pytest.raises(OperationalError):
            isolated.accounts.get_account("alice@example.com")
        account = eventually(lambda: isolated.accounts.get_account("alice@example.com"))
    assert account is not None and account.address == "alice@example.com"
    assert isolated.sqlite_process is not None and isolated.sqlite_process._process is not None
    assert isolated.sqlite_process._process.pid != old_pid
    died = [entry for entry in logged if entry["event"] == "database_process_died"]
    assert len(died) == 1 and "SIGBUS" in died[0]["reason"]


def test_a_transaction_cut_short_by_the_helpers_death_leaves_nothing(isolated: Store) -> None:
    with pytest.raises(OperationalError), isolated.engine.begin() as conn:
        conn.execute(insert(accounts).values(
            address="half@example.com", address_key="half@example.com", domain="example.com",
            password_hash="", created_at=datetime.now(UTC), updated_at=datetime.now(UTC)))
        kill_helper(isolated)
    assert eventually(lambda: isolated.accounts.get_account("half@example.com")) is None


def test_after_a_death_statements_fail_at_once_until_the_restart_delay(
        isolated: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """While the fault lasts, a new helper would die on its first write too: no restart storm."""
    monkeypatch.setattr(sqlite_process, "RESTART_DELAY", 60.0)
    kill_helper(isolated)
    for _ in range(3):
        with pytest.raises(OperationalError, match="died"):
            isolated.accounts.list_domains()
    assert isolated.sqlite_process is not None and isolated.sqlite_process._process is None


def test_the_helper_ends_with_its_parent(tmp_path: Path) -> None:
    program = (
        "import sys, time\n"
        "from migrating_proxy.store import open_store\n"
        "if __name__ == '__main__':\n"
        f"    store = open_store('sqlite:///{tmp_path / 'p.db'}', isolate_sqlite=True)\n"
        "    print(store.sqlite_process._process.pid, flush=True)\n"
        "    time.sleep(60)\n"
    )
    script = tmp_path / "parent.py"
    script.write_text(program)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    helper = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{helper}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{helper}").exists()
