from __future__ import annotations

import io
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.expert import SIDECAR, Expert, ExpertUnavailable, Transforms, augment

LABELS = ["FR", "JP", "BR", "ZA"]


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


@pytest.fixture
def tiny() -> Expert:
    return Expert.tiny_random(LABELS, seed=0)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    (tmp_path / "hf-home").mkdir()


def _batch(expert: Expert) -> torch.Tensor:
    tf = expert.transforms(train=False)
    return tf.batch([_image(40, 30, 1), _image(64, 100, 2), _image(33, 33, 3)])


def test_tiny_random_logits_and_probabilities(tiny):
    assert tiny.untrained and tiny.image_size == 32
    x = _batch(tiny)
    assert x.shape == (3, 3, 32, 32)
    logits = tiny.logits(x)
    assert logits.shape == (3, len(LABELS)) and logits.dtype == torch.float32 and logits.device.type == "cpu"
    proba = tiny.predict_proba(x)
    assert torch.allclose(proba.sum(-1), torch.ones(3), atol=1e-5)
    assert tiny.id2label == dict(enumerate(LABELS))
    assert tiny.label2id == {name: i for i, name in enumerate(LABELS)}
    assert tiny.labels == LABELS
    # deterministic for a seed, and the caller's RNG is untouched
    state = torch.random.get_rng_state()
    again = Expert.tiny_random(LABELS, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(again.logits(x), logits)


def test_eval_transform_is_deterministic_and_shaped():
    tf = Transforms(size=24, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), train=False)
    img = _image(50, 31)
    a, b = tf(img, 0), tf(img, 7)
    assert a.shape == (3, 24, 24) and a.dtype == torch.float32
    assert torch.equal(a, b)
    grey = tf(Image.new("RGB", (40, 20), (128, 128, 128)))
    assert grey.abs().max().item() < 0.01
    assert tf(Image.new("L", (10, 50), 255)).shape == (3, 24, 24)  # non-RGB input converted


def test_train_transform_is_random_but_reproducible():
    tf = Transforms(size=24, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), train=True, seed=3)
    img = _image(80, 60)
    a0, a0_again, a1 = tf(img, 0), tf(img, 0), tf(img, 1)
    assert a0.shape == (3, 24, 24) and a0.dtype == torch.float32
    assert torch.equal(a0, a0_again)
    assert not torch.equal(a0, a1)
    other_seed = Transforms(size=24, mean=(0.5,) * 3, std=(0.5,) * 3, train=True, seed=4)
    assert not torch.equal(a0, other_seed(img, 0))
    clone = pickle.loads(pickle.dumps(tf))
    assert clone == tf and torch.equal(clone(img, 5), tf(img, 5))


def test_save_and_load_round_trip(offline, tiny, tmp_path):
    snapshot = {"group": "vehicle", "crops": 123, "digest": "abc"}
    metrics = {"val_top1": 0.25}
    config = {"experts": {"epochs": 1}, "path": tmp_path}  # non-JSON values are stringified
    out = tiny.save(tmp_path / "expert", resolved_config=config, feature_snapshot=snapshot, metrics=metrics)
    files = {p.name for p in Path(out).iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", SIDECAR} <= files
    side = Expert.read_sidecar(out)
    assert side["untrained"] is True and side["feature_snapshot"] == snapshot and side["metrics"] == metrics
    assert side["resolved_config"]["experts"] == {"epochs": 1} and side["labels"]["1"] == "JP" and side["created_at"]

    loaded = Expert.from_pretrained(str(out), device="cpu")
    assert loaded.untrained is True
    assert loaded.id2label == tiny.id2label and loaded.label2id == tiny.label2id
    assert loaded.mean == pytest.approx(tiny.mean) and loaded.image_size == tiny.image_size
    x = _batch(tiny)
    assert torch.equal(loaded.logits(x), tiny.logits(x))


def test_fine_tuning_start_gets_a_new_head(offline, tmp_path):
    src = Expert.tiny_random(["A", "B", "C"], seed=1).save(tmp_path / "three", resolved_config={},
                                                            feature_snapshot={}, metrics={})
    new = ["FR", "JP", "BR", "ZA", "US"]
    expert = Expert.from_pretrained(str(src), labels=new, device="cpu")
    assert expert.id2label == dict(enumerate(new)) and expert.label2id == {n: i for i, n in enumerate(new)}
    assert expert.model.classifier.out_features == 5
    assert expert.logits(_batch(expert)).shape == (3, 5)


def test_pickle_checkpoints_are_refused(offline, tiny, tmp_path):
    unsafe = tmp_path / "unsafe"
    tiny.model.config.save_pretrained(unsafe)
    torch.save(tiny.model.state_dict(), unsafe / "pytorch_model.bin")
    with pytest.raises(ExpertUnavailable, match="pickle") as info:
        Expert.from_pretrained(str(unsafe), device="cpu")
    assert str(unsafe) in str(info.value)


def test_missing_hub_checkpoint_fails_fast_and_clearly(offline):
    from transformers import ViTForImageClassification  # noqa: F401 - import time is not failure time

    checkpoint = "google/vit-base-patch16-224-in21k"
    started = time.perf_counter()
    with pytest.raises(ExpertUnavailable) as info:
        Expert.from_pretrained(checkpoint, device="cpu")
    assert time.perf_counter() - started < 5.0
    message = str(info.value)
    assert checkpoint in message and "hf download" in message and "--experts-checkpoint" in message


def test_missing_local_dir_fails(offline, tmp_path):
    with pytest.raises(ExpertUnavailable, match="does not exist"):
        Expert.from_pretrained(str(tmp_path / "no-such-dir"), device="cpu")


# ---------------------------------------------------------------- the uint8 worker half and the device half


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth structure plus grain, so JPEG and resampling behave as on photos (not on pure noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([np.sin(6 * xx + c) * np.cos(4 * yy - c) for c in (0.0, 1.0, 2.0)], -1) * 90 + 128
    return Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8), "RGB")


