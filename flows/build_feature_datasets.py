"""Flow `build-feature-datasets`: ingest every source, refresh the catalog, report.

Segmentation into feature crops plugs in after ingest (see the segmentation issue).
"""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.logging import get_run_logger

from flows.ingest import ingest
from flows.params import DemoSpec, IngestOptions, SourceSpec
from storage.catalog import refresh_catalog
from storage.layout import DataRoot
from tasks.demo_world import generate_demo_task
from tasks.report import catalog_summary, summary_markdown


@flow(name="build-feature-datasets")
def build_feature_datasets(
    sources: list[SourceSpec] | None = None,
    demo: DemoSpec | None = None,
    options: IngestOptions = IngestOptions(),
    home: str | None = None,
) -> dict:
    """Build the catalog from `sources`, plus the embedded demo world when `demo` is set."""
    log = get_run_logger()
    root = DataRoot.from_env(home)
    specs = list(sources or [])
    if demo is not None:
        world = generate_demo_task(demo.out or root.path("demo-world"), demo.world_spec())
        specs += demo.sources(world)
    if not specs:
        raise ValueError("sources: nothing to build; give `sources` (a list of datasets) or `demo: {}`")
    ingested = [ingest(spec, options, home=root.url) for spec in specs]
    refresh_catalog(root)
    tables = catalog_summary(root)
    create_table_artifact(ingested, key="build-ingest", description="what this run ingested")
    create_markdown_artifact(summary_markdown(tables), key="catalog-summary", description="catalog after this run")
    log.info("catalog at %s: %s", root.url, {t: v.num_rows for t, v in tables.items()})
    return {"ingested": ingested, "catalog": root.catalog_sql}
