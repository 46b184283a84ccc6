"""`[metrics] listen`: /metrics against what the test really did, /healthz, /readyz.

A real `serve` with a real old server and store (Dovecot), real clients (imapclient, poplib,
smtplib, raw sockets for the username spray); /metrics is read over HTTP and parsed with
prometheus_client's own parser, so a format error fails the test.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import imaplib
import json
import poplib
import re
import secrets
import smtplib
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from imapclient import IMAPClient

from tests.support import dovecot
from tests.support.dovecot import DovecotInstance, free_port
from tests.support.mail import SeedMessage, make_message, seed_mailbox
from tests.support.metrics import scrape, value
from tests.support.postgres import scratch_database
from tests.support.proxy import Proxy, wait_for

ALICE, ALICE_PW = "alice@old.example", "alice-pw"
BOB = "bob@old.example"
def http_status(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=15) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.fixture(scope="module")
def metrics_proxy(tmp_path_factory: pytest.TempPathFactory, module_store: DovecotInstance,
                  module_old_server: DovecotInstance) -> Iterator[Proxy]:
    """A migrating proxy with metrics on, an SMTP listener, one copy worker."""
    old_server = module_old_server
    seed_mailbox("127.0.0.1", old_server.imap_port, ALICE, ALICE_PW, {"INBOX": [
        SeedMessage(make_message(f"message {n}", "body " * 50, _date(n))) for n in range(5)]})
    ports = {"smtp": free_port(), "metrics": free_port()}
    proxy = Proxy(tmp_path_factory.mktemp("metrics") / "proxy", module_store, overrides={
        "listen": {"smtp": f"127.0.0.1:{ports['smtp']}"},
        "metrics": {"listen": f"127.0.0.1:{ports['metrics']}"},
        "backend": {"delivery": f"lmtp://127.0.0.1:{module_store.lmtp_port}"},
        "limits": {"auth_failure_delay": 0, "max_failures_per_peer": 100},
        "migration": {"workers": 1},
    })
    proxy.ports.update(ports)
    proxy.cli("domain", "add", "old.example", "--source",
              f"imap://127.0.0.1:{old_server.imap_port}",
              "--relay", f"lmtp://127.0.0.1:{old_server.lmtp_port}")
    with proxy:
        yield proxy


def _date(n: int) -> dt.datetime:
    return dt.datetime(2024, 1, 1 + n, 12, 0, tzinfo=dt.UTC)


def test_metrics_show_what_the_proxy_did(metrics_proxy: Proxy) -> None:
    port = metrics_proxy.ports["metrics"]
    before = scrape(port)
    assert value(before, "migrating_proxy_logins_total", protocol="imap", outcome="ok") == 0

    # A first login that the old server accepts, one it refuses.
    with IMAPClient("127.0.0.1", metrics_proxy.imap_port, ssl=False) as client:
        client.login(ALICE, ALICE_PW)
        client.select_folder("INBOX")
        now = scrape(port)
        served = served_by(metrics_proxy)  # the store, or the old server (cutover mode)
        assert value(now, "migrating_proxy_relayed_sessions", protocol="imap",
                     upstream=served[-1][1]) == 1
    with pytest.raises(imaplib.IMAP4.error):
        client = imaplib.IMAP4("127.0.0.1", metrics_proxy.imap_port)
        client.login(BOB, "not-bobs-password")
    pop = poplib.POP3("127.0.0.1", metrics_proxy.pop3_port, timeout=10)
    pop.user(ALICE)
    pop.pass_(ALICE_PW)
    pop.quit()

    status = metrics_proxy.wait_for_state(ALICE)
    assert status["state"] == "COMPLETED" and status["messages_copied"] == 5

    # Mail: a local account (store), a user not moved yet (old server), refusals.
    smtp = smtplib.SMTP("127.0.0.1", metrics_proxy.ports["smtp"], timeout=10)
    smtp.sendmail("someone@elsewhere.example", [ALICE], b"Subject: one\r\n\r\nbody\r\n")
    smtp.sendmail("someone@elsewhere.example", [BOB], b"Subject: two\r\n\r\nbody\r\n")
    for refused in ("victim@elsewhere.example", "nobody@nowhere.example"):
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            smtp.sendmail("someone@elsewhere.example", [refused], b"Subject: x\r\n\r\nx\r\n")
    smtp.quit()

    wait_for(lambda: value(scrape(port), "migrating_proxy_relayed_sessions", protocol="imap",
                           upstream=served[0][1]) == 0, "the IMAP session counted as closed")
    served = served_by(metrics_proxy)
    at_store = {protocol: sum(1 for p, where in served if p == protocol and where == "store")
                for protocol in ("imap", "pop3")}
    after = scrape(port)
    expected = {
        ("migrating_proxy_logins_total", (("outcome", "ok"), ("protocol", "imap"))): 1,
        ("migrating_proxy_logins_total", (("outcome", "failed"), ("protocol", "imap"))): 1,
        ("migrating_proxy_logins_total", (("outcome", "ok"), ("protocol", "pop3"))): 1,
        ("migrating_proxy_first_logins_total", (("result", "accepted"),)): 1,
        ("migrating_proxy_first_logins_total", (("result", "refused"),)): 1,
        ("migrating_proxy_first_login_duration_seconds_count", (("result", "accepted"),)): 1,
        ("migrating_proxy_old_server_checks_total", (("result", "accepted"),)): 1,
        ("migrating_proxy_old_server_checks_total", (("result", "refused"),)): 1,
        ("migrating_proxy_old_server_check_duration_seconds_count",
         (("result", "accepted"),)): 1,
        ("migrating_proxy_store_login_duration_seconds_count",
         (("protocol", "imap"), ("result", "ok"))): at_store["imap"] or None,
        ("migrating_proxy_store_login_duration_seconds_count",
         (("protocol", "pop3"), ("result", "ok"))): at_store["pop3"] or None,
        ("migrating_proxy_smtp_recipients_total",
         (("outcome", "accepted"), ("protocol", "smtp"), ("route", "store"))): 1,
        ("migrating_proxy_smtp_recipients_total",
         (("outcome", "accepted"), ("protocol", "smtp"), ("route", "old_server"))): 1,
        ("migrating_proxy_smtp_recipients_total",
         (("outcome", "rejected"), ("protocol", "smtp"), ("route", "none"))): 2,
        ("migrating_proxy_accounts", (("domain", "old.example"), ("state", "COMPLETED"))): 1,
        ("migrating_proxy_messages_copied_total", ()): status["messages_copied"],
        ("migrating_proxy_copied_bytes_total", ()): status["bytes_copied"],
        ("migrating_proxy_messages_skipped_total", ()): 0,
        ("migrating_proxy_jobs", (("state", "queued"),)): 0,
        ("migrating_proxy_jobs", (("state", "running"),)): 0,
        ("migrating_proxy_copy_errors", (("kind", "pass_failed"),)): 0,
    }
    assert {key: after.get(key) for key in expected} == expected
    assert value(after, "migrating_proxy_throttled_logins_total", protocol="imap") == 0
    assert status["bytes_copied"] > 0


def served_by(proxy: Proxy) -> list[tuple[str, str]]:
    """(protocol, where) of every accepted login, from the proxy's login lines."""
    events = [json.loads(line) for line in proxy.log_text().splitlines() if line.startswith("{")]
    return [(e["protocol"], e["served_by"]) for e in events
            if e.get("event") == "login" and e.get("outcome") == "ok"]


