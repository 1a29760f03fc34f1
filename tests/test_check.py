"""`geofeat check` and the integrity gate: a clean demo catalog passes; each corruption of a
copy of it is detected, named, and exits non-zero."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from storage import shards
from storage.catalog import connect
from storage.layout import DataRoot
from storage.schema import EXPERTS, FEATURES, IMAGES, METRICS, PREDICTIONS, QUARANTINE, SEGMENTATIONS, to_table
from tasks.check import IntegrityError, gate, integrity_checks
from tasks.specs import CropSpec
from helpers import write

runner = CliRunner()
NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)
FILES_COMMITTED = "every shard file has a completion record"
FILES_PRESENT = "every committed file exists"
STALE_CROPS = "crops carry their image's split and country"
ORPHAN_ROWS = "no rows without their image"


@pytest.fixture
def catalog(demo_catalog, tmp_path, monkeypatch) -> DataRoot:
    """A private copy of the session's demo catalog (completion records hold relative paths)."""
    shutil.copytree(demo_catalog.url, tmp_path / "home", ignore=shutil.ignore_patterns("prefect"))
    monkeypatch.setenv("GEOFEAT_HOME", str(tmp_path / "home"))
    return DataRoot(str(tmp_path / "home"))


def run_check(*args: str) -> tuple[int, str]:
    res = runner.invoke(app, ["check", *args])
    return res.exit_code, res.output


def failed(root: DataRoot) -> set[str]:
    return {c.name for c in integrity_checks(root) if not c.passed}


def first_row(root: DataRoot, sql: str) -> dict:
    return connect(root, fresh=True).sql(sql).to_arrow_table().to_pylist()[0]


def commit_features(root: DataRoot, shard_id: str, rows: list[dict]) -> None:
    seg = rows[0]["segmenter"]
    shards.commit_shard(root, "segment", rows[0]["dataset"], shard_id, [shards.Output(
        "features", {"segmenter": seg, "dataset": rows[0]["dataset"], "group": rows[0]["group"]},
        to_table(rows, FEATURES))])


def test_a_clean_catalog_passes(catalog):
    code, out = run_check()
    assert code == 0, out
    assert "PASS" in out and "FAIL" not in out and FILES_COMMITTED in out
    assert gate(catalog)  # returns the checks
    code, out = run_check("--json")
    report = json.loads(out)
    assert code == 0 and len(report) >= 8 and all(c["passed"] for c in report)


def test_an_uncommitted_shard_file_fails(catalog):
    row = first_row(catalog, "SELECT * FROM images_all")
    shards.write_parquet_atomic(catalog, to_table([row], IMAGES), catalog.shard_path("images", "orphan", dataset="demo"))
    code, out = run_check()
    assert code == 1 and "FAIL" in out and "orphan.parquet" in out
    assert failed(catalog) == {FILES_COMMITTED}


def test_a_missing_committed_file_fails(catalog):
    record = next(r for r in shards.read_commits(catalog, "segment") if "features" in r.files)
    catalog.fs.rm(catalog.path(record.files["features"][0]))
    code, out = run_check()
    assert code == 1 and record.files["features"][0].split("/")[-1] in out
    assert failed(catalog) == {FILES_PRESENT, "catalog loads"}
    with pytest.raises(IntegrityError, match=FILES_PRESENT):
        gate(catalog)


def test_a_crop_whose_split_disagrees_with_its_image_fails(catalog):
    row = first_row(catalog, "SELECT * EXCLUDE (filename) FROM features_all WHERE split = 'train'")
    row.update(feature_id="stale" + row["feature_id"][5:], split="test")
    commit_features(catalog, "stale-split", [row])
    assert failed(catalog) == {STALE_CROPS}
    code, out = run_check("--json")
    bad = next(c for c in json.loads(out) if c["name"] == STALE_CROPS)
    assert code == 1 and bad["detail"].startswith("1 crops")
    assert [(r["feature_id"], r["crop_split"], r["image_split"]) for r in bad["rows"]] == [(row["feature_id"], "test", "train")]


def test_a_crop_without_an_image_fails(catalog):
    row = first_row(catalog, "SELECT * EXCLUDE (filename) FROM features_all")
    row.update(feature_id="orphan" + row["feature_id"][6:], image_id="0" * 64)
    commit_features(catalog, "no-image", [row])
    assert failed(catalog) == {ORPHAN_ROWS}
    code, out = run_check()
    assert code == 1 and "0" * 64 in out


