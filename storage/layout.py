"""Where everything lives under the data root (`GEOFEAT_HOME`, any fsspec URL), and how the root is found."""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import fsspec
import yaml

from storage.sources import is_local, url_fs

ENV_HOME = "GEOFEAT_HOME"
# Stages renamed after catalogs were first written: stage -> its old folder under _commits/, still
# read (a catalog keeps what it committed under the old name) and never written.
LEGACY_STAGE_DIRS = {"train-experts": "train"}
DEFAULT_HOME = "geofeat-data"  # relative to the working directory
PROJECT_FILE = "geofeat.yaml"  # a project's config; its `home:` names the data root (relative to the file)


class ProjectFileError(ValueError):
    """A project config that cannot be read: the message names the file and the fix."""


def absolute(url: str, base: str | Path | None = None) -> str:
    """A URL as is; a local path expanded (~) and made absolute against `base` (default: the working folder)."""
    if "://" in url:
        return url.rstrip("/")
    path = os.path.expanduser(url)
    if base is not None and not os.path.isabs(path):
        path = os.path.join(str(base), path)
    return os.path.abspath(path).rstrip("/") or "/"


def find_project_file(start: str | Path | None = None) -> Path | None:
    """The nearest geofeat.yaml in `start` (default: the working folder) or a folder above it."""
    here = Path(start or os.getcwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / PROJECT_FILE).is_file():
            return folder / PROJECT_FILE
    return None


def project_home(path: str | Path) -> str | None:
    """The `home:` of a config file, absolute (relative to the file's folder); None when it names none."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ProjectFileError(f"{path}: cannot read it ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                               "fix the YAML or remove the file") from exc
    if not isinstance(data, dict):
        raise ProjectFileError(f"{path}: expected a mapping of keys (home:, build-feature-datasets:, ...)")
    home = data.get("home")
    if home is None:
        return None
    if not isinstance(home, str) or not home.strip():
        raise ProjectFileError(f"{path}: `home` must be a folder or URL, not {home!r}")
    return absolute(home, path.parent)


def find_home(url: str | None = None, config: str | Path | None = None) -> tuple[str, str]:
    """(data root URL, how it was found): the argument; else $GEOFEAT_HOME; else the `home:` of the
    config file given (`--config`); else of the nearest geofeat.yaml in or above the working folder;
    else ./geofeat-data. Nothing is created here."""
    if url:
        return absolute(url), "given"
    if os.environ.get(ENV_HOME):
        return absolute(os.environ[ENV_HOME]), f"${ENV_HOME}"
    for path in ([Path(config)] if config else []) + [p for p in [find_project_file()] if p]:
        home = project_home(path)
        if home:
            return home, f"home: in {path}"
    return absolute(DEFAULT_HOME), (f"the default ./{DEFAULT_HOME}: no ${ENV_HOME} and no {PROJECT_FILE} "
                                    "with a home: in this folder or above")


def home_url(url: str | None = None) -> str:
    """The data root URL (see `find_home`), made absolute."""
    return find_home(url)[0]


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
