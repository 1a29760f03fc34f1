"""Stage `segment`: images -> segments (Mask2Former or ground truth) -> feature crops in Parquet.

Three words, three things: the SegmenterSpec (`spec`, what to run), the segmenter id (`segmenter_id`,
the `segmenter` value of every row: name@revision-<hash of the spec and crops>), and the loaded
segmenter (`load_segmenter`: a Mask2Former or the ground-truth annotations). Plain functions; the
flow `segment` (flows/segment.py) runs `segment_shard` as one Prefect task per shard. One shard:
  DataLoader workers read, decode, cut the overlay and preprocess (prefetching) ->
  the model runs batch after batch (bf16 on CUDA, batch halved on OOM) ->
  post-processing at mask resolution picks segments -> crops are cut from the original
  image and encoded in a thread pool while the next batch runs -> one atomic commit of
  `features` (partitioned segmenter/dataset/group), `segmentations` and `quarantine`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from datetime import datetime, timezone
from functools import lru_cache

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel
from torch.utils.data import DataLoader, Dataset

from models.labels import GROUPS, label_set_for_checkpoint, load_label_map
from models.segmenter import Segment
from storage import sources
from storage.layout import DataRoot
from storage.queries import catalog
from storage.schema import FEATURES, QUARANTINE, SEGMENTATIONS, to_table
from storage.shards import Output, commit_shard, is_committed, read_commits, shard_id
from tasks.loader import worker_init
from tasks.specs import AnnotationSource, CropSpec, RunOptions, SegmenterSpec
from tasks.validate import BadInput, load_rgb

log = logging.getLogger(__name__)

STAGE = "segment"
SEGMENT_VERSION = "1"  # bump when crops change for the same inputs and parameters
MIN_SIDE = 16  # px; smaller images (after the overlay cut) cannot be segmented
MAX_ASPECT = 12.0  # width/height (or inverse) beyond this is a strip, not a scene


# ---------------------------------------------------------------- identity


def _annotations_identity(name: str, source: AnnotationSource) -> dict[str, str]:
    """What decides an annotation source's masks, wherever it lies: the sha256 of its panoptic JSON
    (segments, categories, boxes) and its PNG folder and image root relative to the JSON's folder.
    Never an absolute path: a data root moved or copied elsewhere keeps its segmenter ids."""
    field = f"segmenter.annotations.{name}.panoptic_json"
    try:
        digest = hashlib.sha256(sources.read_bytes(source.panoptic_json)).hexdigest()
    except FileNotFoundError:
        raise ValueError(f"{field}: {source.panoptic_json} does not exist; point it at the COCO-panoptic JSON") from None
    base = sources.parent(source.panoptic_json)
    return {"panoptic_json": f"sha256:{digest}", "png_dir": sources.relative(source.png_dir, base),
            "images_root": sources.relative(source.images_root, base)}


def segmenter_id(spec: SegmenterSpec, crops: CropSpec) -> str:
    """The `segmenter` value of every row: name@revision-<hash of everything that changes output>.
    Annotation sources are hashed by content and relative layout (`_annotations_identity`)."""
    identity = spec.identity()
    if spec.annotations:
        identity["annotations"] = {name: _annotations_identity(name, src) for name, src in sorted(spec.annotations.items())}
    payload = json.dumps([SEGMENT_VERSION, identity, crops.identity()], sort_keys=True)
    digest = hashlib.sha256(payload.encode()).hexdigest()[:10]
    if spec.kind == "annotations":
        name = "annotations"
    elif spec.kind == "tiny-random":
        name = f"UNTRAINED-tiny-random-{spec.label_set or 'demo'}"
    else:
        name = spec.checkpoint.strip("/").replace("/", "--")
    return f"{name}@{spec.revision or 'main'}-{digest}"


def segmenter_specs(root: DataRoot, segmenter_id: str) -> tuple[SegmenterSpec, CropSpec]:
    """The specs a segmenter id was made from, read back from its completion records."""
    for record in read_commits(root, STAGE):
        if record.params.get("segmenter") == segmenter_id:
            return (SegmenterSpec.model_validate(record.params["spec"]),
                    CropSpec.model_validate(record.params["crops"]))
    raise LookupError(f"segmenter {segmenter_id!r} has no completed segmentation shard under {root.url}")


# ---------------------------------------------------------------- loaded segmenters


class ImageRef(BaseModel):
    image_id: str
    dataset: str
    split: str
    country: str
    source_uri: str


class SegmentPlan(BaseModel):
    """A small manifest: the images one task segments."""

    dataset: str
    shard_id: str
    segmenter_id: str
    images: list[ImageRef]


@lru_cache(maxsize=2)
def _load(spec_json: str, device: str):
    """Load a segmenter once per process (tasks in one run share it)."""
    spec = SegmenterSpec.model_validate_json(spec_json)
    if spec.kind == "annotations":
        from models.annotations import AnnotationsSegmenter, PanopticAnnotations

        return AnnotationsSegmenter({d: PanopticAnnotations(a.panoptic_json, a.png_dir, a.images_root)
                                     for d, a in spec.annotations.items()})
    from models.segmenter import Mask2FormerSegmenter

    size = (spec.input_height, spec.input_width)
    if spec.kind == "tiny-random":
        labels = [label.name for label in load_label_map(spec.label_set or "demo").labels]
        return Mask2FormerSegmenter.tiny_random(labels, seed=spec.seed, device=device, input_size=size)
    return Mask2FormerSegmenter.from_pretrained(spec.checkpoint, spec.revision, device=device, input_size=size)


def load_segmenter(spec: SegmenterSpec, device: str = "auto"):
    """The loaded segmenter of a spec: a Mask2FormerSegmenter or an AnnotationsSegmenter."""
    return _load(spec.model_dump_json(), device)


def label_groups(spec: SegmenterSpec, segmenter) -> dict[str, str]:
    """label -> group for this segmenter; labels it does not know are dropped, loudly."""
    if spec.label_set:
        return {label.name: label.group for label in load_label_map(spec.label_set).labels}
    if spec.kind == "annotations":
        return segmenter.label_groups()
    if spec.kind == "tiny-random":
        return {label.name: label.group for label in load_label_map("demo").labels}
    name = label_set_for_checkpoint(spec.checkpoint)
    if name is None:
        raise ValueError(f"segmenter.label_set: cannot tell the label set of {spec.checkpoint!r}; "
                         "set it to coco_panoptic, cityscapes, mapillary_vistas, ade20k or a JSON path")
    return {label.name: label.group for label in load_label_map(name).labels}


# ---------------------------------------------------------------- reading (DataLoader workers)


def overlay_rows(height: int, spec: SegmenterSpec, dataset: str) -> tuple[int, int]:
    """(top, kept height) in px after cutting the dataset's overlay bands (GeoGuessr UI)."""
    cut = spec.overlay.get(dataset)
    if cut is None:
        return 0, height
    top, bottom = int(round(height * cut.top)), int(round(height * cut.bottom))
    return top, max(0, height - top - bottom)


