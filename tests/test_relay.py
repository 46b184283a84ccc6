"""The relay's end on request, without sockets: where an IMAP response ends, at any split.

`ResponseBoundary` follows a server's output byte for byte; the reference below reads the same
transcript one byte at a time, the slow and obvious way, and both must agree at every position
and however the bytes are split into chunks.
"""

from __future__ import annotations

import re

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from migrating_proxy.frontends.relay import CLOSE_GRACE, Relay, ResponseBoundary

BODY = b"Subject: x\r\n\r\n{5}\r\n* BYE not a response\r\n)\r\n"  # looks like IMAP, is content
TRANSCRIPT = (
    b"* 2 EXISTS\r\n"
    b"* 1 FETCH (UID 7 BODY[] {" + str(len(BODY)).encode() + b"}\r\n" + BODY + b")\r\n"
    b"* 2 FETCH (BODY[HEADER] {0}\r\n FLAGS (\\Seen))\r\n"
    b"* 3 FETCH (BINARY[1] ~{3}\r\n\x00\r\n)\r\n"
    b"* LIST () \"/\" {4}\r\nA{B}\r\n"
    b"a1 OK FETCH completed.\r\n"
    b"+ idling\r\n"
)


def reference_boundaries(data: bytes) -> list[bool]:
    """at_boundary after each prefix data[:k], k = 0..len, read byte by byte."""
    result, literal, line = [True], 0, b""
    for byte in data:
        if literal:
            literal -= 1
            line = b"(after a literal)"
        else:
            line += bytes([byte])
            if byte == 0x0A:
                marker = re.search(rb"~?\{(\d+)\}\r\n$", line)
                if marker:
                    literal, line = int(marker[1]), b"(literal)"
                else:
                    line = b""
        result.append(literal == 0 and line == b"")
    return result


EXPECTED = reference_boundaries(TRANSCRIPT)


def test_the_reference_sees_the_responses() -> None:
    ends = [k for k, at in enumerate(EXPECTED) if at]
    assert len(ends) == 8  # start + 7 responses; nothing inside BODY counts
    assert ends[-1] == len(TRANSCRIPT)


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 25, 26, 64, len(TRANSCRIPT)])
def test_boundaries_at_every_position_whatever_the_chunks(chunk: int) -> None:
    follower = ResponseBoundary()
    for start in range(0, len(TRANSCRIPT), chunk):
        piece = TRANSCRIPT[start:start + chunk]
        follower.feed(piece)
        assert follower.at_boundary == EXPECTED[start + len(piece)], (chunk, start)


def test_the_first_boundary_is_found_from_any_position_and_split() -> None:
    for start in range(len(TRANSCRIPT)):
        follower = ResponseBoundary()
        follower.feed(TRANSCRIPT[:start])
        expected = next(k for k in range(start + 1, len(TRANSCRIPT) + 1) if EXPECTED[k])
        rest = TRANSCRIPT[start:]
        for split in (1, 9, len(rest)):
            probe = ResponseBoundary()
            probe.feed(TRANSCRIPT[:start])
            offset, found = start, None
            for i in range(0, len(rest), split):
                end = probe.feed(rest[i:i + split], stop_at_boundary=True)
                if end is not None:
                    found = offset + end
                    break
                offset += len(rest[i:i + split])
            assert found == expected, (start, split)


def relay() -> tuple[Relay, StringTransport, StringTransport, Clock]:
    client, upstream, clock = StringTransport(), StringTransport(), Clock()
    spliced = Relay(client, upstream, clock, ResponseBoundary())
    spliced.start(b"* OK pending\r\n", b"a2 NOOP\r\n")
    return spliced, client, upstream, clock


def test_a_close_between_responses_says_bye_at_once() -> None:
    spliced, client, upstream, _ = relay()
    assert client.value() == b"* OK pending\r\n" and upstream.value() == b"a2 NOOP\r\n"
    spliced.close(b"* BYE moved\r\n")
    assert client.value().endswith(b"* BYE moved\r\n")
    assert client.disconnecting and upstream.disconnecting


def test_a_close_inside_a_response_waits_for_its_end() -> None:
    spliced, client, upstream, _ = relay()
    cut = TRANSCRIPT.index(b"* BYE not")  # inside the literal
    spliced.from_upstream(TRANSCRIPT[:cut])
    spliced.close(b"* BYE moved\r\n")
    assert not client.disconnecting
    spliced.from_client(b"a3 NOOP\r\n")
    spliced.from_upstream(TRANSCRIPT[cut:])
    first_end = TRANSCRIPT.index(b"* 2 FETCH")
    assert client.value() == b"* OK pending\r\n" + TRANSCRIPT[:first_end] + b"* BYE moved\r\n"
    assert client.disconnecting and upstream.disconnecting
    spliced.from_upstream(b"* 9 EXISTS\r\n")  # too late: nothing more reaches the client
    assert client.value().endswith(b"* BYE moved\r\n")


def test_a_response_that_never_ends_is_cut_after_the_grace() -> None:
    spliced, client, _, clock = relay()
    spliced.from_upstream(b"* 1 FETCH (BODY[] {100000}\r\nxxx")
    spliced.close(b"* BYE moved\r\n")
    clock.advance(CLOSE_GRACE)
    assert client.disconnecting and b"BYE" not in client.value()


def test_without_a_boundary_follower_a_close_just_closes() -> None:
    client, upstream = StringTransport(), StringTransport()
    spliced = Relay(client, upstream, Clock())  # POP3: no unsolicited responses
    spliced.start(b"", b"")
    spliced.close(b"ignored")
    assert client.value() == b"" and client.disconnecting and upstream.disconnecting
