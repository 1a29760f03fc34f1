"""Reading source datasets (any fsspec URL): listings with size+mtime, bytes, CSVs.

A listing accepts regular files only (`scan`): a named pipe would hang a reader, a symlink to
/dev/zero is listed as 0 bytes and never ends, a symlink loop fails every read. Everything else
comes back as a `Refused` entry with its reason, so ingest can quarantine it instead of losing it,
and a sub-folder that cannot be listed is one such entry, not a silent gap. Reads are bounded by
the bytes actually read (`read_bytes(limit=...)`), never by the size a listing claimed.
"""

from __future__ import annotations

import errno
import io
import os
import posixpath
import stat
from dataclasses import dataclass, field
from datetime import datetime

import fsspec
import polars as pl


@dataclass(frozen=True)
class SourceFile:
    uri: str  # full URL (absolute path for local files)
    rel: str  # path relative to the listed folder, '/'-separated
    size: int  # bytes
    mtime: float | None  # s since epoch; None where the store has no timestamp


@dataclass(frozen=True)
class Refused:
    """A listed entry that is not a regular file (or a folder that could not be listed)."""

    uri: str
    rel: str  # path relative to the listed folder, '/'-separated
    reason: str  # one of tasks.validate.REASONS: not_a_regular_file, symlink_loop, broken_symlink, ...
    detail: str
    mtime: float | None = None  # s since epoch of the entry itself (a symlink's own), where known


@dataclass
class Scan:
    """A recursive listing: the regular files, and every other entry with why it was refused."""

    files: list[SourceFile] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)


class NotRegularFile(OSError):
    """A read found a FIFO, socket, device or folder where a regular file was listed."""


class FolderNotFile(NotRegularFile, IsADirectoryError):
    """A read found a folder: both a NotRegularFile and the IsADirectoryError callers expect."""


class TooLarge(ValueError):
    """A read got more bytes than its limit (whatever size the listing said)."""

    def __init__(self, uri: str, limit: int):
        super().__init__(f"{uri}: more than {limit} bytes")
        self.limit = limit


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


_KINDS = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), f"not a regular file (mode {stat.filemode(mode)})")


