"""`migrating-proxy serve` with every accepted login served by the user's old server.

The decision that names the old server for accounts not switched yet belongs to the transparent
cutover (issue 9). Until then this harness swaps in that one policy, the `placement` seam of
`LoginService`, so the rest can be tested as it runs in production: the real CLI configuration,
the real login decision (first login included), the session dropping its pre-opened store
connection, and the IMAP/POP3 client that logs in at a real old server with the user's own
credentials and the domain's TLS settings.

Run as `python -m tests.support.old_server_serve --config PATH serve` (Proxy.serve_module).
"""

from __future__ import annotations

import sys

from migrating_proxy import config as config_module
from migrating_proxy import logs
from migrating_proxy.login import Placement
from migrating_proxy.server import serve
from migrating_proxy.specs import old_server_upstream
from migrating_proxy.upstream import Upstream


def on_the_old_server(placement: Placement) -> Upstream:
    assert placement.domain is not None, "only users of a configured domain have an old server"
    creds = placement.credentials
    upstream = old_server_upstream(placement.domain, placement.account, creds.password,
                                   creds.protocol)
    assert upstream is not None, f"the old server does not offer {creds.protocol}"
    return upstream


def main(argv: list[str]) -> int:
    assert argv[0] == "--config" and argv[2] == "serve", argv
    config = config_module.load(argv[1])
    logs.configure(config.log.format, config.log.level)
    logs.forward_twisted_logs()
    return serve(config, placement=on_the_old_server)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
