"""Where a no-op rerun of build-feature-datasets spends its time: cProfile of the flow run.

    .venv/bin/python benchmarks/noop_profile.py [--images 480] [--width 768] [--top 40]

Builds the demo-like world of segment_throughput.py with the tiny random-init model, then reruns the
build twice (nothing new: no model call) and profiles the second rerun. Prints the wall times and
the functions by cumulative time: Prefect's flow engine (heartbeat thread join, API calls, artifacts),
DuckDB connections, the integrity and quality checks. Not a test: numbers depend on load.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import platform
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=480)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args()

    import segment_throughput as bench
    from prefect.testing.utilities import prefect_test_harness

    from flows.build_feature_datasets import build_feature_datasets
    from tasks.specs import CropSpec, RunOptions, SourceSpec

    tmp = Path(tempfile.mkdtemp(prefix="geofeat-noop-"))
    folder = bench.world(tmp / "world", args.images, args.width)
    spec = bench.segmenter_spec(argparse.Namespace(model="tiny", input=(192, 416), device="cpu"), tmp)
    build = dict(sources=[SourceSpec(layout="g50", source=folder, dataset="bench")], segmenter=spec,
                 crops=CropSpec(min_score=0.0, min_area=16), run=RunOptions(device="cpu", batch_size=8),
                 home=str(tmp / "home"))
    profile = cProfile.Profile()
    with prefect_test_harness(server_startup_timeout=90):
        walls = []
        for i in range(3):
            t = time.perf_counter()
            if i == 2:
                profile.enable()
            build_feature_datasets(**build)
            profile.disable()
            walls.append(time.perf_counter() - t)
    print(f"\nmachine: {platform.node()} {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; "
          f"first build {walls[0]:.2f} s, no-op {walls[1]:.2f} s ({walls[1] / walls[0]:.1%}), "
          f"no-op profiled {walls[2]:.2f} s")
    pstats.Stats(profile).sort_stats("cumulative").print_stats(args.top)


if __name__ == "__main__":
    main()
