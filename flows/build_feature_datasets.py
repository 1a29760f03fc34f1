"""Flow `build-feature-datasets`: ingest every source, segment the new images into feature
crops, refresh the catalog, gate on its integrity, report, and announce new crops.

Its own tasks: `generate-demo-world` and `integrity-gate`; the rest are the `ingest` and `segment`
flows' tasks, composed in this run (flows/ingest.py, flows/segment.py).
"""

from __future__ import annotations

import hashlib

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.logging import get_run_logger

from flows.ingest import ingest_source
from flows.names import build_run_name
from flows.runner import RunnerSpec, retried, use_runner
from flows.segment import segment_datasets
from storage.catalog import refresh_catalog
from storage.layout import DataRoot
from storage.publish import sweep_leftovers
from tasks.check import gate, integrity_checks, integrity_markdown
from tasks.demo_world.world import generate_demo_world
from tasks.report import catalog_summary, summary_markdown
from tasks.specs import (CropSpec, DemoSpec, IngestOptions, RetrainSpec, RunOptions, SegmenterSpec,
                         SourceSpec)

FEATURES_ADDED = "geofeat.features.added"  # the event train-experts/<name> triggers listen for (prefect.yaml)


@task(name="generate-demo-world", task_run_name="generate demo world", **retried(2))
def generate_demo_world_task(out: str, spec: DemoSpec) -> str:
    """Generate (or reuse) the world; returns its URL for building source paths."""
    generate_demo_world(out, spec)
    return out.rstrip("/")


@task(name="integrity-gate", task_run_name="integrity gate", **retried(0))
def integrity_gate_task(home: str) -> list[dict]:
    """The build's last gate: publishes the checks as an artifact, fails the run if any fails."""
    root = DataRoot(home)
    checks = integrity_checks(root)
    create_markdown_artifact(integrity_markdown(checks), key="catalog-integrity",
                             description="integrity checks after this run")
    gate(root, checks)
    return [{"name": c.name, "passed": c.passed, "detail": c.detail} for c in checks]


def catalog_resource(root: DataRoot, deployment: str) -> dict[str, str]:
    return {"prefect.resource.id": f"geofeat.catalog.{hashlib.sha256(root.url.encode()).hexdigest()[:16]}",
            "prefect.resource.name": root.url, "geofeat.train-deployment": deployment}


def emit_features_added(root: DataRoot, new_features: int, datasets: list[str], segmenter_id: str | None,
                        retrain: RetrainSpec | None) -> dict | None:
    """Emit FEATURES_ADDED when a run added at least `retrain.min_new_features` crops (never on a no-op)."""
    if retrain is None or new_features < retrain.min_new_features:
        return None
    from prefect.events import emit_event

    payload = {"new_features": int(new_features), "datasets": datasets, "segmenter": segmenter_id, "home": root.url}
    event = emit_event(event=FEATURES_ADDED, resource=catalog_resource(root, retrain.deployment), payload=payload)
    get_run_logger().info("emitted %s (%d new crops) for train-experts/%s", FEATURES_ADDED, new_features,
                          retrain.deployment)
    return payload if event is not None else None


@flow(name="build-feature-datasets", flow_run_name=build_run_name)
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
    swept = sweep_leftovers(root.url)  # temp files and folders of runs that died (kill -9, the OOM killer)
    if swept:
        log.info("removed %d leftover(s) of writers that died: %s", len(swept), ", ".join(swept[:5]))
    specs = list(sources or [])
    if demo is not None:
        world = generate_demo_world_task(demo.out or root.path("demo-world"), demo)
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
