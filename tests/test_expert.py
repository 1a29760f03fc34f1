from __future__ import annotations

import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.expert import SIDECAR, Expert, ExpertUnavailable, Transforms

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
