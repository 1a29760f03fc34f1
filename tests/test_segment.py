"""Segmentation: pure crop logic, the flow on the demo world (ground truth and tiny model),
re-segmentation, bad images, kill -9 in the middle of the stage (and in the middle of a background
commit), and the streaming pipeline against a one-image-at-a-time reference of the same crops."""

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flows.build_feature_datasets import build_feature_datasets
from tasks.specs import CropSpec, DemoSpec, RunOptions, SegmenterSpec, SourceSpec
from flows.segment import segment
from helpers import image_bytes, write
from models.segmenter import Segment
from storage.catalog import connect
from storage.layout import DataRoot
from tasks.segment import crop_box, cut_crop, feature_id, overlay_rows, segmenter_id, select_segments

SMALL = DemoSpec(countries=3, per_country=4, heldout_per_country=1, messy=True)
RUN = RunOptions(batch_size=4, num_workers=0, shard_size=5)
TINY = SegmenterSpec(kind="tiny-random", label_set="demo", input_height=64, input_width=128, score_threshold=0.0)
TINY_CROPS = CropSpec(min_score=0.0, min_area=1)


def seg(label, area, bbox=(0, 0, 10, 10), score=0.9):
    return Segment(label=label, label_id=0, score=score, bbox=bbox, area=area, mask=np.ones((4, 4), bool))


def test_select_segments_filters_and_ranks():
    groups = {"road": "ground", "car": "vehicle", "sky": "drop"}
    segments = [seg("car", 500), seg("car", 900), seg("car", 700), seg("road", 5000), seg("sky", 9000),
                seg("car", 50), seg("road", 3000, score=0.2), seg("unknown", 800)]
    chosen = select_segments(segments, groups, CropSpec(min_score=0.5, min_area=100, max_per_label=2))
    assert [(s.label, s.area, g, r) for s, g, r in chosen] == [
        ("car", 900, "vehicle", 0), ("car", 700, "vehicle", 1), ("road", 5000, "ground", 0)]


def test_crop_geometry_and_background_mask():
    assert crop_box((10, 20, 30, 40), 100, 50, CropSpec(padding=0.5, padding_px=1)) == (0, 9, 41, 50)
    image = np.full((40, 80, 3), 255, np.uint8)
    mask = np.zeros((10, 20), bool)
    mask[:, :10] = True  # left half of the image, at 1/4 resolution
    s = Segment(label="x", label_id=0, score=1.0, bbox=(0, 0, 80, 40), area=1600, mask=mask)
    crop = np.asarray(cut_crop(image, s, CropSpec(padding=0, mask_background=True)))
    assert crop.shape == (40, 80, 3) and crop[:, :40].min() == 255 and crop[:, 40:].max() == 128
    big = cut_crop(np.zeros((1000, 2000, 3), np.uint8), seg("x", 1, (0, 0, 2000, 1000)), CropSpec(padding=0, max_side=256))
    assert big.size == (256, 128)


def test_ids_are_versioned():
    """Golden values are in tests/test_golden.py; here: what must make ids differ."""
    assert feature_id("s", "d", "img", "car", 0) != feature_id("s", "d", "img", "car", 1)
    assert feature_id("s", "d", "img", "car", 0) != feature_id("s", "d2", "img", "car", 0)  # same bytes, 2 datasets
    a = segmenter_id(SegmenterSpec(), CropSpec())
    assert a.startswith("facebook--mask2former-swin-large-mapillary-vistas-panoptic@main-")
    assert segmenter_id(SegmenterSpec(score_threshold=0.6), CropSpec()) != a
    assert segmenter_id(SegmenterSpec(), CropSpec(padding=0.2)) != a
    assert segmenter_id(TINY, CropSpec()).startswith("UNTRAINED-tiny-random-demo@")
    spec = SegmenterSpec(overlay={"g50": {"top": 0.12, "bottom": 0.45}})
    assert overlay_rows(662, spec, "g50") == (79, 285) and overlay_rows(662, spec, "im2gps") == (0, 662)


