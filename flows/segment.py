"""Flow `segment`: crop features out of catalogued images with one segmenter version.

Only images this segmenter version has not segmented are planned, so a rerun is a no-op
and a new checkpoint or new parameters (a new segmenter id) segment everything again while
the previous version's features stay queryable by their `segmenter` value. The `resegment`
deployment in prefect.yaml runs this flow on a cron schedule.

Its tasks: `plan-segment` (per dataset) and `segment-shard` (tasks/segment.py).
"""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed
from prefect.logging import get_run_logger

from flows.runner import RunnerSpec, gpu_slot, gpu_tasks, retried, use_runner
from storage.catalog import refresh_catalog
from storage.layout import DataRoot
from storage.queries import catalog
from tasks import segment as stage
from tasks.quality import quality_checks, quality_markdown
from tasks.specs import CropSpec, RunOptions, SegmenterSpec


@task(name="plan-segment", **retried(2))
def plan_segment_task(home: str, dataset: str, segmenter_id: str, shard_size: int) -> list[stage.SegmentPlan]:
    return stage.plan_segment(DataRoot(home), dataset, segmenter_id, shard_size)


@task(name="segment-shard", task_run_name="segment-{plan.dataset}-{plan.shard_id}", **retried(3))
def segment_shard_task(home: str, plan: stage.SegmentPlan, spec: SegmenterSpec, crops: CropSpec,
                       run: RunOptions) -> dict:
    return stage.segment_shard(DataRoot(home), plan, spec, crops, run)


def catalog_datasets(root: DataRoot) -> list[str]:
    refresh_catalog(root)
    with catalog(root) as cat:
        return cat.datasets()


@flow(name="segment")
def segment(
    datasets: list[str] | None = None,
    segmenter: SegmenterSpec = SegmenterSpec(),
    crops: CropSpec = CropSpec(),
    run: RunOptions = RunOptions(),
    home: str | None = None,
    runner: RunnerSpec = RunnerSpec(),
) -> dict:
    """Segment `datasets` (default: every dataset in the catalog) and check the result."""
    root = DataRoot.from_env(home)
    with use_runner(runner):
        return segment_datasets(root, datasets or catalog_datasets(root), segmenter, crops, run)


def segment_datasets(root: DataRoot, names: list[str], spec: SegmenterSpec, crops: CropSpec,
                     run: RunOptions) -> dict:
    """The segmentation stage's tasks, composed inside the calling flow run."""
    log = get_run_logger()
    segmenter_id = stage.segmenter_id(spec, crops)
    if spec.kind == "tiny-random":
        log.warning("segmenter %s is an UNTRAINED random-init Mask2Former: its crops are NOT meaningful", segmenter_id)
    # The stage holds the `gpu` slot (a file lock on the data root, flows/runner.py) while it plans
    # and runs: a plan made while another run still segments would give the same images other shard
    # ids and segment them twice. It keeps `run.concurrent_shards` shard tasks in flight; they share
    # this process's model (on Dask: each worker's model, and only workers offering the runner's GPU
    # resource take them).
    results, active = [], []
    with gpu_slot(root):
        plans = [p for name in names for p in plan_segment_task(root.url, name, segmenter_id, run.shard_size)]
        log.info("segmenter %s: %d shard(s) of new images in %s", segmenter_id, len(plans), names)
        progress = create_progress_artifact(0.0, key="segmentation-progress",
                                            description=f"shards segmented by {segmenter_id}")

        def finished(future) -> None:
            results.append(future.result())
            update_progress_artifact(progress, 100.0 * len(results) / max(1, len(plans)))

        with gpu_tasks(submits=bool(plans)):
            for plan in plans:
                if len(active) >= run.concurrent_shards:
                    done = next(as_completed(active))
                    active.remove(done)
                    finished(done)
                active.append(segment_shard_task.submit(root.url, plan, spec, crops, run))
            for done in as_completed(active):
                finished(done)
    update_progress_artifact(progress, 100.0)
    refresh_catalog(root)
    checks = quality_checks(root, segmenter_id, names)
    create_markdown_artifact(quality_markdown(segmenter_id, checks, untrained=spec.kind == "tiny-random"),
                             key="data-quality", description=f"quality of {segmenter_id}")
    for c in checks:
        (log.info if c.passed else log.warning)("quality %s: %s: %s", "PASS" if c.passed else "FAIL", c.name, c.detail)
    return {
        "segmenter": segmenter_id,
        "datasets": names,
        "shards": len(plans),
        "images": sum(r["images"] for r in results),
        "crops": sum(r["crops"] for r in results),
        "model_calls": sum(r["model_calls"] for r in results),
        "checks_failed": [c.name for c in checks if not c.passed],
    }
