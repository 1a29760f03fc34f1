"""Typed flow parameters. prefect.yaml parameter blocks load into these (tests check it).

Every field is validated when the model is built; errors name the field and the fix.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.demo_world import DemoWorldSpec
from tasks.validate import MAX_PIXELS

Layout = Literal["g50", "g3", "im2gps", "osv5m"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo in prefect.yaml is an error, not ignored


class SplitConfig(_Strict):
    """How a dataset's images are split. `hash`: from the image's sha256, stable forever."""

    policy: Literal["hash", "train", "val", "test"] = Field("hash", description="hash, or put every image in one split")
    train: float = Field(0.8, ge=0, le=1, description="fraction in train (policy=hash)")
    val: float = Field(0.1, ge=0, le=1, description="fraction in val; test gets the rest")

    @model_validator(mode="after")
    def _fractions(self) -> "SplitConfig":
        if self.train + self.val > 1 + 1e-9:
            raise ValueError(f"split.train + split.val = {self.train + self.val:.3f} > 1; lower one of them")
        return self


# Benchmarks are held out whole: every IM2GPS image is a test image.
DEFAULT_SPLIT = {"im2gps": SplitConfig(policy="test")}


class SourceSpec(_Strict):
    """One dataset to ingest."""

    layout: Layout = Field(description="g50 | g3 | im2gps | osv5m")
    source: str = Field(description="URL: a folder (g50, g3) or a CSV (g3 manifest, im2gps, osv5m)")
    images: str | None = Field(None, description="image folder for CSV layouts; default: next to the CSV")
    dataset: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$", description="catalog name, e.g. g50")
    split: SplitConfig | None = Field(None, description="default: hash 80/10/10; im2gps: all test")

    def resolved_split(self) -> SplitConfig:
        return self.split or DEFAULT_SPLIT.get(self.layout, SplitConfig())


class IngestOptions(_Strict):
    shard_size: int = Field(256, ge=1, le=100_000, description="images per shard task")
    max_pixels: int = Field(MAX_PIXELS, ge=1, description="larger images are decompression bombs (px)")
    max_bytes: int = Field(256 * 2**20, ge=1, description="larger files are quarantined unread (bytes)")
    mode: Literal["incremental", "overwrite"] = Field(
        "incremental", description="incremental: only new files; overwrite: drop the dataset and redo it"
    )


class DemoSpec(_Strict):
    """The embedded demo world (tasks/demo_world.py), generated under the data root."""

    seed: int = 0
    countries: int = Field(6, ge=1, le=8)
    per_country: int = Field(40, ge=1, description="G50-layout images per country")
    heldout_per_country: int = Field(8, ge=0, description="IM2GPS-style held-out images per country")
    width: int = Field(384, ge=64, description="px; G50 frames are 1536x662, same aspect")
    height: int = Field(166, ge=32, description="px")
    messy: bool = Field(True, description="include a few bad inputs, to show the quarantine at work")
    out: str | None = Field(None, description="where to write it; default <data root>/demo-world")

    def world_spec(self) -> DemoWorldSpec:
        return DemoWorldSpec(**self.model_dump(exclude={"out"}))

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
            "demo-im2gps": AnnotationSource(panoptic_json=f"{world}/panoptic/im2gps.json", png_dir=f"{world}/panoptic/im2gps",
                                            images_root=f"{world}/im2gps/images"),
        }


DEFAULT_CHECKPOINT = "facebook/mask2former-swin-large-mapillary-vistas-panoptic"


class AnnotationSource(_Strict):
    """COCO-panoptic ground truth: a JSON (images, annotations, categories) and its PNG folder."""

    panoptic_json: str = Field(description="URL of the COCO-panoptic JSON")
    png_dir: str = Field(description="folder of the panoptic PNGs (annotation file_name is relative to it)")
    images_root: str = Field(description="folder the JSON's image file_name values are relative to")


class OverlayCut(_Strict):
    """Bands cut off before segmenting, as fractions of the height (GeoGuessr UI: top 0.12, bottom 0.45)."""

    top: float = Field(0.0, ge=0, lt=1)
    bottom: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _leaves_image(self) -> "OverlayCut":
        if self.top + self.bottom >= 0.95:
            raise ValueError("overlay top + bottom must leave some image (< 0.95)")
        return self


class SegmenterSpec(_Strict):
    """Which segmenter makes the crops. Everything that changes its output is hashed into its id."""

    kind: Literal["mask2former", "annotations", "tiny-random"] = Field(
        "mask2former", description="annotations: ground-truth panoptic masks; mask2former: a checkpoint; "
        "tiny-random: an UNTRAINED random-init Mask2Former for tests and demos")
    checkpoint: str = Field(DEFAULT_CHECKPOINT, description="hub id or local directory (kind=mask2former)")
    revision: str | None = Field(None, description="hub revision (commit, tag) pinned into the segmenter id")
    label_set: str | None = Field(None, description="label->group map; default: from the checkpoint name")
    mode: Literal["panoptic", "instance"] = "panoptic"
    input_height: int = Field(384, ge=32, description="px; every image is resized to this before the model")
    input_width: int = Field(832, ge=32, description="px; 832x384 keeps the G50 aspect")
    score_threshold: float = Field(0.5, ge=0, le=1)
    mask_threshold: float = Field(0.5, ge=0, le=1)
    overlap_threshold: float = Field(0.8, ge=0, le=1)
    overlay: dict[str, OverlayCut] = Field(
        default_factory=dict, description="dataset name -> bands to cut first (G50: {top: 0.12, bottom: 0.45})")
    annotations: dict[str, AnnotationSource] = Field(
        default_factory=dict, description="kind=annotations: dataset name -> its panoptic ground truth")
    seed: int = Field(0, description="kind=tiny-random: init seed")


class CropSpec(_Strict):
    """Which segments become crops, and how they are cut and encoded."""

    min_score: float = Field(0.5, ge=0, le=1)
    min_area: int = Field(400, ge=1, description="px in the original image")
    max_per_label: int = Field(4, ge=1, description="largest N segments per label per image")
    padding: float = Field(0.1, ge=0, le=2, description="context around the box, as a fraction of its size")
    padding_px: int = Field(0, ge=0, description="extra context in px")
    mask_background: bool = Field(False, description="grey out pixels outside the segment")
    format: Literal["jpeg", "webp"] = "jpeg"
    quality: int = Field(90, ge=1, le=100)
    max_side: int = Field(512, ge=16, description="px; larger crops are downscaled (experts read 224)")


class RunOptions(_Strict):
    """How the segmentation stage runs; none of this changes its output."""

    device: str = Field("auto", description="auto | cuda | mps | cpu")
    batch_size: int = Field(8, ge=1, description="images per forward; halved on CUDA OOM")
    num_workers: int | None = Field(
        None, ge=0, description="DataLoader processes decoding ahead of the model; default: 0 on CPU "
        "(they would only steal the model's cores), min(8, cores - 1) with a GPU")
    shard_size: int = Field(128, ge=1, description="images per segmentation task")
    concurrent_shards: int = Field(1, ge=1, description="shard tasks in flight (they share one model)")
    encode_threads: int = Field(2, ge=1, description="threads encoding crops off the model's path")

    def workers_for(self, device_type: str) -> int:
        if self.num_workers is not None:
            return self.num_workers
        return 0 if device_type == "cpu" else max(1, min(8, (os.cpu_count() or 2) - 1))


EXPERT_CHECKPOINT = "google/vit-base-patch16-224-in21k"


class TrainSpec(_Strict):
    """Flow `train-experts`: which experts, on which crops, and how. Everything here except the
    `device`/`num_workers` knobs is hashed into the run id, so a change trains new experts."""

    checkpoint: str = Field(EXPERT_CHECKPOINT, description="hub id or local directory to fine-tune from "
                            "(ViT), or `tiny-random` for an UNTRAINED tiny ViT (tests, demo)")
    tiny_image_size: int = Field(32, ge=8, description="px; input size of the tiny-random ViT")
    segmenter: str | None = Field(None, description="segmenter id whose crops to train on; default: the "
                                  "latest segmenter with train crops")
    datasets: list[str] | None = Field(None, description="training datasets; default: every dataset with train crops")
    groups: list[str] = Field(["ground", "structure", "vegetation", "vehicle", "furniture"],
                              description="one expert per feature group")
    baseline: bool = Field(True, description="also train the whole-image baseline (pseudo-group `image`)")
    random_crops: bool = Field(False, description="ablation: an expert on random crops matched in number and "
                               "size to each image's feature crops (pseudo-group `random`)")
    baseline_shard_size: int = Field(256, ge=1, le=100_000, description="images per whole-image / random-crop "
                                     "task (raise it for millions of images: fewer tasks and files)")
    min_crops_per_country: int = Field(10, ge=1, description="countries with fewer train crops are left out "
                                       "of that expert's head, and reported")
    balance: Literal["none", "sqrt", "inverse"] = Field(
        "sqrt", description="class-balanced sampling: repeat factor ~ count^-1/2 (sqrt) or count^-1 (inverse)")
    epochs: int = Field(3, ge=1)
    max_steps: int | None = Field(None, ge=1, description="debug: stop after this many optimizer steps")
    max_train_samples: int | None = Field(None, ge=1, description="debug: a fixed random subset of train crops")
    batch_size: int = Field(32, ge=1)
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="fraction of the steps with linear warmup")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    eval_every: int | None = Field(None, ge=1, description="optimizer steps between val evaluations "
                                   "(and resumable checkpoints); default: once per epoch")
    patience: int = Field(3, ge=1, description="early stopping: evaluations without a better val accuracy")
    shuffle_buffer: int = Field(1024, ge=1, description="crops per loader worker shuffled together")
    seed: int = 0
    device: str = Field("auto", description="auto | cuda | mps | cpu")
    num_workers: int | None = Field(None, ge=0, description="loader processes decoding crops; default: 1 on "
                                    "CPU, min(8, cores - 1) with a GPU")

    @model_validator(mode="after")
    def _known_groups(self) -> "TrainSpec":
        from models.labels import GROUPS

        unknown = sorted(set(self.groups) - set(GROUPS))
        if unknown:
            raise ValueError(f"groups: unknown {unknown}; expected some of {list(GROUPS)}")
        return self

    def workers_for(self, device_type: str) -> int:
        if self.num_workers is not None:
            return self.num_workers
        return 1 if device_type == "cpu" else max(1, min(8, (os.cpu_count() or 2) - 1))

    def identity(self) -> dict:
        """What decides the experts' weights (not where or how fast they train)."""
        return self.model_dump(exclude={"device", "num_workers", "baseline_shard_size"})


