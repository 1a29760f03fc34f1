"""Train one expert (ViT: crop -> country) per feature group, from the `features` catalog.

* Selection: DuckDB picks the group's train/val crops by their IMAGE's split (the `features`
  view takes split and country from `images`), so no image is on both sides. Countries with
  fewer than `min_crops_per_country` train crops are left out of the head and reported.
* Data: `CropStream`, an IterableDataset that reads crop bytes straight from the catalog's
  Parquet shards (one row group at a time, never the whole table) in DataLoader workers, with
  a per-worker shuffle buffer and optional class-balanced repeat factors. The order is a
  function of (seed, epoch), so a resumed run sees the same batches.
* Training: AdamW, linear warmup + cosine, bf16 autocast on CUDA, gradient accumulation,
  early stopping on val accuracy. `last/` (weights + optimizer, safetensors + JSON) is saved
  at every evaluation, so a crashed task resumes; `best/` is the registered expert.
* Registry: one `experts` row per (run, group), committed like any shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image
from prefect import task
from prefect.cache_policies import NO_CACHE
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from flows.params import TrainSpec
from models.expert import Expert, Transforms
from storage.catalog import connect
from storage.layout import DataRoot
from storage.schema import EXPERTS, to_table
from storage.shards import Output, commit_shard, is_committed
from tasks.baselines import source_key
from tasks.retry import RETRY_DELAYS, retry_transient

log = logging.getLogger(__name__)

STAGE = "train"
TRAIN_VERSION = "1"  # bump when the same spec and crops would train a different expert
TINY = "tiny-random"


# ---------------------------------------------------------------- selection


@dataclass
class Selection:
    """The crops one expert trains and validates on, as (file, feature_ids, labels) units."""

    group: str
    key: str  # the `segmenter` value of the crops
    labels: list[str]  # head order
    train: list[tuple[str, list[str], list[int]]]
    val: list[tuple[str, list[str], list[int]]]
    train_crops: int
    val_crops: int
    class_counts: dict[str, int]  # train crops per kept country
    dropped: dict[str, int]  # countries below the minimum -> their train crops
    snapshot: str  # sha256 of the sorted (feature_id, country, split) rows


def default_segmenter(root: DataRoot, datasets: list[str] | None) -> str:
    """The latest segmenter (not a baseline) that has train crops."""
    con = connect(root, fresh=True)
    try:
        row = con.execute(
            "SELECT segmenter FROM features WHERE split = 'train' AND segmenter <> 'whole-image' "
            "AND NOT starts_with(segmenter, 'random@') AND (? IS NULL OR dataset IN (SELECT unnest(?))) "
            "GROUP BY segmenter ORDER BY max(created_at) DESC LIMIT 1", [datasets, datasets or []]).fetchone()
    finally:
        con.close()
    if row is None:
        raise LookupError(f"no train crops in the catalog at {root.url}"
                          + (f" for datasets {datasets}" if datasets else "") + "; run build-feature-datasets first")
    return row[0]


def _units(rows: list[tuple], index: dict[str, int]) -> list[tuple[str, list[str], list[int]]]:
    by_file: dict[str, tuple[list[str], list[int]]] = {}
    for fid, country, _split, fname in rows:
        ids, labels = by_file.setdefault(fname, ([], []))
        ids.append(fid)
        labels.append(index[country])
    return [(f, ids, labels) for f, (ids, labels) in sorted(by_file.items())]


def select_crops(root: DataRoot, spec: TrainSpec, group: str, segmenter: str) -> Selection:
    key = source_key(group, segmenter)
    con = connect(root, fresh=True)
    try:
        rows = con.execute(
            "SELECT feature_id, country, split, filename FROM features WHERE segmenter = ? AND \"group\" = ? "
            "AND split IN ('train', 'val') AND (? IS NULL OR dataset IN (SELECT unnest(?))) ORDER BY feature_id",
            [key, group, spec.datasets, spec.datasets or []]).fetchall()
    finally:
        con.close()
    train = [r for r in rows if r[2] == "train"]
    if spec.max_train_samples and len(train) > spec.max_train_samples:
        keep = np.random.default_rng(spec.seed).choice(len(train), spec.max_train_samples, replace=False)
        train = [train[i] for i in sorted(keep)]
    counts: dict[str, int] = {}
    for r in train:
        counts[r[1]] = counts.get(r[1], 0) + 1
    kept = sorted(c for c, n in counts.items() if n >= spec.min_crops_per_country)
    dropped = {c: n for c, n in sorted(counts.items()) if n < spec.min_crops_per_country}
    index = {c: i for i, c in enumerate(kept)}
    train = [r for r in train if r[1] in index]
    val = [r for r in rows if r[2] == "val" and r[1] in index]
    digest = hashlib.sha256()
    for fid, country, split, _ in sorted(train + val):
        digest.update(f"{fid},{country},{split}\n".encode())
    return Selection(group=group, key=key, labels=kept, train=_units(train, index), val=_units(val, index),
                     train_crops=len(train), val_crops=len(val), class_counts={c: counts[c] for c in kept},
                     dropped=dropped, snapshot=digest.hexdigest())


def repeat_factors(labels: np.ndarray, balance: str) -> np.ndarray:
    """Expected copies of each crop per epoch: ~ count(class)^-alpha, normalised to one epoch's worth."""
    if balance == "none" or len(labels) == 0:
        return np.ones(len(labels))
    alpha = 0.5 if balance == "sqrt" else 1.0
    counts = np.bincount(labels)
    weight = counts[labels].astype(np.float64) ** -alpha
    return weight * len(labels) / weight.sum()