def _why(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _scan_local(root: str, skip_hidden: bool, scheme: str = "") -> Scan:
    """Walk a local folder with lstat/stat: regular files, and a `Refused` for everything else.

    Symlinks are followed (a dataset assembled from links is normal) but a link to a folder that
    is already on the path above it is a loop and refused; `os.stat` answers ELOOP for file loops."""
    out = Scan()
    try:
        top = os.stat(root)
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as exc:
        raise ValueError(f"{root}: this folder cannot be listed ({_why(exc)}); give geofeat read access "
                         "to it or point the source elsewhere") from exc
    stack = [("", entries, ((top.st_dev, top.st_ino),))]
    while stack:
        prefix, entries, above = stack.pop()
        for entry in entries:
            if skip_hidden and entry.name.startswith("."):
                continue
            rel = f"{prefix}{entry.name}"
            path = entry.path
            uri = scheme + path
            try:
                own = entry.stat(follow_symlinks=False)
            except FileNotFoundError:  # deleted since its folder was read: not an input any more
                continue
            except OSError as exc:
                out.refused.append(Refused(uri, rel, "unreadable_file", f"cannot stat: {_why(exc)}"))
                continue
            link = stat.S_ISLNK(own.st_mode)
            try:
                target = f" -> {os.readlink(path)}" if link else ""
            except OSError:
                target = ""
            try:
                st = os.stat(path) if link else own
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    out.refused.append(Refused(uri, rel, "symlink_loop", f"symlink{target} never reaches a file", own.st_mtime))
                elif isinstance(exc, FileNotFoundError):
                    out.refused.append(Refused(uri, rel, "broken_symlink", f"symlink{target}: the target does not exist", own.st_mtime))
                else:
                    out.refused.append(Refused(uri, rel, "unreadable_file", f"symlink{target}: {_why(exc)}", own.st_mtime))
                continue
            if stat.S_ISREG(st.st_mode):
                out.files.append(SourceFile(uri, rel, st.st_size, st.st_mtime))
            elif stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key in above:
                    out.refused.append(Refused(uri, rel, "symlink_loop", f"symlink{target} points to a folder above it",
                                               own.st_mtime))
                    continue
                try:
                    children = sorted(os.scandir(path), key=lambda e: e.name)
                except OSError as exc:
                    out.refused.append(Refused(uri, rel, "unlistable_folder",
                                               f"folder cannot be listed ({_why(exc)}): the files in it are unknown", st.st_mtime))
                    continue
                stack.append((rel + "/", children, (*above, key)))
            else:
                via = f"symlink{target}: " if link else ""
                out.refused.append(Refused(uri, rel, "not_a_regular_file", f"{via}{_kind(st.st_mode)}; never read",
                                           own.st_mtime))
    out.files.sort(key=lambda f: f.rel)
    out.refused.sort(key=lambda r: r.rel)
    return out


def _listing(fs: fsspec.AbstractFileSystem, root: str) -> tuple[dict[str, dict], list[tuple[str, OSError]]]:
    """Every entry under `root` with its info, and the folders whose listing failed. A store that
    lists a whole prefix in one request (s3fs, gcsfs, memory) cannot fail for one sub-folder; a
    filesystem listed folder by folder (fsspec's generic walk: SFTP, HDFS, ...) is walked here, since
    that walk drops a sub-folder's error on the floor."""
    if type(fs).find is not fsspec.AbstractFileSystem.find:
        return fs.find(root, detail=True), []
    found, failed, todo = {}, [], [root]
    while todo:
        folder = todo.pop()
        try:
            entries = fs.ls(folder, detail=True)
        except OSError as exc:
            if folder == root:
                raise
            failed.append((folder, exc))
            continue
        for info in entries:
            found[info["name"]] = info
            if info.get("type") == "directory" and info["name"].rstrip("/") != folder.rstrip("/"):
                todo.append(info["name"])
    return found, failed


def _scan_remote(url: str, skip_hidden: bool) -> Scan:
    """Object stores and other fsspec filesystems: entries of type `file` are files; anything else
    (a store's `other`, a link) is refused, and so is a sub-folder whose listing fails."""
    fs, root = url_fs(url)
    root = root.rstrip("/")
    found, failed = _listing(fs, root)
    hidden = lambda rel: skip_hidden and any(part.startswith(".") for part in rel.split("/"))  # noqa: E731
    to_uri = lambda path: fs.unstrip_protocol(path) if "://" in url else path  # noqa: E731
    out = Scan()
    for path, info in sorted(found.items()):
        rel = posixpath.relpath(path, root)
        kind = info.get("type")
        if kind == "directory" or hidden(rel):
            continue
        if kind == "file":
            out.files.append(SourceFile(to_uri(path), rel, int(info.get("size") or 0), _mtime(info)))
        else:
            out.refused.append(Refused(to_uri(path), rel, "not_a_regular_file",
                                       f"listed as {kind!r}, not a file; never read", _mtime(info)))
    for folder, exc in failed:
        rel = posixpath.relpath(folder, root)
        if not hidden(rel):
            out.refused.append(Refused(to_uri(folder), rel, "unlistable_folder", f"folder cannot be listed "
                                       f"({type(exc).__name__}: {exc}): the files in it are unknown"))
    return out


def scan(url: str, *, skip_hidden: bool = False) -> Scan:
    """Everything under a folder, recursively: regular files with size and mtime, and every other
    entry (pipes, sockets, devices, symlink loops, dangling links, unlistable folders) refused
    with its reason. `skip_hidden`: leave out entries under a name starting with '.'."""
    if is_local(url):
        _, root = url_fs(url)
        return _scan_local(root.rstrip("/") or "/", skip_hidden, "file://" if "://" in url else "")
    return _scan_remote(url, skip_hidden)


def relative(url: str, base: str) -> str:
    """`url` relative to the folder `base` ('../x' allowed) when both are on the same store, else
    its last name: a description of a layout that holds wherever the two are moved together."""
    (_, path), (_, top) = url_fs(url), url_fs(base)
    if fsspec.utils.get_protocol(url) != fsspec.utils.get_protocol(base):
        return posixpath.basename(path.rstrip("/"))
    return posixpath.relpath(path.rstrip("/") or "/", top.rstrip("/") or "/")


def list_files(url: str) -> list[SourceFile]:
    """The regular files under a folder, recursively (`scan` also says what else was there)."""
    return scan(url).files


def read_bytes(uri: str, limit: int | None = None) -> bytes:
    """The bytes of a file, at most `limit` of them (more raises TooLarge, whatever was listed).

    A local path is opened without blocking and must be a regular file once open: a FIFO or a
    device put in place of a listed file raises NotRegularFile instead of hanging or never ending."""
    fs, path = url_fs(uri)
    if not is_local(uri):
        if limit is None:
            return fs.cat_file(path)
        with fs.open(path, "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise TooLarge(uri, limit)
        return data
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise FolderNotFile(errno.EISDIR, "a folder, not a regular file", path)
        if not stat.S_ISREG(mode):
            raise NotRegularFile(errno.EINVAL, f"{_kind(mode)}, not a regular file", path)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=True) as f:
            fd = -1
            data = f.read() if limit is None else f.read(limit + 1)
    finally:
        if fd >= 0:
            os.close(fd)
    if limit is not None and len(data) > limit:
        raise TooLarge(uri, limit)
    return data


def read_csv(url: str) -> pl.DataFrame:
    """A CSV with every column as a string: 'NA' is Namibia, not a missing value.

    A malformed CSV is a configuration error naming the file, not a parser traceback."""
    data = read_bytes(url)
    try:
        return pl.read_csv(io.BytesIO(data), infer_schema=False)
    except pl.exceptions.PolarsError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{url}: not a readable CSV ({first}); save it as UTF-8 CSV with one header row") from exc
