"""Finding passwords in whatever the proxy wrote, in every form they travel or get logged in."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable


def b64(data: str) -> str:
    return base64.b64encode(data.encode()).decode()


def plain_blob(user: str, password: str) -> str:
    """The base64 SASL PLAIN response (no authzid)."""
    return b64(f"\0{user}\0{password}")


def secret_forms(password: str, users: Iterable[str]) -> list[str]:
    """What a password looks like on the wire and in logs: itself, base64 alone (AUTH LOGIN),
    base64 PLAIN blobs for every user spelling; and for non-ASCII passwords the escaped forms
    a JSON log line or a Python repr would hold. Base64 forms also without '=' padding."""
    forms = [password, b64(password)]
    for user in users:
        forms += [plain_blob(user, password), b64(f"{user}\0{user}\0{password}")]
    if not password.isascii():
        forms += [json.dumps(password)[1:-1], ascii(password)[1:-1]]
    return forms + [form.rstrip("=") for form in forms if form.endswith("=")]


def find_secrets(data: bytes, passwords: Iterable[str], users: Iterable[str]) -> list[str]:
    """Every form of every password found in data (bytes of a log, a database, a file)."""
    users = list(users)
    return [form for password in passwords for form in secret_forms(password, users)
            if form.encode() in data]
