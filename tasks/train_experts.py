"""Stage `train-experts`: one expert (ViT: crop -> country) per feature group, from the `features` catalog.

* Selection: the group's train/val crops by their IMAGE's split (the `features` view takes split and
  country from `images`), so no image is on both sides. Countries with fewer than
  `min_crops_per_country` train crops are left out of the head and reported.
* Data: `tasks.loader.CropStream` reads crop bytes straight from the catalog's Parquet shards in
  loader workers that persist across epochs and deliver uint8 crops at the training size; jitter and
  normalisation run per batch on the model's device (`tasks.loader.device_batches`).
* Training: AdamW, linear warmup + cosine, bf16 autocast on CUDA, gradient accumulation and clipping,
  early stopping on val accuracy. `last/` (weights + optimizer, safetensors + JSON) is published at
  every evaluation, so a crashed task resumes; `best/` is the registered expert.
* Registry: one `experts` row per (run, group), committed like any shard.

Plain functions and one class; the flow `train-experts` (flows/train_experts.py) runs `train_expert`
once per group as a Prefect task.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from models.expert import Expert
from storage import publish
from storage.layout import DataRoot
from storage.queries import catalog
from storage.schema import EXPERTS, to_table
from storage.shards import Output, commit_shard, is_committed
from tasks.baselines import source_key
from tasks import progress
from tasks.loader import CropStream, Unit, close_loader, device_batches, make_loader
from tasks.specs import TINY, TrainSpec

log = logging.getLogger(__name__)

STAGE = "train-experts"
TRAIN_VERSION = "2"  # bump when the same spec and crops would train a different expert
# 2: augmentation keyed by (seed, epoch, crop, copy), drawn per sample in uint8 workers, jitter on the device


# ---------------------------------------------------------------- selection


@dataclass
class Selection:
    """The crops one expert trains and validates on, as (file, feature_ids, labels) units."""

    group: str
    key: str  # the `segmenter` value of the crops
    labels: list[str]  # head order
    train: list[Unit]
    val: list[Unit]
    train_crops: int
    val_crops: int
    class_counts: dict[str, int]  # train crops per kept country
    dropped: dict[str, int]  # countries below the minimum -> their train crops
    snapshot: str  # sha256 of the sorted (feature_id, country, split) rows

    def snapshot_info(self, datasets: list[str] | None) -> dict:
        """The feature snapshot saved next to the weights (provenance)."""
        return {"segmenter": self.key, "group": self.group, "datasets": datasets, "sha256": self.snapshot,
                "train_crops": self.train_crops, "val_crops": self.val_crops, "class_counts": self.class_counts,
                "dropped_countries": self.dropped}


def default_segmenter(root: DataRoot, datasets: list[str] | None, allow_untrained: bool = False) -> str:
    """The segmenter id (not a baseline) with the most recent train crops; an UNTRAINED one only
    when allowed (its crops are noise: experts trained on them learn nothing)."""
    with catalog(root, fresh=True) as cat:
        found = cat.latest_segmenter(datasets, allow_untrained)
        untrained = None if found or allow_untrained else cat.latest_segmenter(datasets, True)
    where = f" in the catalog at {root.url}" + (f" for datasets {datasets}" if datasets else "")
    if untrained:
        raise LookupError(f"the only segmenter with train crops{where} is UNTRAINED ({untrained}): its crops are "
                          "noise. Segment with a real checkpoint (geofeat segment --segmenter-checkpoint DIR), or "
                          "pass --allow-untrained (spec.allow_untrained: true) for a demo")
    if found is None:
        raise LookupError(f"no train crops{where}; run build-feature-datasets first")
    return found


def _units(rows: list[tuple], index: dict[str, int]) -> list[Unit]:
    by_file: dict[str, tuple[list[str], list[int]]] = {}
    for fid, country, _split, fname in rows:
        ids, labels = by_file.setdefault(fname, ([], []))
        ids.append(fid)
        labels.append(index[country])
    return [(f, ids, labels) for f, (ids, labels) in sorted(by_file.items())]


def select_crops(root: DataRoot, spec: TrainSpec, group: str, segmenter_id: str) -> Selection:
    key = source_key(group, segmenter_id)
    with catalog(root, fresh=True) as cat:
        rows = cat.training_crops(key, group, spec.datasets)
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


# ---------------------------------------------------------------- identity


def run_id(spec: TrainSpec, segmenter_id: str) -> str:
    payload = json.dumps([TRAIN_VERSION, spec.identity(), segmenter_id], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def expert_id(spec: TrainSpec, segmenter_id: str, sel: Selection) -> str:
    return f"{sel.group}-{run_id(spec, segmenter_id)}-{sel.snapshot[:10]}"


# ---------------------------------------------------------------- resumable state


def save_state(directory: str, model, optimizer, scheduler, state: dict) -> None:
    """Resumable state, pickle-free: weights and optimizer tensors in safetensors, the rest in JSON;
    the folder is published whole (storage.publish), so a crash leaves the previous one."""
    with publish.staged_folder(directory) as (_fs, tmp):
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, f"{tmp}/model.safetensors")
        opt = optimizer.state_dict()
        tensors = {f"{i}.{name}": v.contiguous().cpu() for i, s in opt["state"].items() for name, v in s.items()}
        if tensors:
            save_file(tensors, f"{tmp}/optimizer.safetensors")
        publish.write_json(f"{tmp}/trainer_state.json", {"state": state, "param_groups": opt["param_groups"],
                                                         "scheduler": scheduler.state_dict()}, default=float)


def load_state(directory: str, model, optimizer, scheduler) -> dict:
    meta = publish.read_json(f"{directory}/trainer_state.json")
    model.load_state_dict(load_file(f"{directory}/model.safetensors"))
    state: dict[int, dict] = {}
    if os.path.exists(f"{directory}/optimizer.safetensors"):
        for key, value in load_file(f"{directory}/optimizer.safetensors").items():
            i, name = key.split(".", 1)
            state.setdefault(int(i), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    return meta["state"]


def local_dir(root: DataRoot, eid: str) -> str:
    """Checkpoints are written locally (under the root when it is local), then uploaded if not."""
    if root.is_local:
        return root.path("checkpoints", eid)
    return os.path.join(tempfile.gettempdir(), "geofeat-checkpoints", hashlib.sha1(root.url.encode()).hexdigest()[:8], eid)


# ---------------------------------------------------------------- training


def start_model(spec: TrainSpec, labels: list[str], device: str) -> Expert:
    if spec.checkpoint == TINY:
        return Expert.tiny_random(labels, seed=spec.seed, device=device, image_size=spec.tiny_image_size)
    return Expert.from_pretrained(spec.checkpoint, labels=labels, device=device)


def evaluate_crops(expert: Expert, loader: DataLoader) -> tuple[float | None, int]:
    """Top-1 accuracy of `expert` over an eval loader's crops, and how many crops."""
    correct = total = 0
    expert.model.eval()
    for x, y, _ in device_batches(loader, expert, train=False):
        pred = expert.logits(x).argmax(-1)
        correct += int((pred == y).sum())
        total += len(y)
    return (correct / total if total else None), total


