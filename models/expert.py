"""One ViT "expert" per feature group (ground / structure / vegetation / vehicle / furniture): crop -> country.

Pieces:

* `Transforms` - picklable; `pixels` runs in DataLoader workers: encoded crop bytes (or a PIL image) -> uint8
  [S, S, 3] at the training size plus the sample's colour-jitter factors. Decoding reads only the header
  first, then decodes at a reduced DCT scale when the crop box is >= 2x the training size (simplejpeg when
  installed, else PIL: the same pixels). Train mode draws its randomness from a numpy Generator seeded by
  (seed, key), so a sample's augmentation depends on nothing else (not the worker count or order).
* `augment` - the per-batch half, run on the model's device: uint8 -> float, colour jitter with each
  sample's factors, normalisation. `Transforms(img)` = `pixels` + `augment` of one sample (the reference).
* `Expert` - a ViTForImageClassification on one device with its labels and preprocessing constants:
  `from_pretrained` (hub id or local dir, safetensors only, fails fast offline), `tiny_random` (tests/demos),
  `logits` / `predict_proba` (inference), `save` (weights + preprocessor_config.json + a provenance sidecar).
"""

from __future__ import annotations

import functools
import io
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
import torch.nn.functional as F
from PIL import Image

from models.hub import EXPERT_FIELD, load_error, processor_mean_std, resolve_checkpoint
from models.segmenter import SegmenterUnavailable
from models.segmenter import resolve_device as _resolve_device

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_CHECKPOINT", "Expert", "ExpertUnavailable", "SIDECAR", "Transforms", "augment", "resolve_device"]

DEFAULT_CHECKPOINT = "google/vit-base-patch16-224-in21k"
SIDECAR = "geofeat_expert.json"  # written by `save`: untrained flag, labels, provenance
DEFAULT_MEAN = (0.5, 0.5, 0.5)  # ViT (in21k) normalisation; used when a checkpoint has no processor config
DEFAULT_STD = (0.5, 0.5, 0.5)
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 grey, the contrast jitter's reference level
_warned_untrained: set[str] = set()
_SIMPLEJPEG: Any = None  # the simplejpeg module once looked up; False where it is not installed


class ExpertUnavailable(RuntimeError):
    """The expert cannot be loaded (missing checkpoint, no network, pickle-only weights, bad device...)."""


def resolve_device(requested: str | torch.device = "auto") -> torch.device:
    """Same rules as the segmenter ("auto": cuda > mps > cpu); errors are raised as ExpertUnavailable."""
    try:
        return _resolve_device(requested)
    except SegmenterUnavailable as exc:
        raise ExpertUnavailable(str(exc)) from exc


# ---------------------------------------------------------------- transforms


def _simplejpeg():
    """simplejpeg (libjpeg-turbo) when installed, else None: an optional fast path, imported lazily (the GPU
    image lacks it). It decodes the same pixels as PIL, 1.4-1.7x faster."""
    global _SIMPLEJPEG
    if _SIMPLEJPEG is None:
        try:
            import simplejpeg
        except ImportError:
            simplejpeg = False
        _SIMPLEJPEG = simplejpeg
    return _SIMPLEJPEG or None


