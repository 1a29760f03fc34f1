"""One ViT "expert" per feature group (ground / structure / vegetation / vehicle / furniture): crop -> country.

Pieces:

* `Transforms` - picklable RGB PIL -> float32 [3, S, S] (normalised); runs in DataLoader workers. Train mode
  draws its randomness from a numpy Generator seeded by (seed, index), so an epoch is reproducible.
* `Expert` - a ViTForImageClassification on one device with its labels and preprocessing constants:
  `from_pretrained` (hub id or local dir, safetensors only, fails fast offline), `tiny_random` (tests/demos),
  `logits` / `predict_proba` (inference), `save` (weights + preprocessor_config.json + a provenance sidecar).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from models.hub import EXPERT_FIELD, load_error, processor_mean_std, resolve_checkpoint
from models.segmenter import SegmenterUnavailable
from models.segmenter import resolve_device as _resolve_device

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_CHECKPOINT", "Expert", "ExpertUnavailable", "SIDECAR", "Transforms", "resolve_device"]

DEFAULT_CHECKPOINT = "google/vit-base-patch16-224-in21k"
SIDECAR = "geofeat_expert.json"  # written by `save`: untrained flag, labels, provenance
DEFAULT_MEAN = (0.5, 0.5, 0.5)  # ViT (in21k) normalisation; used when a checkpoint has no processor config
DEFAULT_STD = (0.5, 0.5, 0.5)
_warned_untrained: set[str] = set()


class ExpertUnavailable(RuntimeError):
    """The expert cannot be loaded (missing checkpoint, no network, pickle-only weights, bad device...)."""


def resolve_device(requested: str | torch.device = "auto") -> torch.device:
    """Same rules as the segmenter ("auto": cuda > mps > cpu); errors are raised as ExpertUnavailable."""
    try:
        return _resolve_device(requested)
    except SegmenterUnavailable as exc:
        raise ExpertUnavailable(str(exc)) from exc


# ---------------------------------------------------------------- transforms


@dataclass(frozen=True)
class Transforms:
    """RGB PIL image -> float32 [3, size, size], (x / 255 - mean) / std.

    eval: resize the shorter side to `size`, then centre crop (done as one resample of the centred square).
    train: random resized crop (area 0.6-1.0 of the image, aspect ratio 3/4-4/3) + mild colour jitter
    (brightness and contrast factors in [0.8, 1.2]). Randomness comes from np.random.default_rng((seed, index)):
    the same (seed, index) gives the same tensor. Pass the dataset index (and e.g. seed = base_seed + epoch).

    NO horizontal flip, on purpose: mirroring swaps left- and right-hand traffic (and mirrors text on signs),
    which are country cues the experts must learn."""

    size: int
    mean: tuple = DEFAULT_MEAN
    std: tuple = DEFAULT_STD
    train: bool = False
    seed: int = 0

    SCALE = (0.6, 1.0)
    RATIO = (3 / 4, 4 / 3)
    JITTER = 0.2

    def __post_init__(self) -> None:
        if int(self.size) <= 0:
            raise ValueError(f"Transforms: size must be positive, got {self.size}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise ValueError(f"Transforms: mean/std must be 3 values (std > 0), got {self.mean} / {self.std}")

    def __call__(self, img: Image.Image, index: int = 0) -> torch.Tensor:
        if img.mode != "RGB":
            img = img.convert("RGB")
        s = int(self.size)
        if self.train:
            rng = np.random.default_rng((int(self.seed) & 0xFFFFFFFF, int(index)))  # index: any int >= 0
            box = self._random_box(img.width, img.height, rng)
        else:
            rng = None
            box = self._center_box(img.width, img.height)
        out = img.resize((s, s), Image.Resampling.BILINEAR, box=box)
        x = np.asarray(out, dtype=np.float32) / 255.0  # [S, S, 3]
        if rng is not None:
            brightness = rng.uniform(1 - self.JITTER, 1 + self.JITTER)
            contrast = rng.uniform(1 - self.JITTER, 1 + self.JITTER)
            x = x * brightness
            grey = float((x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)).mean())
            x = np.clip((x - grey) * contrast + grey, 0.0, 1.0)
        x = (x - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32))

    @staticmethod
    def _center_box(width: int, height: int) -> tuple[float, float, float, float]:
        side = min(width, height)
        left, top = (width - side) / 2, (height - side) / 2
        return (left, top, left + side, top + side)

    def _random_box(self, width: int, height: int, rng: np.random.Generator) -> tuple[float, float, float, float]:
        """torchvision RandomResizedCrop's sampling (10 tries, then the centre crop clamped to the ratio range)."""
        area = width * height
        log_lo, log_hi = math.log(self.RATIO[0]), math.log(self.RATIO[1])
        for _ in range(10):
            target = area * rng.uniform(*self.SCALE)
            ratio = math.exp(rng.uniform(log_lo, log_hi))
            w = int(round(math.sqrt(target * ratio)))
            h = int(round(math.sqrt(target / ratio)))
            if 0 < w <= width and 0 < h <= height:
                left = int(rng.integers(0, width - w + 1))
                top = int(rng.integers(0, height - h + 1))
                return (left, top, left + w, top + h)
        in_ratio = width / height
        if in_ratio < self.RATIO[0]:
            w, h = width, int(round(width / self.RATIO[0]))
        elif in_ratio > self.RATIO[1]:
            h, w = height, int(round(height * self.RATIO[1]))
        else:
            w, h = width, height
        left, top = (width - w) / 2, (height - h) / 2
        return (left, top, left + w, top + h)

    def batch(self, images: Sequence[Image.Image], start_index: int = 0) -> torch.Tensor:
        """Stacked tensors; image k uses index start_index + k."""
        return torch.stack([self(img, start_index + k) for k, img in enumerate(images)])