class Trainer:
    """One expert's training run: model, optimizer, schedule, data and the resumable `state`.

    Its two loaders (train, val) start once, after `resume` settled the worker count, and keep their
    workers for the whole run; `run_epoch` stops them when training stops or fails."""

    def __init__(self, root: DataRoot, spec: TrainSpec, sel: Selection, eid: str):
        from transformers import get_cosine_schedule_with_warmup

        self.spec, self.sel, self.eid = spec, sel, eid
        self.expert = start_model(spec, sel.labels, spec.device)
        self.expert.untrained = False  # it is being trained; `untrained` in the registry: started from random init
        self.device = self.expert.device
        self.workers = spec.workers_for(self.device.type)
        self.train_set = CropStream(root.url, sel.train, self.expert.transforms(train=True, seed=spec.seed), train=True,
                                    balance=spec.balance, shuffle_buffer=spec.shuffle_buffer, seed=spec.seed)
        self.val_set = CropStream(root.url, sel.val, self.expert.transforms(train=False), train=False)
        self.pin = self.device.type == "cuda"
        self._loaders: tuple[DataLoader, DataLoader] | None = None
        steps_per_epoch = max(1, math.ceil(sel.train_crops / (spec.batch_size * spec.grad_accum)))
        self.total_steps = steps_per_epoch * spec.epochs
        if spec.max_steps:
            self.total_steps = min(self.total_steps, spec.max_steps)
        self.eval_every = spec.eval_every or steps_per_epoch
        self.model = self.expert.model
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, int(spec.warmup_ratio * self.total_steps),
                                                         self.total_steps)
        local = local_dir(root, eid)
        self.last_dir, self.best_dir = f"{local}/last", f"{local}/best"
        # consumed: samples each (logical) loader worker delivered this epoch (what a resume skips);
        # next_worker: whose batch was due next (a resumed epoch continues in the same order)
        self.state = {"step": 0, "epoch": 0, "consumed": {}, "next_worker": 0, "workers": self.workers, "best": None,
                      "best_step": 0, "bad_evals": 0, "curve": [], "wall_s": 0.0}
        self.clock = time.perf_counter()
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                         else torch.autocast("cpu", enabled=False))

    def resume(self) -> int | None:
        """Continue from `last/` when a previous attempt left one; returns the step resumed at."""
        if not os.path.exists(f"{self.last_dir}/trainer_state.json"):
            return None
        self.state = load_state(self.last_dir, self.model, self.optimizer, self.scheduler)
        if self.state["workers"] != self.workers:  # the data order depends on the worker count: keep the run's
            log.warning("%s: resuming with the run's %d loader workers (not %d)", self.sel.group,
                        self.state["workers"], self.workers)
            self.workers = self.state["workers"]
        log.info("%s: resumed at step %d (epoch %d)", self.sel.group, self.state["step"], self.state["epoch"])
        self.clock = time.perf_counter()
        return self.state["step"]

    def loaders(self) -> tuple[DataLoader, DataLoader]:
        """(train, val) loaders with persistent workers, started on first use."""
        if self._loaders is None:
            batch, workers = self.spec.batch_size, self.workers
            self._loaders = (make_loader(self.train_set, batch, workers, self.pin, persistent=True),
                             make_loader(self.val_set, batch, workers, self.pin, persistent=True))
        return self._loaders

    def close(self) -> None:
        """Stop the loaders' workers."""
        for loader in self._loaders or ():
            close_loader(loader)
        self._loaders = None

    @property
    def done(self) -> bool:
        return self.state["step"] >= self.total_steps or self.state["bad_evals"] >= self.spec.patience

    def evaluate_and_save(self) -> bool:
        """Val accuracy, best/ when it improves, last/ always; True = stop (early or at the end)."""
        state, spec = self.state, self.spec
        acc, n = evaluate_crops(self.expert, self.loaders()[1])
        state["curve"].append({"step": state["step"], "val_accuracy": acc, "train_loss": state.get("loss")})
        improved = acc is not None and (state["best"] is None or acc > state["best"])
        if improved or state["best_step"] == 0 and not os.path.exists(self.best_dir):
            state["best"], state["best_step"], state["bad_evals"] = acc, state["step"], 0
            self.expert.save(self.best_dir, resolved_config=spec.resolved(),
                             feature_snapshot=self.sel.snapshot_info(spec.datasets),
                             metrics={"val_accuracy": acc, "step": state["step"]})
        elif acc is not None:
            state["bad_evals"] += 1
        now = time.perf_counter()
        state["wall_s"] += now - self.clock
        self.clock = now
        save_state(self.last_dir, self.model, self.optimizer, self.scheduler, state)
        log.info("%s: step %d/%d val_accuracy=%s (n=%d)", self.sel.group, state["step"], self.total_steps, acc, n)
        return self.done

    def run_epoch(self, stop_after_steps: int | None = None) -> bool:
        """Train until the epoch ends or training stops; True = stop. The loaders' workers are stopped
        when training stops or an error (a crash) leaves this method."""
        try:
            stop = self._run_epoch(stop_after_steps)
        except BaseException:
            self.close()
            raise
        if stop:
            self.close()
        return stop

    def _run_epoch(self, stop_after_steps: int | None) -> bool:
        state, spec, model = self.state, self.spec, self.model
        workers = max(1, self.workers)
        consumed = torch.zeros(workers, dtype=torch.int64)
        for w, n in state["consumed"].items():
            consumed[int(w)] = n
        next_worker = state.get("next_worker", 0)
        self.train_set.set_epoch(state["epoch"], state["consumed"], next_worker)  # resume: skipped undecoded
        model.train()
        micro = 0
        loss_sum, loss_n = torch.zeros((), device=self.device), 0  # summed on the device: no sync per step
        for x, y, source in device_batches(self.loaders()[0], self.expert, train=True):
            with self.autocast:
                logits = model(pixel_values=x).logits
            loss = F.cross_entropy(logits.float(), y, label_smoothing=spec.label_smoothing)
            (loss / spec.grad_accum).backward()
            loss_sum += loss.detach()
            loss_n += 1
            micro += 1
            consumed += torch.bincount(source, minlength=workers)
            next_worker = (int(source[-1]) + 1) % workers  # a batch comes from one worker
            if micro % spec.grad_accum:
                continue
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            progress.advance()
            state["consumed"] = {w: int(n) for w, n in enumerate(consumed.tolist())}
            state["next_worker"] = next_worker
            if stop_after_steps is not None and state["step"] >= stop_after_steps:
                raise RuntimeError(f"stopped after {stop_after_steps} steps (simulated crash)")
            if state["step"] % self.eval_every == 0 or state["step"] >= self.total_steps:
                state["loss"] = float(loss_sum) / max(1, loss_n)  # mean train loss since the last evaluation
                loss_sum.zero_()
                loss_n = 0
                if self.evaluate_and_save():
                    return True
                model.train()
        state["epoch"] += 1
        state["consumed"], state["next_worker"] = {}, 0
        if state["epoch"] >= spec.epochs:
            if loss_n:
                state["loss"] = float(loss_sum) / loss_n
            self.evaluate_and_save()
            return True
        return False

    def metrics(self) -> dict:
        s = self.state
        return {"val_accuracy": s["best"], "best_step": s["best_step"], "steps": s["step"], "curve": s["curve"],
                "wall_s": round(s["wall_s"], 2), "device": str(self.device), "workers": self.workers,
                "dropped_countries": self.sel.dropped, "class_counts": self.sel.class_counts}


