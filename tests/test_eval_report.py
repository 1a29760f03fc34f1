"""The evaluation report on synthetic metrics/predictions frames (no models, no catalog)."""

from __future__ import annotations

import io
from datetime import datetime, timezone

import polars as pl
import pytest
from PIL import Image

from storage.layout import DataRoot
from storage.schema import METRICS, PREDICTIONS
from tasks import eval_report as er

NOW = datetime(2025, 1, 1, tzinfo=timezone.utc)
EXPERTS = ["expert:ground", "expert:structure", "expert:vegetation", "expert:vehicle", "expert:furniture"]
T1_METHODS = ["expert:image", "majority", "logprob", "learned", *EXPERTS]


def metric_rows(dataset, methods, metrics=("top1", "top5", "continent", "coverage"), value=0.5, n=100, eval_id="e1"):
    return [
        {"eval_id": eval_id, "dataset": dataset, "method": m, "metric": k, "value": value, "ci_low": value - 0.03,
         "ci_high": value + 0.03, "n": n, "untrained": False, "created_at": NOW}
        for m in methods for k in metrics
    ]


def frame(rows, schema) -> pl.DataFrame:
    return pl.from_arrow(schema.empty_table()) if not rows else pl.from_dicts(rows, schema=pl.from_arrow(
        schema.empty_table()).schema)


def metrics_frame(*groups) -> pl.DataFrame:
    return frame([r for g in groups for r in g], METRICS)


def predictions(dataset="g50", method="majority", n_countries=5, per=4, eval_id="e1") -> pl.DataFrame:
    """Country i has per*(i+1) images; every other image is right, some have no prediction."""
    rows, k = [], 0
    codes = [f"{chr(65 + i // 26)}{chr(65 + i % 26)}" for i in range(n_countries)]
    for i, c in enumerate(codes):
        for j in range(per * (i + 1)):
            pred = c if j % 2 == 0 else (None if j % 5 == 1 else codes[(i + 1) % n_countries])
            rows.append({"eval_id": eval_id, "dataset": dataset, "image_id": f"{dataset}-{k}", "method": method,
                         "country": c, "predicted": pred, "topk": [pred or c], "topk_score": [1.0], "crops": 3,
                         "fallback": False, "created_at": NOW})
            k += 1
    return frame(rows, PREDICTIONS)


def is_png(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(data))
    img.load()
    assert img.format == "PNG"
    return img.size


def row(t: pl.DataFrame, dataset: str, method: str) -> dict:
    rows = t.filter((pl.col("dataset") == dataset) & (pl.col("method") == method)).to_dicts()
    assert len(rows) == 1, (dataset, method, rows)
    return rows[0]


def test_fmt():
    assert er.fmt(0.5421, 0.5123, 0.5711) == "0.542 [0.51, 0.57]"
    assert er.fmt(0.5, None, None) == "0.500"
    assert er.fmt(None) is None
    assert er.fmt(float("nan"), float("nan"), float("nan")) == "—"  # a row with no image to score (n = 0)
    assert er.fmt(0.5, float("nan"), float("nan")) == "0.500"


