"""The `geofeat` CLI as a user types it (typer's runner, in process)."""

import json

import pytest
from typer.testing import CliRunner

from flows.cli import app
from helpers import image_bytes, write

runner = CliRunner()


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("GEOFEAT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.mark.usefixtures("prefect_harness")
def test_ingest_then_sql_in_every_format(tmp_path, home):
    write(tmp_path / "src" / "Czechia" / "a.JPG", image_bytes("JPEG", seed=1))
    write(tmp_path / "src" / "Bavaria" / "b.jpg", image_bytes("JPEG", seed=2))
    res = runner.invoke(app, ["ingest", "--layout", "g50", "--source", str(tmp_path / "src"), "--dataset", "cz"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["sql", "SELECT country, country_name FROM images", "--format", "json"])
    assert res.exit_code == 0 and json.loads(res.stdout) == [{"country": "CZ", "country_name": "Czechia"}]
    res = runner.invoke(app, ["sql", "SELECT reason FROM quarantine", "--format", "csv"])
    assert res.stdout.splitlines() == ["reason", "unknown_country"]
    res = runner.invoke(app, ["sql", "SELECT count(*) AS n FROM images"])
    assert res.exit_code == 0 and "│ 1 " in res.stdout
    res = runner.invoke(app, ["summary"])
    assert res.exit_code == 0 and "Czechia" in res.stdout and "unknown_country" in res.stdout


def test_sql_refusals_exit_non_zero_with_a_reason(home):
    home.mkdir(parents=True)
    for query in ["DROP VIEW images", "COPY (SELECT 1) TO '/tmp/x.csv'", "SELECT * FROM read_csv('/etc/passwd')"]:
        res = runner.invoke(app, ["sql", query])
        assert res.exit_code == 2, query
        assert "query refused" in res.output
    res = runner.invoke(app, ["sql", "SELECT nope FROM images"])
    assert res.exit_code == 2 and "nope" in res.output
    res = runner.invoke(app, ["sql", "SELECT 1", "--format", "xml"])
    assert res.exit_code == 2




def test_env_points_prefect_home_under_the_data_root(home):
    res = runner.invoke(app, ["env"])
    env = dict(line.removeprefix("export ").split("=", 1) for line in res.stdout.splitlines())
    assert json.loads(env["PREFECT_HOME"]) == str(home / "prefect")
    assert json.loads(env["GEOFEAT_HOME"]) == str(home)
    assert json.loads(env["DO_NOT_TRACK"]) == "1"
    assert int(json.loads(env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"])) >= 60


def test_demo_data_is_deterministic(tmp_path):
    args = ["--countries", "2", "--per-country", "2", "--heldout-per-country", "1"]
    for out in ("a", "b"):
        res = runner.invoke(app, ["demo-data", "--out", str(tmp_path / out), *args])
        assert res.exit_code == 0, res.output
    a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.jpg"))
    assert a and all((tmp_path / "a" / p).read_bytes() == (tmp_path / "b" / p).read_bytes() for p in a)
    res = runner.invoke(app, ["demo-data", "--out", str(tmp_path / "a"), "--seed", "3", *args])
    assert res.exit_code == 2 and "overwrite" in res.output


# ---------------------------------------------------------------- every mistake: one line, the flag, the fix

# (id, argv with {placeholders}, environment changes, exit code, what the error line must say)
MISTAKES = [
    ("bad layout", ["ingest", "--layout", "g99", "--source", "{photos}", "--dataset", "x"], {}, 2,
     ["--layout", "'g50', 'g3', 'im2gps' or 'osv5m'"]),
    ("bad dataset name", ["ingest", "--layout", "g50", "--source", "{photos}", "--dataset", "My Photos"], {}, 2,
     ["--dataset", "lower-case letters"]),
    ("missing --source", ["ingest", "--layout", "g50", "--dataset", "x"], {}, 2, ["--source is missing"]),
    ("source does not exist", ["ingest", "--layout", "g50", "--source", "{tmp}/nope", "--dataset", "x"], {}, 2,
     ["--source", "does not exist"]),
    ("a folder as the im2gps CSV", ["ingest", "--layout", "im2gps", "--source", "{photos}", "--dataset", "x"], {}, 2,
     ["--source", "is a folder", "reads the CSV"]),
    ("a CSV with wrong columns", ["ingest", "--layout", "im2gps", "--source", "{bad_csv}", "--dataset", "x"], {}, 2,
     ["--source", "no IMG_ID column"]),
    ("g50 given a CSV", ["ingest", "--layout", "g50", "--source", "{bad_csv}", "--dataset", "x"], {}, 2,
     ["--source", "is a file", "layout g3"]),
    ("--images is a file", ["ingest", "--layout", "im2gps", "--source", "{bad_csv}", "--images", "{bad_csv}",
                            "--dataset", "x"], {}, 2, ["--images", "is a file"]),
    ("unknown option", ["ingest", "--layuot", "g50"], {}, 2, ["--layuot"]),
    ("hub id offline", ["segment", "--segmenter-checkpoint", "nobody/no-such-model", "--dataset", "x"],
     {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": None}, 1,
     ["nobody/no-such-model", "hf download", "--segmenter-checkpoint", "no network"]),
    ("experts checkpoint missing", ["train", "--experts-checkpoint", "./no-such-dir"], {}, 1,
     ["no-such-dir", "does not exist", "--experts-checkpoint"]),
    ("bad device", ["build", "--device", "gpu"], {}, 2, ["--device", "cuda:N"]),
    ("bad batch size", ["segment", "--batch-size", "0"], {}, 2, ["--batch-size", "greater than or equal to 1"]),
    ("unknown deployment", ["build", "nope"], {}, 2, ["build-feature-datasets/nope", "--config"]),
    ("deployment and config", ["build", "demo", "--config", "{good_cfg}"], {}, 2, ["not both"]),
    ("config missing", ["build", "--config", "{tmp}/none.yaml"], {}, 2, ["--config", "no such file"]),
    ("config not YAML", ["build", "--config", "{broken_cfg}"], {}, 2, ["not valid YAML"]),
    ("config unknown section", ["build", "--config", "{typo_section_cfg}"], {}, 2, ["biuld", "top-level"]),
    ("config unknown parameter", ["build", "--config", "{typo_param_cfg}"], {}, 2,
     ["sorces", "not a parameter of build-feature-datasets"]),
    ("config bad value", ["build", "--config", "{bad_value_cfg}"], {}, 2, ["sources[0].layout", "g51"]),
    ("--flow not in the file", ["deploy", "{good_cfg}", "--name", "x", "--flow", "evaluate"], {}, 2,
     ["--flow evaluate", "no section"]),
    ("deploy a one-flow file without --flow", ["deploy", "{flat_cfg}", "--name", "x"], {}, 2,
     ["--flow is missing", "one flow's parameters"]),
    ("a data root that does not exist", ["sql", "SELECT 1"], {"GEOFEAT_HOME": "{tmp}/nowhere"}, 2,
     ["no catalog", "GEOFEAT_HOME"]),
    ("train on an empty catalog", ["train"], {}, 1, ["no train crops", "build-feature-datasets"]),
    ("evaluate without experts", ["evaluate", "--dataset", "x"], {}, 1, ["no registered experts", "train"]),
    ("predict without experts", ["predict", "{photos}/France/a.jpg"], {}, 1, ["no registered experts"]),
    ("report before any evaluation", ["report"], {}, 1, ["no evaluation report", "geofeat evaluate"]),
]


@pytest.fixture
def mess(tmp_path, home):
    """An empty data root, a photo folder, a CSV with the wrong columns and config files with mistakes."""
    home.mkdir(parents=True)
    write(tmp_path / "photos" / "France" / "a.jpg", image_bytes("JPEG", seed=3))
    files = {"tmp": tmp_path, "photos": tmp_path / "photos"}
    texts = {"bad_csv": "a,b\n1,2\n", "good_cfg": "ingest: {source: {layout: g50, source: photos, dataset: x}}\n",
             "broken_cfg": "build-feature-datasets: [unclosed\n", "typo_section_cfg": "biuld: {}\ningest: {}\n",
             "typo_param_cfg": "build-feature-datasets: {sorces: []}\n",
             "flat_cfg": "source: {layout: g50, source: photos, dataset: x}\n",
             "bad_value_cfg": "build-feature-datasets:\n  sources: [{layout: g51, source: photos, dataset: x}]\n"}
    for name, text in texts.items():
        files[name] = write(tmp_path / f"{name}.{'csv' if name.endswith('csv') else 'yaml'}", text.encode())
    return {k: str(v) for k, v in files.items()}


@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize("case", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_every_mistake_ends_in_one_line_naming_the_flag(case, mess, monkeypatch, tmp_path):
    import time

    _, argv, env, code, says = case
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    for key, value in env.items():
        (monkeypatch.delenv(key, raising=False) if value is None else monkeypatch.setenv(key, value.format(**mess)))
    started = time.perf_counter()
    res = runner.invoke(app, [a.format(**mess) for a in argv])
    took = time.perf_counter() - started
    assert res.exit_code == code, res.output
    # What the CLI itself says (Prefect's log lines, if a flow ran, go to their own handler: see the
    # subprocess test below for the whole stderr of a real process).
    ours = [line for line in res.stderr.splitlines() if line.startswith(("error: ", "data root: "))]
    assert 1 <= len(ours) <= 2 and ours[-1].startswith("error: "), res.stderr  # (the data root) + the error
    assert sum(line.startswith("error: ") for line in ours) == 1
    assert all(s in ours[-1] for s in says), ours[-1]
    if case[0] == "hub id offline":
        assert took < 2.0, f"{took:.1f} s"  # no HF_HUB_OFFLINE, no network: offline at once, not ~40 s of retries


def test_a_failed_flow_run_ends_in_the_error_line_without_a_traceback(mess, tmp_path):
    """A real process: Prefect logs the run (and would log the traceback); the last line is the error."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "GEOFEAT_HOME": str(tmp_path / "home"), "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "flows.cli", "ingest", "--layout", "im2gps", "--source", mess["bad_csv"],
           "--dataset", "x"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2, res.stderr
    assert lines[-1].startswith("error: --source ") and "no IMG_ID column" in lines[-1], res.stderr
    assert "Traceback" not in res.stderr and len(lines) < 15, res.stderr
    assert (tmp_path / "home" / "prefect").is_dir() and "telemetry" not in res.stderr  # the offline env, set in time
    # --debug lets the exception through. A source that does not exist fails before any Prefect server
    # starts, which spares the test a second temporary server (~15 s).
    missing = str(tmp_path / "nowhere.csv")
    debug = subprocess.run(cmd[:3] + ["--debug"] + cmd[3:6] + ["--source", missing] + cmd[8:], env=env,
                           capture_output=True, text=True, timeout=300)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "does not exist" in debug.stderr, debug.stderr


def test_debug_shows_the_exception(mess):
    res = runner.invoke(app, ["--debug", "train"])
    assert res.exit_code == 1 and isinstance(res.exception, LookupError)  # raised with its traceback
    res = runner.invoke(app, ["train", "--debug"])  # anywhere on the line
    assert isinstance(res.exception, LookupError)
