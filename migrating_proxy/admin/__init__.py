"""Admin operations behind the command line and the web console: domains, bulk import,
migrate/stop/start/resync, cut-over, admin users.

The CLI (cli.py) and the web console (migrating_proxy/web) only parse requests and present
results; the logic lives here, so both do exactly the same thing. Every admin action goes
through `audit` once: a structured `admin_action` log event and a row in the audit trail
(store/audit.py), saying who (the OS user of a command, the admin user of the console or of an
API token), how, what and on which accounts, and when.
"""

from __future__ import annotations

import functools
import getpass
from dataclasses import dataclass

import structlog
from sqlalchemy import Engine

from migrating_proxy.store import audit as audit_trail

log = structlog.get_logger("migrating_proxy.admin")
MAX_LISTED = 100  # an --all over thousands of accounts records the first ones and the count


@functools.cache
def os_user() -> str:
    """Who runs this command. Asked once, before a command run by root becomes the service's
    user (cli.main): getpass falls back to the process's uid without LOGNAME or USER."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry and no $USER: a container, say
        return "unknown"


@dataclass(frozen=True)
class Actor:
    """Who asks: `via` is cli (an OS user), web (a console session) or api (a token)."""

    who: str
    via: str

    @classmethod
    def command_line(cls) -> Actor:
        return cls(os_user(), "cli")


def audit(engine: Engine, actor: Actor, action: str, **details: object) -> None:
    """Record one admin action. Never pass secrets: only addresses, counts and names.

    The action has happened by now, so a database that cannot take the row costs the row
    (with a warning in the log, which still has the event), never the action's answer.
    """
    for name, value in list(details.items()):
        if isinstance(value, list) and len(value) > MAX_LISTED:
            details[name] = value[:MAX_LISTED]
            details[f"{name}_count"] = len(value)
    log.info("admin_action", who=actor.who, via=actor.via, action=action, **details)
    try:
        audit_trail.record(engine, actor.who, actor.via, action, details)
    except Exception as exc:
        log.warning("audit_not_recorded", action=action, error=type(exc).__name__)
