"""Password hashing: passlib's CryptContext, and the `{SCHEME}` form Dovecot reads.

Hashes are stored in passlib's own form ($6$..., $2b$...). The context marks hashes made with an
older scheme or cost as needing an update, so a login that proves the password re-hashes it
with the configured scheme: operators can upgrade schemes without a password reset.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
from dataclasses import dataclass

from passlib.context import CryptContext
from passlib.registry import get_crypt_handler

from migrating_proxy import lifeline, stopsignals

# passlib scheme -> Dovecot's password scheme name, for the provisioned passwd-file.
DOVECOT_SCHEMES = {
    "sha512_crypt": "SHA512-CRYPT",
    "sha256_crypt": "SHA256-CRYPT",
    "md5_crypt": "MD5-CRYPT",
    "bcrypt": "BLF-CRYPT",
    "argon2": "ARGON2ID",
    "ldap_salted_sha1": None,  # passlib already writes "{SSHA}..."
    "ldap_salted_sha256": None,
    "ldap_salted_sha512": None,
}

# Schemes we can read even if an operator moves away from them.
_READABLE = ["sha512_crypt", "sha256_crypt", "bcrypt", "md5_crypt", "ldap_salted_sha1"]


def known_scheme(name: str) -> bool:
    if name not in DOVECOT_SCHEMES:
        return False
    try:
        get_crypt_handler(name)
    except KeyError:
        return False
    return True


@dataclass(frozen=True)
class Verification:
    ok: bool
    new_hash: str | None = None  # set when the stored hash should be replaced (scheme upgrade)


def make_context(scheme: str, rounds: int) -> CryptContext:
    schemes = [scheme, *(s for s in _READABLE if s != scheme)]
    settings: dict[str, object] = {"schemes": schemes, "default": scheme,
                                   "deprecated": schemes[1:]}
    if rounds:
        settings[f"{scheme}__rounds"] = rounds
    return CryptContext(**settings)


def _verify(context: CryptContext, password: str, stored_hash: str) -> Verification:
    try:
        ok, new_hash = context.verify_and_update(password, stored_hash)
    except (ValueError, TypeError):  # malformed or unknown stored hash: never a match
        return Verification(False)
    return Verification(bool(ok), new_hash if ok else None)


class PasswordHasher:
    """Hashing and verifying, inline or in pools of processes.

    A strong hash costs a few hundred milliseconds of CPU, and crypt() holds the GIL all that
    time: in the proxy process every relayed session would stall for it. With `processes` the
    work runs in child processes and the calling thread waits without holding the GIL. The
    password crosses a local pipe to a child of our own; it is never logged or stored there.

    Hashes nobody is waiting for (a first login's, made after its OK) go to one more process at
    low CPU priority: a burst of first logins would otherwise fill every CPU with hashing while
    the next logins of the burst wait for theirs. The processes are started at once, from the
    constructing thread, and end with their parent (see lifeline.py).
    """

    BACKGROUND_NICENESS = 10

    def __init__(self, scheme: str = "sha512_crypt", rounds: int = 0,
                 processes: int = 0) -> None:
        self.context = make_context(scheme, rounds)
        self.scheme = scheme
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._background: concurrent.futures.ProcessPoolExecutor | None = None
        if processes:
            self._pool = _start_pool(processes, scheme, rounds, niceness=0)
            self._background = _start_pool(1, scheme, rounds, self.BACKGROUND_NICENESS)

    def hash(self, password: str, *, background: bool = False) -> str:
        """`background`: no client waits for this one; it yields the CPU to those that do."""
        pool = self._background if background else self._pool
        if pool is None:
            return self.context.hash(password)
        return pool.submit(_child_hash, password).result()

    def verify(self, password: str, stored_hash: str) -> Verification:
        if self._pool is None:
            return _verify(self.context, password, stored_hash)
        return self._pool.submit(_child_verify, password, stored_hash).result()

    def close(self) -> None:
        for pool in (self._pool, self._background):
            if pool is not None:
                pool.shutdown(cancel_futures=True)


def _start_pool(processes: int, scheme: str, rounds: int,
                niceness: int) -> concurrent.futures.ProcessPoolExecutor:
    pool = concurrent.futures.ProcessPoolExecutor(
        processes, mp_context=multiprocessing.get_context("spawn"),
        initializer=_child_init, initargs=(scheme, rounds, os.getpid(), niceness),
    )
    # Start every process now, from this thread (lifeline.py: the kernel's parent-death
    # signal follows the thread that started a child), and not during the first logins.
    try:
        with stopsignals.starting_a_child():
            for started in [pool.submit(os.getpid) for _ in range(processes)]:
                started.result()
    except BaseException:  # no process left behind
        pool.shutdown(cancel_futures=True)
        raise
    return pool


_child_context: CryptContext | None = None


def _child_init(scheme: str, rounds: int, parent_pid: int, niceness: int) -> None:
    global _child_context
    lifeline.follow(parent_pid)
    if niceness:
        os.nice(niceness)
    _child_context = make_context(scheme, rounds)


def _child_hash(password: str) -> str:
    assert _child_context is not None
    return _child_context.hash(password)


def _child_verify(password: str, stored_hash: str) -> Verification:
    assert _child_context is not None
    return _verify(_child_context, password, stored_hash)


# An account whose hash is still being computed (first login of a migrating user: the hash is
# made after the client got its OK). It must exist for the store's master login, but no
# password may match it: "!" is never the output of crypt().
PENDING_HASH = ""
LOCKED_DOVECOT_ENTRY = "{SHA512-CRYPT}!"

# passlib hash prefix -> Dovecot's scheme name. Also the CASE of the `dovecot_users` view
# (store/views.py), so files and view always agree.
DOVECOT_PREFIXES = {"$6$": "SHA512-CRYPT", "$5$": "SHA256-CRYPT", "$1$": "MD5-CRYPT",
                    "$2a$": "BLF-CRYPT", "$2b$": "BLF-CRYPT", "$2y$": "BLF-CRYPT",
                    "$argon2id$": "ARGON2ID", "$argon2i$": "ARGON2I"}


def dovecot_form(passlib_hash: str) -> str:
    """`{SHA512-CRYPT}$6$...`: the hash with the scheme prefix Dovecot's passdb expects."""
    if passlib_hash == PENDING_HASH:
        return LOCKED_DOVECOT_ENTRY
    if passlib_hash.startswith("{"):
        return passlib_hash
    for prefix, scheme in DOVECOT_PREFIXES.items():
        if passlib_hash.startswith(prefix):
            return f"{{{scheme}}}{passlib_hash}"
    raise ValueError("hash in a form Dovecot cannot read")