# ---------------------------------------------------------------- expert


def _labels_kwargs(labels: Sequence[str]) -> dict[str, Any]:
    labels = [str(x) for x in labels]
    if not labels:
        raise ValueError("at least one label is needed")
    if len(set(labels)) != len(labels):
        raise ValueError(f"duplicate labels: {sorted({x for x in labels if labels.count(x) > 1})}")
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {name: i for i, name in enumerate(labels)}}


def _image_size(config) -> int:
    size = config.image_size
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or int(size[0]) != int(size[1]):
            raise ExpertUnavailable(f"only square ViT inputs are supported, config.image_size={size!r}")
        size = size[0]
    return int(size)


class Expert:
    """A ViTForImageClassification (eval mode) on one device, with labels and preprocessing constants."""

    def __init__(self, model, *, checkpoint: str, untrained: bool, device: torch.device,
                 mean: Sequence[float] = DEFAULT_MEAN, std: Sequence[float] = DEFAULT_STD):
        self.model = model.eval().to(device)
        self.checkpoint = str(checkpoint)
        self.untrained = bool(untrained)
        self.device = device
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.image_size = _image_size(model.config)
        self.id2label: dict[int, str] = {int(k): str(v) for k, v in model.config.id2label.items()}
        self.label2id: dict[str, int] = {v: k for k, v in self.id2label.items()}
        if self.untrained and self.checkpoint not in _warned_untrained:
            _warned_untrained.add(self.checkpoint)
            log.warning("UNTRAINED expert (%s): random-init weights, predictions are NOT meaningful", self.checkpoint)

    @property
    def labels(self) -> list[str]:
        return [self.id2label[i] for i in range(len(self.id2label))]

    # ------------------------------------------------------------ constructors

    @classmethod
    def from_pretrained(cls, checkpoint: str = DEFAULT_CHECKPOINT, labels: Sequence[str] | None = None,
                        device: str = "auto") -> "Expert":
        """Hub id or local directory; safetensors weights only (pickle checkpoints are refused).

        labels given: fine-tuning start - the head gets len(labels) outputs and these names; a head of another
        size is re-initialised (ignore_mismatched_sizes). A head of the SAME size keeps its weights, only the
        names change. labels None: the checkpoint's own id2label (a geofeat-trained expert).
        Offline (HF_HUB_OFFLINE=1, read now) a checkpoint not in the cache fails at once with ExpertUnavailable."""
        from transformers import ViTForImageClassification

        checkpoint = str(checkpoint)
        dev = resolve_device(device)
        path, local, hub = resolve_checkpoint(checkpoint, EXPERT_FIELD, ExpertUnavailable)
        sidecar: dict[str, Any] = cls.read_sidecar(path) if local else {}
        extra: dict[str, Any] = {}
        if labels is not None:
            extra = {**_labels_kwargs(labels), "ignore_mismatched_sizes": True}
            saved = sidecar.get("labels")
            if saved and not sidecar.get("untrained") and len(saved) == len(labels) \
                    and [saved[k] for k in sorted(saved, key=int)] != list(labels):
                log.warning("%s: trained head re-used with different label names/order %s (was %s)",
                            checkpoint, list(labels), [saved[k] for k in sorted(saved, key=int)])
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a bar per load is noise in flow logs
        started = time.perf_counter()
        try:
            model = ViTForImageClassification.from_pretrained(
                path, use_safetensors=True, dtype=torch.float32, **hub, **extra)
        except (OSError, ValueError) as exc:
            raise ExpertUnavailable(load_error(checkpoint, local, hub, exc, "ViT expert", EXPERT_FIELD)) from exc
        log.info("loaded expert %s in %.1f s", checkpoint, time.perf_counter() - started)

        try:
            from transformers.image_processing_base import ImageProcessingMixin

            processor, _ = ImageProcessingMixin.get_image_processor_dict(path, **hub)
        except (OSError, ValueError) as exc:
            log.warning("%s: no image processor config (%s); using mean/std 0.5", checkpoint, exc)
            processor = {}
        if processor.get("image_mean") is not None or processor.get("do_normalize") is False:
            mean, std = processor_mean_std(processor)
        else:
            mean, std = DEFAULT_MEAN, DEFAULT_STD
        return cls(model, checkpoint=checkpoint, untrained=bool(sidecar.get("untrained", False)), device=dev,
                   mean=mean, std=std)

    @staticmethod
    def tiny_config(labels: Sequence[str], image_size: int = 32):
        from transformers import ViTConfig

        return ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         image_size=image_size, patch_size=8, **_labels_kwargs(labels))

    @classmethod
    def tiny_random(cls, labels: Sequence[str], seed: int = 0, device: str = "cpu", image_size: int = 32) -> "Expert":
        """A tiny random-init ViT (2 layers, 32-d, patch 8). Deterministic for a seed whatever the device
        (drawn on the CPU under a forked RNG; the caller's RNG is untouched). untrained=True."""
        from transformers import ViTForImageClassification

        dev = resolve_device(device)
        config = cls.tiny_config(labels, image_size=image_size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = ViTForImageClassification(config)
        return cls(model, checkpoint=f"tiny-random-vit-seed{seed}", untrained=True, device=dev)

    # ------------------------------------------------------------ preprocessing / inference

    def transforms(self, train: bool, seed: int = 0) -> Transforms:
        return Transforms(size=self.image_size, mean=self.mean, std=self.std, train=bool(train), seed=int(seed))

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] normalised float (from `transforms`) -> float32 [B, num_labels] logits on the CPU."""
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be [B, 3, H, W], got {tuple(pixel_values.shape)}")
        with torch.inference_mode():
            x = pixel_values.to(self.device, dtype=torch.float32, non_blocking=True)
            interpolate = tuple(x.shape[-2:]) != (self.image_size, self.image_size)
            with self._autocast():
                out = self.model(pixel_values=x, interpolate_pos_encoding=interpolate)
            return out.logits.float().cpu()

    def predict_proba(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(pixel_values), dim=-1)

    # ------------------------------------------------------------ persistence

    def save(self, directory: str | os.PathLike, *, resolved_config: dict, feature_snapshot: dict,
             metrics: dict) -> Path:
        """config.json + model.safetensors + preprocessor_config.json + geofeat_expert.json (untrained flag,
        labels, the resolved run config, the feature snapshot trained on, metrics, created_at), so the
        provenance lives next to the weights and `from_pretrained(directory)` restores this expert offline."""
        from transformers import ViTImageProcessorPil
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one bar per save is noise in flow logs
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        sidecar = {
            "untrained": self.untrained,
            "labels": {str(k): v for k, v in sorted(self.id2label.items())},
            "source_checkpoint": self.checkpoint,
            "image_size": self.image_size,
            "resolved_config": resolved_config,
            "feature_snapshot": feature_snapshot,
            "metrics": metrics,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        text = json.dumps(sidecar, indent=2, default=str) + "\n"  # serialise first: fail before writing weights
        self.model.save_pretrained(out)  # transformers 5.x writes safetensors only
        ViTImageProcessorPil(
            do_resize=True, size={"height": self.image_size, "width": self.image_size}, do_rescale=True,
            rescale_factor=1 / 255, do_normalize=True, image_mean=list(self.mean), image_std=list(self.std),
        ).save_pretrained(out)
        (out / SIDECAR).write_text(text)
        if not (out / "model.safetensors").exists() and not (out / "model.safetensors.index.json").exists():
            raise RuntimeError(f"save_pretrained wrote no safetensors file in {out}")
        return out

    @staticmethod
    def read_sidecar(directory: str | os.PathLike) -> dict[str, Any]:
        """geofeat_expert.json of a saved expert ({} if absent or unreadable)."""
        try:
            return json.loads(Path(directory, SIDECAR).read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("%s: unreadable %s (%s); ignored", directory, SIDECAR, exc)
            return {}

    def __repr__(self) -> str:
        return (f"Expert({self.checkpoint!r}, untrained={self.untrained}, device={self.device}, "
                f"image_size={self.image_size}, labels={len(self.id2label)})")