def register(root: DataRoot, spec: TrainSpec, segmenter_id: str, trainer: Trainer) -> str:
    """Finish `best/` (final metrics in its sidecar), upload it for a remote root, commit the registry
    row; returns the checkpoint's URI."""
    sel, eid, metrics = trainer.sel, trainer.eid, trainer.metrics()
    sidecar = Expert.read_sidecar(trainer.best_dir)
    sidecar["metrics"] = metrics
    publish.write_json(f"{trainer.best_dir}/geofeat_expert.json", sidecar, indent=2, default=str)
    uri = root.path("checkpoints", eid, "best")
    if not root.is_local:
        publish.upload_folder(trainer.best_dir, uri)
    row = {"expert_id": eid, "run_id": run_id(spec, segmenter_id), "group": sel.group, "segmenter": segmenter_id,
           "uri": uri, "base_checkpoint": spec.checkpoint, "labels": sel.labels, "snapshot": sel.snapshot,
           "train_crops": sel.train_crops, "val_crops": sel.val_crops, "steps": trainer.state["step"],
           "val_accuracy": trainer.state["best"],
           "untrained": spec.checkpoint == TINY or trainer.expert.untrained or started_untrained(spec.checkpoint),
           "metrics": json.dumps(metrics, default=str), "config": json.dumps(spec.resolved(), default=str),
           "created_at": datetime.now(timezone.utc)}
    commit_shard(root, STAGE, "experts", eid, [Output("experts", {"group": sel.group}, to_table([row], EXPERTS))],
                 params={"segmenter": segmenter_id, "spec": spec.resolved()})
    publish.remove_folder(trainer.last_dir)  # the registered best/ is what stays
    return uri


