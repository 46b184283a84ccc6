"""The copy job queue and the credential vault, on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select, update

from migrating_proxy.store import Store
from migrating_proxy.store.accounts import now
from migrating_proxy.store.jobs import PRESTAGE
from migrating_proxy.store.pacing import HostPacer
from migrating_proxy.store.schema import jobs, vault
from migrating_proxy.store.vault import Vault, VaultKeyError, load_or_create_key

PASSWORD = "Vault-Secret-9f3a"


def account(store: Store, address: str) -> int:
    return store.accounts.add_account(address, "$6$x", migration_state="PENDING").id


# -- the queue -----------------------------------------------------------------------------------
def test_one_active_job_per_account(store: Store) -> None:
    alice = account(store, "alice@old.example")
    first = store.jobs.enqueue(alice, "incremental", "old-host")
    assert store.jobs.enqueue(alice, "incremental", "old-host") == first
    assert store.jobs.enqueue(alice, "full", "old-host") == first  # upgraded, not stacked
    claimed = store.jobs.claim("w1", max_per_host=4)
    assert claimed is not None and claimed.id == first and claimed.kind == "full"
    assert store.jobs.enqueue(alice, "incremental", "old-host") == first  # running counts too
    store.lifecycle.pass_completed(first, alice)
    assert store.jobs.enqueue(alice, "incremental", "old-host") != first


def test_claims_respect_the_per_host_cap_and_put_first_logins_first(store: Store) -> None:
    ids = {n: account(store, f"u{n}@old.example") for n in range(4)}
    store.jobs.enqueue(ids[0], "incremental", "busy-host")
    store.jobs.enqueue(ids[1], "full", "busy-host")
    store.jobs.enqueue(ids[2], "full", "busy-host")
    store.jobs.enqueue(ids[3], "incremental", "other-host")
    first = store.jobs.claim("w1", max_per_host=2)
    second = store.jobs.claim("w2", max_per_host=2)
    assert first and second and {first.account_id, second.account_id} == {ids[1], ids[2]}
    third = store.jobs.claim("w3", max_per_host=2)  # busy-host is full: the other host's job
    assert third is not None and third.account_id == ids[3]
    assert store.jobs.claim("w4", max_per_host=2) is None
    store.lifecycle.pass_completed(first.id, first.account_id)
    fourth = store.jobs.claim("w4", max_per_host=2)
    assert fourth is not None and fourth.account_id == ids[0]


def test_pre_stage_passes_come_last_and_a_login_takes_one_over(store: Store) -> None:
    """Pre-stage passes (issue 13) yield to every other pass; a first login during one makes
    it a full pass, and the account stays PENDING after a pre-stage pass completes."""
    pre, login, resync = (account(store, f"{n}@old.example") for n in ("pre", "login", "sync"))
    pre_job = store.jobs.enqueue(pre, PRESTAGE, "host")
    store.jobs.enqueue(resync, "incremental", "host")
    store.jobs.enqueue(login, "full", "host")
    order = [store.jobs.claim(f"w{n}", max_per_host=0) for n in range(3)]
    assert [job.account_id for job in order if job] == [login, resync, pre]
    assert store.jobs.enqueue(pre, "incremental", "host") == pre_job
    assert store.jobs.kind_of(pre_job) == "incremental"  # taken over
    assert store.jobs.enqueue(pre, PRESTAGE, "host") == pre_job
    assert store.jobs.kind_of(pre_job) == "incremental"  # never back
    store.lifecycle.prestaged(pre_job, pre)
    assert store.accounts.get_account_by_id(pre).migration_state == "PENDING"


def test_pre_stage_slots_of_one_host_never_overlap(store: Store) -> None:
    """The pacing budget is shared through the database: whoever reserves, the slots of one
    host follow each other at the rate (a clock that stands still: no timing here)."""
    clock = [1000.0]
    pacers = [HostPacer(store.engine, "old-host", 1000, clock=lambda: clock[0])
              for _ in range(2)]
    assert pacers[0].reserve(500) == (999.0, 999.5)  # a second's credit to start with
    assert pacers[1].reserve(2000) == (999.5, 1001.5)  # another worker: after the first
    assert pacers[0].reserve(500) == (1001.5, 1002.0)  # in the future: it waits
    assert HostPacer(store.engine, "other-host", 1000, clock=lambda: clock[0]).reserve(
        1000) == (999.0, 1000.0)  # every host has its own budget
    clock[0] = 2000.0  # idle for a while: no more than a second of credit saved up
    assert pacers[0].reserve(100) == (1999.0, 1999.1)
    assert pacers[0].batch_bytes(8 << 20) == 64 * 1024  # about a second's worth, not less
    assert HostPacer(store.engine, "h", 0).read(10**9, lambda: "now") == "now"  # unlimited


def test_retry_later_and_release(store: Store) -> None:
    alice = account(store, "alice@old.example")
    job_id = store.jobs.enqueue(alice, "full", "h")
    claimed = store.jobs.claim("w1", 4)
    assert claimed is not None
    store.jobs.retry_later(job_id, "old server down", delay=3600)
    assert store.jobs.claim("w1", 4) is None  # not before its time
    with store.engine.begin() as conn:
        conn.execute(update(jobs).values(not_before=now()))
    again = store.jobs.claim("w1", 4)
    assert again is not None and again.attempts == 2 and again.last_error == "old server down"
    store.jobs.release(job_id, paused=True)
    assert store.jobs.claim("w1", 4) is None  # paused jobs wait for an admin
    assert store.jobs.active_job(alice).state == "paused"  # type: ignore[union-attr]


def test_dead_and_silent_workers_lose_their_jobs(store: Store) -> None:
    alice, bob = account(store, "alice@old.example"), account(store, "bob@old.example")
    store.jobs.enqueue(alice, "full", "h")
    store.jobs.enqueue(bob, "full", "h")
    dead = store.jobs.claim("thishost:111:0", 4)
    silent = store.jobs.claim("otherhost:222:0", 4)
    assert dead and silent
    assert store.jobs.requeue_dead_claims("thishost", alive=lambda pid: pid != 111) == 1
    recovered = store.jobs.claim("thishost:333:0", 4)
    assert recovered is not None and recovered.id == dead.id
    with store.engine.begin() as conn:  # the other machine's worker stopped heart-beating
        conn.execute(update(jobs).where(jobs.c.id == silent.id)
                     .values(heartbeat_at=now().replace(year=2000)))
    taken_over = store.jobs.claim("thishost:333:1", 4)
    assert taken_over is not None and taken_over.id == silent.id


CLAIMER = """
import sys
from migrating_proxy.store import open_store
store = open_store(sys.argv[1])
claimed = []
while (job := store.jobs.claim(sys.argv[2], max_per_host=0)) is not None:
    claimed.append(job.id)
