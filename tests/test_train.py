"""Expert training: image-level selection, the Parquet crop stream, balanced sampling, resume, registry."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from tasks.specs import TrainSpec
from storage.catalog import connect
from tasks.loader import CropStream, repeat_factors
from tasks.train_experts import select_crops, train_expert
from models.expert import Transforms
from tests.conftest import EXPERT_TRAIN


def segmenter_of(root) -> str:
    return connect(root).sql("SELECT DISTINCT segmenter FROM features WHERE segmenter LIKE 'annotations@%'").fetchall()[0][0]


def test_selection_is_by_image_split_and_reports_small_countries(demo_catalog):
    root, seg = demo_catalog, segmenter_of(demo_catalog)
    sel = select_crops(root, TrainSpec(checkpoint="tiny-random"), "ground", seg)
    con = connect(root)
    train_ids = {f for _, ids, _ in sel.train for f in ids}
    val_ids = {f for _, ids, _ in sel.val for f in ids}
    splits = dict(con.sql("SELECT feature_id, i.split FROM features f JOIN images i USING (image_id, dataset)").fetchall())
    assert train_ids and val_ids and {splits[f] for f in train_ids} == {"train"} and {splits[f] for f in val_ids} == {"val"}
    images = lambda ids: set(con.execute("SELECT DISTINCT image_id FROM features WHERE feature_id IN (SELECT unnest(?))",
                                         [sorted(ids)]).fetchall())
    assert not images(train_ids) & images(val_ids)  # never one image on both sides
    assert sel.snapshot == select_crops(root, TrainSpec(checkpoint="tiny-random"), "ground", seg).snapshot
    # A minimum above every country's count drops them all, and says which with their counts.
    big = select_crops(root, TrainSpec(checkpoint="tiny-random", min_crops_per_country=10_000), "ground", seg)
    assert big.labels == [] and big.dropped == sel.class_counts and sum(big.dropped.values()) == sel.train_crops
    summary = train_expert(root, TrainSpec(checkpoint="tiny-random", min_crops_per_country=10_000), "ground", seg)
    assert "skipped" in summary and summary["dropped_countries"] == sel.class_counts


def test_repeat_factors_balance_classes():
    labels = np.array([0] * 90 + [1] * 10)
    for balance, ratio in (("none", 9.0), ("sqrt", 3.0), ("inverse", 1.0)):
        f = repeat_factors(labels, balance)
        assert f.sum() == pytest.approx(len(labels))  # an epoch keeps its size
        assert f[labels == 0].sum() / f[labels == 1].sum() == pytest.approx(ratio)


def test_crop_stream_reads_each_crop_once_across_workers(demo_catalog):
    root, seg = demo_catalog, segmenter_of(demo_catalog)
    sel = select_crops(root, TrainSpec(checkpoint="tiny-random"), "furniture", seg)
    units = [(f, ids, list(range(k, k + len(ids)))) for k, (f, ids, _) in
             zip(np.cumsum([0] + [len(u[1]) for u in sel.train])[:-1], sel.train)]  # label = row position
    stream = CropStream(root.url, units, Transforms(size=16), train=False)
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(stream, batch_size=8, num_workers=workers)
        seen = torch.cat([y for _, y, _ in loader]).tolist()
        assert sorted(seen) == list(range(sel.train_crops))
    shares = [sum(len(units[u][1][sl]) for u, sl in pieces) for pieces in stream.deal(3)]
    assert sum(shares) == sel.train_crops and max(shares) - min(shares) <= sel.train_crops / 12 + 1  # balanced


def test_train_stream_order_is_seeded_and_resumable(demo_catalog):
    root, seg = demo_catalog, segmenter_of(demo_catalog)
    sel = select_crops(root, TrainSpec(checkpoint="tiny-random"), "furniture", seg)
    stream = CropStream(root.url, sel.train, Transforms(size=16, train=True), train=True, balance="sqrt",
                        shuffle_buffer=32, seed=3)
    first = [(x, int(y)) for x, y, _ in stream]
    again = [(x, int(y)) for x, y, _ in stream]
    assert [y for _, y in first] == [y for _, y in again] and all(torch.equal(a, b) for (a, _), (b, _) in zip(first, again))
    stream.epoch = 1
    assert [int(y) for _, y, _ in stream] != [y for _, y in first]  # a new epoch, a new order
    stream.epoch, stream.skip = 0, {0: 10}
    assert [int(y) for _, y, _ in stream] == [y for _, y in first][10:]  # resuming skips what was consumed


def test_trained_experts_are_registered_with_provenance(trained_demo):
    root, result = trained_demo
    groups = {e["group"]: e for e in result["experts"]}
    assert set(groups) == {"ground", "furniture", "image", "random"}
    con = connect(root)
    rows = con.sql('SELECT "group", uri, labels, snapshot, train_crops, steps, untrained FROM experts').fetchall()
    assert len(rows) == 4 and all(r[6] for r in rows)  # tiny random-init start: flagged
    for group, uri, labels, snapshot, crops, steps, _ in rows:
        files = set(os.listdir(uri))
        assert {"model.safetensors", "config.json", "geofeat_expert.json"} <= files
        assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files)
        assert len(labels) == 3 and crops == groups[group]["train_crops"] and steps > 0
    # Random crops match the directed crops: as many per image, sized like them.
    counts = con.sql("""SELECT count(*) FILTER (WHERE "group" = 'random') = count(*) FILTER (WHERE "group" NOT IN
        ('random', 'image')) FROM features GROUP BY image_id""").fetchall()
    assert counts and all(c for (c,) in counts)
    # A rerun with the same spec and crops is a no-op.
    from tasks.specs import TrainSpec
    from flows.train_experts import train_experts

    again = train_experts(TrainSpec(**EXPERT_TRAIN), home=root.url)
    assert all(e["cached"] for e in again["experts"])


@pytest.mark.parametrize("workers", [0, 2])
def test_crash_mid_training_resumes_from_the_last_checkpoint(demo_catalog, workers):
    root, seg = demo_catalog, segmenter_of(demo_catalog)
    spec = TrainSpec(**{**EXPERT_TRAIN, "seed": 7 + workers, "epochs": 3, "eval_every": 2, "num_workers": workers})
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_expert(root, spec, "ground", seg, stop_after_steps=5)
    resumed = train_expert(root, spec, "ground", seg)
    assert resumed["resumed_at_step"] == 4  # the checkpoint of the last evaluation before the crash
    # Forget it and train again without a crash: the same steps, the same val accuracy.
    root.fs.rm(root.commit_path("train-experts", "experts", resumed["expert_id"]))
    root.fs.rm(root.path("checkpoints", resumed["expert_id"]), recursive=True)
    fresh = train_expert(root, spec, "ground", seg)
    assert "resumed_at_step" not in fresh
    assert (fresh["steps"], fresh["val_accuracy"]) == (resumed["steps"], pytest.approx(resumed["val_accuracy"]))


def test_no_crops_says_what_to_do(root):
    from tasks.train_experts import default_segmenter

    with pytest.raises(LookupError, match="build-feature-datasets"):
        default_segmenter(root, None)