@pytest.mark.usefixtures("prefect_harness")
def test_demo_build_with_ground_truth_masks(root):
    result = build_feature_datasets(demo=SMALL, segmenter=SegmenterSpec(kind="annotations"), run=RUN, home=root.url)
    seg_result = result["segmented"]
    assert seg_result["images"] == 3 * 4 + 3 * 1  # every ingested image, no messy ones
    con = connect(root)
    groups = dict(con.sql('SELECT "group", count(*) FROM features GROUP BY 1').fetchall())
    assert set(groups) == {"ground", "structure", "vegetation", "vehicle", "furniture"}
    bad = con.sql("""SELECT count(*) FROM features f JOIN images i USING (image_id)
                     WHERE f.bbox[1] < 0 OR f.bbox[2] < 0 OR f.bbox[3] > i.width OR f.bbox[4] > i.height
                        OR f.bbox[1] >= f.bbox[3] OR f.bbox[2] >= f.bbox[4] OR f.split <> i.split
                        OR f.country <> i.country""").fetchall()
    assert bad == [(0,)]
    dupes = con.sql("SELECT count(*) - count(DISTINCT feature_id) FROM features").fetchall()
    assert dupes == [(0,)]
    crop = con.sql("SELECT crop, crop_width, crop_height FROM features LIMIT 1").fetchall()[0]
    assert Image.open(io.BytesIO(crop[0]["bytes"])).size == (crop[1], crop[2])
    assert con.sql("SELECT DISTINCT untrained, segmenter LIKE 'annotations@%' FROM features").fetchall() == [(False, True)]
    # A rerun segments nothing: zero model calls, no new shards, no file rewritten.
    before = {p: os.stat(p).st_mtime_ns for p in root.fs.find(root.url) if "/prefect/" not in p}
    again = segment(["demo", "demo-im2gps"], seg_result_spec(root), CropSpec(), RUN, home=root.url)
    assert (again["shards"], again["model_calls"]) == (0, 0)
    assert {p: os.stat(p).st_mtime_ns for p in root.fs.find(root.url) if "/prefect/" not in p} == before
    # With the overlay bands cut (a new segmenter version), every box lies inside the kept band.
    cut = SegmenterSpec(**{**seg_result_spec(root).model_dump(), "overlay": {"demo": {"top": 0.2, "bottom": 0.3}}})
    banded = segment(["demo"], cut, CropSpec(), RUN, home=root.url)
    assert banded["crops"] > 0
    outside = con_fresh(root).sql(f"""SELECT count(*) FROM features f JOIN images i USING (image_id, dataset)
        WHERE f.segmenter = '{banded["segmenter"]}'
          AND (f.bbox[2] < round(0.2 * i.height) OR f.bbox[4] > i.height - round(0.3 * i.height))""").fetchall()
    assert outside == [(0,)]


def con_fresh(root: DataRoot):
    return connect(root, fresh=True)


def seg_result_spec(root: DataRoot) -> SegmenterSpec:
    world = root.path("demo-world")
    return SegmenterSpec(kind="annotations", annotations=SMALL.annotations(world))


@pytest.mark.usefixtures("prefect_harness")
def test_tiny_model_path_and_resegmentation_keeps_old_versions(root):
    build_feature_datasets(demo=SMALL, segmenter=SegmenterSpec(kind="annotations"), run=RUN, home=root.url)
    first = segment(["demo"], TINY, TINY_CROPS, RUN, home=root.url)
    assert first["images"] == 12 and first["model_calls"] > 0
    changed = TINY.model_copy(update={"score_threshold": 0.01})
    second = segment(["demo"], changed, TINY_CROPS, RUN, home=root.url)
    assert second["segmenter"] != first["segmenter"] and second["images"] == 12  # everything again
    con = connect(root)
    versions = dict(con.sql("SELECT segmenter, count(DISTINCT image_id) FROM segmentations_all "
                            "WHERE dataset = 'demo' GROUP BY 1").fetchall())
    assert versions[first["segmenter"]] == 12 and versions[second["segmenter"]] == 12
    untrained = con.sql("SELECT DISTINCT untrained FROM features WHERE segmenter LIKE 'UNTRAINED%'").fetchall()
    assert untrained in ([(True,)], [])


