"""Pseudo-group crops for the baselines, stored in `features` like any crop:

* `image`  - the whole image (segmenter id `whole-image`): the whole-image baseline and the
  fallback for images without crops;
* `random` - per image, as many crops as the segmenter cut, each the same size as one of them,
  at a random place (segmenter id `random@<segmenter>`): the poster's first future-work
  question, "are directed features better than random crops?".

Both are planned per image like segmentation (a rerun is a no-op) and committed atomically.
"""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
from pydantic import BaseModel

from storage import sources
from storage.layout import DataRoot
from storage.queries import catalog
from storage.schema import FEATURES, QUARANTINE, to_table
from storage.shards import Output, commit_shard, is_committed, shard_id
from tasks.segment import crop_box, encode, feature_id, segmenter_specs
from tasks.specs import CropSpec
from tasks.validate import BadInput, load_rgb

STAGE = "baselines"
WHOLE_IMAGE = "whole-image"
WHOLE_IMAGE_CROPS = CropSpec(max_side=512)


def random_key(segmenter_id: str) -> str:
    return f"random@{segmenter_id}"


def source_key(group: str, segmenter_id: str) -> str:
    """The `segmenter` value whose rows hold `group`'s crops."""
    return {"image": WHOLE_IMAGE, "random": random_key(segmenter_id)}.get(group, segmenter_id)


class BaselinePlan(BaseModel):
    kind: str  # image | random
    dataset: str
    shard_id: str
    key: str  # the segmenter value written
    images: list[dict]  # image_id, split, country, source_uri, boxes: the segmenter's bboxes (random only)


def plan_baselines(root: DataRoot, kind: str, datasets: list[str], segmenter_id: str,
                   shard_size: int = 256) -> list[BaselinePlan]:
    """Images of `datasets` without `kind` crops yet (random: only images the segmenter cut crops from)."""
    key = source_key(kind, segmenter_id)
    with catalog(root, fresh=True) as cat:
        rows = (cat.images_without_crops(key, datasets) if kind == "image"
                else cat.segmented_without_crops(segmenter_id, key, datasets))
    plans: list[BaselinePlan] = []
    for dataset in sorted({r[1] for r in rows}):
        refs = [{"image_id": r[0], "split": r[2], "country": r[3], "source_uri": r[4], "boxes": r[5] or []}
                for r in rows if r[1] == dataset]
        for k in range(0, len(refs), shard_size):
            chunk = refs[k:k + shard_size]
            plans.append(BaselinePlan(kind=kind, dataset=dataset, shard_id=shard_id([key, dataset, [r["image_id"] for r in chunk]]),
                                      key=key, images=chunk))
    return plans


def random_boxes(image_id: str, width: int, height: int, bboxes: list[list[int]], crops: CropSpec) -> list[tuple]:
    """One box per directed crop, the size of that crop (padded as it was), at a random place seeded by the image."""
    rng = np.random.default_rng(int(image_id[:16], 16))
    out = []
    for bbox in bboxes:
        x0, y0, x1, y1 = crop_box(tuple(int(v) for v in bbox), width, height, crops)
        bw, bh = max(1, x1 - x0), max(1, y1 - y0)
        left = int(rng.integers(0, width - bw + 1))
        top = int(rng.integers(0, height - bh + 1))
        out.append((left, top, left + bw, top + bh))
    return out


def baseline_shard(root: DataRoot, plan: BaselinePlan, segmenter_id: str) -> dict:
    """Cut and commit one shard of whole-image or random crops."""
    if is_committed(root, STAGE, plan.dataset, plan.shard_id):
        return {"shard_id": plan.shard_id, "cached": True, "crops": 0}
    crops = WHOLE_IMAGE_CROPS if plan.kind == "image" else segmenter_specs(root, segmenter_id)[1]
    now = datetime.now(timezone.utc)
    rows, quarantined = [], []
    for ref in plan.images:
        try:
            img = load_rgb(sources.read_bytes(ref["source_uri"]))
        except (BadInput, FileNotFoundError) as exc:
            reason = exc.reason if isinstance(exc, BadInput) else "missing_file"
            quarantined.append({"source_uri": ref["source_uri"], "dataset": plan.dataset, "stage": STAGE,
                                "reason": reason, "detail": f"{plan.key}: {exc}", "size_bytes": None,
                                "source_mtime": None, "seen_at": now})
            continue
        boxes = ([(0, 0, img.width, img.height)] if plan.kind == "image"
                 else random_boxes(ref["image_id"], img.width, img.height, ref["boxes"], crops))
        for rank, box in enumerate(boxes):
            crop = img.crop(box)
            if max(crop.size) > crops.max_side:
                crop.thumbnail((crops.max_side, crops.max_side))
            fid = feature_id(plan.key, plan.dataset, ref["image_id"], plan.kind, rank)
            rows.append({"feature_id": fid, "image_id": ref["image_id"], "dataset": plan.dataset,
                         "split": ref["split"], "country": ref["country"], "label": plan.kind, "group": plan.kind,
                         "score": 1.0, "bbox": list(box), "area": (box[2] - box[0]) * (box[3] - box[1]),
                         "crop": {"bytes": encode(crop, crops), "path": f"{fid}.jpg"},
                         "crop_width": crop.width, "crop_height": crop.height, "segmenter": plan.key,
                         "untrained": False, "created_at": now})
    outputs = [Output("features", {"segmenter": plan.key, "dataset": plan.dataset, "group": plan.kind},
                      to_table(rows, FEATURES)),
               Output("quarantine", {"dataset": plan.dataset}, to_table(quarantined, QUARANTINE))]
    commit_shard(root, STAGE, plan.dataset, plan.shard_id, outputs, params={"key": plan.key, "kind": plan.kind})
    return {"shard_id": plan.shard_id, "cached": False, "crops": len(rows), "quarantined": len(quarantined)}