def too_small(sel: Selection, spec: TrainSpec) -> str | None:
    """Why a selection is too small to train an expert on (None: it is not): it needs val crops (to pick
    the best step and stop early) and `min_countries` countries with enough train crops."""
    problems = []
    if len(sel.labels) < spec.min_countries:
        problems.append(f"{len(sel.labels)} countries with >= {spec.min_crops_per_country} train crops "
                        f"(need {spec.min_countries})")
    if sel.val_crops == 0:
        problems.append("no val crops of those countries")
    if not problems:
        return None
    total = sel.train_crops + sum(sel.dropped.values())
    return (f"{' and '.join(problems)} ({total} train crops in {len(sel.labels) + len(sel.dropped)} countries of "
            f"segmenter value {sel.key}); segment more images, or lower spec.min_crops_per_country")


def require_experts(results: list[dict], segmenter_id: str) -> None:
    """A train-experts run that refused every feature group (or every group) fails, saying why per group."""
    feature = [r for r in results if r["group"] not in ("image", "random")]
    made = [r for r in (feature or results) if not r.get("skipped")]
    if not made:
        why = "; ".join(f"{r['group']}: {r['skipped']}" for r in (feature or results))
        raise LookupError(f"no expert trained on segmenter {segmenter_id}: every group's selection is too small "
                          f"({why})")


