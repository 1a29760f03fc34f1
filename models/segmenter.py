"""Mask2Former for batch inference: resizing on the host, normalising on the device, post-processing at
mask resolution.

Pieces:

* `Preprocessor`  - picklable RGB PIL -> uint8 [3, H, W] (bilinear resize to a fixed size; `normalize`
  runs on the model's device), so every image of a batch has the same shape and batches stack. The
  segment stage's reader processes do the same resize into shared memory ([H, W, 3], `layout="hwc"`).
* `Mask2FormerSegmenter` - loads a checkpoint (safetensors only, fails fast offline) or builds a tiny
  random-init model for tests/demos; `predict(pixel_values, sizes)` runs the network (bf16 autocast on
  CUDA) and turns its output into `Segment`s.
* `segments_from_logits` - the pure post-processing. It follows Mask2Former's panoptic / instance
  inference (HF `post_process_panoptic_segmentation` / `post_process_instance_segmentation`, detectron2
  `panoptic_inference`) but never interpolates masks: they stay at the network's mask resolution
  (1/4 of the input). Boxes and areas are scaled to the ORIGINAL image size.

Differences from HF's post-processing (deliberate, documented in `segments_from_logits`): HF first
interpolates masks to 384x384 and then to the target size; the panoptic mask of a segment is
`argmax == k` AND `mask_prob_k >= mask_threshold` (as in the original detectron2 code: pixels no
kept query claims stay void, HF gives them to the argmax winner); the overlap test is
`kept area / own thresholded area >= overlap_threshold`; instance mode takes each query's best class
(HF takes the top-Q (query, class) pairs, which can return the same mask twice with two labels).
No label fusion (HF's `label_ids_to_fuse` default): one segment per query.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from models.hub import IMAGENET_MEAN, IMAGENET_STD, SEGMENTER_FIELD, load_error, processor_mean_std, resolve_checkpoint

log = logging.getLogger(__name__)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Mask2FormerSegmenter",
    "Preprocessor",
    "Segment",
    "SegmenterUnavailable",
    "resolve_device",
    "segments_from_logits",
    "swin_large_config",
    "swin_tiny_config",
    "tiny_config",
]

DEFAULT_INPUT_SIZE = (384, 832)  # (height, width): street scenes are wide
MODES = ("panoptic", "instance")
SIDECAR = "geofeat_segmenter.json"  # written by `save`: untrained flag, input size, provenance


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class Segment:
    """One predicted segment. `bbox`/`area` are in ORIGINAL image pixels, `mask` at mask resolution.

    bbox = (x0, y0, x1, y1), x1/y1 exclusive. `mask` (bool, (mh, mw), read-only) covers the whole image:
    original pixel (y, x) maps to mask cell (y * mh // H, x * mw // W).
    """

    label: str
    label_id: int
    score: float
    bbox: tuple[int, int, int, int]
    area: int
    mask: np.ndarray = field(repr=False)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Segment):
            return NotImplemented
        return (self.label, self.label_id, self.score, self.bbox, self.area) == (
            other.label, other.label_id, other.score, other.bbox, other.area
        ) and self.mask.shape == other.mask.shape and bool(np.array_equal(self.mask, other.mask))

    def __hash__(self) -> int:  # consistent with __eq__ (equal segments have equal fields)
        return hash((self.label, self.label_id, self.score, self.bbox, self.area))


@dataclass(frozen=True)
class Preprocessor:
    """RGB PIL image -> uint8 [3, height, width], bilinear-resized to the fixed network input.

    Picklable (plain fields), so DataLoader workers run it. It stays uint8 on purpose: 4x less
    to move between processes and to the GPU; `normalize` runs on the model's device."""

    height: int
    width: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if int(self.height) <= 0 or int(self.width) <= 0:
            raise ValueError(f"Preprocessor: input size must be positive, got {self.height}x{self.width}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise ValueError(f"Preprocessor: mean/std must be 3 values (std > 0), got {self.mean} / {self.std}")

    @property
    def size(self) -> tuple[int, int]:
        return (self.height, self.width)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if img.mode != "RGB":
            img = img.convert("RGB")
        if img.size != (self.width, self.height):
            img = img.resize((self.width, self.height), Image.Resampling.BILINEAR)
        return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] (any device) -> float32 (x / 255 - mean) / std on the same device."""
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).mul_(255.0).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).mul_(255.0).view(1, 3, 1, 1)
        return x.to(torch.float32).sub_(mean).div_(std)

    def batch(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Stacked pixel values and the original (height, width) of each image."""
        return torch.stack([self(img) for img in images]), [(img.height, img.width) for img in images]


class SegmenterUnavailable(RuntimeError):
    """The segmenter cannot be loaded (missing checkpoint, no network, pickle-only weights...)."""


# ---------------------------------------------------------------- configs


def _labels_config(labels: Sequence[str]) -> dict[str, Any]:
    labels = list(labels)
    if not labels:
        raise ValueError("at least one label is needed")
    if len(set(labels)) != len(labels):
        raise ValueError(f"duplicate labels: {sorted({x for x in labels if labels.count(x) > 1})}")
    return {"id2label": dict(enumerate(labels)), "label2id": {name: i for i, name in enumerate(labels)}}


def tiny_config(labels: Sequence[str], *, num_queries: int = 16, embed_dim: int = 16, hidden_dim: int = 32,
                decoder_layers: int = 3, encoder_layers: int = 1):
    """A tiny Mask2Former config (Swin backbone: embed_dim 16, depths [1,1,1,1]; 32-d decoder).

    ~0.37 M parameters; a forward at batch 4 x 96x224 takes ~25 ms on 2 CPU cores. GroupNorm(32, .)
    in the pixel decoder requires hidden_dim to be a multiple of 32."""
    from transformers import Mask2FormerConfig, SwinConfig

    backbone = SwinConfig(embed_dim=embed_dim, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 4], window_size=7,
                          drop_path_rate=0.0, out_features=["stage1", "stage2", "stage3", "stage4"])
    return Mask2FormerConfig(
        backbone_config=backbone, feature_size=hidden_dim, mask_feature_size=hidden_dim, hidden_dim=hidden_dim,
        encoder_feedforward_dim=2 * hidden_dim, dim_feedforward=2 * hidden_dim, encoder_layers=encoder_layers,
        decoder_layers=decoder_layers, num_attention_heads=2, num_queries=num_queries, **_labels_config(labels))


