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

TABLES: dict[str, pa.Schema] = {
    "images": IMAGES,
    "quarantine": QUARANTINE,
    "features": FEATURES,
    "segmentations": SEGMENTATIONS,
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