def test_an_image_moved_to_test_by_another_dataset_is_one_split_but_leaves_stale_crops(catalog):
    """The same bytes in a benchmark make the image `test` everywhere (info); its crops segmented
    earlier as `train` are now stale files."""
    image = first_row(catalog, "SELECT * EXCLUDE (assigned_split) FROM images WHERE split = 'train' AND image_id IN "
                               "(SELECT image_id FROM features_all)")
    copy = {**image, "dataset": "bench", "split": "test", "source_uri": "/bench/copy.jpg", "ingested_at": NOW}
    shards.commit_shard(catalog, "ingest", "bench", "bench1",
                        [shards.Output("images", {"dataset": "bench"}, to_table([copy], IMAGES))])
    checks = {c.name: c for c in integrity_checks(catalog)}
    assert checks["one split per image"].passed
    shared = checks["images shared across datasets (info)"]
    assert shared.passed and shared.table.to_pylist()[0]["split"] == "test"
    assert not checks[STALE_CROPS].passed
    assert {r["image_split"] for r in checks[STALE_CROPS].table.to_pylist()} == {"test"}


def test_an_unknown_quarantine_reason_and_a_lost_expert_checkpoint_fail(catalog):
    bad = {"source_uri": "/x.jpg", "dataset": "demo", "stage": "ingest", "reason": "gremlins", "detail": "?",
           "size_bytes": 1, "source_mtime": 1.0, "seen_at": NOW}
    shards.commit_shard(catalog, "ingest", "demo", "gremlins",
                        [shards.Output("quarantine", {"dataset": "demo"}, to_table([bad], QUARANTINE))])
    expert = {"expert_id": "r/ground", "run_id": "r", "group": "ground", "segmenter": "s", "base_checkpoint": "b",
              "uri": catalog.path("checkpoints", "gone", "best"), "labels": ["FR"], "snapshot": "x",
              "train_crops": 1, "val_crops": 0, "steps": 1, "val_accuracy": None, "untrained": True,
              "metrics": "{}", "config": "{}", "created_at": NOW}
    shards.commit_shard(catalog, "train", "experts", "gone",
                        [shards.Output("experts", {"group": "ground"}, to_table([expert], EXPERTS))])
    assert failed(catalog) == {"quarantine reasons are known", "expert checkpoints exist"}
    code, out = run_check()
    assert code == 1 and "gremlins" in out and "r/ground" in out


def test_check_refuses_a_root_that_does_not_exist(tmp_path, monkeypatch):
    monkeypatch.setenv("GEOFEAT_HOME", str(tmp_path / "nowhere"))
    code, out = run_check()
    assert code == 2 and "no catalog" in out
    assert not (tmp_path / "nowhere").exists()


def test_the_build_gate_blocks_a_broken_catalog_and_reports_a_stale_one(catalog):
    from flows.build_feature_datasets import build_feature_datasets
    from tasks.specs import SourceSpec

    row = first_row(catalog, "SELECT * EXCLUDE (filename) FROM features_all WHERE split = 'train'")
    commit_features(catalog, "stale-split", [{**row, "feature_id": "stale" + row["feature_id"][5:], "split": "test"}])
    assert {c.name for c in gate(catalog) if not c.passed} == {STALE_CROPS}  # reported, not blocking
    image = first_row(catalog, "SELECT * FROM images_all")
    shards.write_parquet_atomic(catalog, to_table([image], IMAGES), catalog.shard_path("images", "orphan", dataset="demo"))
    source = SourceSpec(layout="g50", source=catalog.path("demo-world", "g50"), dataset="again")
    with pytest.raises(IntegrityError, match=FILES_COMMITTED):
        build_feature_datasets(sources=[source], segmenter=None, home=catalog.url)


# ---------------------------------------------------------------- issue 13: duplicates and leftovers

DUPLICATES = "no duplicate rows"
LEFTOVERS = "no leftovers of dead writers"


