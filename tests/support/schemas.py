"""Databases exactly as earlier schema versions created them, for the upgrade tests.

tests/data/schema-v<N>-<dialect>.sql is the DDL that version N's `metadata.create_all` emitted
(generated once, when version N+1 was written, from that commit's code): upgrading such a
database is what an operator's existing installation goes through.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text

from migrating_proxy.store.db import make_engine

DATA = Path(__file__).resolve().parents[1] / "data"


def create_old_schema(url: str, version: int, *statements: str) -> None:
    """Create version `version`'s tables at url, then run `statements` (test rows) there."""
    dialect = "postgresql" if url.startswith("postgresql") else "sqlite"
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            for statement in (DATA / f"schema-v{version}-{dialect}.sql").read_text().split(";"):
                if "CREATE" in statement:
                    conn.execute(text(statement))
            conn.execute(text(f"INSERT INTO schema_info (id, version) VALUES (1, {version})"))
            for statement in statements:
                conn.execute(text(statement))
    finally:
        engine.dispose()
