"""Framing before login, shared by every dialogue: bounded lines and exact-size reads."""

from __future__ import annotations


class LineTooLong(Exception):
    """A line grew past the limit without ending: the stream cannot be resynchronised."""


class LineBuffer:
    """The client's unread bytes. Lines end with LF (a CR before it is dropped: bare LF is
    accepted, as every mail server does before login)."""

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self.data = bytearray()

    def feed(self, data: bytes) -> None:
        self.data += data

    def line(self) -> bytes | None:
        """One line without its line end, or None until one is complete.

        Raises LineTooLong when more than `max_line` bytes arrived without a line end."""
        end = self.data.find(b"\n")
        if end < 0:
            if len(self.data) > self.max_line:
                raise LineTooLong
            return None
        if end > self.max_line:
            raise LineTooLong
        line = bytes(self.data[:end])
        del self.data[: end + 1]
        return line.removesuffix(b"\r")

    def take(self, size: int) -> bytes | None:
        """Exactly `size` bytes (an IMAP literal), or None until they are all here."""
        if len(self.data) < size:
            return None
        taken = bytes(self.data[:size])
        del self.data[:size]
        return taken

    def rest(self) -> bytes:
        """Everything unread (what the client pipelined), handed over and forgotten."""
        rest, self.data = bytes(self.data), bytearray()
        return rest

    def clear(self) -> None:
        self.data.clear()

    def __len__(self) -> int:
        return len(self.data)


def bounded_int(digits: bytes | str, limit: int) -> int | None:
    """The number `digits` spell (ASCII digits only), or None when it exceeds `limit`.

    The length is checked before converting: Python refuses to convert more than 4300 digits
    (a traceback where the protocol's own error belongs), and a thousand digits are never a
    size anybody means."""
    text = digits.decode("ascii") if isinstance(digits, bytes) else digits
    if not (text.isascii() and text.isdigit()) or len(text.lstrip("0")) > len(str(limit)):
        return None
    value = int(text)
    return value if value <= limit else None
