"""Typed specs of every stage: what prefect.yaml, the CLI and the flows pass to tasks/.

Pydantic models, validated when they are built; errors name the field and the fix. Every field
has a one-line description that says why it exists (tests/test_specs.py fails on a missing one),
and each spec says which of its fields change the output (`identity()`, hashed into ids) and which
only change where or how fast it runs (`RUN_ONLY`).

This module belongs to tasks/ (the stages own their inputs); flows/ imports it, never the other way.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.labels import GROUPS
from tasks.validate import MAX_PIXELS

Layout = Literal["g50", "g3", "im2gps", "osv5m"]
LAYOUTS: tuple[str, ...] = ("g50", "g3", "im2gps", "osv5m")
DATASET_NAME = r"^[a-z0-9][a-z0-9_-]{0,63}$"
DEVICE = r"^(auto|cpu|mps|cuda(:\d+)?)$"  # what torch.device accepts, plus `auto`
DEMO_COUNTRIES = 8  # country styles the demo world can draw (tasks/demo_world/styles.py)


class Spec(BaseModel):
    """Base of every spec: unknown keys are errors (a typo in prefect.yaml is not ignored)."""

    model_config = ConfigDict(extra="forbid")

    # Fields that never change the output (device, workers, batch sizes...): left out of ids.
    RUN_ONLY: ClassVar[frozenset[str]] = frozenset()
    # Fields added after ids were first pinned: hashed only when set away from their default, so
    # ids made before they existed stay valid (tests/test_golden.py).
    ADDED_LATER: ClassVar[frozenset[str]] = frozenset()

    def resolved(self) -> dict[str, Any]:
        """Every field that changes the output, defaults included: saved next to what it made."""
        return self.model_dump(exclude=set(self.RUN_ONLY))

    def identity(self) -> dict[str, Any]:
        """What is hashed into ids: `resolved()` minus later-added fields still at their default."""
        out = self.resolved()
        for name in self.ADDED_LATER:
            if out.get(name) == type(self).model_fields[name].default:
                out.pop(name, None)
        return out


# A config file's relative paths resolve against the file's folder (flows/deployments.py), for the
# fields marked with one of these (json_schema_extra), so a run means the same in-process and on a worker.
PATH = {"path": "always"}  # a folder or file: relative -> <config folder>/<value>
CHECKPOINT = {"path": "checkpoint"}  # a hub id or a directory: a directory if it starts with ./ ../ ~ / or exists


def loader_workers(requested: int | None, device_type: str, cpu_default: int) -> int:
    """Loader processes: the spec's value, else `cpu_default` on a CPU (workers there compete with
    the model for the same cores), else min(8, cores - 1) beside a GPU."""
    if requested is not None:
        return requested
    return cpu_default if device_type == "cpu" else max(1, min(8, (os.cpu_count() or 2) - 1))


# ---------------------------------------------------------------- ingest


class SplitConfig(Spec):
    """How a dataset's images are split. `hash`: from the image's sha256, stable forever."""

    policy: Literal["hash", "train", "val", "test"] = Field(
        "hash", description="hash: from the image's sha256 (stable as data grows); or put every image in one split")
    train: float = Field(0.8, ge=0, le=1, description="fraction of images in train (policy=hash)")
    val: float = Field(0.1, ge=0, le=1, description="fraction in val (policy=hash); test gets the rest")

    @model_validator(mode="after")
    def _fractions(self) -> "SplitConfig":
        if self.train + self.val > 1 + 1e-9:
            raise ValueError(f"split.train + split.val = {self.train + self.val:.3f} > 1; lower one of them")
        return self


# Benchmarks are held out whole: every IM2GPS image is a test image.
DEFAULT_SPLIT = {"im2gps": SplitConfig(policy="test")}


class SourceSpec(Spec):
    """One dataset to ingest."""

    layout: Layout = Field(description="how the source is laid out: g50 | g3 | im2gps | osv5m")
    source: str = Field(description="URL: a folder (g50, g3) or a CSV (g3 manifest, im2gps, osv5m)",
                        json_schema_extra=PATH)
    images: str | None = Field(None, description="image folder for CSV layouts; default: next to the CSV",
                               json_schema_extra=PATH)
    dataset: str = Field(pattern=DATASET_NAME, description="catalog name of the dataset, e.g. g50 "
                         "(lower-case letters, digits, _ and -; at most 64)")
    split: SplitConfig | None = Field(None, description="default: hash 80/10/10; im2gps: all test")

    def resolved_split(self) -> SplitConfig:
        return self.split or DEFAULT_SPLIT.get(self.layout, SplitConfig())


class IngestOptions(Spec):
    """How a source is ingested."""

    RUN_ONLY: ClassVar[frozenset[str]] = frozenset({"shard_size", "mode"})

    shard_size: int = Field(256, ge=1, le=100_000, description="images per shard task (Prefect costs ~4 ms "
                            "per task run: hundreds of images keep it small)")
    max_pixels: int = Field(MAX_PIXELS, ge=1, description="larger images are decompression bombs (px)")
    max_bytes: int = Field(256 * 2**20, ge=1, description="larger files are quarantined unread (bytes)")
    mode: Literal["incremental", "overwrite"] = Field(
        "incremental", description="incremental: only new files; overwrite: drop the dataset and redo it")


# ---------------------------------------------------------------- the demo world


class DemoSpec(Spec):
    """The embedded demo world (tasks/demo_world/), generated under the data root. Equal specs give
    byte-identical worlds; `out` only says where."""

    RUN_ONLY: ClassVar[frozenset[str]] = frozenset({"out"})

    seed: int = Field(0, ge=0, description="same seed, same bytes")
    countries: int = Field(6, ge=1, le=DEMO_COUNTRIES, description="how many of the demo's country styles")
    per_country: int = Field(40, ge=1, description="G50-layout images per country")
    heldout_per_country: int = Field(8, ge=0, description="IM2GPS-style held-out images per country")
    width: int = Field(384, ge=64, description="px; G50 frames are 1536x662, same aspect")
    height: int = Field(166, ge=32, description="px")
    messy: bool = Field(True, description="include a few bad inputs, to show the quarantine at work")
    out: str | None = Field(None, description="where to write it; default <data root>/demo-world", json_schema_extra=PATH)

    def sources(self, world: str) -> list[SourceSpec]:
        """The demo world's two datasets: a G50-layout pool and an IM2GPS-style held-out set."""
        return [
            SourceSpec(layout="g50", source=f"{world}/g50", dataset="demo"),
            SourceSpec(layout="im2gps", source=f"{world}/im2gps/im2gps_demo.csv",
                       images=f"{world}/im2gps/images", dataset="demo-im2gps"),
        ]

    def annotations(self, world: str) -> dict[str, "AnnotationSource"]:
        """The demo world's panoptic ground truth, per dataset."""
        return {
            "demo": AnnotationSource(panoptic_json=f"{world}/panoptic/g50.json", png_dir=f"{world}/panoptic/g50",
                                     images_root=f"{world}/g50"),
            "demo-im2gps": AnnotationSource(panoptic_json=f"{world}/panoptic/im2gps.json",
                                            png_dir=f"{world}/panoptic/im2gps", images_root=f"{world}/im2gps/images"),
        }