print(" ".join(map(str, claimed)))
"""


def test_concurrent_workers_never_claim_the_same_job(store: Store, store_url: str) -> None:
    for n in range(30):
        store.jobs.enqueue(account(store, f"u{n}@old.example"), "full", "h")
    workers = [subprocess.Popen([sys.executable, "-c", CLAIMER, store_url, f"w{n}"],
                                stdout=subprocess.PIPE, text=True) for n in range(3)]
    claimed = [int(x) for w in workers for x in w.communicate(timeout=60)[0].split()]
    assert sorted(claimed) == sorted(set(claimed)) and len(claimed) == 30


# -- the vault -----------------------------------------------------------------------------------
def test_vault_encrypts_at_rest_and_erases(store: Store, tmp_path: Path) -> None:
    key_path = tmp_path / "keys" / "vault.key"
    secrets = Vault(store.engine, load_or_create_key(key_path))
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    alice = account(store, "alice@old.example")
    secrets.put(alice, PASSWORD)
    with store.engine.connect() as conn:
        stored = conn.execute(select(vault.c.ciphertext)).scalar_one()
    assert PASSWORD.encode() not in stored
    assert secrets.get(alice) == PASSWORD and secrets.matches(alice, PASSWORD)
    assert not secrets.matches(alice, PASSWORD + "x")
    secrets.put(alice, "changed")  # a later login's password replaces it
    assert secrets.get(alice) == "changed"
    # Another process with the same key file reads it; another key cannot.
    assert Vault(store.engine, load_or_create_key(key_path)).get(alice) == "changed"
    assert Vault(store.engine, load_or_create_key(tmp_path / "other.key")).get(alice) is None
    secrets.erase(alice)
    assert secrets.get(alice) is None


def test_vault_key_file_that_is_not_a_key(tmp_path: Path) -> None:
    bad = tmp_path / "vault.key"
    bad.write_text("not a key\n")
    with pytest.raises(VaultKeyError, match="not a vault key"):
        load_or_create_key(bad)
