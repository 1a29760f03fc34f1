"""Integrity checks over the catalog: `geofeat check`, and the build flow's gate.

Each property is a named `Check` (pass/fail, a detail line, up to SHOW offending rows):
- files: every Parquet file under a table folder is listed by a completion record, and every
  listed file exists (a missing one breaks every view);
- one split per image (the `images` view's promise), and images shared across datasets (info);
- crops carry their image's split and country (a stale crop file misleads raw-Parquet readers);
- no features / segmentations / predictions rows without their image;
- known quarantine reasons; registered experts whose checkpoint still exists.
"""

from __future__ import annotations

import logging
import posixpath

import pyarrow as pa
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from storage import sources
from storage.catalog import connect
from storage.layout import DataRoot
from storage.schema import TABLES
from storage.shards import read_commits
from tasks.quality import Check
from tasks.report import md_table
from tasks.validate import REASONS

log = logging.getLogger(__name__)

SHOW = 20  # offending rows kept per check


class IntegrityError(RuntimeError):
    """The catalog failed an integrity check; the message lists every failure."""


def _listed_table(rows: list[dict], names: list[str]) -> pa.Table:
    return pa.Table.from_pylist(rows[:SHOW], schema=pa.schema([(n, pa.string()) for n in names]))


def file_checks(root: DataRoot) -> list[Check]:
    """Shard files against completion records, from listings alone (no view needed)."""
    fs = root.fs
    listed: dict[str, str] = {}  # stripped path -> the record that lists it
    for record in read_commits(root):
        for rels in record.files.values():
            for rel in rels:
                listed[fs._strip_protocol(root.path(rel))] = f"{record.stage}/{record.dataset}/{record.shard_id}"
    on_disk = set()
    for table in TABLES:  # find, not glob: a root may contain glob characters
        if fs.exists(top := root.path(table)):
            on_disk.update(p for p in fs.find(top) if p.endswith(".parquet"))
    orphans = sorted(on_disk - listed.keys())
    missing = sorted(listed.keys() - on_disk)
    base = fs._strip_protocol(root.url)

    def rel(path: str) -> str:  # shown relative to the root
        return posixpath.relpath(path, base)
    return [
        Check("every shard file has a completion record", not orphans,
              f"{len(orphans)} of {len(on_disk)} Parquet files are in no completion record (left by a killed or "
              "failed run; the views ignore them; a rerun over the same inputs commits them, else delete them)"
              if orphans else f"{len(on_disk)} Parquet files, all committed",
              _listed_table([{"file": rel(p)} for p in orphans], ["file"])),
        Check("every committed file exists", not missing,
              f"{len(missing)} files listed by completion records are gone: the views cannot load; "
              "delete those records and rerun the stage" if missing else f"{len(listed)} committed files present",
              _listed_table([{"file": rel(p), "record": listed[p]} for p in missing], ["file", "record"])),
    ]


# name -> (SQL of the offending rows, its parameters, what a failure means); an empty result passes.
SQL_CHECKS = {
    "one split per image": ("""
        SELECT image_id, list(DISTINCT split ORDER BY split) AS splits, list(dataset ORDER BY dataset) AS datasets
        FROM images GROUP BY image_id HAVING count(DISTINCT split) > 1""", [],
        "images with more than one split: train and test share bytes"),
    "crops carry their image's split and country": ("""
        SELECT f.feature_id, f.image_id, f.dataset, f.segmenter, f.split AS crop_split, i.split AS image_split,
               f.country AS crop_country, i.country AS image_country, f.filename
        FROM features_all f JOIN images i USING (image_id, dataset)
        WHERE f.split <> i.split OR f.country <> i.country
        ORDER BY f.dataset, f.segmenter, f.feature_id""", [],
        "crops whose stored split or country is stale (the image was relabelled or moved to a stricter split "
        "after it was segmented): the `features` view corrects them, raw Parquet readers do not"),
    "no rows without their image": ("""
        SELECT tbl, dataset, image_id, count(*) AS n_rows FROM (
          SELECT 'features' AS tbl, dataset, image_id FROM features_all
          UNION ALL SELECT 'segmentations', dataset, image_id FROM segmentations_all
          UNION ALL SELECT 'predictions', dataset, image_id FROM predictions_all) t
        WHERE NOT EXISTS (SELECT 1 FROM images i WHERE i.image_id = t.image_id AND i.dataset = t.dataset)
        GROUP BY ALL ORDER BY ALL""", [],
        "(table, dataset, image) groups whose image is not in `images` (re-ingested with new bytes, "
        "or its dataset dropped)"),
    "quarantine reasons are known": ("""
        SELECT reason, stage, count(*) AS n_rows FROM quarantine_all
        WHERE NOT list_contains(?, reason) GROUP BY ALL ORDER BY ALL""", [sorted(REASONS)],
        "quarantine reasons that tasks/validate.py does not define"),
}

