"""The one lock of a run directory: ``<dir>/.run.lock``, held by the process that trains the run.

The lock is an exclusive ``flock`` on the file, which holds the owner's pid and start time (``"pid
start"``, for messages). The kernel drops a ``flock`` when its process ends, however it ends (Ctrl-C,
``kill -9``, a crash, a reboot), so a lock file left by a dead process is stale by construction: the
next run takes it over (and says whose it was). The trainer holds the lock of its output directory for
the whole run (a second run into the same directory is refused with the owner's pid); the reproduce
queue takes the same lock before it starts a run, so that several queues can share a runs directory.
The lock is re-entrant within a process (the queue's run calls the trainer, which locks again).
The owner removes the file when it releases the lock.

On systems without ``fcntl`` (Windows) the file is written but not enforced.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Dict, List, Optional, Tuple

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".run.lock"

#: the locks this process holds: real path -> [fd, depth]
_HELD: Dict[str, List[int]] = {}


class RunDirInUse(RuntimeError):
    """The run directory is locked by another live process."""

    def __init__(self, out: str, owner: Tuple[int, str]):
        pid = owner[0]
        who = f"process {pid}" if pid else "another process"
        super().__init__(f"{out} is in use by {who} (its lock {os.path.join(out, LOCK_NAME)}): wait for that run "
                         f"to end or choose another --out")
        self.out, self.pid = out, pid


def _start_time(pid: int) -> str:
    """The start time of a process (Linux /proc; '' elsewhere), written beside the pid for messages."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def lock_owner(out: str) -> Tuple[int, str]:
    """(pid, start time) written in the lock file of ``out``; (0, '') when there is none or it is unreadable."""
    try:
        with open(os.path.join(out, LOCK_NAME)) as f:
            parts = f.read().split()
        return int(parts[0]), (parts[1] if len(parts) > 1 else "")
    except (OSError, ValueError, IndexError):
        return 0, ""


def _path(out: str) -> str:
    return os.path.realpath(os.path.join(out, LOCK_NAME))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def held_by_other(out: str) -> bool:
    """Whether another live process holds the lock of ``out``, from the pid and start time in its file (a
    probe that never takes the lock itself, so it cannot get in a starting run's way)."""
    pid, start = lock_owner(out)
    if not pid or pid == os.getpid() or not _alive(pid):
        return False
    return not start or not _start_time(pid) or start == _start_time(pid)


def try_lock(out: str, log: Optional[Callable[[str], None]] = None) -> Optional[Callable[[], None]]:
    """Takes the lock of ``out`` (creating the folder); returns its release function, or None when another
    live process holds it. ``log`` hears when a stale lock (of a process that is gone) is taken over."""
    os.makedirs(out, exist_ok=True)
    path = _path(out)
    if path in _HELD:
        _HELD[path][1] += 1
        return lambda: _release(path)
    for _ in range(100):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
        try:  # the file locked must still be the one at the path (an owner removes it when it releases)
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        previous = os.read(fd, 100).decode("ascii", "replace").split()
        if previous and log is not None:
            log(f"took over the stale lock {path} of process {previous[0]}, which no longer holds it")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {_start_time(os.getpid())}\n".encode(), 0)
        _HELD[path] = [fd, 1]
        return lambda: _release(path)
    raise RuntimeError(f"could not take the lock {path}: it keeps being replaced")


def _release(path: str) -> None:
    held = _HELD.get(path)
    if held is None:
        return
    held[1] -= 1
    if held[1] > 0:
        return
    del _HELD[path]
    try:
        os.remove(path)  # while still holding it: a waiting process then locks a fresh file
    except OSError:
        pass
    os.close(held[0])


@contextlib.contextmanager
def run_lock(out: str, log: Optional[Callable[[str], None]] = None):
    """Holds the lock of ``out`` for the block; RunDirInUse (naming the owner's pid) when another live
    process holds it."""
    release = try_lock(out, log)
    if release is None:
        raise RunDirInUse(out, lock_owner(out))
    try:
        yield
    finally:
        release()
