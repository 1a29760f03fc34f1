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
    for query in ["DROP VIEW images", "COPY (SELECT 1) TO '/tmp/x.csv'", "SELECT * FROM read_csv('/etc/passwd')"]:
        res = runner.invoke(app, ["sql", query])
        assert res.exit_code == 2, query
        assert "query refused" in res.output
    res = runner.invoke(app, ["sql", "SELECT nope FROM images"])
    assert res.exit_code == 2 and "nope" in res.output
    res = runner.invoke(app, ["sql", "SELECT 1", "--format", "xml"])
    assert res.exit_code == 2


@pytest.mark.usefixtures("prefect_harness")
def test_ingest_configuration_errors_are_clean(tmp_path, home):
    res = runner.invoke(app, ["ingest", "--layout", "g50", "--source", str(tmp_path / "missing"), "--dataset", "x"])
    assert res.exit_code == 2 and "does not exist" in res.output
    res = runner.invoke(app, ["ingest", "--layout", "g99", "--source", str(tmp_path), "--dataset", "x"])
    assert res.exit_code == 2 and "layout" in res.output


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
