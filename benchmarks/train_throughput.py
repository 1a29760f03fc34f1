"""Expert training and evaluation throughput: the crop loader against the model, side by side in one run.

    .venv/bin/python benchmarks/train_throughput.py [--home DIR] [--crops 20000] [--photos DIR]
        [--group all|ground|...] [--size 224] [--per-core-crops 3000] [--model vit-tiny|vit-b16] [--image-size 96] [--layers 4]
        [--hidden 192] [--batch-size 32] [--steps 30] [--repeats 3] [--workers 0,1,2] [--device auto]
        [--eval-crops 2000] [--eval-batch-size 64] [--gpu-extra]

1. crop set: >= 20k crops of G50-like sizes (the demo world's segments at the G50 frame size 1536x662, cut
   and capped at 512 px as the segment stage cuts them), with photo-like JPEG entropy (the demo scenes plus
   1/f grain, ~0.26 bytes/px at q90 like crops of real street photos; or `--photos DIR`: regions of real
   photos), in Parquet shards of ~600 crops written by the catalog's own writer. Built once, then reused.
2. loader start-up: first batch of the first and the next epoch, per worker count (persistent workers).
3. per worker core at --size (224 px): the pre-issue-11 worker path (PIL decode + draft, float32 jitter and
   normalisation per image, float32 batches) and the current one (uint8 at the training size, simplejpeg
   when installed), each one worker, CPU seconds of the worker process (getrusage of the reaped child):
   `N crops/s per worker`, and the ceiling a 16-core machine implies (14 workers; the main process's own
   cost per crop caps it too).
4. training (same model config, seed, batch size, optimizer, step code), per loader worker count W:
     decode-only  the training loader + `device_batches` (jitter and normalisation where the model runs)
                  iterated with no model; its model-ready batches are kept
     preloaded    training steps over exactly those batches, already in memory
     loader       training steps pulling the same batches from the persistent loader, as `Trainer` does
     loader/preloaded = steps/s ratio                                                  [target >= 0.9]
5. evaluation: `expert_probs`' path (eval loader -> device -> softmax) over --eval-crops crops, against the
   same model's inference on those batches preloaded                                  [GPU target >= 0.8]
6. on CUDA (or --gpu-extra): ViT-B/16 at 224 px, bf16, train and inference img/s on synthetic tensors.
All models are random-init (nothing can be downloaded here): the speed is real, the predictions are not.
Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from models.expert import Expert, Transforms, resolve_device  # noqa: E402
from storage.layout import DataRoot  # noqa: E402
from storage.shards import write_parquet_atomic  # noqa: E402
from tasks.loader import CropStream, close_loader, device_batches, make_loader  # noqa: E402
from tasks.specs import CropSpec, TrainSpec  # noqa: E402

MODELS = {  # name -> ViTConfig kwargs (patch 16)
    "vit-tiny": {},  # sized by --hidden/--layers/--image-size
    "vit-b16": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
                "image_size": 224},
}
FRAME = (1536, 662)  # px, the G50 frame
CROPS_PER_FILE = 600  # one group's crops of a 128-image segment shard
GRAIN = 11.0  # grey levels of 1/f grain on the demo scenes: ~0.26 bytes/px at q90, like crops of real photos
COUNTRY_SHARES = (0.24, 0.2, 0.18, 0.15, 0.13, 0.10)  # G50-like skew (~24% US), so balance=sqrt matters
CROP_SET_VERSION = 1


# ---------------------------------------------------------------- 1. the crop set


def _grain(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """1/f noise, unit std: the spectrum of natural images' texture."""
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fx ** 2 + fy ** 2)
    f[0, 0] = 1.0
    spec = (rng.standard_normal(f.shape) + 1j * rng.standard_normal(f.shape)) / f
    spec[0, 0] = 0
    n = np.fft.irfft2(spec, s=(h, w))
    return n / n.std()


