"""Metrics: typed hooks the code calls at the moment something happens, one registry per process.

The front-ends and the login decision call one hook per event (`login`, `first_login`,
`old_server_checked`, `upstream_login_timer`, `session_opened`/`session_closed`, `smtp_recipient`);
nothing is derived from log lines. The hooks do nothing until `enable()` (called by `serve`
when `[metrics] listen` is set), so a proxy without metrics pays one attribute test per event.

Label values are bounded by construction: protocols, outcomes, routes and upstream kinds are
fixed words, never an address, a user name or a server's reply; a domain appears only in the
database figures, where it names a domain an administrator registered (or an account they
added by hand).

What the copy workers do is not counted here: they run in other processes and often on other
machines. Those figures (accounts by state, jobs by state, messages and bytes copied, skipped
messages, copy errors) are read from the account store at scrape time by `DatabaseFigures`, so
every `serve` reports the totals of the whole installation: aggregate them with max(), not
sum(), across instances.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Engine, func, select
from twisted.python.failure import Failure

from migrating_proxy.store.schema import accounts, jobs, migrations

REGISTRY = CollectorRegistry(auto_describe=True)
_PREFIX = "migrating_proxy"
# Seconds: logins that wait for an old server or a password hash, well beyond a second.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

LOGINS = Counter(f"{_PREFIX}_logins", "Logins by protocol and outcome "
                 "(ok, failed, unavailable, throttled).", ["protocol", "outcome"],
                 registry=REGISTRY)
THROTTLED_LOGINS = Counter(f"{_PREFIX}_throttled_logins", "Logins refused unchecked because "
                           "of recent failures from the peer or for the account.", ["protocol"],
                           registry=REGISTRY)
FIRST_LOGINS = Counter(f"{_PREFIX}_first_logins", "First logins of migrating users by result "
                       "(accepted, refused, unavailable).", ["result"], registry=REGISTRY)
FIRST_LOGIN_SECONDS = Histogram(f"{_PREFIX}_first_login_duration_seconds", "Time to decide a "
                                "first login (old-server check, account, vault, job, "
                                "provisioning).", ["result"], buckets=_LATENCY_BUCKETS,
                                registry=REGISTRY)
OLD_SERVER_CHECKS = Counter(f"{_PREFIX}_old_server_checks", "Password checks at old servers "
                            "by result (accepted, refused, unreachable).", ["result"],
                            registry=REGISTRY)
OLD_SERVER_CHECK_SECONDS = Histogram(f"{_PREFIX}_old_server_check_duration_seconds",
                                     "Time of a password check at an old server.", ["result"],
                                     buckets=_LATENCY_BUCKETS, registry=REGISTRY)
STORE_LOGIN_SECONDS = Histogram(f"{_PREFIX}_store_login_duration_seconds", "Time from the "
                                "login decision to the store's answer to the proxy's login.",
                                ["protocol", "result"], buckets=_LATENCY_BUCKETS,
                                registry=REGISTRY)
RELAYED_SESSIONS = Gauge(f"{_PREFIX}_relayed_sessions", "Sessions being relayed now, by "
                         "protocol and by where they are served (store, old).",
                         ["protocol", "upstream"], registry=REGISTRY)
SMTP_RECIPIENTS = Counter(f"{_PREFIX}_smtp_recipients", "SMTP recipients by route (store, "
                          "old_server, outbound, none) and outcome (accepted, deferred, "
                          "rejected).", ["protocol", "route", "outcome"], registry=REGISTRY)

PROXY_HEADER_REFUSALS = Counter(f"{_PREFIX}_proxy_header_refusals", "Connections refused for "
                               "their PROXY header (untrusted, missing, malformed, timeout).",
                               ["reason"], registry=REGISTRY)

_enabled = False


def enable() -> None:
    global _enabled
    _enabled = True
    # The `_created` series of every counter would double the output for no operator's use.
    disable_created_metrics()


def login(protocol: str, outcome: str) -> None:
    """One login attempt reached its final answer (Outcome value)."""
    if not _enabled:
        return
    LOGINS.labels(protocol, outcome).inc()
    if outcome == "throttled":
        THROTTLED_LOGINS.labels(protocol).inc()


_FIRST_LOGIN_RESULTS = {"ok": "accepted", "failed": "refused"}


def first_login(outcome: str, started: float) -> None:
    """A first-login decision ended (Outcome value); `started` is its time.monotonic()."""
    if not _enabled:
        return
    label = _FIRST_LOGIN_RESULTS.get(outcome, "unavailable")
    FIRST_LOGINS.labels(label).inc()
    FIRST_LOGIN_SECONDS.labels(label).observe(time.monotonic() - started)


def old_server_checked(verdict: str, started: float) -> None:
    """A password check at an old server ended (OldServerVerdict value); `started` monotonic."""
    if not _enabled:
        return
    OLD_SERVER_CHECKS.labels(verdict).inc()
    OLD_SERVER_CHECK_SECONDS.labels(verdict).observe(time.monotonic() - started)


def upstream_login_timer(protocol: str, served_by: str) -> Callable[[Any], Any]:
    """A Deferred callback (addBoth) that observes the time since this call and passes the
    result on: a Failure counts as `failed`. Only logins at the store are observed."""
    started = time.monotonic()

    def observe(result: Any) -> Any:
        if _enabled and served_by == "store":
            failed = isinstance(result, Failure)
            STORE_LOGIN_SECONDS.labels(protocol, "failed" if failed else "ok").observe(
                time.monotonic() - started)
        return result

    return observe


def session_opened(protocol: str, upstream: str) -> None:
    if _enabled:
        RELAYED_SESSIONS.labels(protocol, upstream).inc()


def session_closed(protocol: str, upstream: str) -> None:
    if _enabled:
        RELAYED_SESSIONS.labels(protocol, upstream).dec()


def proxy_header_refused(reason: str) -> None:
    if _enabled:
        PROXY_HEADER_REFUSALS.labels(reason).inc()


def smtp_recipient(protocol: str, route: str, reply: str) -> None:
    """A RCPT was answered: `route` where it was bound, `reply` the answer the sender got."""
    if not _enabled:
        return
    outcome = {"2": "accepted", "4": "deferred"}.get(reply[:1], "rejected")
    SMTP_RECIPIENTS.labels(protocol, route, outcome).inc()


# --- figures of the whole installation, read from the account store at scrape time --------

ACCOUNT_STATES = ("NEW", "PENDING", "ERROR", "COMPLETED")
JOB_STATES = ("queued", "running", "paused", "pausing")


class DatabaseFigures(Collector):
    """Accounts, jobs and copy totals as the database has them, whoever did the work."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def describe(self) -> list[Any]:
        return []  # read at scrape time only; never at registration

    def collect(self) -> Iterator[Any]:
        with self.engine.connect() as conn:
            by_state = conn.execute(
                select(accounts.c.domain, accounts.c.migration_state, func.count())
                .group_by(accounts.c.domain, accounts.c.migration_state)).all()
            job_counts = dict(conn.execute(
                select(jobs.c.state, func.count()).group_by(jobs.c.state)).all())
            retrying = conn.execute(select(func.count()).where(
                jobs.c.state == "queued", jobs.c.last_error.is_not(None))).scalar_one()
            totals = conn.execute(select(
                func.coalesce(func.sum(migrations.c.messages_copied), 0),
                func.coalesce(func.sum(migrations.c.bytes_copied), 0),
                func.coalesce(func.sum(migrations.c.messages_skipped), 0))).one()
        yield self._accounts(by_state)
        family = GaugeMetricFamily(f"{_PREFIX}_jobs", "Copy jobs by state.", labels=["state"])
        for state in JOB_STATES:
            family.add_metric([state], job_counts.get(state, 0))
        yield family
        for name, value, text in (
                ("messages_copied", totals[0], "Messages copied to the store."),
                ("copied_bytes", totals[1], "Bytes of messages copied to the store."),
                ("messages_skipped", totals[2], "Messages the store refused, skipped.")):
            yield CounterMetricFamily(f"{_PREFIX}_{name}", text + " (accounts that exist)",
                                      value=value)
        errors = GaugeMetricFamily(f"{_PREFIX}_copy_errors", "Copy errors now, by kind: "
                                   "accounts whose last pass failed (pass_failed), jobs that "
                                   "gave up (job_failed), jobs waiting to retry (job_retrying).",
                                   labels=["kind"])
        errors.add_metric(["pass_failed"], sum(n for _d, s, n in by_state if s == "ERROR"))
        errors.add_metric(["job_failed"], job_counts.get("failed", 0))
        errors.add_metric(["job_retrying"], retrying)
        yield errors

    @staticmethod
    def _accounts(by_state: list[Any]) -> GaugeMetricFamily:
        family = GaugeMetricFamily(f"{_PREFIX}_accounts", "Accounts by domain and migration "
                                   "state (local: never migrated).", labels=["domain", "state"])
        for domain, state, count in by_state:
            family.add_metric([domain, state or "local"], count)
        return family
