"""Issue 13, findings 2, 3 and 8: one bad file never fails, hangs or exhausts an ingest; nothing is
lost silently; the content, not the extension, decides the format.

The files that hung or exhausted the old ingest (a FIFO named .jpg, a symlink to /dev/zero) are
ingested in a child process with a memory cap and a time limit, so a regression fails the test
instead of hanging the suite or eating the machine's memory."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from flows.ingest import ingest
from helpers import image_bytes, write
from storage.catalog import connect
from storage.layout import DataRoot
from tasks.check import integrity_checks
from tasks.specs import IngestOptions, SourceSpec

pytestmark = pytest.mark.usefixtures("prefect_harness")
PROJECT = Path(__file__).resolve().parents[1]


def quarantined(root: DataRoot, dataset: str) -> dict[str, tuple[str, str]]:
    """file name -> (reason, detail) of the dataset's quarantine rows."""
    rows = connect(root, fresh=True).execute(
        "SELECT source_uri, reason, detail FROM quarantine WHERE dataset = ?", [dataset]).fetchall()
    return {uri.rsplit("/", 1)[1]: (reason, detail) for uri, reason, detail in rows}


def images(root: DataRoot, dataset: str) -> dict[str, str]:
    rows = connect(root, fresh=True).execute("SELECT source_uri, country FROM images WHERE dataset = ?", [dataset])
    return {uri.rsplit("/", 1)[1]: country for uri, country in rows.fetchall()}


def unix_socket(path: Path) -> socket.socket:
    """A listening socket file at `path` (bound from its folder: socket paths are limited to ~107 bytes)."""
    sock, cwd = socket.socket(socket.AF_UNIX), os.getcwd()
    os.chdir(path.parent)
    try:
        sock.bind(path.name)
    finally:
        os.chdir(cwd)
    return sock


def hostile_folder(src: Path) -> dict[str, str | None]:
    """A G50 tree of one good image and every kind of entry that is not a regular file.
    Maps file name -> expected quarantine reason (None: an image)."""
    write(src / "France" / "good.jpg", image_bytes("JPEG", seed=1))
    os.mkfifo(src / "France" / "pipe.jpg")
    os.symlink("/dev/zero", src / "France" / "zero.jpg")
    os.symlink("loop.jpg", src / "France" / "loop.jpg")
    os.symlink("nowhere.jpg", src / "France" / "dangling.jpg")
    os.symlink("..", src / "France" / "up")
    return {"good.jpg": None, "pipe.jpg": "not_a_regular_file", "zero.jpg": "not_a_regular_file",
            "loop.jpg": "symlink_loop", "dangling.jpg": "broken_symlink", "up": "symlink_loop",
            "sock.jpg": "not_a_regular_file"}


ISOLATED = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))  # a read of /dev/zero ends in MemoryError, not swap
from storage.catalog import connect
from storage.layout import DataRoot
from tasks.ingest import ingest_shard, plan_ingest
root = DataRoot(sys.argv[2])
params = {"dataset": "hostile", "layout": "g50", "split": {"policy": "hash", "train": 0.8, "val": 0.1},
          "max_pixels": 80_000_000, "max_bytes": 2**20}
plans, _ = plan_ingest(root, "g50", sys.argv[1], None, params, 100)
for plan in plans:
    ingest_shard(root, plan)
