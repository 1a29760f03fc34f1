"""Transient storage faults: per-operation retries in storage/shards.py, task retries as the
second line, and a whole build under a 20% fault rate that ends with the same catalog."""

from __future__ import annotations

import errno
import hashlib
import posixpath
import random
import re
import threading
from collections import Counter
from pathlib import Path

import pytest
from fsspec.implementations.local import LocalFileSystem

from storage import shards
from storage.catalog import connect
from storage.layout import DataRoot
from flows import runner as retry

TRANSIENT = (lambda: OSError(errno.EIO, "injected I/O error"),
             lambda: ConnectionResetError(errno.ECONNRESET, "injected connection reset"),
             lambda: TimeoutError("injected timeout"))


class Faults:
    """Raise a transient error on `rate` of the temp writes, renames and completion-record
    writes under `prefix`. Each decision hashes (seed, operation, folder, how many times this
    operation was seen in this folder): file names carry the inputs' mtimes, and a shared
    random stream would depend on how threads interleave; this way the counts are the same
    every run."""

    def __init__(self, monkeypatch, prefix: str, rate: float = 0.2, seed: int = 0):
        self.prefix, self.rate, self.seed = prefix, rate, seed
        self.lock, self.seen, self.counts = threading.Lock(), Counter(), Counter()
        real_open, real_mv = LocalFileSystem._open, LocalFileSystem.mv
        faults = self

        def _open(fs, path, mode="rb", *args, **kwargs):
            f = real_open(fs, path, mode, *args, **kwargs)
            if "w" in mode and (exc := faults.hit(path, "write")):
                f.close()  # a failed attempt leaves an empty temp file behind for the writer to clean
                raise exc
            return f

        def mv(fs, path1, path2, *args, **kwargs):
            if exc := faults.hit(path2, "rename"):
                if faults.draw(path2, "moved") < 0.5:  # the rename happened but its reply was lost
                    real_mv(fs, path1, path2, *args, **kwargs)
                    with faults.lock:
                        faults.counts["rename_after_move"] += 1
                raise exc
            return real_mv(fs, path1, path2, *args, **kwargs)

        monkeypatch.setattr(LocalFileSystem, "_open", _open)
        monkeypatch.setattr(LocalFileSystem, "mv", mv)

    def draw(self, path: str, op: str) -> float:
        folder = posixpath.dirname(str(path)[len(self.prefix):])
        key = f"{op}:{re.sub('segmenter=[^/]*', 'segmenter=*', folder)}"  # the id hashes tmp paths
        with self.lock:
            self.seen[key] += 1
            return random.Random(f"{self.seed}:{key}:{self.seen[key]}").random()

    def hit(self, path: str, op: str) -> BaseException | None:
        if not str(path).startswith(self.prefix):
            return None
        kind = "record" if "/_commits/" in str(path) else op
        u = self.draw(path, op)
        with self.lock:
            self.counts[f"{kind}_ops"] += 1
            self.counts[kind] += u < self.rate
        if u >= self.rate:
            return None
        return TRANSIENT[int(u / self.rate * len(TRANSIENT))]()


@pytest.fixture
def fast_retries(monkeypatch):
    """No sleeping between retries: the task delays list is shared by every task, so change it in place."""
    from flows.ingest import ingest_shard_task

    assert ingest_shard_task.retry_delay_seconds is retry.RETRY_DELAYS
    saved = list(retry.RETRY_DELAYS)
    retry.RETRY_DELAYS[:] = [0.0] * len(saved)
    monkeypatch.setattr(shards, "IO_BACKOFF_S", (0.001, 0.01))
    yield
    retry.RETRY_DELAYS[:] = saved


# ---------------------------------------------------------------- one storage operation


def flaky(failures: list[BaseException], result="ok"):
    calls = []

    def op():
        calls.append(1)
        if len(calls) <= len(failures):
            raise failures[len(calls) - 1]
        return result
    return op, calls


