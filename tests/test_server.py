"""End to end against a real local Prefect server, the way a user runs it:
`geofeat up` -> `prefect deployment run build-feature-datasets/demo --watch` -> `geofeat deploy FILE`
-> `prefect deployment run ingest/mine --watch` -> `geofeat down` from another folder. One server for
all of it: starting one (server, migrations, worker) is the slow part.

Marked `server` so it can run alone (`make test-server`); it is part of `make test` too.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import image_bytes, write
from storage.catalog import query
from storage.layout import DataRoot

BIN = Path(sys.executable).parent
# `retrain` makes the build emit geofeat.features.added, which the trigger of train-experts/demo
# (prefect.yaml) turns into a training run on the worker.
SMALL_DEMO = {"demo": {"countries": 2, "per_country": 5, "heldout_per_country": 1, "messy": True},
              "retrain": {"deployment": "demo", "min_new_features": 10}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], env: dict, timeout: int = 300, cwd: Path | None = None) -> str:
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    return res.stdout


def wait_for_runs(api_url: str, deployment: str, count: int, terminal: bool = False, timeout: float = 300) -> list:
    """The flow runs of `deployment` once there are `count` (and, with `terminal`, all finished)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    deadline = time.monotonic() + timeout
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(deployment)
        while True:
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
            if len(runs) >= count and (not terminal or all(r.state.is_final() for r in runs)):
                return runs
            assert time.monotonic() < deadline, f"{deployment}: {[(r.name, r.state_name) for r in runs]}"
            time.sleep(1)


@pytest.mark.server
def test_up_deployment_run_deploy_down(tmp_path):
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_HOME", "PREFECT_API_URL", "GEOFEAT_HOME")}
    env["GEOFEAT_STATE_DIR"] = str(tmp_path / "state")  # where `up` notes its root (not the user's ~/.local)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    no_home = dict(env)
    env["GEOFEAT_HOME"] = str(home)
    port = free_port()
    geofeat = str(BIN / "geofeat")
    run([geofeat, "up", "--port", str(port)], env)
    try:
        server = json.loads((home / "prefect" / "run" / "server.json").read_text())
        assert server["api_url"] == f"http://127.0.0.1:{port}/api"
        import httpx  # the UI asks this API (Prefect's default would be port 4200 whatever --port says)
        assert httpx.get(f"http://127.0.0.1:{port}/ui-settings", timeout=10).json()["api_url"] == server["api_url"]
        exported = dict(line.removeprefix("export ").split("=", 1) for line in run([geofeat, "env"], env).splitlines())
        run_env = {**env, **{k: json.loads(v) for k, v in exported.items()}}
        assert run_env["PREFECT_HOME"] == str(home / "prefect")  # never ~/.prefect
        assert run_env["DO_NOT_TRACK"] == "1" and run_env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
        out = run([str(BIN / "prefect"), "deployment", "run", "build-feature-datasets/demo", "--watch",
                   "--params", json.dumps(SMALL_DEMO)], run_env, timeout=400)
        assert "Completed" in out
        root = DataRoot(str(home))
        rows = query(root, "SELECT dataset, count(*) AS n FROM images GROUP BY dataset").to_pylist()
        counts = {r["dataset"]: r["n"] for r in rows}
        assert counts == {"demo": 2 * 5, "demo-im2gps": 2 * 1}
        assert query(root, "SELECT count(*) AS n FROM quarantine").to_pylist()[0]["n"] > 0  # the messy inputs
        # The trigger: the build added >= 10 crops, so train-experts/demo runs, on the worker.
        (triggered,) = wait_for_runs(server["api_url"], "train-experts/demo", count=1, terminal=True)
        assert triggered.state.is_completed(), triggered.state
        assert triggered.parameters["home"] == str(home)
        experts = query(root, "SELECT \"group\", untrained FROM experts").to_pylist()
        assert experts and all(e["untrained"] for e in experts)  # tiny random-init start, and said so
        # A no-op rebuild adds no crops: no event, no second training run.
        out = run([str(BIN / "prefect"), "deployment", "run", "build-feature-datasets/demo", "--watch",
                   "--params", json.dumps(SMALL_DEMO)], run_env, timeout=400)
        assert "Completed" in out
        time.sleep(8)  # the trigger fires within ~0.2 s of an event (measured); 8 s is ample
        assert len(wait_for_runs(server["api_url"], "train-experts/demo", count=1)) == 1
        run([geofeat, "up", "--port", str(port)], env)  # idempotent: reuses the running server
        assert json.loads((home / "prefect" / "run" / "server.json").read_text())["pid"] == server["pid"]
        deploy_a_config_file(tmp_path / "proj", elsewhere, env, run_env, home)
    finally:
        out = run([geofeat, "down"], no_home, cwd=elsewhere)  # no GEOFEAT_HOME, another folder: it finds the server
    assert f"(pid {server['pid']})" in out
    with pytest.raises(ProcessLookupError):
        os.kill(server["pid"], 0)
    assert not (home / "prefect" / "run" / "server.json").exists()


def deploy_a_config_file(proj: Path, elsewhere: Path, env: dict, run_env: dict, home: Path) -> None:
    """`geofeat deploy FILE --name mine` from another folder: the file's relative paths mean the
    file's folder, on the worker too."""
    for i, country in enumerate(["France", "Japan"]):
        write(proj / "photos" / country / f"canvas_{i}.jpg", image_bytes("JPEG", seed=70 + i))
    write(proj / "mine.yaml", b"ingest:\n  source: {layout: g50, source: photos, dataset: from-file}\n"
                              b"  options: {shard_size: 1}\n")
    out = run([str(BIN / "geofeat"), "deploy", str(proj / "mine.yaml"), "--name", "mine"], env, cwd=elsewhere)
    assert "deployed ingest/mine" in out
    out = run([str(BIN / "prefect"), "deployment", "run", "ingest/mine", "--watch"], run_env, timeout=400,
              cwd=elsewhere)
    assert "Completed" in out
    rows = query(DataRoot(str(home)), "SELECT dataset, source_uri FROM images WHERE dataset = 'from-file' "
                                      "ORDER BY 2").to_pylist()
    assert len(rows) == 2
    assert all(r["source_uri"].startswith(str(proj / "photos")) for r in rows)  # the file's folder, on the worker
