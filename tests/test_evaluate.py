"""Evaluation: votes, fallback, metrics with CIs, the report, and `geofeat predict`."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.evaluate import evaluate
from tasks.specs import EvalSpec
from storage.catalog import connect
from tasks.evaluate import _evaluate_dataset


@pytest.fixture(scope="module")
def evaluated(trained_demo):
    root, _ = trained_demo
    return root, evaluate(EvalSpec(bootstrap=200, allow_untrained=True), home=root.url)


def test_every_test_image_gets_one_prediction_per_method(evaluated):
    root, result = evaluated
    con = connect(root)
    tests = dict(con.sql("SELECT dataset, count(*) FROM images WHERE split = 'test' GROUP BY 1").fetchall())
    per = con.execute("SELECT dataset, method, count(*), count(DISTINCT image_id) FROM predictions WHERE eval_id = ? "
                      "GROUP BY ALL", [result["eval_id"]]).fetchall()
    methods = {m for _, m, _, _ in per}
    assert methods == {"majority", "logprob", "learned", "expert:ground", "expert:furniture", "expert:image",
                       "expert:random"}
    for dataset, method, n, distinct in per:
        assert n == distinct  # one row per image
        if not method.startswith("expert:"):
            assert n == tests[dataset]  # votes answer every test image (with the whole-image fallback)
    wrong_truth = con.execute("SELECT count(*) FROM predictions p JOIN images i USING (image_id, dataset) "
                              "WHERE p.country <> i.country").fetchall()
    assert wrong_truth == [(0,)]


def test_metrics_have_cis_and_the_vote_beats_chance(evaluated):
    root, result = evaluated
    m = connect(root).sql("SELECT * FROM metrics WHERE eval_id = ?", params=[result["eval_id"]]).pl()
    top1 = m.filter(pl.col("metric") == "top1")
    assert (top1["ci_low"] <= top1["value"]).all() and (top1["value"] <= top1["ci_high"]).all()
    assert set(m["metric"]) >= {"top1", "top5", "continent", "coverage", "within_2500km", "within_750km"}
    assert m.filter(pl.col("metric").str.starts_with("within"))["dataset"].unique().to_list() == ["demo-im2gps"]
    chance = 1 / 3  # three demo countries
    votes = top1.filter(pl.col("method").is_in(["majority", "logprob", "learned"]))
    pooled = (votes["value"] * votes["n"]).sum() / votes["n"].sum()  # over both test sets
    assert pooled > chance + 0.15, votes
    assert m["untrained"].all()  # tiny random-init start: every number is flagged


def test_report_has_both_tables_and_figures(evaluated):
    root, result = evaluated
    text = root.fs.cat_file(result["report"]).decode()
    assert "Table 1" in text and "Table 2" in text and "DEMO MODELS" in text and "0.5393" in text
    for name in ("confusion_demo.png", "per_country_demo-im2gps.png"):
        assert root.fs.cat_file(root.path("reports", result["eval_id"], name))[:8] == b"\x89PNG\r\n\x1a\n"
    assert evaluate(EvalSpec(bootstrap=200, allow_untrained=True), home=root.url)["cached"]  # same experts, same crops


def test_images_without_crops_fall_back_to_the_whole_image_expert():
    countries = ["AA", "BB"]
    imgs = pl.DataFrame({"image_id": ["i0", "i1", "i2"], "country": ["AA", "BB", "AA"],
                         "lat": [None, None, None], "lon": [None, None, None]},
                        schema_overrides={"lat": pl.Float64, "lon": pl.Float64})
    # i0: two ground crops and its whole image; i1: only its whole image; i2: nothing at all
    frame = pl.DataFrame({"feature_id": ["a", "b", "c", "d"], "image_id": ["i0", "i0", "i0", "i1"],
                          "dataset": ["d"] * 4, "group": ["ground", "ground", "image", "image"]})
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.2, 0.8]], dtype=np.float32)
    preds, metrics = _evaluate_dataset("e", "d", imgs, frame, probs, countries, ["ground", "image"], ["ground"],
                                       np.ones(1), EvalSpec(bootstrap=0), datetime.now(timezone.utc))
    maj = {p["image_id"]: p for p in preds if p["method"] == "majority"}
    assert (maj["i0"]["predicted"], maj["i0"]["fallback"], maj["i0"]["crops"]) == ("AA", False, 2)
    assert (maj["i1"]["predicted"], maj["i1"]["fallback"]) == ("BB", True)
    assert maj["i2"]["predicted"] is None and maj["i2"]["topk"] == []  # counted as wrong, not dropped
    row = {(r["method"], r["metric"]): r for r in metrics}
    assert row[("majority", "top1")]["value"] == pytest.approx(2 / 3) and row[("majority", "top1")]["n"] == 3
    assert row[("majority", "coverage")]["value"] == pytest.approx(1 / 3)
    assert row[("expert:image", "top1")]["n"] == 2  # an expert alone is scored where it has crops


def test_predict_prints_countries_and_the_crops_that_voted(evaluated, monkeypatch):
    root, _ = evaluated
    monkeypatch.setenv("GEOFEAT_HOME", root.url)
    image = connect(root).sql("SELECT source_uri FROM images WHERE split = 'test' ORDER BY 1 LIMIT 1").fetchall()[0][0]
    assert CliRunner().invoke(app, ["predict", image]).exit_code == 1  # tiny random-init experts: only when asked
    res = CliRunner().invoke(app, ["predict", image, "--top-k", "2", "--json", "--allow-untrained"])
    assert res.exit_code == 0, res.output
    (out,) = json.loads(res.stdout)
    assert len(out["top_k"]) == 2 and out["top_k"][0]["probability"] >= out["top_k"][1]["probability"]
    assert out["crops"] and {c["group"] for c in out["crops"]} <= {"ground", "furniture"}
    assert all({"label", "group", "top_country", "confidence"} <= set(c) for c in out["crops"])
    text = CliRunner().invoke(app, ["predict", image, "/no/such/image.jpg", "--allow-untrained"])
    assert text.exit_code == 1 and "crops that voted" in text.stdout and "no such file" in text.stdout


def test_expert_probs_is_the_same_fast_path_with_any_worker_count(trained_demo):
    """Evaluation's loader (uint8 from the workers, normalised on the device) gives, in the frame's row
    order, what the expert computes on the same crops decoded in this process."""
    import pyarrow.parquet as pq
    import torch

    from models.expert import Expert
    from tasks.evaluate import expert_probs, load_crops, select_experts

    root, _ = trained_demo
    experts = select_experts(root, EvalSpec(allow_untrained=True))  # the tiny demo experts
    row = experts.filter(pl.col("group") == "ground").row(0, named=True)
    expert = Expert.from_pretrained(row["uri"], device="cpu")
    frame = load_crops(root, row["segmenter"], ["ground"], "test", ["demo", "demo-im2gps"])
    assert frame.height > 8 and frame["filename"].n_unique() > 1
    crops = {}
    for path in frame["filename"].unique().to_list():
        t = pq.read_table(path, columns=["feature_id", "crop"])
        crops.update(zip(t.column("feature_id").to_pylist(), (c["bytes"] for c in t.column("crop").to_pylist())))
    shuffled = frame.sample(fraction=1.0, shuffle=True, seed=1)  # rows of one file apart: order comes back
    x, _ = expert.transforms(train=False).batch_pixels([crops[f] for f in shuffled["feature_id"]])
    direct = expert.predict_proba(expert.pixel_values(x)).numpy()
    for workers in (0, 2):
        probs = expert_probs(root, expert, shuffled, batch_size=8, workers=workers)
        assert probs.shape == (shuffled.height, len(expert.labels))
        assert np.allclose(probs, direct, atol=1e-6) and torch.allclose(torch.from_numpy(probs).sum(1), torch.ones(1))
