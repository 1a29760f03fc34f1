"""Atomic publishing of whole folders and small files: checkpoint directories, the demo world.

A folder is written under a temp name next to its final place (`<name>.tmp-<pid>-<rand>`), then
swapped in: an old version is moved aside first (under a temp name too) and deleted after, so a
reader sees the old folder or the new one, never half of one. With `replace=False` the first
writer wins: a writer that finds the folder published by another drops its own and reuses that
one (a local rename refuses to replace a non-empty folder, so this is atomic on a local root).

Every temp name carries its writer's pid. Temp files and folders of writers that died are swept
by the next writer of the same name, and by `sweep_leftovers` over the whole data root (each
build starts with it); `leftovers` lists what remains, for `geofeat check`.
"""

from __future__ import annotations

import errno
import json
import os
import posixpath
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import fsspec

from storage.shards import writer_alive
from storage.sources import is_local, url_fs

TEMP = re.compile(r"\.tmp-(\d+)-[0-9a-f]{8}$")  # what temp_name appends (and shards.atomic_write)
REMOTE_STALE_S = 3600.0  # s; on an object store a pid says nothing about other machines: age decides too
SKIP = {"prefect"}  # folders under a root that geofeat does not write this way (Prefect's own home)


def temp_name(path: str) -> str:
    """A sibling temp name that carries this writer's pid (so a dead writer's can be swept)."""
    return f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class Leftover:
    """A temp file or folder under a data root: a writer's work in progress, or a dead writer's."""

    path: str  # relative to the data root
    pid: int
    alive: bool  # is its writer running (on this machine)?
    age_s: float | None  # s since it was last modified, where the store says


def _temp_paths(fs, top: str) -> dict[str, float | None]:
    """Temp files and folders under `top` (not inside other temps), each with the latest mtime of
    anything in it (an object store's folders have none of their own)."""
    found: dict[str, float | None] = {}
    if not fs.exists(top):
        return found
    for path, info in fs.find(top, withdirs=True, detail=True).items():
        parts = posixpath.relpath(path, top).split("/")
        if parts[0] in SKIP:
            continue
        cut = next((i for i, part in enumerate(parts) if TEMP.search(part)), None)
        if cut is None:
            continue
        temp = posixpath.join(top, *parts[:cut + 1])
        mtime = info.get("mtime") or info.get("LastModified")
        mtime = mtime.timestamp() if hasattr(mtime, "timestamp") else mtime
        known = found.get(temp)
        found[temp] = mtime if known is None else known if mtime is None else max(known, mtime)
    return found


def leftovers(root_url: str) -> list[Leftover]:
    """Every temp file and folder under a data root, with whether its writer still runs."""
    fs, top = url_fs(root_url)
    top = top.rstrip("/")
    now = time.time()
    out = []
    for path, mtime in sorted(_temp_paths(fs, top).items()):
        name = posixpath.basename(path)
        out.append(Leftover(posixpath.relpath(path, top), int(TEMP.search(name).group(1)), writer_alive(name),
                            None if mtime is None else max(0.0, now - float(mtime))))
    return out


def sweep_leftovers(root_url: str) -> list[str]:
    """Remove the temp files and folders of dead writers under a data root (on an object store only
    those older than REMOTE_STALE_S: a pid cannot say whether a writer elsewhere is alive); returns
    what was removed, relative to the root."""
    fs, top = url_fs(root_url)
    top = top.rstrip("/")
    local = is_local(root_url)
    gone = []
    for left in leftovers(root_url):
        if left.alive or (not local and (left.age_s is None or left.age_s < REMOTE_STALE_S)):
            continue
        try:
            fs.rm(posixpath.join(top, left.path), recursive=True)
            gone.append(left.path)
        except FileNotFoundError:  # another sweeper got there first
            pass
    return gone


def dead_temps(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """Temp siblings of `path` left by writers that are gone."""
    folder, name = posixpath.split(path.rstrip("/"))
    try:
        entries = fs.ls(folder, detail=False) if folder else []
    except FileNotFoundError:
        return []
    return sorted(e for e in entries
                  if posixpath.basename(e.rstrip("/")).startswith(f"{name}.tmp-")
                  and not writer_alive(posixpath.basename(e.rstrip("/"))))


def sweep_dead_temps(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """Remove the temp siblings of `path` whose writer died; returns what was removed."""
    gone = dead_temps(fs, path)
    for entry in gone:
        fs.rm(entry, recursive=True)
    return gone


def replace_tree(fs: fsspec.AbstractFileSystem, tmp: str, final: str) -> None:
    """Move the finished folder `tmp` to `final`; an existing `final` is moved aside (under a temp
    name: swept if this writer dies before deleting it), then deleted."""
    if fs.exists(final):
        old = temp_name(final)
        fs.mv(final, old, recursive=True)
        fs.mv(tmp, final, recursive=True)
        fs.rm(old, recursive=True)
    else:
        fs.mv(tmp, final, recursive=True)


class AlreadyPublished(Exception):
    """`staged_folder(replace=False)`: another writer published the folder first; this one's was dropped."""


def publish_new(fs: fsspec.AbstractFileSystem, tmp: str, final: str) -> bool:
    """Move `tmp` to `final` unless `final` exists; False (and `tmp` left) when it does. Atomic on a
    local filesystem (rename(2) of a folder onto a non-empty one fails); on an object store a check,
    then a copy: two writers of the same deterministic content may both copy it, harmlessly."""
    if type(fs).__name__ == "LocalFileSystem":
        if os.path.isdir(final) and not os.listdir(final):
            os.rmdir(final)  # an empty folder (a pre-created place) is not a published one
        try:
            os.rename(tmp, final)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                return False
            raise
        return True
    if fs.exists(final):
        return False
    fs.mv(tmp, final, recursive=True)
    return True


@contextmanager
def staged_folder(url: str, replace: bool = True) -> Iterator[tuple[fsspec.AbstractFileSystem, str]]:
    """Yield (filesystem, temp path) to write a whole folder into; on success it replaces `url`
    (`replace=False`: only if no one published `url` meanwhile, else AlreadyPublished is raised
    and the temp folder removed); on any failure the temp folder is removed and `url` is untouched."""
    fs, final = url_fs(url)
    final = final.rstrip("/")
    parent = posixpath.dirname(final)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    sweep_dead_temps(fs, final)
    tmp = temp_name(final)
    fs.makedirs(tmp, exist_ok=True)
    try:
        yield fs, tmp
        if replace:
            replace_tree(fs, tmp, final)
        elif not publish_new(fs, tmp, final):
            raise AlreadyPublished(url)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp, recursive=True)
        raise


def write_json(path: str, obj: Any, **dumps: Any) -> None:
    """A local JSON file written whole or not at all (temp file, fsync, rename)."""
    text = json.dumps(obj, **dumps)  # serialise first: a bad value fails before anything is written
    tmp = temp_name(path)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def upload_folder(local: str, url: str) -> None:
    """Copy a finished local folder's contents to `url` (object storage: objects first; the
    caller's completion record, written after, is what makes them count)."""
    fs, path = url_fs(url)
    # trailing slashes: copy the contents; a retried upload must not nest a second folder inside
    fs.put(f"{local.rstrip('/')}/", f"{path.rstrip('/')}/", recursive=True)


def remove_folder(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
