"""`geofeat up` / `geofeat down`: a local Prefect server, work pool, deployments and worker.

Everything lives under the data root: the SQLite database (PREFECT_HOME), the logs and
PID files (PREFECT_HOME/run). `up` is idempotent; `down` stops only what `up` started. `up` also
notes its data root in the user's state folder (`state_dir()`), so `down` run from another folder
(where another data root would be found) still finds the server.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from flows import env as prefect_env
from storage.layout import DataRoot

log = logging.getLogger(__name__)

WORK_POOL = "geofeat"
DEFAULT_PORT = 4200
STARTUP_TIMEOUT = 120  # s; a cold server start on 2 cores takes ~15-30 s
BIN = Path(sys.executable).parent  # the venv's prefect executable sits next to python


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _healthy(api_url: str) -> bool:
    try:
        return httpx.get(f"{api_url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _spawn(cmd: list[str], log_path: Path, env: dict, cwd: Path | None = None) -> int:
    """Start a daemon in its own process group (so one killpg stops it and its children)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=cwd, start_new_session=True)
    return proc.pid


def _run(cmd: list[str], env: dict) -> None:
    res = subprocess.run(cmd, env=env, cwd=prefect_env.PROJECT_DIR, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")


def state_dir() -> Path:
    """Where `up` notes the data roots it serves: $GEOFEAT_STATE_DIR, else $XDG_STATE_HOME/geofeat,
    else ~/.local/state/geofeat."""
    if os.environ.get("GEOFEAT_STATE_DIR"):
        return Path(os.environ["GEOFEAT_STATE_DIR"])
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "geofeat"


def _note_path(root: DataRoot) -> Path:
    return state_dir() / "servers" / f"{hashlib.sha256(root.url.encode()).hexdigest()[:16]}.json"


def started_elsewhere() -> list[DataRoot]:
    """Data roots whose `geofeat up` server is still running (notes of stopped ones are removed)."""
    roots = []
    for note in sorted((state_dir() / "servers").glob("*.json")):
        try:
            root = DataRoot(json.loads(note.read_text())["home"])
        except (OSError, ValueError, KeyError):
            note.unlink(missing_ok=True)
            continue
        if prefect_env.running_server(root):
            roots.append(root)
        else:
            note.unlink(missing_ok=True)
    return roots


def _pid_file(root: DataRoot, name: str) -> Path:
    return Path(root.run_dir) / f"{name}.pid"


def up(root: DataRoot, port: int = DEFAULT_PORT, deploy: bool = True) -> dict:
    """Start (or reuse) the server, create the pool, deploy prefect.yaml, start a worker."""
    run_dir = Path(root.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **prefect_env.prefect_env(root)}
    server = prefect_env.running_server(root)
    if server and _healthy(server["api_url"]):
        api_url = server["api_url"]
        log.info("server already running at %s", api_url)
    else:
        if not _free(port):
            raise RuntimeError(f"port {port} on 127.0.0.1 is taken; pass --port or stop what uses it")
        api_url = f"http://127.0.0.1:{port}/api"
        # The UI asks the API at PREFECT_UI_API_URL, which defaults to port 4200 whatever --port says.
        server_env = {**env, "PREFECT_SERVER_API_PORT": str(port), "PREFECT_UI_API_URL": api_url}
        pid = _spawn([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                     run_dir / "server.log", server_env)
        prefect_env.server_file(root).write_text(json.dumps({"pid": pid, "api_url": api_url, "port": port}))
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not _healthy(api_url):
            if not _alive(pid) or time.monotonic() > deadline:
                raise RuntimeError(f"Prefect server did not start; see {run_dir / 'server.log'}")
            time.sleep(0.5)
        log.info("server started at %s (pid %d)", api_url, pid)
    env["PREFECT_API_URL"] = api_url
    try:
        _note_path(root).parent.mkdir(parents=True, exist_ok=True)
        _note_path(root).write_text(json.dumps({"home": root.url, "api_url": api_url}))
    except OSError as exc:  # a read-only home: `down` from another folder then needs GEOFEAT_HOME
        log.warning("could not note the server in %s: %s", state_dir(), exc)
    if deploy:
        _run([str(BIN / "prefect"), "work-pool", "create", WORK_POOL, "--type", "process", "--overwrite"], env)
        _run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], env)
    worker_pid = _read_pid(root, "worker")
    if worker_pid is None:
        worker_pid = _spawn([str(BIN / "prefect"), "worker", "start", "--pool", WORK_POOL, "--type", "process"],
                            run_dir / "worker.log", env, cwd=prefect_env.PROJECT_DIR)
        _pid_file(root, "worker").write_text(str(worker_pid))
    return {"api_url": api_url, "worker_pid": worker_pid, "logs": str(run_dir)}


def _read_pid(root: DataRoot, name: str) -> int | None:
    path = _pid_file(root, name)
    if path.exists():
        pid = int(path.read_text())
        if _alive(pid):
            return pid
        path.unlink()
    return None


def _stop(pid: int, timeout: float = 30) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        _reap(pid)
        time.sleep(0.2)
    if _alive(pid):
        os.killpg(pid, signal.SIGKILL)
        _reap(pid)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)  # our own child when up and down ran in one process
    except ChildProcessError:
        pass


def down(root: DataRoot) -> list[str]:
    """Stop the worker, then the server. Returns what was stopped."""
    stopped = []
    worker = _read_pid(root, "worker")
    if worker:
        _stop(worker)
        _pid_file(root, "worker").unlink(missing_ok=True)
        stopped.append(f"worker (pid {worker})")
    server = prefect_env.running_server(root)
    if server:
        _stop(server["pid"])
        stopped.append(f"server (pid {server['pid']})")
    prefect_env.server_file(root).unlink(missing_ok=True)
    _note_path(root).unlink(missing_ok=True)
    return stopped
