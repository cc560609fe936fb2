"""Failpoints for the kill tests (`bench/faults.py`): inert unless NUCLASS_KILL_AT is set.

NUCLASS_KILL_AT="commit.during:2" SIGKILLs this process the 2nd time it reaches the point
`commit.during`. A point whose name ends in `.during` arms a timer instead, which fires
0..NUCLASS_KILL_MS ms (default 10) later: while the write that follows the point is under way.
With NUCLASS_KILL_ONCE=PATH the count is ignored across processes: the first process to reach
the point while PATH is absent creates it and dies, all others carry on (a task retried in a
new worker process then runs through).

Pause points, for the tests of concurrent commands: NUCLASS_PAUSE_AT="predict.write" makes
`pause("predict.write")` create NUCLASS_PAUSE_FILE + ".reached" and wait until
NUCLASS_PAUSE_FILE exists (two minutes at most), so a test can start a second command while
the first is held at a known place.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path

_SPEC = os.environ.get("NUCLASS_KILL_AT", "")
_hits: dict[str, int] = {}


def point(name: str) -> None:
    if not _SPEC:
        return
    target, _, nth = _SPEC.partition(":")
    if target != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] != int(nth or 1) and not os.environ.get("NUCLASS_KILL_ONCE"):
        return
    if name.endswith(".during"):
        delay = random.uniform(0, float(os.environ.get("NUCLASS_KILL_MS", "10"))) / 1000
        threading.Timer(delay, _die).start()
    else:
        _die()


def _die() -> None:
    once = os.environ.get("NUCLASS_KILL_ONCE")
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return
    os.kill(os.getpid(), signal.SIGKILL)


def pause(name: str) -> None:
    if os.environ.get("NUCLASS_PAUSE_AT") != name:
        return
    go = Path(os.environ["NUCLASS_PAUSE_FILE"])
    Path(f"{go}.reached").touch()
    deadline = time.monotonic() + 120
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
