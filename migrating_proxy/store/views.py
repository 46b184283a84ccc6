"""Views other programs read: a stable contract on top of tables that may change.

`dovecot_users("user", password)` lists every account for the new store's SQL passdb
(`provision.kind = "none"`: the store reads this database, no file to share between machines).
`user` is the lower-cased address (what Dovecot's `%Lu` looks up); `password` is the hash with
Dovecot's `{SCHEME}` prefix, exactly the value the passwd-file provisioners write:

- an account whose hash is still pending (a first login: the hash is computed just after the
  client's OK) has the locked entry `{SHA512-CRYPT}!`. The row must exist, because the proxy's
  master login for that very session is looked up in this passdb; no password can match "!".
- a hash in a form Dovecot cannot read gets the locked entry too (the file provisioners refuse
  it; a view cannot raise).

The view is (re)created when a database is created and after every schema upgrade, so a
version that changes `accounts` keeps it in step: change `_dovecot_password` here, nothing else.
Column names and meaning are a public contract (operators grant SELECT on the view alone).
"""

from __future__ import annotations

from sqlalchemy import DDL, Connection, MetaData, event

from migrating_proxy.passwords import DOVECOT_PREFIXES, LOCKED_DOVECOT_ENTRY, PENDING_HASH

DOVECOT_USERS = "dovecot_users"


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _dovecot_password() -> str:
    """SQL for the `{SCHEME}hash` form of accounts.password_hash (passwords.dovecot_form).

    substr() rather than LIKE: '%' would be taken for a parameter by some drivers."""
    locked = _literal(LOCKED_DOVECOT_ENTRY)
    cases = [f"WHEN password_hash = {_literal(PENDING_HASH)} THEN {locked}",
             "WHEN substr(password_hash, 1, 1) = '{' THEN password_hash"]
    cases += [f"WHEN substr(password_hash, 1, {len(prefix)}) = {_literal(prefix)} "
              f"THEN {_literal('{' + scheme + '}')} || password_hash"
              for prefix, scheme in DOVECOT_PREFIXES.items()]
    return "CASE " + " ".join(cases) + f" ELSE {locked} END"


def _dovecot_users_select() -> str:
    return f'SELECT address_key AS "user", {_dovecot_password()} AS password FROM accounts'


def create_views(conn: Connection) -> None:
    """Create or replace every view (after create_all, and after each upgrade)."""
    if conn.dialect.name == "postgresql":
        # OR REPLACE keeps the grants an operator gave the store's database role.
        conn.exec_driver_sql(f"CREATE OR REPLACE VIEW {DOVECOT_USERS} AS {_dovecot_users_select()}")
        return
    conn.exec_driver_sql(f"DROP VIEW IF EXISTS {DOVECOT_USERS}")
    conn.exec_driver_sql(f"CREATE VIEW {DOVECOT_USERS} AS {_dovecot_users_select()}")


def drop_views_with(metadata: MetaData) -> None:
    """metadata.drop_all() drops the views first: they depend on the tables."""
    event.listen(metadata, "before_drop", DDL(f"DROP VIEW IF EXISTS {DOVECOT_USERS}"))
