"""Segmentation stage throughput, side by side in one run (same model, batch size, device).

    .venv/bin/python benchmarks/segment_throughput.py [--images 480] [--batch-size 8]
        [--model tiny|swin-tiny|swin-large] [--input 192x416] [--width 768] [--device auto] [--workers N]
        [--ceiling-images 480] [--cores 16] [--target 170] [--rss-images 48]

Measures (targets in brackets):
  ceiling: the `segment` flow on G50-sized frames (1536x662, overlay cut, 384x832 model input) with
      the model replaced by recorded segments returned instantly (the demo world's ground truth plus
      synthetic poles, signs, cars...: ~15 crops per frame). img/s and CPU core-ms per frame, by step
      (read, decode, resize, post-process, crops, encode, commit, Prefect overhead)
      everything outside the model                            [<= 25 core-ms per frame on 2 cores]
      and from it the ceiling on a --cores machine, and the cores a --target img/s model needs
  (a) model forward + post-process img/s on pre-decoded, pre-processed tensors
  (b) the whole `segment` flow: image files -> decode -> model -> crops -> committed Parquet
      ratio (b)/(a)                                         [>= 0.8 CPU tiny, >= 0.9 GPU]
  no-op rerun of build-feature-datasets: model calls, wall vs the first build  [0, <= 5%]
  +10% new images: wall vs the first build                                     [<= 15%]
      with the fixed seconds of each (model load, planning, catalog refresh, ...)
  peak RSS of the stage at N and 10N images (--rss-images N, subprocesses)     [<= 1.3x]
CPU figures are CPU time (getrusage: the flow process, its reader processes, the Prefect server),
so other load on the machine disturbs them less than wall time. Models are random-init (no weights
can be downloaded here): throughput is real, crops are noise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import resource
import struct
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# Light imports only at module level: reader processes started with `spawn` re-import this file.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

G50_CUT = {"top": 0.12, "bottom": 0.45}  # the GeoGuessr overlay bands of a G50 frame
G50_SIZE = (1536, 662)  # px


def cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def server_process():
    """The temporary Prefect server this process started (its CPU is Prefect's, too)."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            if "prefect.server" in " ".join(child.cmdline()):
                return child
        except psutil.Error:
            pass
    return None


def proc_cpu(proc) -> float:
    if proc is None:
        return 0.0
    t = proc.cpu_times()
    return t.user + t.system


def world(path: Path, images: int, width: int, height: int | None = None, seed: int = 0, copies: int = 1) -> str:
    """A demo world of about `images` G50-layout frames. With `copies` > 1 only images / copies frames
    are drawn (drawing a 1536 px frame takes longer than segmenting it) and each is written `copies`
    times with a different JPEG comment: distinct files and image ids, the same pixels."""
    from tasks.demo_world.world import generate_demo_world
    from tasks.specs import DemoSpec

    per = max(1, math.ceil(images / 6 / copies))
    generate_demo_world(str(path), DemoSpec(seed=seed, countries=6, per_country=per, heldout_per_country=0,
                                            width=width, height=height or int(width * 662 / 1536), messy=False))
    if copies > 1:
        for f in sorted((path / "g50").rglob("*.jpg")):
            data = f.read_bytes()
            for k in range(1, copies):
                note = f"geofeat benchmark copy {k}".encode()
                f.with_name(f"{f.stem}-copy{k}.jpg").write_bytes(
                    data[:2] + b"\xff\xfe" + struct.pack(">H", len(note) + 2) + note + data[2:])
    return str(path / "g50")


# ---------------------------------------------------------------- the model-free ceiling


class RecordedSegmenter:
    """A 'model' that returns recorded segments instantly. It looks an image up by a fingerprint of
    its model input, so it sees exactly what a model would: the pixels the stage prepared."""

    untrained = False

    def __init__(self, preprocessor, segments: dict[bytes, list]):
        import torch

        self.preprocessor, self.segments, self.device = preprocessor, segments, torch.device("cpu")

    @staticmethod
    def key(hwc) -> bytes:
        return hashlib.blake2b(hwc[::8, ::8].tobytes(), digest_size=16).digest()

    def predict(self, pixels, sizes, layout="chw", **_):
        frames = pixels.numpy() if layout == "hwc" else pixels.permute(0, 2, 3, 1).numpy()
        return [self.segments[self.key(f)] for f in frames]


def record_segments(folder: str, spec, crops, groups) -> tuple[dict, float]:
    """Ground truth of every frame after the overlay cut, plus synthetic poles, signs, bollards, cars,
    trucks, trees and buildings of realistic sizes (a Vistas model finds more small things than the
    demo world draws), keyed by the frame's model input. Returns them and the crops per frame."""
    import numpy as np
    from PIL import Image

    from models.annotations import AnnotationsSegmenter, PanopticAnnotations
    from models.segmenter import Segment
    from storage import sources
    from tasks.segment import select_segments
    from tasks.segment_worker import read_frame

    base = Path(folder).parent
    gt = AnnotationsSegmenter({"ceiling": PanopticAnnotations(str(base / "panoptic/g50.json"),
                                                              str(base / "panoptic/g50"), folder)})
    ids = {c["name"]: c["id"] for c in gt.sources["ceiling"].categories.values()}
    sizes = {"car": ((60, 250), (30, 110)), "truck": ((150, 350), (60, 150)), "pole": ((8, 30), (60, 285)),
             "traffic-sign": ((20, 60), (20, 60)), "bollard": ((20, 30), (20, 40)),
             "vegetation": ((100, 600), (60, 285)), "building": ((150, 700), (80, 285))}  # px: (w range, h range)
    rng = np.random.default_rng(0)
    h_in, w_in = spec.input_height, spec.input_width
    out, counts = {}, []
    for f in sorted(sources.list_files(folder), key=lambda f: f.uri):
        if not f.rel.endswith(".jpg") or "-copy" in f.rel:  # a copy has its original's pixels and segments
            continue
        frame, top = read_frame(f.uri, "ceiling", spec)
        W, H = frame.size
        segs = gt.segments_for("ceiling", f.uri, top, H, W) or []
        mh, mw = (segs[0].mask.shape if segs else (H // 4, W // 4))
        for label, (wr, hr) in sizes.items():
            for _ in range(rng.integers(0, 2) if label in ("vegetation", "building", "truck") else rng.integers(1, 3)):
                w, h = int(rng.integers(*wr)), min(H, int(rng.integers(*hr)))
                x0, y0 = int(rng.integers(0, W - w)), int(rng.integers(0, H - h + 1))
                m = np.zeros((mh, mw), bool)
                m[y0 * mh // H:(y0 + h) * mh // H + 1, x0 * mw // W:(x0 + w) * mw // W + 1] = True
                m.flags.writeable = False
                segs.append(Segment(label, ids[label], 0.9, (x0, y0, x0 + w, y0 + h), w * h, m))
        pixels = np.asarray(frame.resize((w_in, h_in), Image.Resampling.BILINEAR))
        out[RecordedSegmenter.key(pixels)] = segs
        counts.append(len(select_segments(segs, groups, crops)))
    return out, sum(counts) / max(1, len(counts))


def steps_per_frame(stats: dict, frames: int) -> dict[str, float]:
    """core-ms per frame of each step of the stream (tasks/segment_stream.stream_stats)."""
    ms = lambda key: stats.get(key, 0) / 1e6 / max(1, frames)  # noqa: E731
    worker_steps = ("read", "decode", "resize", "annotate", "crop", "encode")
    out = {step: ms(f"worker_{step}") for step in worker_steps}
    out["worker other (IPC, Python)"] = max(0.0, ms("worker_cpu") - sum(out.values())) if stats.get("worker_cpu") else 0.0
    out["post-process (select, boxes, batch)"] = ms("postprocess") + ms("batch")
    out["model (recorded: lookup)"] = ms("model")
    out["rows (feature ids, row dicts)"] = ms("rows")
    out["commit (Parquet + record, background)"] = ms("commit")
    out["driver other (dispatch, replies)"] = max(0.0, ms("driver") - ms("postprocess") - ms("batch") - ms("model")
                                                  - ms("rows"))
    return out


def direct_stage(root, names: list[str], spec, crops, run) -> int:
    """What the `segment` flow does, without Prefect: plan, the same shards through the same stream
    (`concurrent_shards` at a time), close the stream, refresh the catalog, quality checks."""
    import tasks.segment as stage
    from storage.catalog import refresh_catalog
    from tasks.quality import quality_checks

    segmenter = stage.segmenter_id(spec, crops)
    plans = [p for name in names for p in stage.plan_segment(root, name, segmenter, run.shard_size)]
    images = 0
    if plans:
        with ThreadPoolExecutor(run.concurrent_shards) as pool:
            images = sum(r["images"] for r in pool.map(lambda p: stage.segment_shard(root, p, spec, crops, run), plans))
        stage.close_streams()
    refresh_catalog(root)
    quality_checks(root, segmenter, names)
    return images


def ceiling(args, tmp: Path) -> list[tuple[str, str, str]]:
    """The stage with an instant 'model', through the flow and without Prefect, side by side; each
    once on new images and once as a no-op (the fixed CPU of a run: flow run, planning, refresh)."""
    import tasks.segment as stage
    from flows.ingest import ingest
    from flows.segment import segment
    from models.segmenter import Preprocessor
    from storage.layout import DataRoot
    from tasks.specs import CropSpec, RunOptions, SegmenterSpec, SourceSpec

    folder = world(tmp / "ceiling-world", args.ceiling_images, *G50_SIZE, copies=4)
    spec = SegmenterSpec(kind="mask2former", checkpoint="recorded-segments", label_set="demo",
                         overlay={"ceiling": G50_CUT}, input_height=384, input_width=832)
    crops = CropSpec()
    groups = stage.label_groups(spec, None)
    segments, crops_per_frame = record_segments(folder, spec, crops, groups)
    fake = RecordedSegmenter(Preprocessor(384, 832), segments)
    real_load = stage.load_segmenter
    stage.load_segmenter = lambda spec, device="auto": fake
    run = RunOptions(device="cpu", batch_size=16, num_workers=args.workers)
    workers = stage.stream_workers(run, fake)
    source = SourceSpec(layout="g50", source=folder, dataset="ceiling")
    res = {}
    try:
        for how in ("flow", "direct"):
            home = str(tmp / f"ceiling-{how}")
            ingest(source, home=home)  # not measured
            for rerun in (False, True):
                stage.stream_stats(reset=True)
                server = server_process()
                c0, s0, t0 = cpu_s(), proc_cpu(server), time.perf_counter()
                if how == "flow":
                    images = segment(["ceiling"], spec, crops, run, home=home)["images"]
                else:
                    images = direct_stage(DataRoot(home), ["ceiling"], spec, crops, run)
                wall = time.perf_counter() - t0
                stats = stage.stream_stats(reset=True)
                res[how, rerun] = {"images": images, "wall": wall, "main": cpu_s() - c0,
                                   "server": proc_cpu(server) - s0, "workers": stats.get("worker_cpu", 0) / 1e9,
                                   "stats": stats}
    finally:
        stage.load_segmenter = real_load
    flow, direct, flow0, direct0 = res["flow", False], res["direct", False], res["flow", True], res["direct", True]
    n = flow["images"]
    per = lambda s: 1000 * s / n  # noqa: E731  core-ms per frame
    steps = steps_per_frame(flow["stats"], n)
    model = steps["model (recorded: lookup)"]
    fixed_prefect = max(0.0, flow0["main"] - direct0["main"])  # core-s per run: flow run, task-less planning
    prefect = max(0.0, per(flow["main"] - direct["main"] - fixed_prefect))
    if flow["workers"]:
        worker_ms = per(flow["workers"])
    else:  # inline: the readers' steps ran in the flow process
        worker_ms = sum(steps[k] for k in ("read", "decode", "resize", "crop", "encode"))
    main_scale = per(flow["main"] - flow0["main"]) - model - (0 if flow["workers"] else worker_ms)
    outside = per(flow["main"] + flow["workers"]) - model
    server_ms = per(flow["server"] - flow0["server"])
    k = min(8, args.cores - 1)
    feed = k * 1000 / worker_ms
    gil = 1000 / max(main_scale, 1e-3)
    cores_fit = args.cores * 1000 / (worker_ms + main_scale + server_ms)
    need = args.target * (worker_ms + main_scale + server_ms) / 1000
    rows = [("ceiling: frames, crops per frame (recorded segments)", f"{n}, {crops_per_frame:.1f}", "10-20"),
            (f"ceiling: flow img/s on this machine ({workers} reader processes)", f"{n / flow['wall']:.1f} img/s", ""),
            ("ceiling: same stream without Prefect", f"{direct['images'] / direct['wall']:.1f} img/s", "")]
    for step in ("read", "decode", "resize"):
        rows.append((f"  {step}", f"{steps[step]:.2f} core-ms", ""))
    rows += [
        ("  post-process (select, boxes, batch)", f"{steps['post-process (select, boxes, batch)']:.2f} core-ms", ""),
        ("  crops (cut + downscale)", f"{steps['crop']:.2f} core-ms", ""),
        ("  encode (JPEG)", f"{steps['encode']:.2f} core-ms", ""),
        ("  commit (Parquet + record, background thread)",
         f"{steps['commit (Parquet + record, background)']:.2f} core-ms", ""),
        ("  rows (feature ids, row dicts)", f"{steps['rows (feature ids, row dicts)']:.2f} core-ms", ""),
        ("  reader processes: IPC, Python", f"{steps['worker other (IPC, Python)']:.2f} core-ms", ""),
        ("  driver: dispatch, replies", f"{steps['driver other (dispatch, replies)']:.2f} core-ms", ""),
        ("  Prefect overhead per frame, flow process (flow - direct)", f"{prefect:.2f} core-ms", ""),
        ("  fixed per run: flow process, Prefect part / all (no-op run)",
         f"{fixed_prefect:.2f} / {flow0['main']:.2f} core-s", ""),
        ("  Prefect server process per frame (not counted below)", f"{server_ms:.2f} core-ms", ""),
        ("everything outside the model", f"{outside:.1f} core-ms", "<= 25"),
        ("  at scale (fixed per run left out): readers / flow process",
         f"{worker_ms:.1f} / {main_scale:.1f} core-ms", ""),
        (f"ceiling on {args.cores} cores: {k} readers / one GIL / all cores",
         f"{feed:.0f} / {gil:.0f} / {cores_fit:.0f}", "img/s"),
        (f"ceiling on {args.cores} cores (the least of those)", f"{min(feed, gil, cores_fit):.0f} img/s",
         f">= {args.target:g}"),
        (f"cores a {args.target:g} img/s model needs for the rest", f"{need:.1f} cores", f"<= {args.cores}"),
    ]
    return rows


# ---------------------------------------------------------------- the model


def segmenter_spec(args, tmp: Path):
    """The spec the flow runs; a swin-sized random model is saved once and loaded like any checkpoint."""
    from models.labels import load_label_map
    from models.segmenter import Mask2FormerSegmenter, swin_large_config, swin_tiny_config
    from tasks.specs import SegmenterSpec

    h, w = args.input
    spec = SegmenterSpec(kind="tiny-random", label_set="demo", input_height=h, input_width=w, score_threshold=0.0)
    if args.model != "tiny":
        labels = [label.name for label in load_label_map("demo").labels]
        config = (swin_tiny_config if args.model == "swin-tiny" else swin_large_config)(labels)
        path = tmp / f"{args.model}-random"
        Mask2FormerSegmenter.random_init(config, input_size=(h, w)).save(path)
        spec = spec.model_copy(update={"kind": "mask2former", "checkpoint": str(path)})
    return spec


def model_only(seg, folder: str, batch: int, threads: int | None = None, limit: int = 160) -> tuple[float, int, float]:
    """(a): pixels already decoded and preprocessed; time forward + post-processing only, on up to
    `limit` images, with `threads` intra-op threads (None: torch's default). Returns (wall s, images,
    CPU s of this process)."""
    import torch

    from storage import sources
    from tasks.validate import load_rgb

    files = sorted((f for f in sources.list_files(folder) if f.rel.endswith(".jpg")), key=lambda f: f.uri)[:limit]
    imgs = [load_rgb(sources.read_bytes(f.uri)) for f in files]
    pixels = torch.stack([seg.preprocessor(im) for im in imgs])
    sizes = [(im.height, im.width) for im in imgs]
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        for k in range(0, min(len(imgs), 3 * batch), batch):  # warm-up: kernels, allocator
            seg.predict(pixels[k:k + batch], sizes[k:k + batch], score_threshold=0.0)
        if seg.device.type == "cuda":
            torch.cuda.synchronize()
        c, t = cpu_s(), time.perf_counter()
        for k in range(0, len(imgs), batch):
            seg.predict(pixels[k:k + batch], sizes[k:k + batch], score_threshold=0.0)
        if seg.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t, len(imgs), cpu_s() - c
    finally:
        torch.set_num_threads(before)


RSS_CHILD = """
import json, sys, threading
import psutil
sys.path.insert(0, sys.argv[1])
from flows import env; env.apply()
from tasks.specs import CropSpec, RunOptions, SegmenterSpec
from storage.layout import DataRoot
from tasks.ingest import ingest_shard, list_source, plan_shards
from tasks.segment import close_streams, load_segmenter, plan_segment, segment_shard, segmenter_id
root = DataRoot(sys.argv[3])
listing = list_source("g50", sys.argv[2])
params = {"dataset": "rss", "layout": "g50", "split": {"policy": "hash", "train": 0.8, "val": 0.1}, "max_pixels": 10**8}
for plan in plan_shards("rss", listing, set(), params, 256):
    ingest_shard(root, plan)
spec, crops = SegmenterSpec.model_validate_json(sys.argv[4]), CropSpec(min_score=0.0, min_area=1)
run = RunOptions.model_validate_json(sys.argv[5])
load_segmenter(spec, run.device)
me, peak, stop = psutil.Process(), {"main": 0, "reader": 0, "total": 0}, threading.Event()

def sample():  # RSS of this process and of its reader processes, every 50 ms while the stage runs
    while not stop.is_set():
        try:
            main, readers = me.memory_info().rss, [c.memory_info().rss for c in me.children()]
        except psutil.Error:
            continue
        peak.update(main=max(peak["main"], main), reader=max([peak["reader"], *readers]),
                    total=max(peak["total"], main + sum(readers)))
        stop.wait(0.05)

before = me.memory_info().rss
sampler = threading.Thread(target=sample)
sampler.start()
for plan in plan_segment(root, "rss", segmenter_id(spec, crops), run.shard_size):
    segment_shard(root, plan, spec, crops, run)
close_streams()
stop.set()
sampler.join()
print(json.dumps({**{k: v // 1024 for k, v in peak.items()}, "before": before // 1024}))
"""


def peak_rss(folder: str, home: Path, spec, run) -> dict:
    out = subprocess.run([sys.executable, "-c", RSS_CHILD, str(ROOT), folder, str(home), spec.model_dump_json(),
                          run.model_dump_json()], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def build_parts(result: dict, wall: float) -> str:
    """The fixed seconds of one build: segment planning / segmenting / refresh / quality, and the rest
    (flow start-up, ingest listing and planning, the build's own refresh, integrity gate, summary)."""
    t = (result.get("segmented") or {}).get("timings", {})
    inside = sum(t.values())
    return (f"plan {t.get('plan_s', 0):.2f} + segment {t.get('segment_s', 0):.2f} + refresh {t.get('refresh_s', 0):.2f}"
            f" + quality {t.get('quality_s', 0):.2f} + start-up/ingest/gate {wall - inside:.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=480)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--model", choices=["tiny", "swin-tiny", "swin-large"], default="tiny")
    ap.add_argument("--input", type=lambda s: tuple(int(v) for v in s.split("x")), default=(192, 416), help="HxW px")
    ap.add_argument("--width", type=int, default=768, help="px of the generated frames")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=None, help="reader/crop processes (default: the stage's)")
    ap.add_argument("--ceiling-images", type=int, default=480, help="G50-sized frames for the ceiling (0: skip)")
    ap.add_argument("--cores", type=int, default=16, help="cores of the machine the ceiling is projected to")
    ap.add_argument("--target", type=float, default=170, help="img/s of the model the ceiling must feed")
    ap.add_argument("--rss-images", type=int, default=48, help="N for the N vs 10N memory check (0: skip)")
    args = ap.parse_args()

    from flows import env as prefect_env

    prefect_env.apply()
    from prefect.testing.utilities import prefect_test_harness

    from flows.build_feature_datasets import build_feature_datasets
    from flows.ingest import ingest
    from flows.segment import segment
    import torch

    from tasks.segment import load_segmenter, stream_stats, stream_workers
    from tasks.specs import CropSpec, RunOptions, SourceSpec

    tmp = Path(tempfile.mkdtemp(prefix="geofeat-segbench-"))
    folder = world(tmp / "world", args.images, args.width)
    spec = segmenter_spec(args, tmp)
    t = time.perf_counter()
    seg = load_segmenter(spec, args.device)  # the very model object the flow below uses (cached)
    load_s = time.perf_counter() - t
    crops = CropSpec(min_score=0.0, min_area=16)
    run = RunOptions(device=args.device, batch_size=args.batch_size, num_workers=args.workers)
    source = SourceSpec(layout="g50", source=folder, dataset="bench")
    rows = []
    with prefect_test_harness(server_startup_timeout=90):
        if args.ceiling_images:
            rows += ceiling(args, tmp)
        # (a) at torch's default threads and at the threads the stage gives the model beside its
        # readers on a CPU (cores - readers); the faster is the model's own speed here.
        workers = stream_workers(run, seg)
        stage_threads = None
        if seg.device.type == "cpu" and workers:
            stage_threads = max(1, min(torch.get_num_threads(), (os.cpu_count() or 2) - workers))
        a = {"default": model_only(seg, folder, args.batch_size)}
        if stage_threads and stage_threads != torch.get_num_threads():
            a[f"{stage_threads} thread(s)"] = model_only(seg, folder, args.batch_size, stage_threads)
        best = min(a, key=lambda k: a[k][0] / a[k][1])
        home = str(tmp / "home")
        ingest(source, home=home)  # ingest is not part of (b)
        stream_stats(reset=True)
        t, c = time.perf_counter(), cpu_s()
        first = segment(["bench"], spec, crops, run, home=home)
        b_s, b_cpu = time.perf_counter() - t, cpu_s() - c
        b_readers = stream_stats(reset=True).get("worker_cpu", 0) / 1e9
        a_after = model_only(seg, folder, args.batch_size, None if best == "default" else stage_threads)
        a_ips = max(n / s for s, n, _ in (*a.values(), a_after))  # load on a shared machine varies: the best

        home2 = str(tmp / "home2")  # the whole build (ingest + segment) for the rerun comparisons
        t = time.perf_counter()
        full = build_feature_datasets([source], segmenter=spec, crops=crops, run=run, home=home2)
        full_s = time.perf_counter() - t
        t = time.perf_counter()
        noop = build_feature_datasets([source], segmenter=spec, crops=crops, run=run, home=home2)
        noop_s = time.perf_counter() - t
        extra = world(tmp / "extra", max(6, args.images // 10), args.width, seed=1)
        sources_all = [source, SourceSpec(layout="g50", source=extra, dataset="bench")]
        t = time.perf_counter()
        more = build_feature_datasets(sources_all, segmenter=spec, crops=crops, run=run, home=home2)
        inc_s = time.perf_counter() - t
        t = time.perf_counter()  # the no-op build's two stages as flows of their own
        ingest(source, home=home2)
        noop_ingest_s = time.perf_counter() - t
        t = time.perf_counter()
        segment(["bench"], spec, crops, run, home=home2)
        noop_segment_s = time.perf_counter() - t

    print(f"\nmachine: {platform.node()} {os.cpu_count()} cores ({platform.machine()}), "
          f"load average {os.getloadavg()[0]:.1f} at the end; device={seg.device}")
    print(f"model={args.model} input={args.input[0]}x{args.input[1]} batch={args.batch_size} readers={workers} "
          f"model threads={stage_threads or torch.get_num_threads()} images={first['images']} ({args.width}px frames)"
          " -- random-init weights")
    print(f"{'measure':62} {'value':>18} {'target':>10}")
    b_ips = first["images"] / b_s
    rows += [("(a) model forward + post-process, pre-decoded tensors", f"{a_ips:.1f} img/s", "")]
    for name, (s_, n_, c_) in a.items():
        rows.append((f"    (a) {name}: img/s, core-ms per image", f"{n_ / s_:.1f}, {1000 * c_ / n_:.1f}", ""))
    rows += [
        ("    (a) again after (b)", f"{a_after[1] / a_after[0]:.1f} img/s", ""),
        ("(b) segment flow: files -> crops -> committed Parquet", f"{b_ips:.1f} img/s", ""),
        ("    (b) core-ms per image: flow process + readers",
         f"{1000 * b_cpu / first['images']:.1f} + {1000 * b_readers / first['images']:.1f}", ""),
        ("(b) / (a)", f"{b_ips / a_ips:.2f}", ">= 0.8"),
        ("no-op rerun: model calls", f"{noop['segmented']['model_calls']}", "0"),
        ("no-op rerun: wall / first build", f"{noop_s / full_s:.1%}", "<= 5%"),
        (f"+{more['segmented']['images']} new images: wall / first build", f"{inc_s / full_s:.1%}", "<= 15%"),
        ("first build (ingest + segment) wall", f"{full_s:.1f} s", ""),
        ("  first build, fixed parts", build_parts(full, full_s), ""),
        ("  no-op rerun wall", f"{noop_s:.1f} s", ""),
        ("  no-op rerun, fixed parts", build_parts(noop, noop_s), ""),
        ("  no-op `ingest` / `segment` flow alone (each with its flow run)",
         f"{noop_ingest_s:.2f} / {noop_segment_s:.2f} s", ""),
        ("  +10% wall", f"{inc_s:.1f} s", ""),
        ("  +10%, fixed parts", build_parts(more, inc_s), ""),
        ("model load (once per process, not in (b))", f"{load_s:.1f} s", ""),
    ]
    if args.rss_images:
        small = world(tmp / "rss1", args.rss_images, args.width, seed=2)
        big = folder if 10 * args.rss_images <= args.images else world(tmp / "rss10", 10 * args.rss_images, args.width,
                                                                          seed=3)
        r1, r10 = peak_rss(small, tmp / "rss1-home", spec, run), peak_rss(big, tmp / "rss10-home", spec, run)
        rows.append((f"peak RSS {args.rss_images} vs {10 * args.rss_images} images: flow process + readers",
                     f"{r1['total'] / 1024:.0f} / {r10['total'] / 1024:.0f} MB", ""))
        rows.append(("  flow process (its growth during the stage)", f"{r1['main'] / 1024:.0f} ({(r1['main'] - r1['before']) / 1024:+.0f})"
                     f" / {r10['main'] / 1024:.0f} ({(r10['main'] - r10['before']) / 1024:+.0f}) MB", ""))
        rows.append(("  largest reader process", f"{r1['reader'] / 1024:.0f} / {r10['reader'] / 1024:.0f} MB", ""))
        rows.append(("peak RSS ratio 10N / N", f"{r10['total'] / r1['total']:.2f}", "<= 1.3"))
    for name, value, target in rows:
        print(f"{name:62} {value:>18} {target:>10}")


if __name__ == "__main__":
    main()
