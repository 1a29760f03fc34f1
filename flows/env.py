"""The offline Prefect environment, set wherever geofeat starts Prefect.

Import this before `prefect`: Prefect reads its settings when it is first imported.
"""

from __future__ import annotations

import json
import os
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


def apply(root: DataRoot | None = None, create: bool = True) -> dict[str, str]:
    """Set the environment in this process. PREFECT_HOME always follows the data root (runs
    never touch ~/.prefect); for the other variables, values the user set explicitly win.
    `create`: make PREFECT_HOME now (a flow run needs it; a command that may still refuse its
    arguments makes it later, with `ensure_prefect_home`)."""
    env = prefect_env(root)
    for key, value in env.items():
        os.environ.setdefault(key, value)
    os.environ["PREFECT_HOME"] = env["PREFECT_HOME"]
    if create:
        ensure_prefect_home()
    return env


def ensure_prefect_home() -> None:
    """The temporary Prefect server keeps its SQLite file there: it must exist before a run."""
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
