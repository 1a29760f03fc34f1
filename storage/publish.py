"""Atomic publishing of whole folders and small files: checkpoint directories, the demo world.

A folder is written under a temp name next to its final place (`<name>.tmp-<pid>-<rand>`), then
swapped in: an old version is moved aside first and deleted after, so a reader sees the old folder
or the new one, never half of one. Temp folders of writers that died (their pid is gone) are swept
by the next writer of the same name; a live writer's stays.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import fsspec

from storage.shards import writer_alive
from storage.sources import url_fs


def temp_name(path: str) -> str:
    """A sibling temp name that carries this writer's pid (so a dead writer's can be swept)."""
    return f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


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
    """Move the finished folder `tmp` to `final`; an existing `final` is moved aside, then deleted."""
    if fs.exists(final):
        old = f"{final}.old-{uuid.uuid4().hex[:8]}"
        fs.mv(final, old, recursive=True)
        fs.mv(tmp, final, recursive=True)
        fs.rm(old, recursive=True)
    else:
        fs.mv(tmp, final, recursive=True)


@contextmanager
def staged_folder(url: str) -> Iterator[tuple[fsspec.AbstractFileSystem, str]]:
    """Yield (filesystem, temp path) to write a whole folder into; on success it replaces `url`,
    on any failure the temp folder is removed and `url` is untouched."""
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
        replace_tree(fs, tmp, final)
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
