"""Flow `evaluate`: the registered experts on the test splits, votes, metrics with CIs, and the
report shaped like the poster's Tables 1 and 2 (Markdown + PNG under the data root, and artifacts)."""

from __future__ import annotations

import json

import polars as pl
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from flows.params import EvalSpec, RunnerSpec
from flows.runner import run_gpu_task, use_runner
from flows.segment import ensure_gpu_limit
from storage.catalog import connect, refresh_catalog
from storage.layout import DataRoot
from tasks.baselines import ensure_baselines
from tasks.eval_report import build_report, publish_artifacts, save_report
from tasks.evaluate import evaluate, select_experts
from tasks.retry import RETRY_DELAYS, retry_transient
from tasks.segment import GPU_LIMIT


@task(name="evaluate-experts", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=RETRY_DELAYS,
      retry_condition_fn=retry_transient)
def evaluate_task(home: str, spec: EvalSpec) -> dict:
    from prefect.concurrency.sync import concurrency

    with concurrency(GPU_LIMIT, occupy=1):
        return evaluate(DataRoot(home), spec)


def report_notes(root: DataRoot, result: dict) -> list[str]:
    con = connect(root)
    try:
        experts = con.sql("SELECT \"group\", base_checkpoint, steps, val_accuracy, train_crops, metrics FROM experts "
                              "WHERE expert_id IN (SELECT unnest(?)) ORDER BY \"group\"", params=[result["experts"]]).pl()
    finally:
        con.close()
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


@flow(name="evaluate")
def evaluate_experts(spec: EvalSpec = EvalSpec(), home: str | None = None, runner: RunnerSpec = RunnerSpec()) -> dict:
    log = get_run_logger()
    root = DataRoot.from_env(home)
    refresh_catalog(root)
    experts = select_experts(root, spec)
    segmenter = experts["segmenter"][0]
    con = connect(root)
    try:
        datasets = spec.datasets or [r[0] for r in con.sql(
            "SELECT DISTINCT dataset FROM images WHERE split = 'test' ORDER BY 1").fetchall()]
    finally:
        con.close()
    kinds = [k for k in ("image", "random") if k in experts["group"].to_list()]
    ensure_gpu_limit()
    with use_runner(runner):
        ensure_baselines(root, kinds, datasets, segmenter)  # e.g. a benchmark ingested after training
        result = run_gpu_task(evaluate_task, root.url, spec.model_copy(update={"datasets": datasets}))
    refresh_catalog(root)
    con = connect(root)
    try:
        metrics = con.sql("SELECT * FROM metrics WHERE eval_id = ?", params=[result["eval_id"]]).pl()
        predictions = con.sql("SELECT * FROM predictions WHERE eval_id = ?", params=[result["eval_id"]]).pl()
    finally:
        con.close()
    table1_sets = [d for d in datasets if d not in spec.benchmarks]
    table2_sets = [d for d in datasets if d in spec.benchmarks]
    report = build_report(metrics, predictions, eval_id=result["eval_id"], table1_datasets=table1_sets,
                          table2_datasets=table2_sets, untrained=result["untrained"], notes=report_notes(root, result))
    paths = save_report(root, result["eval_id"], report)
    publish_artifacts(report.markdown, report.tables, report.pngs)
    if result["untrained"]:
        log.warning("experts started from UNTRAINED random-init weights: the numbers describe a demo")
    log.info("report: %s", paths["report"])
    top1 = metrics.filter(pl.col("metric") == "top1").select("dataset", "method", "value", "n").sort("dataset", "method")
    return {**result, "report": paths["report"], "top1": top1.to_dicts()}
