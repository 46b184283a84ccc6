"""After login: bytes both ways between client and upstream, with flow control, and a clean end.

Each transport is registered as the other's producer, so a slow reader on one side pauses
reading on the other instead of buffering without bound. The proxy never changes the bytes.

For IMAP it follows the upstream's side just enough to know where one response ends
(`ResponseBoundary`: line ends and literals), so that a session closed on request (an account's
sessions closed everywhere, at a switch) can say an untagged `* BYE` between two responses, as
RFC 9051 allows at any time, instead of cutting one in half. POP3 has no unsolicited answer:
its sessions are simply closed.

The one exception to "never changes the bytes": a POP3 session at the store of an account
whose old UIDLs were kept gets its UIDL answers translated (uidl.py), and nothing else.
"""

from __future__ import annotations

import contextlib
import re

from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITransport

from migrating_proxy.frontends.uidl import UidlTranslator

# A literal announced at the end of a response line: `{123}` CRLF (BINARY's `~{123}` too: the
# `~` needs no matching, and a pattern that starts with a literal byte is searched much faster).
LITERAL_MARKER = re.compile(rb"\{(\d{1,20})\}\r\n")
MARKER_TAIL = 24  # the longest prefix of a marker that can end one chunk
CLOSE_GRACE = 2.0  # seconds a close on request waits for a response boundary


class ResponseBoundary:
    """Sans-IO: follows an IMAP server's output and says whether it is between responses.

    Cheap enough for every relayed byte: a literal's content is skipped by counting, and lines
    are searched with one regular expression per chunk (a literal can only be announced at the
    end of a line, and quoted strings cannot hold CR or LF, so the next marker found in line
    mode is the next literal)."""

    def __init__(self) -> None:
        self.literal = 0  # bytes of literal content still to come
        self.mid_line = False  # some of a line was seen, not its end
        self.tail = b""  # the end of an unfinished line, in case a marker is split

    @property
    def at_boundary(self) -> bool:
        return self.literal == 0 and not self.mid_line

    def feed(self, data: bytes, stop_at_boundary: bool = False) -> int | None:
        """Follow `data`. With `stop_at_boundary`, stop at the first response boundary in it
        and return its offset in `data` (what follows is not followed); otherwise None."""
        carried = len(self.tail)
        if carried:
            data, self.tail = self.tail + data, b""
        i, n = 0, len(data)
        while i < n:
            if self.literal:
                taken = min(self.literal, n - i)
                self.literal -= taken
                i += taken
                self.mid_line = True  # the rest of the literal's line follows
                continue
            if stop_at_boundary:
                end = data.find(b"\n", i)
                if end >= 0:
                    i = self._line_end(data, i, end + 1)
                    if self.at_boundary:
                        return i - carried
                    continue
            else:
                marker = LITERAL_MARKER.search(data, i)
                if marker is not None:
                    self.literal, self.mid_line = int(marker[1]), True
                    i = marker.end()
                    continue
            self.mid_line = not data.endswith(b"\n")
            if self.mid_line:
                self.tail = data[max(data.rfind(b"\n", i) + 1, n - MARKER_TAIL, i):]
            break
        return None

    def _line_end(self, data: bytes, start: int, end: int) -> int:
        """A line ends at `end`: a literal if it announces one, else a boundary."""
        marker = LITERAL_MARKER.search(data, max(start, end - MARKER_TAIL), end)
        if marker is not None and marker.end() == end:
            self.literal, self.mid_line = int(marker[1]), True
        else:
            self.mid_line = False
        return end


class Relay:
    """The splice of one logged-in session: client <-> upstream.

    `close(bye)` ends it on request: with `bye` (IMAP), the line is written to the client at
    the next response boundary (at once if the upstream is between responses, else when the
    response in flight ends, for up to CLOSE_GRACE seconds), then both sides are closed."""

    def __init__(self, client: ITransport, upstream: ITransport, clock: IReactorTime,
                 boundary: ResponseBoundary | None = None,
                 translator: UidlTranslator | None = None) -> None:
        self.client, self.upstream, self.clock = client, upstream, clock
        self.boundary = boundary
        self.translator = translator
        self.bye: bytes | None = None  # to say at the next boundary
        self.deadline: IDelayedCall | None = None
        self.closed = False

    def start(self, from_upstream: bytes, from_client: bytes) -> None:
        """Splice; what each side sent before the splice is passed on first."""
        self.client.registerProducer(self.upstream, True)  # type: ignore[attr-defined]
        self.upstream.registerProducer(self.client, True)  # type: ignore[attr-defined]
        if from_upstream:
            self.from_upstream(from_upstream)
        if from_client:
            self.from_client(from_client)

    def from_client(self, data: bytes) -> None:
        if not self.closed:
            if self.translator is not None:
                self.translator.from_client(data)
            self.upstream.write(data)

    def from_upstream(self, data: bytes) -> None:
        if self.closed:
            return
        if self.translator is not None:
            data = self.translator.from_server(data)
        if self.boundary is None:
            self.client.write(data)
            return
        if self.bye is None:
            self.boundary.feed(data)
            self.client.write(data)
            return
        end = self.boundary.feed(data, stop_at_boundary=True)
        if end is None:
            self.client.write(data)
        else:
            self.client.write(data[:end])  # the rest would start a response nobody finishes
            self._finish(self.bye)

    def close(self, bye: bytes | None = None) -> None:
        """End the session on request (see the class docstring)."""
        if self.closed or self.bye is not None:
            return
        if bye is None or self.boundary is None:
            self._finish(None)
        elif self.boundary.at_boundary:
            self._finish(bye)
        else:
            self.bye = bye
            self.deadline = self.clock.callLater(CLOSE_GRACE, self._finish, None)

    def _finish(self, bye: bytes | None) -> None:
        if self.closed:
            return
        self.closed = True
        if self.deadline is not None and self.deadline.active():
            self.deadline.cancel()
        if bye:
            self.client.write(bye)
        unsplice_and_close(self.upstream)
        unsplice_and_close(self.client)


def unsplice_and_close(transport: ITransport | None) -> None:
    """Close one side after the other went away; pending output is still flushed."""
    if transport is None:
        return
    # Nothing may be registered (login never finished): then there is nothing to undo.
    with contextlib.suppress(Exception):
        transport.unregisterProducer()  # type: ignore[attr-defined]
    transport.loseConnection()

