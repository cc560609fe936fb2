"""Advisory file locks that serialise a store's writers and tell live runs from dead ones.

Lance commits are atomic, but "read which keys are stored, then append the others" is two
steps: two writers can both find a key missing and both append it (concurrent Lance appends,
and merge-inserts of new keys, do not conflict). Holding `StoreLock` around the check and the
commit closes that gap. The locks are `flock`s: the kernel drops them when their holder exits,
however it exits (kill -9 included), so a crash never leaves a stale lock behind.

Object-store URIs (s3://, gs://) have no such lock: there, run one writer per table.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

_held: dict[str, list] = {}  # path -> [fd, depth]: re-entrant within a process
_mutex = threading.RLock()


@contextlib.contextmanager
def exclusive(path: str | Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if missing), waiting for other holders
    (`on_wait` is called first when it has to wait: to say why nothing happens).

    Re-entrant in one process (nested `with` blocks on the same path hold it once).
    """
    key = str(Path(path).absolute())
    with _mutex:
        entry = _held.get(key)
        if entry is None:
            Path(key).parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    if on_wait is not None:
                        on_wait()
                    fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                raise
            entry = _held[key] = [fd, 0]
        entry[1] += 1
        try:
            yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del _held[key]
                fcntl.flock(entry[0], fcntl.LOCK_UN)
                os.close(entry[0])


class LifeLock:
    """A lock file held for as long as a process is doing something (an extraction run).

    Another process can ask `is_alive(path)`: if it can take the lock, the holder is gone.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_SH)

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    @staticmethod
    def is_alive(path: str | Path) -> bool:
        """Whether some process still holds the lock at `path` (False if there is no file)."""
        return _would_wait(path, fcntl.LOCK_EX)


class Busy(Exception):
    """`file_lock(..., wait=False)`: another holder has the lock."""


@contextlib.contextmanager
def file_lock(path: str | Path, *, shared: bool = False, wait: bool = True) -> Iterator[bool]:
    """Hold a shared or exclusive flock on `path` for the `with` block; yields whether it is held.

    Not re-entrant: in one process, two exclusive holds (or exclusive plus shared) of the same
    path block each other. With wait=False a held lock raises `Busy` at once. A lock file that
    cannot be made (a read-only run folder) is opened read-only, and when it cannot be opened at
    all (no such folder) a shared hold goes on unlocked (yields False): nobody can write there.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:  # no folder there (or a file): nothing to hold, the caller says what is wrong
            if not shared:
                raise
            yield False
            return
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise Busy(str(path)) from None
        yield True
    finally:
        os.close(fd)  # closing the only descriptor releases the flock


def held_exclusively(path: str | Path) -> bool:
    """Whether some process holds an exclusive flock on `path` (not merely shared ones)."""
    return _would_wait(path, fcntl.LOCK_SH)


def _would_wait(path: str | Path, mode: int) -> bool:
    """Whether taking a `mode` flock on `path` would wait for another holder (False: no file)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)