def swin_tiny_config(labels: Sequence[str], *, num_queries: int = 100):
    """A swin-tiny-sized Mask2Former config (Swin embed_dim 96, depths [2,2,6,2], heads [3,6,12,24],
    window 7; Mask2Former defaults: 256-d, 6 encoder / 10 decoder layers) for random-init GPU benchmarks.
    facebook/mask2former-swin-tiny-coco-panoptic has this shape with 100 queries; the Mapillary Vistas
    checkpoints use 200 queries (and a swin-large backbone)."""
    from transformers import Mask2FormerConfig, SwinConfig

    backbone = SwinConfig(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7,
                          drop_path_rate=0.3, out_features=["stage1", "stage2", "stage3", "stage4"])
    return Mask2FormerConfig(backbone_config=backbone, num_queries=num_queries, **_labels_config(labels))


def swin_large_config(labels: Sequence[str], *, num_queries: int = 200):
    """The shape of facebook/mask2former-swin-large-mapillary-vistas-panoptic (Swin-L: embed_dim 192,
    depths [2,2,18,2], heads [6,12,24,48], window 12; 200 queries) for random-init GPU benchmarks."""
    from transformers import Mask2FormerConfig, SwinConfig

    backbone = SwinConfig(embed_dim=192, depths=[2, 2, 18, 2], num_heads=[6, 12, 24, 48], window_size=12,
                          drop_path_rate=0.3, out_features=["stage1", "stage2", "stage3", "stage4"])
    return Mask2FormerConfig(backbone_config=backbone, num_queries=num_queries, **_labels_config(labels))