@pytest.mark.usefixtures("prefect_harness")
def test_images_that_break_the_segmenter_are_quarantined(tmp_path, root):
    from flows.ingest import ingest

    write(tmp_path / "src" / "Chile" / "dot.png", image_bytes("PNG", size=(1, 1)))
    write(tmp_path / "src" / "Chile" / "strip.png", image_bytes("PNG", size=(2000, 20)))
    write(tmp_path / "src" / "Chile" / "ok.jpg", image_bytes("JPEG", size=(256, 128)))
    ingest(SourceSpec(layout="g50", source=str(tmp_path / "src"), dataset="odd"), home=root.url)
    result = segment(["odd"], TINY, TINY_CROPS, RUN, home=root.url)
    assert result["images"] == 3
    con = connect(root)
    reasons = dict(con.sql("SELECT regexp_extract(source_uri, '[^/]+$'), reason FROM quarantine "
                           "WHERE dataset = 'odd'").fetchall())
    assert reasons == {"dot.png": "unsegmentable", "strip.png": "unsegmentable"}
    status = dict(con.sql("SELECT status, count(*) FROM segmentations_all WHERE dataset = 'odd' GROUP BY 1").fetchall())
    assert status.get("quarantined") == 2 and sum(status.values()) == 3


KILL_SCRIPT = """
import sys
from flows import env; env.apply()
from flows.build_feature_datasets import build_feature_datasets
from tasks.specs import DemoSpec, RunOptions, SegmenterSpec
build_feature_datasets(demo=DemoSpec(countries=2, per_country=20, heldout_per_country=2, out=sys.argv[2]),
                       segmenter=SegmenterSpec(kind="annotations"),
                       run=RunOptions(batch_size=2, num_workers=0, shard_size=2), home=sys.argv[1])
"""


def features_snapshot(root: DataRoot) -> list[tuple]:
    con = connect(root)
    return con.sql("SELECT feature_id, image_id, label, bbox, md5(crop.bytes) FROM features ORDER BY feature_id").fetchall()


@pytest.mark.usefixtures("prefect_harness")
def test_kill_9_mid_segmentation_then_rerun_equals_a_clean_run(tmp_path):
    killed, clean = DataRoot(str(tmp_path / "killed")), DataRoot(str(tmp_path / "clean"))
    # Its own GEOFEAT_HOME, so its own temporary Prefect server: a kill leaves the `gpu` slot taken in
    # that server's database, where no later run looks.
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "GEOFEAT_HOME": str(tmp_path / "gh")}
    world = str(tmp_path / "world")  # shared, so both runs have the same segmenter id
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, killed.url, world], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    commits = Path(killed.url) / "_commits" / "segment"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(list(commits.rglob("*.json"))) < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the flow and its ephemeral server, mid-stage
    proc.wait()
    done_before = len(list(commits.rglob("*.json")))
    assert 3 <= done_before < 22, "the kill must land in the middle of segmentation"
    spec = DemoSpec(countries=2, per_country=20, heldout_per_country=2, out=world)
    run = RunOptions(batch_size=2, num_workers=0, shard_size=2)
    for root in (killed, clean):
        build_feature_datasets(demo=spec, segmenter=SegmenterSpec(kind="annotations"), run=run, home=root.url)
    after, reference = features_snapshot(killed), features_snapshot(clean)
    assert after == reference and len(after) > 0
    assert not [p for p in Path(killed.url).rglob("*.tmp-*")]


class FakeBackend:
    """predict() that runs out of CUDA memory above 2 images and breaks on one poisoned image."""

    def __init__(self):
        self.calls = []

    def predict(self, pixels, sizes, **kw):
        self.calls.append(len(sizes))
        if len(sizes) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")
        if any(int(p.sum()) == 7 for p in pixels):
            raise RuntimeError("kernel failed on this image")
        return [[seg("car", 100)] for _ in sizes]


def test_oom_halves_the_batch_and_one_bad_image_is_isolated():
    from tasks.segment import BatchSegmenter

    items = [{"image": torch.zeros((10, 20, 3), dtype=torch.uint8)} for _ in range(8)]
    pixels = torch.zeros((8, 3, 4, 4), dtype=torch.uint8)
    pixels[5, 0, 0, 0] = 7  # the poisoned one
    backend = FakeBackend()
    segment_batch = BatchSegmenter(backend, TINY, 8)
    out = segment_batch(items, pixels)
    assert segment_batch.size == 2 and backend.calls[0] == 8  # 8 -> OOM -> 4 -> OOM -> 2, and stays 2
    assert [isinstance(o, Exception) for o in out] == [False] * 5 + [True] + [False] * 2
    assert all(o[0].label == "car" for i, o in enumerate(out) if i != 5)


# ---------------------------------------------------------------- the streaming pipeline