con = connect(root, fresh=True)
rows = con.execute("SELECT source_uri, reason FROM quarantine UNION ALL SELECT source_uri, 'image' FROM images").fetchall()
print(json.dumps({uri.rsplit("/", 1)[1]: reason for uri, reason in rows}))
"""


def test_pipes_devices_sockets_and_links_are_quarantined_without_hanging(tmp_path):
    """Finding 2: a FIFO hung the ingest forever, a symlink to /dev/zero read until MemoryError and a
    symlink loop failed the whole shard; each is now a quarantine row, and the good image is in."""
    expected = hostile_folder(tmp_path / "g50")
    sock = unix_socket(tmp_path / "g50" / "France" / "sock.jpg")
    try:
        res = subprocess.run([sys.executable, "-c", ISOLATED, str(tmp_path / "g50"), str(tmp_path / "home")],
                             env={**os.environ, "PYTHONPATH": str(PROJECT)}, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail("the ingest hung on a hostile file")
    finally:
        sock.close()
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got == {name: reason or "image" for name, reason in expected.items()}


def test_a_symlink_loop_does_not_fail_the_shard_of_a_good_image(tmp_path, root):
    """Finding 2: ELOOP was retried as transient and failed the flow, losing the good image beside it."""
    src = tmp_path / "g50"
    write(src / "France" / "good.jpg", image_bytes("JPEG", seed=2))
    os.symlink("loop.jpg", src / "France" / "loop.jpg")
    summary = ingest(SourceSpec(layout="g50", source=str(src), dataset="loop"), IngestOptions(shard_size=10),
                     home=root.url)
    assert (summary["images"], summary["quarantined"]) == (1, 1)
    assert images(root, "loop") == {"good.jpg": "FR"}
    assert quarantined(root, "loop")["loop.jpg"][0] == "symlink_loop"


def test_a_file_that_grows_past_max_bytes_after_listing_is_cut_off_at_the_limit(tmp_path, root):
    """Reads are bounded by the bytes actually read, not the size the listing saw."""
    from tasks.ingest import ingest_shard, plan_ingest

    path = write(tmp_path / "g50" / "France" / "grows.jpg", image_bytes("JPEG", seed=3))
    listed = path.stat().st_size
    params = {"dataset": "grows", "layout": "g50", "split": {"policy": "hash", "train": 0.8, "val": 0.1},
              "max_pixels": 80_000_000, "max_bytes": listed + 100}
    plans, _ = plan_ingest(root, "g50", str(tmp_path / "g50"), None, params, 10)
    with open(path, "ab") as f:  # grows after it was listed, past max_bytes
        f.write(b"\0" * 1000)
    for plan in plans:
        ingest_shard(root, plan)
    reason, detail = quarantined(root, "grows")["grows.jpg"]
    assert reason == "too_large" and f"max_bytes={listed + 100}" in detail and f"listed as {listed}" in detail


def test_an_unlistable_sub_folder_is_a_quarantine_row_not_a_silent_gap(tmp_path, root, monkeypatch):
    """Finding 3: the contents of an unreadable sub-folder vanished without a row or a warning. Root
    reads any folder, so where the tests run as root the listing is denied through os.scandir too."""
    src = tmp_path / "g50"
    write(src / "France" / "ok.jpg", image_bytes("JPEG", seed=4))
    locked = src / "Spain" / "locked"
    write(locked / "hidden.jpg", image_bytes("JPEG", seed=5))
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path).rstrip("/") == str(locked):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    locked.chmod(0)
    monkeypatch.setattr(os, "scandir", scandir)
    try:
        summary = ingest(SourceSpec(layout="g50", source=str(src), dataset="locked"), home=root.url)
    finally:
        locked.chmod(0o755)
        monkeypatch.undo()
    reason, detail = quarantined(root, "locked")["locked"]
    assert reason == "unlistable_folder" and "Permission denied" in detail
    assert (summary["images"], summary["quarantined"]) == (1, 1)
    again = ingest(SourceSpec(layout="g50", source=str(src), dataset="locked"), home=root.url)  # readable now
    assert again["images"] == 1 and images(root, "locked") == {"ok.jpg": "FR", "hidden.jpg": "ES"}
    assert quarantined(root, "locked") == {}  # the folder's row left with its files ingested


def write_csv(path: Path, header: str, rows: list[str]) -> None:
    write(path, (header + "\n" + "\n".join(rows) + "\n").encode())


def test_a_manifest_that_labels_one_file_twice_is_one_row_naming_both_labels(tmp_path, root):
    """Finding 3: the same file at Paris and at Tokyo reported 3 images, the view showed 2 and no
    label won for a reason. Now: one `conflicting_labels` row naming both, and the counts agree."""
    imgs = tmp_path / "im2gps" / "images"
    for i, name in enumerate(["paris.jpg", "twice.jpg", "tokyo.jpg"]):
        write(imgs / name, image_bytes("JPEG", seed=10 + i))
    write_csv(tmp_path / "im2gps" / "gt.csv", "IMG_ID,AUTHOR,LAT,LON",
              ["paris.jpg,a,48.8566,2.3522", "paris.jpg,a,35.6762,139.6503", "twice.jpg,b,48.85,2.35",
               "twice.jpg,b,48.85,2.35", "tokyo.jpg,c,35.6762,139.6503"])
    summary = ingest(SourceSpec(layout="im2gps", source=str(tmp_path / "im2gps" / "gt.csv"), dataset="conflict"),
                     home=root.url)
    reason, detail = quarantined(root, "conflict")["paris.jpg"]
    assert reason == "conflicting_labels" and "FR" in detail and "JP" in detail and "48.8566" in detail
    assert images(root, "conflict") == {"twice.jpg": "FR", "tokyo.jpg": "JP"}
    assert any("1 file(s) are named by more than one row with the same label" in w for w in summary["warnings"])
    assert (summary["images"], summary["quarantined"]) == (2, 1)  # what the views show


def test_a_g3_manifest_naming_a_file_with_two_countries(tmp_path, root):
    write(tmp_path / "g3" / "a.jpg", image_bytes("JPEG", seed=20))
    write(tmp_path / "g3" / "b.jpg", image_bytes("JPEG", seed=21))
    write_csv(tmp_path / "g3" / "m.csv", "path,country", ["a.jpg,France", "a.jpg,Japan", "b.jpg,Peru"])
    summary = ingest(SourceSpec(layout="g3", source=str(tmp_path / "g3" / "m.csv"), dataset="g3c"), home=root.url)
    reason, detail = quarantined(root, "g3c")["a.jpg"]
    assert reason == "conflicting_labels" and "FR" in detail and "JP" in detail
    assert images(root, "g3c") == {"b.jpg": "PE"}
    assert (summary["images"], summary["quarantined"]) == (1, 1)


def test_quarantine_details_keep_the_raw_coordinates(tmp_path, root):
    """Finding 3: `"48,8566"` and `35.68N` became `LAT=None` in the detail."""
    imgs = tmp_path / "im2gps" / "images"
    write(imgs / "comma.jpg", image_bytes("JPEG", seed=30))
    write(imgs / "north.jpg", image_bytes("JPEG", seed=31))
    write_csv(tmp_path / "im2gps" / "gt.csv", "IMG_ID,AUTHOR,LAT,LON",
              ['comma.jpg,a,"48,8566",2.3522', "north.jpg,b,35.68N,139.69"])
    ingest(SourceSpec(layout="im2gps", source=str(tmp_path / "im2gps" / "gt.csv"), dataset="raw"), home=root.url)
    got = quarantined(root, "raw")
    assert "'48,8566'" in got["comma.jpg"][1] and "not a number" in got["comma.jpg"][1]
    assert "'35.68N'" in got["north.jpg"][1]


def test_the_same_bytes_under_two_countries_name_both_labels(tmp_path, root):
    """Finding 3: the same bytes under France and Spain became a plain `duplicate`."""
    shared = image_bytes("JPEG", seed=40)
    write(tmp_path / "g50" / "France" / "a.jpg", shared)
    write(tmp_path / "g50" / "Spain" / "b.jpg", shared)
    write(tmp_path / "g50" / "Spain" / "c.jpg", image_bytes("JPEG", seed=41))
    summary = ingest(SourceSpec(layout="g50", source=str(tmp_path / "g50"), dataset="twolabels"), home=root.url)
    reason, detail = quarantined(root, "twolabels")["b.jpg"]
    assert reason == "duplicate_conflicting_label" and "FR" in detail and "ES" in detail
    assert (summary["images"], summary["quarantined"]) == (2, 1)
    check = next(c for c in integrity_checks(root) if c.name == "copies of an image agree on its country")
    assert not check.passed and check.table.to_pylist()[0]["countries"] == ["ES", "FR"]


def encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), (200, 30, 30)).save(buf, fmt)
    return buf.getvalue()


def test_the_content_decides_the_format_whatever_the_extension(tmp_path, root):
    """Finding 8: GIF, AVIF and TIFF named .jpg were ingested while the same files under their own
    extension were `unsupported_extension`. Now the bytes decide, both ways, and the detail says so."""
    src = tmp_path / "g50" / "France"
    cases = {}
    for fmt, ext in (("GIF", "gif"), ("AVIF", "avif"), ("TIFF", "tif"), ("BMP", "bmp")):
        write(src / f"{fmt.lower()}_as.jpg", encoded(fmt))
        write(src / f"{fmt.lower()}_own.{ext}", encoded(fmt))
        cases[f"{fmt.lower()}_as.jpg"] = cases[f"{fmt.lower()}_own.{ext}"] = fmt
    write(src / "jpeg_as.png", encoded("JPEG"))
    write(src / "notes.txt", b"the camera battery died here\n")
    ingest(SourceSpec(layout="g50", source=str(tmp_path / "g50"), dataset="formats"), home=root.url)
    got = quarantined(root, "formats")
    for name, fmt in cases.items():
        reason, detail = got[name]
        assert reason == "unsupported_format" and detail.startswith(fmt) and f"named .{name.rsplit('.', 1)[1]}" in detail
    assert got["notes.txt"][0] == "not_an_image" and "text" in got["notes.txt"][1]
    assert images(root, "formats") == {"jpeg_as.png": "FR"}
    fmt = connect(root, fresh=True).execute("SELECT format FROM images WHERE dataset = 'formats'").fetchall()
    assert fmt == [("JPEG",)]


def test_a_remote_listing_takes_its_files_and_reports_a_folder_it_cannot_list(monkeypatch):
    """A filesystem listed folder by folder (SFTP, HDFS, ...: fsspec's generic walk) whose sub-folder
    listing fails gives an `unlistable_folder` entry, not a silent gap; hidden entries are skipped."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    from storage import sources

    class Walking(MemoryFileSystem):  # the memory store, listed the generic way
        protocol = "walkmem"
        find = fsspec.AbstractFileSystem.find

        @classmethod
        def _strip_protocol(cls, path):
            return MemoryFileSystem._strip_protocol(path.replace("walkmem://", "memory://", 1))

        def ls(self, path, detail=True, **kw):
            if path.rstrip("/").endswith("Spain"):
                raise PermissionError(13, "Access Denied", path)
            return super().ls(path, detail=detail, **kw)

    fsspec.register_implementation("walkmem", Walking, clobber=True)
    Walking().pipe({"/scan-test/France/a.jpg": b"a", "/scan-test/France/.hidden.jpg": b"h", "/scan-test/Spain/b.jpg": b"bb"})
    found = sources.scan("walkmem://scan-test", skip_hidden=True)
    assert [(f.rel, f.size) for f in found.files] == [("France/a.jpg", 1)]
    assert [(r.reason, "Access Denied" in r.detail) for r in found.refused] == [("unlistable_folder", True)]