def _frames(args, rng: np.random.Generator) -> tuple[list[Image.Image], list[tuple[int, int]]]:
    """Source frames for the crop textures, and the crop sizes (w, h) of the demo world's segments at the
    G50 frame size, selected, padded and capped as the segment stage does (CropSpec defaults)."""
    from tasks.demo_world.render import load_demo_labels, render_scene
    from tasks.demo_world.styles import COUNTRIES

    spec = CropSpec()
    groups = {lab["id"]: lab["group"] for lab in load_demo_labels()}
    sizes, frames = [], []
    for k in range(args.scenes):
        rgb, _, info = render_scene(COUNTRIES[k % len(COUNTRIES)], np.random.default_rng(k), *FRAME)
        by_label: dict[int, list] = {}
        for s in info:
            group = groups.get(s["category_id"], "drop")
            if group != "drop" and args.group in ("all", group) and s["area"] >= spec.min_area:
                by_label.setdefault(s["category_id"], []).append(s)
        for segs in by_label.values():
            for s in sorted(segs, key=lambda s: -s["area"])[: spec.max_per_label]:
                x, y, w, h = s["bbox"]
                px, py = round(w * spec.padding), round(h * spec.padding)
                sizes.append((min(FRAME[0], x + w + px) - max(0, x - px), min(FRAME[1], y + h + py) - max(0, y - py)))
        if not args.photos:
            grain = _grain(FRAME[1], FRAME[0], rng)[..., None] * 0.7 + np.stack(
                [_grain(FRAME[1], FRAME[0], rng) for _ in range(3)], -1) * 0.3
            frames.append(Image.fromarray(np.clip(np.asarray(rgb, np.float32) + GRAIN * grain, 0, 255).astype(np.uint8)))
    if args.photos:
        for p in sorted(Path(args.photos).glob("*.jpg")):
            img = Image.open(p).convert("RGB")
            frames.append(img.resize((round(img.width * FRAME[1] / img.height), FRAME[1]), Image.Resampling.BICUBIC))
        if not frames:
            raise SystemExit(f"--photos {args.photos}: no .jpg files there")
    return frames, sizes


def crop_set(args) -> tuple[str, list[tuple[str, list[str], list[int]]], dict]:
    """(home, units, description): reused from --home (or the default cache folder) when it holds a crop set
    built with the same parameters, else built there."""
    key = hashlib.sha256(json.dumps([CROP_SET_VERSION, args.crops, args.scenes, args.photos] + (
        [args.group] if args.group != "all" else [])).encode()).hexdigest()[:10]
    home = args.home or os.path.join(tempfile.gettempdir(), f"geofeat-trainbench-{key}")
    manifest = Path(home, "manifest.json")
    if manifest.exists():
        doc = json.loads(manifest.read_text())
        if doc.get("key") == key:
            return home, [tuple(u) for u in doc["units"]], {**doc["info"], "built_s": None}
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    frames, sizes = _frames(args, rng)
    root = DataRoot(home)
    crop_type = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
    units, rows, nbytes, dims = [], [], 0, []
    for k in range(args.crops):
        w0, h0 = sizes[int(rng.integers(len(sizes)))]
        frame = frames[int(rng.integers(len(frames)))]
        w0, h0 = min(w0, frame.width), min(h0, frame.height)
        x, y = int(rng.integers(frame.width - w0 + 1)), int(rng.integers(frame.height - h0 + 1))
        img = frame.crop((x, y, x + w0, y + h0))
        img.thumbnail((CropSpec().max_side, CropSpec().max_side), Image.Resampling.BILINEAR)  # as cut_crop
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=CropSpec().quality)
        data = buf.getvalue()
        fid = hashlib.sha256(f"trainbench|{k}".encode()).hexdigest()[:24]
        rows.append((fid, data, int(rng.choice(len(COUNTRY_SHARES), p=COUNTRY_SHARES))))
        nbytes += len(data)
        dims.append(img.size)
        if len(rows) == CROPS_PER_FILE or k == args.crops - 1:
            path = root.path("features", f"part-{len(units):05d}.parquet")
            table = pa.table({"feature_id": [r[0] for r in rows],
                              "crop": pa.array([{"bytes": r[1], "path": None} for r in rows], crop_type)})
            root.fs.makedirs(root.path("features"), exist_ok=True)
            write_parquet_atomic(root, table, path)
            units.append((path, [r[0] for r in rows], [r[2] for r in rows]))
            rows = []
    long_side, short_side = np.array([max(d) for d in dims]), np.array([min(d) for d in dims])
    info = {"crops": args.crops, "files": len(units), "kb_per_crop": nbytes / args.crops / 1e3,
            "bytes_per_px": nbytes / float(sum(w * h for w, h in dims)),
            "long_side_p10_50_90": np.percentile(long_side, [10, 50, 90]).round().astype(int).tolist(),
            "short_side_p50": int(np.median(short_side)), "mean_kpx": float(np.mean([w * h for w, h in dims]) / 1e3),
            "textures": f"real photos from {args.photos}" if args.photos else f"demo scenes + 1/f grain ({GRAIN:g})",
            "built_s": time.perf_counter() - t0}
    manifest.write_text(json.dumps({"key": key, "units": units, "info": info}))
    return home, units, info


