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
        pa.field("reason", pa.string(), nullable=False),  # one of tasks.validate.REASONS
        pa.field("detail", pa.string(), nullable=False),
        pa.field("size_bytes", pa.int64()),
        pa.field("source_mtime", pa.float64()),
        pa.field("seen_at", TS, nullable=False),
    ]
)

TABLES: dict[str, pa.Schema] = {"images": IMAGES, "quarantine": QUARANTINE}


def to_table(rows: Iterable[Mapping[str, Any]], schema: pa.Schema) -> pa.Table:
    """Build a table from row dicts; missing or extra keys are an error, not a silent null."""
    rows = list(rows)
    names = set(schema.names)
    for row in rows:
        if set(row) != names:
            missing, extra = names - set(row), set(row) - names
            raise ValueError(f"row does not match schema: missing={sorted(missing)} extra={sorted(extra)}")
    return pa.Table.from_pylist(rows, schema=schema)