def test_retry_io_gets_past_transient_errors(fast_retries):
    op, calls = flaky([ConnectionResetError("reset"), TimeoutError("slow"), OSError(errno.EIO, "io")])
    assert shards.retry_io(op, what="op") == "ok" and len(calls) == 4


def test_retry_io_gives_up_after_its_attempts(fast_retries):
    op, calls = flaky([TimeoutError("slow")] * shards.IO_ATTEMPTS)
    with pytest.raises(TimeoutError):
        shards.retry_io(op, what="op")
    assert len(calls) == shards.IO_ATTEMPTS


@pytest.mark.parametrize("exc", [FileNotFoundError("gone"), PermissionError("no"), ValueError("bug"),
                                 OSError(errno.ENOSPC, "disk full")])
def test_retry_io_never_retries_permanent_errors(fast_retries, exc):
    op, calls = flaky([exc])
    with pytest.raises(type(exc)):
        shards.retry_io(op, what="op")
    assert len(calls) == 1


@pytest.mark.parametrize("exc,transient", [
    (OSError(errno.EIO, "I/O error"), True), (OSError(errno.ETIMEDOUT, "timed out"), True),
    (OSError(errno.ESTALE, "stale NFS handle"), True), (OSError("store failed the request"), True),
    (ConnectionResetError(errno.ECONNRESET, "reset"), True), (TimeoutError("slow"), True),
    (OSError(errno.ELOOP, "Too many levels of symbolic links"), False),  # a symlink loop: retrying loops again
    (OSError(errno.ENXIO, "No such device or address"), False),  # a socket opened as a file
    (OSError(errno.EINVAL, "Invalid argument"), False), (OSError(errno.ENODEV, "No such device"), False),
    (OSError(errno.ENOSPC, "disk full"), False), (FileNotFoundError("gone"), False), (ValueError("bug"), False),
])
def test_only_true_io_faults_are_transient(exc, transient):
    """Issue 13, finding 2: OSError 40 (a symlink loop) was retried as transient and failed the flow."""
    assert shards.is_transient(exc) is transient


def test_retry_delays_from_the_environment(monkeypatch):
    monkeypatch.setenv(retry.ENV_DELAYS, "0,0.5,2")
    assert retry.retry_delays() == [0.0, 0.5, 2.0]
    monkeypatch.delenv(retry.ENV_DELAYS)
    assert retry.retry_delays() == retry.DEFAULT_DELAYS
    for bad in ("a,b", "-1", ",", ",".join(["1"] * 51)):
        with pytest.raises(ValueError, match="GEOFEAT_RETRY_DELAYS"):
            retry.retry_delays(bad)


def test_a_rename_whose_reply_was_lost_counts_as_done(root, monkeypatch, fast_retries):
    real_mv, calls = LocalFileSystem.mv, []

    def mv(fs, a, b, *args, **kwargs):
        calls.append(b)
        real_mv(fs, a, b, *args, **kwargs)
        if len(calls) == 1:
            raise ConnectionResetError("reply lost after the move")

    monkeypatch.setattr(LocalFileSystem, "mv", mv)
    path = root.shard_path("images", "s1", dataset="demo")
    shards.atomic_write(root, path, lambda f: f.write(b"shard bytes"))
    assert Path(path).read_bytes() == b"shard bytes"
    assert len(calls) == 1  # the retry saw the file in place and did not move again
    assert [p.name for p in Path(path).parent.iterdir()] == ["s1.parquet"]


def test_failed_writes_leave_no_temp_and_the_retry_writes_it_whole(root, fast_retries):
    path, tries = root.shard_path("images", "s2", dataset="demo"), []

    def write(f):
        tries.append(1)
        f.write(b"half a ")
        if len(tries) < 3:
            raise TimeoutError("store timed out mid-write")
        f.write(b"shard")

    shards.atomic_write(root, path, write)
    assert Path(path).read_bytes() == b"half a shard" and len(tries) == 3
    assert [p.name for p in Path(path).parent.iterdir()] == ["s2.parquet"]


# ---------------------------------------------------------------- a whole build under faults

