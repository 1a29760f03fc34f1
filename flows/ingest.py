"""Flow `ingest`: one dataset from a source layout into the `images`/`quarantine` catalog.

Its tasks: `plan-ingest` lists the source and plans shards of new files; `ingest-shard` (hundreds
of images each, in parallel) hashes, validates and commits them (tasks/ingest.py).
"""

from __future__ import annotations

from datetime import datetime, timezone

from prefect import flow, task, unmapped
from prefect.artifacts import create_table_artifact
from prefect.logging import get_run_logger

from flows.names import artifact_key, ingest_run_name, ingest_shard_name, plan_ingest_name
from flows.progress import advance_as_completed
from flows.runner import RunnerSpec, retried, stage_lock, use_runner
from storage import sources
from storage.catalog import refresh_catalog
from storage.layout import DataRoot
from tasks import ingest as stage
from tasks import progress
from tasks.specs import IngestOptions, SourceSpec


@task(name="plan-ingest", task_run_name=plan_ingest_name, **retried(2))
def plan_ingest_task(home: str, layout: str, source: str, images: str | None, params: dict,
                     shard_size: int) -> tuple[list[stage.ShardPlan], list[str]]:
    return stage.plan_ingest(DataRoot(home), layout, source, images, params, shard_size)


@task(name="ingest-shard", task_run_name=ingest_shard_name, **retried(3))
def ingest_shard_task(home: str, plan: stage.ShardPlan, ingested_at: datetime) -> dict:
    return stage.ingest_shard(DataRoot(home), plan, ingested_at)


def check_source(spec: SourceSpec, field: str) -> None:
    """Configuration errors raise before any work, naming the field and the fix: a missing source, or
    a folder where the layout reads a CSV and the other way round."""
    if not sources.exists(spec.source):
        raise ValueError(f"{field}.source: {spec.source!r} does not exist; point it at the {spec.layout} data")
    folder = sources.is_dir(spec.source)
    if spec.layout == "g50" and not folder:
        raise ValueError(f"{field}.source: {spec.source!r} is a file; layout g50 reads a folder of <Country Name>/ "
                         "folders (or the one holding compressed_dataset/); for a CSV manifest use layout g3")
    if spec.layout == "im2gps" and folder:
        raise ValueError(f"{field}.source: {spec.source!r} is a folder; layout im2gps reads the CSV "
                         "(IMG_ID,AUTHOR,LAT,LON,...), with `images` (--images) for its photo folder")
    if spec.images and not sources.exists(spec.images):
        raise ValueError(f"{field}.images: {spec.images!r} does not exist; omit it to use the CSV's folder")
    if spec.images and not sources.is_dir(spec.images):
        raise ValueError(f"{field}.images: {spec.images!r} is a file; give the folder holding the photos")


@flow(name="ingest", flow_run_name=ingest_run_name)
def ingest(source: SourceSpec, options: IngestOptions = IngestOptions(), home: str | None = None,
           runner: RunnerSpec = RunnerSpec()) -> dict:
    """List a source, plan shards of new files, ingest them in parallel, refresh the catalog."""
    with use_runner(runner):
        return ingest_source(DataRoot.from_env(home), source, options)


def ingest_source(root: DataRoot, source: SourceSpec, options: IngestOptions, field: str = "source") -> dict:
    """The ingest stage's tasks, composed inside the calling flow run (a subflow would add ~1 s
    of Prefect flow-run overhead per source)."""
    log = get_run_logger()
    check_source(source, field)
    # One ingest of a dataset at a time: a second build waits, then finds it all committed.
    with stage_lock(root, f"ingest-{source.dataset}", f"the ingest of dataset {source.dataset!r}"):
        if options.mode == "overwrite":
            log.info("overwrite: dropped %d shard(s) of %s", stage.drop_dataset(root, source.dataset), source.dataset)
        params = {
            "dataset": source.dataset,
            "layout": source.layout,
            "split": source.resolved_split().model_dump(),
            "max_pixels": options.max_pixels,
            "max_bytes": options.max_bytes,
        }
        plans, warnings = plan_ingest_task(root.url, source.layout, source.source, source.images, params,
                                           options.shard_size)
        started = datetime.now(timezone.utc)
        with progress.scope("ingest", source.dataset, total=sum(len(p.candidates) + len(p.rejected) for p in plans),
                            unit="files") as bar:
            futures = ingest_shard_task.map(unmapped(root.url), plans, unmapped(started))
            advance_as_completed(bar, futures, [len(p.candidates) + len(p.rejected) for p in plans])
        results = [f.result() for f in futures]  # raises if a shard failed after its retries
        refresh_catalog(root)
    summary = {
        "dataset": source.dataset,
        "shards": len(plans),
        "shards_cached": sum(r["cached"] for r in results),
        **stage.run_counts(root, source.dataset, started),  # as the views show them: copies are duplicates
        "warnings": warnings,
    }
    create_table_artifact([{k: v for k, v in summary.items() if k != "warnings"}],
                          key=artifact_key("ingest", source.dataset),
                          description=f"ingest of `{source.dataset}` from {source.source}: images added and files "
                          "quarantined this run" + "".join(f"; {w}" for w in warnings))
    log.info("ingest %s: %s", source.dataset, summary)
    return summary
