"""Flow `evaluate`: the registered experts on the test splits, votes, metrics with CIs, and the
report shaped like the poster's Tables 1 and 2 (Markdown + PNG under the data root, and artifacts).

Its task: `evaluate` (tasks/evaluate.py), holding the `gpu` slot; the missing baseline crops of a
benchmark ingested after training are made first (the `baselines` task of flows/train_experts.py).
"""

from __future__ import annotations

import json

import polars as pl
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.logging import get_run_logger

from flows.names import evaluate_run_name
from flows.runner import RunnerSpec, gpu_slot, retried, run_gpu_task, use_runner
from flows.train_experts import ensure_baselines
from storage.catalog import refresh_catalog
from storage.layout import DataRoot
from storage.queries import catalog
from tasks import evaluate as stage
from tasks.eval_report import UNTRAINED_BANNER, Report, build_report, png_data_url, save_report
from tasks.specs import EvalSpec


@task(name="evaluate", **retried(2))
def evaluate_task(home: str, spec: EvalSpec) -> dict:
    with gpu_slot(home):
        return stage.evaluate(DataRoot(home), spec)


def report_notes(root: DataRoot, result: dict) -> list[str]:
    with catalog(root) as cat:
        experts = cat.expert_summaries(result["experts"])
    notes = [f"segmenter `{result['segmenter']}`; experts: " + ", ".join(
        f"{r['group']} ({r['train_crops']} train crops, {r['steps']} steps, val {r['val_accuracy'] or 0:.3f})"
        for r in experts.iter_rows(named=True))]
    if result.get("weights"):
        notes.append("learned group weights (val): " + ", ".join(f"{g} {w:.2f}" for g, w in result["weights"].items()))
    dropped = {r["group"]: json.loads(r["metrics"]).get("dropped_countries") for r in experts.iter_rows(named=True)}
    if any(dropped.values()):
        notes.append("countries left out of a head (too few train crops): "
                     + "; ".join(f"{g}: {d}" for g, d in dropped.items() if d))
    if result["untrained"]:
        notes.insert(0, "experts started from a tiny random-init ViT (checkpoint `"
                     + ", ".join(sorted(set(experts["base_checkpoint"]))) + "`), not the poster's ViT-B/16")
    return notes


def publish_artifacts(report: Report) -> None:
    """The report with its figures inline (`evaluation-report`), the tables with numbers as numbers
    and n and CIs in their own columns (`table-1`, `table-2`; the demo banner in their description),
    and each figure kind on its own (`confusion-matrix`, `per-country-accuracy`). Figures are data
    URLs: the UI renders them in markdown, while an image artifact wants a public URL."""
    banner = f"{UNTRAINED_BANNER}\n\n" if report.untrained else ""
    create_markdown_artifact(report.embedded, key="evaluation-report", description="evaluation report")
    for key, t in report.tables.items():
        title = {"table-1": "Table 1: test splits of the training datasets",
                 "table-2": "Table 2: held-out benchmarks"}.get(key, key)
        create_table_artifact(t.to_dicts(), key=key, description=f"{banner}**{title}** (top-1 etc. as fractions; "
                              "`*_ci_low`/`*_ci_high`: 95% bootstrap CI; n: images)")
    for prefix, key, what in (("confusion_", "confusion-matrix", "confusion matrix"),
                              ("per_country_", "per-country-accuracy", "per-country top-1 accuracy")):
        parts = [f"### {name[len(prefix):-len('.png')]}\n\n![{what}]({png_data_url(data)})"
                 for name, data in sorted(report.pngs.items()) if name.startswith(prefix)]
        if parts:
            create_markdown_artifact(banner + "\n\n".join(parts), key=key, description=what)


@flow(name="evaluate", flow_run_name=evaluate_run_name)
def evaluate(spec: EvalSpec = EvalSpec(), home: str | None = None, runner: RunnerSpec = RunnerSpec()) -> dict:
    log = get_run_logger()
    root = DataRoot.from_env(home)
    refresh_catalog(root)
    experts = stage.select_experts(root, spec)
    segmenter_id = experts["segmenter"][0]
    if spec.datasets:
        datasets = spec.datasets
    else:
        with catalog(root) as cat:
            datasets = cat.datasets(split="test")
    kinds = [k for k in ("image", "random") if k in experts["group"].to_list()]
    with use_runner(runner):
        ensure_baselines(root, kinds, datasets, segmenter_id)  # e.g. a benchmark ingested after training
        result = run_gpu_task(evaluate_task, root.url, spec.model_copy(update={"datasets": datasets}))
    refresh_catalog(root)
    with catalog(root) as cat:
        metrics, predictions = cat.evaluation(result["eval_id"])
    table1_sets = [d for d in datasets if d not in spec.benchmarks]
    table2_sets = [d for d in datasets if d in spec.benchmarks]
    report = build_report(metrics, predictions, eval_id=result["eval_id"], table1_datasets=table1_sets,
                          table2_datasets=table2_sets, untrained=result["untrained"], notes=report_notes(root, result))
    paths = save_report(root, result["eval_id"], report)
    publish_artifacts(report)
    if result["untrained"]:
        log.warning("experts started from UNTRAINED random-init weights: the numbers describe a demo")
    log.info("report: %s", paths["report"])
    top1 = metrics.filter(pl.col("metric") == "top1").select("dataset", "method", "value", "n").sort("dataset", "method")
    return {**result, "report": paths["report"], "top1": top1.to_dicts()}