def started_untrained(checkpoint: str) -> bool:
    """Does a local checkpoint directory say it is random-init (a geofeat-saved tiny model)?"""
    return bool(os.path.isdir(checkpoint) and Expert.read_sidecar(checkpoint).get("untrained"))


def train_expert(root: DataRoot, spec: TrainSpec, group: str, segmenter_id: str, *,
                 stop_after_steps: int | None = None) -> dict:
    """Train (or resume, or skip when registered) the expert of one group; returns its summary.

    `stop_after_steps` (tests) raises after that many optimizer steps, like a crash."""
    sel = select_crops(root, spec, group, segmenter_id)
    eid = expert_id(spec, segmenter_id, sel)
    summary = {"group": group, "expert_id": eid, "train_crops": sel.train_crops, "val_crops": sel.val_crops,
               "countries": len(sel.labels), "dropped_countries": sel.dropped}
    if is_committed(root, STAGE, "experts", eid):
        return {**summary, "cached": True}
    if sel.dropped:
        log.warning("%s: %d countries below %d train crops are left out: %s", group, len(sel.dropped),
                    spec.min_crops_per_country, sel.dropped)
    refusal = too_small(sel, spec)
    if refusal:
        log.warning("%s: not trained: %s", group, refusal)
        return {**summary, "skipped": refusal}

    trainer = Trainer(root, spec, sel, eid)
    resumed = trainer.resume()
    if resumed is not None:
        summary["resumed_at_step"] = resumed
    stop = trainer.done
    with progress.scope("train-experts", f"{group} expert", trainer.total_steps, "steps", done=trainer.state["step"]):
        while not stop:
            stop = trainer.run_epoch(stop_after_steps)
    if not os.path.exists(trainer.best_dir):
        raise RuntimeError(f"{group}: training ended without a checkpoint in {trainer.best_dir}")
    uri = register(root, spec, segmenter_id, trainer)
    state = trainer.state
    log.info("%s: expert %s registered (val_accuracy=%s, %d steps, %.1f s)", group, eid, state["best"],
             state["step"], state["wall_s"])
    return {**summary, "cached": False, "val_accuracy": state["best"], "steps": state["step"],
            "wall_s": round(state["wall_s"], 2), "uri": uri}