def test_table1_poster_numbers_only_on_matching_rows():
    m = metrics_frame(*(metric_rows(ds, T1_METHODS + ["expert:random"]) for ds in ("g50", "g3", "demo")))
    t = er.table1(m, ["g50", "g3", "demo"])
    assert t.columns == ["dataset", "method", "top1", "poster", "n", "top5", "continent", "coverage", "classifier"]
    assert t.height == 3 * 10
    assert row(t, "g50", "majority")["poster"] == 0.5393
    assert row(t, "g50", "expert:ground")["poster"] == 0.4946
    assert row(t, "g50", "expert:structure")["poster"] == 0.3919
    assert row(t, "g50", "expert:vegetation")["poster"] == 0.3721
    assert row(t, "g50", "expert:vehicle")["poster"] == 0.1716
    assert row(t, "g3", "expert:image")["poster"] == 0.3155
    assert row(t, "g3", "majority")["poster"] == 0.5626
    # nothing else gets a poster number: not g50's baseline, not g3's experts, never another dataset
    assert row(t, "g50", "expert:image")["poster"] is None
    assert row(t, "g50", "logprob")["poster"] is None
    assert row(t, "g3", "expert:ground")["poster"] is None
    assert t.filter(pl.col("dataset") == "demo")["poster"].null_count() == 10
    assert t["poster"].drop_nulls().len() == 7
    # rows in the paper's order: baseline, feature classifier, our votes, experts, random crops
    assert t.filter(pl.col("dataset") == "g50")["method"].to_list() == T1_METHODS + ["expert:random"]
    r = row(t, "g50", "majority")
    assert r["classifier"] == "feature classifier (majority vote)"
    assert r["top1"] == "0.500 [0.47, 0.53]" and r["n"] == 100 and r["top5"] == "0.500"


def test_table1_missing_methods_and_datasets():
    m = metrics_frame(metric_rows("g50", ["majority", "expert:ground"]), metric_rows("g50", ["logprob"], ("top1",)),
                      metric_rows("other", ["majority"]))
    t = er.table1(m, ["g50", "g3"])  # g3 has no metrics, `other` is not asked for
    assert t["method"].to_list() == ["majority", "logprob", "expert:ground"]
    assert set(t["dataset"]) == {"g50"}
    lp = row(t, "g50", "logprob")
    assert lp["top1"] == "0.500 [0.47, 0.53]" and lp["top5"] is None and lp["coverage"] is None
    assert "expert:random" not in t["method"].to_list()
    empty = er.table1(metrics_frame(), ["g50"])
    assert empty.height == 0 and "poster" in empty.columns


def test_table1_newest_metric_wins_and_null_ci():
    old = metric_rows("g50", ["majority"], ("top1",), value=0.1)
    new = metric_rows("g50", ["majority"], ("top1",), value=0.6)
    new[0].update(created_at=datetime(2026, 1, 1, tzinfo=timezone.utc), ci_low=None, ci_high=None)
    t = er.table1(metrics_frame(new, old), ["g50"])
    assert row(t, "g50", "majority")["top1"] == "0.600"


def test_table2_distance_metrics_only_when_present():
    dist = ("top1", "top5", "continent", "coverage", "within_2500km", "within_750km")
    m = metrics_frame(metric_rows("im2gps", ["majority", "expert:image"], dist),
                      metric_rows("demo-im2gps", ["majority"]),
                      metric_rows("g50", ["majority"], dist))
    t = er.table2(m, ["im2gps", "demo-im2gps"])
    assert t.columns == ["dataset", "method", "top1", "poster", "n", "top5", "continent", "within_2500km",
                         "within_750km", "coverage", "classifier"]
    ens = row(t, "im2gps", "majority")
    assert ens["poster"] == 0.0302 and ens["classifier"].startswith("ensemble")
    assert ens["within_750km"] == "0.500 [0.47, 0.53]"
    assert row(t, "im2gps", "expert:image")["poster"] is None
    assert row(t, "demo-im2gps", "majority")["poster"] is None
    assert row(t, "demo-im2gps", "majority")["within_2500km"] is None
    # no coordinates anywhere: no distance columns (g50's do not count for these datasets)
    t2 = er.table2(m, ["demo-im2gps"])
    assert "within_2500km" not in t2.columns and "within_750km" not in t2.columns
    assert t2.height == 1 and t2["poster"].null_count() == 1


def test_confusion_png(tmp_path):
    p = pl.concat([predictions(n_countries=5), predictions(method="logprob", n_countries=3)])
    data = er.confusion_png(p, "majority")
    w, h = is_png(data)
    assert w > 0 and h > 0
    assert er.confusion_png(p, "majority") == data  # deterministic bytes
    # many countries: at most MAX_COUNTRIES rows, the rest is `other`
    wide = predictions(n_countries=45, per=1)
    assert is_png(er.confusion_png(wide, "majority"))
    shown = er._countries(wide["country"], 30)
    assert len(shown) == 29 and shown[0] == "BS"  # the most frequent (45 images) first
    # no predictions for a method: still a valid PNG
    assert is_png(er.confusion_png(p, "learned"))


