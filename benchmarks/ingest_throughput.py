"""Ingest throughput on G50-sized JPEGs (1536x662), measured side by side in one run.

    .venv/bin/python benchmarks/ingest_throughput.py [--images 400] [--shard-size 100]

Prints images/s for: read+sha256 only (the I/O floor), full decode vs the JPEG draft decode
that ingest uses, one shard through `ingest_shard` (no Prefect), and the whole `ingest` flow
(Prefect, thread pool, planning and catalog refresh included); then a no-op rerun.
Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows import env as prefect_env  # noqa: E402

prefect_env.apply()

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from storage.layout import DataRoot  # noqa: E402
from tasks.validate import inspect_image  # noqa: E402

W, H = 1536, 662  # px, the G50 frame
COUNTRIES = ["France", "Japan", "Brazil", "Kenya"]


def make_images(folder: Path, n: int) -> list[Path]:
    """Smooth random scenes plus sensor-like noise: ~250 KB per JPEG, like G50 frames."""
    rng = np.random.default_rng(0)
    bases = []
    for _ in range(8):
        smooth = np.asarray(Image.fromarray(rng.integers(0, 255, (H // 32, W // 32, 3), np.uint8)).resize((W, H), Image.BILINEAR))
        noisy = np.clip(smooth + rng.normal(0, 6, smooth.shape), 0, 255).astype(np.uint8)
        bases.append(Image.fromarray(noisy))
    paths = []
    for i in range(n):
        img = bases[i % len(bases)].copy()
        img.putpixel((i % W, (i // W) % H), (i % 256, 0, 0))  # distinct bytes per file
        path = folder / COUNTRIES[i % len(COUNTRIES)] / f"canvas_{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:8.1f} img/s"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1200)
    ap.add_argument("--shard-size", type=int, default=256)
    args = ap.parse_args()

    from flows.ingest import ingest
    from tasks.specs import IngestOptions, SourceSpec
    from tasks.ingest import ingest_shard, list_g50, plan_shards

    tmp = Path(tempfile.mkdtemp(prefix="geofeat-bench-"))
    paths = make_images(tmp / "g50", args.images)
    mb = sum(p.stat().st_size for p in paths) / 1e6
    print(f"{args.images} JPEGs {W}x{H}, {mb:.0f} MB, under {tmp}")
    rows = []

    t = time.perf_counter()
    for p in paths:
        hashlib.sha256(p.read_bytes()).hexdigest()
    floor = time.perf_counter() - t
    rows.append(("read + sha256 only (I/O floor)", floor))

    sample = [p.read_bytes() for p in paths[:50]]
    t = time.perf_counter()
    for data in sample:
        Image.open(io.BytesIO(data)).load()
    full = (time.perf_counter() - t) * len(paths) / len(sample)
    t = time.perf_counter()
    for data in sample:
        inspect_image(data)
    draft = (time.perf_counter() - t) * len(paths) / len(sample)
    rows.append(("full JPEG decode (PIL load)", full))
    rows.append(("inspect_image (draft decode, as ingest)", draft))

    listing = list_g50(str(tmp / "g50"))
    params = {"dataset": "bench-shard", "layout": "g50", "split": {"policy": "hash", "train": 0.8, "val": 0.1},
              "max_pixels": 80_000_000}
    plans = plan_shards("bench-shard", listing, set(), params, shard_size=args.images)
    root = DataRoot(str(tmp / "home-shard"))
    t = time.perf_counter()
    ingest_shard(root, plans[0])
    rows.append(("ingest_shard, 1 thread, no Prefect", time.perf_counter() - t))

    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        spec = SourceSpec(layout="g50", source=str(tmp / "g50"), dataset="bench")
        opts = IngestOptions(shard_size=args.shard_size)
        home = str(tmp / "home-flow")
        t = time.perf_counter()
        first = ingest(spec, opts, home=home)
        flow_s = time.perf_counter() - t
        t = time.perf_counter()
        second = ingest(spec, opts, home=home)
        noop_s = time.perf_counter() - t
    assert first["images"] == args.images and second["shards"] == 0
    rows.append((f"ingest flow, {first['shards']} shards (Prefect, threads)", flow_s))

    print(f"\n{'measure':48} {'wall s':>8} {'throughput':>14} {'vs I/O floor':>12}")
    for name, s in rows:
        print(f"{name:48} {s:8.2f} {rate(args.images, s):>14} {floor / s:12.2f}")
    print(f"\ndraft decode speed-up over full decode: {full / draft:.1f}x")
    print(f"no-op rerun: {noop_s:.2f} s = {noop_s / flow_s:.1%} of the first run (0 shards, 0 images read)")


if __name__ == "__main__":
    main()
