"""Flow `segment`: crop features out of catalogued images with one segmenter version.

Only images this segmenter version has not segmented are planned, so a rerun is a no-op
and a new checkpoint or new parameters (a new segmenter id) segment everything again while
the previous version's features stay queryable by their `segmenter` value. The `resegment`
deployment in prefect.yaml runs this flow on a cron schedule.
"""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.concurrency.sync import concurrency
from prefect.futures import as_completed
from prefect.logging import get_run_logger

from flows.params import CropSpec, RunnerSpec, RunOptions, SegmenterSpec
from flows.runner import gpu_tasks, use_runner
from storage.catalog import connect, refresh_catalog
from storage.layout import DataRoot
from tasks.quality import checks_markdown, quality_checks
from tasks.segment import GPU_LIMIT, plan_segmentation_task, segment_shard_task, segmenter_key


def ensure_gpu_limit(slots: int = 1) -> None:
    """The global concurrency limit that lets one segmentation/training task use a GPU at a time."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(GPU_LIMIT)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=slots))
            except ObjectAlreadyExists:
                pass


def catalog_datasets(root: DataRoot) -> list[str]:
    refresh_catalog(root)
    con = connect(root)
    try:
        return [r[0] for r in con.sql("SELECT DISTINCT dataset FROM images ORDER BY 1").fetchall()]
    finally:
        con.close()


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


def segment_datasets(root: DataRoot, names: list[str], segmenter: SegmenterSpec, crops: CropSpec,
                     run: RunOptions) -> dict:
    """The segmentation stage's tasks, composed inside the calling flow run."""
    log = get_run_logger()
    key = segmenter_key(segmenter, crops)
    if segmenter.kind == "tiny-random":
        log.warning("segmenter %s is an UNTRAINED random-init Mask2Former: its crops are NOT meaningful", key)
    ensure_gpu_limit()
    plans = [p for name in names for p in plan_segmentation_task(root.url, name, key, run.shard_size)]
    log.info("segmenter %s: %d shard(s) of new images in %s", key, len(plans), names)
    progress = create_progress_artifact(0.0, key="segmentation-progress", description=f"shards segmented by {key}")
    results = []

    def finished(future) -> None:
        results.append(future.result())
        update_progress_artifact(progress, 100.0 * len(results) / max(1, len(plans)))

    # The stage holds the global `gpu` slot while it runs (other GPU flows wait) and keeps
    # `run.concurrent_shards` shard tasks in flight; they share this process's model (on Dask:
    # each worker's model, and only workers offering the runner's GPU resource take them).
    active = []
    with concurrency(GPU_LIMIT, occupy=1), gpu_tasks(submits=bool(plans)):
        for plan in plans:
            if len(active) >= run.concurrent_shards:
                done = next(as_completed(active))
                active.remove(done)
                finished(done)
            active.append(segment_shard_task.submit(root.url, plan, segmenter, crops, run))
        for done in as_completed(active):
            finished(done)
    update_progress_artifact(progress, 100.0)
    refresh_catalog(root)
    checks = quality_checks(root, key, names)
    report = checks_markdown(key, checks)
    if segmenter.kind == "tiny-random":
        report = "> **UNTRAINED segmenter: these crops come from random weights.**\n\n" + report
    create_markdown_artifact(report, key="data-quality", description=f"quality of {key}")
    for c in checks:
        (log.info if c.passed else log.warning)("quality %s: %s: %s", "PASS" if c.passed else "FAIL", c.name, c.detail)
    return {
        "segmenter": key,
        "datasets": names,
        "shards": len(plans),
        "images": sum(r["images"] for r in results),
        "crops": sum(r["crops"] for r in results),
        "model_calls": sum(r["model_calls"] for r in results),
        "checks_failed": [c.name for c in checks if not c.passed],
    }
