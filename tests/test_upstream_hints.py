"""The guess a login's early upstream connection goes by (frontends/hints.py)."""

from __future__ import annotations

from migrating_proxy.endpoints import Endpoint
from migrating_proxy.frontends.hints import UpstreamHints
from migrating_proxy.upstream import Upstream

OLD = Endpoint("imap", "implicit", "mail.old.example", 993)
STORE = Endpoint("imap", "none", "127.0.0.1", 143)


def old(address: str) -> Upstream:
    return Upstream.old_server(OLD, address, address, "secret", ca_pem="PEM")


def test_the_old_server_is_remembered_until_the_store_takes_over() -> None:
    hints = UpstreamHints()
    assert hints.get("imap", "ann@old.example") is None  # no guess: the store
    hints.remember("imap", "Ann@Old.example ", old("ann@old.example"))
    hint = hints.get("imap", "ann@old.example")
    assert hint is not None and (hint.endpoint, hint.verify_tls, hint.ca_pem) == (OLD, True, "PEM")
    assert "secret" not in repr(hints._hints)  # no credentials kept
    assert hints.get("pop3", "ann@old.example") is None  # per protocol
    hints.remember("imap", "ann@old.example", Upstream("store", STORE, "ann@old.example",
                                                       "ann@old.example", "master"))
    assert hints.get("imap", "ann@old.example") is None  # switched: back to the default


def test_bounded_oldest_first() -> None:
    hints = UpstreamHints(size=2)
    for name in ("a", "b", "c"):
        hints.remember("imap", f"{name}@old.example", old(f"{name}@old.example"))
    assert hints.get("imap", "a@old.example") is None
    assert hints.get("imap", "c@old.example") is not None
