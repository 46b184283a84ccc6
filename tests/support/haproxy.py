"""A real HAProxy (Debian's package) in TCP mode, in front of the proxy, for PROXY protocol tests.

Each route is one frontend on 127.0.0.1 forwarding to a port of the proxy with `send-proxy`
(v1) or `send-proxy-v2`. HAProxy connects to the proxy from 127.0.0.1; clients reach HAProxy from
other loopback addresses (127.0.0.5, ...), which HAProxy passes on in the header.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tests.support.dovecot import free_port, wait_for_port


@contextlib.contextmanager
def haproxy(directory: Path, routes: dict[str, tuple[int, str]]) -> Iterator[dict[str, int]]:
    """Run HAProxy with `routes` (name -> (proxy port, "send-proxy" | "send-proxy-v2"));
    yields name -> HAProxy's port for that route."""
    ports = {name: free_port() for name in routes}
    config = ["global", "    maxconn 200", "defaults", "    mode tcp",
              "    timeout connect 5s", "    timeout client 60s", "    timeout server 60s"]
    for name, (target, send_proxy) in routes.items():
        config += [f"listen {name}", f"    bind 127.0.0.1:{ports[name]}",
                   f"    server proxy 127.0.0.1:{target} {send_proxy}"]
    path = directory / "haproxy.cfg"
    path.write_text("\n".join(config) + "\n")
    log = (directory / "haproxy.log").open("ab")
    process = subprocess.Popen(["haproxy", "-db", "-f", str(path)], stdin=subprocess.DEVNULL,
                               stdout=log, stderr=log)
    log.close()
    try:
        for port in ports.values():
            wait_for_port("127.0.0.1", port)
        yield ports
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