def test_decode_rgb_gives_load_rgbs_pixels():
    """The stream's decoder skips load_rgb's two full-frame copies for plain RGB JPEGs; every other
    image goes through load_rgb itself. Same pixels either way, and bad input keeps its reason."""
    from tasks.segment_worker import decode_rgb
    from tasks.validate import BadInput, load_rgb

    rotated = Image.open(io.BytesIO(image_bytes("JPEG", size=(90, 40), seed=1)))
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90 degrees
    buf = io.BytesIO()
    rotated.save(buf, "JPEG", exif=exif)
    cases = [image_bytes("JPEG", size=(120, 50)), buf.getvalue(), image_bytes("JPEG", mode="L"),
             image_bytes("JPEG", mode="CMYK"), image_bytes("PNG", mode="RGBA"), image_bytes("WEBP")]
    for data in cases:
        fast, ref = decode_rgb(data), load_rgb(data)
        assert fast.mode == "RGB" and np.array_equal(np.asarray(fast), np.asarray(ref))
    assert decode_rgb(buf.getvalue()).size == (40, 90)  # turned upright
    with pytest.raises(BadInput) as bad:
        decode_rgb(image_bytes("JPEG", size=(200, 100))[:900])
    assert bad.value.reason == "truncated"


def reference_crops(root: DataRoot, names: list[str], spec: SegmenterSpec, crops: CropSpec, run: RunOptions) -> dict:
    """Today's crops, one image at a time as the stage cut them before it streamed: load_rgb, PIL
    overlay crop, the Preprocessor ([3, H, W]), the same batches (plan order, `batch_size`), cut_crop
    from the whole frame as an array, encode. feature_id -> (bbox, crop width, height, bytes)."""
    from tasks.segment import encode, label_groups, load_segmenter, plan_segment
    from tasks.validate import load_rgb

    segmenter = load_segmenter(spec, run.device)
    groups = label_groups(spec, segmenter)
    sid = segmenter_id(spec, crops)
    out = {}
    for plan in [p for name in names for p in plan_segment(root, name, sid, run.shard_size)]:
        for k in range(0, len(plan.images), run.batch_size):
            refs, frames, tops = plan.images[k:k + run.batch_size], [], []
            for ref in refs:
                img = load_rgb(Path(ref.source_uri).read_bytes())
                top, kept = overlay_rows(img.height, spec, ref.dataset)
                frames.append(img.crop((0, top, img.width, top + kept)))
                tops.append(top)
            pixels = torch.stack([segmenter.preprocessor(f) for f in frames])
            results = segmenter.predict(pixels, [(f.height, f.width) for f in frames], mode=spec.mode,
                                        score_threshold=spec.score_threshold, mask_threshold=spec.mask_threshold,
                                        overlap_threshold=spec.overlap_threshold)
            for ref, frame, top, segments in zip(refs, frames, tops, results):
                image = np.asarray(frame).copy()
                for s, group, rank in select_segments(segments, groups, crops):
                    crop = cut_crop(image, s, crops)
                    x0, y0, x1, y1 = s.bbox
                    fid = feature_id(sid, ref.dataset, ref.image_id, s.label, rank)
                    out[fid] = ([x0, y0 + top, x1, y1 + top], crop.width, crop.height, encode(crop, crops))
    return out


def stream_crops(root: DataRoot, segmenter: str) -> dict:
    con = connect(root, fresh=True)
    rows = con.sql("SELECT feature_id, bbox, crop_width, crop_height, crop.bytes FROM features WHERE segmenter = ?",
                   params=[segmenter]).fetchall()
    return {r[0]: (list(r[1]), r[2], r[3], r[4]) for r in rows}


@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_crops_equal_one_image_at_a_time(root, workers):
    """The stream (reader processes, shared-memory model inputs in [H, W, 3], crops cut beside the
    frame) gives the very crops of the former path for the same segmenter version: feature_ids,
    boxes, sizes, decoded pixels and bytes; with the overlay cut and with the background greyed."""
    from flows.ingest import ingest

    spec = SegmenterSpec(**{**TINY.model_dump(), "mode": "instance",  # ~10 overlapping segments per image
                            "overlay": {"demo": {"top": 0.1, "bottom": 0.25}}})
    run = RunOptions(batch_size=3, num_workers=workers, shard_size=5)
    world = str(root.path("world"))
    from tasks.demo_world.world import generate_demo_world

    generate_demo_world(world, DemoSpec(countries=2, per_country=6, heldout_per_country=0, messy=False))
    ingest(SourceSpec(layout="g50", source=f"{world}/g50", dataset="demo"), home=root.url)
    for crops in (TINY_CROPS, CropSpec(**{**TINY_CROPS.model_dump(), "mask_background": True, "max_side": 40,
                                          "padding_px": 2})):
        expected = reference_crops(root, ["demo"], spec, crops, run)
        result = segment(["demo"], spec, crops, run, home=root.url)
        got = stream_crops(root, result["segmenter"])
        assert len(got) == len(expected) > 60 and got.keys() == expected.keys()
        for fid, (bbox, w, h, data) in expected.items():
            assert got[fid][:3] == (bbox, w, h), fid
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(got[fid][3]))),
                                  np.asarray(Image.open(io.BytesIO(data)))), fid
            assert got[fid][3] == data, fid  # the same encoder on the same pixels: the same bytes