# ---------------------------------------------------------------- measuring


def cpu_s() -> tuple[float, float]:
    """CPU seconds of this process, and of its reaped children (loader workers, once shut down)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def machine_busy_s() -> float:
    """CPU seconds all processes of the machine have used since boot (Linux /proc/stat; 0 elsewhere)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return 0.0
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class LegacyTransforms:
    """The worker path before issue 11, kept here as the baseline: PIL decode with an image-level draft,
    then per image in numpy float32: resized crop, colour jitter, normalisation; float32 [3, S, S] out."""

    def __init__(self, tf: Transforms):
        self.tf = tf

    def pixels(self, data: bytes, key):
        tf, s = self.tf, int(self.tf.size)
        img = Image.open(io.BytesIO(data))
        img.draft("RGB", (s, s))
        img = img.convert("RGB")
        box, factors = tf.draw(img.width, img.height, key)
        x = np.asarray(img.resize((s, s), Image.Resampling.BILINEAR, box=box), dtype=np.float32) / 255.0
        if factors is not None:
            x = x * float(factors[0])
            grey = float((x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)).mean())
            x = np.clip((x - grey) * float(factors[1]) + grey, 0.0, 1.0)
        x = (x - np.asarray(tf.mean, dtype=np.float32)) / np.asarray(tf.std, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))), torch.ones(2)


def per_worker(home: str, units, tf, batch_size: int) -> dict:
    """One loader worker over `units` (one pass, balance none): crops per CPU second of the worker, and the
    main process's CPU per crop (receiving batches; no model)."""
    stream = CropStream(home, units, tf, train=tf.tf.train if isinstance(tf, LegacyTransforms) else tf.train,
                        balance="none", shuffle_buffer=1024)
    loader = make_loader(stream, batch_size, 1)
    (me0, kids0), wall0, n = cpu_s(), time.perf_counter(), 0
    for batch in loader:
        n += len(batch[-1])
    wall = time.perf_counter() - wall0
    close_loader(loader)
    me1, kids1 = cpu_s()
    return {"crops": n, "wall": wall, "worker_s": kids1 - kids0, "main_s": me1 - me0}


def first_batches(home: str, units, tf, batch_size: int, workers: int, persistent: bool) -> list[float]:
    """Seconds to the first batch of epoch 0 and 1 (a new loader per epoch unless persistent)."""
    stream = CropStream(home, units, tf, train=True, balance="sqrt")
    out, loader = [], None
    for epoch in (0, 1):
        t = time.perf_counter()
        if loader is None or not persistent:
            loader = make_loader(stream, batch_size, workers, persistent=persistent)
        stream.set_epoch(epoch)
        it = iter(loader)
        next(it)
        out.append(time.perf_counter() - t)
        del it
        if not persistent:
            close_loader(loader)
    close_loader(loader)
    return out


