"""Failpoints for the kill tests (`bench/faults.py`): inert unless NUCLASS_KILL_AT is set.

NUCLASS_KILL_AT="commit.during:2" SIGKILLs this process the 2nd time it reaches the point
`commit.during`. A point whose name ends in `.during` arms a timer instead, which fires
0..NUCLASS_KILL_MS ms (default 10) later: while the write that follows the point is under way.
"""

from __future__ import annotations

import os
import random
import signal
import threading

_SPEC = os.environ.get("NUCLASS_KILL_AT", "")
_hits: dict[str, int] = {}


def point(name: str) -> None:
    if not _SPEC:
        return
    target, _, nth = _SPEC.partition(":")
    if target != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] != int(nth or 1):
        return
    if name.endswith(".during"):
        delay = random.uniform(0, float(os.environ.get("NUCLASS_KILL_MS", "10"))) / 1000
        threading.Timer(delay, _die).start()
    else:
        _die()


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
