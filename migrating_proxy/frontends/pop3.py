"""The POP3 front-end: the pre-login dialogue (dialogue/pop3.py), then the relay.

POP3 has no unsolicited responses: a session closed on request is simply closed.
"""

from __future__ import annotations

from migrating_proxy.dialogue.pop3 import Pop3PreLogin
from migrating_proxy.frontends.session import ProxySession


class POP3Session(ProxySession):
    protocol_name = "pop3"
    dialogue_class = Pop3PreLogin
