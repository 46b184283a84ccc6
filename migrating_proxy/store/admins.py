"""Admin users of the web console and the API: passwords, API tokens, login sessions.

Only digests are stored: passwords as passlib hashes (made by the caller), API tokens and
session ids as SHA-256 of random 256-bit values, which need no slow hash to be safe. The clear
token is shown once, when it is made; the clear session id lives only in the browser's cookie.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from migrating_proxy.store.accounts import StoreError, now
from migrating_proxy.store.schema import admin_tokens, admin_users, web_sessions

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
TOUCH_EVERY = timedelta(seconds=60)  # how stale a token's last_used_at may get
TOKEN_PREFIX = "mpt_"  # makes a leaked token easy to recognise (and to grep for)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class AdminUser:
    id: int
    name: str
    password_hash: str
    created_at: datetime


@dataclass(frozen=True)
class WebSession:
    user: AdminUser
    csrf_token: str
    expires_at: datetime


class AdminStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # -- users ---------------------------------------------------------------------------
    def add_user(self, name: str, password_hash: str) -> AdminUser:
        if not NAME_PATTERN.fullmatch(name):
            raise StoreError(f"{name!r} is not an admin user name (letters, digits, . _ @ -; "
                             "at most 64)")
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(admin_users).values(
                    name=name, password_hash=password_hash, created_at=now()))
        except IntegrityError:
            raise StoreError(f"admin user {name} already exists") from None
        user = self.get_user(name)
        assert user is not None
        return user

    def get_user(self, name: str) -> AdminUser | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(admin_users).where(admin_users.c.name == name)).first()
        return _user(row) if row else None

    def require_user(self, name: str) -> AdminUser:
        user = self.get_user(name)
        if user is None:
            raise StoreError(f"unknown admin user {name}")
        return user

    def list_users(self) -> list[AdminUser]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(admin_users).order_by(admin_users.c.name)).all()
        return [_user(row) for row in rows]

    def set_password_hash(self, name: str, password_hash: str, end_sessions: bool = True) -> None:
        """A new password also ends every session of the user (tokens stay), unless it is the
        same password re-hashed at a new cost."""
        user = self.require_user(name)
        with self.engine.begin() as conn:
            conn.execute(update(admin_users).where(admin_users.c.id == user.id)
                         .values(password_hash=password_hash))
            if end_sessions:
                conn.execute(delete(web_sessions).where(web_sessions.c.user_id == user.id))

    def remove_user(self, name: str) -> None:
        user = self.require_user(name)
        # Tokens and sessions go with it, whatever the database does about ON DELETE CASCADE.
        with self.engine.begin() as conn:
            conn.execute(delete(admin_tokens).where(admin_tokens.c.user_id == user.id))
            conn.execute(delete(web_sessions).where(web_sessions.c.user_id == user.id))
            conn.execute(delete(admin_users).where(admin_users.c.id == user.id))

    # -- API tokens ----------------------------------------------------------------------
    def new_token(self, name: str) -> str:
        """A new API token for the user; the clear value is returned once, never stored."""
        user = self.require_user(name)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self.engine.begin() as conn:
            conn.execute(insert(admin_tokens).values(
                user_id=user.id, token_hash=digest(token), created_at=now()))
        return token

    def revoke_tokens(self, name: str) -> int:
        user = self.require_user(name)
        with self.engine.begin() as conn:
            return int(conn.execute(
                delete(admin_tokens).where(admin_tokens.c.user_id == user.id)).rowcount)

    def user_for_token(self, token: str) -> AdminUser | None:
        """The token's user. `last_used_at` is refreshed once a minute at most: a script
        polling the API must not cost a database write per request."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(admin_users, admin_tokens.c.last_used_at)
                .join(admin_tokens, admin_tokens.c.user_id == admin_users.c.id)
                .where(admin_tokens.c.token_hash == digest(token))).first()
        if row is None:
            return None
        if row.last_used_at is None or now() - _aware(row.last_used_at) > TOUCH_EVERY:
            with self.engine.begin() as conn:
                conn.execute(update(admin_tokens)
                             .where(admin_tokens.c.token_hash == digest(token))
                             .values(last_used_at=now()))
        return _user(row)

    # -- login sessions ------------------------------------------------------------------
    def open_session(self, user: AdminUser, lifetime: float) -> tuple[str, WebSession]:
        """(the cookie's value, the session); the value is stored only as its digest."""
        session_id = secrets.token_urlsafe(32)
        session = WebSession(user, secrets.token_urlsafe(32),
                             now() + timedelta(seconds=lifetime))
        with self.engine.begin() as conn:
            conn.execute(delete(web_sessions).where(web_sessions.c.expires_at < now()))
            conn.execute(insert(web_sessions).values(
                id_hash=digest(session_id), user_id=user.id, csrf_token=session.csrf_token,
                created_at=now(), expires_at=session.expires_at))
        return session_id, session

    def session(self, session_id: str, lifetime: float) -> WebSession | None:
        """The live session of a cookie, its expiry pushed back; None if unknown or expired."""
        key = digest(session_id)
        with self.engine.connect() as conn:
            row = conn.execute(
                select(web_sessions.c.csrf_token, web_sessions.c.expires_at, admin_users)
                .join(admin_users, admin_users.c.id == web_sessions.c.user_id)
                .where(web_sessions.c.id_hash == key)).first()
        if row is None or _aware(row.expires_at) <= now():
            return None
        expires = now() + timedelta(seconds=lifetime)
        if expires - _aware(row.expires_at) > timedelta(seconds=min(60.0, lifetime / 10)):
            with self.engine.begin() as conn:  # a write now and then, not on every poll
                conn.execute(update(web_sessions).where(web_sessions.c.id_hash == key)
                             .values(expires_at=expires))
        return WebSession(_user(row), row.csrf_token, expires)

    def close_session(self, session_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(web_sessions).where(web_sessions.c.id_hash == digest(session_id)))


def _aware(value: datetime) -> datetime:
    """SQLite hands back naive datetimes (stored in UTC)."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _user(row) -> AdminUser:  # type: ignore[no-untyped-def]
    return AdminUser(id=row.id, name=row.name, password_hash=row.password_hash,
                     created_at=row.created_at)
