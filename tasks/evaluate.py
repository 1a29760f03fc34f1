"""Evaluate the registered experts on test splits: crops -> each group's expert -> per-image votes.

Methods (one `predictions` row per image and method):
* `majority` - the poster's vote: the country most crops pick (ties: summed probability);
* `logprob`  - confidence-weighted: sum of log-probabilities over the crops;
* `learned`  - logprob with per-group weights fitted on the val split;
* `expert:<group>` - one expert alone, majority over its crops (`image`: whole-image baseline,
  `random`: the random-crop ablation).
The three votes use the feature groups' crops; an image without any falls back to the whole-image
baseline (`fallback`), and `coverage` says how many had crops.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import datetime, timezone

import numpy as np
import polars as pl

from models.expert import Expert
from models.labels import GROUPS
from models.vote import VOTES, fit_group_weights, image_scores, majority_vote, topk, with_fallback
from storage.layout import DataRoot
from storage.queries import catalog
from storage.schema import METRICS, PREDICTIONS, to_table
from storage.shards import Output, commit_shard, is_committed
from tasks.baselines import source_key
from tasks import progress
from tasks.loader import CropStream, device_batches, make_loader
from tasks.metrics import coverage_row, image_metrics
from tasks.specs import EvalSpec

log = logging.getLogger(__name__)

STAGE = "evaluate"
EVAL_VERSION = "2"  # 2: crops decoded and resized by the uint8 loader path (issue 11): probabilities move slightly
TOP_K = 5


# ---------------------------------------------------------------- which experts


def select_experts(root: DataRoot, spec: EvalSpec) -> pl.DataFrame:
    """One expert per group: the pinned ones (`experts`, `experts_run`, `segmenter`), else the latest
    of the latest segmenter whose experts may answer: one that segmented every dataset in
    `spec.datasets`, and never an UNTRAINED expert or segmenter unless `allow_untrained` (or the
    experts are pinned by id or run)."""
    with catalog(root, fresh=True) as cat:
        experts = cat.experts()
        untrained_segmenters = cat.untrained_segmenters()
        covering = cat.segmenters_covering(spec.datasets) if spec.datasets and not spec.segmenter else None
    where = f" at {root.url}"
    if experts.is_empty():
        raise LookupError(f"no registered experts{where}; run train-experts first (geofeat train)")
    if spec.experts:
        chosen = experts.filter(pl.col("expert_id").is_in(spec.experts)).unique("expert_id", keep="first",
                                                                               maintain_order=True)
        unknown = sorted(set(spec.experts) - set(chosen["expert_id"]))
        if unknown:
            raise LookupError(f"--expert / spec.experts: no expert {unknown}{where}; see "
                              "geofeat sql \"SELECT expert_id, segmenter, created_at FROM experts\"")
        if chosen["group"].n_unique() < chosen.height or chosen["segmenter"].n_unique() > 1:
            raise ValueError("--expert / spec.experts: give at most one expert per group, all of one segmenter "
                             f"(got {dict(zip(chosen['expert_id'], chosen['group']))})")
        return chosen
    if spec.experts_run:
        experts = experts.filter(pl.col("run_id") == spec.experts_run)
    if spec.segmenter:
        experts = experts.filter(pl.col("segmenter") == spec.segmenter)
    if experts.is_empty():
        raise LookupError(f"no registered experts{where}" + (f" for segmenter {spec.segmenter}" if spec.segmenter else "")
                          + (f" in run {spec.experts_run}" if spec.experts_run else "") + "; run train-experts first")
    if not (spec.allow_untrained or spec.experts_run):
        trained = experts.filter(~pl.col("untrained") & ~pl.col("segmenter").is_in(untrained_segmenters))
        if trained.is_empty():
            raise LookupError(f"the registered experts{where} are all UNTRAINED (random-init start or segmenter, e.g. "
                              f"{experts['expert_id'][0]}): demo models, not the method. Train experts from a real "
                              "checkpoint on a real segmenter's crops, or pass --allow-untrained "
                              "(spec.allow_untrained: true) to use them anyway")
        experts = trained
    if covering is not None:
        segmenters = sorted(set(experts["segmenter"]))
        experts = experts.filter(pl.col("segmenter").is_in(covering))
        if experts.is_empty():
            raise LookupError(f"no experts whose segmenter segmented {spec.datasets}{where} (experts exist for "
                              f"{segmenters}); segment those datasets with one of them, or pin --segmenter")
    feature = experts.filter(pl.col("group").is_in(GROUPS))
    segmenter_id = spec.segmenter or (feature if not feature.is_empty() else experts)["segmenter"][0]
    return experts.filter(pl.col("segmenter") == segmenter_id).unique("group", keep="first", maintain_order=True)


# ---------------------------------------------------------------- crop probabilities


def load_crops(root: DataRoot, segmenter_id: str, groups: list[str], split: str, datasets: list[str]) -> pl.DataFrame:
    """feature_id, image_id, dataset, group, filename of the groups' crops (baselines: their own keys)."""
    with catalog(root, fresh=True) as cat:
        return cat.crops(sorted({source_key(g, segmenter_id) for g in groups}), groups, split, datasets)


