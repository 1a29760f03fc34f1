"""Your data from the CLI (issue 12): config files and flags, relative paths, the data root found
(not assumed), `down` from another folder, and the GeoGuessr overlay chosen by layout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.deployments import config_parameters, deployment_parameters, validate_parameters
from flows.env import PROJECT_DIR
from helpers import image_bytes, write
from storage.catalog import query
from storage.layout import DataRoot, find_home

runner = CliRunner()


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project folder with photos and a geofeat.yaml naming its data root; the working folder is
    elsewhere and GEOFEAT_HOME is unset."""
    proj = tmp_path / "proj"
    for i, country in enumerate(["France", "Japan", "Brasil"]):
        write(proj / "photos" / "compressed_dataset" / country / f"canvas_{i}.jpg", image_bytes("JPEG", seed=40 + i))
    (proj / "geofeat.yaml").write_text(
        "home: data\n"
        "ingest:\n  source: {layout: g50, source: photos, dataset: street_photos}\n"
        "train-experts:\n  spec: {checkpoint: ./checkpoints/vit, epochs: 1}\n")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    monkeypatch.delenv("GEOFEAT_HOME", raising=False)
    return proj


def test_relative_paths_resolve_against_the_file_not_the_working_folder(project):
    params = config_parameters(project / "geofeat.yaml", "ingest")
    assert params["source"]["source"] == str(project / "photos")
    spec = config_parameters(project / "geofeat.yaml", "train-experts")["spec"]
    assert spec["checkpoint"] == str(project / "checkpoints" / "vit")  # ./ : a directory, even before it exists
    hub = config_parameters(write(project / "hub.yaml", b"spec: {checkpoint: google/vit-base-patch16-224-in21k}"),
                            "train-experts")
    assert hub["spec"]["checkpoint"] == "google/vit-base-patch16-224-in21k"  # a hub id stays one
    # prefect.yaml's relative paths mean the project folder, where `geofeat up`'s worker runs them
    sources = deployment_parameters("build-feature-datasets", "g50-im2gps")["sources"]
    assert sources[0]["source"] == str(PROJECT_DIR / "datasets" / "g50")
    assert validate_parameters("build-feature-datasets", {"sources": sources})["sources"][0].dataset == "g50"


def test_the_data_root_is_found_not_assumed(project, tmp_path, monkeypatch):
    url, how = find_home()
    assert url.endswith("elsewhere/geofeat-data") and "default" in how  # nothing names one here
    assert find_home(config=project / "geofeat.yaml") == (str(project / "data"), f"home: in {project / 'geofeat.yaml'}")
    monkeypatch.chdir(project / "photos" / "compressed_dataset")  # below the project: its geofeat.yaml
    assert find_home()[0] == str(project / "data")
    monkeypatch.setenv("GEOFEAT_HOME", str(tmp_path / "explicit"))
    assert find_home(config=project / "geofeat.yaml") == (str(tmp_path / "explicit"), "$GEOFEAT_HOME")  # it wins


def test_read_commands_never_create_a_root(project, tmp_path):
    for argv in (["sql", "SELECT count(*) FROM images"], ["summary"], ["check"], ["report"]):
        res = runner.invoke(app, argv)
        assert res.exit_code == 2 and "no catalog at" in res.stderr and "GEOFEAT_HOME" in res.stderr, argv
    assert not (tmp_path / "elsewhere" / "geofeat-data").exists()
    (tmp_path / "elsewhere" / "geofeat-data").mkdir()
    res = runner.invoke(app, ["sql", "SELECT count(*) AS n FROM images"])
    assert res.exit_code == 0 and "(empty, from the default ./geofeat-data" in res.stderr  # said, not silent


@pytest.mark.usefixtures("prefect_harness")
def test_ingest_from_a_config_file_with_flag_overrides(project, monkeypatch):
    res = runner.invoke(app, ["ingest", "--config", str(project / "geofeat.yaml"), "--dataset", "renamed"])
    assert res.exit_code == 0, res.output
    assert f"data root: {project / 'data'}" in res.stderr
    rows = query(DataRoot(str(project / "data")), "SELECT dataset, country, source_uri FROM images ORDER BY 2").to_pylist()
    assert [(r["dataset"], r["country"]) for r in rows] == [("renamed", "BR"), ("renamed", "FR"), ("renamed", "JP")]
    assert all(r["source_uri"].startswith(str(project / "photos")) for r in rows)
    res = runner.invoke(app, ["sql", "SELECT count(*) AS n FROM images"])
    assert res.exit_code == 2 and "elsewhere/geofeat-data" in res.stderr  # not this folder's business
    monkeypatch.chdir(project / "photos")  # anywhere in the project: its geofeat.yaml names the root
    res = runner.invoke(app, ["sql", "SELECT count(*) AS n FROM images", "--format", "json"])
    assert res.exit_code == 0 and json.loads(res.stdout) == [{"n": 3}] and res.stderr == ""