def _reference(x_u8: np.ndarray, factors, mean, std) -> np.ndarray:
    """The float32 CPU formula the workers ran per image before issue 11 (HWC uint8 in, CHW float out)."""
    x = x_u8.astype(np.float32) / 255.0
    if factors is not None:
        x = x * float(factors[0])
        grey = float((x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)).mean())
        x = np.clip((x - grey) * float(factors[1]) + grey, 0.0, 1.0)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return x.transpose(2, 0, 1)


def test_device_augmentation_equals_the_per_sample_cpu_formula():
    """GPU-side augmentation (batched torch, per-sample factors) gives what the CPU workers computed per
    image: the same values up to float summation order, so the same statistics."""
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    tf = Transforms(size=48, mean=mean, std=std, train=True, seed=5)
    pix = [tf.pixels(_jpeg(_photo_like(90 + 7 * k, 60 + 5 * k, k)), (0, k, 0)) for k in range(12)]
    x, factors = torch.stack([p for p, _ in pix]), torch.stack([f for _, f in pix])
    assert x.dtype == torch.uint8 and x.shape == (12, 48, 48, 3) and factors.shape == (12, 2)
    out = augment(x, factors, mean, std)
    assert out.dtype == torch.float32 and out.shape == (12, 3, 48, 48) and out.is_contiguous()
    ref = np.stack([_reference(x[k].numpy(), factors[k].numpy(), mean, std) for k in range(12)])
    assert np.abs(out.numpy() - ref).max() < 1e-5
    assert np.allclose(out.mean((0, 2, 3)).numpy(), ref.mean((0, 2, 3)), atol=1e-6)
    assert np.allclose(out.std((0, 2, 3)).numpy(), ref.std((0, 2, 3), ddof=1), atol=1e-6)
    clipped = (out * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1))
    assert clipped.min() >= -1e-6 and clipped.max() <= 1 + 1e-6  # jitter clips to [0, 1] before normalising
    evals = augment(x, None, mean, std)  # eval: no jitter
    assert np.abs(evals.numpy() - np.stack([_reference(x[k].numpy(), None, mean, std) for k in range(12)])).max() < 1e-6
    # A sample is its own: the same result alone or in a batch (no batch statistics leak in).
    assert torch.allclose(augment(x[3:4], factors[3:4], mean, std)[0], out[3], atol=1e-6)
    assert torch.allclose(tf(_jpeg(_photo_like(90 + 21, 60 + 15, 3)), (0, 3, 0)), out[3], atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        augment(out, None, mean, std)


def test_jitter_factors_are_uniform_and_keyed_by_sample():
    tf = Transforms(size=32, train=True, seed=0)
    draws = np.stack([tf.draw(512, 148, (0, k, 0))[1] for k in range(20_000)])
    assert draws.dtype == np.float32 and draws.min() >= 0.8 and draws.max() <= 1.2
    assert np.abs(draws.mean(0) - 1.0).max() < 0.004  # U(0.8, 1.2): mean 1, std 0.1155
    assert np.abs(draws.std(0) - 0.4 / 12 ** 0.5).max() < 0.003
    assert abs(np.corrcoef(draws[:, 0], draws[:, 1])[0, 1]) < 0.03
    box, f = tf.draw(300, 200, (1, 0xABC, 0))
    for key in ((2, 0xABC, 0), (1, 0xABD, 0), (1, 0xABC, 1)):  # epoch, crop, copy: each changes the draw
        assert tf.draw(300, 200, key)[1].tolist() != f.tolist()
    assert tf.draw(300, 200, (1, 0xABC, 0))[0] == box and tf.draw(300, 200, (1, 0xABC, 0))[1].tolist() == f.tolist()
    assert Transforms(size=32).draw(300, 200, 7) == (Transforms._center_box(300, 200), None)


def test_pixels_from_bytes_equal_pixels_from_the_decoded_image():
    """Evaluation (bytes in loader workers) and predict (PIL crops in memory) go through one function."""
    for train in (False, True):
        tf = Transforms(size=40, train=train, seed=2)
        for k, (w, h) in enumerate([(70, 50), (33, 90), (40, 40), (120, 61)]):  # boxes < 2 x 40: no DCT scaling
            data = _jpeg(_photo_like(w, h, k))
            a, fa = tf.pixels(data, (0, k, 0))
            b, fb = tf.pixels(Image.open(io.BytesIO(data)), (0, k, 0))
            assert a.shape == (40, 40, 3) and torch.equal(a, b)
            assert (fa is None and fb is None) if not train else torch.equal(fa, fb)


def test_simplejpeg_and_pil_decode_the_same_pixels(monkeypatch):
    import models.expert as expert_module

    pytest.importorskip("simplejpeg")
    grey, cmyk = _photo_like(200, 90, 7).convert("L"), _photo_like(64, 64, 8).convert("CMYK")
    inputs = [_jpeg(_photo_like(w, h, k)) for k, (w, h) in enumerate([(512, 148), (300, 290), (47, 153), (512, 512)])]
    inputs += [_jpeg(grey), _jpeg(cmyk)]
    png = io.BytesIO()
    _photo_like(80, 50, 9).save(png, "PNG")
    inputs.append(png.getvalue())
    for size in (32, 96, 224):  # 32 and 96: most of these decode at 1/2 .. 1/8
        for train in (False, True):
            tf = Transforms(size=size, train=train, seed=1)
            monkeypatch.setattr(expert_module, "_SIMPLEJPEG", None)  # look it up: installed here
            fast = [tf.pixels(d, (0, k, 0)) for k, d in enumerate(inputs)]
            assert expert_module._SIMPLEJPEG
            monkeypatch.setattr(expert_module, "_SIMPLEJPEG", False)  # as on a machine without it
            slow = [tf.pixels(d, (0, k, 0)) for k, d in enumerate(inputs)]
            for (a, fa), (b, fb) in zip(fast, slow):
                assert torch.equal(a, b) and (fa is None or torch.equal(fa, fb))


def test_large_crops_decode_at_a_reduced_dct_scale(monkeypatch):
    import models.expert as expert_module

    shapes = []
    real = expert_module._resize
    monkeypatch.setattr(expert_module, "_resize", lambda arr, box, size: shapes.append(arr.shape[:2]) or real(arr, box, size))
    img = _photo_like(512, 300, 4)
    data = _jpeg(img)
    tf = Transforms(size=32)
    small = tf.pixels(data)[0]
    full = Transforms(size=32).pixels(img)[0]  # an already decoded image: full size
    assert shapes == [(38, 64), (300, 512)]  # centre square 300 px >= 8 x 32: decoded at 1/8
    assert (small.float() - full.float()).abs().mean() < 3  # px values (0-255): the same picture
    shapes.clear()
    Transforms(size=224).pixels(data)
    assert shapes == [(300, 512)]  # 300 < 2 x 224: full size


def test_no_horizontal_flip():
    """Left stays left: mirroring would swap the driving side."""
    a = np.zeros((60, 160, 3), np.uint8)
    a[:, 80:] = 255
    tf = Transforms(size=32, train=True, seed=0)
    for k in range(50):
        x, _ = tf.pixels(_jpeg(Image.fromarray(a)), (0, k, 0))
        assert x[:, :8].float().mean() < x[:, -8:].float().mean()
