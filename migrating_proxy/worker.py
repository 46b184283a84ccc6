"""Copy workers: processes that take jobs from the database queue and run the copy engine.

`migrating-proxy worker` runs a pool of them on its own (several machines can share one
PostgreSQL queue); `serve` starts one pool beside the front-ends. Copies never run in the
process that serves logins, so they cannot stall it.

SIGTERM or SIGINT: each worker stops at the next batch boundary and hands its job back to the
queue; the next worker to claim it resumes where it stopped, copying nothing twice.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from multiprocessing import resource_tracker
from pathlib import Path

import structlog

from migrating_proxy import lifeline, logs
from migrating_proxy.config import Config
from migrating_proxy.migration import CopyProgress, CopyResult, run_copy
from migrating_proxy.migration.connections import SourceAdmin, SourceAuthError, SourceSpec
from migrating_proxy.migration.dsync import DSYNC, IMAP, DsyncEngine, Fallback, engine_for
from migrating_proxy.migration.pop3_uidls import Pop3Continuity
from migrating_proxy.onboarding import Onboarding
from migrating_proxy.specs import source_spec, store_spec
from migrating_proxy.store import (
    Account,
    AccountState,
    Domain,
    JobState,
    RowGone,
    Store,
    open_store,
)
from migrating_proxy.store.accounts import PASSTHROUGH
from migrating_proxy.store.copystate import CopyState
from migrating_proxy.store.jobs import PRESTAGE, Job
from migrating_proxy.store.pacing import HostPacer
from migrating_proxy.store.pop3uidls import KEPT, Pop3Uidls
from migrating_proxy.switch import MirrorPass, OldServerSessions, Switch

log = structlog.get_logger(__name__)

POLL_SECONDS = 0.5  # how soon an idle worker notices a first login's job
HEARTBEAT_SECONDS = 10.0
PAUSE_CHECK_SECONDS = 1.0  # how soon a running copy notices `migrating-proxy stop`
MAX_RETRY_DELAY = 3600.0
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


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
    _dsync: DsyncEngine | str | None = None  # built on first use; a str: why it cannot be

    def dsync(self) -> DsyncEngine | str:
        """The dsync engine of this worker, or why there is none (a readable reason)."""
        if self._dsync is None:
            self._dsync = engine_for(self.config)
        return self._dsync

    def run(self) -> None:
        log.info("worker_started", worker=self.name)
        while not self.stop.is_set():
            if not self.run_one():
                self.stop.wait(POLL_SECONDS)
        log.info("worker_stopped", worker=self.name)

    def run_one(self) -> bool:
        """Claim and run one job; False when the queue had nothing runnable."""
        migration = self.config.migration
        # The cap is on connections to one old server; each copy holds one per lane.
        per_host = max(1, migration.max_connections_per_host // max(1, migration.parallel_folders))
        job = self.store.jobs.claim(self.name, per_host)
        if job is None:
            return False
        account = self.store.accounts.get_account_by_id(job.account_id)
        if account is None:  # removed meanwhile; the job row went with it
            return True
        structlog.contextvars.bind_contextvars(address=account.address, job=job.id)
        try:
            self.execute(job, account)
        except RowGone:  # `account remove` while the pass ran: its job went with it
            log.info("migration_pass_dropped", reason="account removed")
        except Exception as exc:  # the store or database failed outside the copy: retry later
            log.exception("job_failed_unexpectedly", error=type(exc).__name__)
            with contextlib.suppress(RowGone):
                self.store.jobs.retry_later(job.id, f"{type(exc).__name__}: {exc}",
                                            retry_delay(job.attempts))
        finally:
            structlog.contextvars.clear_contextvars()
        return True

    def execute(self, job: Job, account: Account) -> None:
        domain = self.store.accounts.get_domain(account.domain)
        password = self.onboarding.vault.get(account.id)
        admin = self.onboarding.source_admin(domain) if domain is not None else None
        if domain is None or (password is None and admin is None):
            reason = "no stored password; the next login of the user will start the copy"
            self._failed(job, reason)
            return
        prestage = job.kind == PRESTAGE
        if not prestage:  # nothing of the user's own before the user has logged in
            self.onboarding.finish_onboarding(account, password)
        beating = _Heartbeat(self, job)
        beating.start()
        try:
            passes = _Passes(self, domain, account, password, beating.interrupted, admin,
                             self._pacing(job, beating) if prestage else None)
            started = time.monotonic()
            # Before its user's first login nobody uses the store's copy, in either mode: a
            # pre-stage pass follows the old server exactly (expunges, flags, renames too).
            result = passes.make(mirror=account.served_by_old_server or prestage)(None)
            if result.state == "completed" and self.store.jobs.state_of(job.id) == \
                    JobState.PAUSED:
                # Paused while the last batch ran (the heartbeat had not seen it yet): no
                # switch now; hand the job back paused, as `stop` promised.
                result = replace(result, state="stopped")
            # The user may have logged in meanwhile: the pass is then theirs (jobs.enqueue).
            if prestage and self.store.jobs.kind_of(job.id) != PRESTAGE:
                prestage = False
                self.onboarding.finish_onboarding(account, password)  # immediate: the notice
            if result.state == "completed" and account.served_by_old_server and not prestage:
                self._switch(job, account, passes, result, time.monotonic() - started)
                return
        finally:
            beating.done.set()
        self._settle(job, account, result, prestage=prestage, by_admin=admin is not None)

    def _pacing(self, job: Job, beating: _Heartbeat) -> HostPacer | None:
        """Pre-stage passes read at `migration.prestage_rate` per old host, all workers
        together, until a user's login makes the pass theirs."""
        rate = self.config.migration.prestage_rate
        if not rate:
            return None
        return HostPacer(self.store.engine, job.source_host, rate,
                         active=lambda: not beating.taken_over.is_set(),
                         stopping=beating.interrupted)

    def _switch(self, job: Job, account: Account, passes: _Passes, copy: CopyResult,
                copy_seconds: float) -> None:
        """The copy is complete: switch the account to the store (switch.py)."""
        switch = Switch(self.store.cutover, account.id, account.address,
                        passes.make(mirror=True), self.config.migration.switch_hold,
                        OldServerSessions(self.store).close, final_pass=passes.final())
        outcome = switch.run(copy, copy_seconds)
        if outcome.state in ("switched", "gone"):
            switched = self.store.accounts.get_account_by_id(account.id) or account
            state = CopyState(self.store.engine, account.id)
            if outcome.state == "switched":
                state.write_progress(uids_kept=state.copy_engine() == DSYNC)
                if state.copy_engine() == DSYNC and passes.pop3_source() is not None:
                    # The store keeps them itself: pop3_migration fails a backup whose
                    # messages it cannot match, so a switched account has every one.
                    Pop3Uidls(self.store.engine).set_summary(account.id, KEPT)
            # Mail still on its way to the old server when the final pass read its folder
            # (an ordinary pass: the store is the user's mailbox now).
            late = passes.make(mirror=False)(None)
            self.onboarding.owed_after_switch(switched)
            if late.state == "error":  # switched all the same; `resync` or `finish` collects it
                log.warning("switch_late_pass_failed", error=late.error)
            self._settle(job, switched, late if late.state == "stopped" else outcome.result)
        elif outcome.state == "released" and not passes.interrupted() and \
                self.store.jobs.state_of(job.id) != JobState.PAUSED:
            delay = retry_delay(job.attempts)
            reason = (f"switch postponed: the final pass did not fit in the "
                      f"{self.config.migration.switch_hold:g} s hold")
            self.store.jobs.retry_later(job.id, reason, delay)
            log.warning("switch_retry_scheduled", delay=delay, attempt=job.attempts)
        elif outcome.state == "released":  # an admin's pause (the flip refuses one too) or a
            # shutdown: hand it back as the row says
            self.store.jobs.release(job.id)
        else:
            self._settle(job, account, outcome.result)

    def _settle(self, job: Job, account: Account, result: CopyResult, *,
                prestage: bool = False, by_admin: bool = False) -> None:
        if result.state == "completed" and prestage:
            # Pre-staged: PENDING until the user's first login (and the switch) completes it.
            if self.store.lifecycle.prestaged(job.id, job.account_id):
                log.info("migration_pass_ended", state=AccountState.PENDING, error=None,
                         prestaged=True)
        elif result.state == "completed":
            if not self.store.lifecycle.pass_completed(job.id, job.account_id):
                # Paused by an admin after the last batch began: it stays paused until
                # `start`, whose pass finds nothing left and completes (store/states.py).
                log.info("migration_pass_paused", reason="paused as it completed")
                return
            log.info("migration_pass_ended", state=AccountState.COMPLETED, error=None)
            if not self.config.migration.keep_credentials:
                self.onboarding.vault.erase(account.id)  # not needed now: never keep it longer
        elif result.state == "stopped":
            # The job row says whether an admin still wants it paused (they may have run
            # `start` while this copy was winding down), so hand it back as the row says.
            self.store.jobs.release(job.id)
        elif result.error_kind == "auth":
            self._failed(job, result.error)
            if not by_admin:  # the admin was refused, not the user's password
                self.onboarding.vault.erase(account.id)  # a password the old server refuses
        elif result.error_kind == "folders" or job.attempts >= self.config.migration.max_attempts:
            # Folders the servers refuse stay refused: say so now instead of retrying for hours.
            # The password stays for a resync once the admin has fixed the folder.
            self._failed(job, result.error)
        else:
            delay = retry_delay(job.attempts)
            self.store.jobs.retry_later(job.id, result.error or "copy failed", delay)
            log.warning("copy_retry_scheduled", error=result.error, delay=delay,
                        attempt=job.attempts)

    def _failed(self, job: Job, error: str | None) -> None:
        self.store.lifecycle.pass_failed(job.id, job.account_id, error)
        log.info("migration_pass_ended", state=AccountState.ERROR, error=error)


