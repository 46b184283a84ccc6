"""Admin users of the web console and the API (`migrating-proxy admin-user ...`).

Passwords are hashed with the configured passlib scheme, like the mail accounts' (never logged,
never stored in clear); API tokens are random and stored as digests (store/admins.py).
"""

from __future__ import annotations

import functools
import secrets

from migrating_proxy.admin import Actor, audit
from migrating_proxy.passwords import PasswordHasher
from migrating_proxy.store import Store
from migrating_proxy.store.admins import AdminStore, AdminUser


def add_user(store: Store, hasher: PasswordHasher, actor: Actor, name: str,
             password: str) -> AdminUser:
    user = AdminStore(store.engine).add_user(name, hasher.hash(password))
    audit(store.engine, actor, "admin_user_add", name=name)
    return user


def set_password(store: Store, hasher: PasswordHasher, actor: Actor, name: str,
                 password: str) -> None:
    AdminStore(store.engine).set_password_hash(name, hasher.hash(password))
    audit(store.engine, actor, "admin_user_passwd", name=name)


def remove_user(store: Store, actor: Actor, name: str) -> None:
    AdminStore(store.engine).remove_user(name)
    audit(store.engine, actor, "admin_user_remove", name=name)


def new_token(store: Store, actor: Actor, name: str) -> str:
    token = AdminStore(store.engine).new_token(name)
    audit(store.engine, actor, "admin_token_add", name=name)
    return token


def revoke_tokens(store: Store, actor: Actor, name: str) -> int:
    revoked = AdminStore(store.engine).revoke_tokens(name)
    audit(store.engine, actor, "admin_token_revoke", name=name, revoked=revoked)
    return revoked


def check_login(store: Store, hasher: PasswordHasher, name: str,
                password: str) -> AdminUser | None:
    """The user if the password is theirs. An unknown name costs a hash check all the same,
    so the answer's timing does not tell which names exist."""
    user = AdminStore(store.engine).get_user(name)
    stored = user.password_hash if user else _decoy_hash(hasher)
    verification = hasher.verify(password, stored)
    if user is None or not verification.ok:
        return None
    if verification.new_hash:  # the configured scheme or cost changed since: upgrade it
        AdminStore(store.engine).set_password_hash(name, verification.new_hash,
                                                   end_sessions=False)
    return user


@functools.cache
def _decoy_hash(hasher: PasswordHasher) -> str:
    """A hash at the configured cost of a password nobody knows (made once per process)."""
    return hasher.hash(secrets.token_urlsafe(16))


