"""Copy workers: processes that take jobs from the database queue and run the copy engine.

`migrating-proxy worker` runs a pool of them on its own (several machines can share one
PostgreSQL queue); `serve` starts one pool beside the front-ends. Copies never run in the
process that serves logins, so they cannot stall it.

SIGTERM or SIGINT: each worker stops at the next batch boundary and hands its job back to the
queue; the next worker to claim it resumes where it stopped, copying nothing twice.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import threading
from dataclasses import dataclass

import structlog

from migrating_proxy import logs
from migrating_proxy.config import Config
from migrating_proxy.migration import CopyResult, run_copy
from migrating_proxy.onboarding import Onboarding, source_spec, store_spec
from migrating_proxy.store import Account, Store, open_store
from migrating_proxy.store.jobs import Job

log = structlog.get_logger(__name__)

POLL_SECONDS = 0.5  # how soon an idle worker notices a first login's job
HEARTBEAT_SECONDS = 10.0
MAX_RETRY_DELAY = 3600.0


def retry_delay(attempts: int) -> float:
    """30 s, 1 min, 2 min ... up to an hour: an old server that is down gets breathing room."""
    return min(30.0 * 2 ** max(attempts - 1, 0), MAX_RETRY_DELAY)


@dataclass
class CopyWorker:
    config: Config
    store: Store
    onboarding: Onboarding
    name: str
    stop: threading.Event

    def run(self) -> None:
        log.info("worker_started", worker=self.name)
        while not self.stop.is_set():
            if not self.run_one():
                self.stop.wait(POLL_SECONDS)
        log.info("worker_stopped", worker=self.name)

    def run_one(self) -> bool:
        """Claim and run one job; False when the queue had nothing runnable."""
        job = self.store.jobs.claim(self.name, self.config.migration.max_connections_per_host)
        if job is None:
            return False
        account = self.store.accounts.get_account_by_id(job.account_id)
        if account is None:  # removed meanwhile; the job row went with it
            return True
        structlog.contextvars.bind_contextvars(address=account.address, job=job.id)
        try:
            self.execute(job, account)
        except Exception as exc:  # the store or database failed outside the copy: retry later
            log.exception("job_failed_unexpectedly", error=type(exc).__name__)
            self.store.jobs.retry_later(job.id, f"{type(exc).__name__}: {exc}",
                                        retry_delay(job.attempts))
        finally:
            structlog.contextvars.clear_contextvars()
        return True

    def execute(self, job: Job, account: Account) -> None:
        domain = self.store.accounts.get_domain(account.domain)
        password = self.onboarding.vault.get(account.id)
        if domain is None or password is None:
            reason = "no stored password; the next login of the user will start the copy"
            self._end(job, account, "failed", "ERROR", reason)
            return
        self.onboarding.finish_onboarding(account, password)
        self.store.accounts.set_migration_state(account.address, "PENDING")
        paused = threading.Event()
        beating = _Heartbeat(self, job.id, paused)
        beating.start()
        try:
            result = run_copy(
                self.store.engine, account.id,
                source_spec(domain, account, account.address, password),
                store_spec(self.config, account.address),
                should_stop=lambda: self.stop.is_set() or paused.is_set(),
                timeout=self.config.migration.source_timeout * 3,
            )
        finally:
            beating.done.set()
        self._settle(job, account, result, paused.is_set())

    def _settle(self, job: Job, account: Account, result: CopyResult, paused: bool) -> None:
        if result.state == "completed":
            self._end(job, account, "done", "COMPLETED", None)
            self.onboarding.vault.erase(account.id)  # no longer needed: never keep it longer
        elif result.state == "stopped":
            self.store.jobs.release(job.id, paused=paused)
        elif result.error_kind == "auth":
            self._end(job, account, "failed", "ERROR", result.error)
            self.onboarding.vault.erase(account.id)  # a password the old server refuses
        elif job.attempts >= self.config.migration.max_attempts:
            self._end(job, account, "failed", "ERROR", result.error)
        else:
            delay = retry_delay(job.attempts)
            self.store.jobs.retry_later(job.id, result.error or "copy failed", delay)
            log.warning("copy_retry_scheduled", error=result.error, delay=delay,
                        attempt=job.attempts)

    def _end(self, job: Job, account: Account, job_state: str, account_state: str,
             error: str | None) -> None:
        self.store.jobs.finish(job.id, job_state, error)
        self.store.accounts.set_migration_state(account.address, account_state)
        log.info("migration_pass_ended", state=account_state, error=error)


class _Heartbeat(threading.Thread):
    """Keeps the job's heartbeat fresh and notices an admin's pause."""

    def __init__(self, worker: CopyWorker, job_id: int, paused: threading.Event) -> None:
        super().__init__(daemon=True, name=f"heartbeat-{job_id}")
        self.worker, self.job_id, self.paused = worker, job_id, paused
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(HEARTBEAT_SECONDS):
            try:
                if self.worker.store.jobs.heartbeat(self.job_id) == "paused":
                    self.paused.set()
            except Exception as exc:  # a database hiccup must not kill the copy
                log.warning("heartbeat_failed", error=type(exc).__name__)


def worker_main(config: Config, name: str) -> None:
    """Entry point of one worker process."""
    logs.configure(config.log.format, config.log.level)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    from migrating_proxy.server import build_onboarding

    store = open_store(config.database_url)
    try:
        CopyWorker(config, store, build_onboarding(config, store), name, stop).run()
    finally:
        store.close()


def run_pool(config: Config, processes: int) -> int:
    """Run `processes` workers until SIGTERM/SIGINT; returns an exit code."""
    context = multiprocessing.get_context("spawn")  # no inherited sockets, threads or engines
    prefix = f"{socket.gethostname()}:{os.getpid()}"
    children = [
        context.Process(target=worker_main, args=(config, f"{prefix}:{n}"), name=f"worker-{n}")
        for n in range(processes)
    ]
    stopping = threading.Event()

    def forward(signum: int, _frame: object) -> None:
        stopping.set()
        for child in children:
            if child.pid and child.is_alive():
                os.kill(child.pid, signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    for child in children:
        child.start()
    for child in children:
        child.join()
    return 0 if all(child.exitcode == 0 for child in children) or stopping.is_set() else 1
