"""models/segmenter.py: post-processing on hand-built logits, the tiny random model, loading/saving.

No network and no downloaded weights: the model tests use a tiny random-init Mask2Former."""

from __future__ import annotations

import json
import logging
import pickle
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from models.segmenter import (
    Mask2FormerSegmenter,
    Preprocessor,
    Segment,
    SegmenterUnavailable,
    resolve_device,
    segments_from_logits,
    swin_large_config,
    swin_tiny_config,
    tiny_config,
)

LABELS = ["road", "building", "sky"]
ID2LABEL = dict(enumerate(LABELS))
NO_OBJECT = len(LABELS)
MH, MW = 8, 16
ORIG = (80, 160)  # (height, width): 10 px per mask cell
HI, LO = 10.0, -10.0  # mask logits: sigmoid ~ 1 / ~ 0


def _class_row(label_id: int, logit: float = 10.0) -> list[float]:
    row = [0.0] * (len(LABELS) + 1)
    row[label_id] = logit
    return row


def _mask(rows: slice, cols: slice) -> torch.Tensor:
    m = torch.full((MH, MW), LO)
    m[rows, cols] = HI
    return m


def _logits(queries: list[tuple[list[float], torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    cls = torch.tensor([[row for row, _ in queries]], dtype=torch.float32)  # [1, Q, C+1]
    masks = torch.stack([m for _, m in queries]).unsqueeze(0)  # [1, Q, MH, MW]
    return cls, masks


ROAD = (_class_row(0), _mask(slice(4, 8), slice(0, 16)))  # bottom half
BUILDING = (_class_row(1), _mask(slice(0, 4), slice(0, 8)))  # top-left quarter
NOTHING = (_class_row(NO_OBJECT), _mask(slice(0, 8), slice(0, 16)))  # "no object" everywhere
WEAK_SKY = ([1.0, 1.0, 1.5, 1.0], _mask(slice(0, 4), slice(8, 16)))  # p(sky) ~ 0.355, top-right quarter
BAND_SKY = (_class_row(2, 3.0), _mask(slice(2, 6), slice(0, 16)))  # p(sky) ~ 0.87, rows 2..5 (mostly covered)


def _by_label(segments: list[Segment]) -> dict[str, Segment]:
    out = {s.label: s for s in segments}
    assert len(out) == len(segments), f"one segment per label expected: {segments}"
    return out


def _check_segment(seg: Segment, size: tuple[int, int], mask_shape: tuple[int, int], labels) -> None:
    h, w = size
    x0, y0, x1, y1 = seg.bbox
    assert all(isinstance(v, int) for v in seg.bbox)
    assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, (seg.bbox, size)
    assert isinstance(seg.area, int) and 0 < seg.area <= h * w
    assert seg.mask.dtype == np.bool_ and seg.mask.shape == mask_shape and seg.mask.any()
    assert seg.label in labels.values() and labels[seg.label_id] == seg.label
    assert 0.0 <= seg.score <= 1.0


# ---------------------------------------------------------------- post-processing (pure)


def test_panoptic_exact_boxes_and_areas():
    cls, masks = _logits([ROAD, BUILDING, NOTHING])
    [segments] = segments_from_logits(cls, masks, [ORIG], ID2LABEL)
    got = _by_label(segments)
    assert set(got) == {"road", "building"}
    road, building = got["road"], got["building"]
    assert (road.bbox, road.area, road.label_id) == ((0, 40, 160, 80), 6400, 0)
    assert (building.bbox, building.area, building.label_id) == ((0, 0, 80, 40), 3200, 1)
    assert road.score == pytest.approx(1.0, abs=1e-3) and building.score == pytest.approx(1.0, abs=1e-3)
    expected_road = np.zeros((MH, MW), bool)
    expected_road[4:] = True
    np.testing.assert_array_equal(road.mask, expected_road)
    assert not (road.mask & building.mask).any()  # panoptic masks are disjoint
    assert not road.mask.flags.writeable


def test_score_threshold_drops_low_confidence_query():
    cls, masks = _logits([ROAD, BUILDING, NOTHING, WEAK_SKY])
    [default] = segments_from_logits(cls, masks, [ORIG], ID2LABEL)
    assert set(_by_label(default)) == {"road", "building"}
    [low] = segments_from_logits(cls, masks, [ORIG], ID2LABEL, score_threshold=0.3)
    sky = _by_label(low)["sky"]
    assert (sky.bbox, sky.area) == ((80, 0, 160, 40), 3200)
    assert sky.score == pytest.approx(np.exp(1.5) / (3 * np.e + np.exp(1.5)), abs=1e-5)
    assert [s.label for s in low][-1] == "sky"  # sorted by score, highest first


def test_overlap_threshold_drops_mostly_covered_query():
    cls, masks = _logits([ROAD, BUILDING, NOTHING, BAND_SKY])
    [default] = segments_from_logits(cls, masks, [ORIG], ID2LABEL)
    got = _by_label(default)
    assert set(got) == {"road", "building"}  # sky keeps 16 of its 64 cells: 0.25 < 0.8
    assert got["road"].bbox == (0, 40, 160, 80) and got["building"].bbox == (0, 0, 80, 40)
    [loose] = segments_from_logits(cls, masks, [ORIG], ID2LABEL, overlap_threshold=0.2)
    got = _by_label(loose)
    assert (got["sky"].bbox, got["sky"].area) == ((80, 20, 160, 40), 1600)
    assert (got["road"].area, got["building"].area) == (6400, 3200)


def test_instance_mode_returns_overlapping_masks_independently():
    cls, masks = _logits([ROAD, BUILDING, NOTHING, BAND_SKY])
    [segments] = segments_from_logits(cls, masks, [ORIG], ID2LABEL, mode="instance")
    got = _by_label(segments)  # the no-object query scores ~5e-5: dropped
    assert set(got) == {"road", "building", "sky"}
    assert got["road"].bbox == (0, 40, 160, 80) and got["road"].area == 6400
    assert got["building"].bbox == (0, 0, 80, 40) and got["building"].area == 3200
    assert got["sky"].bbox == (0, 20, 160, 60) and got["sky"].area == 6400
    assert (got["road"].mask & got["sky"].mask).sum() == 32 and (got["building"].mask & got["sky"].mask).sum() == 16
    p_sky = np.exp(3.0) / (np.exp(3.0) + 3)
    assert got["sky"].score == pytest.approx(p_sky * torch.sigmoid(torch.tensor(HI)).item(), abs=1e-5)
    [strict] = segments_from_logits(cls, masks, [ORIG], ID2LABEL, mode="instance", score_threshold=0.9)
    assert set(_by_label(strict)) == {"road", "building"}


def test_bbox_scaling_rounds_outwards_and_batches_differ_in_size():
    cell = ([*_class_row(1)], _mask(slice(3, 4), slice(5, 6)))  # one mask cell: row 3, col 5
    cls, masks = _logits([cell])
    cls2, masks2 = torch.cat([cls, cls]), torch.cat([masks, masks])
    small, big = segments_from_logits(cls2, masks2, [(77, 150), (800, 1600)], ID2LABEL)
    # x: 5*150/16 = 46.875 -> 46, 6*150/16 = 56.25 -> 57; y: 3*77/8 = 28.875 -> 28, 4*77/8 = 38.5 -> 39
    assert small[0].bbox == (46, 28, 57, 39) and small[0].area == 90  # 77*150/128 = 90.2
    assert big[0].bbox == (500, 300, 600, 400) and big[0].area == 10000


def test_empty_and_invalid_inputs():
    cls, masks = _logits([NOTHING])
    assert segments_from_logits(cls, masks, [ORIG], ID2LABEL) == [[]]
    assert segments_from_logits(cls, masks, [ORIG], ID2LABEL, mode="instance") == [[]]
    with pytest.raises(ValueError, match="mode"):
        segments_from_logits(cls, masks, [ORIG], ID2LABEL, mode="semantic")
    with pytest.raises(ValueError, match="sizes"):
        segments_from_logits(cls, masks, [ORIG, ORIG], ID2LABEL)


def test_agrees_with_transformers_post_processing():
    """Same segments (labels, scores, regions) as HF's full-resolution post-processing on a covered layout."""
    from transformers import Mask2FormerImageProcessorPil

    sky = (_class_row(2), _mask(slice(0, 4), slice(8, 16)))
    cls, masks = _logits([ROAD, BUILDING, NOTHING, sky])
    outputs = SimpleNamespace(class_queries_logits=cls, masks_queries_logits=masks)
    hf = Mask2FormerImageProcessorPil()

    [ours] = segments_from_logits(cls, masks, [ORIG], ID2LABEL)
    [theirs] = hf.post_process_panoptic_segmentation(outputs, label_ids_to_fuse=set(), target_sizes=[ORIG])
    assert sorted(s.label_id for s in ours) == sorted(i["label_id"] for i in theirs["segments_info"])
    scale = np.ones((ORIG[0] // MH, ORIG[1] // MW), bool)
    for info in theirs["segments_info"]:
        seg = next(s for s in ours if s.label_id == info["label_id"])
        assert seg.score == pytest.approx(info["score"], abs=1e-5)
        region = theirs["segmentation"].numpy() == info["id"]
        full = np.kron(seg.mask, scale)
        assert (region & full).sum() / (region | full).sum() > 0.95

    [ours] = segments_from_logits(cls, masks, [ORIG], ID2LABEL, mode="instance")
    [theirs] = hf.post_process_instance_segmentation(outputs, target_sizes=[ORIG])
    assert sorted(s.label_id for s in ours) == sorted(i["label_id"] for i in theirs["segments_info"])
    for info in theirs["segments_info"]:
        seg = next(s for s in ours if s.label_id == info["label_id"])
        # HF averages the mask prob over 384x384 bilinear-upsampled logits (soft borders): a bit lower
        assert seg.score == pytest.approx(info["score"], abs=0.02)


# ---------------------------------------------------------------- preprocessing


def test_preprocessor_pickles_and_normalises():
    pre = Preprocessor(height=64, width=96, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    clone = pickle.loads(pickle.dumps(pre))
    assert clone == pre
    img = Image.new("RGB", (300, 170), (51, 102, 204))
    x = clone(img)
    assert x.shape == (3, 64, 96) and x.dtype == torch.uint8 and x.is_contiguous()  # normalised on the device
    normed = clone.normalize(x[None])
    expected = [(51 / 255 - 0.5) / 0.2, (102 / 255 - 0.4) / 0.25, (204 / 255 - 0.3) / 0.5]
    assert normed.dtype == torch.float32
    np.testing.assert_allclose(normed[0].mean(dim=(1, 2)).numpy(), expected, atol=1e-5)
    assert pre(img.convert("L")).shape == (3, 64, 96) and pre(img.convert("RGBA")).shape == (3, 64, 96)
    pixels, sizes = pre.batch([img, Image.new("RGB", (20, 40))])
    assert pixels.shape == (2, 3, 64, 96) and sizes == [(170, 300), (40, 20)]


class _Images(torch.utils.data.Dataset):
    def __init__(self, pre: Preprocessor):
        self.pre = pre

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.pre(Image.new("RGB", (50 + 10 * i, 30), (i * 40, 0, 0)))


def test_preprocessor_runs_in_dataloader_workers(tiny):
    loader = torch.utils.data.DataLoader(_Images(tiny.preprocessor), batch_size=2, num_workers=2)
    batches = list(loader)
    assert [tuple(b.shape) for b in batches] == [(2, 3, 96, 224)] * 2


# ---------------------------------------------------------------- tiny model


@pytest.fixture(scope="module")
def tiny() -> Mask2FormerSegmenter:
    return Mask2FormerSegmenter.tiny_random(LABELS, seed=0)


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in
            [(200, 120), (640, 480), (1536, 662)]]


def test_tiny_random_predicts_valid_segments(tiny):
    images = _images()
    pixels = torch.stack([tiny.preprocessor(img) for img in images])
    sizes = [(img.height, img.width) for img in images]
    assert pixels.shape == (3, 3, 96, 224)
    labels = dict(tiny.id2label)
    assert list(labels.values()) == LABELS
    total = 0
    for mode in ("panoptic", "instance"):
        result = tiny.predict(pixels, sizes, mode=mode, score_threshold=0.0)
        assert len(result) == 3
        for segments, size in zip(result, sizes):
            for seg in segments:
                _check_segment(seg, size, (24, 56), labels)
            total += len(segments)
    assert total > 0
    with pytest.raises(ValueError):
        tiny.predict(pixels, sizes[:2])


def test_hwc_inputs_give_the_same_segments(tiny):
    """The segment stream hands the model [B, H, W, 3] uint8 slots, made [B, 3, H, W] on the device:
    the same values, so the same segments as the Preprocessor's layout."""
    images = _images()
    pixels = torch.stack([tiny.preprocessor(img) for img in images])
    sizes = [(img.height, img.width) for img in images]
    chw = tiny.predict(pixels, sizes, mode="instance", score_threshold=0.0)
    hwc = tiny.predict(pixels.permute(0, 2, 3, 1).contiguous(), sizes, mode="instance", score_threshold=0.0,
                       layout="hwc")
    assert chw == hwc and sum(map(len, chw)) > 0
    with pytest.raises(ValueError, match="uint8 \\[B, H, W, 3\\]"):
        tiny.predict(pixels, sizes, layout="hwc")
    with pytest.raises(ValueError, match="layout"):
        tiny.predict(pixels, sizes, layout="nhwc")


def test_tiny_random_is_small_and_flagged(tiny):
    assert tiny.untrained and tiny.device == torch.device("cpu")
    assert tiny.identity == {"checkpoint": tiny.checkpoint, "revision": None, "untrained": True,
                             "input_size": [96, 224], "num_labels": 3}
    assert json.loads(json.dumps(tiny.identity)) == tiny.identity
    assert sum(p.numel() for p in tiny.model.parameters()) < 1_000_000
    out = tiny.predict(torch.randn(4, 3, 96, 224), [(96, 224)] * 4)  # speed is a benchmark's job, not a test's
    assert len(out) == 4


def test_untrained_warning_logged_once_at_load(caplog):
    with caplog.at_level(logging.WARNING, logger="models.segmenter"):
        seg = Mask2FormerSegmenter.tiny_random(LABELS, seed=5)
        seg.predict(torch.zeros(1, 3, 96, 224), [(10, 10)])
    warnings = [r for r in caplog.records if "NOT meaningful" in r.getMessage()]
    assert len(warnings) == 1 and "untrained tiny random-init Mask2Former" in warnings[0].getMessage()


def test_same_seed_same_model_and_outputs():
    a = Mask2FormerSegmenter.tiny_random(LABELS, seed=7)
    torch.manual_seed(123)  # the caller's RNG must not matter
    b = Mask2FormerSegmenter.tiny_random(LABELS, seed=7)
    c = Mask2FormerSegmenter.tiny_random(LABELS, seed=8)
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    pixels, sizes = a.preprocessor.batch(_images())
    for mode in ("panoptic", "instance"):
        assert a.predict(pixels, sizes, mode=mode, score_threshold=0.0) == \
            b.predict(pixels, sizes, mode=mode, score_threshold=0.0)


def test_configs():
    tiny_cfg = tiny_config(LABELS)
    assert tiny_cfg.backbone_config.depths == [1, 1, 1, 1] and tiny_cfg.num_queries == 16
    assert tiny_cfg.id2label == ID2LABEL and tiny_cfg.num_labels == 3
    big = swin_tiny_config(LABELS)
    assert big.backbone_config.embed_dim == 96 and list(big.backbone_config.depths) == [2, 2, 6, 2]
    assert big.hidden_dim == 256 and big.num_labels == 3
    assert Mask2FormerSegmenter.swin_tiny_config is swin_tiny_config or Mask2FormerSegmenter.swin_tiny_config(LABELS)
    large = swin_large_config(LABELS)  # the Vistas checkpoint's shape, for GPU benchmarks
    assert large.backbone_config.embed_dim == 192 and list(large.backbone_config.depths) == [2, 2, 18, 2]
    assert large.backbone_config.window_size == 12 and large.num_queries == 200
    with pytest.raises(ValueError, match="duplicate"):
        tiny_config(["road", "road"])


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in {"cpu", "cuda", "mps"}
    if not torch.cuda.is_available():
        with pytest.raises(SegmenterUnavailable, match="CUDA"):
            resolve_device("cuda")


# ---------------------------------------------------------------- loading


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    (tmp_path / "hf-home").mkdir()


def test_missing_hub_checkpoint_fails_fast_and_clearly(offline):
    from transformers import Mask2FormerForUniversalSegmentation  # noqa: F401 - import time is not failure time

    checkpoint = "facebook/mask2former-swin-large-mapillary-vistas-panoptic"
    started = time.perf_counter()
    with pytest.raises(SegmenterUnavailable) as info:
        Mask2FormerSegmenter.from_pretrained(checkpoint, device="cpu")
    assert time.perf_counter() - started < 5.0
    message = str(info.value)
    assert checkpoint in message and "local" in message and "hf download" in message


def test_missing_local_dir_fails(offline, tmp_path):
    with pytest.raises(SegmenterUnavailable, match="does not exist"):
        Mask2FormerSegmenter.from_pretrained(str(tmp_path / "no-such-dir"), device="cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SegmenterUnavailable, match="local directory"):
        Mask2FormerSegmenter.from_pretrained(str(empty), device="cpu")


def test_pickle_checkpoints_are_refused(offline, tiny, tmp_path):
    unsafe = tmp_path / "unsafe"
    tiny.model.config.save_pretrained(unsafe)
    torch.save(tiny.model.state_dict(), unsafe / "pytorch_model.bin")
    with pytest.raises(SegmenterUnavailable, match="safetensors"):
        Mask2FormerSegmenter.from_pretrained(str(unsafe), device="cpu")


def test_save_and_load_round_trip(offline, tiny, tmp_path):
    out = tiny.save(tmp_path / "tiny")
    files = {p.name for p in Path(out).iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in files)
    loaded = Mask2FormerSegmenter.from_pretrained(str(out), device="cpu")
    assert loaded.untrained and loaded.id2label == tiny.id2label
    assert loaded.preprocessor.size == tiny.preprocessor.size
    np.testing.assert_allclose(loaded.preprocessor.mean, tiny.preprocessor.mean, rtol=1e-6)
    np.testing.assert_allclose(loaded.preprocessor.std, tiny.preprocessor.std, rtol=1e-6)
    assert loaded.identity["checkpoint"] == str(out) and loaded.identity["input_size"] == [96, 224]
    pixels, sizes = tiny.preprocessor.batch(_images())
    for mode in ("panoptic", "instance"):
        assert loaded.predict(pixels, sizes, mode=mode, score_threshold=0.0) == \
            tiny.predict(pixels, sizes, mode=mode, score_threshold=0.0)
    resized = Mask2FormerSegmenter.from_pretrained(str(out), device="cpu", input_size=(64, 128))
    assert resized.preprocessor.size == (64, 128)