@dataclass
class _Passes:
    """Copy passes of one account, each stopping at a batch boundary when the worker is
    interrupted (shutdown, an admin's pause) or past its deadline."""

    worker: CopyWorker
    domain: Domain
    account: Account
    password: str | None  # None: not known (pre-staged); the admin copies
    interrupted: Callable[[], bool]
    admin: SourceAdmin | None = None  # the old server's admin: the imap engine logs in so
    pacing: HostPacer | None = None  # pre-stage passes only

    def make(self, *, mirror: bool) -> MirrorPass:
        """A mirror pass while the old server serves the account, else an ordinary one; each
        by the account's engine (migration/dsync.py)."""
        imap_pass = self._imap_pass(mirror=mirror)
        engine = self._engine()
        if engine == DSYNC and not mirror:
            # After the switch the store copy is the user's mailbox, kept exact by the final
            # backup (mail for the account waited for the switch, then went to the store);
            # neither engine may copy into it again: the imap engine has no records of dsync's
            # messages and would duplicate them all.
            return lambda _deadline: CopyResult("completed", CopyProgress())
        if engine != DSYNC:
            return imap_pass
        return self._dsync_pass(imap_pass)

    def final(self) -> MirrorPass:
        """The switch's final pass: the mirror pass, then (imap engine, an old server that
        offers POP3) the old POP3 UIDLs kept for the relay (migration/pop3_uidls.py); a
        failure to read them fails the pass, so the switch waits rather than make every POP3
        client download the mailbox again."""
        mirror = self.make(mirror=True)
        pop3 = self.pop3_source()
        if pop3 is None or self._engine() == DSYNC:
            return mirror
        continuity = self._continuity(pop3)
        continuity.prepare()  # the slow part (headers) before the hold, not inside it

        def run(deadline: float | None) -> CopyResult:
            result = mirror(deadline)
            if result.state != "completed":
                return result
            try:
                continuity.keep()
            except SourceAuthError as exc:  # no POP3 client of the user has UIDLs to keep
                log.info("pop3_uidls_not_read", reason=str(exc)[:300])
            except Exception as exc:  # the old server's POP3 or the store: switch later
                error = f"POP3 UIDLs not read: {type(exc).__name__}: {exc}"[:500]
                return CopyResult("error", result.progress, error, error_kind="unavailable")
            return result

        return run

    def pop3_source(self) -> SourceSpec | None:
        """The old server's POP3 service (an IMAP source's POP3 sibling, or the source)."""
        domain = self.domain
        if domain.pop3_source_url is None and not domain.source_url.startswith("pop3"):
            return None
        return source_spec(domain, self.account, self.account.address, self.password, "pop3")

    def _continuity(self, pop3: SourceSpec) -> Pop3Continuity:
        config, address = self.worker.config, self.account.address
        store_pop3 = replace(store_spec(config, address), host=config.backend.pop3.host,
                             port=config.backend.pop3.port, tls=config.backend.pop3.tls)
        return Pop3Continuity(CopyState(self.worker.store.engine, self.account.id), pop3,
                              store_spec(config, address), store_pop3,
                              config.migration.source_timeout)

    def _engine(self) -> str:
        """dsync for a passthrough domain that asks for it, until the account fell back."""
        wanted = self.domain.engine or self.worker.config.migration.engine
        if wanted != DSYNC or self.domain.cutover != PASSTHROUGH or self.password is None:
            return IMAP  # dsync's imapc needs the user's own password
        recorded = CopyState(self.worker.store.engine, self.account.id).copy_engine()
        if recorded is None and not self.account.served_by_old_server:
            return IMAP  # switched (or served by the store) before dsync ever ran
        return recorded or DSYNC

    def _dsync_pass(self, imap_pass: MirrorPass) -> MirrorPass:
        account, domain = self.account, self.domain
        assert self.password is not None  # see _engine
        imap = source_spec(domain, account, account.address, self.password)
        pop3 = source_spec(domain, account, account.address, self.password, "pop3") \
            if domain.pop3_source_url else None

        def run(deadline: float | None) -> CopyResult:
            engine = self.worker.dsync()
            if isinstance(engine, str):
                return CopyResult("error", CopyProgress(), engine, error_kind="store")
            result = engine.run_pass(self.worker.store.engine, account.id, account.address,
                                     imap, pop3, deadline=deadline)
            return imap_pass(deadline) if isinstance(result, Fallback) else result

        return run

    def _imap_pass(self, *, mirror: bool) -> MirrorPass:
        config, account = self.worker.config, self.account
        # Through the admin when there is one: it stays valid whatever the user does with
        # their password at the old server.
        source = source_spec(self.domain, account, account.address, self.password or "",
                             admin=self.admin)
        store = store_spec(config, account.address)

        def run(deadline: float | None) -> CopyResult:
            # status says which engine copied the account (dsync records its own; the imap
            # engine's accounts showed null, "before the first pass", for ever).
            CopyState(self.worker.store.engine, account.id).record_engine(IMAP)
            return run_copy(
                self.worker.store.engine, account.id, source, store,
                should_stop=lambda: self.interrupted() or (
                    deadline is not None and time.monotonic() > deadline),
                timeout=config.migration.source_timeout * 3,
                parallel_folders=max(1, config.migration.parallel_folders), mirror=mirror,
                pacing=self.pacing,
            )

        return run


