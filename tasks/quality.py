"""Data-quality checks over a segmenter's features. Failing checks are reported, not hidden."""

from __future__ import annotations

from storage.layout import DataRoot
from storage.queries import catalog
from tasks.report import Check, checks_markdown

MIN_CROPS_TO_TRAIN = 20  # crops per (group, country, train split) below which an expert cannot learn it
MAX_NO_CROP_FRACTION = 0.2  # images without any crop
MAX_IMBALANCE = 10.0  # largest / smallest country in a group


def quality_checks(root: DataRoot, segmenter_id: str, datasets: list[str]) -> list[Check]:
    with catalog(root) as cat:
        t = cat.quality(segmenter_id, datasets, MIN_CROPS_TO_TRAIN)
    per, status, balance, thin = t["per"], t["status"], t["balance"], t["thin"]
    counts = {s: 0 for s in ("ok", "no_crops", "no_annotation", "quarantined", "error")}
    for row in status.to_pylist():
        counts[row["status"]] = counts.get(row["status"], 0) + row["images"]
    total = sum(counts.values())
    empty = total - counts["ok"]
    worst = max((r["ratio"] or 0 for r in balance.to_pylist()), default=0)
    return [
        Check("crops per group and country", per.num_rows > 0, f"{per.num_rows} (group, country) cells", per),
        Check("images with no crops", total > 0 and empty <= MAX_NO_CROP_FRACTION * total,
              f"{empty} of {total} images: " + ", ".join(f"{k}={v}" for k, v in counts.items()), status),
        Check("class balance", worst <= MAX_IMBALANCE, f"largest/smallest country per group up to {worst}x "
              f"(limit {MAX_IMBALANCE}x)", balance),
        Check("groups with too few crops to train", thin.num_rows == 0,
              f"{thin.num_rows} (group, country) cells under {MIN_CROPS_TO_TRAIN} train crops", thin),
    ]


def quality_markdown(segmenter_id: str, checks: list[Check], untrained: bool = False) -> str:
    report = checks_markdown(f"Data quality: `{segmenter_id}`", checks)
    if untrained:
        report = "> **UNTRAINED segmenter: these crops come from random weights.**\n\n" + report
    return report