# ---------------------------------------------------------------- segment


DEFAULT_CHECKPOINT = "facebook/mask2former-swin-large-mapillary-vistas-panoptic"


class AnnotationSource(Spec):
    """COCO-panoptic ground truth: a JSON (images, annotations, categories) and its PNG folder."""

    panoptic_json: str = Field(description="URL of the COCO-panoptic JSON", json_schema_extra=PATH)
    png_dir: str = Field(description="folder of the panoptic PNGs (annotation file_name is relative to it)",
                         json_schema_extra=PATH)
    images_root: str = Field(description="folder the JSON's image file_name values are relative to",
                             json_schema_extra=PATH)


class OverlayCut(Spec):
    """Bands cut off before segmenting, as fractions of the height (GeoGuessr UI: top 0.12, bottom 0.45)."""

    top: float = Field(0.0, ge=0, lt=1, description="fraction of the height cut from the top")
    bottom: float = Field(0.0, ge=0, lt=1, description="fraction of the height cut from the bottom")

    @model_validator(mode="after")
    def _leaves_image(self) -> "OverlayCut":
        if self.top + self.bottom >= 0.95:
            raise ValueError("overlay top + bottom must leave some image (< 0.95)")
        return self


class SegmenterSpec(Spec):
    """Which segmenter makes the crops. Every field changes the output, so every field is hashed
    into the segmenter id (`tasks.segment.segmenter_id`)."""

    kind: Literal["mask2former", "annotations", "tiny-random"] = Field(
        "mask2former", description="annotations: ground-truth panoptic masks; mask2former: a checkpoint; "
        "tiny-random: an UNTRAINED random-init Mask2Former for tests and demos")
    checkpoint: str = Field(DEFAULT_CHECKPOINT, description="hub id or local directory (kind=mask2former)",
                            json_schema_extra=CHECKPOINT)
    revision: str | None = Field(None, description="hub revision (commit, tag) pinned into the segmenter id")
    label_set: str | None = Field(None, description="label->group map; default: from the checkpoint name")
    mode: Literal["panoptic", "instance"] = Field(
        "panoptic", description="panoptic: disjoint segments (stuff + things); instance: overlapping things")
    input_height: int = Field(384, ge=32, description="px; every image is resized to this before the model")
    input_width: int = Field(832, ge=32, description="px; 832x384 keeps the G50 aspect")
    score_threshold: float = Field(0.5, ge=0, le=1, description="queries scoring lower are no segment")
    mask_threshold: float = Field(0.5, ge=0, le=1, description="sigmoid(mask) above this is inside a segment")
    overlap_threshold: float = Field(0.8, ge=0, le=1, description="panoptic: drop a segment keeping less than "
                                     "this fraction of its own mask after stronger segments")
    overlay: dict[str, OverlayCut] = Field(
        default_factory=dict, description="layout (every dataset ingested with it) or dataset name -> bands to cut "
        "first; a dataset's own key wins (GeoGuessr frames: {g50: {top: 0.12, bottom: 0.45}})")
    annotations: dict[str, AnnotationSource] = Field(
        default_factory=dict, description="kind=annotations: dataset name -> its panoptic ground truth")
    seed: int = Field(0, description="kind=tiny-random: init seed")

    def overlay_for(self, dataset: str, layout: str | None = None) -> OverlayCut | None:
        """The bands cut from a dataset's images: its own `overlay` key, else its layout's (so a G50
        copy ingested under any name gets the GeoGuessr cut), else none."""
        return self.overlay.get(dataset) or (self.overlay.get(layout) if layout else None)

    def identity(self) -> dict[str, Any]:
        # `overlay` keys once named datasets only; since they may name a layout, the same spec can cut
        # other images than before, so a spec that sets an overlay gets a new id (specs without one keep theirs).
        out = super().identity()
        if self.overlay:
            out["overlay_keys"] = "layout-or-dataset"
        return out