class PoisonedBackend:
    """A 'model' on the stream's [H, W, 3] inputs: out of CUDA memory above 2 images, broken by one
    image (recognised by its pixels), a car elsewhere."""

    untrained = False

    def __init__(self, poisoned_mean: float, preprocessor):
        self.poisoned, self.preprocessor, self.device, self.calls = poisoned_mean, preprocessor, torch.device("cpu"), []

    def predict(self, pixels, sizes, layout="chw", **kw):
        assert layout == "hwc" and pixels.shape[-1] == 3 and pixels.dtype == torch.uint8
        self.calls.append(len(sizes))
        if len(sizes) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")
        if any(abs(float(p.float().mean()) - self.poisoned) < 0.01 for p in pixels):
            raise RuntimeError("kernel failed on this image")
        return [[seg("car", 900, bbox=(2, 2, 40, 30))] for _ in sizes]


@pytest.mark.usefixtures("prefect_harness")
def test_stream_keeps_oom_back_off_and_isolates_the_image_that_breaks_the_model(tmp_path, root, monkeypatch):
    import tasks.segment as stage
    from flows.ingest import ingest
    from models.segmenter import Preprocessor

    for k in range(7):
        write(tmp_path / "src" / "Chile" / f"{k}.png", image_bytes("PNG", size=(96, 64), seed=k))
    flat = io.BytesIO()
    Image.new("RGB", (96, 64), (7, 7, 7)).save(flat, "PNG")
    write(tmp_path / "src" / "Chile" / "4.png", flat.getvalue())  # the poisoned one: mean 7 after any resize
    backend = PoisonedBackend(7.0, Preprocessor(32, 64))
    monkeypatch.setattr(stage, "load_segmenter", lambda spec, device="auto": backend)
    ingest(SourceSpec(layout="g50", source=str(tmp_path / "src"), dataset="odd"), home=root.url)
    spec = SegmenterSpec(checkpoint="fake-poisoned", label_set="demo")
    result = segment(["odd"], spec, TINY_CROPS, RunOptions(batch_size=4, num_workers=1, shard_size=7), home=root.url)
    assert result["images"] == 7 and backend.calls[0] == 4 and max(backend.calls[1:]) <= 2  # 4 -> OOM -> 2, stays 2
    con = connect(root)
    status = dict(con.sql("SELECT regexp_extract(i.source_uri, '[^/]+$'), s.status FROM segmentations_all s "
                          "JOIN images i USING (image_id) WHERE s.dataset = 'odd'").fetchall())
    assert status == {**{f"{k}.png": "ok" for k in range(7) if k != 4}, "4.png": "error"}
    reasons = con.sql("SELECT reason, detail FROM quarantine WHERE dataset = 'odd'").fetchall()
    assert len(reasons) == 1 and reasons[0][0] == "segmenter_error" and "kernel failed" in reasons[0][1]
    assert con.sql("SELECT count(*) FROM features WHERE dataset = 'odd'").fetchall() == [(6,)]


