"""Named crash points, for the tests that prove crash safety.

`MIGRATING_PROXY_FAILPOINTS=switch.held,switch.switched` in a process's environment makes that
process kill itself with SIGKILL when it reaches one of those points: exactly what `kill -9`
would do there, at a moment a test could otherwise only hit by luck. Unset (production), `reach`
is one lookup in an empty set.
"""

from __future__ import annotations

import os
import signal

ENV_VAR = "MIGRATING_PROXY_FAILPOINTS"
_ARMED = frozenset(name for name in os.environ.get(ENV_VAR, "").split(",") if name)


def reach(name: str) -> None:
    if name in _ARMED:
        os.kill(os.getpid(), signal.SIGKILL)
