"""Explicit versions (issue 12): "the latest" never picks an UNTRAINED segmenter or expert unless asked,
evaluation picks experts whose segmenter cut the evaluated datasets, pins are honoured, too-small
selections are refused and an evaluation with no answer is an error. Synthetic catalogs, no models."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from storage import shards
from storage.catalog import refresh_catalog
from storage.schema import EXPERTS, FEATURES, IMAGES, SEGMENTATIONS, to_table
from tasks.evaluate import evaluate, select_experts
from tasks.specs import EvalSpec, TrainSpec
from tasks.train_experts import Selection, default_segmenter, require_experts, too_small

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
REAL, NOISE = "annotations@main-aaaa", "UNTRAINED-tiny-random-demo@main-bbbb"


def image(i: int, dataset: str, split: str) -> dict:
    return {"image_id": f"{i:064x}", "dataset": dataset, "split": split, "country": "FR", "country_name": "France",
            "continent": "Europe", "lat": None, "lon": None, "source_uri": f"/src/{dataset}/{i}.jpg", "width": 64,
            "height": 32, "format": "JPEG", "size_bytes": 100, "source_mtime": 1.5, "ingested_at": T0}


def ingest(root, dataset: str, splits: list[str], first: int = 0) -> list[dict]:
    rows = [image(first + k, dataset, s) for k, s in enumerate(splits)]
    shards.commit_shard(root, "ingest", dataset, f"i-{dataset}", [shards.Output("images", {"dataset": dataset},
                                                                                to_table(rows, IMAGES))],
                        params={"dataset": dataset, "layout": "g50"})
    return rows


def segment(root, segmenter: str, images: list[dict], untrained: bool, when: datetime, crops: bool = True) -> None:
    dataset = images[0]["dataset"]
    feats = [{"feature_id": f"{segmenter}-{im['image_id'][-6:]}", "image_id": im["image_id"], "dataset": dataset,
              "split": im["split"], "country": "FR", "label": "road", "group": "ground", "score": 1.0,
              "bbox": [0, 0, 4, 4], "area": 16, "crop": {"bytes": b"x", "path": "f.jpg"}, "crop_width": 4,
              "crop_height": 4, "segmenter": segmenter, "untrained": untrained, "created_at": when}
             for im in images] if crops else []
    logs = [{"image_id": im["image_id"], "dataset": dataset, "segmenter": segmenter, "status": "ok" if crops else
             "no_crops", "crops": int(crops), "created_at": when} for im in images]
    shards.commit_shard(root, "segment", dataset, f"s-{segmenter[:8]}-{dataset}", [
        shards.Output("features", {"segmenter": segmenter, "dataset": dataset, "group": "ground"},
                      to_table(feats, FEATURES)),
        shards.Output("segmentations", {"segmenter": segmenter, "dataset": dataset}, to_table(logs, SEGMENTATIONS))])


def register(root, expert_id: str, segmenter: str, untrained: bool, when: datetime, group: str = "ground") -> None:
    row = {"expert_id": expert_id, "run_id": expert_id.split("-")[1], "group": group, "segmenter": segmenter,
           "uri": root.path("checkpoints", expert_id, "best"), "base_checkpoint": "b", "labels": ["FR", "ES"],
           "snapshot": "s", "train_crops": 10, "val_crops": 2, "steps": 1, "val_accuracy": 0.5,
           "untrained": untrained, "metrics": "{}", "config": "{}", "created_at": when}
    shards.commit_shard(root, "train-experts", "experts", expert_id,
                        [shards.Output("experts", {"group": group}, to_table([row], EXPERTS))])


@pytest.fixture
def mixed(root):
    """Dataset `mine` segmented first by a real segmenter, then (later) by an UNTRAINED one; dataset
    `other` only by the untrained one."""
    mine = ingest(root, "mine", ["train", "train", "val", "test"])
    other = ingest(root, "other", ["train", "test"], first=100)
    segment(root, REAL, mine, untrained=False, when=T0)
    segment(root, NOISE, mine, untrained=True, when=T0 + timedelta(days=1))
    segment(root, NOISE, other, untrained=True, when=T0 + timedelta(days=1))
    refresh_catalog(root)
    return root


def test_the_latest_segmenter_is_never_an_untrained_one_unless_asked(mixed):
    assert default_segmenter(mixed, None) == REAL  # the untrained one is newer, and skipped
    assert default_segmenter(mixed, None, allow_untrained=True) == NOISE
    with pytest.raises(LookupError, match="UNTRAINED.*--allow-untrained"):
        default_segmenter(mixed, ["other"])  # only noise there: said, not trained on


def test_evaluation_skips_untrained_experts_and_needs_a_covering_segmenter(mixed):
    register(mixed, "ground-real-1", REAL, untrained=False, when=T0)
    register(mixed, "ground-noise-1", NOISE, untrained=False, when=T0 + timedelta(days=2))  # trained on noise
    register(mixed, "ground-tiny-1", REAL, untrained=True, when=T0 + timedelta(days=3))  # random-init start
    refresh_catalog(mixed)
    pick = lambda **kw: select_experts(mixed, EvalSpec(**kw))["expert_id"].to_list()  # noqa: E731
    assert pick() == ["ground-real-1"]  # newer experts are untrained or on an untrained segmenter
    assert pick(allow_untrained=True) == ["ground-tiny-1"]
    assert pick(experts=["ground-noise-1"]) == ["ground-noise-1"]  # pinned by id: used as asked
    assert pick(experts_run="noise") == ["ground-noise-1"]
    with pytest.raises(LookupError, match="segmented \\['other'\\]"):
        pick(datasets=["other"])  # REAL never segmented `other`: its experts cannot answer there
    assert pick(datasets=["other"], allow_untrained=True) == ["ground-noise-1"]
    with pytest.raises(LookupError, match="no expert \\['nope'\\]"):
        pick(experts=["nope"])


def test_only_untrained_experts_are_refused_with_the_way_out(mixed):
    register(mixed, "ground-tiny-1", REAL, untrained=True, when=T0)
    refresh_catalog(mixed)
    with pytest.raises(LookupError, match="UNTRAINED.*--allow-untrained"):
        select_experts(mixed, EvalSpec())


def test_an_evaluation_without_any_answer_is_an_error(root):
    images = ingest(root, "mine", ["train", "test"])
    segment(root, REAL, images, untrained=False, when=T0, crops=False)  # segmented, no crop at all
    register(root, "ground-real-1", REAL, untrained=False, when=T0)
    refresh_catalog(root)
    with pytest.raises(LookupError, match="no answer for the test images of \\['mine'\\]"):
        evaluate(root, EvalSpec(datasets=["mine"], bootstrap=0))


def selection(train_crops: int, val_crops: int, countries: int) -> Selection:
    labels = [f"C{i}" for i in range(countries)]
    return Selection(group="ground", key=REAL, labels=labels, train=[], val=[], train_crops=train_crops,
                     val_crops=val_crops, class_counts={c: 10 for c in labels}, dropped={}, snapshot="f" * 64)


def test_too_small_selections_are_refused_with_the_reason():
    spec = TrainSpec()
    assert too_small(selection(40, 5, 3), spec) is None
    assert "no val crops" in too_small(selection(40, 0, 3), spec)
    assert "1 countries" in too_small(selection(11, 2, 1), spec)
    assert too_small(selection(40, 5, 3), TrainSpec(min_countries=4)).startswith("3 countries")
    assert "min_countries" not in TrainSpec().identity()  # ids of experts trained before it existed hold
    ok = {"group": "image", "expert_id": "e"}
    refused = {"group": "ground", "skipped": "no val crops"}
    with pytest.raises(LookupError, match="ground: no val crops"):
        require_experts([refused, ok], REAL)  # a whole-image baseline alone is not a trained selection
    require_experts([refused, {"group": "vehicle", "expert_id": "v", "cached": True}], REAL)
