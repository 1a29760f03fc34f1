"""Atomic shard writes and completion records.

A shard counts as done only when its completion record exists. Files are written to a
temporary name and renamed; the record is written last. A crash at any point leaves
either nothing visible or files without a record, which a rerun overwrites with the
same deterministic content.

Every storage operation (temp write, rename, record write, record read) is retried on
transient errors with a short exponential backoff (`retry_io`); the shard task's own
retries are the second line.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import posixpath
import random
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq

from storage.layout import DataRoot

log = logging.getLogger(__name__)

ROW_GROUP_SIZE = 128 * 1024  # rows; metadata tables are narrow, so large groups scan fast
IO_ATTEMPTS = 5  # tries per storage operation
IO_BACKOFF_S = (0.05, 2.0)  # first delay, cap; doubled after each failed try (with jitter)

# Transient: an I/O fault or a network/store hiccup that a retry may get past. Anything else an
# OSError can say (a missing file, a permission, a full disk, a symlink loop, a FIFO or device where
# a file was expected, a bad argument) is permanent: retrying it only hangs or fails a whole shard.
TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.EBUSY, errno.EINTR, errno.ETIMEDOUT, errno.ECONNRESET,
                    errno.ECONNABORTED, errno.ECONNREFUSED, errno.EPIPE, errno.ENETDOWN, errno.ENETUNREACH,
                    errno.ENETRESET, errno.EHOSTDOWN, errno.EHOSTUNREACH, errno.ESTALE, errno.ENOBUFS,
                    *(e for e in (getattr(errno, "EREMOTEIO", None), getattr(errno, "ECOMM", None)) if e)}
PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                       FileExistsError)


def is_transient(exc: BaseException) -> bool:
    """A transient I/O error (network, timeout, flaky store) that a retry may get past.

    TimeoutError and ConnectionError are; an OSError is when its errno is an I/O or network fault
    (TRANSIENT_ERRNOS), or when it has no errno at all (object-store clients raise those for
    failed requests). ELOOP, ENXIO, EINVAL, ENOSPC, ... are not."""
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    if not isinstance(exc, OSError) or isinstance(exc, PERMANENT_OS_ERRORS):
        return False
    return exc.errno is None or exc.errno in TRANSIENT_ERRNOS


def retry_io(op, *args, what: str, **kwargs):
    """`op(*args, **kwargs)`, retried up to IO_ATTEMPTS times on transient errors."""
    delay = IO_BACKOFF_S[0]
    for attempt in range(1, IO_ATTEMPTS + 1):
        try:
            return op(*args, **kwargs)
        except Exception as exc:
            if attempt == IO_ATTEMPTS or not is_transient(exc):
                raise
            log.warning("%s: %s: %s; retry %d/%d", what, type(exc).__name__, exc, attempt, IO_ATTEMPTS - 1)
            time.sleep(delay * random.uniform(0.5, 1.0))  # jitter: parallel writers do not retry in step
            delay = min(2 * delay, IO_BACKOFF_S[1])


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


def writer_alive(tmp_name: str) -> bool:
    """Temp names carry the writer's pid (`.tmp-<pid>-<rand>`); another live writer's file stays."""
    try:
        pid = int(tmp_name.rsplit(".tmp-", 1)[1].split("-", 1)[0])
        os.kill(pid, 0)
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _sweep_dead_temps(fs, folder: str, name: str) -> None:
    fs.makedirs(folder, exist_ok=True)
    try:
        entries = fs.ls(folder, detail=False)
    except FileNotFoundError:  # an object store has no empty folders: nothing to sweep
        return
    for entry in entries:
        base = posixpath.basename(entry)
        if base.startswith(f"{name}.tmp-") and not writer_alive(base):
            fs.rm(entry)


def _discard(fs, tmp: str) -> None:
    """Remove a temp file, best effort: a leftover is invisible and swept by the next writer."""
    try:
        retry_io(lambda: fs.exists(tmp) and fs.rm(tmp), what=f"remove {tmp}")
    except Exception as exc:  # noqa: BLE001 - the original error matters more
        log.warning("could not remove %s: %s", tmp, exc)


def _write_temp(fs, tmp: str, write) -> int:
    """One attempt: write the whole temp file; a failed attempt removes what it wrote."""
    try:
        with fs.open(tmp, "wb") as f:
            write(f)
            size = f.tell()
    except BaseException:
        _discard(fs, tmp)
        raise
    return size


def _rename(fs, tmp: str, path: str, size: int) -> None:
    """Move the temp file into place, retried; idempotent, as a failed try may have moved it
    before failing (a lost reply): then the temp is gone and `path` has its size."""
    tried = False

    def attempt() -> None:
        nonlocal tried
        if tried and not fs.exists(tmp) and fs.exists(path) and fs.size(path) == size:
            return
        tried = True
        fs.mv(tmp, path)

    retry_io(attempt, what=f"rename to {path}")


def atomic_write(root: DataRoot, path: str, write) -> None:
    """Write via `write(fileobj)` to a temp name next to `path`, then rename into place.

    `write` may be called more than once (each try starts a fresh temp file). Temp files
    left by a killed writer (its pid is gone) are removed; a concurrent live writer's temp
    file is left alone. On failure nothing is left at `path` or in a temp file."""
    fs = root.fs
    folder, name = posixpath.split(path)
    retry_io(_sweep_dead_temps, fs, folder, name, what=f"prepare {folder}")
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    size = retry_io(_write_temp, fs, tmp, write, what=f"write {tmp}")
    try:
        _rename(fs, tmp, path, size)
    except BaseException:
        _discard(fs, tmp)
        raise


def write_parquet_atomic(root: DataRoot, table: pa.Table, path: str) -> None:
    atomic_write(
        root,
        path,
        lambda f: pq.write_table(table, f, compression="zstd", row_group_size=ROW_GROUP_SIZE),
    )


def is_committed(root: DataRoot, stage: str, dataset: str, shard_id: str) -> bool:
    return any(retry_io(root.fs.exists, path, what=f"check {path}")
               for path in root.commit_paths(stage, dataset, shard_id))


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
    tops = [root.path("_commits")] if stage == "*" else root.stage_dirs(stage)
    # find, not glob: a data root may contain glob characters such as [ ].
    paths = sorted(p for top in tops if fs.exists(top) for p in fs.find(top) if p.endswith(".json") and ".tmp-" not in p)
    if not paths:
        return []
    # cat_file: no glob expansion
    return [CommitRecord(**json.loads(retry_io(fs.cat_file, p, what=f"read {p}"))) for p in paths]


def parquet_footer(root: DataRoot, path: str) -> pq.FileMetaData:
    """The footer (schema, row groups) of a committed Parquet file, for `iter_row_groups(metadata=)`."""
    with root.fs.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata


def iter_row_groups(root: DataRoot, path: str, columns: list[str],
                    metadata: pq.FileMetaData | None = None) -> Iterator[pa.Table]:
    """The `columns` of a committed Parquet file, one row group at a time (bounded memory).
    `metadata`: its footer from `parquet_footer`, so a reader that comes back does not parse it again."""
    with root.fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f, metadata=metadata)
        for rg in range(pf.num_row_groups):
            yield pf.read_row_group(rg, columns=columns)


def shard_id(parts: list) -> str:
    """A deterministic shard id: the sha256 of `parts` as sorted-key JSON, 20 hex digits. Callers
    put in everything that decides the shard's content (inputs, parameters, stage version)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def drop_shards(root: DataRoot, stage: str, dataset: str) -> int:
    """Remove every shard of (stage, dataset): the completion records first, so readers never see
    half of it, then the files they listed. Returns how many shards were dropped."""
    fs = root.fs
    records = [r for r in read_commits(root, stage) if r.dataset == dataset]
    for r in records:
        fs.rm(root.commit_path(stage, dataset, r.shard_id))
    for r in records:
        for rel in (rel for rels in r.files.values() for rel in rels):
            if fs.exists(root.path(rel)):
                fs.rm(root.path(rel))
    return len(records)


