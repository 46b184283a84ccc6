"""The old server's SMTP for tests: a real aiosmtpd server that keeps what it received.

It can refuse chosen recipients at RCPT time (`refuse`), and be stopped and started again on
the same port to play a next hop that is down for a while.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.controller import Controller

from tests.support.dovecot import free_port, wait_for_port


@dataclass
class Received:
    sender: str
    recipients: list[str]
    content: bytes  # dot-unstuffed, CRLF line ends, exactly as it came in


@dataclass
class OldSMTP:
    """Use as a context manager; `messages` fills as mail arrives."""

    port: int = field(default_factory=free_port)
    refuse: dict[str, str] = field(default_factory=dict)  # address -> reply, e.g. "550 5.1.1 x"
    messages: list[Received] = field(default_factory=list)
    data_reply: str = ""  # when set, every DATA is answered with it and nothing is kept
    controller: Controller | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        if address.lower() in self.refuse:
            return self.refuse[address.lower()]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.data_reply:
            return self.data_reply
        with self.lock:
            self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                          envelope.original_content))
        return "250 2.0.0 queued"

    def for_recipient(self, address: str) -> list[Received]:
        with self.lock:
            return [m for m in self.messages if address in m.recipients]

    def start(self) -> None:
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)
        self.controller.start()
        wait_for_port("127.0.0.1", self.port)

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    def __enter__(self) -> OldSMTP:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
