"""Where everything lives under the data root (`GEOFEAT_HOME`, any fsspec URL)."""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from functools import cached_property

import fsspec

from storage.sources import is_local, url_fs

ENV_HOME = "GEOFEAT_HOME"
# Stages renamed after catalogs were first written: stage -> its old folder under _commits/, still
# read (a catalog keeps what it committed under the old name) and never written.
LEGACY_STAGE_DIRS = {"train-experts": "train"}
DEFAULT_HOME = "geofeat-data"  # relative to the working directory


def home_url(url: str | None = None) -> str:
    """The data root URL: the argument, else $GEOFEAT_HOME, else ./geofeat-data (made absolute)."""
    url = url or os.environ.get(ENV_HOME) or DEFAULT_HOME
    if "://" not in url:
        url = os.path.abspath(os.path.expanduser(url))
    return url.rstrip("/")


@dataclass(frozen=True)
class DataRoot:
    """Paths of the catalog under one root URL; every writer and reader goes through this."""

    url: str

    @classmethod
    def from_env(cls, url: str | None = None) -> "DataRoot":
        return cls(home_url(url))

    @cached_property
    def fs(self) -> fsspec.AbstractFileSystem:
        """Endpoint and credentials as for every URL geofeat opens (storage.sources.url_fs).

        On an object store the bucket must exist: s3fs' makedirs would otherwise create a
        bucket named by a typo in GEOFEAT_HOME."""
        fs, path = url_fs(self.url)
        split = getattr(fs, "split_path", None)  # object stores (s3fs, gcsfs, adlfs): (bucket, key, version)
        if split is not None and not fs.exists(split(path)[0]):
            raise FileNotFoundError(
                f"data root {self.url}: bucket '{split(path)[0]}' does not exist or cannot be reached with these "
                "credentials and endpoint; create it first (geofeat never creates buckets). "
                "See docs/object-storage.md")
        return fs

    @property
    def is_local(self) -> bool:
        """From the URL alone: no filesystem (and no network call) needed."""
        return is_local(self.url)

    def path(self, *parts: str) -> str:
        """A full URL (or absolute local path) under the root."""
        return posixpath.join(self.url, *parts)

    def shard_path(self, table: str, shard_id: str, **partitions: str) -> str:
        """`<table>/<key>=<value>/.../<shard_id>.parquet` (hive style, keys in the given order)."""
        return self.path(table, *(f"{k}={v}" for k, v in partitions.items()), f"{shard_id}.parquet")

    def commit_path(self, stage: str, dataset: str, shard_id: str) -> str:
        return self.path("_commits", stage, f"dataset={dataset}", f"{shard_id}.json")

    def stage_dirs(self, stage: str) -> list[str]:
        """The folders holding a stage's completion records: its own, then its legacy one (if any)."""
        return [self.path("_commits", s) for s in [stage, *([LEGACY_STAGE_DIRS[stage]] if stage in LEGACY_STAGE_DIRS else [])]]

    def commit_paths(self, stage: str, dataset: str, shard_id: str) -> list[str]:
        """Where a shard's record may be, in the folders of `stage_dirs`."""
        return [posixpath.join(d, f"dataset={dataset}", f"{shard_id}.json") for d in self.stage_dirs(stage)]

    def schema_path(self, table: str) -> str:
        """An empty Parquet file with the table's schema, so a view is valid before any data."""
        return self.path("_schema", f"{table}.parquet")

    @property
    def catalog_sql(self) -> str:
        return self.path("catalog.sql")

    @property
    def prefect_home(self) -> str:
        """PREFECT_HOME lives under the root so runs never touch ~/.prefect (local roots only)."""
        return self.path("prefect") if self.is_local else home_url(DEFAULT_HOME) + "/prefect"

    @property
    def run_dir(self) -> str:
        """Logs and PID files of `geofeat up` (local)."""
        return posixpath.join(self.prefect_home, "run")