@dataclass(frozen=True)
class FileAudit:
    """Shard files on disk against completion records, as paths relative to the data root."""

    on_disk: int  # Parquet files under the table folders
    listed: int  # files the completion records list
    orphans: list[str]  # on disk, in no record (a killed or failed writer's; the views ignore them)
    missing: list[tuple[str, str]]  # (file, record) listed but gone: the views cannot load


def audit_files(root: DataRoot, tables: list[str]) -> FileAudit:
    """Compare the table folders' Parquet files with the completion records, from listings alone."""
    fs = root.fs
    listed: dict[str, str] = {}  # stripped path -> the record that lists it
    for record in read_commits(root):
        for rels in record.files.values():
            for rel in rels:
                listed[fs._strip_protocol(root.path(rel))] = f"{record.stage}/{record.dataset}/{record.shard_id}"
    on_disk = set()
    for table in tables:  # find, not glob: a root may contain glob characters
        if fs.exists(top := root.path(table)):
            on_disk.update(p for p in fs.find(top) if p.endswith(".parquet"))
    base = fs._strip_protocol(root.url)
    rel = lambda path: posixpath.relpath(path, base)  # noqa: E731
    return FileAudit(on_disk=len(on_disk), listed=len(listed), orphans=[rel(p) for p in sorted(on_disk - listed.keys())],
                     missing=[(rel(p), listed[p]) for p in sorted(listed.keys() - on_disk)])
