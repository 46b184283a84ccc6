"""The listening sockets of `serve`: the configured accept backlog reaches the kernel.

Twisted asks listen() for a backlog of 50 unless told otherwise; a reconnect storm (a whole
office's mail clients after a network blip) then overflows the queue and clients wait for SYN
retransmits. The kernel reports each listener's backlog as the Send-Q figure of `ss -ltn`, so
the test reads back exactly what the proxy passed to listen().
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from migrating_proxy.config import LimitsConfig
from tests.support.dovecot import DovecotInstance, free_port
from tests.support.proxy import Proxy


def listen_backlog(port: int) -> int:
    """The backlog of the socket listening on 127.0.0.1:port, as the kernel holds it."""
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True,
                         check=True).stdout.split()
    # State Recv-Q Send-Q Local:Port Peer:Port; for a listener Send-Q is the backlog.
    assert out and out[0] == "LISTEN", out
    return int(out[2])


def test_every_listener_gets_the_configured_backlog(tmp_path: Path,
                                                     module_store: DovecotInstance) -> None:
    smtp_port = free_port()
    overrides = {"limits": {"listen_backlog": 777}, "listen": {"smtp": f"127.0.0.1:{smtp_port}"}}
    with Proxy(tmp_path / "p", module_store, overrides=overrides) as proxy:
        for port in (proxy.imap_port, proxy.pop3_port, smtp_port):
            assert listen_backlog(port) == 777


def test_default_backlog_is_dovecots_not_twisteds(tmp_path: Path,
                                                   module_store: DovecotInstance) -> None:
    assert LimitsConfig().listen_backlog == 4096
    with Proxy(tmp_path / "p", module_store) as proxy:
        somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
        # The kernel caps what listen() asks for at net.core.somaxconn.
        assert listen_backlog(proxy.imap_port) == min(4096, somaxconn) > 50