# ---------------------------------------------------------------- device


def resolve_device(requested: str | torch.device = "auto") -> torch.device:
    """"auto": cuda > mps > cpu. An explicit device that is not available raises SegmenterUnavailable."""
    req = str(requested).strip().lower()
    if req == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(req)
    except RuntimeError as exc:
        raise SegmenterUnavailable(f"unknown device {requested!r}: use auto, cpu, cuda, cuda:N or mps") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SegmenterUnavailable(f"device {requested!r} requested but CUDA is not available here; use device=auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SegmenterUnavailable(f"device {requested!r}: only {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise SegmenterUnavailable(f"device {requested!r} requested but MPS is not available here")
    return device


# ---------------------------------------------------------------- post-processing (pure)


def _first_last(any_along: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., n] bool -> (first True index, last True index + 1); meaningless where no True."""
    n = any_along.shape[-1]
    as_num = any_along.to(torch.float32)  # argmax on bool/uint8 is not supported on every backend (MPS)
    first = as_num.argmax(-1)  # argmax returns the first maximal index
    last = n - as_num.flip(-1).argmax(-1)
    return first, last


def segments_from_logits(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    sizes: Sequence[tuple[int, int]],
    id2label: dict[int, str],
    mode: str = "panoptic",
    score_threshold: float = 0.5,
    mask_threshold: float = 0.5,
    overlap_threshold: float = 0.8,
) -> list[list[Segment]]:
    """Mask2Former outputs -> segments per image, at mask resolution.

    class_logits [B, Q, C+1] (last class = "no object"), mask_logits [B, Q, mh, mw], sizes = original
    (height, width) per image. Computed on the logits' device (vectorised over the batch); only the kept
    masks go to the CPU. Segments of an image are sorted by score, highest first.

    panoptic: score, label = max of softmax over C+1 classes; queries whose label is "no object" or with
        score <= score_threshold are dropped. Each pixel goes to the kept query with the highest
        score * sigmoid(mask); a segment's mask = the pixels it wins where its own sigmoid(mask) >=
        mask_threshold (detectron2's final mask; uncovered pixels stay void). Segments whose mask area /
        own thresholded area (sigmoid >= mask_threshold) is < overlap_threshold are dropped (mostly
        covered by stronger queries), as are empty ones. Masks of one image are disjoint.
    instance: each query independently: label = best real class, mask = sigmoid(mask) >= mask_threshold,
        score = class prob * mean sigmoid(mask) inside the mask (HF); kept if the mask is non-empty and
        score >= score_threshold. Masks may overlap.

    bbox: mask-pixel box scaled to the original size (x * W / mw, y * H / mh; floor for x0/y0, ceil for
    x1/y1, clipped); area = round(mask pixel count * H * W / (mh * mw)).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if class_logits.dim() != 3 or mask_logits.dim() != 4:
        raise ValueError(f"expected class_logits [B,Q,C+1] and mask_logits [B,Q,mh,mw], got "
                         f"{tuple(class_logits.shape)} and {tuple(mask_logits.shape)}")
    batch, num_queries, num_classes_1 = class_logits.shape
    if mask_logits.shape[:2] != (batch, num_queries):
        raise ValueError(f"class_logits {tuple(class_logits.shape)} and mask_logits {tuple(mask_logits.shape)} disagree")
    if len(sizes) != batch:
        raise ValueError(f"{len(sizes)} sizes for a batch of {batch}")
    num_classes = num_classes_1 - 1
    mh, mw = int(mask_logits.shape[2]), int(mask_logits.shape[3])
    if batch == 0 or num_queries == 0:
        return [[] for _ in range(batch)]

    probs = torch.softmax(class_logits.float(), dim=-1)  # [B, Q, C+1]
    # [B, Q, mh, mw] in fp32; a fresh tensor (never the caller's), so it may be modified in place below
    mask_probs = mask_logits.float().sigmoid_() if mask_logits.dtype != torch.float32 else mask_logits.sigmoid()
    own = mask_probs >= mask_threshold  # each query's own binary mask
    own_area = own.sum(dim=(2, 3))  # [B, Q]

    if mode == "panoptic":
        scores, labels = probs.max(-1)
        keep = labels.ne(num_classes) & (scores > score_threshold)
        # score * prob for kept queries (>= 0), -prob (<= 0) for dropped ones: a dropped query can only
        # "win" pixels where every kept query has prob 0, which are outside every kept `own` mask anyway.
        # In place: the largest tensor of the batch is not copied (matters on GPU at Q=200).
        weighted = mask_probs.mul_(torch.where(keep, scores, -1.0)[..., None, None])
        winner = weighted.argmax(1)  # [B, mh, mw]
        del weighted, mask_probs
        queries = torch.arange(num_queries, device=winner.device).view(1, num_queries, 1, 1)
        masks = (winner.unsqueeze(1) == queries) & own  # [B, Q, mh, mw], disjoint across queries
        area = masks.sum(dim=(2, 3))
        ratio = area.float() / own_area.clamp(min=1).float()
        valid = keep & (area > 0) & (ratio >= overlap_threshold)
    else:
        scores, labels = probs[..., :-1].max(-1)  # best real class
        masks = own
        area = own_area
        mask_score = (mask_probs * own).sum(dim=(2, 3)) / (own_area.float() + 1e-6)
        scores = scores * mask_score
        valid = (area > 0) & (scores >= score_threshold)

    rows_first, rows_last = _first_last(masks.any(dim=3))  # [B, Q]
    cols_first, cols_last = _first_last(masks.any(dim=2))
    b_idx, q_idx = valid.nonzero(as_tuple=True)
    ints = torch.stack([b_idx, labels[valid], cols_first[valid], rows_first[valid], cols_last[valid],
                        rows_last[valid], area[valid]], dim=1).to(torch.int64).cpu().numpy()
    kept_scores = scores[valid].double().cpu().numpy()
    kept_masks = masks[valid].cpu().numpy()  # [N, mh, mw] bool; same (b, q) order as nonzero

    out: list[list[Segment]] = [[] for _ in range(batch)]
    for n, (b, label_id, x0, y0, x1, y1, count) in enumerate(ints.tolist()):
        height, width = (int(v) for v in sizes[b])
        mask = kept_masks[n]
        mask.flags.writeable = False
        bbox = (
            min(width, x0 * width // mw),
            min(height, y0 * height // mh),
            min(width, -((-x1 * width) // mw)),  # ceil
            min(height, -((-y1 * height) // mh)),
        )
        out[b].append(Segment(
            label=id2label.get(label_id, str(label_id)),
            label_id=label_id,
            score=min(1.0, max(0.0, float(kept_scores[n]))),
            bbox=bbox,
            area=int(math.floor(count * height * width / (mh * mw) + 0.5)),
            mask=mask,
        ))
    for segs in out:
        segs.sort(key=lambda s: -s.score)  # stable: ties keep query order
    return out


# ---------------------------------------------------------------- segmenter


class Mask2FormerSegmenter:
    """A Mask2FormerForUniversalSegmentation in eval mode on one device, with its preprocessing."""

    def __init__(self, model, *, checkpoint: str, revision: str | None, untrained: bool,
                 device: torch.device, preprocessor: Preprocessor):
        self.model = model.eval().to(device)
        self.checkpoint = checkpoint
        self.revision = revision
        self.untrained = bool(untrained)
        self.device = device
        self.preprocessor = preprocessor
        self.id2label: dict[int, str] = {int(k): str(v) for k, v in model.config.id2label.items()}
        if self.untrained:
            log.warning("untrained tiny random-init Mask2Former: crops are NOT meaningful (%s)", checkpoint)

    # ------------------------------------------------------------ constructors

    @classmethod
    def from_pretrained(cls, checkpoint: str, revision: str | None = None, device: str = "auto",
                        input_size: tuple[int, int] | None = None) -> "Mask2FormerSegmenter":
        """Hub id or local directory. Weights must be safetensors (pickle checkpoints are refused).

        input_size (height, width): the fixed network input; None = the size saved by `save` for a local
        directory, else (384, 832). Offline (HF_HUB_OFFLINE=1) a checkpoint not in the cache fails at once
        with SegmenterUnavailable."""
        from transformers import Mask2FormerForUniversalSegmentation

        checkpoint = str(checkpoint)
        dev = resolve_device(device)
        path, local, hub = resolve_checkpoint(checkpoint, SEGMENTER_FIELD, SegmenterUnavailable, revision)
        started = time.perf_counter()
        try:
            model = Mask2FormerForUniversalSegmentation.from_pretrained(
                path, use_safetensors=True, dtype=torch.float32, **hub)
        except (OSError, ValueError) as exc:
            raise SegmenterUnavailable(
                load_error(checkpoint, local, hub, exc, "Mask2Former", SEGMENTER_FIELD)) from exc
        log.info("loaded %s%s in %.1f s", checkpoint, f"@{revision}" if revision else "", time.perf_counter() - started)

        try:
            from transformers.image_processing_base import ImageProcessingMixin

            processor, _ = ImageProcessingMixin.get_image_processor_dict(path, **hub)
        except (OSError, ValueError) as exc:
            log.warning("%s: no image processor config (%s); using ImageNet mean/std", checkpoint, exc)
            processor = {}
        sidecar = cls._read_sidecar(path) if local else {}
        if input_size is None:
            input_size = tuple(sidecar.get("input_size") or DEFAULT_INPUT_SIZE)
        mean, std = processor_mean_std(processor)
        return cls(model, checkpoint=checkpoint, revision=revision, untrained=bool(sidecar.get("untrained", False)),
                   device=dev, preprocessor=_preprocessor(input_size, mean, std))

    @staticmethod
    def _read_sidecar(path: str) -> dict[str, Any]:
        try:
            return json.loads(Path(path, SIDECAR).read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("%s: unreadable %s (%s); ignored", path, SIDECAR, exc)
            return {}

    @classmethod
    def random_init(cls, config, *, seed: int = 0, device: str = "cpu",
                    input_size: tuple[int, int] = DEFAULT_INPUT_SIZE, name: str | None = None) -> "Mask2FormerSegmenter":
        """A random-init model from a Mask2FormerConfig (deterministic for a seed, whatever the device:
        weights are drawn on the CPU with a forked RNG, the caller's RNG state is untouched). untrained=True."""
        from transformers import Mask2FormerForUniversalSegmentation

        dev = resolve_device(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Mask2FormerForUniversalSegmentation(config)
        return cls(model, checkpoint=name or f"random-init-mask2former-seed{seed}", revision=None, untrained=True,
                   device=dev, preprocessor=_preprocessor(input_size, IMAGENET_MEAN, IMAGENET_STD))

    @classmethod
    def tiny_random(cls, labels: Sequence[str], seed: int = 0, device: str = "cpu",
                    input_size: tuple[int, int] = (96, 224)) -> "Mask2FormerSegmenter":
        """A tiny random-init Mask2Former (see `tiny_config`) with id2label from `labels`. untrained=True."""
        return cls.random_init(tiny_config(labels), seed=seed, device=device, input_size=input_size,
                               name=f"tiny-random-mask2former-seed{seed}")

    tiny_config = staticmethod(tiny_config)
    swin_tiny_config = staticmethod(swin_tiny_config)

    def save(self, directory: str | os.PathLike) -> Path:
        """config.json + model.safetensors + preprocessor_config.json (+ a small sidecar with the untrained
        flag and input size) so that `from_pretrained(directory)` restores this segmenter offline."""
        from transformers import Mask2FormerImageProcessorPil

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out)  # transformers 5.x writes safetensors only
        h, w = self.preprocessor.size
        Mask2FormerImageProcessorPil(
            do_resize=True, size={"height": h, "width": w}, do_rescale=True, rescale_factor=1 / 255,
            do_normalize=True, image_mean=list(self.preprocessor.mean), image_std=list(self.preprocessor.std),
        ).save_pretrained(out)
        (out / SIDECAR).write_text(json.dumps({"untrained": self.untrained, "input_size": [h, w],
                                               "source_checkpoint": self.checkpoint, "source_revision": self.revision},
                                              indent=2) + "\n")
        if not (out / "model.safetensors").exists() and not (out / "model.safetensors.index.json").exists():
            raise RuntimeError(f"save_pretrained wrote no safetensors file in {out}")
        return out

    # ------------------------------------------------------------ inference

    @property
    def input_size(self) -> tuple[int, int]:
        return self.preprocessor.size

    @property
    def identity(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "revision": self.revision, "untrained": self.untrained,
                "input_size": list(self.preprocessor.size), "num_labels": len(self.id2label)}

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def predict(self, pixel_values: torch.Tensor, sizes: Sequence[tuple[int, int]], *, mode: str = "panoptic",
                score_threshold: float = 0.5, mask_threshold: float = 0.5,
                overlap_threshold: float = 0.8, layout: str = "chw") -> list[list[Segment]]:
        """pixel_values [B, 3, H, W] from `preprocessor` (uint8, normalised here on the device, or already
        normalised float); sizes = the original (height, width) of each image.

        layout "hwc": uint8 [B, H, W, 3] as PIL resized it (the segment stream's shared-memory slots),
        copied to the device as it is and made [B, 3, H, W] there: the same values, and no transpose
        on the host."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if layout not in ("chw", "hwc"):
            raise ValueError(f"layout must be chw or hwc, got {layout!r}")
        channels = 1 if layout == "chw" else 3
        if pixel_values.dim() != 4 or pixel_values.shape[channels] != 3 or (
                layout == "hwc" and pixel_values.dtype != torch.uint8):
            want = "[B, 3, H, W]" if layout == "chw" else "uint8 [B, H, W, 3]"
            raise ValueError(f"pixel_values must be {want}, got {tuple(pixel_values.shape)} {pixel_values.dtype}")
        if len(sizes) != pixel_values.shape[0]:
            raise ValueError(f"{len(sizes)} sizes for a batch of {pixel_values.shape[0]}")
        with torch.inference_mode():
            x = pixel_values.to(self.device, non_blocking=True)
            if layout == "hwc":
                x = x.permute(0, 3, 1, 2).contiguous()
            x = self.preprocessor.normalize(x) if x.dtype == torch.uint8 else x.to(torch.float32)
            with self._autocast():
                out = self.model(pixel_values=x)
            return segments_from_logits(out.class_queries_logits, out.masks_queries_logits, sizes, self.id2label,
                                        mode=mode, score_threshold=score_threshold, mask_threshold=mask_threshold,
                                        overlap_threshold=overlap_threshold)

    def __repr__(self) -> str:
        return (f"Mask2FormerSegmenter({self.checkpoint!r}, revision={self.revision!r}, untrained={self.untrained}, "
                f"device={self.device}, input_size={self.preprocessor.size}, labels={len(self.id2label)})")


def _preprocessor(input_size: Sequence[int], mean: Sequence[float], std: Sequence[float]) -> Preprocessor:
    if len(input_size) != 2:
        raise ValueError(f"input_size must be (height, width), got {input_size!r}")
    h, w = (int(v) for v in input_size)
    if h % 32 or w % 32:
        log.warning("input size %dx%d is not a multiple of 32 (Swin pads internally; masks get uneven borders)", h, w)
    return Preprocessor(height=h, width=w, mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std))
