"""Stop a process's temporary Prefect server when that process dies, however it dies.

Prefect starts its temporary server (no PREFECT_API_URL set) as a child process and stops it from
an exit handler; a process killed with SIGKILL (kill -9, the OOM killer) runs none, and the server
lived on, holding its port and the SQLite database. flows/env.py starts this watcher when a process
starts such a server: it notes which children of the process run the server app, waits for the
process to end, then stops them (SIGTERM, SIGKILL after STOP_S).

Standard library only, started as `python -I -S reaper.py PID` (a few MB, no imports of geofeat or
Prefect). Linux only (/proc); elsewhere it exits at once and the old behaviour remains.
"""

from __future__ import annotations

import os
import signal
import sys
import time

SERVER_APP = "prefect.server.api.server:create_app"  # what Prefect's temporary server runs (uvicorn --factory)
POLL_S = 1.0  # s between looks at the watched process
STOP_S = 10.0  # s from SIGTERM to SIGKILL


def _stat(pid: int) -> tuple[str, str] | None:
    """(state, start time) of a process from /proc/<pid>/stat; None when there is none."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], fields[19]


def running(pid: int, started: str) -> bool:
    """Is `pid` still the process that started at `started`, and not a zombie?"""
    stat = _stat(pid)
    return stat is not None and stat[1] == started and stat[0] not in ("Z", "X")


def children(pid: int) -> set[int]:
    found: set[int] = set()
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in threads:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found.update(int(c) for c in f.read().split())
        except (OSError, ValueError):
            continue
    return found


def is_server(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return SERVER_APP.encode() in f.read()
    except OSError:
        return False


def stop(servers: dict[int, str]) -> None:
    """SIGTERM the servers still running, SIGKILL what is left after STOP_S."""
    live = {pid: t for pid, t in servers.items() if running(pid, t)}
    for pid in live:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + STOP_S
    while live and time.monotonic() < deadline:
        time.sleep(0.2)
        live = {pid: t for pid, t in live.items() if running(pid, t)}
    for pid in live:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def watch(parent: int) -> None:
    """Note `parent`'s temporary-server children while it runs; stop them once it has ended."""
    stat = _stat(parent)
    if stat is None:
        return
    servers: dict[int, str] = {}
    while running(parent, stat[1]):
        for child in children(parent) - servers.keys():
            child_stat = _stat(child)
            if child_stat is not None and is_server(child):
                servers[child] = child_stat[1]
        time.sleep(POLL_S)
    stop(servers)


if __name__ == "__main__":
    if os.path.isdir("/proc"):
        watch(int(sys.argv[1]))
