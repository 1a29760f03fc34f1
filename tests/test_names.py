"""Every dataset name the spec accepts works end to end: artifact keys and run names are derived
safely from it (Prefect artifact keys allow only lowercase letters, digits and dashes)."""

from __future__ import annotations

import re
import shutil

import pytest
from typer.testing import CliRunner

from flows.names import artifact_key, key_part, run_name, short_segmenter
from storage.layout import DataRoot
from tasks.specs import DATASET_NAME, SourceSpec

ARTIFACT_KEY = re.compile(r"^[a-z0-9-]+$")  # prefect.types.names: LOWERCASE_LETTERS_NUMBERS_AND_DASHES_ONLY
LONG = ("x_y-" * 16)[:64]  # 64 characters, the pattern's limit, ending in a dash
# The pattern's edge cases: `_`, `-` with digits, digits only, 64 characters; each with the split it gets.
EDGE_NAMES = {"osv_sample": "train", "g-50": "val", "007": "test", LONG: "test"}


def test_edge_names_are_accepted_names():
    for name in EDGE_NAMES:
        assert re.match(DATASET_NAME, name), name
        SourceSpec(layout="g50", source="x", dataset=name)
    assert len(LONG) == 64


@pytest.mark.parametrize("name", [*EDGE_NAMES, "a", "a--b", "a_b", "a-b", "9", "z" * 64])
def test_artifact_keys_are_valid_for_every_accepted_name(name):
    for key in (artifact_key("ingest", name), artifact_key("data-quality", name, "x_y")):
        assert ARTIFACT_KEY.match(key), key


def test_artifact_keys_keep_valid_names_and_never_collide():
    assert artifact_key("ingest", "g-50") == "ingest-g-50"  # already valid: unchanged
    assert artifact_key("ingest", "osv_sample").startswith("ingest-osv-sample-")
    names = ["osv_sample", "osv-sample", "osv__sample", "osv_-sample", "UNTRAINED-x@main-1", "untrained-x-main-1"]
    assert len({key_part(n) for n in names}) == len(names)
    seg = "facebook--mask2former-swin-large-mapillary-vistas-panoptic@main-ef1167dd87"
    assert ARTIFACT_KEY.match(artifact_key("data-quality", seg))
    assert artifact_key("data-quality", seg) != artifact_key("data-quality", seg.replace("ef11", "ef12"))


def test_run_names_are_readable_and_free_of_banned_characters():
    assert run_name("segment", "a/b", "<x>", "%&") == "segment a-b -x- --"
    assert len(run_name("x" * 500)) == 120
    assert short_segmenter("facebook--mask2former-swin-large-mapillary-vistas-panoptic@main-ef1167dd87") == \
        "mask2former-swin-large-mapillary-vistas-panoptic@ef1167dd87"
    assert short_segmenter(None) == "latest segmenter"


def _edge_name_sources(tmp_path, world: str) -> dict[str, str]:
    """The demo world's G50 images split over one folder per edge-case name (same relative paths,
    so the world's panoptic ground truth serves every copy)."""
    from pathlib import Path

    files = sorted(p for p in Path(world, "g50").rglob("*.jpg"))
    folders = {name: tmp_path / f"src{k}" for k, name in enumerate(EDGE_NAMES)}
    # 2 of every 5 images train, then one each for val and the two test sets
    slot = ["osv_sample", "osv_sample", "g-50", "007", LONG]
    for i, f in enumerate(files):
        dest = folders[slot[i % 5]] / f.relative_to(Path(world, "g50"))
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dest)
    return {name: str(folder) for name, folder in folders.items()}


@pytest.mark.usefixtures("prefect_harness")
def test_edge_case_dataset_names_through_ingest_segment_train_evaluate_and_sql(tmp_path, monkeypatch):
    from prefect.client.orchestration import get_client

    from flows.cli import app
    from flows.evaluate import evaluate
    from flows.ingest import ingest
    from flows.segment import segment
    from flows.train_experts import train_experts
    from tasks.demo_world.world import generate_demo_world
    from tasks.segment import segmenter_id
    from tasks.specs import AnnotationSource, CropSpec, DemoSpec, EvalSpec, SegmenterSpec, TrainSpec

    root = DataRoot(str(tmp_path / "home"))
    world = str(tmp_path / "world")
    generate_demo_world(world, DemoSpec(seed=3, countries=3, per_country=20, heldout_per_country=0, messy=False))
    folders = _edge_name_sources(tmp_path, world)
    for name, split in EDGE_NAMES.items():
        out = ingest(SourceSpec(layout="g50", source=folders[name], dataset=name, split={"policy": split}),
                     home=root.url)
        assert out["images"] > 0 and out["dataset"] == name

    spec = SegmenterSpec(kind="annotations", annotations={
        name: AnnotationSource(panoptic_json=f"{world}/panoptic/g50.json", png_dir=f"{world}/panoptic/g50",
                               images_root=folders[name]) for name in EDGE_NAMES})
    crops = CropSpec(min_area=40)
    seg = segment(segmenter=spec, crops=crops, home=root.url)
    assert set(seg["datasets"]) == set(EDGE_NAMES) and seg["crops"] > 0
    trained = train_experts(TrainSpec(checkpoint="tiny-random", groups=["ground"], epochs=2, batch_size=16,
                                      lr=1e-3, min_crops_per_country=2, num_workers=0), home=root.url)
    assert {e["group"] for e in trained["experts"]} == {"ground", "image"}
    result = evaluate(EvalSpec(bootstrap=20, allow_untrained=True), home=root.url)  # tiny demo experts
    assert set(result["datasets"]) == {"007", LONG}

    monkeypatch.setenv("GEOFEAT_HOME", root.url)
    res = CliRunner().invoke(app, ["sql", "SELECT dataset, count(*) AS n FROM features GROUP BY 1", "--format", "json"])
    assert res.exit_code == 0, res.output
    import json

    assert {r["dataset"] for r in json.loads(res.stdout)} == set(EDGE_NAMES)
    res = CliRunner().invoke(app, ["sql", "SELECT DISTINCT dataset FROM metrics", "--format", "json"])
    assert {r["dataset"] for r in json.loads(res.stdout)} == {"007", LONG}

    # What the Prefect UI shows: per-dataset and per-segmenter keys, readable run names.
    sid = segmenter_id(spec, crops)
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts()
        names = {r.name for r in client.read_flow_runs()}
    keys = {a.key for a in artifacts if a.key}
    expected = {artifact_key("ingest", n) for n in EDGE_NAMES} | {
        artifact_key("data-quality", sid), artifact_key("experts", sid), "evaluation-report"}
    assert expected <= keys, expected - keys
    assert all(ARTIFACT_KEY.match(k) for k in keys)
    done = {a.description.split(":")[0] for a in artifacts if a.type == "progress" and float(a.data) == 100.0}
    assert {f"ingest {n}" for n in EDGE_NAMES} | {"train-experts ground expert"} <= done, done
    assert any(d.startswith("segment 007, g-50, osv_sample +1") for d in done), done
    assert {f"ingest {n}" for n in EDGE_NAMES} <= names
    assert any(n.startswith("segment all datasets with annotations@") for n in names), names
    assert any(n.startswith("train tiny-random experts on latest segmenter") for n in names), names
