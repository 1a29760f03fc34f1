"""Data-quality checks over a segmenter's features, in SQL. Failing checks are reported, not hidden."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from storage.catalog import connect
from storage.layout import DataRoot

MIN_CROPS_TO_TRAIN = 20  # crops per (group, country, train split) below which an expert cannot learn it
MAX_NO_CROP_FRACTION = 0.2  # images without any crop
MAX_IMBALANCE = 10.0  # largest / smallest country in a group


@dataclass
class Check:
    name: str
    passed: bool
    detail: str
    table: pa.Table | None = None


def _q(con, sql: str, params: list) -> pa.Table:
    return con.sql(sql, params=params).to_arrow_table()


def quality_checks(root: DataRoot, segmenter: str, datasets: list[str]) -> list[Check]:
    con = connect(root)
    p = [segmenter, datasets]
    try:
        per = _q(con, """
            SELECT "group", country, count(*) AS crops,
                   count(*) FILTER (WHERE split = 'train') AS train_crops, count(DISTINCT image_id) AS images
            FROM features WHERE segmenter = ? AND list_contains(?, dataset)
            GROUP BY ALL ORDER BY "group", crops DESC""", p)
        status = _q(con, """
            SELECT dataset, status, count(*) AS images FROM segmentations
            WHERE segmenter = ? AND list_contains(?, dataset) GROUP BY ALL ORDER BY ALL""", p)
        balance = _q(con, """
            SELECT "group", max(n) AS largest, min(n) AS smallest, round(max(n) / min(n), 1) AS ratio
            FROM (SELECT "group", country, count(*) AS n FROM features
                  WHERE segmenter = ? AND list_contains(?, dataset) GROUP BY ALL)
            GROUP BY "group" ORDER BY ratio DESC""", p)
        thin = _q(con, f"""
            SELECT "group", country, count(*) FILTER (WHERE split = 'train') AS train_crops
            FROM features WHERE segmenter = ? AND list_contains(?, dataset)
            GROUP BY ALL HAVING train_crops < {MIN_CROPS_TO_TRAIN} ORDER BY ALL""", p)
    finally:
        con.close()
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


def checks_markdown(segmenter: str, checks: list[Check]) -> str:
    from tasks.report import md_table

    lines = [f"## Data quality: `{segmenter}`", ""]
    lines += [f"- {'PASS' if c.passed else '**FAIL**'} {c.name}: {c.detail}" for c in checks]
    for c in checks:
        if c.table is not None and c.table.num_rows:
            lines += ["", f"### {c.name}", "", md_table(c.table)]
    return "\n".join(lines)
