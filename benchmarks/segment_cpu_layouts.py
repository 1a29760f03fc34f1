"""Why (b)/(a) stays near 0.55-0.6 on a 2-core CPU: the segment flow in three CPU layouts, side by
side in one run, against the model alone at torch's default threads.

    .venv/bin/python benchmarks/segment_cpu_layouts.py [--images 480] [--width 768] [--repeats 2]

Layouts (the tiny random-init Mask2Former at 192x416, batch 8, the demo-like world of
segment_throughput.py):
  1 reader, 1 model thread   the stage's CPU default (readers = cores // 4, the model the rest)
  1 reader, 2 model threads  the model keeps every core, the reader competes for them
  inline, 2 model threads    no reader process: host work between batches, on the model's thread
On a 2-core machine the model alone uses both cores, so any host work (decode, resize, crops, encode:
~6-8 core-ms per frame here) is taken from the model: (b)/(a) <= model / (model + host) whatever the
layout. The GPU host is where the stream pays (docs/scaling.md). Not a test: numbers depend on load.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=480)
    ap.add_argument("--width", type=int, default=768, help="px of the generated frames")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    import segment_throughput as bench
    import torch
    from prefect.testing.utilities import prefect_test_harness

    from flows.ingest import ingest
    from flows.segment import segment
    from tasks.segment import load_segmenter
    from tasks.specs import CropSpec, RunOptions, SourceSpec

    spec_args = argparse.Namespace(model="tiny", input=(192, 416), device="cpu")
    tmp = Path(tempfile.mkdtemp(prefix="geofeat-cpu-layouts-"))
    folder = bench.world(tmp / "world", args.images, args.width)
    spec = bench.segmenter_spec(spec_args, tmp)
    seg = load_segmenter(spec, "cpu")
    crops = CropSpec(min_score=0.0, min_area=16)
    source = SourceSpec(layout="g50", source=folder, dataset="bench")
    set_threads = torch.set_num_threads
    layouts = [("1 reader, 1 model thread", None, None), ("1 reader, 2 model threads", None, 2),
               ("inline, 2 model threads", 0, None)]
    rows: dict[str, list[float]] = {name: [] for name, _, _ in layouts} | {"(a) model alone, default threads": []}
    with prefect_test_harness(server_startup_timeout=90):
        for rep in range(args.repeats):
            for i, (name, workers, threads) in enumerate(layouts):
                home = str(tmp / f"home-{rep}-{i}")
                ingest(source, home=home)
                if threads:  # the stream sets the model's threads beside its readers; keep `threads` instead
                    torch.set_num_threads = lambda n, keep=threads: set_threads(keep)
                try:
                    t = time.perf_counter()
                    result = segment(["bench"], spec, crops, RunOptions(device="cpu", batch_size=8, num_workers=workers),
                                     home=home)
                    rows[name].append(result["images"] / (time.perf_counter() - t))
                finally:
                    torch.set_num_threads = set_threads
            seconds, n, _ = bench.model_only(seg, folder, 8)
            rows["(a) model alone, default threads"].append(n / seconds)
    a = max(rows["(a) model alone, default threads"])
    print(f"\nmachine: {platform.node()} {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end; "
          f"tiny random-init model, {args.images} frames of {args.width} px, {args.repeats} repeats")
    print(f"{'layout':36} {'img/s per repeat':>24} {'best / (a)':>10}")
    for name, values in rows.items():
        print(f"{name:36} {', '.join(f'{v:.1f}' for v in values):>24} {max(values) / a:>10.2f}")


if __name__ == "__main__":
    main()
