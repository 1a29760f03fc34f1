"""Flow `train-experts`: one expert per feature group (plus the baselines), each a retryable,
resumable task that holds the `gpu` concurrency slot while it trains. Experts already
registered for the same spec and the same crops are skipped, so a rerun is a no-op; new
crops (a new snapshot) train new experts. Deployed by hand or by a trigger (prefect.yaml)."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_table_artifact
from prefect.logging import get_run_logger

from flows.params import RunnerSpec, TrainSpec
from flows.runner import gpu_tasks, use_runner
from flows.segment import catalog_datasets, ensure_gpu_limit
from storage.catalog import refresh_catalog
from storage.layout import DataRoot
from tasks.baselines import ensure_baselines
from tasks.train import TINY, default_segmenter, train_expert_task

@flow(name="train-experts")
def train_experts(spec: TrainSpec = TrainSpec(), home: str | None = None, runner: RunnerSpec = RunnerSpec()) -> dict:
    log = get_run_logger()
    root = DataRoot.from_env(home)
    refresh_catalog(root)
    segmenter = spec.segmenter or default_segmenter(root, spec.datasets)
    if spec.checkpoint == TINY:
        log.warning("experts start from an UNTRAINED tiny random-init ViT: a demo, not the poster's ViT-B/16")
    datasets = catalog_datasets(root)  # baseline crops for every dataset: evaluation needs the test ones too
    kinds = (["image"] if spec.baseline else []) + (["random"] if spec.random_crops else [])
    groups = list(spec.groups) + kinds
    ensure_gpu_limit()
    with use_runner(runner):
        baselines = ensure_baselines(root, kinds, datasets, segmenter, spec.baseline_shard_size)
        with gpu_tasks():
            futures = [train_expert_task.submit(root.url, spec, g, segmenter) for g in groups]
        results = [f.result() for f in futures]
    refresh_catalog(root)
    rows = [{"group": r["group"], "expert": r["expert_id"], "status": "cached" if r.get("cached") else
             r.get("skipped") or "trained", "countries": r["countries"], "train_crops": r["train_crops"],
             "val_crops": r["val_crops"], "val_accuracy": r.get("val_accuracy"), "steps": r.get("steps"),
             "wall_s": r.get("wall_s"), "dropped_countries": ", ".join(f"{c}:{n}" for c, n in r["dropped_countries"].items())}
            for r in results]
    create_table_artifact(rows, key="experts", description=f"experts on {segmenter}"
                          + (" (UNTRAINED tiny random-init start)" if spec.checkpoint == TINY else ""))
    for r in rows:
        log.info("expert %s", r)
    return {"segmenter": segmenter, "baselines": baselines, "experts": results}