def test_per_country_png():
    p = predictions(n_countries=4)
    w, h = is_png(er.per_country_png(p, "majority"))
    assert w > 0 and h > 0
    assert is_png(er.per_country_png(predictions(n_countries=40, per=1), "majority"))
    assert is_png(er.per_country_png(p, "missing"))


def _inputs():
    m = metrics_frame(*(metric_rows(ds, T1_METHODS) for ds in ("g50", "g3")),
                      metric_rows("im2gps", ["majority", "expert:image"],
                                  ("top1", "top5", "continent", "coverage", "within_2500km", "within_750km")))
    p = pl.concat([predictions("g50"), predictions("g3", n_countries=3), predictions("im2gps", n_countries=2),
                   predictions("g50", method="logprob")])
    return m, p


def test_report_markdown_banner_and_tables():
    m, p = _inputs()
    kw = dict(eval_id="e1", table1_datasets=["g50", "g3"], table2_datasets=["im2gps"])
    md = er.report_markdown(m, p, untrained=True, notes=["experts are tiny-random"], **kw)
    assert md.startswith("# Evaluation `e1`")
    assert "DEMO MODELS" in md and "- experts are tiny-random" in md
    assert "95% bootstrap CI over images" in md and "n = images" in md
    assert "## Table 1" in md and "## Table 2" in md
    assert "| g50 | majority | 0.500 [0.47, 0.53] | 0.5393 | 100 | 0.500 |" in md
    assert md.count("| feature classifier (majority vote) |") == 2  # g50, g3
    assert "| 0.5393 |" in md and "| 0.0302 |" in md
    for ds in ("g50", "g3", "im2gps"):
        assert f"(confusion_{ds}.png)" in md and f"(per_country_{ds}.png)" in md
    clean = er.report_markdown(m, p, untrained=False, notes=[], **kw)
    assert "DEMO MODELS" not in clean
    # the metrics' own untrained flag is never hidden
    assert "DEMO MODELS" in er.report_markdown(m.with_columns(untrained=pl.lit(True)), p, untrained=False, **kw)


def test_save_report(tmp_path):
    root = DataRoot(str(tmp_path / "home"))
    m, p = _inputs()
    report = er.build_report(m, p, eval_id="e1", table1_datasets=["g50", "g3"], table2_datasets=["im2gps", "im2gps3k"],
                             untrained=True, notes=["demo"])
    paths = er.save_report(root, "e1", report)
    out = tmp_path / "home" / "reports"
    assert paths["report"] == str(out / "e1" / "report.md")
    assert paths["latest"] == str(out / "latest.md")
    md = (out / "e1" / "report.md").read_text()
    assert "DEMO MODELS" in md
    names = {f"{k}_{ds}.png" for k in ("confusion", "per_country") for ds in ("g50", "g3", "im2gps")}
    assert {f.name for f in (out / "e1").iterdir()} == names | {"report.md"}  # no temp files left
    for name in names:
        assert f"({name})" in md
        assert paths[name] == str(out / "e1" / name)
        assert is_png((out / "e1" / name).read_bytes())
    latest = (out / "latest.md").read_text()
    assert "(e1/confusion_g50.png)" in latest and latest.replace("e1/", "") == md.replace("e1/", "")
    # a second run replaces the files in place
    er.save_report(root, "e1", er.build_report(m, p, eval_id="e1", table1_datasets=["g50"], table2_datasets=[],
                                               untrained=False))
    assert "UNTRAINED" not in (out / "e1" / "report.md").read_text()


