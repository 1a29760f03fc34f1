"""The offline Prefect environment, set wherever geofeat starts Prefect.

Import this before `prefect`: Prefect reads its settings when it is first imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
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


REAPER = Path(__file__).resolve().with_name("reaper.py")
_reaper: subprocess.Popen | None = None  # kept: a dropped Popen of a running process warns
_hooked = False


def _reap_temporary_server(event: str, args: tuple) -> None:
    """Audit hook: when this process starts Prefect's temporary server, start flows/reaper.py,
    which stops that server once this process has died, even of SIGKILL (Prefect's own exit
    handler never runs then). Once per process; costs one small stdlib-only process."""
    global _reaper
    if event != "subprocess.Popen" or _reaper is not None:
        return
    command = args[1] if len(args) > 1 else None
    if not isinstance(command, (list, tuple)) or not any("prefect.server.api.server:create_app" in str(a) for a in command):
        return
    try:  # an audit hook that raises would abort the server's start: a reaper is worth less than that
        _reaper = subprocess.Popen([sys.executable, "-I", "-S", str(REAPER), str(os.getpid())],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True)
    except Exception:  # noqa: BLE001
        pass


def apply(root: DataRoot | None = None) -> dict[str, str]:
    """Set the environment in this process. PREFECT_HOME always follows the data root (runs
    never touch ~/.prefect); for the other variables, values the user set explicitly win.
    A temporary Prefect server this process starts dies with it (`_reap_temporary_server`)."""
    env = prefect_env(root)
    for key, value in env.items():
        os.environ.setdefault(key, value)
    os.environ["PREFECT_HOME"] = env["PREFECT_HOME"]
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    global _hooked
    if not _hooked:
        sys.addaudithook(_reap_temporary_server)  # hooks cannot be removed: add it once
        _hooked = True
    return env
