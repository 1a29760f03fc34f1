"""Expert training throughput: the real crop loader vs the same batches preloaded, side by side in one run.

    .venv/bin/python benchmarks/train_throughput.py [--home DIR] [--group ground] [--model vit-tiny|vit-b16]
        [--image-size 96] [--layers 4] [--hidden 192] [--batch-size 32] [--steps 30] [--repeats 3]
        [--workers 0,1,2] [--threads N] [--device auto] [--gpu-extra]

For each loader worker count W (same model config, seed, batch size, optimizer, step code):
  decode-only   the training loader (`CropStream` over the catalog's Parquet shards -> `make_loader`,
                re-created per epoch as `train_expert` does) iterated with no model; its batches are kept
  preloaded     training steps over exactly those batches, already in memory as tensors
  loader        training steps pulling the same batches from a fresh loader
  ratio = loader / preloaded steps/s                                            [target >= 0.9]
A step = forward + cross-entropy + backward + clip + AdamW (bf16 autocast on CUDA), as in `train_expert`.
On CUDA (or with --gpu-extra): ViT-B/16 at 224 px, bf16 autocast, train and inference img/s on synthetic
tensors already on the GPU, for several batch sizes.
All models are random-init (nothing can be downloaded here): the speed is real, the predictions are not.
Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows import env as prefect_env  # noqa: E402

prefect_env.apply()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tasks.specs import CropSpec, DemoSpec, SegmenterSpec, TrainSpec  # noqa: E402
from models.expert import Expert, resolve_device  # noqa: E402
from storage.catalog import connect  # noqa: E402
from storage.layout import DataRoot  # noqa: E402
from tasks.loader import CropStream, make_loader  # noqa: E402
from tasks.train_experts import select_crops  # noqa: E402

MODELS = {  # name -> ViTConfig kwargs (patch 16)
    "vit-tiny": {},  # sized by --hidden/--layers/--image-size
    "vit-b16": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
                "image_size": 224},
}


# ---------------------------------------------------------------- data


def annotations_key(root: DataRoot) -> str | None:
    try:
        con = connect(root, fresh=True)
        rows = con.sql("SELECT DISTINCT segmenter FROM features WHERE segmenter LIKE 'annotations@%'").fetchall()
        con.close()
    except Exception:  # no catalog there yet
        return None
    return rows[0][0] if rows else None


def catalog(args) -> tuple[DataRoot, str, float | None]:
    """The demo catalog (annotations segmenter): reused from --home when it has one, else built."""
    home = args.home or str(Path(tempfile.mkdtemp(prefix="geofeat-trainbench-")) / "home")
    root = DataRoot(home)
    key = annotations_key(root)
    if key:
        return root, key, None
    from prefect.testing.utilities import prefect_test_harness

    from flows.build_feature_datasets import build_feature_datasets

    demo = DemoSpec(countries=args.countries, per_country=args.per_country, width=args.width,
                    height=int(args.width * 662 / 1536), messy=False)
    t = time.perf_counter()
    with prefect_test_harness(server_startup_timeout=90):
        build_feature_datasets(demo=demo, segmenter=SegmenterSpec(kind="annotations"), crops=CropSpec(min_area=40),
                               home=root.url)
    return root, annotations_key(root), time.perf_counter() - t


def loader_batches(stream: CropStream, batch_size: int, workers: int, pin: bool, limit: int, epochs: list):
    """`limit` batches from the training loader, a new loader per epoch like `train_expert`."""
    n, epoch = 0, 0
    while True:
        stream.epoch = epoch
        epochs.append(epoch)
        for x, y, _worker in make_loader(stream, batch_size, workers, pin):
            yield x, y
            n += 1
            if n >= limit:
                return
        epoch += 1


# ---------------------------------------------------------------- model


def vit_config(args, labels: list[str]):
    from transformers import ViTConfig

    kw = MODELS[args.model] or {"hidden_size": args.hidden, "num_hidden_layers": args.layers,
                                "num_attention_heads": max(1, args.hidden // 64),
                                "intermediate_size": 4 * args.hidden, "image_size": args.image_size}
    return ViTConfig(patch_size=16, num_labels=len(labels), id2label=dict(enumerate(labels)),
                     label2id={name: i for i, name in enumerate(labels)}, **kw)


def fresh_expert(config, device: torch.device, seed: int, name: str) -> Expert:
    from transformers import ViTForImageClassification

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ViTForImageClassification(config)
    return Expert(model, checkpoint=f"random-init-{name}", untrained=True, device=device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def cpu_s() -> float:
    """CPU seconds of this process and its reaped children (the loader workers, once shut down)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def machine_busy_s() -> float:
    """CPU seconds all processes of the machine have used since boot (Linux /proc/stat; 0 elsewhere)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return 0.0
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def timed(batches, warmup: int, device: torch.device, step=None) -> dict:
    """Run `step` (or nothing: decode-only) on each batch; time everything after the first `warmup` batches.
    `wait`: timed seconds spent blocked on the next batch (the rest is the step itself)."""
    cpu0, busy0, wall0 = cpu_s(), machine_busy_s(), time.perf_counter()
    t = wall0 if warmup == 0 else None
    first, images, wait, labels, kept = None, 0, 0.0, [], []
    it = iter(batches)
    k = 0
    while True:
        t0 = time.perf_counter()
        try:
            x, y = next(it)
        except StopIteration:
            break
        if k >= warmup:
            wait += time.perf_counter() - t0
        if first is None:
            first = time.perf_counter() - wall0
        if step is None:
            kept.append((x, y))
        else:
            step(x, y)
        if k == warmup - 1:
            sync(device)
            t = time.perf_counter()
        elif k >= warmup:
            images += len(y)
            labels.append(y)
        k += 1
    sync(device)
    wall = time.perf_counter() - t
    if hasattr(it, "close"):
        it.close()  # shuts the workers down (outside the timed window)
    total, mine = time.perf_counter() - wall0, cpu_s() - cpu0
    return {"steps": len(labels), "images": images, "wall": wall, "wait": wait, "labels": labels, "batches": kept,
            "first": first, "busy": mine / total, "others": max(0.0, machine_busy_s() - busy0 - mine) / total}


def best(runs: list[dict]) -> dict:
    """The fastest run; `spread`: how much slower the slowest was (other load on the machine shows here)."""
    fast = min(runs, key=lambda r: r["wall"])
    return {**fast, "spread": max(r["wall"] for r in runs) / fast["wall"] - 1}


def train_step(model, device: torch.device):
    """One optimizer step as in `train_expert` (fresh AdamW, lr/wd of TrainSpec's defaults)."""
    spec = TrainSpec()
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    model.train()

    def step(x, y):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast or torch.autocast("cpu", enabled=False):
            logits = model(pixel_values=x).logits
        F.cross_entropy(logits.float(), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


# ---------------------------------------------------------------- GPU extra


def vit_b16_gpu(device: torch.device, batch_sizes: list[int], steps: int) -> list[tuple]:
    """ViT-B/16 random init, 224 px, bf16 autocast, synthetic tensors on the GPU: train and inference img/s."""
    from transformers import ViTConfig, ViTForImageClassification

    rows = []
    config = ViTConfig(patch_size=16, num_labels=6, **MODELS["vit-b16"])
    for bs in batch_sizes:
        torch.manual_seed(0)
        model = ViTForImageClassification(config).to(device)
        x = torch.randn(bs, 3, 224, 224, device=device)
        y = torch.randint(0, 6, (bs,), device=device)
        step = None
        try:
            step = train_step(model, device)
            for _ in range(3):
                step(x, y)
            sync(device)
            t = time.perf_counter()
            for _ in range(steps):
                step(x, y)
            sync(device)
            train = bs * steps / (time.perf_counter() - t)
            model.eval()
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                for _ in range(3):
                    model(pixel_values=x)
                sync(device)
                t = time.perf_counter()
                for _ in range(steps):
                    model(pixel_values=x)
                sync(device)
            infer = bs * steps / (time.perf_counter() - t)
            rows.append((bs, f"{train:.0f}", f"{infer:.0f}"))
        except torch.OutOfMemoryError:
            rows.append((bs, "OOM", "OOM"))
        del model, step, x
        torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--home", help="data root; its demo catalog is reused if it has one, else built there")
    ap.add_argument("--countries", type=int, default=6)
    ap.add_argument("--per-country", type=int, default=60, help="demo G50 images per country")
    ap.add_argument("--width", type=int, default=384, help="px of the demo frames (G50: 1536)")
    ap.add_argument("--group", default="ground", help="feature group whose train crops are streamed")
    ap.add_argument("--model", choices=sorted(MODELS), default="vit-tiny")
    ap.add_argument("--image-size", type=int, default=96, help="px (vit-tiny)")
    ap.add_argument("--layers", type=int, default=4, help="(vit-tiny)")
    ap.add_argument("--hidden", type=int, default=192, help="(vit-tiny; heads = hidden / 64)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (model warm-up, first loader start)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each training path; the fastest is shown")
    ap.add_argument("--workers", default="0,1,2", help="loader worker counts to compare")
    ap.add_argument("--threads", type=int, default=None, help="model intra-op threads (default: torch's)")
    ap.add_argument("--shuffle-buffer", type=int, default=1024)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--gpu-extra", action="store_true", help="ViT-B/16 bf16 img/s (automatic on CUDA)")
    ap.add_argument("--gpu-batch-sizes", default="64,128,256")
    args = ap.parse_args()
    workers_list = [int(w) for w in args.workers.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    pin = device.type == "cuda"
    root, key, build_s = catalog(args)
    sel = select_crops(root, TrainSpec(checkpoint="tiny-random", min_crops_per_country=1), args.group, key)
    config = vit_config(args, sel.labels)
    probe = fresh_expert(config, device, 0, args.model)
    transforms = probe.transforms(train=True, seed=0)  # the real train transforms of this expert
    params = sum(p.numel() for p in probe.model.parameters())
    stream = CropStream(root.url, sel.train, transforms, train=True, balance="sqrt",
                        shuffle_buffer=args.shuffle_buffer)
    n = args.warmup + args.steps

    def fresh_step():
        return train_step(fresh_expert(config, device, 0, args.model).model, device)

    rows = []
    for i, w in enumerate(workers_list):
        dec = timed(loader_batches(stream, args.batch_size, w, pin, n, []), args.warmup, device)
        batches = dec.pop("batches")
        if pin:
            batches = [(x.pin_memory(), y) for x, y in batches]
        if i == 0:  # process warm-up (allocator, kernels, thread pool), not shown
            timed(batches, args.warmup, device, train_step(probe.model, device))
            del probe
        pre, lod = [], []
        for _ in range(args.repeats):  # alternated, so slow phases of the machine hit both paths
            pre.append(timed(batches, args.warmup, device, fresh_step()))
            epochs: list = []
            lod.append(timed(loader_batches(stream, args.batch_size, w, pin, n, epochs), args.warmup, device,
                             fresh_step()))
        pre, lod = best(pre), best(lod)
        same = len(lod["labels"]) == len(pre["labels"]) and all(
            torch.equal(a, b) for a, b in zip(lod["labels"], pre["labels"]))
        rows.append((w, dec, pre, lod, same, len(epochs)))
        del batches

    cores = len(os.sched_getaffinity(0))
    print(f"\nmachine: {os.cpu_count()} CPUs ({cores} usable), torch {torch.__version__}, "
          f"{torch.get_num_threads()} intra-op threads for the model, 1 per loader worker (_worker_init); "
          f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"catalog: {root.url}" + (f" (built in {build_s:.0f} s)" if build_s else " (reused)")
          + f"; group {args.group!r}: {sel.train_crops} train crops in {len(sel.train)} Parquet files, "
          f"{len(sel.labels)} countries; segmenter {key}")
    print(f"model: {args.model}, RANDOM-INIT ViT, {config.image_size} px, patch 16, hidden {config.hidden_size}, "
          f"{config.num_hidden_layers} layers, {params / 1e6:.1f} M params; batch {args.batch_size}; "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}; AdamW + grad clip as train_expert; "
          f"{args.steps} timed steps after {args.warmup} warm-up; training rows: fastest of {args.repeats}")
    print(f"\n{'path':11} {'workers':>7} {'steps':>5} {'wall s':>6} {'wait s':>6} {'steps/s':>7} {'img/s':>7} "
          f"{'CPU/wall':>8} {'others':>6} {'loader/pre':>10}  notes")
    top = None
    for w, dec, pre, lod, same, n_epochs in rows:
        ratio = (lod["steps"] / lod["wall"]) / (pre["steps"] / pre["wall"])
        top = max(top or (ratio, w), (ratio, w))
        for name, r, note in (
                ("decode-only", dec, f"no model; first batch after {dec['first']:.2f} s"),
                ("preloaded", pre, f"decode-only's batches, in memory; slowest run +{pre['spread']:.0%}"),
                ("loader", lod, f"slowest run +{lod['spread']:.0%}; {n_epochs} loader(s) started; "
                                f"same batches as preloaded: {'yes' if same else 'NO'}")):
            cell = f"{ratio:10.2f}" if r is lod else f"{'':10}"
            print(f"{name:11} {w:7d} {r['steps']:5d} {r['wall']:6.2f} {r['wait']:6.2f} {r['steps'] / r['wall']:7.2f} "
                  f"{r['images'] / r['wall']:7.1f} {r['busy']:8.2f} {r['others']:6.2f} {cell}  {note}")
    print(f"\nbest setting here: workers={top[1]}: loader/preloaded = {top[0]:.2f} in steps/s (target >= 0.9)")
    print(f"wait s: timed seconds blocked on the next batch; the rest of the wall is the step. CPU/wall: CPU "
          f"seconds (this process + loader workers) per wall second, warm-up included; {cores} usable cores. "
          f"others: cores kept busy by OTHER processes meanwhile.")
    noisy = max(r[k]["others"] for r in rows for k in (1, 2, 3))
    if noisy > 0.25:
        print(f"WARNING: other processes used up to {noisy:.1f} of the {cores} cores during these measurements; "
              f"the numbers above are not reliable (rerun on a quiet machine, or raise --repeats)")

    if device.type == "cuda" or args.gpu_extra:
        if device.type != "cuda":
            print("\n--gpu-extra: no CUDA device here; the ViT-B/16 bf16 measurement is skipped")
        else:
            sizes = [int(b) for b in args.gpu_batch_sizes.split(",")]
            print(f"\nViT-B/16 RANDOM-INIT, 224 px, bf16 autocast, synthetic tensors already on the GPU "
                  f"({args.steps} timed steps after 3 warm-up)")
            print(f"{'batch':>5} {'train img/s':>12} {'infer img/s':>12}")
            for bs, train, infer in vit_b16_gpu(device, sizes, args.steps):
                print(f"{bs:5d} {train:>12} {infer:>12}")


if __name__ == "__main__":
    main()
