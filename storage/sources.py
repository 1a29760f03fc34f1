"""Reading source datasets (any fsspec URL): listings with size+mtime, bytes, CSVs."""

from __future__ import annotations

import io
import posixpath
from dataclasses import dataclass
from datetime import datetime

import fsspec
import polars as pl


@dataclass(frozen=True)
class SourceFile:
    uri: str  # full URL (absolute path for local files)
    rel: str  # path relative to the listed folder, '/'-separated
    size: int  # bytes
    mtime: float | None  # s since epoch; None where the store has no timestamp


def _mtime(info: dict) -> float | None:
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None


# Listings are never cached: a listing cached earlier in a long-lived process (a worker, a
# flow that both writes and plans) would hide objects written since, by any process.
FS_OPTIONS = {"use_listings_cache": False}


def url_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path of a URL: the one place geofeat opens a filesystem.

    Credentials and endpoints come from the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
    ...) and from fsspec's own configuration (FSSPEC_S3_ENDPOINT_URL, FSSPEC_S3='{...}', or
    ~/.config/fsspec/*.json), which fsspec applies to every filesystem it creates: see
    docs/object-storage.md."""
    return fsspec.core.url_to_fs(url, **FS_OPTIONS)


def is_local(url: str) -> bool:
    """Is `url` on the local filesystem (a plain path or file://)? From the URL alone, no I/O."""
    from fsspec.implementations.local import LocalFileSystem

    return issubclass(fsspec.get_filesystem_class(fsspec.utils.get_protocol(url)), LocalFileSystem)


def exists(url: str) -> bool:
    fs, path = url_fs(url)
    return fs.exists(path)


def is_dir(url: str) -> bool:
    fs, path = url_fs(url)
    return fs.isdir(path)


def join(url: str, *parts: str) -> str:
    return posixpath.join(url.rstrip("/"), *parts)


def parent(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[0]


def list_files(url: str) -> list[SourceFile]:
    """Every file under a folder, recursively, with size and mtime from one listing."""
    fs, root = url_fs(url)
    root = root.rstrip("/")
    out = []
    for path, info in sorted(fs.find(root, detail=True).items()):
        if info.get("type") == "directory":
            continue
        rel = posixpath.relpath(path, root)
        out.append(SourceFile(fs.unstrip_protocol(path) if "://" in url else path, rel, int(info.get("size") or 0), _mtime(info)))
    return out


def read_bytes(uri: str) -> bytes:
    fs, path = url_fs(uri)
    return fs.cat_file(path)


def read_csv(url: str) -> pl.DataFrame:
    """A CSV with every column as a string: 'NA' is Namibia, not a missing value.

    A malformed CSV is a configuration error naming the file, not a parser traceback."""
    data = read_bytes(url)
    try:
        return pl.read_csv(io.BytesIO(data), infer_schema=False)
    except pl.exceptions.PolarsError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{url}: not a readable CSV ({first}); save it as UTF-8 CSV with one header row") from exc