class _Encoded:
    """Encoded image bytes: the size from the header alone, then `decode(k)` -> uint8 RGB [H', W', 3] at 1/k
    of the size (JPEG DCT scaling; other formats decode whole). simplejpeg and PIL give identical pixels."""

    def __init__(self, data: bytes):
        self.data, self.pil = data, None
        sj = _simplejpeg()
        if sj is not None and data[:2] == b"\xff\xd8":
            try:
                height, width, colorspace, _ = sj.decode_jpeg_header(data)
            except ValueError:  # a JPEG simplejpeg cannot parse: PIL's turn
                colorspace = None
            if colorspace in ("YCbCr", "Gray"):  # CMYK/YCCK: PIL converts them (simplejpeg differs)
                self.height, self.width = height, width
                return
        self.pil = Image.open(io.BytesIO(data))
        self.width, self.height = self.pil.size

    def decode(self, k: int) -> np.ndarray:
        if self.pil is None:
            try:
                return _simplejpeg().decode_jpeg(self.data, colorspace="RGB", min_height=-(-self.height // k),
                                                 min_width=-(-self.width // k))
            except ValueError:  # a corrupt scan: PIL decodes what it can, or says what is wrong
                self.pil = Image.open(io.BytesIO(self.data))
        if k > 1:
            self.pil.draft("RGB", (self.width // k, self.height // k))  # JPEG: exactly 1/k (no-op otherwise)
        return np.array(self.pil.convert("RGB"))


def _resize(arr: np.ndarray, box: tuple[float, float, float, float], size: int) -> torch.Tensor:
    """The box of an RGB uint8 [H, W, 3] array (box in its pixels) -> uint8 [size, size, 3], antialiased
    bilinear (torch's uint8 channels-last kernel: 2-3x PIL's resize with the same filter)."""
    h, w = arr.shape[:2]
    x0, y0 = min(max(round(box[0]), 0), w - 1), min(max(round(box[1]), 0), h - 1)
    x1, y1 = max(x0 + 1, min(round(box[2]), w)), max(y0 + 1, min(round(box[3]), h))
    x = torch.from_numpy(arr[y0:y1, x0:x1]).permute(2, 0, 1).unsqueeze(0)
    x = x.contiguous(memory_format=torch.channels_last)
    if (y1 - y0, x1 - x0) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x[0].permute(1, 2, 0).contiguous()


@functools.lru_cache(maxsize=32)
def _constants(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, ...]:
    """[1, 3, 1, 1] mean, std, 1 / (255 std), mean / std and the luma weights [3], on the device (once)."""
    m, s = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in (mean, std))
    return tuple(t.to(device) for t in (m, s, 1 / (255 * s), m / s, torch.tensor(LUMA, dtype=torch.float32)))


def augment(x: torch.Tensor, factors: torch.Tensor | None, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The per-batch half of the transforms, on whatever device `x` is on (the model's: vectorised over the
    batch, nothing per sample in Python): uint8 [B, S, S, 3] -> float32 [B, 3, S, S] =
    ((x / 255) jittered - mean) / std. Jitter, with each sample's (brightness, contrast) `factors` [B, 2]
    (None: eval, no jitter): x * brightness, then clip((x - grey) * contrast + grey, 0, 1), grey being the
    sample's mean luma after the brightness step."""
    if x.dim() != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
        raise ValueError(f"augment: expected uint8 [B, S, S, 3] from Transforms.pixels, got {x.dtype} {tuple(x.shape)}")
    m, s, scale, shift, luma = _constants(tuple(float(v) for v in mean), tuple(float(v) for v in std), x.device)
    b, h, w, _ = x.shape
    y = x.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)  # one pass: cast + CHW
    if factors is None:
        return y.mul_(scale).sub_(shift)
    f = factors.to(device=y.device, dtype=torch.float32)
    y.mul_((f[:, 0] / 255.0).view(b, 1, 1, 1))
    grey = torch.einsum("bchw,c->b", y, luma).div_(h * w).view(b, 1, 1, 1)
    y.sub_(grey).mul_(f[:, 1].view(b, 1, 1, 1)).add_(grey).clamp_(0.0, 1.0)
    return y.sub_(m).div_(s)


@dataclass(frozen=True)
class Transforms:
    """Crop -> model input, in two halves: `pixels` (DataLoader workers: decode + resized crop, uint8) and
    `augment` (the model's device, per batch: jitter + normalisation). Calling it does both for one image:
    RGB PIL -> float32 [3, size, size], (x / 255 - mean) / std.

    eval: resize the shorter side to `size`, then centre crop (done as one resample of the centred square).
    train: random resized crop (area 0.6-1.0 of the image, aspect ratio 3/4-4/3) + mild colour jitter
    (brightness and contrast factors in [0.8, 1.2]). Randomness comes from np.random.default_rng((seed, *key)):
    the same (seed, key) gives the same pixels and factors. The crop stream's key is (epoch, crop, copy).

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
    DCT_SCALES = (8, 4, 2)  # JPEG decodes at 1/k when the crop box is >= k x size on both sides

    def __post_init__(self) -> None:
        if int(self.size) <= 0:
            raise ValueError(f"Transforms: size must be positive, got {self.size}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise ValueError(f"Transforms: mean/std must be 3 values (std > 0), got {self.mean} / {self.std}")

    def draw(self, width: int, height: int, key: int | tuple[int, ...] = 0):
        """The sample's box (in the image's pixels) and jitter factors (float32 [2], None in eval). Drawn
        in this order from one Generator: box, brightness, contrast."""
        if not self.train:
            return self._center_box(width, height), None
        key = tuple(int(k) for k in key) if isinstance(key, tuple) else (int(key),)  # any ints >= 0
        rng = np.random.default_rng((int(self.seed) & 0xFFFFFFFF, *key))
        box = self._random_box(width, height, rng)
        factors = rng.uniform(1 - self.JITTER, 1 + self.JITTER, size=2).astype(np.float32)
        return box, factors

    def pixels(self, image: bytes | Image.Image, key: int | tuple[int, ...] = 0):
        """Encoded bytes or a PIL image -> (uint8 [size, size, 3], float32 [2] jitter factors or None)."""
        s = int(self.size)
        if isinstance(image, Image.Image):
            width, height = image.size
            box, factors = self.draw(width, height, key)
            arr, k = np.array(image.convert("RGB")), 1
        else:
            enc = _Encoded(bytes(image))
            width, height = enc.width, enc.height
            box, factors = self.draw(width, height, key)
            side = min(box[2] - box[0], box[3] - box[1])
            k = next((k for k in self.DCT_SCALES if side >= k * s), 1)
            arr = enc.decode(k)
        if arr.shape[:2] != (height, width):  # decoded at 1/k: the box in its pixels
            fx, fy = arr.shape[1] / width, arr.shape[0] / height
            box = (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)
        return _resize(arr, box, s), (None if factors is None else torch.from_numpy(factors))

    def __call__(self, img: Image.Image | bytes, index: int | tuple[int, ...] = 0) -> torch.Tensor:
        x, factors = self.pixels(img, index)
        return augment(x[None], None if factors is None else factors[None], self.mean, self.std)[0]

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

    def batch_pixels(self, images: Sequence[Image.Image | bytes], start_index: int = 0):
        """uint8 [B, size, size, 3] and factors [B, 2] (None in eval); image k uses key start_index + k."""
        out = [self.pixels(img, start_index + k) for k, img in enumerate(images)]
        x = torch.stack([p for p, _ in out])
        return x, (torch.stack([f for _, f in out]) if self.train else None)

    def batch(self, images: Sequence[Image.Image | bytes], start_index: int = 0) -> torch.Tensor:
        """Stacked float32 [B, 3, size, size]; image k uses index start_index + k."""
        x, factors = self.batch_pixels(images, start_index)
        return augment(x, factors, self.mean, self.std)


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

    def pixel_values(self, x: torch.Tensor, factors: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 [B, S, S, 3] from `Transforms.pixels` (+ jitter factors) -> normalised float32 [B, 3, S, S] on
        this expert's device: the copy moves uint8 (4x fewer bytes than float32), the maths runs there."""
        if factors is not None:
            factors = factors.to(self.device, non_blocking=True)
        return augment(x.to(self.device, non_blocking=True), factors, self.mean, self.std)

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
