"""Who may use a run folder at once: one `heads train`, or any number of readers.

`heads train` replaces a run's checkpoints, retires what was made from them and refits the
post-hoc rules: a second train into the same folder would interleave two trainings' files, and
an eval, predict, report or explain running meanwhile would read half of each. So train holds
RUN/.heads.lock exclusively and readers hold it shared, neither waiting: whoever comes second
is refused in one line. Training also leaves RUN/.training from its first saved file until the
post-hoc rules are fitted; a reader that finds it with no train running knows the run was left
half-written (killed while saving) and says which stage to train again.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from embedstore.errors import UserError
from embedstore.locking import Busy, file_lock, held_exclusively

LOCK = ".heads.lock"
MARKER = ".training"


@contextlib.contextmanager
def training(run_dir: Path) -> Iterator[None]:
    """Hold `run_dir` for `heads train` (refused while another command uses it)."""
    try:
        with file_lock(run_dir / LOCK, wait=False):
            yield
    except Busy:
        who = ("another `heads train` is training into it" if held_exclusively(run_dir / LOCK)
               else "a `heads eval`, `predict`, `report` or `explain` is reading it")  # fmt: skip
        raise UserError(f"run folder {run_dir} is in use: {who}; wait for that to finish, or train into "
                        "another --out") from None  # fmt: skip


@contextlib.contextmanager
def reading(run_dir: str | Path) -> Iterator[None]:
    """Hold `run_dir` for reading its models (refused while `heads train` writes them, or when a
    train was stopped half-way through saving them)."""
    run_dir = Path(run_dir)
    try:
        with file_lock(run_dir / LOCK, shared=True, wait=False):
            check_complete(run_dir)
            yield
    except Busy:
        raise UserError(f"`heads train` is training into {run_dir} right now: its checkpoints are being "
                        "replaced; wait for it to finish, then run this again") from None  # fmt: skip


F = TypeVar("F", bound=Callable[..., Any])


def reads_run(fn: F) -> F:
    """Run `fn(run_dir, ...)` inside `reading(run_dir)`."""

    @functools.wraps(fn)
    def wrapper(run_dir: str | Path, *args: Any, **kwargs: Any) -> Any:
        with reading(run_dir):
            return fn(run_dir, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


ORDER = ("all", "local", "global", "gate")


def mark_started(run_dir: Path, stage: str) -> None:
    """Note that `stage`'s training has begun changing `run_dir`'s files. A mark left by a
    stopped train stays when it names an earlier stage: training that one again redoes both."""
    left = _marked_stage(run_dir)
    if left is not None and ORDER.index(left) <= ORDER.index(stage):
        return
    (run_dir / MARKER).write_text(json.dumps({"stage": stage}) + "\n")


def mark_finished(run_dir: Path) -> None:
    (run_dir / MARKER).unlink(missing_ok=True)


def check_complete(run_dir: Path) -> None:
    stage = _marked_stage(run_dir)
    if stage is None:
        return
    raise UserError(
        f"training of stage `{stage}` into {run_dir} stopped before it finished (the process was killed "
        f"or failed while saving), so its files may not belong together: run `heads train --stage {stage} "
        f"--out {run_dir}` again (with the same options) to finish it"
    )


def _marked_stage(run_dir: Path) -> str | None:
    """The stage a stopped train left marked (None: no mark; "all" when the mark is unreadable)."""
    try:
        stage = json.loads((run_dir / MARKER).read_text()).get("stage")
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError, AttributeError):
        return "all"
    return stage if stage in ORDER else "all"
