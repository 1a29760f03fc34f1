"""The report of flow `evaluate`: the poster's tables side by side with ours, figures, artifacts.

Inputs are polars frames shaped like `storage.schema.METRICS` / `PREDICTIONS`. Figures are drawn
with matplotlib's Agg canvas directly (no pyplot, no display, no global backend switch).
"""

from __future__ import annotations

import base64
import io
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from models.labels import GROUPS
from storage.layout import DataRoot
from storage.shards import atomic_write
from tasks.report import md_table

# The poster's published top-1 country accuracy: (test, classifier, accuracy, dataset, method).
# dataset/method name our matching row; None where we have no such row (never matched).
POSTER: tuple[tuple[str, str, float, str | None, str | None], ...] = (
    ("Test splits", "G3 whole-image baseline", 0.3155, "g3", "expert:image"),
    ("Test splits", "G50 feature classifier", 0.5393, "g50", "majority"),
    ("Test splits", "G50 6-country", 0.8181, None, None),
    ("Test splits", "G3 feature classifier", 0.5626, "g3", "majority"),
    ("Test splits", "G50 ground", 0.4946, "g50", "expert:ground"),
    ("Test splits", "G50 structure", 0.3919, "g50", "expert:structure"),
    ("Test splits", "G50 vegetation", 0.3721, "g50", "expert:vegetation"),
    ("Test splits", "G50 vehicle", 0.1716, "g50", "expert:vehicle"),
    ("IM2GPS", "6-country", 0.2911, None, None),
    ("IM2GPS", "ensemble", 0.0302, "im2gps", "majority"),
)
POSTER_BY_ROW = {(ds, m): acc for _, _, acc, ds, m in POSTER if ds is not None}

# Rows of the tables in this order; methods not listed follow, sorted.
METHODS: tuple[tuple[str, str], ...] = (
    ("expert:image", "whole-image baseline"),
    ("majority", "feature classifier (majority vote)"),
    ("logprob", "feature classifier (log-prob vote)"),
    ("learned", "feature classifier (learned group weights)"),
    *((f"expert:{g}", f"{g} expert alone") for g in GROUPS),
    ("expert:random", "random crops (ablation)"),
)
CLASSIFIER = dict(METHODS)
TABLE1_METRICS = ("top5", "continent", "coverage")
TABLE2_METRICS = ("top5", "continent", "within_2500km", "within_750km", "coverage")
CI_METRICS = ("top1", "within_2500km", "within_750km")  # shown with their 95% CI
FIGURE_METHOD = "majority"  # the poster's method
MAX_COUNTRIES = 30  # confusion matrix / bar chart; the rest is `other`
OTHER, NONE = "other", "(none)"

HOW_TO_READ = (
    "How to read it: top1/top5 = country accuracy, continent = right continent, within_Xkm = "
    "great-circle error under X km, coverage = images the method could answer (not a fallback); "
    "`[lo, hi]` = 95% bootstrap CI over images; n = images; poster = the poster's published top-1 "
    "where the row matches one."
)
UNTRAINED_BANNER = (
    "> **DEMO MODELS: NOT THE METHOD'S NUMBERS.** At least one expert started from random init (a tiny ViT, "
    "not the pretrained ViT-B/16), e.g. trained on the synthetic demo world. The numbers show the pipeline "
    "works end to end; they say nothing about how well the method geolocates real photos."
)


def fmt(value: float | None, low: float | None = None, high: float | None = None) -> str | None:
    """`0.542 [0.51, 0.57]`; the value alone without a CI; None without a value; `—` for NaN (a row
    with no image to score, n = 0)."""
    if value is None:
        return None
    if math.isnan(value):
        return "—"
    if low is None or high is None or math.isnan(low) or math.isnan(high):
        return f"{value:.3f}"
    return f"{value:.3f} [{low:.2f}, {high:.2f}]"


def _latest(metrics: pl.DataFrame) -> dict[tuple[str, str, str], dict[str, Any]]:
    """(dataset, method, metric) -> the row; the newest wins when a frame holds several."""
    if "created_at" in metrics.columns:
        metrics = metrics.sort("created_at", nulls_last=False, maintain_order=True)
    return {(r["dataset"], r["method"], r["metric"]): r for r in metrics.to_dicts()}


def _methods(present: set[str]) -> list[str]:
    return [m for m, _ in METHODS if m in present] + sorted(present - set(CLASSIFIER))


