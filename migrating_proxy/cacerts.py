"""Trusting an old server's private certificate authority (`domain add --source-ca FILE`).

The CA's certificates are read once, when the admin names the file, and kept in the domain's
row, not as a path: every machine sharing the database (`worker` machines, other `serve`
instances) then trusts the same CA without a copy of the file, and a file deleted or moved
later cannot break logins and copies that are already under way. A CA certificate is public;
a private key in the file is refused rather than stored.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path

_CERTIFICATE = re.compile(
    r"-----BEGIN CERTIFICATE-----\r?\n[A-Za-z0-9+/=\r\n]+?-----END CERTIFICATE-----")


@dataclass(frozen=True)
class UpstreamTrust:
    """How an old server's certificates are checked: a domain's --no-verify-tls and
    --source-ca apply to its IMAP/POP3 service and to its SMTP relay alike."""

    verify: bool = True
    ca_pem: str | None = field(default=None, repr=False)


VERIFIED = UpstreamTrust()  # the system's CAs, as for the store's own services


class CAFileError(ValueError):
    """The file does not hold certificates we can trust, worded for the admin."""


def read_ca_file(path: str) -> str:
    """The PEM certificates in `path`, checked and normalised (nothing else from the file)."""
    try:
        text = Path(path).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not a PEM file"
        raise CAFileError(f"cannot read CA file {path}: {reason}") from None
    return checked_ca_pem(text, path)


def checked_ca_pem(text: str, where: str) -> str:
    """The PEM certificates in `text` (a file's, or the web console's field: `where`),
    checked and normalised; a private key is refused, not stored."""
    if "PRIVATE KEY-----" in text:
        raise CAFileError(f"{where} holds a private key: give only the CA's certificate(s)")
    blocks = _CERTIFICATE.findall(text)
    if not blocks:
        raise CAFileError(f"{where} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    pem = "\n".join(block.replace("\r\n", "\n") for block in blocks) + "\n"
    try:
        ssl.create_default_context().load_verify_locations(cadata=pem)
    except (ssl.SSLError, ValueError) as exc:
        raise CAFileError(f"{where}: not a usable certificate ({exc.args[-1]})") from None
    return pem


def client_context(verify: bool = True, ca_pem: str | None = None) -> ssl.SSLContext:
    """A client TLS context: the system's CAs plus `ca_pem` if given; no checks if not verify."""
    context = ssl.create_default_context()
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif ca_pem:
        context.load_verify_locations(cadata=ca_pem)
    return context
