"""Flow `segment`: crop features out of catalogued images with one segmenter version.

Only images this segmenter version has not segmented are planned, so a rerun is a no-op
and a new checkpoint or new parameters (a new segmenter id) segment everything again while
the previous version's features stay queryable by their `segmenter` value. The `resegment`
deployment in prefect.yaml runs this flow on a cron schedule.

Its tasks: `plan-segment` (per dataset) and `segment-shard` (tasks/segment.py).
"""

from __future__ import annotations

import time

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.futures import as_completed
from prefect.logging import get_run_logger

from flows.names import artifact_key, datasets_label, plan_segment_name, segment_run_name, segment_shard_name
from flows.runner import RunnerSpec, gpu_slot, gpu_tasks, retried, use_runner
from storage.catalog import refresh_catalog
from storage.layout import DataRoot
from storage.queries import catalog
from tasks import progress
from tasks import segment as stage
from tasks.quality import quality_checks, quality_markdown
from tasks.specs import CropSpec, RunOptions, SegmenterSpec


@task(name="plan-segment", task_run_name=plan_segment_name, **retried(2))
def plan_segment_task(home: str, dataset: str, segmenter_id: str, shard_size: int) -> list[stage.SegmentPlan]:
    return stage.plan_segment(DataRoot(home), dataset, segmenter_id, shard_size)


@task(name="segment-shard", task_run_name=segment_shard_name, **retried(3))
def segment_shard_task(home: str, plan: stage.SegmentPlan, spec: SegmenterSpec, crops: CropSpec,
                       run: RunOptions) -> dict:
    return stage.segment_shard(DataRoot(home), plan, spec, crops, run)


def catalog_datasets(root: DataRoot) -> list[str]:
    refresh_catalog(root)
    with catalog(root) as cat:
        return cat.datasets()


@flow(name="segment", flow_run_name=segment_run_name)
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
    bar = None
    results, sizes = [], {}

    def finished(future) -> None:
        try:
            results.append(future.result())
        except BaseException:
            bar.finish(failed=True)
            raise
        bar.advance(sizes.get(results[-1]["shard_id"], 0))

    # The stage holds the `gpu` slot (a file lock on the data root, flows/runner.py) while it plans
    # and runs: a plan made while another run still segments would give the same images other shard
    # ids and segment them twice (the lock costs under a millisecond, so a no-op rerun pays nothing
    # for it). It keeps `run.concurrent_shards` shard tasks in flight. They feed this process's one
    # streaming pipeline (tasks/segment_stream.py): while a shard commits in the background the next
    # one is already being read and segmented. On Dask each GPU worker streams the shards it gets.
    # With nothing to segment (a no-op rerun) the model and the readers are never started.
    with gpu_slot(root):
        clock = time.perf_counter()
        plans = [p for name in names for p in plan_segment_task(root.url, name, segmenter_id, run.shard_size)]
        timings = {"plan_s": time.perf_counter() - clock}
        log.info("segmenter %s: %d shard(s) of new images in %s", segmenter_id, len(plans), names)
        bar = progress.Scope("segment", datasets_label(names), total=sum(len(p.images) for p in plans), unit="images")
        bar.emit()
        sizes = {p.shard_id: len(p.images) for p in plans}
        clock = time.perf_counter()
        if plans:
            active = []
            try:
                with gpu_tasks():
                    for plan in plans:
                        if len(active) >= run.concurrent_shards:
                            done = next(as_completed(active))
                            active.remove(done)
                            finished(done)
                        active.append(segment_shard_task.submit(root.url, plan, spec, crops, run))
                    for done in as_completed(active):
                        finished(done)
            finally:
                stage.close_streams()  # the reader processes end with the stage run
        timings["segment_s"] = time.perf_counter() - clock
    bar.finish()
    clock = time.perf_counter()
    refresh_catalog(root)
    timings["refresh_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    checks = quality_checks(root, segmenter_id, names)
    create_markdown_artifact(quality_markdown(segmenter_id, checks, untrained=spec.kind == "tiny-random"),
                             key=artifact_key("data-quality", segmenter_id), description=f"quality of {segmenter_id}")
    for c in checks:
        (log.info if c.passed else log.warning)("quality %s: %s: %s", "PASS" if c.passed else "FAIL", c.name, c.detail)
    timings["quality_s"] = time.perf_counter() - clock
    return {
        "segmenter": segmenter_id,
        "datasets": names,
        "shards": len(plans),
        "images": sum(r["images"] for r in results),
        "crops": sum(r["crops"] for r in results),
        "model_calls": sum(r["model_calls"] for r in results),
        "checks_failed": [c.name for c in checks if not c.passed],
        "timings": timings,  # s: planning, segmenting (model load included), catalog refresh, quality checks
    }
