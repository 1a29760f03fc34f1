"""The offline Prefect environment, set wherever geofeat starts Prefect.

Import this before `prefect`: Prefect reads its settings when it is first imported.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from storage.layout import ENV_HOME, DataRoot

OFFLINE = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",  # s; cold starts on 2 cores take ~20
    "PREFECT_CLI_COLORS": os.environ.get("PREFECT_CLI_COLORS", "true"),
}

PROJECT_DIR = Path(__file__).resolve().parents[1]  # where prefect.yaml lives


def server_file(root: DataRoot) -> Path:
    return Path(root.run_dir) / "server.json"


def running_server(root: DataRoot) -> dict | None:
    """The server `geofeat up` started, if its process is still alive."""
    path = server_file(root)
    if not path.exists():
        return None
    info = json.loads(path.read_text())
    try:
        os.kill(info["pid"], 0)
    except (ProcessLookupError, PermissionError):
        return None
    return info


def prefect_env(root: DataRoot | None = None) -> dict[str, str]:
    """Variables for any process that runs Prefect against this data root."""
    root = root or DataRoot.from_env()
    env = dict(OFFLINE, **{ENV_HOME: root.url, "PREFECT_HOME": root.prefect_home})
    server = running_server(root)
    if server:
        env["PREFECT_API_URL"] = server["api_url"]
    return env


SERVER_APP = "prefect.server.api.server:create_app"  # what Prefect's temporary server runs
SERVER_START_S = 120.0  # s another process may hold the start lock while its temporary server starts
REAPER = Path(__file__).resolve().with_name("reaper.py")
_reaper: subprocess.Popen | None = None  # kept: a dropped Popen of a running process warns
_starting: dict[str, object] = {}  # the port this process's temporary server is starting on, while it does
_hooked = False


def _release_when_healthy(lock) -> None:
    """Release the start lock once this process's temporary server answers /api/health (its
    migrations are done), or after SERVER_START_S. Follows the port: Prefect restarts on a taken one."""
    deadline = time.monotonic() + SERVER_START_S
    try:
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{_starting['port']}/api/health", timeout=1) as res:
                    if res.status == 200:
                        return
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
    finally:
        _starting.clear()
        lock.release()


def _stop_reaper() -> None:
    """At a normal exit Prefect has stopped its server already: end the reaper rather than leave it."""
    if _reaper is not None and _reaper.poll() is None:
        _reaper.terminate()
        try:
            _reaper.wait(2)
        except subprocess.TimeoutExpired:
            _reaper.kill()


def _guard_temporary_server(event: str, args: tuple) -> None:
    """Audit hook on `subprocess.Popen`, for Prefect's temporary server (no PREFECT_API_URL set):
    - start flows/reaper.py, which stops that server once this process has died, even of SIGKILL
      (Prefect's own exit handler never runs then): once per process, a small stdlib-only process;
    - start temporary servers on one PREFECT_HOME one at a time: two processes migrating a fresh
      prefect.db at once failed one start with a SQLite traceback (a lock under PREFECT_HOME, held
      until this server is healthy)."""
    global _reaper
    if event != "subprocess.Popen":
        return
    command = args[1] if len(args) > 1 else None
    if not isinstance(command, (list, tuple)) or not any(SERVER_APP in str(a) for a in command):
        return
    try:  # an audit hook that raises would abort the server's start: neither guard is worth that
        port = str(command[command.index("--port") + 1]) if "--port" in command else None
        if _starting:  # Prefect is restarting it on another port: the lock is ours already
            _starting["port"] = port
        elif port is not None and os.environ.get("PREFECT_HOME"):
            from filelock import FileLock, Timeout

            lock = FileLock(os.path.join(os.environ["PREFECT_HOME"], "temporary-server.lock"), thread_local=False)
            try:
                lock.acquire(timeout=SERVER_START_S)
            except Timeout:
                lock = None
            if lock is not None:
                _starting["port"] = port
                threading.Thread(target=_release_when_healthy, args=(lock,), daemon=True).start()
        if _reaper is None:
            _reaper = subprocess.Popen([sys.executable, "-I", "-S", str(REAPER), str(os.getpid())],
                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL, start_new_session=True)
            atexit.register(_stop_reaper)  # runs after Prefect's own stop of the server (registered later)
    except Exception:  # noqa: BLE001
        pass


def apply(root: DataRoot | None = None, create: bool = True) -> dict[str, str]:
    """Set the environment in this process. PREFECT_HOME always follows the data root (runs
    never touch ~/.prefect); for the other variables, values the user set explicitly win.
    `create`: make PREFECT_HOME now (a flow run needs it; a command that may still refuse its
    arguments makes it later, with `ensure_prefect_home`). A temporary Prefect server this process
    starts dies with it (`_guard_temporary_server`)."""
    env = prefect_env(root)
    for key, value in env.items():
        os.environ.setdefault(key, value)
    os.environ["PREFECT_HOME"] = env["PREFECT_HOME"]
    if create:
        ensure_prefect_home()
    global _hooked
    if not _hooked:
        sys.addaudithook(_guard_temporary_server)  # hooks cannot be removed: add it once
        _hooked = True
    return env


def ensure_prefect_home() -> None:
    """The temporary Prefect server keeps its SQLite file there: it must exist before a run."""
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
