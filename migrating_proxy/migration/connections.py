"""Connecting to the old server and the new store: TLS modes, timeouts, error classes, retries.

Every error that leaves this module is one of our exception classes with a message scrubbed of
the passwords involved: imaplib and poplib put server replies (and sometimes our own command
line) into exception text, and those end up in logs and in the admin's `last_error`.
"""

from __future__ import annotations

import base64
import contextlib
import imaplib
import poplib
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import structlog
from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError, LoginError

from migrating_proxy.cacerts import client_context

log = structlog.get_logger(__name__)

TLSMode = Literal["none", "starttls", "implicit"]
T = TypeVar("T")

# Response codes (RFC 5530) and words that mean "try again later", not "this is wrong".
_TRANSIENT_MARKERS = ("[THROTTLED]", "[UNAVAILABLE]", "[INUSE]", "[SYS/TEMP]", "[IN-USE]",
                      "BYE", "TEMPORARY", "TRY AGAIN")


AUTHZID, SEPARATOR = "authzid", "separator"
ADMIN_STYLES = (AUTHZID, SEPARATOR)


@dataclass(frozen=True)
class SourceAdmin:
    """The old server's administrator, logging in *as* a user (pre-stage copies).

    authzid: SASL PLAIN with the user as authorization identity (RFC 4616; Dovecot master
    users, Cyrus admins); separator: the login name `user<separator>admin` with the admin's
    password, which some servers expect (Dovecot's auth_master_user_separator).
    """

    user: str
    password: str = field(repr=False)
    style: str = AUTHZID
    separator: str = "*"

    def login_name(self, user: str) -> str:
        return f"{user}{self.separator}{self.user}"


@dataclass(frozen=True)
class SourceSpec:
    """Where and how to read the user's old mailbox."""

    protocol: Literal["imap", "pop3"]
    host: str
    port: int
    tls: TLSMode
    verify_tls: bool
    login: str
    password: str = field(repr=False)
    type: str = "default"  # default | gmail | exchange | office | domino
    subscribed_only: bool = False
    ca_pem: str | None = field(default=None, repr=False)  # a private CA, beside the system's
    # Set: log in as `login` through the admin; `password` is then unused (may be "").
    admin: SourceAdmin | None = field(default=None, repr=False)

    @property
    def secrets(self) -> tuple[str | None, ...]:
        """What must never reach a log or `last_error`."""
        return (self.password, self.admin.password if self.admin else None)


@dataclass(frozen=True)
class StoreSpec:
    """The new store, logged in to as `address` (via master user if set, else user_password)."""

    host: str
    port: int
    tls: TLSMode
    address: str
    master_user: str | None
    master_password: str | None = field(repr=False)
    user_password: str | None = field(default=None, repr=False)
    verify_tls: bool = True


class SourceAuthError(Exception):
    """The old server refused the login: wrong password (or account disabled)."""


class SourceUnavailable(Exception):
    """The old server could not be reached or used: down, timeout, TLS failure, overloaded."""


class DestinationError(Exception):
    """The new store refused the login or an operation that is not about one message."""


class TransientError(Exception):
    """A failure worth retrying after a pause (connection lost, [THROTTLED], BYE...)."""


def scrub(text: str, *secrets: str | None) -> str:
    """Text with every non-trivial secret replaced, for logs and error messages."""
    for secret in secrets:
        if secret and len(secret) >= 3:
            text = text.replace(secret, "***")
    return text


# Exceptions whose text is about the network, TLS or a server's reply, never about our input.
_TEXT_IS_SAFE = (OSError, EOFError, imaplib.IMAP4.error, poplib.error_proto)


def describe_error(exc: BaseException) -> str:
    """An exception for a log line or `last_error`: the text of network and TLS errors and of
    server replies, only the class of anything else. A UnicodeEncodeError raised while
    sending a password, for one, quotes a character of it and its position."""
    if isinstance(exc, _TEXT_IS_SAFE):
        return f"{type(exc).__name__}: {exc}"
    return type(exc).__name__


def _looks_transient(text: str) -> bool:
    upper = text.upper()
    return any(marker in upper for marker in _TRANSIENT_MARKERS)


def is_transient(exc: BaseException) -> bool:
    """Whether retrying (after reconnecting) may succeed."""
    if isinstance(exc, TransientError | SourceUnavailable):
        return True
    if isinstance(exc, OSError | EOFError | imaplib.IMAP4.abort | socket.timeout):
        return True
    if isinstance(exc, IMAPClientError | imaplib.IMAP4.error | poplib.error_proto):
        return _looks_transient(str(exc))
    return False


# --- IMAP ----------------------------------------------------------------------------------