class _Heartbeat(threading.Thread):
    """Keeps the job's heartbeat fresh and notices an admin's pause.

    The pause check is a one-row read every PAUSE_CHECK_SECONDS, so `migrating-proxy stop`
    takes effect within about a second; the heartbeat write (which takes the database's write
    lock on SQLite) stays at HEARTBEAT_SECONDS. A pre-stage pass also notices a user's login
    taking it over (`taken_over`: no more pacing) and yields to on-login passes that wait for
    a worker (it stops at its next batch and goes back to the queue, behind them).
    """

    def __init__(self, worker: CopyWorker, job: Job) -> None:
        super().__init__(daemon=True, name=f"heartbeat-{job.id}")
        self.worker, self.job_id = worker, job.id
        self.prestage = job.kind == PRESTAGE
        self.paused = threading.Event()
        self.taken_over = threading.Event()
        self.done = threading.Event()

    def interrupted(self) -> bool:
        return self.worker.stop.is_set() or self.paused.is_set()

    def run(self) -> None:
        last_beat = time.monotonic()
        while not self.done.wait(PAUSE_CHECK_SECONDS):
            try:
                if time.monotonic() - last_beat >= HEARTBEAT_SECONDS:
                    state, last_beat = self.worker.store.jobs.heartbeat(self.job_id), \
                        time.monotonic()
                else:
                    state = self.worker.store.jobs.state_of(self.job_id)
                if state == JobState.PAUSED and not self.paused.is_set():
                    # From here the copy stops at its next batch boundary.
                    log.info("copy_pause_noticed", job=self.job_id)
                    self.paused.set()
                if self.prestage and not self.taken_over.is_set():
                    self._prestage_checks()
            except Exception as exc:  # a database hiccup must not kill the copy
                log.warning("heartbeat_failed", error=type(exc).__name__)

    def _prestage_checks(self) -> None:
        jobs = self.worker.store.jobs
        if jobs.kind_of(self.job_id) != PRESTAGE:
            self.taken_over.set()
        elif jobs.login_pass_waiting():
            log.info("prestage_yielded", reason="a login's pass is waiting for a worker")
            self.paused.set()  # stopped, then handed back as the row says: queued


