"""The IMAP front-end: the pre-login dialogue (dialogue/imap.py), then the relay.

Once relayed, a session closed on request (frontends/registry.py) says an untagged `* BYE`
between two of the upstream's responses.
"""

from __future__ import annotations

from migrating_proxy.dialogue.imap import ImapPreLogin
from migrating_proxy.frontends.relay import ResponseBoundary
from migrating_proxy.frontends.session import ProxySession


class IMAPSession(ProxySession):
    protocol_name = "imap"
    dialogue_class = ImapPreLogin

    def response_boundary(self) -> ResponseBoundary:
        return ResponseBoundary()

    def goodbye(self, reason: str) -> bytes:
        return f"* BYE {reason}\r\n".encode("ascii", "replace")
