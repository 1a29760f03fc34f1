"""Stage `segment`: images -> segments (Mask2Former or ground truth) -> feature crops in Parquet.

Three words, three things: the SegmenterSpec (`spec`, what to run), the segmenter id (`segmenter_id`,
the `segmenter` value of every row: name@revision-<hash of the spec and crops>), and the loaded
segmenter (`load_segmenter`: a Mask2Former or the ground-truth annotations). Plain functions; the
flow `segment` (flows/segment.py) runs `segment_shard` as one Prefect task per shard, and keeps
`run.concurrent_shards` of them submitted to this process's one streaming pipeline
(tasks/segment_stream.py):
  reader/crop worker processes, alive for the whole stage run, read, decode, cut the overlay and
  resize into shared memory, ahead of the model and across shard boundaries ->
  the model runs chunk after chunk in plan order (bf16 on CUDA, batch halved on OOM) ->
  post-processing at mask resolution picks segments -> the worker holding the frame cuts and
  encodes the crops from the original image while the model runs the next chunk ->
  a commit thread writes each shard's `features` (partitioned segmenter/dataset/group),
  `segmentations` and `quarantine` atomically, completion record last; then the task returns.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import threading
from functools import lru_cache

import numpy as np
import torch
from pydantic import BaseModel

from models.labels import label_set_for_checkpoint, load_label_map
from storage import sources
from storage.layout import DataRoot
from storage.queries import catalog
from storage.shards import is_committed, read_commits, shard_id
from tasks.segment_stream import BatchSegmenter, SegmentStream, feature_id, stream_stats
from tasks.segment_worker import (MAX_ASPECT, MIN_SIDE, crop_box, cut_crop, encode, overlay_rows, read_frame,
                                  select_segments)
from tasks.specs import AnnotationSource, CropSpec, RunOptions, SegmenterSpec
from tasks.validate import BadInput

log = logging.getLogger(__name__)

__all__ = ["BatchSegmenter", "MAX_ASPECT", "MIN_SIDE", "close_streams", "crop_box", "cut_crop", "encode",
           "feature_id", "label_groups", "load_segmenter", "overlay_rows", "plan_segment", "segment_shard",
           "segmenter_id", "segmenter_specs", "select_segments", "stream_stats"]

STAGE = "segment"
SEGMENT_VERSION = "1"  # bump when crops change for the same inputs and parameters


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
    layout: str | None = None  # the dataset's ingest layout: picks the overlay cut (SegmenterSpec.overlay_for)


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


# ---------------------------------------------------------------- one image at a time (geofeat predict)


class ShardImages:
    """Reads one shard's images one at a time, as the stream's workers do; errors become items, not
    exceptions. For single images (`geofeat predict`); the stage itself streams (SegmentStream)."""

    def __init__(self, refs: list[ImageRef], spec: SegmenterSpec, segmenter):
        self.refs, self.spec = refs, spec
        self.preprocessor = getattr(segmenter, "preprocessor", None)  # None for annotations
        self.annotations = segmenter if spec.kind == "annotations" else None

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> dict:
        ref = self.refs[i]
        try:
            frame, top = read_frame(ref.source_uri, ref.dataset, self.spec, ref.layout)
            item = {"index": i, "image": torch.from_numpy(np.asarray(frame).copy()), "top": top}
            if self.preprocessor is not None:
                item["pixels"] = self.preprocessor(frame)
            if self.annotations is not None:
                item.update(self.annotations.prepare(ref.dataset, ref.source_uri, top, frame.height))
            return item
        except BadInput as bad:
            return {"index": i, "error": (bad.reason, bad.detail)}
        except FileNotFoundError as exc:
            return {"index": i, "error": ("missing_file", f"vanished after ingest: {exc}")}


def collate_images(items: list[dict]) -> dict:
    """Decoded images differ in size and stay a list; model inputs are stacked."""
    good = [item for item in items if "error" not in item]
    pixels = torch.stack([item.pop("pixels") for item in good]) if good and "pixels" in good[0] else None
    return {"items": items, "good": good, "pixels": pixels}


# ---------------------------------------------------------------- plan and run


def dataset_layout(root: DataRoot, dataset: str) -> str | None:
    """The layout a dataset was ingested with (its ingest completion records), for the overlay cut;
    None when it has none or several (then only the dataset's own `overlay` key applies)."""
    layouts = {r.params.get("layout") for r in read_commits(root, "ingest") if r.dataset == dataset}
    if len(layouts) > 1:
        log.warning("dataset %s was ingested with several layouts %s: only an overlay keyed by its name applies",
                    dataset, sorted(map(str, layouts)))
    return layouts.pop() if len(layouts) == 1 else None


def plan_segment(root: DataRoot, dataset: str, segmenter_id: str, shard_size: int) -> list[SegmentPlan]:
    """Images of `dataset` this segmenter version has not segmented yet, in shards."""
    with catalog(root, fresh=True) as cat:
        rows = cat.unsegmented_images(dataset, segmenter_id)
    layout = dataset_layout(root, dataset) if rows else None
    refs = [ImageRef(image_id=r[0], dataset=r[1], split=r[2], country=r[3], source_uri=r[4], layout=layout)
            for r in rows]
    plans = []
    for k in range(0, len(refs), shard_size):
        chunk = refs[k:k + shard_size]
        plans.append(SegmentPlan(dataset=dataset, shard_id=shard_id([segmenter_id, dataset, [r.image_id for r in chunk]]),
                                 segmenter_id=segmenter_id, images=chunk))
    return plans


# One stream per process and segmenter version (the model and the workers are shared by every
# shard task of a stage run in this process; on Dask, by the tasks of one worker).
_STREAMS: dict[tuple, SegmentStream] = {}
_STREAMS_LOCK = threading.Lock()


def stream_workers(run: RunOptions, segmenter) -> int:
    """Reader/crop processes (RunOptions.workers_for): min(8, cores - 1) beside a GPU or with no model;
    on a CPU a quarter of the cores (at least 1), the model's threads taking the rest (`SegmentStream`)."""
    device = getattr(segmenter, "device", None)  # None: no model (ground truth), the main thread idles
    return run.workers_for(device.type if device is not None else "none")


def _stream(spec: SegmenterSpec, crops: CropSpec, run: RunOptions) -> SegmentStream:
    key = (spec.model_dump_json(), crops.model_dump_json(), run.device, run.batch_size, run.num_workers)
    with _STREAMS_LOCK:
        stream = _STREAMS.get(key)
        if stream is None or stream.stopped:
            for other_key, other in list(_STREAMS.items()):  # one stream at a time: close idle ones
                if other.stopped or other.idle:
                    other.close()
                    del _STREAMS[other_key]
            segmenter = load_segmenter(spec, run.device)
            stream = SegmentStream(spec, crops, run, segmenter, label_groups(spec, segmenter),
                                   stream_workers(run, segmenter))
            _STREAMS[key] = stream
        return stream


def close_streams() -> None:
    """Stop this process's streams once their submitted shards are committed (the flow calls it at
    the end of the stage; a stream also stops by itself after a while without work)."""
    with _STREAMS_LOCK:
        streams = list(_STREAMS.values())
        _STREAMS.clear()
    for stream in streams:
        stream.close()


atexit.register(close_streams)


def segment_shard(root: DataRoot, plan: SegmentPlan, spec: SegmenterSpec, crops: CropSpec, run: RunOptions) -> dict:
    """Segment one shard through this process's stream and return once its record exists: counts
    (and `model_calls`: model batches, or images looked up in the ground truth)."""
    if is_committed(root, STAGE, plan.dataset, plan.shard_id):
        return {"shard_id": plan.shard_id, "cached": True, "images": 0, "crops": 0, "model_calls": 0}
    while (future := _stream(spec, crops, run).submit(root, plan)) is None:
        pass  # that stream stopped between lookup and submit: the next lookup starts a new one
    result = future.result()
    unknown, untrained = result.pop("unknown"), result.pop("untrained")
    if unknown:
        log.warning("shard %s: labels with no group in the label map were dropped: %s", plan.shard_id, unknown)
    if untrained:
        log.warning("shard %s: crops come from an UNTRAINED random-init segmenter", plan.shard_id)
    return result