def test_a_dead_reader_fails_its_shards_and_the_next_stream_starts_fresh(root):
    """A reader process that dies (OOM killer, a crash in a decoder) fails the shards in flight with
    a clear error instead of hanging them; the next shard gets a new stream."""
    import tasks.segment as stage
    from tasks.demo_world.world import generate_demo_world
    from tasks.segment import ImageRef, SegmentPlan

    world = str(root.path("world"))
    generate_demo_world(world, DemoSpec(countries=1, per_country=4, heldout_per_country=0, messy=False))
    files = sorted(Path(world, "g50").rglob("*.jpg"))
    plan = SegmentPlan(dataset="demo", shard_id="s1", segmenter_id="x", images=[
        ImageRef(image_id=f"{k:064d}", dataset="demo", split="train", country="US", source_uri=str(f))
        for k, f in enumerate(files)])
    run = RunOptions(batch_size=2, num_workers=1, shard_size=4)
    stream = stage._stream(TINY, TINY_CROPS, run)
    os.kill(stream.procs[0].pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match=r"reader process \d+ exited with code -9"):
        stage.segment_shard(root, plan, TINY, TINY_CROPS, run)
    result = stage.segment_shard(root, plan, TINY, TINY_CROPS, run)  # a new stream
    assert result["images"] == 4 and not result["cached"]
    stage.close_streams()


KILL_COMMIT_SCRIPT = """
import sys, time
from concurrent.futures import ThreadPoolExecutor
import storage.shards as shards
import tasks.segment as stage
from storage.layout import DataRoot
from tasks.specs import CropSpec, DemoSpec, RunOptions, SegmenterSpec

home, world, marker = sys.argv[1], sys.argv[2], sys.argv[3]
real = shards.atomic_write
records = []

def stall_third_record(root, path, write):
    # the third shard's Parquet files are in place; its record would be next
    if "/_commits/segment/" in path:
        records.append(path)
        if len(records) == 3:
            open(marker, "w").write(path)
            time.sleep(600)
    return real(root, path, write)

shards.atomic_write = stall_third_record
root = DataRoot(home)
spec = SegmenterSpec(kind="annotations", annotations=DemoSpec(**DEMO).annotations(world))
run = RunOptions(batch_size=2, num_workers=1, shard_size=3)
plans = [p for name in ("demo", "demo-im2gps")
         for p in stage.plan_segment(root, name, stage.segmenter_id(spec, CropSpec()), run.shard_size)]
with ThreadPoolExecutor(run.concurrent_shards) as pool:  # what the flow does, without Prefect
    list(pool.map(lambda plan: stage.segment_shard(root, plan, spec, CropSpec(), run), plans))
"""
KILL_DEMO = {"countries": 2, "per_country": 6, "heldout_per_country": 1}


@pytest.mark.usefixtures("prefect_harness")
def test_kill_9_during_a_background_commit_then_rerun_equals_a_clean_run(tmp_path):
    """The commit thread is stopped between a shard's Parquet renames and its record, while the
    driver goes on with the next shards; kill -9 then. The reader processes exit by themselves (no
    orphans), and the rerun's features equal a clean run's: no duplicate, no temp file. (The killed
    run streams the shards as the flow does, without Prefect: a kill is about the stream's commits.)"""
    import psutil

    killed, clean = DataRoot(str(tmp_path / "killed")), DataRoot(str(tmp_path / "clean"))
    world, marker = str(tmp_path / "world"), tmp_path / "marker"
    spec = DemoSpec(**KILL_DEMO, out=world)
    run = RunOptions(batch_size=2, num_workers=1, shard_size=3)
    build_feature_datasets(demo=spec, segmenter=None, home=killed.url)  # ingest only
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    script = KILL_COMMIT_SCRIPT.replace("DemoSpec(**DEMO)", f"DemoSpec(**{KILL_DEMO!r})")
    proc = subprocess.Popen([sys.executable, "-c", script, killed.url, world, str(marker)], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not marker.exists() and proc.poll() is None:
            time.sleep(0.05)
        assert marker.exists(), "the third shard's commit never started"
        time.sleep(0.2)
        record = Path(marker.read_text())
        files = [p for p in Path(killed.url).rglob(f"{record.stem}.parquet")]
        assert files and not record.exists(), "the kill must land between the files and the record"
        readers = psutil.Process(proc.pid).children()
        assert readers, "a reader process should be running"
        os.kill(proc.pid, signal.SIGKILL)  # the stage's process only: its readers must notice and exit
        proc.wait()
        gone, alive = psutil.wait_procs(readers, timeout=15)
        assert not alive, f"orphaned reader processes: {alive}"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for root in (killed, clean):
        build_feature_datasets(demo=spec, segmenter=SegmenterSpec(kind="annotations"), run=run, home=root.url)
    after, reference = features_snapshot(killed), features_snapshot(clean)
    assert after == reference and len(after) > 0
    assert len({r[0] for r in after}) == len(after)
    assert not [p for p in Path(killed.url).rglob("*.tmp-*")]
