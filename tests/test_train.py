"""Expert training: image-level selection, the Parquet crop stream, balanced sampling, resume, registry."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from tasks.specs import TrainSpec
from storage.catalog import connect
from tasks.loader import CropError, CropStream, close_loader, make_loader, repeat_factors
from tasks.train_experts import select_crops, train_expert
from models.expert import Expert, Transforms
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


def _digest(*tensors) -> str:
    return hashlib.sha1(b"".join(t.numpy().tobytes() for t in tensors)).hexdigest()[:16]


def _furniture_stream(root, seg, seed=3, size=16) -> CropStream:
    sel = select_crops(root, TrainSpec(checkpoint="tiny-random"), "furniture", seg)
    return CropStream(root.url, sel.train, Transforms(size=size, train=True, seed=seed), train=True, balance="sqrt",
                      shuffle_buffer=32, seed=seed)


def _epoch(loader, stream, epoch, consumed=None, first=0, stop_after=None):
    """One epoch's batches as (sample digests, labels, workers); `stop_after` batches: a crash."""
    stream.set_epoch(epoch, consumed, first)
    out = []
    for x, f, y, w in loader:
        out.append(([_digest(x[i], f[i]) for i in range(len(y))], y.tolist(), w.tolist()))
        if stop_after is not None and len(out) >= stop_after:
            break
    return out


def test_train_stream_order_is_seeded_and_resumable(demo_catalog):
    root, seg = demo_catalog, segmenter_of(demo_catalog)
    stream = _furniture_stream(root, seg)
    first = [(_digest(x, f), int(y)) for x, f, y, _ in stream]
    assert first == [(_digest(x, f), int(y)) for x, f, y, _ in stream]  # the same (seed, epoch): the same stream
    x, f, _, _ = next(iter(stream))
    assert x.dtype == torch.uint8 and x.shape == (16, 16, 3) and f.dtype == torch.float32 and f.shape == (2,)
    assert ((0.8 <= f) & (f <= 1.2)).all()
    stream.set_epoch(1)
    second = [(_digest(x, f), int(y)) for x, f, y, _ in stream]
    assert [y for _, y in second] != [y for _, y in first]  # a new epoch, a new order
    assert not {d for d, _ in second} & {d for d, _ in first}  # and a new augmentation of every crop
    stream.set_epoch(0, consumed={0: 10})
    assert [(_digest(x, f), int(y)) for x, f, y, _ in stream] == first[10:]  # resuming skips what was consumed


def test_augmentation_of_a_sample_does_not_depend_on_the_worker_count(demo_catalog):
    """The (pixels, factors, label) multiset of an epoch is the same with 0 and 2 workers: a sample's
    augmentation is keyed by (seed, epoch, crop, copy), and so are the class-balanced copies."""
    root, seg = demo_catalog, segmenter_of(demo_catalog)
    seen = {}
    for workers in (0, 2):
        stream = _furniture_stream(root, seg)
        loader = make_loader(stream, 8, workers, persistent=True)
        try:
            seen[workers] = [sorted(zip(*[sum((b[k] for b in _epoch(loader, stream, e)), []) for k in (0, 1)]))
                             for e in (0, 1)]
        finally:
            close_loader(loader)
    assert seen[0] == seen[2]
    assert len(seen[0][0]) > 20 and seen[0][0] != seen[0][1]


