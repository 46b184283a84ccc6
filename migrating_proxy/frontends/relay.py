"""After login: bytes both ways between client and store, with flow control.

Each transport is registered as the other's producer, so a slow reader on one side pauses
reading on the other instead of buffering without bound. The proxy never looks at the bytes.
"""

from __future__ import annotations

import contextlib

from twisted.internet.interfaces import ITransport


def splice(client: ITransport, backend: ITransport) -> None:
    client.registerProducer(backend, True)  # type: ignore[attr-defined]
    backend.registerProducer(client, True)  # type: ignore[attr-defined]


def unsplice_and_close(transport: ITransport | None) -> None:
    """Close one side after the other went away; pending output is still flushed."""
    if transport is None:
        return
    # Nothing may be registered (login never finished): then there is nothing to undo.
    with contextlib.suppress(Exception):
        transport.unregisterProducer()  # type: ignore[attr-defined]
    transport.loseConnection()