def expert_probs(root: DataRoot, expert: Expert, frame: pl.DataFrame, batch_size: int, workers: int) -> np.ndarray:
    """[len(frame), expert labels] softmax probabilities, in the frame's row order."""
    out = np.zeros((frame.height, len(expert.labels)), dtype=np.float32)
    if frame.is_empty():
        return out
    positions = frame.with_row_index("pos").group_by("filename", maintain_order=True).agg("feature_id", "pos")
    units = [(r["filename"], r["feature_id"], r["pos"]) for r in positions.iter_rows(named=True)]
    stream = CropStream(root.url, units, expert.transforms(train=False), train=False)
    loader = make_loader(stream, batch_size, workers, pin=expert.device.type == "cuda")
    for x, pos, _ in device_batches(loader, expert, train=False):  # uint8 from the workers, normalised on the device
        out[pos.numpy()] = expert.predict_proba(x).numpy()
        progress.advance(len(pos))
    return out


def crop_probabilities(root: DataRoot, experts: pl.DataFrame, frame: pl.DataFrame, countries: list[str],
                       spec: EvalSpec, loaded: dict) -> np.ndarray:
    """Each crop through its group's expert, mapped onto `countries` (0 for countries its head lacks)."""
    probs = np.zeros((frame.height, len(countries)), dtype=np.float32)
    column = {c: i for i, c in enumerate(countries)}
    for row in experts.iter_rows(named=True):
        idx = np.flatnonzero((frame["group"] == row["group"]).to_numpy())
        if not len(idx):
            continue
        if row["expert_id"] not in loaded:
            loaded[row["expert_id"]] = Expert.from_pretrained(row["uri"], device=spec.device)
        expert = loaded[row["expert_id"]]
        p = expert_probs(root, expert, frame[idx], spec.batch_size, workers=spec.workers_for(expert.device.type))
        probs[np.ix_(idx, [column[c] for c in expert.labels])] = p
    return probs


# ---------------------------------------------------------------- votes


def _rank(scores: np.ndarray, countries: list[str]) -> tuple[list[list[str]], list[list[float]]]:
    idx, val = topk(scores, min(TOP_K, scores.shape[1]))
    ranked = [[countries[j] for j in row if j >= 0] for row in idx]
    score = [[float(v) for v, j in zip(vrow, irow) if j >= 0] for vrow, irow in zip(val, idx)]
    return ranked, score


def learn_weights(crops: pl.DataFrame, probs: np.ndarray, truth: dict[str, str], groups: list[str],
                  countries: list[str]) -> np.ndarray:
    """Per-group weights fitted on val images (uniform when val has no crops)."""
    if crops.is_empty():
        return np.ones(len(groups))
    images = crops["image_id"].unique(maintain_order=True).to_list()
    pos = {im: i for i, im in enumerate(images)}
    column = {c: i for i, c in enumerate(countries)}
    y = np.array([column.get(truth.get(im, ""), -1) for im in images])
    return fit_group_weights(probs, np.array([pos[i] for i in crops["image_id"]]),
                             np.array([groups.index(g) for g in crops["group"]]), y, len(images), len(groups))


# ---------------------------------------------------------------- the stage


def eval_id(experts: pl.DataFrame, spec: EvalSpec, test: pl.DataFrame) -> str:
    digest = hashlib.sha256(json.dumps([EVAL_VERSION, sorted(experts["expert_id"].to_list()),
                                        spec.identity()]).encode())
    for fid in test["feature_id"].sort():
        digest.update(fid.encode())
    return digest.hexdigest()[:12]


