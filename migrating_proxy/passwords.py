"""Password hashing: passlib's CryptContext, and the `{SCHEME}` form Dovecot reads.

Hashes are stored in passlib's own form ($6$..., $2b$...). The context marks hashes made with an
older scheme or cost as needing an update, so a login that proves the password re-hashes it
with the configured scheme: operators can upgrade schemes without a password reset.
"""

from __future__ import annotations

from dataclasses import dataclass

from passlib.context import CryptContext
from passlib.registry import get_crypt_handler

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


class PasswordHasher:
    def __init__(self, scheme: str = "sha512_crypt", rounds: int = 0) -> None:
        schemes = [scheme, *(s for s in _READABLE if s != scheme)]
        settings: dict[str, object] = {"schemes": schemes, "default": scheme,
                                       "deprecated": schemes[1:]}
        if rounds:
            settings[f"{scheme}__rounds"] = rounds
        self.context = CryptContext(**settings)
        self.scheme = scheme

    def hash(self, password: str) -> str:
        return self.context.hash(password)

    def verify(self, password: str, stored_hash: str) -> Verification:
        try:
            ok, new_hash = self.context.verify_and_update(password, stored_hash)
        except (ValueError, TypeError):  # malformed or unknown stored hash: never a match
            return Verification(False)
        return Verification(bool(ok), new_hash if ok else None)


# An account whose hash is still being computed (first login of a migrating user: the hash is
# made after the client got its OK). It must exist for the store's master login, but no
# password may match it: "!" is never the output of crypt().
PENDING_HASH = ""
LOCKED_DOVECOT_ENTRY = "{SHA512-CRYPT}!"


def dovecot_form(passlib_hash: str) -> str:
    """`{SHA512-CRYPT}$6$...`: the hash with the scheme prefix Dovecot's passdb expects."""
    if passlib_hash == PENDING_HASH:
        return LOCKED_DOVECOT_ENTRY
    if passlib_hash.startswith("{"):
        return passlib_hash
    prefixes = {"$6$": "SHA512-CRYPT", "$5$": "SHA256-CRYPT", "$1$": "MD5-CRYPT",
                "$2a$": "BLF-CRYPT", "$2b$": "BLF-CRYPT", "$2y$": "BLF-CRYPT",
                "$argon2id$": "ARGON2ID", "$argon2i$": "ARGON2I"}
    for prefix, scheme in prefixes.items():
        if passlib_hash.startswith(prefix):
            return f"{{{scheme}}}{passlib_hash}"
    raise ValueError("hash in a form Dovecot cannot read")
