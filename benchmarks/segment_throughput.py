"""Segmentation stage throughput, side by side in one run (same model, batch size, device).

    .venv/bin/python benchmarks/segment_throughput.py [--images 96] [--batch-size 8]
        [--model tiny|swin-tiny] [--input 192x416] [--device auto] [--workers N] [--rss-images 0]

Measures (DESIGN targets in brackets):
  (a) model forward + post-process img/s on pre-decoded, pre-processed tensors
  (b) the whole `segment` flow: image files -> decode -> model -> crops -> committed Parquet
      ratio (b)/(a)                                         [>= 0.8 CPU tiny, >= 0.9 GPU]
  no-op rerun of build-feature-datasets: model calls, wall vs the first build  [0, <= 5%]
  +10% new images: wall vs the first build                                     [<= 15%]
  peak RSS of the stage at N and 10N images (--rss-images N, subprocesses)     [<= 1.3x]
Models are random-init (no weights can be downloaded here): throughput is real, crops are noise.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows import env as prefect_env  # noqa: E402

prefect_env.apply()

import torch  # noqa: E402

from tasks.specs import CropSpec, RunOptions, SegmenterSpec, SourceSpec  # noqa: E402
from models.labels import load_label_map  # noqa: E402
from models.segmenter import Mask2FormerSegmenter, swin_tiny_config  # noqa: E402
from storage import sources  # noqa: E402
from tasks.demo_world.world import generate_demo_world  # noqa: E402
from tasks.specs import DemoSpec  # noqa: E402
from tasks.validate import load_rgb  # noqa: E402


def world(path: Path, images: int, width: int, seed: int = 0) -> str:
    per = max(1, images // 6)
    generate_demo_world(str(path), DemoSpec(seed=seed, countries=6, per_country=per, heldout_per_country=0,
                                                  width=width, height=int(width * 662 / 1536), messy=False))
    return str(path / "g50")


def segmenter_spec(args, tmp: Path) -> SegmenterSpec:
    """The spec the flow runs; a swin-tiny-sized random model is saved once and loaded like any checkpoint."""
    h, w = args.input
    spec = SegmenterSpec(kind="tiny-random", label_set="demo", input_height=h, input_width=w, score_threshold=0.0)
    if args.model == "swin-tiny":
        labels = [label.name for label in load_label_map("demo").labels]
        Mask2FormerSegmenter.random_init(swin_tiny_config(labels), input_size=(h, w)).save(tmp / "swin-tiny-random")
        spec = spec.model_copy(update={"kind": "mask2former", "checkpoint": str(tmp / "swin-tiny-random")})
    return spec


def model_only(seg: Mask2FormerSegmenter, folder: str, batch: int) -> tuple[float, int]:
    """(a): pixels already decoded and preprocessed; time forward + post-processing only."""
    files = [f for f in sources.list_files(folder) if f.rel.endswith(".jpg")]
    imgs = [load_rgb(sources.read_bytes(f.uri)) for f in files]
    pixels = torch.stack([seg.preprocessor(im) for im in imgs])
    sizes = [(im.height, im.width) for im in imgs]
    seg.predict(pixels[:batch], sizes[:batch], score_threshold=0.0)  # warm-up
    if seg.device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for k in range(0, len(imgs), batch):
        seg.predict(pixels[k:k + batch], sizes[k:k + batch], score_threshold=0.0)
    if seg.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, len(imgs)


RSS_CHILD = """
import json, resource, sys
sys.path.insert(0, sys.argv[1])
from flows import env; env.apply()
from tasks.specs import CropSpec, RunOptions, SegmenterSpec, SourceSpec
from storage.layout import DataRoot
from tasks.ingest import ingest_shard, list_source, plan_shards
from tasks.segment import plan_segment, segment_shard, segmenter_id
root = DataRoot(sys.argv[3])
listing = list_source("g50", sys.argv[2])
params = {"dataset": "rss", "layout": "g50", "split": {"policy": "hash", "train": 0.8, "val": 0.1}, "max_pixels": 10**8}
for plan in plan_shards("rss", listing, set(), params, 256):
    ingest_shard(root, plan)
spec, crops = SegmenterSpec.model_validate_json(sys.argv[4]), CropSpec(min_score=0.0, min_area=1)
run = RunOptions(batch_size=int(sys.argv[5]), num_workers=0, shard_size=64, device=sys.argv[6])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for plan in plan_segment(root, "rss", segmenter_id(spec, crops), run.shard_size):
    segment_shard(root, plan, spec, crops, run)
