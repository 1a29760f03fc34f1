"""Locks that die with their process: `flock(2)` through `filelock`, in `<data root>/_locks/`.

The kernel drops a flock when the process holding it ends, however it ends (kill -9, the OOM
killer, a power-cut of the process): nothing to expire, no server to remember it, no slot to
delete by hand. Each acquisition opens its own descriptor, so two threads of one process
exclude each other too. A holder writes who it is next to the lock (`<name>.lock.json`); a waiter
logs that every `every` seconds, with the way out, instead of hanging silently.

Scope: processes that share the folder (one machine, or a filesystem with working flock such as
NFSv4). On an object-store root the locks live in the local `geofeat-data/` beside the Prefect home,
so they guard this machine only (docs/object-storage.md).
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from filelock import FileLock, Timeout

from storage.layout import DataRoot
from storage.publish import write_json
from storage.sources import url_fs

log = logging.getLogger(__name__)

LOCKS_DIR = "_locks"
WAIT_LOG_S = 30.0  # s between "still waiting" lines


def local_base(root: DataRoot) -> str:
    """The local folder of a root's locks: the root itself, or (object stores) the local folder that
    holds its Prefect home."""
    if root.is_local:
        return url_fs(root.url)[1].rstrip("/") or "/"
    return posixpath.dirname(root.prefect_home)


def lock_path(root: DataRoot, name: str) -> str:
    return posixpath.join(local_base(root), LOCKS_DIR, f"{name}.lock")


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: written by the holder right after it got the lock."""

    pid: int
    host: str
    what: str
    since: str  # ISO 8601, UTC

    def alive(self) -> bool | None:
        """Is the holder's process running? None when it runs on another host."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def describe(self) -> str:
        try:
            held_s = (datetime.now(timezone.utc) - datetime.fromisoformat(self.since)).total_seconds()
            age = f" for {held_s:.0f} s"
        except ValueError:
            age = ""
        host = "" if self.host == socket.gethostname() else f" on host {self.host}"
        return f"pid {self.pid}{host} ({self.what}), since {self.since}{age}"


def holder_path(path: str) -> str:
    return f"{path}.json"


def holder_of(path: str) -> Holder | None:
    """The holder a lock file's neighbour names, if any (it may be stale: see Holder.alive)."""
    try:
        with open(holder_path(path)) as f:
            return Holder(**json.load(f))
    except (OSError, ValueError, TypeError):
        return None


def _holder_line(path: str) -> tuple[str, str]:
    """(who holds the lock at `path`, how to free it), for a waiting run's log."""
    holder = holder_of(path)
    if holder is not None and holder.alive() is not False:
        free = f"stop that process (kill {holder.pid})" if holder.alive() else f"stop pid {holder.pid} on {holder.host}"
        return f"held by {holder.describe()}", free
    return "held by a process that has not said who it is yet", f"`fuser {path}` names it"


def _waiting_line(paths: list[str], what: str, waited: float) -> str:
    lines = [_holder_line(p) for p in paths]
    who = "; ".join(w for w, _ in lines) if len(paths) == 1 else \
        "; ".join(f"slot {i}: {w}" for i, (w, _) in enumerate(lines))
    free = "; or ".join(f for _, f in lines)
    where = paths[0] if len(paths) == 1 else f"{len(paths)} slots, {paths[0]}..."
    return (f"waiting {waited:.0f} s for {what} ({where}): {who}. A lock is released as soon as its process "
            f"ends, even if it crashes. To stop waiting, press Ctrl-C or cancel this run; to free it, {free}")


def _acquire(paths: list[str], what: str, log, every: float, poll: float) -> tuple[FileLock, str]:
    """One of the locks at `paths`: at once if one is free, else as soon as one is, logging every `every` s."""
    locks = [FileLock(p) for p in paths]

    def any_free() -> tuple[FileLock, str] | None:
        for lock, path in zip(locks, paths):
            try:
                lock.acquire(timeout=0)
                return lock, path
            except Timeout:
                continue
        return None

    got = any_free()
    if got is not None:
        return got
    started, logged = time.monotonic(), float("-inf")
    while True:
        if time.monotonic() - logged >= every:
            log.warning(_waiting_line(paths, what, time.monotonic() - started))
            logged = time.monotonic()
        if len(locks) == 1:  # one slot: block on it (no polling) until the next log line is due
            try:
                locks[0].acquire(timeout=max(0.0, every - (time.monotonic() - logged)))
                got = locks[0], paths[0]
            except Timeout:
                got = None
        else:
            time.sleep(poll)
            got = any_free()
        if got is not None:
            log.info("got %s after %.0f s", what, time.monotonic() - started)
            return got


@contextmanager
def held(path: str | list[str], what: str, *, by: str | None = None,
         log: logging.Logger | logging.LoggerAdapter = log, every: float = WAIT_LOG_S,
         poll: float = 0.25) -> Iterator[None]:
    """Hold the exclusive lock at `path` (a local file), or one of several (`path` a list: that many
    slots), for the block, waiting as long as it takes and logging who holds them every `every`
    seconds. `what`: the lock, for the log lines; `by`: this holder, for the lines of those who wait
    (default: `what`)."""
    paths = [path] if isinstance(path, str) else list(path)
    for folder in {posixpath.dirname(p) for p in paths}:
        os.makedirs(folder, exist_ok=True)
    lock, path = _acquire(paths, what, log, every, poll)
    try:
        try:
            write_json(holder_path(path), asdict(Holder(os.getpid(), socket.gethostname(), by or what,
                                                        datetime.now(timezone.utc).isoformat(timespec="seconds"))))
        except OSError as exc:  # who holds it is information; the lock itself is what matters
            log.debug("could not write %s: %s", holder_path(path), exc)
        yield
    finally:
        try:
            os.remove(holder_path(path))  # before the release: the next holder writes its own after
        except OSError:
            pass
        lock.release()