SHARED_IMAGES = """
    SELECT image_id, any_value(split) AS split,
           list(dataset || ':' || assigned_split ORDER BY dataset) AS assigned_splits
    FROM images GROUP BY image_id HAVING count(*) > 1 ORDER BY image_id"""


def _offending(con, sql: str, params: list | None = None) -> tuple[int, pa.Table]:
    """How many rows the query returns, and the first SHOW of them."""
    total = con.execute(f"SELECT count(*) FROM ({sql})", params or []).fetchall()[0][0]
    return total, con.sql(f"{sql} LIMIT {SHOW}", params=params or None).to_arrow_table()


def sql_checks(root: DataRoot) -> list[Check]:
    """The checks that need the views (built fresh from the completion records)."""
    con = None
    try:
        con = connect(root, fresh=True)
        for table in TABLES:  # reads every committed file's footer
            con.execute(f"SELECT count(*) FROM {table}_all").fetchall()
    except Exception as exc:  # noqa: BLE001 - e.g. a committed file is gone or corrupt
        if con is not None:
            con.close()
        return [Check("catalog loads", False, f"the views cannot be read: {type(exc).__name__}: {exc}")]
    try:
        checks = []
        for name, (sql, params, meaning) in SQL_CHECKS.items():
            n, rows = _offending(con, sql, params)
            checks.append(Check(name, n == 0, f"{n} {meaning}" if n else "ok", rows))
        n, rows = _offending(con, SHARED_IMAGES)
        checks.append(Check("images shared across datasets (info)", True,
                            f"{n} images sit in more than one dataset, each with one split (test > val > train)",
                            rows))
        experts = con.execute("SELECT expert_id, uri FROM experts ORDER BY expert_id").fetchall()
    finally:
        con.close()
    gone = [{"expert_id": eid, "uri": uri} for eid, uri in experts if not sources.exists(f"{uri}/config.json")]
    checks.append(Check("expert checkpoints exist", not gone,
                        f"{len(gone)} of {len(experts)} registered experts have no checkpoint at their uri"
                        if gone else f"{len(experts)} experts, all present",
                        _listed_table(gone, ["expert_id", "uri"])))
    return checks


def integrity_checks(root: DataRoot) -> list[Check]:
    """Every integrity property of the catalog under `root`, passing or not."""
    return file_checks(root) + sql_checks(root)


# Failures a build cannot cause and cannot repair: the gate logs them (and `geofeat check` fails on
# them) but does not fail the build. A stale crop split means experts trained before an image moved
# to test saw it: retrain. Rows without an image are dead data the views already hide.
GATE_WARNS = {"crops carry their image's split and country", "no rows without their image",
              "expert checkpoints exist"}


def gate(root: DataRoot, checks: list[Check] | None = None) -> list[Check]:
    """Run the checks (unless given); raise IntegrityError naming every blocking failure, else return them."""
    checks = integrity_checks(root) if checks is None else checks
    for c in checks:
        if not c.passed and c.name in GATE_WARNS:
            log.warning("integrity (not blocking the build): %s: %s", c.name, c.detail)
    failed = [f"{c.name}: {c.detail}" for c in checks if not c.passed and c.name not in GATE_WARNS]
    if failed:
        raise IntegrityError(f"catalog {root.url} failed {len(failed)} integrity check(s): " + "; ".join(failed)
                             + ". `geofeat check` shows the offending rows")
    return checks


def integrity_markdown(checks: list[Check]) -> str:
    lines = ["## Catalog integrity", ""]
    lines += [f"- {'PASS' if c.passed else '**FAIL**'} {c.name}: {c.detail}" for c in checks]
    for c in checks:
        if not c.passed and c.table is not None and c.table.num_rows:
            lines += ["", f"### {c.name} (first {SHOW})", "", md_table(c.table)]
    return "\n".join(lines)


# ---------------------------------------------------------------- Prefect edge


@task(name="integrity-gate", cache_policy=NO_CACHE)
def integrity_gate_task(home: str) -> list[dict]:
    """The build's last gate: publishes the checks as an artifact, fails the run if any fails."""
    root = DataRoot(home)
    checks = integrity_checks(root)
    create_markdown_artifact(integrity_markdown(checks), key="catalog-integrity",
                             description="integrity checks after this run")
    gate(root, checks)
    return [{"name": c.name, "passed": c.passed, "detail": c.detail} for c in checks]