def test_artifact_tables_hold_numbers_with_n_and_cis_in_their_own_columns():
    m, p = _inputs()
    rep = er.build_report(m, p, eval_id="e1", table1_datasets=["g50", "g3"], table2_datasets=["im2gps"])
    t1, t2 = rep.tables["table-1"], rep.tables["table-2"]
    assert t1.columns == ["dataset", "method", "n", "top1", "poster", "top1_ci_low", "top1_ci_high", "top5",
                          "continent", "coverage", "classifier"]
    assert "within_750km_ci_high" in t2.columns
    r = row(t1, "g50", "majority")
    assert (r["n"], r["top1"], r["top1_ci_low"], r["top1_ci_high"], r["top5"]) == (100, 0.5, 0.47, 0.53, 0.5)
    assert r["poster"] == 0.5393 and r["classifier"] == "feature classifier (majority vote)"
    assert all(isinstance(v, (int, float)) for k, v in r.items() if k not in ("dataset", "method", "classifier"))
    nan = metrics_frame(metric_rows("g50", ["majority"], ("top1",), value=float("nan")))
    assert er.table1_numbers(nan, ["g50"])["top1"].to_list() == [None]  # JSON has no NaN


def test_publish_artifacts_calls(monkeypatch):
    import flows.evaluate as fe

    calls = []
    monkeypatch.setattr(fe, "create_markdown_artifact",
                        lambda md, key, description=None: calls.append(("md", key, md, description)))
    monkeypatch.setattr(fe, "create_table_artifact",
                        lambda t, key, description=None: calls.append(("table", key, t, description)))
    m, p = _inputs()
    rep = er.build_report(m, p, eval_id="e1", table1_datasets=["g50", "g3"], table2_datasets=["im2gps"],
                          untrained=True)
    fe.publish_artifacts(rep)
    keys = [(kind, key) for kind, key, _, _ in calls]
    assert keys == [("md", "evaluation-report"), ("table", "table-1"), ("table", "table-2"),
                    ("md", "confusion-matrix"), ("md", "per-country-accuracy")]
    for _, key, _, _ in calls:
        assert all(c.islower() or c.isdigit() or c == "-" for c in key)
    by = {key: (data, description) for _, key, data, description in calls}
    report = by["evaluation-report"][0]
    assert report.count("](data:image/png;base64,") == 6 and ".png)" not in report  # figures inline, none linked
    assert "DEMO MODELS" in report
    table1, described = by["table-1"]
    assert isinstance(table1, list) and table1[0]["poster"] is None and isinstance(table1[0]["top1"], float)
    assert "DEMO MODELS" in described and "DEMO MODELS" in by["table-2"][1]  # the banner where it applies
    assert by["confusion-matrix"][0].count("data:image/png;base64,") == 3
    assert "### g3" in by["per-country-accuracy"][0]
    calls.clear()
    fe.publish_artifacts(er.build_report(m.with_columns(untrained=pl.lit(False)), p, eval_id="e1",
                                         table1_datasets=["g50"], table2_datasets=[]))
    assert not any("DEMO MODELS" in (d or "") + (x if isinstance(x, str) else "") for _, _, x, d in calls)


@pytest.mark.usefixtures("prefect_harness")
def test_publish_artifacts_in_a_flow():
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    m, p = _inputs()
    rep = er.build_report(m, p, eval_id="e1", table1_datasets=["g50"], table2_datasets=["im2gps"])

    from flows.evaluate import publish_artifacts

    @flow
    def publish():
        publish_artifacts(rep)

    publish()
    keys = ["evaluation-report", "table-1", "table-2", "confusion-matrix", "per-country-accuracy"]
    with get_client(sync_client=True) as client:
        got = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
    assert {a.key for a in got} == set(keys)
    by = {a.key: a for a in got}
    assert by["table-1"].type == "table" and by["confusion-matrix"].type == "markdown"
    assert "data:image/png;base64," in by["confusion-matrix"].data
    assert "data:image/png;base64," in by["evaluation-report"].data
