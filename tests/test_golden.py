"""Golden values of every id geofeat derives. An accidental change of one silently re-segments or
retrains a whole catalog (every shard and crop looks new), so each is pinned to the value the
released code produced. Change one only with a version bump, and say so in the change."""

from __future__ import annotations

from storage.shards import shard_id
from tasks.ingest import Candidate, _shard_id
from tasks.segment import feature_id, segmenter_id
from tasks.specs import CropSpec, SegmenterSpec, TrainSpec
from tasks.train_experts import Selection, expert_id, run_id

TINY = SegmenterSpec(kind="tiny-random", label_set="demo", input_height=64, input_width=128, score_threshold=0.0)
G50_OVERLAY = {"g50": {"top": 0.12, "bottom": 0.45}}
INGEST_PARAMS = {"dataset": "g50", "layout": "g50", "split": {"policy": "hash", "train": 0.8, "val": 0.1},
                 "max_pixels": 80_000_000, "max_bytes": 256 * 2**20}


def test_feature_id():
    assert feature_id("seg@main-0123456789", "g50", "ab" * 32, "car", 2) == "7b79110db2c8109cbfa443b4"


def test_segmenter_ids():
    assert segmenter_id(SegmenterSpec(), CropSpec()) == \
        "facebook--mask2former-swin-large-mapillary-vistas-panoptic@main-ef1167dd87"
    assert segmenter_id(TINY, CropSpec(min_score=0.0, min_area=1)) == "UNTRAINED-tiny-random-demo@main-20715dab03"
    assert segmenter_id(SegmenterSpec(kind="annotations"), CropSpec(min_area=40)) == "annotations@main-afc81d0f77"
    # An overlay keyed by layout cuts datasets that its dataset-only key did not (issue 12): specs that set
    # an overlay got a new id (was ...-20bd3e5ace); specs without one keep theirs.
    assert segmenter_id(SegmenterSpec(overlay=G50_OVERLAY), CropSpec()) == \
        "facebook--mask2former-swin-large-mapillary-vistas-panoptic@main-307067df29"


def test_expert_ids():
    spec = TrainSpec(checkpoint="tiny-random", groups=["ground"], epochs=2)
    # TRAIN_VERSION 2 (issue 11): uint8 loader, augmentation keyed per (seed, epoch, crop, copy)
    assert run_id(spec, "annotations@main-abc") == "87ea2ae47300"
    assert run_id(TrainSpec(), "seg") == "85107326beda"
    sel = Selection(group="ground", key="k", labels=[], train=[], val=[], train_crops=0, val_crops=0,
                    class_counts={}, dropped={}, snapshot="f" * 64)
    assert expert_id(spec, "annotations@main-abc", sel) == "ground-87ea2ae47300-ffffffffff"


def test_shard_ids():
    candidates = [Candidate(uri="/data/g50/France/a.jpg", size=1234, mtime=1.5e9, country="FR")]
    # ingest version 2 (issue 13: the content decides the format, non-regular files are quarantined);
    # version 1 gave c338fecd36ef80ca9b7b. Inputs already committed are never planned again.
    assert _shard_id("g50", INGEST_PARAMS, candidates) == "f176f8c608e7cfe4b71b"
    assert shard_id(["seg@x", "g50", ["a" * 64, "b" * 64]]) == "1dae31370c082f646a74"  # segment, baselines