def timed(batches, warmup: int, device: torch.device, step=None, keep: bool = False) -> dict:
    """Run `step` (or nothing) on each (x, y); time everything after the first `warmup` batches.
    `wait`: timed seconds blocked on the next batch (the rest is the step itself); `cpu`: CPU seconds of
    this process (all its threads; loader workers are other processes) in the timed window."""
    busy0, (me0, kids0), wall0 = machine_busy_s(), cpu_s(), time.perf_counter()
    t, cpu_t = (wall0, me0) if warmup == 0 else (None, None)
    images, wait, labels, kept, k = 0, 0.0, [], [], 0
    it = iter(batches)
    while True:
        t0 = time.perf_counter()
        try:
            x, y = next(it)
        except StopIteration:
            break
        if k >= warmup:
            wait += time.perf_counter() - t0
        if keep:
            kept.append((x, y))
        if step is not None:
            step(x, y)
        if k == warmup - 1:
            sync(device)
            t, cpu_t = time.perf_counter(), cpu_s()[0]
        elif k >= warmup:
            images += len(y)
            labels.append(y.cpu())
        k += 1
    sync(device)
    wall, cpu = time.perf_counter() - t, cpu_s()[0] - cpu_t
    total = time.perf_counter() - wall0
    me1, kids1 = cpu_s()
    mine = me1 - me0 + kids1 - kids0  # workers' share only once they are reaped: close the loader first
    return {"steps": len(labels), "images": images, "wall": wall, "wait": wait, "cpu": cpu, "labels": labels,
            "batches": kept, "others": max(0.0, machine_busy_s() - busy0 - mine) / total}


def best(runs: list[dict]) -> dict:
    """The fastest run; `spread`: how much slower the slowest was (other load on the machine shows here);
    `cpu`: the least CPU time of the runs (the least disturbed by other processes)."""
    fast = min(runs, key=lambda r: r["wall"])
    return {**fast, "spread": max(r["wall"] for r in runs) / fast["wall"] - 1, "cpu": min(r["cpu"] for r in runs)}


class TrainLoader:
    """The training loader as `Trainer` runs it: one persistent loader, `set_epoch` per epoch, batches made
    model-ready on the device; `batches(n)` yields n (pixels, labels), crossing epochs as needed."""

    def __init__(self, stream: CropStream, expert: Expert, batch_size: int, workers: int, pin: bool):
        self.stream, self.expert = stream, expert
        self.loader = make_loader(stream, batch_size, workers, pin, persistent=True)
        self.epoch = 0

    def batches(self, n: int):
        done = 0
        while done < n:
            self.stream.set_epoch(self.epoch)
            for x, y, _ in device_batches(self.loader, self.expert, train=True):
                yield x, y
                done += 1
                if done >= n:
                    break
            else:
                self.epoch += 1

    def close(self):
        close_loader(self.loader)


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


def train_step(model, device: torch.device):
    """One optimizer step as in `Trainer` (fresh AdamW, lr/wd of TrainSpec's defaults)."""
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


