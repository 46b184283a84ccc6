"""The account store's tables (SQLAlchemy Core), one schema for SQLite and PostgreSQL.

Every table hangs off `metadata`; modules that own a table of their own (the copy engine's
per-folder state, for instance) declare it on this same `metadata` so `create_all` and the
schema version cover the whole database.

Schema changes are versioned: bump `SCHEMA_VERSION` and add a step to `UPGRADES` in db.py.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

from migrating_proxy.store.views import drop_views_with

SCHEMA_VERSION = 9

metadata = MetaData()

schema_info = Table(
    "schema_info",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("version", Integer, nullable=False),
)

domains = Table(
    "domains",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(255), nullable=False, unique=True),  # lower-cased
    # The per-domain migration switch: on, unknown users are checked against the old server.
    Column("migrating", Boolean, nullable=False, default=True),
    # The old server's service the copy reads: its IMAP one when it has one, else its POP3 one.
    Column("source_url", String(512), nullable=False),
    # Its POP3 service beside an IMAP `source_url` (POP3 logins are checked there); else NULL.
    Column("pop3_source_url", String(512), nullable=True),
    # passthrough: accounts are served by the old server until their copy is complete, then
    # switched once; immediate: served by the store from the first login (schema version 1).
    Column("cutover", String(16), nullable=False, default="passthrough"),
    Column("relay_url", String(512), nullable=True),
    Column("type", String(16), nullable=False, default="default"),
    Column("source_user", String(255), nullable=False, default="%u"),
    Column("subscribed_only", Boolean, nullable=False, default=False),
    Column("notice", Boolean, nullable=False, default=True),
    Column("verify_tls", Boolean, nullable=False, default=True),
    # PEM certificates of a private CA that signed the old server's certificate (--source-ca),
    # trusted beside the system's CAs. Content, not a path: see migrating_proxy/cacerts.py.
    Column("source_ca", Text, nullable=True),
    # The copy engine for this domain's accounts (`domain add --engine`): imap | dsync;
    # NULL: `migration.engine` of the configuration.
    Column("engine", String(8), nullable=True),
    # The old server's administrator (`--source-admin`, schema version 9): copies log in as
    # each user through it. Its password is in `domain_vault`, encrypted, never here.
    Column("source_admin", String(320), nullable=True),
    # authzid: SASL PLAIN with the user as authorization identity (RFC 4616);
    # separator: LOGIN "user<separator>admin" (Dovecot's auth_master_user_separator).
    Column("source_admin_style", String(16), nullable=True),
    Column("source_admin_separator", String(8), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

accounts = Table(
    "accounts",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("address", String(320), nullable=False),  # as first seen, domain lower-cased
    # Lower-cased address: the unique key, so Alice@ and alice@ are one account.
    Column("address_key", String(320), nullable=False, unique=True),
    Column("domain", String(255), nullable=False, index=True),
    Column("password_hash", String(512), nullable=False),  # passlib form, e.g. $6$...
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("last_login_at", DateTime(timezone=True), nullable=True),
    # Migration bookkeeping; NULL migration_state means "never migrated" (a plain local account).
    Column("migration_state", String(16), nullable=True),  # NEW PENDING ERROR COMPLETED
    Column("source_url", String(512), nullable=True),  # per-user override of the domain's
    Column("source_login", String(320), nullable=True),
    Column("notice_inserted_at", DateTime(timezone=True), nullable=True),
    # Where the account's sessions and mail go: "old" (the old server, passthrough until the
    # switch) or "store". Flipped once, with switched_at, by AccountStore.complete_switch.
    Column("served_by", String(8), nullable=False, default="store"),
    Column("switched_at", DateTime(timezone=True), nullable=True),
    # While set and in the future, the account is being switched: new logins wait for it.
    Column("hold_until", DateTime(timezone=True), nullable=True),
)

# One row per account that has (had) a migration: what the admin views show.
migrations = Table(
    "migrations",
    metadata,
    Column("account_id", Integer, ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True),
    Column("folders_total", Integer, nullable=False, default=0),
    Column("folders_done", Integer, nullable=False, default=0),
    Column("messages_total", Integer, nullable=False, default=0),
    Column("messages_copied", Integer, nullable=False, default=0),
    Column("messages_skipped", Integer, nullable=False, default=0),
    Column("bytes_copied", BigInteger, nullable=False, default=0),
    Column("last_error", Text, nullable=True),
    Column("started_at", DateTime(timezone=True), nullable=True),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    Column("last_pass_at", DateTime(timezone=True), nullable=True),
    # The engine that copies this account (migration/dsync.py): NULL until its first pass
    # chose one; "dsync" is recorded before dsync's first backup starts, "imap" when the
    # account fell back to the imap engine, with the reason in engine_note.
    Column("copy_engine", String(8), nullable=True),
    Column("engine_note", Text, nullable=True),
    # Set at the switch: true when the store kept the old server's UIDs (dsync), else false.
    Column("uids_kept", Boolean, nullable=True),
    # Set at the switch (schema version 8): "kept" when every old POP3 UIDL is served again,
    # "unmatched: N" when N old messages could not be matched; NULL: "none" (no POP3 source).
    Column("pop3_uidls", String(32), nullable=True),
    # When the last pre-stage pass (through the old server's admin, before the user's first
    # login) completed; schema version 9.
    Column("prestaged_at", DateTime(timezone=True), nullable=True),
)

# The job queue shared by every worker process (and machine, on PostgreSQL).
jobs = Table(
    "jobs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("account_id", Integer, ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False),
    Column("kind", String(16), nullable=False),  # full | incremental
    Column("state", String(16), nullable=False),  # queued running done failed paused
    # The old server's host: claims cap how many copies run against one host at a time.
    Column("source_host", String(255), nullable=False),
    Column("not_before", DateTime(timezone=True), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("claimed_by", String(255), nullable=True),
    Column("heartbeat_at", DateTime(timezone=True), nullable=True),
    Column("last_error", Text, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    Index("ix_jobs_state_not_before", "state", "not_before"),
)

# Captured or imported passwords, encrypted at rest, erased once a migration no longer needs them.
vault = Table(
    "vault",
    metadata,
    Column("account_id", Integer, ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True),
    Column("ciphertext", LargeBinary, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

# Domain secrets (schema version 9): the old server's admin password, encrypted with the vault's
# key like `vault`, kept until the admin credentials are changed or the domain removed.
domain_vault = Table(
    "domain_vault",
    metadata,
    Column("domain_id", Integer, ForeignKey("domains.id", ondelete="CASCADE"), primary_key=True),
    Column("ciphertext", LargeBinary, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

# The pre-stage pacing of each old host (schema version 9): the moment (epoch seconds) from
# which the next batch may be read. Workers on every machine reserve their batches here, so
# `migration.prestage_rate` holds for all of them together (store/pacing.py).
host_pacing = Table(
    "host_pacing",
    metadata,
    Column("host", String(255), primary_key=True),
    Column("next_at", Float, nullable=False),
)

# Old-server POP3 UIDLs of migrated messages, so POP3 clients need not download everything again.
# A POP3-sourced copy records each copied message's UIDL; at the switch every row is replaced by
# the old server's listing then (migration/pop3_uidls.py), with `position` (its message number
# there) and `store_uidl` (the UIDL the store gives its copy; NULL: not matched): the relay
# answers a POP3 client's UIDL with `uidl` for `store_uidl` (frontends/uidl.py).
pop3_uidls = Table(
    "pop3_uidls",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("account_id", Integer, ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False),
    Column("uidl", String(70), nullable=False),
    Column("size", Integer, nullable=False),
    Column("position", Integer, nullable=True),  # schema version 8
    Column("store_uidl", String(70), nullable=True),  # schema version 8
    UniqueConstraint("account_id", "uidl"),
)

# Requests to close an account's live sessions on every proxy process sharing this database
# (store/sessions.py): written by whoever needs it (the cutover's switch), polled by `serve`.
close_requests = Table(
    "close_requests",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("address_key", String(320), nullable=False),
    Column("reason", String(200), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, index=True),
)

# Sessions relayed to an account's old server right now (passthrough), one row each, kept by the
# `serve` process relaying it: a switch waits until its account has none left before the final
# pass, so nothing changes the old mailbox behind that pass. See store/cutover.py.
old_sessions = Table(
    "old_sessions",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("account_id", Integer, ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False,
           index=True),
    Column("process", String(255), nullable=False),  # host:pid of the serve process
    Column("seen_at", DateTime(timezone=True), nullable=False),  # refreshed while it lives
)

# Views (store/views.py) depend on these tables: drop_all() drops them first.
drop_views_with(metadata)

# -- the web console (schema version 7) --------------------------------------------------------
# Admin accounts of the web console and the API. Passwords are passlib hashes; API tokens and
# session ids are random 256-bit values stored as their SHA-256 (a leaked table opens nothing).
admin_users = Table(
    "admin_users",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("password_hash", String(512), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

admin_tokens = Table(
    "admin_tokens",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("user_id", Integer, ForeignKey("admin_users.id", ondelete="CASCADE"), nullable=False),
    Column("token_hash", String(64), nullable=False, unique=True),  # SHA-256, hex
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("last_used_at", DateTime(timezone=True), nullable=True),
)

web_sessions = Table(
    "web_sessions",
    metadata,
    Column("id_hash", String(64), primary_key=True),  # SHA-256 of the cookie's value, hex
    Column("user_id", Integer, ForeignKey("admin_users.id", ondelete="CASCADE"), nullable=False),
    Column("csrf_token", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),  # slides with each request
)

# The audit trail: one row per admin action, from the CLI and the web alike.
admin_actions = Table(
    "admin_actions",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("at", DateTime(timezone=True), nullable=False, index=True),
    Column("who", String(255), nullable=False),  # OS user (CLI) or admin user (web, API)
    Column("via", String(8), nullable=False),  # cli | web | api | auto (the workers)
    Column("action", String(32), nullable=False),
    Column("details", Text, nullable=False),  # JSON: accounts, domain, result counts...
)

# For the console's pages of status rows: a domain's accounts in address order, with their
# state, so that counting, filtering by state and paging read the index alone; and each
# account's jobs.
WEB_INDEXES = (
    Index("ix_accounts_domain_address_state", accounts.c.domain, accounts.c.address_key,
          accounts.c.migration_state),
    Index("ix_jobs_account_id", jobs.c.account_id),
)

WEB_TABLES = (admin_users, admin_tokens, web_sessions, admin_actions)