def _table(metrics: pl.DataFrame, datasets: list[str], columns: tuple[str, ...],
           labels: dict[str, str]) -> pl.DataFrame:
    by = _latest(metrics.filter(pl.col("dataset").is_in(datasets)))
    present = {k[2] for k in by}
    columns = tuple(c for c in columns if c in present or c in TABLE1_METRICS)  # distances only when measured
    rows = []
    for ds in datasets:
        for method in _methods({m for d, m, _ in by if d == ds}):
            top1 = by.get((ds, method, "top1"), {})
            row = {"dataset": ds, "method": method,
                   "top1": fmt(top1.get("value"), top1.get("ci_low"), top1.get("ci_high")),
                   "poster": POSTER_BY_ROW.get((ds.lower(), method)), "n": top1.get("n")}
            for c in columns:
                r = by.get((ds, method, c), {})
                row[c] = fmt(r.get("value"), *((r.get("ci_low"), r.get("ci_high")) if c in CI_METRICS else ()))
            row["classifier"] = labels.get(method, CLASSIFIER.get(method, method))
            rows.append(row)
    # The numbers first and the poster's beside ours: a narrow view (the Prefect UI) cuts the right side.
    schema = {"dataset": pl.String, "method": pl.String, "top1": pl.String, "poster": pl.Float64, "n": pl.Int64,
              **{c: pl.String for c in columns}, "classifier": pl.String}
    return pl.DataFrame(rows, schema=schema)


def _numbers(metrics: pl.DataFrame, datasets: list[str], columns: tuple[str, ...],
             labels: dict[str, str]) -> pl.DataFrame:
    """The same rows as `_table`, with numbers as numbers: each metric a float column, and for the
    CI metrics its `<metric>_ci_low` / `<metric>_ci_high` beside it; `n` an integer (for artifacts)."""
    by = _latest(metrics.filter(pl.col("dataset").is_in(datasets)))
    present = {k[2] for k in by}
    columns = ("top1",) + tuple(c for c in columns if c in present or c in TABLE1_METRICS)
    schema: dict[str, Any] = {"dataset": pl.String, "method": pl.String, "n": pl.Int64, "top1": pl.Float64,
                              "poster": pl.Float64}
    for c in columns:
        schema[c] = pl.Float64
        if c in CI_METRICS:
            schema[f"{c}_ci_low"] = schema[f"{c}_ci_high"] = pl.Float64
    schema["classifier"] = pl.String
    rows = []
    for ds in datasets:
        for method in _methods({m for d, m, _ in by if d == ds}):
            row = {"dataset": ds, "method": method, "n": by.get((ds, method, "top1"), {}).get("n"),
                   "poster": POSTER_BY_ROW.get((ds.lower(), method))}
            for c in columns:
                r = by.get((ds, method, c), {})
                row[c] = _round(r.get("value"))
                if c in CI_METRICS:
                    row[f"{c}_ci_low"], row[f"{c}_ci_high"] = _round(r.get("ci_low")), _round(r.get("ci_high"))
            row["classifier"] = labels.get(method, CLASSIFIER.get(method, method))
            rows.append(row)
    return pl.DataFrame(rows, schema=schema)


def _round(value: float | None) -> float | None:
    """4 decimals; None for a missing or NaN value (JSON has no NaN)."""
    return None if value is None or math.isnan(value) else round(float(value), 4)


def table1_numbers(metrics: pl.DataFrame, datasets: list[str]) -> pl.DataFrame:
    """Table 1 with numbers as numbers and n, CIs in their own columns (the `table-1` artifact)."""
    return _numbers(metrics, datasets, TABLE1_METRICS, {})


def table2_numbers(metrics: pl.DataFrame, datasets: list[str]) -> pl.DataFrame:
    """Table 2 with numbers as numbers (the `table-2` artifact)."""
    return _numbers(metrics, datasets, TABLE2_METRICS, {"majority": "ensemble (majority vote)"})


def table1(metrics: pl.DataFrame, datasets: list[str]) -> pl.DataFrame:
    """Table 1: the test splits of the training datasets, one row per (dataset, classifier)."""
    return _table(metrics, datasets, TABLE1_METRICS, {})


def table2(metrics: pl.DataFrame, datasets: list[str]) -> pl.DataFrame:
    """Table 2: held-out benchmarks (IM2GPS-like); distance columns only where some dataset has them."""
    return _table(metrics, datasets, TABLE2_METRICS, {"majority": "ensemble (majority vote)"})


def poster_table() -> pl.DataFrame:
    return pl.DataFrame(
        [{"test": t, "classifier": c, "accuracy": a, "our row": f"{d} / {m}" if d else None}
         for t, c, a, d, m in POSTER]
    )


# ---- figures


def _preds(predictions: pl.DataFrame, method: str) -> pl.DataFrame:
    p = predictions.filter(pl.col("method") == method)
    return p.unique(subset=["dataset", "image_id"], keep="last", maintain_order=True) if "image_id" in p.columns else p


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return buf.getvalue()


def _empty(fig: Figure, text: str) -> None:
    ax = fig.add_subplot()
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center")


