"""Scratch PostgreSQL databases on the test server at 127.0.0.1:5432 (trust, user postgres)."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator

import pytest

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=test connect_timeout=3"


@contextlib.contextmanager
def scratch_database(prefix: str) -> Iterator[str]:
    """A new database (its name is yielded), dropped at the end; the test is skipped, with the
    reason shown, when no server answers."""
    psycopg = pytest.importorskip("psycopg")
    name = f"{prefix}{secrets.token_hex(6)}"
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable on 127.0.0.1:5432: {exc}".splitlines()[0])
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield name
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