def dead_pid() -> int:
    """The pid of a process that has ended (not reused this soon on a machine with pid_max >> load)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_duplicate_rows_in_every_table_fail_the_check(catalog):
    """Two runs that did the same work (the same rows committed by two shards) are found in every table."""
    def again(table: str, stage: str, dataset: str, partitions: dict, rows: list[dict], schema) -> None:
        shards.commit_shard(catalog, stage, dataset, f"again-{table}", [shards.Output(table, partitions, to_table(rows, schema))])

    image = first_row(catalog, "SELECT * FROM images_all")
    again("images", "ingest", image["dataset"], {"dataset": image["dataset"]}, [image], IMAGES)
    refused = {"source_uri": "/x.jpg", "dataset": "demo", "stage": "ingest", "reason": "truncated", "detail": "?",
               "size_bytes": 1, "source_mtime": 1.0, "seen_at": NOW}
    again("quarantine", "ingest", "demo", {"dataset": "demo"}, [refused, refused], QUARANTINE)
    crop = first_row(catalog, "SELECT * EXCLUDE (filename) FROM features_all")
    commit_features(catalog, "again-features", [crop])
    outcome = first_row(catalog, "SELECT * FROM segmentations_all WHERE status = 'ok'")
    again("segmentations", "segment", outcome["dataset"], {"segmenter": outcome["segmenter"], "dataset": outcome["dataset"]},
          [outcome], SEGMENTATIONS)
    expert = {"expert_id": "r/ground", "run_id": "r", "group": "ground", "segmenter": "s", "base_checkpoint": "b",
              "uri": catalog.path("checkpoints", "x"), "labels": ["FR"], "snapshot": "x", "train_crops": 1,
              "val_crops": 0, "steps": 1, "val_accuracy": None, "untrained": True, "metrics": "{}", "config": "{}",
              "created_at": NOW}
    again("experts", "train-experts", "experts", {"group": "ground"}, [expert, expert], EXPERTS)
    prediction = {"eval_id": "e", "dataset": "demo", "image_id": image["image_id"], "method": "majority", "country": "FR",
                  "predicted": "FR", "topk": ["FR"], "topk_score": [1.0], "crops": 1, "fallback": False, "created_at": NOW}
    metric = {"eval_id": "e", "dataset": "demo", "method": "majority", "metric": "top1", "value": 1.0, "ci_low": 1.0,
              "ci_high": 1.0, "n": 1, "untrained": True, "created_at": NOW}
    shards.commit_shard(catalog, "evaluate", "demo", "again-eval", [
        shards.Output("predictions", {"dataset": "demo"}, to_table([prediction, prediction], PREDICTIONS)),
        shards.Output("metrics", {"dataset": "demo"}, to_table([metric, metric], METRICS))])
    checks = {c.name: c for c in integrity_checks(catalog)}
    assert not checks[DUPLICATES].passed
    assert {r["tbl"] for r in checks[DUPLICATES].table.to_pylist()} == {
        "images", "quarantine", "features", "segmentations", "experts", "predictions", "metrics"}
    with pytest.raises(IntegrityError, match=DUPLICATES):  # duplicates block a build
        gate(catalog, list(checks.values()))


def test_leftovers_of_dead_writers_are_reported_and_swept_by_a_rerun(catalog):
    """Finding 6: a kill during demo-world generation left `demo-world.tmp-*` that no rerun or check
    noticed. Leftovers anywhere under the root are reported; a build removes a dead writer's."""
    from flows.build_feature_datasets import build_feature_datasets
    from tasks.specs import DemoSpec, SegmenterSpec
    from conftest import EXPERT_DEMO

    dead, live = dead_pid(), os.getpid()
    world_tmp = Path(catalog.path(f"demo-world.tmp-{dead}-0123abcd"))
    write(world_tmp / "g50" / "France" / "canvas_0.jpg", b"half a world")
    shard_tmp = Path(catalog.path("images", "dataset=demo", f"x.parquet.tmp-{dead}-89abcdef"))
    write(shard_tmp, b"half a shard")
    busy = Path(catalog.path("_tmp", f"duckdb.tmp-{live}-0badcafe"))
    busy.mkdir(parents=True)
    code, out = run_check()
    assert code == 1 and f"demo-world.tmp-{dead}-0123abcd" in out and f"x.parquet.tmp-{dead}-89abcdef" in out
    check = next(c for c in integrity_checks(catalog) if c.name == LEFTOVERS)
    assert not check.passed and "1 of running writers" in check.detail
    assert {c.name for c in gate(catalog) if not c.passed} == {LEFTOVERS}  # reported, not blocking
    build_feature_datasets(demo=DemoSpec(**EXPERT_DEMO), segmenter=SegmenterSpec(kind="annotations"),
                           crops=CropSpec(min_area=40), home=catalog.url)
    assert not world_tmp.exists() and not shard_tmp.exists() and busy.exists()  # a live writer's stays
    assert next(c for c in integrity_checks(catalog) if c.name == LEFTOVERS).passed