def evaluate(root: DataRoot, spec: EvalSpec) -> dict:
    """Predict every test image of `spec.datasets` and commit `predictions` + `metrics`."""
    experts = select_experts(root, spec)
    segmenter_id = experts["segmenter"][0]
    with catalog(root, fresh=True) as cat:
        images = cat.test_images(spec.datasets)
        val_images = cat.val_labels()
    datasets = sorted(images["dataset"].unique().to_list())
    if not datasets:
        raise LookupError(f"no test images in {spec.datasets or 'the catalog'} at {root.url}")
    groups = experts["group"].to_list()
    vote_groups = [g for g in GROUPS if g in groups]
    countries = sorted({c for labels in experts["labels"] for c in labels})
    test = load_crops(root, segmenter_id, groups, "test", datasets)
    unanswered = sorted(set(datasets) - set(test["dataset"].unique().to_list()))
    if unanswered:  # no crop of any expert's kind, not even a whole image: every metric would be empty
        raise LookupError(f"no answer for the test images of {unanswered}: segmenter {segmenter_id} cut no crop from "
                          f"them and no whole-image expert is registered (groups {groups}); segment them with that "
                          "segmenter, or train with baseline: true, or leave them out of spec.datasets")
    eid = eval_id(experts, spec, test)
    untrained = bool(experts["untrained"].any())
    summary = {"eval_id": eid, "segmenter": segmenter_id, "datasets": datasets, "experts": experts["expert_id"].to_list(),
               "untrained": untrained}
    if all(is_committed(root, STAGE, d, eid) for d in datasets):
        return {**summary, "cached": True}

    loaded: dict = {}
    with progress.scope("evaluate", f"test crops of {', '.join(datasets)}", test.height, "crops"):
        probs = crop_probabilities(root, experts, test, countries, spec, loaded)
    val = load_crops(root, segmenter_id, vote_groups, "val", _train_datasets(experts, root))
    with progress.scope("evaluate", "val crops (learned group weights)", val.height, "crops"):
        val_probs = crop_probabilities(root, experts, val, countries, spec, loaded)
    truth_val = dict(zip(val_images["image_id"], val_images["country"]))
    weights = learn_weights(val, val_probs, truth_val, vote_groups, countries)
    log.info("learned group weights on %d val crops: %s", val.height,
             dict(zip(vote_groups, np.round(weights, 3).tolist())))

    now = datetime.now(timezone.utc)
    for dataset in datasets:
        imgs = images.filter(pl.col("dataset") == dataset)
        pred_rows, metric_rows = _evaluate_dataset(eid, dataset, imgs, test, probs, countries, groups,
                                                   vote_groups, weights, spec, now)
        for m in metric_rows:
            m.update(eval_id=eid, dataset=dataset, untrained=untrained, created_at=now)
        commit_shard(root, STAGE, dataset, eid, [
            Output("predictions", {"dataset": dataset}, to_table(pred_rows, PREDICTIONS)),
            Output("metrics", {"dataset": dataset}, to_table(metric_rows, METRICS))],
            params={"experts": experts["expert_id"].to_list(), "weights": dict(zip(vote_groups, weights.tolist()))})
    return {**summary, "cached": False, "weights": dict(zip(vote_groups, np.round(weights, 4).tolist()))}


def _train_datasets(experts: pl.DataFrame, root: DataRoot) -> list[str]:
    """The datasets the experts trained on (their config; all datasets when it named none)."""
    named = {d for cfg in experts["config"] for d in (json.loads(cfg).get("datasets") or [])}
    if named:
        return sorted(named)
    with catalog(root) as cat:
        return cat.datasets(split="val")


def _evaluate_dataset(eid, dataset, imgs, test, probs, countries, groups, vote_groups, weights, spec, now):
    image_ids = imgs["image_id"].to_list()
    pos = {im: i for i, im in enumerate(image_ids)}
    mask = (test["dataset"] == dataset).to_numpy()
    frame, p = test.filter(mask), probs[mask]
    image_index = np.array([pos[i] for i in frame["image_id"]], dtype=np.int64)
    truth = imgs["country"].to_list()
    lat = imgs["lat"].to_numpy().astype(float)
    lon = imgs["lon"].to_numpy().astype(float)
    pred_rows, metric_rows = [], []

    def add(method: str, scores: np.ndarray, crops_per_image: np.ndarray, fallback: np.ndarray, subset: np.ndarray):
        ranked, score = _rank(scores, countries)
        for i in np.flatnonzero(subset):
            pred_rows.append({"eval_id": eid, "dataset": dataset, "image_id": image_ids[i], "method": method,
                              "country": truth[i], "predicted": ranked[i][0] if ranked[i] else None,
                              "topk": ranked[i], "topk_score": score[i], "crops": int(crops_per_image[i]),
                              "fallback": bool(fallback[i]), "created_at": now})
        rows = image_metrics([truth[i] for i in np.flatnonzero(subset)], [ranked[i] for i in np.flatnonzero(subset)],
                             lat[subset], lon[subset], n_boot=spec.bootstrap, seed=spec.seed)
        metric_rows.extend({"method": method, **r} for r in rows)

    n = len(image_ids)
    everyone = np.ones(n, dtype=bool)
    baseline = None
    if "image" in groups:
        sel = (frame["group"] == "image").to_numpy()
        counts = np.bincount(image_index[sel], minlength=n)
        baseline = majority_vote(p[sel], image_index[sel], n)
        add("expert:image", baseline, counts, np.zeros(n, bool), counts > 0)
        metric_rows.append({"method": "expert:image", **coverage_row(counts > 0, spec.bootstrap, spec.seed)})
    for g in [g for g in groups if g != "image"]:
        sel = (frame["group"] == g).to_numpy()
        counts = np.bincount(image_index[sel], minlength=n)
        add(f"expert:{g}", majority_vote(p[sel], image_index[sel], n), counts, np.zeros(n, bool), counts > 0)
        metric_rows.append({"method": f"expert:{g}", **coverage_row(counts > 0, spec.bootstrap, spec.seed)})

    sel = np.isin(frame["group"].to_numpy(), vote_groups)
    counts = np.bincount(image_index[sel], minlength=n)
    group_index = np.array([vote_groups.index(g) for g in frame["group"].filter(pl.Series(sel))], dtype=np.int64)
    covered = counts > 0
    for method in VOTES:
        scores, fallback = with_fallback(image_scores(p[sel], image_index[sel], group_index, n, method, weights),
                                         baseline)
        add(method, scores, counts, fallback, everyone)
        metric_rows.append({"method": method, **coverage_row(covered, spec.bootstrap, spec.seed)})
    return pred_rows, metric_rows