def worker_main(config: Config, number: int, parent_pid: int | None = None) -> None:
    """Entry point of one worker process (`parent_pid`: the pool it must not outlive)."""
    if parent_pid is not None:
        lifeline.follow(parent_pid)  # no copying on as an orphan of a killed pool
    logs.configure(config.log.format, config.log.level)
    stop = threading.Event()
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda *_: stop.set())
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked by _start_worker
    name = f"{socket.gethostname()}:{os.getpid()}:{number}"  # see JobQueue.requeue_dead_claims
    store = open_store(config.database_url)
    try:
        CopyWorker(config, store, Onboarding.from_config(config, store), name, stop).run()
    finally:
        store.close()


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    # A killed worker whose parent died too can linger as a zombie until someone reaps it.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def recover_dead_claims(config: Config) -> None:
    store = open_store(config.database_url)
    try:
        requeued = store.jobs.requeue_dead_claims(socket.gethostname(), pid_alive)
    finally:
        store.close()
    if requeued:
        log.info("jobs_recovered", count=requeued, reason="their worker process died")


def queue_due_resyncs(config: Config) -> None:
    """Automatic incremental passes (with kept credentials); never lets the pool die."""
    from migrating_proxy.admin import Actor
    from migrating_proxy.admin.operations import Operations

    try:
        store = open_store(config.database_url)
        try:
            queued = Operations.open(config, store, Actor("workers", "auto")).resync_due()
        finally:
            store.close()
    except Exception as exc:  # the database may be briefly unreachable: try next time
        log.warning("resync_scheduling_failed", error=type(exc).__name__)
        return
    if queued:
        log.info("resyncs_queued", count=queued)


