"""Flow `build-feature-datasets`: ingest every source, segment the new images into feature
crops, refresh the catalog, run the data-quality checks, report."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.logging import get_run_logger

from flows.ingest import ingest_source
from flows.params import CropSpec, DemoSpec, IngestOptions, RetrainSpec, RunnerSpec, RunOptions, SegmenterSpec, SourceSpec
from flows.runner import use_runner
from flows.segment import segment_datasets
from storage.catalog import refresh_catalog
from storage.layout import DataRoot
from tasks.demo_world import generate_demo_task
from tasks.check import integrity_gate_task
from tasks.events import emit_features_added
from tasks.report import catalog_summary, summary_markdown


@flow(name="build-feature-datasets")
def build_feature_datasets(
    sources: list[SourceSpec] | None = None,
    demo: DemoSpec | None = None,
    options: IngestOptions = IngestOptions(),
    segmenter: SegmenterSpec | None = SegmenterSpec(),
    crops: CropSpec = CropSpec(),
    run: RunOptions = RunOptions(),
    retrain: RetrainSpec | None = None,
    home: str | None = None,
    runner: RunnerSpec = RunnerSpec(),
) -> dict:
    """Build the catalog from `sources`, plus the embedded demo world when `demo` is set.

    `segmenter: null` stops after ingest. With `demo` and the annotations segmenter, the demo
    world's panoptic ground truth is used unless other annotations are given. With `retrain`, a
    run that adds at least `retrain.min_new_features` crops emits the event that the trigger of
    `train-experts/<retrain.deployment>` listens for. `runner` picks where the shard tasks run
    (thread pool, or Dask: docs/dask.md).
    """
    log = get_run_logger()
    root = DataRoot.from_env(home)
    specs = list(sources or [])
    if demo is not None:
        world = generate_demo_task(demo.out or root.path("demo-world"), demo.world_spec())
        specs += demo.sources(world)
        if segmenter is not None and segmenter.kind == "annotations" and not segmenter.annotations:
            segmenter = segmenter.model_copy(update={"annotations": demo.annotations(world)})
    if not specs:
        raise ValueError("sources: nothing to build; give `sources` (a list of datasets) or `demo: {}`")
    segmented = None
    with use_runner(runner):
        ingested = [ingest_source(root, spec, options, field=f"sources[{i}]") for i, spec in enumerate(specs)]
        if segmenter is not None:
            segmented = segment_datasets(root, sorted({s.dataset for s in specs}), segmenter, crops, run)
    refresh_catalog(root)
    integrity_gate_task(root.url)  # fails the run on a broken catalog, before any retraining event
    tables = catalog_summary(root)
    stages = [{"stage": "ingest", "dataset": i["dataset"], "shards": i["shards"], "images": i["images"],
               "quarantined": i["quarantined"], "crops": None} for i in ingested]
    if segmented:
        stages.append({"stage": "segment", "dataset": ", ".join(segmented["datasets"]), "shards": segmented["shards"],
                       "images": segmented["images"], "quarantined": None, "crops": segmented["crops"]})
    create_table_artifact(stages, key="build-summary", description="what this run did")
    create_markdown_artifact(summary_markdown(tables), key="catalog-summary", description="catalog after this run")
    log.info("catalog at %s: %s", root.url, {t: v.num_rows for t, v in tables.items()})
    new = segmented["crops"] if segmented else 0
    event = emit_features_added(root, new, sorted({s.dataset for s in specs}),
                                segmented["segmenter"] if segmented else None, retrain)
    return {"ingested": ingested, "segmented": segmented, "catalog": root.catalog_sql, "retrain_event": event}