DEMO = {"seed": 3, "countries": 2, "per_country": 6, "heldout_per_country": 2, "messy": True}


def build(home: str, world: str) -> None:
    from flows.build_feature_datasets import build_feature_datasets
    from tasks.specs import CropSpec, DemoSpec, IngestOptions, RunOptions, SegmenterSpec

    build_feature_datasets(demo=DemoSpec(**DEMO, out=world), segmenter=SegmenterSpec(kind="annotations"),
                           options=IngestOptions(shard_size=3), crops=CropSpec(min_area=40),
                           run=RunOptions(shard_size=4), home=home)


def catalog(root: DataRoot) -> dict[str, list]:
    """Everything a build produced, without run timestamps."""
    con = connect(root, fresh=True)
    rows = lambda sql: sorted(con.execute(sql).fetchall())  # noqa: E731
    return {
        "images": rows("SELECT * EXCLUDE (ingested_at) FROM images"),
        "images_all": rows("SELECT * EXCLUDE (ingested_at) FROM images_all"),
        "quarantine": rows("SELECT * EXCLUDE (seen_at) FROM quarantine"),
        "features": sorted((r[0], hashlib.sha256(r[1]).hexdigest(), *r[2:]) for r in con.execute(
            "SELECT feature_id, crop.bytes, image_id, dataset, split, label, \"group\", bbox, segmenter FROM features_all"
        ).fetchall()),
        "segmentations": rows("SELECT * EXCLUDE (created_at) FROM segmentations_all"),
    }


def test_build_under_transient_faults_equals_a_clean_build(prefect_harness, tmp_path, monkeypatch, fast_retries):
    world = str(tmp_path / "world")
    clean, faulty = DataRoot(str(tmp_path / "clean")), DataRoot(str(tmp_path / "faulty"))
    build(clean.url, world)
    expected = catalog(clean)
    assert len(expected["images"]) >= 12 and expected["quarantine"] and len(expected["features"]) > 20

    faults = Faults(monkeypatch, prefix=faulty.url + "/", rate=0.2, seed=2)
    build(faulty.url, world)
    monkeypatch.undo()

    print("injected faults:", dict(faults.counts))
    # ~140 operations at 20%: the counts are fixed for a given seed and sequence of storage operations
    assert faults.counts["write"] >= 5 and faults.counts["rename"] >= 5 and faults.counts["record"] >= 3
    assert faults.counts["rename_after_move"] >= 2
    assert catalog(faulty) == expected
    assert not [p for p in Path(faulty.url).rglob("*.tmp-*")]
    assert Path(faulty.catalog_sql).read_text().replace(faulty.url, "") == Path(clean.catalog_sql).read_text().replace(clean.url, "")


def test_task_retries_are_the_second_line(prefect_harness, root, tmp_path, monkeypatch, fast_retries):
    """With one try per storage operation, the first record write of every shard fails and the
    shard task's own retry commits it."""
    from flows.ingest import ingest
    from tasks.specs import IngestOptions, SourceSpec
    from helpers import image_bytes, write

    for i in range(4):
        write(tmp_path / "src" / "France" / f"{i}.jpg", image_bytes(seed=i))
    monkeypatch.setattr(shards, "IO_ATTEMPTS", 1)
    real_mv, failed = LocalFileSystem.mv, []

    def mv(fs, a, b, *args, **kwargs):
        if "/_commits/" in b and b not in failed:
            failed.append(b)
            raise ConnectionResetError("store dropped the connection")
        return real_mv(fs, a, b, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "mv", mv)
    summary = ingest(SourceSpec(layout="g50", source=str(tmp_path / "src"), dataset="retry"),
                     IngestOptions(shard_size=2), home=root.url)
    assert summary["shards"] == 2 and summary["images"] == 4
    assert len([p for p in failed if "/ingest/" in p]) == 2  # each shard failed once, then committed
    assert connect(root, fresh=True).execute("SELECT count(*) FROM images").fetchall() == [(4,)]