def run_pool(config: Config, processes: int) -> int:
    """Run `processes` workers until SIGTERM/SIGINT, replacing any that die; exit code.

    A stop signal may arrive at any moment, even while children are being started: the
    handler only sets `stopping`, no child is started once it is set, and every child that
    exists at the end is signalled and waited for, whenever it was started.
    """
    lifeline.follow_from_environment()  # started by serve: stop when serve is gone
    context = multiprocessing.get_context("spawn")  # no inherited sockets, threads or engines
    stopping = threading.Event()
    children: dict[int, multiprocessing.process.BaseProcess] = {}
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda *_: stopping.set())
    next_resync_check = time.monotonic()
    while not stopping.is_set():
        dead = [n for n in range(processes) if n not in children or not children[n].is_alive()]
        if dead:
            recover_dead_claims(config)  # a crashed worker's job goes back to the queue
        for number in dead:
            if stopping.is_set():
                break
            if number in children:
                log.warning("worker_died", worker=number, exitcode=children[number].exitcode)
            children[number] = _start_worker(context, config, number)
        if config.migration.keep_credentials and time.monotonic() >= next_resync_check:
            queue_due_resyncs(config)
            next_resync_check = time.monotonic() + min(60.0, config.migration.resync_interval)
        stopping.wait(1.0)
    for child in children.values():
        if child.is_alive():
            child.terminate()  # SIGTERM: the worker finishes its batch and hands its job back
    for child in children.values():
        child.join()
    log.info("worker_pool_stopped", exitcodes=[c.exitcode for c in children.values()])
    return 0


def _start_worker(context: multiprocessing.context.SpawnContext, config: Config,
                  number: int) -> multiprocessing.process.BaseProcess:
    """Start one worker process with the stop signals blocked until it can handle them.

    The child inherits the blocked mask and unblocks it once its own handlers are in place
    (worker_main), so a stop that reaches it while Python is still starting is held back and
    then handled like any other: no traceback from a half-started interpreter, no job lost.
    """
    child = context.Process(target=worker_main, args=(config, number, os.getpid()),
                            name=f"worker-{number}")
    # Starting a child first starts multiprocessing's resource tracker if it is not running,
    # and that unblocks SIGTERM and SIGINT behind our back: have it running before we block.
    resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        child.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return child
