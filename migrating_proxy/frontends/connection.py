"""The client side of a front-end session, shared by composition: IMAP, POP3 and SMTP all hold
one `ClientConnection` instead of inheriting each other's machinery.

It carries out the actions every dialogue emits (`Reply`, `StartTLS`, `Close`), keeps the idle
timer (re-armed for the dialogue's state after every step) and the absolute login deadline, and
knows the peer. What is specific to a protocol (logging in and relaying, or routing mail) stays
in its session.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, ITransport

from migrating_proxy.dialogue import Action, Close, Reply, SessionState, StartTLS


class ClientConnection:
    def __init__(self, reactor: Any, tls_options: Any, implicit_tls: bool = False) -> None:
        self.reactor = reactor
        self.tls_options = tls_options
        self.tls_active = implicit_tls
        self.transport: ITransport | None = None
        self.peer_host, self.peer_port = "", 0
        self.closed = False
        self._idle: IDelayedCall | None = None
        self._deadline: IDelayedCall | None = None

    def made(self, transport: ITransport) -> None:
        self.transport = transport
        peer = transport.getPeer()
        self.peer_host, self.peer_port = getattr(peer, "host", ""), getattr(peer, "port", 0)

    def lost(self) -> None:
        self.closed = True
        self.idle(None, lambda: None)
        self.cancel_deadline()

    # -- actions -------------------------------------------------------------------------
    def carry_out(self, actions: list[Action], other: Callable[[Action], None]) -> None:
        """Perform the shared actions; hand the others to the session (`other`), in order."""
        for action in actions:
            if not self.perform(action):
                other(action)

    def perform(self, action: Action) -> bool:
        """Carry out one of the shared actions; False for the ones the session handles."""
        if isinstance(action, Reply):
            self.write(action.data)
        elif isinstance(action, StartTLS):
            self.start_tls()
        elif isinstance(action, Close):
            self.close()
        else:
            return False
        return True

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def start_tls(self) -> None:
        self.transport.startTLS(self.tls_options)  # type: ignore[union-attr]
        self.tls_active = True

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.loseConnection()

    # -- timers --------------------------------------------------------------------------
    def idle(self, seconds: float | None, on_timeout: Callable[[], None]) -> None:
        """(Re)start the idle timer: `on_timeout` after `seconds` of silence (None: none)."""
        if self._idle is not None and self._idle.active():
            if seconds and not self.closed and self._idle.func == on_timeout:
                # Every step of every session gets here: moving the timer later is a field
                # update, where cancel + callLater cost two heap operations.
                self._idle.reset(seconds)
                return
            self._idle.cancel()
        self._idle = self.reactor.callLater(seconds, on_timeout) \
            if seconds and not self.closed else None

    def deadline(self, seconds: float, on_deadline: Callable[[], None]) -> None:
        """Run `on_deadline` once, `seconds` from now (the login must be over by then)."""
        if seconds > 0:
            self._deadline = self.reactor.callLater(seconds, on_deadline)

    def cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None


def idle_seconds(state: SessionState, commands: float, data: float = 0.0) -> float | None:
    """How long a client may stay silent in a state: the login's own bounds apply while it is
    decided, the next hop's while SMTP waits for it, the upstream's once relayed."""
    if state is SessionState.COMMANDS:
        return commands or None
    if state is SessionState.DATA:
        return data or None
    return None