def open_imap(host: str, port: int, tls: TLSMode, verify_tls: bool, timeout: float,
              ca_pem: str | None = None) -> IMAPClient:
    """A connected (not logged-in) client; every socket operation times out after `timeout`."""
    # Loading the CA store costs ~10 ms a connection: only when TLS is used.
    context = client_context(verify_tls, ca_pem) if tls != "none" else None
    client = IMAPClient(host, port=port, ssl=tls == "implicit", ssl_context=context,
                        timeout=timeout)
    # imapclient sets imaplib's debug level to 5, at which imaplib formats the repr of every
    # response it stores, whole message bodies included, for a debug log nobody reads: that
    # was a fifth of the copy's CPU time. imapclient's own protocol log is not affected.
    client._imap.debug = 0
    client.normalise_times = False  # keep INTERNALDATE's offset (aware datetimes)
    if tls == "starttls":
        client.starttls(context)
    return client


def imap_login(client: IMAPClient, username: str, password: str) -> None:
    """LOGIN with credentials in UTF-8 (RFC 9051); LoginError if refused.

    imaplib sends LOGIN's arguments as ASCII quoted strings and raises UnicodeEncodeError
    otherwise, so a password such as "Grüße" could never log in. Non-ASCII credentials go as
    literals, which carry any octets (a quoted string carries 8-bit text only in IMAP4rev2).
    """
    if username.isascii() and password.isascii():
        client.login(username, password)
        return
    imap = client._imap
    tag = imap._new_tag()
    try:
        imap.send(tag + b" LOGIN")
        for value in (username, password):
            if not _send_literal(imap, tag, value.encode("utf-8")):
                break  # refused before the literal: the tagged answer says why
        else:
            imap.send(b"\r\n")
        typ, data = imap._command_complete("LOGIN", tag)
        client._checkok("login", typ, data)
    except IMAPClientError as exc:  # as IMAPClient.login words it
        raise LoginError(str(exc)) from None
    imap.state = "AUTH"


def _send_literal(imap: imaplib.IMAP4, tag: bytes, data: bytes) -> bool:
    """A synchronizing literal: announce it, wait for "+", send it. False if the server
    answered the command instead of "+"."""
    imap.send(b" {%d}\r\n" % len(data))
    while imap._get_response():  # None once the continuation request arrived
        if imap.tagged_commands.get(tag):
            return False
    imap.send(data)
    return True


def connect_source_imap(source: SourceSpec, timeout: float) -> IMAPClient:
    """Logged-in client on the old server; SourceAuthError / SourceUnavailable otherwise."""
    secrets = source.secrets
    try:
        client = open_imap(source.host, source.port, source.tls, source.verify_tls, timeout,
                           source.ca_pem)
    except Exception as exc:
        text = _describe("cannot connect to source", source.host, exc, secrets)
        raise SourceUnavailable(text) from None
    with _source_login(source, client, LoginError, secrets):
        admin = source.admin
        if admin is None:
            imap_login(client, source.login, source.password)
        elif admin.style == AUTHZID:
            try:
                client.plain_login(admin.user, admin.password,
                                   authorization_identity=source.login)
            except imaplib.IMAP4.abort:  # the connection, not the credentials
                raise
            except IMAPClientError as exc:  # imapclient raises its base class for a NO
                raise LoginError(str(exc)) from None
        else:
            imap_login(client, admin.login_name(source.login), admin.password)
    return client


def connect_store_imap(store: StoreSpec, timeout: float) -> IMAPClient:
    """Logged-in client on the new store as store.address (SASL PLAIN authzid for a master)."""
    secrets = (store.master_password, store.user_password)
    try:
        client = open_imap(store.host, store.port, store.tls, store.verify_tls, timeout)
    except Exception as exc:
        text = _describe("cannot connect to store", store.host, exc, secrets)
        raise TransientError(text) from None
    try:
        if store.master_user:
            client.plain_login(store.master_user, store.master_password or "",
                               authorization_identity=store.address)
        else:
            imap_login(client, store.address, store.user_password or "")
    except Exception as exc:
        abort_quietly(client)
        text = _describe("store login failed for " + store.address, store.host, exc, secrets)
        if isinstance(exc, LoginError | imaplib.IMAP4.error) and not _looks_transient(text):
            raise DestinationError(text) from None
        raise TransientError(text) from None
    return client


def _describe(what: str, host: str, exc: BaseException, secrets: tuple[str | None, ...]) -> str:
    return scrub(f"{what} ({host}): {describe_error(exc)}", *secrets)


def abort_quietly(client: IMAPClient | poplib.POP3 | None) -> None:
    """Best effort: the connection may already be gone; shut the socket without waiting."""
    if client is None:
        return
    try:
        if isinstance(client, IMAPClient):
            client.shutdown()
        else:
            client.close()
    except Exception:  # nothing useful to do when a dying socket won't close
        return


def close_quietly(client: IMAPClient | poplib.POP3 | None) -> None:
    """LOGOUT/QUIT politely, falling back to closing the socket."""
    if client is None:
        return
    try:
        if isinstance(client, IMAPClient):
            client.logout()
        else:
            client.quit()
    except Exception:
        abort_quietly(client)


# --- POP3 ----------------------------------------------------------------------------------