print(json.dumps({"peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "before_kb": base}))
"""


def peak_rss(folder: str, home: Path, spec: SegmenterSpec, args) -> dict:
    out = subprocess.run([sys.executable, "-c", RSS_CHILD, str(Path(__file__).resolve().parents[1]), folder, str(home),
                          spec.model_dump_json(), str(args.batch_size), args.device],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=480)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--model", choices=["tiny", "swin-tiny"], default="tiny")
    ap.add_argument("--input", type=lambda s: tuple(int(v) for v in s.split("x")), default=(192, 416), help="HxW px")
    ap.add_argument("--width", type=int, default=768, help="px of the generated frames")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: auto)")
    ap.add_argument("--rss-images", type=int, default=0, help="N for the N vs 10N memory check (0: skip)")
    args = ap.parse_args()

    from flows.build_feature_datasets import build_feature_datasets
    from flows.ingest import ingest
    from flows.segment import segment

    from tasks.segment import load_segmenter

    tmp = Path(tempfile.mkdtemp(prefix="geofeat-segbench-"))
    folder = world(tmp / "world", args.images, args.width)
    spec = segmenter_spec(args, tmp)
    t = time.perf_counter()
    seg = load_segmenter(spec, args.device)  # the very model object the flow below uses (cached)
    load_s = time.perf_counter() - t
    a_s, n = model_only(seg, folder, args.batch_size)
    h, w = args.input
    crops = CropSpec(min_score=0.0, min_area=16)
    run = RunOptions(device=args.device, batch_size=args.batch_size, num_workers=args.workers, shard_size=64)
    source = SourceSpec(layout="g50", source=folder, dataset="bench")

    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        home = str(tmp / "home")
        ingest(source, home=home)  # ingest is not part of (b)
        t = time.perf_counter()
        first = segment(["bench"], spec, crops, run, home=home)
        b_s = time.perf_counter() - t

        home2 = str(tmp / "home2")  # the whole build (ingest + segment) for the rerun comparisons
        t = time.perf_counter()
        build_feature_datasets([source], segmenter=spec, crops=crops, run=run, home=home2)
        full_s = time.perf_counter() - t
        t = time.perf_counter()
        noop = build_feature_datasets([source], segmenter=spec, crops=crops, run=run, home=home2)
        noop_s = time.perf_counter() - t
        extra = world(tmp / "extra", max(6, args.images // 10), args.width, seed=1)
        sources_all = [source, SourceSpec(layout="g50", source=extra, dataset="bench")]
        t = time.perf_counter()
        more = build_feature_datasets(sources_all, segmenter=spec, crops=crops, run=run, home=home2)
        inc_s = time.perf_counter() - t

    print(f"\nmodel={args.model} input={h}x{w} batch={args.batch_size} device={seg.device} workers={args.workers} "
          f"images={n} ({args.width}px frames) -- random-init weights")
    print(f"{'measure':58} {'value':>12} {'target':>10}")
    rows = [
        ("(a) model forward + post-process, pre-decoded tensors", f"{n / a_s:.1f} img/s", ""),
        ("(b) segment flow: files -> crops -> committed Parquet", f"{first['images'] / b_s:.1f} img/s", ""),
        ("(b) / (a)", f"{(first['images'] / b_s) / (n / a_s):.2f}", ">= 0.8"),
        ("no-op rerun: model calls", f"{noop['segmented']['model_calls']}", "0"),
        ("no-op rerun: wall / first build", f"{noop_s / full_s:.1%}", "<= 5%"),
        (f"+{more['segmented']['images']} new images: wall / first build", f"{inc_s / full_s:.1%}", "<= 15%"),
        ("first build (ingest + segment) wall", f"{full_s:.1f} s", ""),
        ("model load (once per process, not in (b))", f"{load_s:.1f} s", ""),
    ]
    if args.rss_images:
        small = world(tmp / "rss1", args.rss_images, args.width, seed=2)
        big = world(tmp / "rss10", 10 * args.rss_images, args.width, seed=3)
        r1, r10 = peak_rss(small, tmp / "rss1-home", spec, args), peak_rss(big, tmp / "rss10-home", spec, args)
        rows.append((f"peak RSS {args.rss_images} vs {10 * args.rss_images} images",
                     f"{r1['peak_kb'] / 1024:.0f} / {r10['peak_kb'] / 1024:.0f} MB", ""))
        rows.append(("peak RSS ratio 10N / N", f"{r10['peak_kb'] / r1['peak_kb']:.2f}", "<= 1.3"))
    for name, value, target in rows:
        print(f"{name:58} {value:>12} {target:>10}")


if __name__ == "__main__":
    main()
