"""Admin commands run by root act as the user the service runs as, as doveadm does.

On an installed system the service runs as `migrating-proxy` (the systemd units' User=) and
owns its state directory; administrators run the admin commands as root. Files those commands
create as root (SQLite's -wal and -shm files, a new domain's directory of provisioned users, the
vault key) would then be unwritable, or unreadable, by the service, which breaks it on its next
write. So a command run by root first becomes the owner of the state directory, when that
owner is not root. Files named on the command line are read before (see cli.InputFile);
`serve` switches once it has bound its ports and read its TLS key (server.acquire).
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path

from migrating_proxy.config import Config


def state_directory(config: Config) -> Path:
    """The directory the service writes to: the SQLite database's, else the provisioned
    users', else the vault key's."""
    if config.database_url.startswith("sqlite:///"):
        return Path(config.database_url.removeprefix("sqlite:///")).parent
    if config.provision.kind != "none" and config.provision.path is not None:
        return config.provision.path.parent
    return config.vault_key_path.parent


def service_user(config: Config) -> pwd.struct_passwd | None:
    """The state directory's owner when it is a user other than root; else None."""
    try:
        owner = state_directory(config).resolve().stat().st_uid
    except OSError:  # not created yet: whoever runs first creates it
        return None
    if owner == 0:
        return None
    try:
        return pwd.getpwuid(owner)
    except KeyError:  # a uid without a name cannot be switched to by name
        return None


def become_service_user(config: Config) -> str | None:
    """As root: switch to the service's user and its groups. The user's name, if switched."""
    if os.geteuid() != 0 or (user := service_user(config)) is None:
        return None
    os.initgroups(user.pw_name, user.pw_gid)
    os.setgid(user.pw_gid)
    os.setuid(user.pw_uid)
    return user.pw_name
