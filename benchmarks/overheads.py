"""Per-call costs of the pipeline's bookkeeping, in CPU time of this process (no Prefect server needed).

    .venv/bin/python benchmarks/overheads.py [--calls 20000] [--locks 500]

  gpu slot: acquire + release of the `gpu` file lock on a data root, uncontended
            (flows.runner.gpu_slot; the Prefect concurrency slot it replaced cost ~2.2 s, docs/scaling.md)
  progress: one `progress.advance()` with no listener, and with the CLI's console listener installed
            (inside a flow run the Prefect artifact is updated at most every 2 s, not per call)
Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def cpu_per_call(fn, calls: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) per call."""
    c, t = time.process_time(), time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.process_time() - c) / calls, (time.perf_counter() - t) / calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=20000, help="progress.advance() calls")
    ap.add_argument("--locks", type=int, default=500, help="gpu slot acquisitions")
    args = ap.parse_args()

    from flows.progress import ConsoleProgress
    from flows.runner import gpu_slot
    from storage.layout import DataRoot
    from tasks import progress

    root = DataRoot(str(Path(tempfile.mkdtemp(prefix="geofeat-overheads-")) / "home"))

    def slot() -> None:
        with gpu_slot(root):
            pass

    slot()  # the lock folder and file exist from here on
    lock_cpu, lock_wall = cpu_per_call(slot, args.locks)

    rows = [("gpu slot: acquire + release (file lock)", f"{lock_cpu * 1e3:.2f} core-ms", f"{lock_wall * 1e3:.2f} ms wall")]
    with progress.scope("bench", "no listener", args.calls, "steps") as bar:
        c, w = cpu_per_call(bar.advance, args.calls)
    rows.append(("progress.advance(), no listener", f"{c * 1e6:.1f} core-µs", f"{w * 1e6:.1f} µs wall"))
    handler = ConsoleProgress(io.StringIO(), live=False)
    progress.LOGGER.addHandler(handler)
    try:
        with progress.scope("bench", "console listener", args.calls, "steps") as bar:
            c, w = cpu_per_call(bar.advance, args.calls)
    finally:
        progress.LOGGER.removeHandler(handler)
    rows.append(("progress.advance(), CLI console listener", f"{c * 1e6:.1f} core-µs", f"{w * 1e6:.1f} µs wall"))

    print(f"machine: {platform.node()} {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    for name, cost, wall in rows:
        print(f"{name:44} {cost:>14} {wall:>16}")


if __name__ == "__main__":
    main()