class EvalSpec(_Strict):
    """Flow `evaluate`: which experts, on which test sets, and how."""

    datasets: list[str] | None = Field(None, description="datasets whose test split to evaluate; default: all")
    segmenter: str | None = Field(None, description="default: the segmenter of the latest registered experts")
    experts_run: str | None = Field(None, description="a `run_id` of the experts view; default: the latest "
                                    "expert per group for the segmenter")
    benchmarks: list[str] = Field(["im2gps", "im2gps3k", "demo-im2gps"],
                                  description="datasets reported in the Table-2 (held-out benchmark) shape")
    batch_size: int = Field(64, ge=1)
    bootstrap: int = Field(1000, ge=0, description="bootstrap resamples for the 95% CIs")
    seed: int = 0
    device: str = "auto"


class RetrainSpec(_Strict):
    """Emit `geofeat.features.added` after a build that added at least `min_new_features` crops; the
    trigger of deployment `train-experts/<deployment>` (prefect.yaml) listens for it."""

    deployment: str = Field("default", description="the train-experts deployment whose trigger should fire")
    min_new_features: int = Field(1000, ge=1, description="fewer new crops (a no-op run: 0) emit nothing")


class RunnerSpec(_Strict):
    """Where a flow's tasks run (flows/runner.py, docs/dask.md); none of this changes the output.

    `thread`: Prefect's thread pool in the flow's process (the default). `dask`: a Dask cluster
    through prefect-dask: a running scheduler (`address`), a cluster of `cluster_class` started for
    the run (dask-kubernetes, dask-jobqueue), or else a LocalCluster of `workers` processes.
    """

    kind: Literal["thread", "dask"] = Field("thread", description="thread: Prefect's thread pool; dask: prefect-dask")
    address: str | None = Field(None, pattern=r"^\S+$", description="scheduler of a running Dask cluster, "
                                "e.g. tcp://10.0.0.5:8786 (its workers need this project and PREFECT_API_URL)")
    cluster_class: str | None = Field(
        None, pattern=r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$", description="import path of a cluster class started "
        "for the run, e.g. dask_jobqueue.SLURMCluster or dask_kubernetes.operator.KubeCluster")
    cluster_kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of "
                                           "cluster_class (or of the LocalCluster, e.g. memory_limit)")
    adapt: dict[str, int] | None = Field(None, description="adaptive scaling of a cluster started for the run: "
                                         "cluster.adapt(**adapt), e.g. {minimum: 0, maximum: 20}")
    workers: int | None = Field(None, ge=1, description="LocalCluster worker processes; default: Dask's (per core)")
    threads_per_worker: int = Field(1, ge=1, description="LocalCluster threads per worker process")
    worker_resources: dict[str, float] | None = Field(
        None, description="resources every LocalCluster worker offers; default {<gpu_resource>: <gpu_amount>}: "
        "local workers share this machine's GPU (the `gpu` concurrency slot still guards it)")
    gpu_resource: str | None = Field("GPU", pattern=r"^[A-Za-z_][\w.-]*$", description="Dask resource that "
                                     "segmentation and training tasks need; null: they run on any worker")
    gpu_amount: float = Field(1, gt=0, description="how much of gpu_resource one such task takes")
    worker_timeout: float = Field(60, gt=0, description="s to wait for a worker offering gpu_resource before "
                                  "failing (raise it while batch jobs queue)")

    @model_validator(mode="after")
    def _consistent(self) -> "RunnerSpec":
        if self.kind == "thread":
            unused = sorted(self.model_fields_set - {"kind"})
            if unused:
                raise ValueError(f"runner.{unused[0]}: only used with kind: dask; set kind: dask or drop it")
            return self
        if "asynchronous" in self.cluster_kwargs:
            raise ValueError("runner.cluster_kwargs.asynchronous: prefect-dask manages it; remove it")
        if self.address and self.cluster_class:
            raise ValueError("runner.cluster_class: give `address` (a running cluster) or `cluster_class` "
                             "(one started for the run), not both")
        if self.address or self.cluster_class:
            given = "address" if self.address else "cluster_class"
            local = sorted(self.model_fields_set & {"workers", "threads_per_worker", "worker_resources"})
            if local:
                raise ValueError(f"runner.{local[0]}: configures the LocalCluster only; with `{given}` the "
                                 "workers are configured where they start (cluster_kwargs, `dask worker` options)")
            if self.address and (self.cluster_kwargs or self.adapt):
                raise ValueError(f"runner.{'adapt' if self.adapt else 'cluster_kwargs'}: unused with `address` "
                                 "(a running cluster is configured where it runs)")
            return self
        for key, field in (("n_workers", "workers"), ("threads_per_worker", "threads_per_worker"),
                           ("resources", "worker_resources")):
            if key in self.cluster_kwargs:
                raise ValueError(f"runner.cluster_kwargs.{key}: set runner.{field} instead")
        if self.gpu_resource and self.worker_resources is not None \
                and self.worker_resources.get(self.gpu_resource, 0) < self.gpu_amount:
            raise ValueError(f"runner.worker_resources: offers no {self.gpu_resource}={self.gpu_amount:g}, so "
                             f"segmentation and training could never run; add it or set gpu_resource: null")
        return self