class ShardImages(Dataset):
    """Reads, decodes and preprocesses one shard's images; errors become items, not exceptions."""

    def __init__(self, refs: list[ImageRef], spec: SegmenterSpec, segmenter):
        self.refs, self.spec = refs, spec
        self.preprocessor = getattr(segmenter, "preprocessor", None)  # picklable; None for annotations
        self.annotations = segmenter if spec.kind == "annotations" else None

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> dict:
        ref = self.refs[i]
        try:
            img = load_rgb(sources.read_bytes(ref.source_uri))
            top, kept = overlay_rows(img.height, self.spec, ref.dataset)
            if min(img.width, kept) < MIN_SIDE or max(img.width / max(kept, 1), kept / img.width) > MAX_ASPECT:
                raise BadInput("unsegmentable", f"{img.width}x{img.height} px, {kept} px tall after the overlay cut")
            img = img.crop((0, top, img.width, top + kept))
            item = {"index": i, "image": torch.from_numpy(np.asarray(img).copy()), "top": top}
            if self.preprocessor is not None:
                item["pixels"] = self.preprocessor(img)
            if self.annotations is not None:
                item.update(self.annotations.prepare(ref.dataset, ref.source_uri, top, kept))
            return item
        except BadInput as bad:
            return {"index": i, "error": (bad.reason, bad.detail)}
        except FileNotFoundError as exc:
            return {"index": i, "error": ("missing_file", f"vanished after ingest: {exc}")}


def collate_images(items: list[dict]) -> dict:
    """Original images differ in size and stay a list; model inputs are stacked here, in the
    worker, so the DataLoader can pin them for a non-blocking copy to the GPU."""
    good = [item for item in items if "error" not in item]
    pixels = torch.stack([item.pop("pixels") for item in good]) if good and "pixels" in good[0] else None
    return {"items": items, "good": good, "pixels": pixels}


# ---------------------------------------------------------------- model with OOM back-off


