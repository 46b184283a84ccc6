"""Admin operations behind the command line: bulk import, migrate/stop/start/resync, cut-over.

The CLI (cli.py) only parses arguments and prints; the logic lives here so it can be tested and
reused. Every admin action is logged once as a structured `admin_action` event saying who (the
OS user running the command), what and on which accounts; structlog stamps the when.
"""

from __future__ import annotations

import getpass

import structlog

log = structlog.get_logger("migrating_proxy.admin")
MAX_LISTED = 100  # an --all over thousands of accounts logs the first ones and the count


def os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry and no $USER: a container, say
        return "unknown"


def audit(action: str, **details: object) -> None:
    """Log one admin action. Never pass secrets: only addresses, counts and names."""
    for name, value in list(details.items()):
        if isinstance(value, list) and len(value) > MAX_LISTED:
            details[name] = value[:MAX_LISTED]
            details[f"{name}_count"] = len(value)
    log.info("admin_action", who=os_user(), action=action, **details)