# ---------------------------------------------------------------- data


class CropStream(IterableDataset):
    """(pixels, label, worker) from crop bytes in the catalog's Parquet files.

    Each epoch, the files' selected rows are cut into pieces and dealt to the workers by size (an
    order drawn from (seed, epoch)), so workers get equal shares; each worker reads one row group
    at a time (only `feature_id` and `crop`), keeps its rows, repeats each by its class repeat
    factor (train) and yields through a shuffle buffer. `skip` (worker -> samples) drops the
    first samples of each worker's stream undecoded: resuming mid-epoch replays nothing, since
    the trainer counts what each worker delivered (the `worker` item)."""

    PIECES_PER_WORKER = 4  # finer pieces balance better; each costs one more read of its row group

    def __init__(self, home: str, units: list[tuple[str, list[str], list[int]]], transforms: Transforms, *,
                 train: bool, balance: str = "none", shuffle_buffer: int = 1024, seed: int = 0):
        self.home = home
        self.units = units
        self.transforms = transforms
        self.train = train
        self.shuffle_buffer = shuffle_buffer if train else 1
        self.seed = seed
        self.epoch = 0
        self.skip: dict[int, int] = {}
        labels = np.array([lab for _, _, labels in units for lab in labels], dtype=np.int64)
        factors = repeat_factors(labels, balance) if train else np.ones(len(labels))
        self.factors, start = [], 0
        for _, ids, _ in units:
            self.factors.append(factors[start:start + len(ids)])
            start += len(ids)
        self.crops = len(labels)

    def __len__(self) -> int:
        return self.crops

    def deal(self, workers: int) -> list[list[tuple[int, slice]]]:
        """Per worker, the (unit, row slice) pieces it reads this epoch: largest piece to the least
        loaded worker. Deterministic for (seed, epoch, workers)."""
        size = max(1, math.ceil(self.crops / (workers * self.PIECES_PER_WORKER)))
        pieces = [(u, slice(k, k + size)) for u, (_, ids, _) in enumerate(self.units) for k in range(0, len(ids), size)]
        if self.train:
            pieces = [pieces[i] for i in np.random.default_rng((self.seed, self.epoch)).permutation(len(pieces))]
        else:  # eval: keep file order; workers still get equal shares
            pieces = sorted(pieces, key=lambda p: (p[0], p[1].start))
        load, out = [0] * workers, [[] for _ in range(workers)]
        for u, sl in sorted(pieces, key=lambda p: -len(self.units[p[0]][1][p[1]])):
            w = int(np.argmin(load))
            out[w].append((u, sl))
            load[w] += len(self.units[u][1][sl])
        return out

    def _rows(self, pieces: list[tuple[int, slice]]):
        fs = DataRoot(self.home).fs
        for u, sl in pieces:
            path, ids, labels = self.units[u]
            wanted = dict(zip(ids[sl], zip(labels[sl], self.factors[u][sl])))
            rng = np.random.default_rng((self.seed, self.epoch, u, sl.start))
            with fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                for rg in range(pf.num_row_groups):
                    t = pf.read_row_group(rg, columns=["feature_id", "crop"])
                    blobs = t.column("crop").combine_chunks().field("bytes")
                    for i, fid in enumerate(t.column("feature_id").to_pylist()):
                        if fid not in wanted:
                            continue
                        label, factor = wanted[fid]
                        copies = int(factor) + int(rng.random() < factor - int(factor)) if self.train else 1
                        for _ in range(copies):
                            yield blobs[i].as_py(), label

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        pieces = self.deal(workers)[worker]
        rng = np.random.default_rng((self.seed, self.epoch, 10_000 + worker))
        skip = self.skip.get(worker, 0)
        share = sum(len(self.units[u][1][sl]) for u, sl in pieces)
        capacity = max(1, min(self.shuffle_buffer, share // 2))  # a small share is not read whole before yielding
        buffer: list[tuple[bytes, int]] = []
        n = 0

        def emit(item):
            nonlocal n
            n += 1
            if n <= skip:
                return None
            data, label = item
            img = Image.open(io.BytesIO(data))
            img.draft("RGB", (self.transforms.size, self.transforms.size))  # JPEG: decode at a reduced scale
            index = (self.epoch << 40) + (worker << 32) + n  # a distinct augmentation per sample, worker, epoch
            return self.transforms(img.convert("RGB"), index=index), label, worker

        for item in self._rows(pieces):
            if len(buffer) < capacity:
                buffer.append(item)
                continue
            j = int(rng.integers(len(buffer)))
            buffer[j], item = item, buffer[j]
            out = emit(item)
            if out is not None:
                yield out
        rng.shuffle(buffer)
        for item in buffer:
            out = emit(item)
            if out is not None:
                yield out


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def make_loader(stream: CropStream, batch_size: int, workers: int, pin: bool = False) -> DataLoader:
    return DataLoader(stream, batch_size=batch_size, num_workers=workers, prefetch_factor=4 if workers else None,
                      worker_init_fn=_worker_init if workers else None, pin_memory=pin)


# ---------------------------------------------------------------- checkpoints


def _save_state(directory: str, model, optimizer, scheduler, state: dict) -> None:
    """Resumable state, pickle-free: weights and optimizer tensors in safetensors, the rest in JSON."""
    tmp = directory + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, f"{tmp}/model.safetensors")
    opt = optimizer.state_dict()
    tensors = {f"{i}.{name}": v.contiguous().cpu() for i, s in opt["state"].items() for name, v in s.items()}
    if tensors:
        save_file(tensors, f"{tmp}/optimizer.safetensors")
    meta = {"state": state, "param_groups": opt["param_groups"], "scheduler": scheduler.state_dict()}
    with open(f"{tmp}/trainer_state.json", "w") as f:
        json.dump(meta, f, default=float)
    old = directory + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(directory):
        os.rename(directory, old)
    os.rename(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def _load_state(directory: str, model, optimizer, scheduler) -> dict:
    with open(f"{directory}/trainer_state.json") as f:
        meta = json.load(f)
    model.load_state_dict(load_file(f"{directory}/model.safetensors"))
    state: dict[int, dict] = {}
    if os.path.exists(f"{directory}/optimizer.safetensors"):
        for key, value in load_file(f"{directory}/optimizer.safetensors").items():
            i, name = key.split(".", 1)
            state.setdefault(int(i), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    return meta["state"]


# ---------------------------------------------------------------- training


def run_id(spec: TrainSpec, segmenter: str) -> str:
    payload = json.dumps([TRAIN_VERSION, spec.identity(), segmenter], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def expert_id(spec: TrainSpec, segmenter: str, sel: Selection) -> str:
    return f"{sel.group}-{run_id(spec, segmenter)}-{sel.snapshot[:10]}"


def _start_model(spec: TrainSpec, labels: list[str], device: str) -> Expert:
    if spec.checkpoint == TINY:
        return Expert.tiny_random(labels, seed=spec.seed, device=device, image_size=spec.tiny_image_size)
    return Expert.from_pretrained(spec.checkpoint, labels=labels, device=device)


def evaluate_crops(expert: Expert, loader: DataLoader) -> tuple[float | None, int]:
    correct = total = 0
    expert.model.eval()
    for x, y, _ in loader:
        pred = expert.logits(x).argmax(-1)
        correct += int((pred == y).sum())
        total += len(y)
    return (correct / total if total else None), total


def _local_dir(root: DataRoot, eid: str) -> str:
    """Checkpoints are written locally (under the root when it is local), then uploaded if not."""
    if root.is_local:
        return root.path("checkpoints", eid)
    return os.path.join(tempfile.gettempdir(), "geofeat-checkpoints", hashlib.sha1(root.url.encode()).hexdigest()[:8], eid)


def train_expert(root: DataRoot, spec: TrainSpec, group: str, segmenter: str, *, stop_after_steps: int | None = None) -> dict:
    """Train (or resume, or skip when registered) the expert of one group; returns its summary.

    `stop_after_steps` (tests) raises after that many optimizer steps, like a crash."""
    sel = select_crops(root, spec, group, segmenter)
    eid = expert_id(spec, segmenter, sel)
    summary = {"group": group, "expert_id": eid, "train_crops": sel.train_crops, "val_crops": sel.val_crops,
               "countries": len(sel.labels), "dropped_countries": sel.dropped}
    if is_committed(root, STAGE, "experts", eid):
        return {**summary, "cached": True}
    if sel.dropped:
        log.warning("%s: %d countries below %d train crops are left out: %s", group, len(sel.dropped),
                    spec.min_crops_per_country, sel.dropped)
    if len(sel.labels) < 2:
        log.warning("%s: %d countries with enough crops; no expert trained", group, len(sel.labels))
        return {**summary, "skipped": f"{len(sel.labels)} countries with >= {spec.min_crops_per_country} train crops"}

    expert = _start_model(spec, sel.labels, spec.device)
    expert.untrained = False  # it is being trained; `untrained` in the registry says it started from random init
    device = expert.device
    workers = spec.workers_for(device.type)
    train_set = CropStream(root.url, sel.train, expert.transforms(train=True, seed=spec.seed), train=True,
                           balance=spec.balance, shuffle_buffer=spec.shuffle_buffer, seed=spec.seed)
    val_set = CropStream(root.url, sel.val, expert.transforms(train=False), train=False)
    pin = device.type == "cuda"
    steps_per_epoch = max(1, math.ceil(sel.train_crops / (spec.batch_size * spec.grad_accum)))
    total_steps = steps_per_epoch * spec.epochs
    if spec.max_steps:
        total_steps = min(total_steps, spec.max_steps)
    eval_every = spec.eval_every or steps_per_epoch

    from transformers import get_cosine_schedule_with_warmup

    model = expert.model
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(spec.warmup_ratio * total_steps), total_steps)
    local = _local_dir(root, eid)
    last_dir, best_dir = f"{local}/last", f"{local}/best"
    # consumed: samples each loader worker delivered this epoch (what a resume skips)
    state = {"step": 0, "epoch": 0, "consumed": {}, "workers": workers, "best": None, "best_step": 0,
             "bad_evals": 0, "curve": [], "wall_s": 0.0}
    if os.path.exists(f"{last_dir}/trainer_state.json"):
        state = _load_state(last_dir, model, optimizer, scheduler)
        if state["workers"] != workers:  # the data order depends on the worker count: keep the run's
            log.warning("%s: resuming with the run's %d loader workers (not %d)", group, state["workers"], workers)
            workers = state["workers"]
        log.info("%s: resumed at step %d (epoch %d)", group, state["step"], state["epoch"])
        summary["resumed_at_step"] = state["step"]

    def evaluate_and_save() -> bool:
        """Val accuracy, best/ when it improves, last/ always; True = stop early."""
        acc, n = evaluate_crops(expert, make_loader(val_set, spec.batch_size, workers, pin))
        state["curve"].append({"step": state["step"], "val_accuracy": acc, "train_loss": state.get("loss")})
        improved = acc is not None and (state["best"] is None or acc > state["best"])
        if improved or state["best_step"] == 0 and not os.path.exists(best_dir):
            state["best"], state["best_step"], state["bad_evals"] = acc, state["step"], 0
            expert.save(best_dir, resolved_config=spec.identity(), feature_snapshot=snapshot_info,
                        metrics={"val_accuracy": acc, "step": state["step"]})
        elif acc is not None:
            state["bad_evals"] += 1
        state["wall_s"] += time.perf_counter() - clock[0]
        clock[0] = time.perf_counter()
        _save_state(last_dir, model, optimizer, scheduler, state)
        log.info("%s: step %d/%d val_accuracy=%s (n=%d)", group, state["step"], total_steps, acc, n)
        return state["bad_evals"] >= spec.patience

    snapshot_info = {"segmenter": sel.key, "group": group, "datasets": spec.datasets, "sha256": sel.snapshot,
                     "train_crops": sel.train_crops, "val_crops": sel.val_crops, "class_counts": sel.class_counts,
                     "dropped_countries": sel.dropped}
    clock = [time.perf_counter()]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    stop = state["step"] >= total_steps or state["bad_evals"] >= spec.patience
    while not stop:
        train_set.epoch = state["epoch"]
        train_set.skip = {int(w): n for w, n in state["consumed"].items()}  # resume: skipped undecoded
        consumed = torch.zeros(max(1, workers), dtype=torch.int64)
        for w, n in train_set.skip.items():
            consumed[w] = n
        model.train()
        micro = 0
        loss_sum, loss_n = torch.zeros((), device=device), 0  # summed on the device: no sync per step
        for x, y, source in make_loader(train_set, spec.batch_size, workers, pin):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast or torch.autocast("cpu", enabled=False):
                logits = model(pixel_values=x).logits
            loss = F.cross_entropy(logits.float(), y, label_smoothing=spec.label_smoothing)
            (loss / spec.grad_accum).backward()
            loss_sum += loss.detach()
            loss_n += 1
            micro += 1
            consumed += torch.bincount(source, minlength=len(consumed))
            if micro % spec.grad_accum:
                continue
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            state["consumed"] = {w: int(n) for w, n in enumerate(consumed.tolist())}
            if stop_after_steps is not None and state["step"] >= stop_after_steps:
                raise RuntimeError(f"stopped after {stop_after_steps} steps (simulated crash)")
            if state["step"] % eval_every == 0 or state["step"] >= total_steps:
                state["loss"] = float(loss_sum) / max(1, loss_n)  # mean train loss since the last evaluation
                loss_sum.zero_()
                loss_n = 0
                stop = evaluate_and_save() or state["step"] >= total_steps
                model.train()
                if stop:
                    break
        if not stop:
            state["epoch"] += 1
            state["consumed"] = {}
            if state["epoch"] >= spec.epochs:
                if loss_n:
                    state["loss"] = float(loss_sum) / loss_n
                stop = evaluate_and_save() or True
    if not os.path.exists(best_dir):
        raise RuntimeError(f"{group}: training ended without a checkpoint in {best_dir}")

    metrics = {"val_accuracy": state["best"], "best_step": state["best_step"], "steps": state["step"],
               "curve": state["curve"], "wall_s": round(state["wall_s"], 2), "device": str(device),
               "workers": workers, "dropped_countries": sel.dropped, "class_counts": sel.class_counts}
    best_sidecar = Expert.read_sidecar(best_dir)
    best_sidecar["metrics"] = metrics
    with open(f"{best_dir}/geofeat_expert.json", "w") as f:
        json.dump(best_sidecar, f, indent=2, default=str)
    uri = root.path("checkpoints", eid, "best")
    if not root.is_local:
        # trailing slashes: copy the contents; a retried upload must not nest a second best/ inside
        root.fs.put(f"{best_dir}/", f"{uri}/", recursive=True)
    row = {"expert_id": eid, "run_id": run_id(spec, segmenter), "group": group, "segmenter": segmenter, "uri": uri,
           "base_checkpoint": spec.checkpoint, "labels": sel.labels, "snapshot": sel.snapshot,
           "train_crops": sel.train_crops, "val_crops": sel.val_crops, "steps": state["step"],
           "val_accuracy": state["best"], "untrained": spec.checkpoint == TINY or expert.untrained,
           "metrics": json.dumps(metrics, default=str), "config": json.dumps(spec.identity(), default=str),
           "created_at": datetime.now(timezone.utc)}
    commit_shard(root, STAGE, "experts", eid, [Output("experts", {"group": group}, to_table([row], EXPERTS))],
                 params={"segmenter": segmenter, "spec": spec.identity()})
    shutil.rmtree(last_dir, ignore_errors=True)  # the registered best/ is what stays
    log.info("%s: expert %s registered (val_accuracy=%s, %d steps, %.1f s)", group, eid, state["best"],
             state["step"], state["wall_s"])
    return {**summary, "cached": False, "val_accuracy": state["best"], "steps": state["step"],
            "wall_s": round(state["wall_s"], 2), "uri": uri}


# ---------------------------------------------------------------- Prefect edge


@task(name="train-expert", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=RETRY_DELAYS,
      retry_condition_fn=retry_transient, task_run_name="train-{group}")
def train_expert_task(home: str, spec: TrainSpec, group: str, segmenter: str) -> dict:
    """Waits for the `gpu` slot (shared with segmentation), then trains. A retry or a rerun resumes
    from `last/`; the commit record is the cache, as for shards."""
    from prefect.concurrency.sync import concurrency

    from tasks.segment import GPU_LIMIT

    with concurrency(GPU_LIMIT, occupy=1):
        return train_expert(DataRoot(home), spec, group, segmenter)
