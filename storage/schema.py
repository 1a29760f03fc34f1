"""Arrow schemas of every catalog table, defined once.

Parquet shards are the source of truth; DuckDB views (storage/catalog.py) read them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa

TS = pa.timestamp("us", tz="UTC")

IMAGES = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),  # sha256 of the file bytes (hex)
        pa.field("dataset", pa.string(), nullable=False),
        # Split assigned at ingest (hash of image_id or dataset policy). The `images`
        # view resolves one split per image_id across datasets (test > val > train).
        pa.field("split", pa.string(), nullable=False),
        pa.field("country", pa.string(), nullable=False),  # ISO 3166-1 alpha-2
        pa.field("country_name", pa.string(), nullable=False),
        pa.field("continent", pa.string(), nullable=False),
        pa.field("lat", pa.float64()),  # degrees, WGS84; null when the source has none
        pa.field("lon", pa.float64()),
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),  # px, after EXIF orientation
        pa.field("height", pa.int32(), nullable=False),  # px
        pa.field("format", pa.string(), nullable=False),  # PIL format: JPEG, PNG, WEBP, ...
        pa.field("size_bytes", pa.int64(), nullable=False),
        pa.field("source_mtime", pa.float64()),  # s since epoch, as listed by fsspec
        pa.field("ingested_at", TS, nullable=False),
    ]
)

QUARANTINE = pa.schema(
    [
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),  # ingest | segment: which stage refused it
        pa.field("reason", pa.string(), nullable=False),  # one of tasks.validate.REASONS
        pa.field("detail", pa.string(), nullable=False),
        pa.field("size_bytes", pa.int64()),
        pa.field("source_mtime", pa.float64()),
        pa.field("seen_at", TS, nullable=False),
    ]
)

# A crop is stored as the Hugging Face `datasets.Image` struct {bytes, path}: DuckDB, polars
# and pyarrow read it as a struct, `datasets` decodes it with .cast_column("crop", Image()).
CROP = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])

FEATURES = pa.schema(
    [
        pa.field("feature_id", pa.string(), nullable=False),  # sha256(segmenter, image_id, label, rank)[:24]
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),  # the image's split; a crop never has its own
        pa.field("country", pa.string(), nullable=False),
        pa.field("label", pa.string(), nullable=False),  # the segmenter's class name
        pa.field("group", pa.string(), nullable=False),  # ground | structure | vegetation | vehicle | furniture
        pa.field("score", pa.float32(), nullable=False),  # 0..1; 1 for ground-truth annotations
        pa.field("bbox", pa.list_(pa.int32(), 4), nullable=False),  # x0, y0, x1, y1 px in the original image
        pa.field("area", pa.int64(), nullable=False),  # px of the segment in the original image
        pa.field("crop", CROP, nullable=False),
        pa.field("crop_width", pa.int32(), nullable=False),  # px
        pa.field("crop_height", pa.int32(), nullable=False),  # px
        pa.field("segmenter", pa.string(), nullable=False),  # checkpoint@revision-<params hash>
        pa.field("untrained", pa.bool_(), nullable=False),  # True: random-init demo model, crops are noise
        pa.field("created_at", TS, nullable=False),
    ]
)

# One row per (image, segmenter): what segmentation did with it, crops or not.
SEGMENTATIONS = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("segmenter", pa.string(), nullable=False),
        # ok | no_crops | no_annotation | quarantined | error (error: planned again next run)
        pa.field("status", pa.string(), nullable=False),
        pa.field("crops", pa.int32(), nullable=False),
        pa.field("created_at", TS, nullable=False),
    ]
)

# One row per trained expert (flow `train-experts`); the weights live at `uri` (safetensors).
EXPERTS = pa.schema(
    [
        pa.field("expert_id", pa.string(), nullable=False),  # <run_id>/<group>
        pa.field("run_id", pa.string(), nullable=False),  # hash of the resolved config + feature snapshot
        pa.field("group", pa.string(), nullable=False),  # a feature group, or `image` / `random` (baselines)
        pa.field("segmenter", pa.string(), nullable=False),  # whose crops it was trained on
        pa.field("uri", pa.string(), nullable=False),  # checkpoint directory (from_pretrained-able)
        pa.field("base_checkpoint", pa.string(), nullable=False),  # what fine-tuning started from
        pa.field("labels", pa.list_(pa.string()), nullable=False),  # ISO alpha-2, in head order
        pa.field("snapshot", pa.string(), nullable=False),  # hash of the (feature_id, country, split) rows trained on
        pa.field("train_crops", pa.int64(), nullable=False),
        pa.field("val_crops", pa.int64(), nullable=False),
        pa.field("steps", pa.int64(), nullable=False),
        pa.field("val_accuracy", pa.float64()),  # crop-level, best checkpoint; null without val crops
        pa.field("untrained", pa.bool_(), nullable=False),  # True: random-init start (tests, demo)
        pa.field("metrics", pa.string(), nullable=False),  # JSON: curves, dropped countries, wall time
        pa.field("config", pa.string(), nullable=False),  # JSON: the resolved training config
        pa.field("created_at", TS, nullable=False),
    ]
)

# One row per (evaluation, image, method): flow `evaluate`.
PREDICTIONS = pa.schema(
    [
        pa.field("eval_id", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("method", pa.string(), nullable=False),  # majority | logprob | learned | expert:<group> | ...
        pa.field("country", pa.string(), nullable=False),  # truth, ISO alpha-2
        pa.field("predicted", pa.string()),  # null: the method had nothing to go on for this image
        pa.field("topk", pa.list_(pa.string()), nullable=False),
        pa.field("topk_score", pa.list_(pa.float32()), nullable=False),  # logprob/learned: probabilities; majority, expert:*: vote shares
        pa.field("crops", pa.int32(), nullable=False),  # crops that voted
        pa.field("fallback", pa.bool_(), nullable=False),  # True: no crops, the whole-image baseline answered
        pa.field("created_at", TS, nullable=False),
    ]
)

# One row per (evaluation, dataset, method, metric), with a 95% bootstrap CI over images.
METRICS = pa.schema(
    [
        pa.field("eval_id", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("method", pa.string(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),  # top1 | top5 | continent | coverage | within_2500km | ...
        pa.field("value", pa.float64()),
        pa.field("ci_low", pa.float64()),
        pa.field("ci_high", pa.float64()),
        pa.field("n", pa.int64(), nullable=False),  # images the value is over
        pa.field("untrained", pa.bool_(), nullable=False),  # True: some expert started from random init
        pa.field("created_at", TS, nullable=False),
    ]
)

TABLES: dict[str, pa.Schema] = {
    "images": IMAGES,
    "quarantine": QUARANTINE,
    "features": FEATURES,
    "segmentations": SEGMENTATIONS,
    "experts": EXPERTS,
    "predictions": PREDICTIONS,
    "metrics": METRICS,
}


def to_table(rows: Iterable[Mapping[str, Any]], schema: pa.Schema) -> pa.Table:
    """Build a table from row dicts; missing or extra keys are an error, not a silent null."""
    rows = list(rows)
    names = set(schema.names)
    for row in rows:
        if set(row) != names:
            missing, extra = names - set(row), set(row) - names
            raise ValueError(f"row does not match schema: missing={sorted(missing)} extra={sorted(extra)}")
    return pa.Table.from_pylist(rows, schema=schema)