@dataclass
class BatchSegmenter:
    """Runs a loaded segmenter over collated batches. On CUDA OOM the batch is halved (and stays
    halved); a batch that fails otherwise is retried image by image, so one bad image cannot fail
    the shard: its result is the exception, where the others' are their segments."""

    segmenter: Any
    spec: SegmenterSpec
    size: int  # images per model call; shrinks on OOM

    def __call__(self, items: list[dict], pixels) -> list:
        """Segments (or None: no annotation, or the exception) per item, in order."""
        def part(a: int, b: int) -> list:
            return self(items[a:b], None if pixels is None else pixels[a:b])

        if len(items) > self.size:
            step = self.size  # fixed for this split, even if a part shrinks self.size on OOM
            return [seg for k in range(0, len(items), step) for seg in part(k, k + step)]
        sizes = [tuple(item["image"].shape[:2]) for item in items]
        spec = self.spec
        try:
            if spec.kind == "annotations":
                return self.segmenter.predict(items, sizes)
            return self.segmenter.predict(pixels, sizes, mode=spec.mode, score_threshold=spec.score_threshold,
                                          mask_threshold=spec.mask_threshold, overlap_threshold=spec.overlap_threshold)
        except torch.cuda.OutOfMemoryError:
            if len(items) == 1:
                raise
            torch.cuda.empty_cache()
            self.size = max(1, len(items) // 2)
            log.warning("CUDA out of memory at batch %d: continuing at batch %d", len(items), self.size)
            return part(0, len(items))
        except Exception as exc:  # noqa: BLE001 - isolate the image that breaks the model
            if len(items) == 1:
                return [exc]
            return [seg for k in range(len(items)) for seg in part(k, k + 1)]


# ---------------------------------------------------------------- crops (pure)


def select_segments(segments: list[Segment], groups: dict[str, str], crops: CropSpec) -> list[tuple[Segment, str, int]]:
    """(segment, group, rank within its label) for the segments worth a crop."""
    by_label: dict[str, list[Segment]] = {}
    for seg in segments:
        if groups.get(seg.label) in GROUPS and seg.score >= crops.min_score and seg.area >= crops.min_area:
            by_label.setdefault(seg.label, []).append(seg)
    out = []
    for label in sorted(by_label):
        ranked = sorted(by_label[label], key=lambda s: (-s.area, s.bbox))[: crops.max_per_label]
        out.extend((seg, groups[label], rank) for rank, seg in enumerate(ranked))
    return out


def crop_box(bbox: tuple[int, int, int, int], width: int, height: int, crops: CropSpec) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = bbox
    px = int(round((x1 - x0) * crops.padding)) + crops.padding_px
    py = int(round((y1 - y0) * crops.padding)) + crops.padding_px
    return max(0, x0 - px), max(0, y0 - py), min(width, x1 + px), min(height, y1 + py)


def cut_crop(image: np.ndarray, seg: Segment, crops: CropSpec) -> Image.Image:
    """The crop from the full-resolution image; the mask (low-res) only greys the background."""
    h, w = image.shape[:2]
    x0, y0, x1, y1 = crop_box(seg.bbox, w, h, crops)
    region = image[y0:y1, x0:x1]
    if crops.mask_background:
        mh, mw = seg.mask.shape
        rows = np.minimum((np.arange(y0, y1) * mh) // h, mh - 1)
        cols = np.minimum((np.arange(x0, x1) * mw) // w, mw - 1)
        keep = seg.mask[np.ix_(rows, cols)]
        region = np.where(keep[..., None], region, np.uint8(128))
    img = Image.fromarray(np.ascontiguousarray(region))
    if max(img.size) > crops.max_side:
        img.thumbnail((crops.max_side, crops.max_side), Image.BILINEAR)
    return img


def encode(img: Image.Image, crops: CropSpec) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG" if crops.format == "jpeg" else "WEBP", quality=crops.quality)
    return buf.getvalue()


def feature_id(segmenter_id: str, dataset: str, image_id: str, label: str, rank: int) -> str:
    """Deterministic: the same crop gets the same id on every run (and a rerun after kill -9)."""
    return hashlib.sha256(f"{segmenter_id}|{dataset}|{image_id}|{label}|{rank}".encode()).hexdigest()[:24]


# ---------------------------------------------------------------- plan and run


def plan_segment(root: DataRoot, dataset: str, segmenter_id: str, shard_size: int) -> list[SegmentPlan]:
    """Images of `dataset` this segmenter version has not segmented yet, in shards."""
    with catalog(root, fresh=True) as cat:
        rows = cat.unsegmented_images(dataset, segmenter_id)
    refs = [ImageRef(image_id=r[0], dataset=r[1], split=r[2], country=r[3], source_uri=r[4]) for r in rows]
    plans = []
    for k in range(0, len(refs), shard_size):
        chunk = refs[k:k + shard_size]
        plans.append(SegmentPlan(dataset=dataset, shard_id=shard_id([segmenter_id, dataset, [r.image_id for r in chunk]]),
                                 segmenter_id=segmenter_id, images=chunk))
    return plans


def segment_shard(root: DataRoot, plan: SegmentPlan, spec: SegmenterSpec, crops: CropSpec, run: RunOptions) -> dict:
    """Segment one shard and commit its crops; returns counts (and `model_calls`)."""
    if is_committed(root, STAGE, plan.dataset, plan.shard_id):
        return {"shard_id": plan.shard_id, "cached": True, "images": 0, "crops": 0, "model_calls": 0}
    segmenter = load_segmenter(spec, run.device)
    groups = label_groups(spec, segmenter)
    untrained = bool(getattr(segmenter, "untrained", False))
    now = datetime.now(timezone.utc)
    device = getattr(segmenter, "device", None)
    workers = run.workers_for(device.type if device is not None else "cpu")
    loader = DataLoader(ShardImages(plan.images, spec, segmenter), batch_size=run.batch_size, collate_fn=collate_images,
                        num_workers=workers, prefetch_factor=2 if workers else None,
                        worker_init_fn=worker_init, pin_memory=torch.cuda.is_available())
    segment_batch = BatchSegmenter(segmenter, spec, run.batch_size)
    features: list[tuple[dict, Future]] = []
    logs, quarantined, model_calls = [], [], 0
    unknown: set[str] = set()  # labels the label map does not know: dropped, and said so below

    def record(ref: ImageRef, status: str, n: int) -> None:
        logs.append({"image_id": ref.image_id, "dataset": ref.dataset, "segmenter": plan.segmenter_id,
                     "status": status, "crops": n, "created_at": now})

    def reject(ref: ImageRef, reason: str, detail: str) -> None:
        quarantined.append({"source_uri": ref.source_uri, "dataset": ref.dataset, "stage": STAGE, "reason": reason,
                            "detail": f"segmenter {plan.segmenter_id}: {detail}", "size_bytes": None,
                            "source_mtime": None, "seen_at": now})
        # A model failure may be transient (CUDA, a bug fixed later): `error` is planned again.
        record(ref, "error" if reason == "segmenter_error" else "quarantined", 0)

    with ThreadPoolExecutor(run.encode_threads) as pool:
        for batch in loader:
            good = batch["good"]
            for item in batch["items"]:
                if "error" in item:
                    reject(plan.images[item["index"]], *item["error"])
            results = segment_batch(good, batch["pixels"]) if good else []
            model_calls += bool(good)
            for item, segments in zip(good, results):
                ref = plan.images[item["index"]]
                if isinstance(segments, Exception):
                    reject(ref, "segmenter_error", f"{type(segments).__name__}: {segments}")
                    continue
                if segments is None:
                    record(ref, "no_annotation", 0)
                    continue
                unknown.update(seg.label for seg in segments if seg.label not in groups)
                chosen = select_segments(segments, groups, crops)
                record(ref, "ok" if chosen else "no_crops", len(chosen))
                image = item["image"].numpy()
                for seg, group, rank in chosen:
                    x0, y0, x1, y1 = seg.bbox
                    crop = cut_crop(image, seg, crops)
                    fid = feature_id(plan.segmenter_id, ref.dataset, ref.image_id, seg.label, rank)
                    row = {"feature_id": fid, "image_id": ref.image_id, "dataset": ref.dataset, "split": ref.split,
                           "country": ref.country, "label": seg.label, "group": group, "score": float(seg.score),
                           "bbox": [x0, y0 + item["top"], x1, y1 + item["top"]], "area": int(seg.area),
                           "crop_width": crop.width, "crop_height": crop.height, "segmenter": plan.segmenter_id,
                           "untrained": untrained, "created_at": now}
                    features.append((row, pool.submit(encode, crop, crops)))
        ext = "jpg" if crops.format == "jpeg" else "webp"
        rows = [dict(row, crop={"bytes": fut.result(), "path": f"{row['feature_id']}.{ext}"}) for row, fut in features]

    outputs = [Output("features", {"segmenter": plan.segmenter_id, "dataset": plan.dataset, "group": g},
                      to_table([r for r in rows if r["group"] == g], FEATURES)) for g in GROUPS]
    outputs += [Output("segmentations", {"segmenter": plan.segmenter_id, "dataset": plan.dataset}, to_table(logs, SEGMENTATIONS)),
                Output("quarantine", {"dataset": plan.dataset}, to_table(quarantined, QUARANTINE))]
    commit_shard(root, STAGE, plan.dataset, plan.shard_id, outputs,
                 params={"segmenter": plan.segmenter_id, "spec": spec.model_dump(), "crops": crops.model_dump()})
    if unknown:
        log.warning("shard %s: labels with no group in the label map were dropped: %s", plan.shard_id, sorted(unknown))
    if untrained:
        log.warning("shard %s: crops come from an UNTRAINED random-init segmenter", plan.shard_id)
    return {"shard_id": plan.shard_id, "cached": False, "images": len(plan.images), "crops": len(rows),
            "quarantined": len(quarantined), "model_calls": model_calls}
