"""Flow `train-experts`: one expert per feature group (plus the baselines), each a retryable,
resumable task that holds the `gpu` concurrency slot while it trains. Experts already
registered for the same spec and the same crops are skipped, so a rerun is a no-op; new
crops (a new snapshot) train new experts. Deployed by hand or by a trigger (prefect.yaml).

Its tasks: `baselines` (whole-image and random crops, once per image: tasks/baselines.py) and
`train-experts` (one run per group: tasks/train_experts.py).
"""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.logging import get_run_logger

from flows.names import artifact_key, baselines_name, datasets_label, train_expert_name, train_run_name
from flows.progress import advance_as_completed
from flows.runner import RunnerSpec, gpu_slot, gpu_tasks, retried, stage_lock, use_runner
from flows.segment import catalog_datasets
from storage.catalog import refresh_catalog
from storage.layout import DataRoot
from tasks import baselines, progress
from tasks import train_experts as stage
from tasks.specs import TINY, TrainSpec


@task(name="baselines", task_run_name=baselines_name, **retried(3))
def baselines_task(home: str, plan: baselines.BaselinePlan, segmenter_id: str) -> dict:
    return baselines.baseline_shard(DataRoot(home), plan, segmenter_id)


@task(name="train-experts", task_run_name=train_expert_name, **retried(2))
def train_experts_task(home: str, spec: TrainSpec, group: str, segmenter_id: str) -> dict:
    """Waits for the `gpu` slot (shared with segmentation), then trains one group's expert. A retry or
    a rerun resumes from `last/`; the commit record is the cache, as for shards."""
    with gpu_slot(home):
        return stage.train_expert(DataRoot(home), spec, group, segmenter_id)


def ensure_baselines(root: DataRoot, kinds: list[str], datasets: list[str], segmenter_id: str,
                     shard_size: int = 256) -> dict:
    """Make the missing `kinds` crops of `datasets` (one task per shard, inside the calling flow)."""
    plans = [p for kind in kinds for p in baselines.plan_baselines(root, kind, datasets, segmenter_id, shard_size)]
    if not plans:
        return {"shards": 0, "crops": 0}
    with progress.scope("baselines", f"{' and '.join(kinds)} crops of {datasets_label(datasets)}",
                        total=sum(len(p.images) for p in plans), unit="images") as bar:
        futures = baselines_task.map(root.url, plans, segmenter_id)
        advance_as_completed(bar, futures, [len(p.images) for p in plans])
    results = [f.result() for f in futures]  # raises if a shard failed after its retries
    refresh_catalog(root)
    return {"shards": len(plans), "crops": sum(r["crops"] for r in results)}


@flow(name="train-experts", flow_run_name=train_run_name)
def train_experts(spec: TrainSpec = TrainSpec(), home: str | None = None, runner: RunnerSpec = RunnerSpec()) -> dict:
    log = get_run_logger()
    root = DataRoot.from_env(home)
    refresh_catalog(root)
    segmenter_id = spec.segmenter or stage.default_segmenter(root, spec.datasets, spec.allow_untrained)
    if spec.checkpoint == TINY:
        log.warning("experts start from an UNTRAINED tiny random-init ViT: a demo, not the poster's ViT-B/16")
    datasets = catalog_datasets(root)  # baseline crops for every dataset: evaluation needs the test ones too
    kinds = (["image"] if spec.baseline else []) + (["random"] if spec.random_crops else [])
    groups = list(spec.groups) + kinds
    with use_runner(runner):
        with stage_lock(root, "baselines", "the baseline crops"):  # planned and made by one run at a time
            made = ensure_baselines(root, kinds, datasets, segmenter_id, spec.baseline_shard_size)
        with gpu_tasks():
            futures = [train_experts_task.submit(root.url, spec, g, segmenter_id) for g in groups]
        results = [f.result() for f in futures]
    refresh_catalog(root)
    rows = [{"group": r["group"], "expert": r["expert_id"], "status": "cached" if r.get("cached") else
             r.get("skipped") or "trained", "countries": r["countries"], "train_crops": r["train_crops"],
             "val_crops": r["val_crops"], "val_accuracy": r.get("val_accuracy"), "steps": r.get("steps"),
             "wall_s": r.get("wall_s"), "dropped_countries": ", ".join(f"{c}:{n}" for c, n in r["dropped_countries"].items())}
            for r in results]
    create_table_artifact(rows, key=artifact_key("experts", segmenter_id), description=f"experts on {segmenter_id}"
                          + (" (UNTRAINED tiny random-init start)" if spec.checkpoint == TINY else ""))
    for r in rows:
        log.info("expert %s", r)
    stage.require_experts(results, segmenter_id)  # every group refused: a failed run, not an empty success
    return {"segmenter": segmenter_id, "baselines": made, "experts": results}