def test_the_overlay_is_chosen_by_layout(root):
    from storage import shards
    from storage.catalog import refresh_catalog
    from storage.schema import IMAGES, to_table
    from tasks.segment import ShardImages, overlay_rows, plan_segment
    from tasks.specs import SegmenterSpec

    img = write(Path(root.url).parent / "src" / "canvas.jpg", image_bytes("JPEG", size=(300, 200), seed=5))
    row = {"image_id": "c" * 64, "dataset": "my-copy", "split": "train", "country": "FR", "country_name": "France",
           "continent": "Europe", "lat": None, "lon": None, "source_uri": str(img), "width": 300, "height": 200,
           "format": "JPEG", "size_bytes": 1, "source_mtime": 1.0, "ingested_at": __import__("datetime").datetime.now()}
    shards.commit_shard(root, "ingest", "my-copy", "s1", [shards.Output("images", {"dataset": "my-copy"},
                                                                        to_table([row], IMAGES))],
                        params={"dataset": "my-copy", "layout": "g50"})
    refresh_catalog(root)
    spec = SegmenterSpec(overlay={"g50": {"top": 0.12, "bottom": 0.45}})
    (plan,) = plan_segment(root, "my-copy", "seg", 8)
    assert plan.images[0].layout == "g50"  # a G50 copy under any name...
    item = ShardImages(plan.images, spec, segmenter=None)[0]
    assert item["top"] == 24 and item["image"].shape[0] == 200 - 24 - 90  # ...gets the GeoGuessr cut
    assert overlay_rows(662, spec, "im2gps", "im2gps") == (0, 662)
    own = SegmenterSpec(overlay={"g50": {"top": 0.1, "bottom": 0.1}, "my-copy": {"top": 0.0, "bottom": 0.5}})
    assert overlay_rows(200, own, "my-copy", "g50") == (0, 100)  # a dataset's own key wins


def test_down_finds_the_server_that_up_started_from_another_folder(tmp_path, monkeypatch):
    """`up` notes its data root in the user's state folder; `down` elsewhere finds it (a stand-in
    process plays the server: `down` stops its process group as it would the real one's)."""
    from flows import server

    monkeypatch.setenv("GEOFEAT_STATE_DIR", str(tmp_path / "state"))
    root = DataRoot(str(tmp_path / "home"))
    fake = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    try:
        run_dir = Path(root.run_dir)
        run_dir.mkdir(parents=True)
        (run_dir / "server.json").write_text(json.dumps({"pid": fake.pid, "api_url": "http://127.0.0.1:1/api"}))
        note = server._note_path(root)
        note.parent.mkdir(parents=True)
        note.write_text(json.dumps({"home": root.url}))  # what `up` writes
        (tmp_path / "elsewhere").mkdir()
        monkeypatch.chdir(tmp_path / "elsewhere")
        monkeypatch.setenv("GEOFEAT_HOME", str(tmp_path / "other-root"))
        res = runner.invoke(app, ["down"])  # an explicit, other root: said, not stopped
        assert res.exit_code == 1 and f"GEOFEAT_HOME={root.url} geofeat down" in res.stderr
        assert fake.poll() is None
        monkeypatch.delenv("GEOFEAT_HOME")
        res = runner.invoke(app, ["down"])
        assert res.exit_code == 0 and f"(pid {fake.pid})" in res.stdout and root.url in res.stderr, res.output
        fake.wait(timeout=30)  # stopped (reaped by `down` itself: it is this process's child here)
        with pytest.raises(ProcessLookupError):
            os.kill(fake.pid, 0)
        assert not note.exists() and not (run_dir / "server.json").exists()
    finally:
        if fake.poll() is None:
            os.killpg(fake.pid, signal.SIGKILL)
