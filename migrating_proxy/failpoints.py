"""Named crash points and gates, for the tests that prove crash safety and the admin controls.

`MIGRATING_PROXY_FAILPOINTS=switch.held,switch.switched` in a process's environment makes that
process kill itself with SIGKILL when it reaches one of those points: exactly what `kill -9`
would do there, at a moment a test could otherwise only hit by luck.

`NAME@PATH` instead makes the process wait at NAME for as long as the file PATH exists: a gate
that holds it at that moment (a copy between two batches) while the test does something else,
and that the test opens by deleting the file (a `failpoint_waiting` event says it got there).
Unset (production), `reach` is two lookups in empty collections.
"""

from __future__ import annotations

import os
import signal
import time

import structlog

ENV_VAR = "MIGRATING_PROXY_FAILPOINTS"
GATE_POLL = 0.05  # seconds between looks at a gate's file
_ENTRIES = [entry for entry in os.environ.get(ENV_VAR, "").split(",") if entry]
_ARMED = frozenset(entry for entry in _ENTRIES if "@" not in entry)
_GATES = dict(entry.split("@", 1) for entry in _ENTRIES if "@" in entry)


def reach(name: str) -> None:
    if name in _ARMED:
        os.kill(os.getpid(), signal.SIGKILL)
    gate = _GATES.get(name)
    if gate is not None and os.path.exists(gate):
        structlog.get_logger(__name__).info("failpoint_waiting", failpoint=name)
        while os.path.exists(gate):
            time.sleep(GATE_POLL)