def _countries(truth: pl.Series, max_countries: int) -> list[str]:
    """Countries by frequency (ties by code); with more than `max_countries`, the rest become `other`."""
    counts = truth.value_counts().sort(["count", truth.name], descending=[True, False])
    codes = counts[truth.name].to_list()
    return codes if len(codes) <= max_countries else codes[: max_countries - 1]


def confusion_png(predictions: pl.DataFrame, method: str, *, title: str | None = None,
                  max_countries: int = MAX_COUNTRIES) -> bytes:
    """Row-normalised confusion matrix (rows truth, columns predicted) as PNG bytes."""
    p = _preds(predictions, method)
    fig = Figure(figsize=(4, 3), dpi=100)
    if p.is_empty():
        _empty(fig, f"no predictions for {method}")
        return _png(fig)
    shown = _countries(p["country"], max_countries)
    truth_labels = shown + ([OTHER] if p["country"].n_unique() > len(shown) else [])
    known = set(shown)
    p = p.with_columns(
        t=pl.when(pl.col("country").is_in(shown)).then(pl.col("country")).otherwise(pl.lit(OTHER)),
        q=pl.when(pl.col("predicted").is_null()).then(pl.lit(NONE))
        .when(pl.col("predicted").is_in(shown)).then(pl.col("predicted")).otherwise(pl.lit(OTHER)),
    )
    pred_set = set(p["q"].to_list())
    pred_labels = shown + [x for x in (OTHER, NONE) if x in pred_set and x not in known]
    ti, pi = {c: i for i, c in enumerate(truth_labels)}, {c: i for i, c in enumerate(pred_labels)}
    m = np.zeros((len(truth_labels), len(pred_labels)))
    for r in p.group_by("t", "q").len().iter_rows(named=True):
        m[ti[r["t"]], pi[r["q"]]] = r["len"]
    rows = m.sum(axis=1, keepdims=True)
    m = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)

    side = max(4.0, 0.3 * len(pred_labels) + 2)
    fig.set_size_inches(side + 1, max(3.5, 0.3 * len(truth_labels) + 2))
    ax = fig.add_subplot()
    im = ax.imshow(m, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(pred_labels)), pred_labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(truth_labels)), truth_labels, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("truth")
    if len(truth_labels) <= 15 and len(pred_labels) <= 15:
        for i, j in zip(*np.nonzero(m)):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if m[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.04, label="fraction of the row")
    ax.set_title(title or f"confusion, {method} ({p.height} images)", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def per_country_png(predictions: pl.DataFrame, method: str, *, title: str | None = None,
                    max_countries: int = MAX_COUNTRIES) -> bytes:
    """Per-country top-1 accuracy as horizontal bars, most frequent country on top, n in the labels."""
    p = _preds(predictions, method)
    fig = Figure(figsize=(4, 3), dpi=100)
    if p.is_empty():
        _empty(fig, f"no predictions for {method}")
        return _png(fig)
    per = (
        p.group_by("country")
        .agg(n=pl.len(), acc=(pl.col("predicted") == pl.col("country")).fill_null(False).mean())
        .sort(["n", "country"], descending=[True, False])
    )
    hidden, per = per.height - min(per.height, max_countries), per.head(max_countries)
    overall = (p["predicted"] == p["country"]).fill_null(False).mean()
    labels = [f"{c} (n={n})" for c, n in zip(per["country"], per["n"])][::-1]
    acc = per["acc"].to_list()[::-1]
    fig.set_size_inches(6, max(2.5, 0.25 * len(labels) + 1.2))
    ax = fig.add_subplot()
    ax.barh(range(len(labels)), acc, color="tab:blue")
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.axvline(overall, color="tab:red", linestyle="--", linewidth=1, label=f"overall {overall:.3f}")
    ax.set_xlim(0, 1)
    ax.set_xlabel("top-1 accuracy")
    ax.legend(fontsize=7, loc="lower right")
    more = f"; {hidden} smaller countries not shown" if hidden else ""
    ax.set_title((title or f"per-country top-1, {method} ({p.height} images)") + more, fontsize=9)
    fig.tight_layout()
    return _png(fig)


# ---- the report


def _slug(dataset: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", dataset)


def figure_names(dataset: str) -> tuple[str, str]:
    return f"confusion_{_slug(dataset)}.png", f"per_country_{_slug(dataset)}.png"


def _figure_datasets(predictions: pl.DataFrame, datasets: list[str], method: str) -> list[str]:
    have = set(predictions.filter(pl.col("method") == method)["dataset"].unique().to_list())
    return [d for d in dict.fromkeys(datasets) if d in have]


def png_data_url(data: bytes) -> str:
    """A PNG as a data URL: markdown viewers without the files (the Prefect UI) still show it."""
    return "data:image/png;base64," + base64.b64encode(data).decode()


def is_untrained(metrics: pl.DataFrame, untrained: bool) -> bool:
    """The caller's flag, or any metric row's own `untrained` flag (never hidden)."""
    return untrained or ("untrained" in metrics.columns and bool(metrics["untrained"].any()))


def report_markdown(metrics: pl.DataFrame, predictions: pl.DataFrame, *, eval_id: str,
                    table1_datasets: list[str], table2_datasets: list[str], untrained: bool,
                    notes: list[str] = (), figure_method: str = FIGURE_METHOD, img_prefix: str = "",
                    images: dict[str, bytes] | None = None) -> str:
    """The whole report. Figures are linked by relative file name (`img_prefix` + name), or, with
    `images` (file name -> PNG), embedded as data URLs."""
    untrained = is_untrained(metrics, untrained)
    lines = [f"# Evaluation `{eval_id}`", ""]
    if untrained:
        lines += [UNTRAINED_BANNER, ""]
    lines += [f"- {n}" for n in notes] + ([""] if notes else [])
    lines += [HOW_TO_READ, ""]
    lines += ["## Table 1: test splits of the training datasets", "",
              md_table(table1(metrics, table1_datasets).to_arrow()), ""]
    lines += ["## Table 2: held-out benchmarks", "", md_table(table2(metrics, table2_datasets).to_arrow()), ""]
    lines += ["## The poster's numbers (top-1 country accuracy)", "", md_table(poster_table().to_arrow()), ""]

    def src(name: str) -> str:
        return png_data_url(images[name]) if images is not None and name in images else img_prefix + name

    figs = _figure_datasets(predictions, [*table1_datasets, *table2_datasets], figure_method)
    if figs:
        lines += [f"## Figures (`{figure_method}`)", ""]
        for ds in figs:
            conf, per = figure_names(ds)
            lines += [f"### {ds}", "", f"![confusion matrix, {ds}]({src(conf)})", "",
                      f"![per-country accuracy, {ds}]({src(per)})", ""]
    return "\n".join(lines).rstrip() + "\n"


@dataclass
class Report:
    markdown: str  # links images by file name, for reports/<eval_id>/report.md
    latest: str  # the same, linking `<eval_id>/<name>`, for reports/latest.md
    tables: dict[str, pl.DataFrame] = field(default_factory=dict)  # artifact key -> table, numbers as numbers
    pngs: dict[str, bytes] = field(default_factory=dict)  # file name -> PNG
    embedded: str = ""  # the report with its figures inline (data URLs), for the Prefect artifact
    untrained: bool = False  # demo models: every artifact carries UNTRAINED_BANNER


def build_report(metrics: pl.DataFrame, predictions: pl.DataFrame, *, eval_id: str, table1_datasets: list[str],
                 table2_datasets: list[str], untrained: bool = False, notes: list[str] = (),
                 figure_method: str = FIGURE_METHOD) -> Report:
    kw = dict(eval_id=eval_id, table1_datasets=table1_datasets, table2_datasets=table2_datasets,
              untrained=untrained, notes=notes, figure_method=figure_method)
    pngs = {}
    for ds in _figure_datasets(predictions, [*table1_datasets, *table2_datasets], figure_method):
        conf, per = figure_names(ds)
        p = predictions.filter(pl.col("dataset") == ds)
        pngs[conf] = confusion_png(p, figure_method, title=f"{ds}: confusion, {figure_method}")
        pngs[per] = per_country_png(p, figure_method, title=f"{ds}: per-country top-1, {figure_method}")
    return Report(
        markdown=report_markdown(metrics, predictions, **kw),
        latest=report_markdown(metrics, predictions, img_prefix=f"{eval_id}/", **kw),
        tables={"table-1": table1_numbers(metrics, table1_datasets), "table-2": table2_numbers(metrics, table2_datasets)},
        pngs=pngs,
        embedded=report_markdown(metrics, predictions, images=pngs, **kw),
        untrained=is_untrained(metrics, untrained),
    )


def save_report(root: DataRoot, eval_id: str, report: Report) -> dict[str, str]:
    """Write `reports/<eval_id>/{report.md, *.png}` and `reports/latest.md`, each atomically.
    Returns {"report": path, "latest": path, <png name>: path}."""
    paths = {}
    for name, data in report.pngs.items():
        paths[name] = root.path("reports", eval_id, name)
        atomic_write(root, paths[name], lambda f, data=data: f.write(data))
    paths["report"] = root.path("reports", eval_id, "report.md")
    atomic_write(root, paths["report"], lambda f: f.write(report.markdown.encode()))
    paths["latest"] = root.path("reports", "latest.md")
    atomic_write(root, paths["latest"], lambda f: f.write(report.latest.encode()))
    return paths