class CropSpec(Spec):
    """Which segments become crops, and how they are cut and encoded (hashed into the segmenter id)."""

    min_score: float = Field(0.5, ge=0, le=1, description="segments scoring lower are not cropped")
    min_area: int = Field(400, ge=1, description="px in the original image; smaller segments say little")
    max_per_label: int = Field(4, ge=1, description="largest N segments per label per image (one crowd of "
                               "cars must not outvote the road)")
    padding: float = Field(0.1, ge=0, le=2, description="context around the box, as a fraction of its size")
    padding_px: int = Field(0, ge=0, description="extra context in px")
    mask_background: bool = Field(False, description="grey out pixels outside the segment")
    format: Literal["jpeg", "webp"] = Field("jpeg", description="crop encoding in the catalog")
    quality: int = Field(90, ge=1, le=100, description="encoder quality of the crops")
    max_side: int = Field(512, ge=16, description="px; larger crops are downscaled (experts read 224)")


class RunOptions(Spec):
    """How the segmentation stage runs; none of this changes its output."""

    RUN_ONLY: ClassVar[frozenset[str]] = frozenset(
        {"device", "batch_size", "num_workers", "shard_size", "concurrent_shards"})

    device: str = Field("auto", pattern=DEVICE, description="auto | cuda | cuda:N | mps | cpu")
    batch_size: int = Field(8, ge=1, description="images per forward; halved on CUDA OOM")
    num_workers: int | None = Field(
        None, ge=0, description="reader/crop processes beside the model, alive for the whole stage run "
        "(0: read and crop in the model's thread); default: min(8, cores - 1) with a GPU, cores // 4 (at least "
        "1) on a CPU, where the model's threads take the other cores")
    shard_size: int = Field(256, ge=1, description="images per segmentation task and per commit (at 170 img/s "
                            "a 256-image shard is 1.5 s of GPU: Prefect's ~10 ms per task run is noise)")
    concurrent_shards: int = Field(2, ge=1, description="shard tasks in flight: the next shard is read and "
                                   "segmented while the previous one commits (they share one model)")

    def workers_for(self, device_type: str) -> int:
        return loader_workers(self.num_workers, device_type, cpu_default=max(1, (os.cpu_count() or 2) // 4))


# ---------------------------------------------------------------- train-experts


EXPERT_CHECKPOINT = "google/vit-base-patch16-224-in21k"
TINY = "tiny-random"  # checkpoint value of the UNTRAINED tiny ViT


class TrainSpec(Spec):
    """Flow `train-experts`: which experts, on which crops, and how. Everything except the RUN_ONLY
    knobs is hashed into the run id, so a change trains new experts."""

    RUN_ONLY: ClassVar[frozenset[str]] = frozenset({"device", "num_workers", "baseline_shard_size",
                                                    "allow_untrained"})
    ADDED_LATER: ClassVar[frozenset[str]] = frozenset({"grad_clip", "min_countries"})

    checkpoint: str = Field(EXPERT_CHECKPOINT, description="hub id or local directory to fine-tune from "
                            "(ViT), or `tiny-random` for an UNTRAINED tiny ViT (tests, demo)",
                            json_schema_extra=CHECKPOINT)
    tiny_image_size: int = Field(32, ge=8, description="px; input size of the tiny-random ViT")
    segmenter: str | None = Field(None, description="segmenter id whose crops to train on; default: the "
                                  "latest segmenter with train crops that is not UNTRAINED")
    allow_untrained: bool = Field(False, description="let the default segmenter be an UNTRAINED one (its crops "
                                  "are noise): for demos and tests only")
    datasets: list[str] | None = Field(None, description="training datasets; default: every dataset with train crops")
    groups: list[str] = Field(list(GROUPS), description="one expert per feature group")
    baseline: bool = Field(True, description="also train the whole-image baseline (pseudo-group `image`)")
    random_crops: bool = Field(False, description="ablation: an expert on random crops matched in number and "
                               "size to each image's feature crops (pseudo-group `random`)")
    baseline_shard_size: int = Field(256, ge=1, le=100_000, description="images per whole-image / random-crop "
                                     "task (raise it for millions of images: fewer tasks and files)")
    min_crops_per_country: int = Field(10, ge=1, description="countries with fewer train crops are left out "
                                       "of that expert's head, and reported")
    min_countries: int = Field(2, ge=2, description="a group with fewer countries left (or no val crops) is "
                               "refused, not trained: its expert would learn nothing")
    balance: Literal["none", "sqrt", "inverse"] = Field(
        "sqrt", description="class-balanced sampling: repeat factor ~ count^-1/2 (sqrt) or count^-1 (inverse)")
    epochs: int = Field(3, ge=1, description="passes over the train crops")
    max_steps: int | None = Field(None, ge=1, description="debug: stop after this many optimizer steps")
    max_train_samples: int | None = Field(None, ge=1, description="debug: a fixed random subset of train crops")
    batch_size: int = Field(32, ge=1, description="crops per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(5e-5, gt=0, description="AdamW peak learning rate")
    weight_decay: float = Field(0.05, ge=0, description="AdamW decoupled weight decay")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="fraction of the steps with linear warmup")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="cross-entropy label smoothing")
    grad_clip: float = Field(1.0, gt=0, description="max global gradient norm per step (fine-tuning stability)")
    eval_every: int | None = Field(None, ge=1, description="optimizer steps between val evaluations "
                                   "(and resumable checkpoints); default: once per epoch")
    patience: int = Field(3, ge=1, description="early stopping: evaluations without a better val accuracy")
    shuffle_buffer: int = Field(1024, ge=1, description="crops per loader worker shuffled together")
    seed: int = Field(0, description="data order, augmentation and init of new heads")
    device: str = Field("auto", pattern=DEVICE, description="auto | cuda | cuda:N | mps | cpu")
    num_workers: int | None = Field(None, ge=0, description="loader processes decoding crops (train and val); "
                                    "default: 1 on CPU, min(8, cores - 1) with a GPU")

    @model_validator(mode="after")
    def _known_groups(self) -> "TrainSpec":
        unknown = sorted(set(self.groups) - set(GROUPS))
        if unknown:
            raise ValueError(f"groups: unknown {unknown}; expected some of {list(GROUPS)}")
        return self

    def workers_for(self, device_type: str) -> int:
        return loader_workers(self.num_workers, device_type, cpu_default=1)


# ---------------------------------------------------------------- evaluate


class EvalSpec(Spec):
    """Flow `evaluate`: which experts, on which test sets, and how."""

    RUN_ONLY: ClassVar[frozenset[str]] = frozenset({"device", "batch_size", "benchmarks", "num_workers",
                                                    "allow_untrained"})
    ADDED_LATER: ClassVar[frozenset[str]] = frozenset({"experts"})

    datasets: list[str] | None = Field(None, description="datasets whose test split to evaluate; default: all")
    segmenter: str | None = Field(None, description="segmenter id; default: the segmenter of the latest "
                                  "registered experts that segmented every evaluated dataset")
    experts_run: str | None = Field(None, description="a `run_id` of the experts view; default: the latest "
                                    "expert per group for the segmenter")
    experts: list[str] | None = Field(None, description="`expert_id`s to use (one per group); default: the latest "
                                      "expert per group for the segmenter")
    allow_untrained: bool = Field(False, description="let the default experts be UNTRAINED ones (random-init start "
                                  "or segmenter): for demos and tests only")
    benchmarks: list[str] = Field(["im2gps", "im2gps3k", "demo-im2gps"],
                                  description="datasets reported in the Table-2 (held-out benchmark) shape")
    batch_size: int = Field(64, ge=1, description="crops per expert forward")
    bootstrap: int = Field(1000, ge=0, description="bootstrap resamples for the 95% CIs")
    seed: int = Field(0, description="bootstrap resampling seed")
    device: str = Field("auto", pattern=DEVICE, description="auto | cuda | cuda:N | mps | cpu")
    num_workers: int | None = Field(None, ge=0, description="loader processes decoding test crops; default: "
                                    "0 on CPU, min(8, cores - 1) with a GPU")

    def workers_for(self, device_type: str) -> int:
        return loader_workers(self.num_workers, device_type, cpu_default=0)


class RetrainSpec(Spec):
    """Emit `geofeat.features.added` after a build that added at least `min_new_features` crops; the
    trigger of deployment `train-experts/<deployment>` (prefect.yaml) listens for it."""

    deployment: str = Field("vit-b16", description="the train-experts deployment whose trigger should fire")
    min_new_features: int = Field(1000, ge=1, description="fewer new crops (a no-op run: 0) emit nothing")