@pytest.mark.parametrize("workers", [0, 2])
def test_persistent_loader_resumes_exactly_where_it_stopped(demo_catalog, workers):
    """A crash after k batches, then a new loader told what each worker had delivered and whose batch was
    due: the rest of the epoch and the next epoch are the uninterrupted run's, batch for batch, in order
    (also once a worker has run dry, near the epoch's end)."""
    root, seg = demo_catalog, segmenter_of(demo_catalog)
    stream = _furniture_stream(root, seg)
    loader = make_loader(stream, 8, workers, persistent=True)
    try:
        full = [_epoch(loader, stream, e) for e in (0, 1)]
    finally:
        close_loader(loader)
    n = len(full[0])
    assert n >= 6 and full[0] != full[1]
    for k in sorted({2, 3, n // 2, n - 2, n - 1}):
        consumed: dict[int, int] = {}
        for _, _, ws in full[0][:k]:
            for w in ws:
                consumed[w] = consumed.get(w, 0) + 1
        first = (full[0][k - 1][2][-1] + 1) % max(1, workers)
        stream = _furniture_stream(root, seg)
        loader = make_loader(stream, 8, workers, persistent=True)
        try:
            assert _epoch(loader, stream, 0, consumed, first) == full[0][k:], k
            assert _epoch(loader, stream, 1) == full[1], k
        finally:
            close_loader(loader)


def test_footers_are_read_once_per_file_across_epochs(demo_catalog, monkeypatch):
    import tasks.loader as loader_module

    root, seg = demo_catalog, segmenter_of(demo_catalog)
    reads: list[str] = []
    real = loader_module.parquet_footer
    monkeypatch.setattr(loader_module, "parquet_footer", lambda r, p: reads.append(p) or real(r, p))
    stream = _furniture_stream(root, seg)
    loader = make_loader(stream, 8, 0, persistent=True)
    for e in range(3):
        _epoch(loader, stream, e)
    assert sorted(reads) == sorted(p for p, _, _ in stream.units)


def test_a_crop_that_cannot_be_decoded_names_itself(tmp_path):
    crop = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
    path = str(tmp_path / "part.parquet")
    pq.write_table(pa.table({"feature_id": ["ab12", "cd34"],
                             "crop": pa.array([{"bytes": b"\xff\xd8not a jpeg", "path": None},
                                               {"bytes": b"GIF89a", "path": None}], crop)}), path)
    for train in (True, False):
        stream = CropStream(str(tmp_path), [(path, ["ab12", "cd34"], [0, 1])], Transforms(size=16, train=train),
                            train=train)
        with pytest.raises(CropError, match=r"crop (ab12|cd34) in .*part.parquet cannot be decoded.*geofeat check"):
            list(stream)


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
    spec = TrainSpec(**{**EXPERT_TRAIN, "seed": 7 + workers, "epochs": 3, "eval_every": 3, "num_workers": workers})
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_expert(root, spec, "ground", seg, stop_after_steps=5)
    resumed = train_expert(root, spec, "ground", seg)
    assert resumed["resumed_at_step"] == 3  # the checkpoint of the last evaluation before the crash (odd: with
    # 2 workers, worker 1 is due next)
    # Forget it and train again without a crash: the same steps, the same val accuracy.
    best = root.path("checkpoints", resumed["expert_id"], "best")
    weights = load_file(f"{best}/model.safetensors")
    curve = Expert.read_sidecar(best)["metrics"]["curve"]  # val accuracy and mean train loss per evaluation
    root.fs.rm(root.commit_path("train-experts", "experts", resumed["expert_id"]))
    root.fs.rm(root.path("checkpoints", resumed["expert_id"]), recursive=True)
    fresh = train_expert(root, spec, "ground", seg)
    assert "resumed_at_step" not in fresh
    assert (fresh["steps"], fresh["val_accuracy"]) == (resumed["steps"], resumed["val_accuracy"])
    # The same batches in the same order: the same losses and the same weights, bit for bit.
    again = Expert.read_sidecar(best)["metrics"]["curve"]
    assert again == curve and len(curve) >= 3
    fresh_weights = load_file(f"{best}/model.safetensors")
    assert weights.keys() == fresh_weights.keys() and all(torch.equal(weights[k], fresh_weights[k]) for k in weights)


def test_no_crops_says_what_to_do(root):
    from tasks.train_experts import default_segmenter

    with pytest.raises(LookupError, match="build-feature-datasets"):
        default_segmenter(root, None)