class _LineLimit:
    """poplib's line limit per connection instead of per process.

    poplib refuses any line over 2,048 bytes (the module-wide `poplib._MAXLINE`), but real mail
    has far longer ones (base64 without folding, HTML on one line). Raising the global would
    change every other POP3 client in the process; here each connection has its own
    `max_line`, raised only while a message is being read (see `message_lines`).
    """

    max_line = poplib._MAXLINE
    file: Any

    def _getline(self) -> tuple[bytes, int]:  # poplib.POP3._getline with self.max_line
        line = self.file.readline(self.max_line + 1)
        if len(line) > self.max_line:
            raise poplib.error_proto("line too long")
        if not line:
            raise poplib.error_proto("-ERR EOF")
        octets = len(line)
        if line[-2:] == b"\r\n":
            return line[:-2], octets
        if line[:1] == b"\r":
            return line[1:-1], octets
        return line[:-1], octets

    @contextlib.contextmanager
    def message_lines(self, size: int) -> Iterator[None]:
        """Allow lines as long as a message of `size` octets can have while reading it.
        Twice the size and at least 1 MiB: some servers' LIST sizes are estimates (Exchange's
        POP3 by default); the bound still stops a server that never ends a line."""
        self.max_line = max(2 * size, 1 << 20)
        try:
            yield
        finally:
            self.max_line = type(self).max_line


class SourcePOP3(_LineLimit, poplib.POP3):
    """A POP3 connection to an old server (see _LineLimit)."""


class SourcePOP3_SSL(_LineLimit, poplib.POP3_SSL):
    """A POP3-over-TLS connection to an old server (see _LineLimit)."""


def connect_source_pop3(source: SourceSpec, timeout: float) -> SourcePOP3:
    """Logged-in POP3 session; SourceAuthError / SourceUnavailable otherwise."""
    secrets = source.secrets
    context = client_context(source.verify_tls, source.ca_pem)
    try:
        if source.tls == "implicit":
            conn: SourcePOP3 = SourcePOP3_SSL(source.host, source.port, timeout=timeout,
                                              context=context)
        else:
            conn = SourcePOP3(source.host, source.port, timeout=timeout)
            if source.tls == "starttls":
                conn.stls(context)
    except Exception as exc:
        text = _describe("cannot connect to source", source.host, exc, secrets)
        raise SourceUnavailable(text) from None
    with _source_login(source, conn, poplib.error_proto, secrets):
        _pop3_login(conn, source)
    return conn


def _pop3_login(conn: poplib.POP3, source: SourceSpec) -> None:
    admin = source.admin
    if admin is None:
        conn.user(source.login)
        conn.pass_(source.password)
    elif admin.style == AUTHZID:  # RFC 5034 AUTH PLAIN with an initial response
        message = "\0".join((source.login, admin.user, admin.password)).encode()
        conn._shortcmd("AUTH PLAIN " + base64.b64encode(message).decode())
    else:
        conn.user(admin.login_name(source.login))
        conn.pass_(admin.password)


@contextlib.contextmanager
def _source_login(source: SourceSpec, client: IMAPClient | poplib.POP3,
                  refusal: type[Exception], secrets: tuple[str | None, ...]) -> Iterator[None]:
    """Sort a failed source login into "wrong password" and "try later", secrets scrubbed."""
    try:
        yield
    except refusal as exc:
        abort_quietly(client)
        text = scrub(str(exc), *secrets)
        if _looks_transient(text):
            raise SourceUnavailable(f"source {source.host} refused login for now: {text}") from None
        raise SourceAuthError(f"source {source.host} refused the login: {text}") from None
    except Exception as exc:
        abort_quietly(client)
        text = _describe("source login failed", source.host, exc, secrets)
        raise SourceUnavailable(text) from None


def check_source_login(source: SourceSpec, timeout: float) -> None:
    """Verify the credentials against the old server; raises SourceAuthError/SourceUnavailable."""
    if source.protocol == "pop3":
        close_quietly(connect_source_pop3(source, timeout))
    else:
        close_quietly(connect_source_imap(source, timeout))


# --- retries -------------------------------------------------------------------------------


@dataclass
class Backoff:
    """Exponential back-off between retries; `attempts` consecutive failures give up."""

    attempts: int = 6
    first: float = 0.5
    maximum: float = 30.0
    sleep: Callable[[float], None] = time.sleep

    def run(self, action: Callable[[], T], on_retry: Callable[[], None] | None = None) -> T:
        """Run action, retrying transient failures (after on_retry, e.g. dropping connections)."""
        delay = self.first
        for attempt in range(1, self.attempts + 1):
            try:
                return action()
            except Exception as exc:
                if not is_transient(exc) or attempt == self.attempts:
                    raise
                log.warning("transient_error_retrying", attempt=attempt, delay=delay,
                            error=describe_error(exc)[:300])
                if on_retry is not None:
                    on_retry()
                self.sleep(delay)
                delay = min(delay * 2, self.maximum)
        raise AssertionError("unreachable")
