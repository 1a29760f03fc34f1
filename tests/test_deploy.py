"""`geofeat deploy FILE --name NAME` against the real local server of `geofeat up`: the config file's
relative paths mean the file's folder on the worker too; `geofeat down` from another folder, without
GEOFEAT_HOME, finds the server. Marked `server` (make test-server runs these alone)."""

import json
import os
import sys
from pathlib import Path

import pytest

from helpers import image_bytes, write
from storage.catalog import query
from storage.layout import DataRoot
from test_server import free_port, run

BIN = Path(sys.executable).parent


@pytest.mark.server
def test_deploy_a_config_file_and_down_from_elsewhere(tmp_path):
    home = tmp_path / "home"
    proj = tmp_path / "proj"
    for i, country in enumerate(["France", "Japan"]):
        write(proj / "photos" / country / f"canvas_{i}.jpg", image_bytes("JPEG", seed=70 + i))
    write(proj / "mine.yaml", b"ingest:\n  source: {layout: g50, source: photos, dataset: from-file}\n"
                              b"  options: {shard_size: 1}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_HOME", "PREFECT_API_URL", "GEOFEAT_HOME")}
    env["GEOFEAT_STATE_DIR"] = str(tmp_path / "state")  # where `up` notes its root (not the user's ~/.local)
    geofeat = str(BIN / "geofeat")
    port = free_port()
    run([geofeat, "up", "--port", str(port)], {**env, "GEOFEAT_HOME": str(home)})
    server = json.loads((home / "prefect" / "run" / "server.json").read_text())
    try:
        out = run_in(elsewhere, [geofeat, "deploy", str(proj / "mine.yaml"), "--name", "mine"],
                     {**env, "GEOFEAT_HOME": str(home)})
        assert "deployed ingest/mine" in out
        exported = dict(line.removeprefix("export ").split("=", 1)
                        for line in run([geofeat, "env"], {**env, "GEOFEAT_HOME": str(home)}).splitlines())
        run_env = {**env, **{k: json.loads(v) for k, v in exported.items()}}
        out = run_in(elsewhere, [str(BIN / "prefect"), "deployment", "run", "ingest/mine", "--watch"], run_env,
                     timeout=400)
        assert "Completed" in out
        rows = query(DataRoot(str(home)), "SELECT dataset, source_uri FROM images ORDER BY 2").to_pylist()
        assert [r["dataset"] for r in rows] == ["from-file", "from-file"]
        assert all(r["source_uri"].startswith(str(proj / "photos")) for r in rows)  # the file's folder, on the worker
    finally:
        out = run_in(elsewhere, [geofeat, "down"], env)  # no GEOFEAT_HOME, another folder
    assert f"(pid {server['pid']})" in out
    with pytest.raises(ProcessLookupError):
        os.kill(server["pid"], 0)


def run_in(cwd: Path, cmd: list[str], env: dict, timeout: int = 300) -> str:
    import subprocess

    res = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    return res.stdout
