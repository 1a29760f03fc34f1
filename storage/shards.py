"""Atomic shard writes and completion records.

A shard counts as done only when its completion record exists. Files are written to a
temporary name and renamed; the record is written last. A crash at any point leaves
either nothing visible or files without a record, which a rerun overwrites with the
same deterministic content.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq

from storage.layout import DataRoot

log = logging.getLogger(__name__)

ROW_GROUP_SIZE = 128 * 1024  # rows; metadata tables are narrow, so large groups scan fast


@dataclass(frozen=True)
class Output:
    """One Parquet file of a shard: a table, its hive partition values, its rows."""

    table: str
    partitions: dict[str, str]
    data: pa.Table


@dataclass
class CommitRecord:
    """What a committed shard produced; the catalog is built from these alone."""

    stage: str
    dataset: str
    shard_id: str
    files: dict[str, list[str]]  # table -> paths relative to the data root
    rows: dict[str, int]  # table -> row count
    params: dict = field(default_factory=dict)
    created_at: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, indent=1)


def _writer_alive(tmp_name: str) -> bool:
    """Temp names carry the writer's pid (`.tmp-<pid>-<rand>`); another live writer's file stays."""
    try:
        pid = int(tmp_name.rsplit(".tmp-", 1)[1].split("-", 1)[0])
        os.kill(pid, 0)
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def atomic_write(root: DataRoot, path: str, write) -> None:
    """Write via `write(fileobj)` to a temp name next to `path`, then rename into place.

    Temp files left by a killed writer (its pid is gone) are removed; a concurrent live
    writer's temp file is left alone."""
    fs = root.fs
    folder, name = posixpath.split(path)
    fs.makedirs(folder, exist_ok=True)
    for entry in fs.ls(folder, detail=False):
        base = posixpath.basename(entry)
        if base.startswith(f"{name}.tmp-") and not _writer_alive(base):
            fs.rm(entry)
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open(tmp, "wb") as f:
            write(f)
        fs.mv(tmp, path)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


def write_parquet_atomic(root: DataRoot, table: pa.Table, path: str) -> None:
    atomic_write(
        root,
        path,
        lambda f: pq.write_table(table, f, compression="zstd", row_group_size=ROW_GROUP_SIZE),
    )


def is_committed(root: DataRoot, stage: str, dataset: str, shard_id: str) -> bool:
    return root.fs.exists(root.commit_path(stage, dataset, shard_id))


def commit_shard(
    root: DataRoot,
    stage: str,
    dataset: str,
    shard_id: str,
    outputs: list[Output],
    params: dict | None = None,
) -> CommitRecord:
    """Write each non-empty output as `<table>/<partitions>/<shard_id>.parquet`, then the record."""
    files: dict[str, list[str]] = {}
    rows: dict[str, int] = {}
    for out in outputs:
        rows[out.table] = rows.get(out.table, 0) + out.data.num_rows
        if out.data.num_rows:
            path = root.shard_path(out.table, shard_id, **out.partitions)
            write_parquet_atomic(root, out.data, path)
            files.setdefault(out.table, []).append(posixpath.relpath(path, root.url))
    record = CommitRecord(
        stage=stage,
        dataset=dataset,
        shard_id=shard_id,
        files=files,
        rows=rows,
        params=params or {},
        created_at=datetime.now(timezone.utc).isoformat(),
    )
    data = record.to_json().encode()
    atomic_write(root, root.commit_path(stage, dataset, shard_id), lambda f: f.write(data))
    log.debug("committed %s shard %s/%s: %s", stage, dataset, shard_id, rows)
    return record


def read_commits(root: DataRoot, stage: str = "*") -> list[CommitRecord]:
    """Every completion record under the root, in a stable order."""
    fs = root.fs
    top = root.path("_commits") if stage == "*" else root.path("_commits", stage)
    if not fs.exists(top):
        return []
    # find, not glob: a data root may contain glob characters such as [ ].
    paths = sorted(p for p in fs.find(top) if p.endswith(".json") and ".tmp-" not in p)
    if not paths:
        return []
    return [CommitRecord(**json.loads(fs.cat_file(p))) for p in paths]  # cat_file: no glob expansion