def spray_login(port: int, username: str) -> bytes:
    """One IMAP LOGIN on a connection of its own; the tagged answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        reader = sock.makefile("rb")
        reader.readline()
        sock.sendall(f'a LOGIN "{username}" "pw"\r\n'.encode())
        while not (line := reader.readline()).startswith(b"a "):
            if not line:
                return b""
        return line


def test_a_spray_of_random_usernames_adds_no_series(metrics_proxy: Proxy) -> None:
    port = metrics_proxy.ports["metrics"]
    before = scrape(port)
    names = [f"{secrets.token_hex(6)}@{secrets.token_hex(4)}.example" for _ in range(1000)]
    names[::100] = [f"{secrets.token_hex(6)}@old.example" for _ in names[::100]]  # its domain
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda name: spray_login(metrics_proxy.imap_port, name), names))
    throttled = sum(b"[UNAVAILABLE]" in answer for answer in answers)
    failed = sum(b"[AUTHENTICATIONFAILED]" in answer for answer in answers)
    assert throttled + failed == 1000 and throttled > 0  # past max_failures_per_peer = 100
    after = scrape(port)

    assert {key for key in after if key not in before} <= {
        ("migrating_proxy_logins_total", (("outcome", "throttled"), ("protocol", "imap"))),
        ("migrating_proxy_throttled_logins_total", (("protocol", "imap"),)),
        ("migrating_proxy_first_logins_total", (("result", "refused"),)),
        *((f"migrating_proxy_first_login_duration_seconds_{suffix}", labels)
          for suffix in ("count", "sum", "bucket")
          for labels in [key[1] for key in after
                         if key[0].startswith("migrating_proxy_first_login_duration")]),
        *((f"migrating_proxy_old_server_check_duration_seconds_{suffix}", labels)
          for suffix in ("count", "sum", "bucket")
          for labels in [key[1] for key in after
                         if key[0].startswith("migrating_proxy_old_server_check_duration")]),
    }
    assert len(after) < 400
    label_values = {v for _name, labels in after for _k, v in labels}
    sprayed_domains = {name.split("@")[1] for name in names} - {"old.example"}
    assert not label_values & (set(names) | sprayed_domains)
    assert value(after, "migrating_proxy_throttled_logins_total", protocol="imap") == throttled
    grown = (value(after, "migrating_proxy_logins_total", protocol="imap", outcome="failed")
             - value(before, "migrating_proxy_logins_total", protocol="imap", outcome="failed"))
    assert grown == failed


def test_healthz_answers_while_the_reactor_turns(metrics_proxy: Proxy) -> None:
    assert http_status(metrics_proxy.ports["metrics"], "/healthz") == (200, "ok\n")
    assert http_status(metrics_proxy.ports["metrics"], "/nothing")[0] == 404


class Forwarder:
    """A TCP path to PostgreSQL the test can cut and restore (a network failure or a stopped
    database look the same to the proxy: connections refused and dropped)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self.connections: list[socket.socket] = []
        self.listener: socket.socket | None = None

    def start(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def stop(self) -> None:
        assert self.listener is not None
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes accept(); close() alone would not
        self.listener.close()
        for conn in self.connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)  # wakes the pipe threads; close() would not
            conn.close()
        self.connections.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.connections += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def test_readyz_follows_the_database_and_the_store_without_a_restart(tmp_path: Path) -> None:
    root = dovecot.instance_root("mp-ready-")
    forwarder = Forwarder(("127.0.0.1", 5432))
    forwarder.start()
    try:
        with scratch_database("mp_ready_") as name, \
                dovecot.new_store(root, root / "provisioned" / "users") as store:
            port = free_port()
            proxy = Proxy(tmp_path / "proxy", store, overrides={
                "metrics": {"listen": f"127.0.0.1:{port}"},
                "database": {"url": f"postgresql://postgres@127.0.0.1:{forwarder.port}/{name}"},
            })
            with proxy:
                pid = proxy.process.pid  # type: ignore[union-attr]
                assert http_status(port, "/readyz") == (200, "ready\n")
                forwarder.stop()
                code, body = http_status(port, "/readyz")
                assert code == 503 and body.startswith("database unreachable"), body
                forwarder.start()
                assert http_status(port, "/readyz") == (200, "ready\n")
                store.stop()
                code, body = http_status(port, "/readyz")
                assert code == 503, body
                assert f"store imap 127.0.0.1:{store.imap_port} unreachable" in body
                assert f"store pop3 127.0.0.1:{store.pop3_port} unreachable" in body
                assert http_status(port, "/healthz") == (200, "ok\n")
                store.start()
                assert http_status(port, "/readyz") == (200, "ready\n")
                assert proxy.process is not None and proxy.process.pid == pid
                assert proxy.process.poll() is None
    finally:
        forwarder.stop()
        dovecot.remove_root(root)


def test_the_grafana_dashboard_uses_only_metrics_the_proxy_exports(tmp_path: Path) -> None:
    """deploy/grafana/ is built on these metrics: a renamed metric must not leave it blank."""
    from migrating_proxy import metrics
    from migrating_proxy.store import open_store

    store = open_store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    try:
        families = [*metrics.REGISTRY.collect(), *metrics.DatabaseFigures(store.engine).collect()]
    finally:
        store.close()
    exported = {f"{family.name}{suffix}" for family in families
                for suffix in ("", "_total", "_bucket", "_count", "_sum")}
    dashboard = (Path(__file__).resolve().parents[1] / "deploy" / "grafana"
                 / "migrating-proxy-dashboard.json").read_text()
    used = set(re.findall(r"migrating_proxy_[a-z_]+", dashboard))
    assert len(used) >= 10
    assert used <= exported, used - exported