def first_units(units, crops: int):
    """Whole files from the start until `crops` crops."""
    out, n = [], 0
    for u in units:
        if n >= crops:
            break
        out.append(u)
        n += len(u[1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--home", help="folder of the crop set: reused when it holds one built with these parameters")
    ap.add_argument("--crops", type=int, default=20_000, help="crops in the set (>= 20k: the steady state)")
    ap.add_argument("--scenes", type=int, default=48, help="demo scenes whose segments give the crop sizes")
    ap.add_argument("--photos", help="a folder of real .jpg photos to cut the crops from, instead of synthetic frames")
    ap.add_argument("--group", default="all", choices=["all", "ground", "structure", "vegetation", "vehicle", "furniture"],
                    help="crop sizes of one feature group only (ground: the widest crops, the slowest to decode)")
    ap.add_argument("--size", type=int, default=224, help="px; training size of the per-core loader figures")
    ap.add_argument("--per-core-crops", type=int, default=3000, help="crops per per-core measurement")
    ap.add_argument("--model", choices=sorted(MODELS), default="vit-tiny")
    ap.add_argument("--image-size", type=int, default=96, help="px (vit-tiny)")
    ap.add_argument("--layers", type=int, default=4, help="(vit-tiny)")
    ap.add_argument("--hidden", type=int, default=192, help="(vit-tiny; heads = hidden / 64)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (model warm-up, loader start)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each training path; the fastest is shown")
    ap.add_argument("--workers", default="0,1,2", help="loader worker counts to compare")
    ap.add_argument("--threads", type=int, default=None, help="model intra-op threads (default: torch's)")
    ap.add_argument("--eval-crops", type=int, default=2000)
    ap.add_argument("--eval-batch-size", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--gpu-extra", action="store_true", help="ViT-B/16 bf16 img/s (automatic on CUDA)")
    ap.add_argument("--gpu-batch-sizes", default="64,128,256")
    args = ap.parse_args()
    workers_list = [int(w) for w in args.workers.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    pin = device.type == "cuda"
    cores = len(os.sched_getaffinity(0))

    home, units, info = crop_set(args)
    labels = [f"C{k}" for k in range(len(COUNTRY_SHARES))]
    print(f"\nmachine: {os.cpu_count()} CPUs ({cores} usable), torch {torch.__version__}, "
          f"simplejpeg {'installed' if importlib.util.find_spec('simplejpeg') else 'NOT installed (PIL decodes)'}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"crop set: {home} ({'built in %.0f s' % info['built_s'] if info['built_s'] else 'reused'}): "
          f"{info['crops']} crops in {info['files']} Parquet files; long side p10/p50/p90 "
          f"{'/'.join(map(str, info['long_side_p10_50_90']))} px, short side p50 {info['short_side_p50']} px, "
          f"{info['mean_kpx']:.0f} kpx and {info['kb_per_crop']:.1f} kB per crop ({info['bytes_per_px']:.2f} B/px, "
          f"JPEG q90); textures: {info['textures']}; sizes: {'all groups' if args.group == 'all' else args.group + ' crops'}")

    # -------------------------------------------------------- 2 + 3: the loader alone, per worker core
    tf = Transforms(size=args.size, train=True, seed=0)
    sub = first_units(units, args.per_core_crops)
    print(f"\n== loader per worker core at {args.size} px: 1 worker, one pass over {sum(len(u[1]) for u in sub)} "
          f"crops, batch {args.batch_size}; CPU seconds of the worker (reaped) and of the main process")
    print(f"{'path':28} {'crops/s/worker':>14} {'main ms/crop':>12} {'wall crops/s':>12}")
    rates = {}
    for name, t in (("pre-issue-11 (float32)", LegacyTransforms(tf)), ("current (uint8)", tf)):
        r = min((per_worker(home, sub, t, args.batch_size) for _ in range(2)), key=lambda r: r["worker_s"])
        rates[name] = r
        print(f"{name:28} {r['crops'] / r['worker_s']:14.0f} {r['main_s'] / r['crops'] * 1e3:12.3f} "
              f"{r['crops'] / r['wall']:12.0f}")
    cur, old = rates["current (uint8)"], rates["pre-issue-11 (float32)"]
    per = cur["crops"] / cur["worker_s"]
    main_cap = cur["crops"] / max(cur["main_s"], 1e-9)
    print(f"{per:.0f} crops/s per worker ({args.size} px, current path; {per / (old['crops'] / old['worker_s']):.2f}x "
          f"the pre-issue-11 path; target >= 400)")
    print(f"16-core ceiling: 14 workers x {per:.0f} = {14 * per:.0f} crops/s; the main process receives batches at "
          f"up to {main_cap:.0f} crops/s per core (no model): ceiling {min(14 * per, main_cap):.0f} crops/s "
          f"(projection from this machine's per-core figures)")

    print(f"\n== loader start-up (all {info['crops']} crops, {args.size} px): seconds to the first batch")
    print(f"{'workers':>7} {'epoch 0':>8} {'epoch 1':>8}  loader")
    for w in workers_list:
        a = first_batches(home, units, tf, args.batch_size, w, persistent=True)
        b = first_batches(home, units, LegacyTransforms(tf), args.batch_size, w, persistent=False)
        print(f"{w:7d} {a[0]:8.2f} {a[1]:8.2f}  current: persistent workers (footers read once per worker)")
        print(f"{w:7d} {b[0]:8.2f} {b[1]:8.2f}  pre-issue-11: a new loader per epoch, float32")

    # -------------------------------------------------------- 4: training
    config = vit_config(args, labels)
    probe = fresh_expert(config, device, 0, args.model)
    params = sum(p.numel() for p in probe.model.parameters())
    train_tf = probe.transforms(train=True, seed=0)  # the real train transforms of this model
    n = args.warmup + args.steps

    def stream():
        return CropStream(home, units, train_tf, train=True, balance="sqrt", shuffle_buffer=1024)

    def fresh_step():
        return train_step(fresh_expert(config, device, 0, args.model).model, device)

    pw = per_worker(home, first_units(units, n * args.batch_size), train_tf, args.batch_size)
    worker_step_s = pw["worker_s"] / pw["crops"] * args.batch_size  # CPU s of loader work per training step
    rows = []
    for i, w in enumerate(workers_list):
        tl = TrainLoader(stream(), probe, args.batch_size, w, pin)
        dec = timed(tl.batches(n), args.warmup, device, keep=True)
        tl.close()
        batches = dec.pop("batches")  # model-ready: on the device, jittered and normalised
        if i == 0:  # process warm-up (allocator, kernels, thread pool), not shown
            timed(batches, args.warmup, device, train_step(probe.model, device))
        pre, lod = [], []
        for _ in range(args.repeats):  # alternated, so slow phases of the machine hit both paths
            pre.append(timed(batches, args.warmup, device, fresh_step()))
            tl = TrainLoader(stream(), probe, args.batch_size, w, pin)
            lod.append(timed(tl.batches(n), args.warmup, device, fresh_step()))
            tl.close()
        pre, lod = best(pre), best(lod)
        same = len(lod["labels"]) == len(pre["labels"]) and all(
            torch.equal(a, b) for a, b in zip(lod["labels"], pre["labels"]))
        rows.append((w, dec, pre, lod, same))
        del batches

    print(f"\n== training: {args.model}, RANDOM-INIT ViT, {config.image_size} px, patch 16, hidden {config.hidden_size}, "
          f"{config.num_hidden_layers} layers, {params / 1e6:.1f} M params; batch {args.batch_size}; "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}; AdamW + grad clip as Trainer; {args.steps} timed "
          f"steps after {args.warmup} warm-up; {torch.get_num_threads()} intra-op threads for the model, 1 per worker; "
          f"training rows: fastest of {args.repeats}")
    print(f"{'path':11} {'workers':>7} {'steps':>5} {'wall s':>6} {'wait s':>6} {'steps/s':>7} {'img/s':>7} "
          f"{'cpu ms/step':>11} {'others':>6} {'loader/pre':>10}  notes")
    top, top_cpu = None, None
    for w, dec, pre, lod, same in rows:
        ratio = (lod["steps"] / lod["wall"]) / (pre["steps"] / pre["wall"])
        top = max(top or (ratio, w), (ratio, w))
        # each process on its own core: the main process's CPU per step, and W workers' capacity
        step_s = max(lod["cpu"] / lod["steps"], worker_step_s / w if w else 0.0)
        cpu_ratio = (pre["cpu"] / pre["steps"]) / step_s
        top_cpu = max(top_cpu or (cpu_ratio, w), (cpu_ratio, w))
        for name, r, note in (
                ("decode-only", dec, "no model: the loader + device_batches alone"),
                ("preloaded", pre, f"decode-only's batches, in memory; slowest run +{pre['spread']:.0%}"),
                ("loader", lod, f"slowest run +{lod['spread']:.0%}; same batches as preloaded: {'yes' if same else 'NO'}")):
            cell = f"{ratio:10.2f}" if r is lod else f"{'':10}"
            print(f"{name:11} {w:7d} {r['steps']:5d} {r['wall']:6.2f} {r['wait']:6.2f} {r['steps'] / r['wall']:7.2f} "
                  f"{r['images'] / r['wall']:7.1f} {r['cpu'] / max(1, r['steps']) * 1e3:11.1f} {r['others']:6.2f} "
                  f"{cell}  {note}" + (f"; CPU-time ratio {cpu_ratio:.2f}" if r is lod else ""))
    print(f"\nbest setting here: workers={top[1]}: loader/preloaded = {top[0]:.2f} in steps/s (target >= 0.9)")
    print(f"CPU-time projection (each process on its own core, no other load): workers={top_cpu[1]}: "
          f"loader/preloaded = {top_cpu[0]:.2f}; a loader worker spends {worker_step_s * 1e3:.1f} CPU ms per step "
          f"({pw['crops'] / pw['worker_s']:.0f} crops/s per worker at {config.image_size} px)")
    print(f"wait s: timed seconds blocked on the next batch; the rest of the wall is the step. cpu ms/step: this "
          f"process's CPU (all threads; workers excluded). others: cores kept busy by OTHER processes meanwhile "
          f"({cores} usable cores).")
    noisy = max(r[k]["others"] for r in rows for k in (1, 2, 3))
    if noisy > 0.25:
        print(f"WARNING: other processes used up to {noisy:.1f} of the {cores} cores during these measurements; "
              f"the numbers above are not reliable (rerun on a quiet machine, or raise --repeats)")

    # -------------------------------------------------------- 5: evaluation
    ev_units = first_units(units, args.eval_crops)
    ev_tf = probe.transforms(train=False)
    probe.model.eval()

    def ev_batches(w):
        loader = make_loader(CropStream(home, ev_units, ev_tf, train=False), args.eval_batch_size, w, pin)
        for x, y, _ in device_batches(loader, probe, train=False):
            yield x, y

    def infer(x, y):
        probe.predict_proba(x)

    print(f"\n== evaluation: `expert_probs`' path over {sum(len(u[1]) for u in ev_units)} crops, batch "
          f"{args.eval_batch_size}, same model in inference mode")
    pw = per_worker(home, ev_units, ev_tf, args.eval_batch_size)
    worker_img_s = pw["worker_s"] / pw["crops"]
    print(f"{'workers':>7} {'eval img/s':>10} {'infer img/s':>11} {'ratio':>6} {'CPU-time ratio':>14}")
    for w in workers_list:
        dec = timed(ev_batches(w), 1, device, keep=True)
        kept = dec.pop("batches")
        inf = best([timed(kept, 1, device, infer) for _ in range(2)])
        ev = best([timed(ev_batches(w), 1, device, infer) for _ in range(2)])
        per_img = max(ev["cpu"] / ev["images"], worker_img_s / w if w else 0.0)
        print(f"{w:7d} {ev['images'] / ev['wall']:10.0f} {inf['images'] / inf['wall']:11.0f} "
              f"{(ev['images'] / ev['wall']) / (inf['images'] / inf['wall']):6.2f} "
              f"{(inf['cpu'] / inf['images']) / per_img:14.2f}")
    print(f"CPU-time ratio: each process on its own core; an eval worker decodes {pw['crops'] / pw['worker_s']:.0f} "
          f"crops/s per core at {ev_tf.size} px")

    if device.type == "cuda" or args.gpu_extra:
        if device.type != "cuda":
            print("\n--gpu-extra: no CUDA device here; the ViT-B/16 bf16 measurement is skipped")
        else:
            sizes = [int(b) for b in args.gpu_batch_sizes.split(",")]
            print(f"\nViT-B/16 RANDOM-INIT, 224 px, bf16 autocast, synthetic tensors already on the GPU "
                  f"({args.steps} timed steps after 3 warm-up)")
            print(f"{'batch':>5} {'train img/s':>12} {'infer img/s':>12}")
            for bs, train, infer_rate in vit_b16_gpu(device, sizes, args.steps):
                print(f"{bs:5d} {train:>12} {infer_rate:>12}")


if __name__ == "__main__":
    main()
