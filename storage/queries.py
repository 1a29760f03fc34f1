"""Every catalog query geofeat runs, by name: the only SQL above the view definitions.

    with catalog(root) as cat:          # views from catalog.sql (what flows and reports read)
        cat.datasets(split="test")
    with catalog(root, fresh=True) as cat:   # views from the completion records, now (planners)
        cat.unsegmented_images("g50", segmenter_id)

Values are always bound with `?` parameters; nothing here formats user input into SQL.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import duckdb
import polars as pl
import pyarrow as pa

from storage.catalog import connect
from storage.layout import DataRoot
from storage.schema import TABLES

SHOW = 20  # offending rows kept per integrity check


@contextmanager
def catalog(root: DataRoot, *, fresh: bool = False, read_only: bool = False) -> Iterator["Catalog"]:
    """One DuckDB connection with the catalog views, closed on exit (see storage.catalog.connect)."""
    con = connect(root, fresh=fresh, read_only=read_only)
    try:
        yield Catalog(con)
    finally:
        con.close()


# name -> (SQL of the offending rows, its parameters, what a failure means); an empty result passes.
# `quarantine reasons are known` takes the known reasons as its parameter (tasks/validate.py owns them).
INTEGRITY_SQL = {
    "one split per image": ("""
        SELECT image_id, list(DISTINCT split ORDER BY split) AS splits, list(dataset ORDER BY dataset) AS datasets
        FROM images GROUP BY image_id HAVING count(DISTINCT split) > 1""",
        "images with more than one split: train and test share bytes"),
    "crops carry their image's split and country": ("""
        SELECT f.feature_id, f.image_id, f.dataset, f.segmenter, f.split AS crop_split, i.split AS image_split,
               f.country AS crop_country, i.country AS image_country, f.filename
        FROM features_all f JOIN images i USING (image_id, dataset)
        WHERE f.split <> i.split OR f.country <> i.country
        ORDER BY f.dataset, f.segmenter, f.feature_id""",
        "crops whose stored split or country is stale (the image was relabelled or moved to a stricter split "
        "after it was segmented): the `features` view corrects them, raw Parquet readers do not"),
    "no rows without their image": ("""
        SELECT tbl, dataset, image_id, count(*) AS n_rows FROM (
          SELECT 'features' AS tbl, dataset, image_id FROM features_all
          UNION ALL SELECT 'segmentations', dataset, image_id FROM segmentations_all
          UNION ALL SELECT 'predictions', dataset, image_id FROM predictions_all) t
        WHERE NOT EXISTS (SELECT 1 FROM images i WHERE i.image_id = t.image_id AND i.dataset = t.dataset)
        GROUP BY ALL ORDER BY ALL""",
        "(table, dataset, image) groups whose image is not in `images` (re-ingested with new bytes, "
        "or its dataset dropped)"),
    "no duplicate rows": ("""
        SELECT tbl, "key", n_rows FROM (
          SELECT 'images' AS tbl, dataset || ' ' || source_uri AS "key", count(*) AS n_rows FROM images_all
            GROUP BY dataset, source_uri, size_bytes, source_mtime HAVING count(*) > 1
          UNION ALL SELECT 'quarantine', dataset || ' ' || source_uri, count(*) FROM quarantine_all
            WHERE stage = 'ingest' GROUP BY dataset, source_uri, size_bytes, source_mtime HAVING count(*) > 1
          UNION ALL SELECT 'quarantine', dataset || ' ' || stage || ' ' || source_uri || ' ' || reason, count(*)
            FROM quarantine_all WHERE stage <> 'ingest'
            GROUP BY dataset, stage, source_uri, reason, detail HAVING count(*) > 1
          UNION ALL SELECT 'features', feature_id, count(*) FROM features_all GROUP BY feature_id HAVING count(*) > 1
          UNION ALL SELECT 'segmentations', segmenter || ' ' || dataset || ' ' || image_id, count(*)
            FROM segmentations_all WHERE status <> 'error'
            GROUP BY segmenter, dataset, image_id HAVING count(*) > 1
          UNION ALL SELECT 'experts', expert_id, count(*) FROM experts_all GROUP BY expert_id HAVING count(*) > 1
          UNION ALL SELECT 'predictions', eval_id || ' ' || dataset || ' ' || image_id || ' ' || method, count(*)
            FROM predictions_all GROUP BY eval_id, dataset, image_id, method HAVING count(*) > 1
          UNION ALL SELECT 'metrics', eval_id || ' ' || dataset || ' ' || method || ' ' || metric, count(*)
            FROM metrics_all GROUP BY eval_id, dataset, method, metric HAVING count(*) > 1) t
        ORDER BY 1, 2""",
        "rows written more than once (by each table's key: the same input file as it was, the same refusal, "
        "crop, segmentation outcome, expert, prediction or metric): two runs did the same work, and counts "
        "and training would see it twice"),
    "copies of an image agree on its country": ("""
        SELECT image_id, list(DISTINCT country ORDER BY country) AS countries,
               list(dataset || ':' || country || ':' || source_uri ORDER BY dataset, source_uri) AS copies
        FROM image_copies GROUP BY image_id HAVING count(DISTINCT country) > 1 ORDER BY image_id""",
        "images whose copies (the same bytes, in one dataset or several) carry different countries: the label "
        "of at least one is wrong; the first copy's is used in its dataset"),
    "quarantine reasons are known": ("""
        SELECT reason, stage, count(*) AS n_rows FROM quarantine_all
        WHERE NOT list_contains(?, reason) GROUP BY ALL ORDER BY ALL""",
        "quarantine reasons that tasks/validate.py does not define"),
}

SHARED_IMAGES = """
    SELECT image_id, any_value(split) AS split,
           list(dataset || ':' || assigned_split ORDER BY dataset) AS assigned_splits
    FROM images GROUP BY image_id HAVING count(*) > 1 ORDER BY image_id"""

SUMMARY_SQL = {
    "Images per dataset and split": """
        SELECT dataset, split, count(*) AS images, count(DISTINCT country) AS countries
        FROM images GROUP BY ALL ORDER BY ALL""",
    "Images per country": """
        SELECT dataset, country, any_value(country_name) AS country_name, any_value(continent) AS continent,
               count(*) AS images,
               count(*) FILTER (WHERE split = 'train') AS train,
               count(*) FILTER (WHERE split = 'val') AS val,
               count(*) FILTER (WHERE split = 'test') AS test
        FROM images GROUP BY dataset, country ORDER BY dataset, images DESC, country""",
    "Crops per country and group": """
        SELECT segmenter, country,
               count(*) FILTER (WHERE "group" = 'ground') AS ground,
               count(*) FILTER (WHERE "group" = 'structure') AS structure,
               count(*) FILTER (WHERE "group" = 'vegetation') AS vegetation,
               count(*) FILTER (WHERE "group" = 'vehicle') AS vehicle,
               count(*) FILTER (WHERE "group" = 'furniture') AS furniture,
               count(DISTINCT image_id) AS images, bool_or(untrained) AS untrained
        FROM features GROUP BY ALL ORDER BY segmenter, country""",
    "Quarantine by reason": """
        SELECT dataset, reason, count(*) AS inputs, min(detail) AS example
        FROM quarantine GROUP BY ALL ORDER BY dataset, inputs DESC, reason""",
}


@dataclass(frozen=True)
class Offending:
    """The result of an integrity query: how many rows offend, and the first SHOW of them."""

    name: str
    count: int
    rows: pa.Table
    meaning: str


class Catalog:
    """Named queries over one open connection (from `catalog()`)."""

    def __init__(self, con: duckdb.DuckDBPyConnection):
        self.con = con

    # ------------------------------------------------------------ images

    def datasets(self, split: str | None = None) -> list[str]:
        """Datasets in `images` (with images in `split`, when given), sorted."""
        return [r[0] for r in self.con.execute(
            "SELECT DISTINCT dataset FROM images WHERE (? IS NULL OR split = ?) ORDER BY 1", [split, split]).fetchall()]

    def ingested_keys(self, dataset: str) -> set[tuple]:
        """(uri, size, mtime) of every input this dataset already turned into a row (image or quarantine)."""
        rows = self.con.execute(
            "SELECT source_uri, size_bytes, source_mtime FROM images_all WHERE dataset = ? "
            "UNION ALL SELECT source_uri, size_bytes, source_mtime FROM quarantine_all WHERE dataset = ?",
            [dataset, dataset]).fetchall()
        return {tuple(r) for r in rows}

    def ingested_in_run(self, dataset: str, ingested_at) -> dict[str, int]:
        """What one ingest run added to the views: images (first copies) and quarantine rows
        (refusals and later copies), both stamped with the run's start."""
        images, quarantined = self.con.execute(
            "SELECT (SELECT count(*) FROM images WHERE dataset = ? AND ingested_at = ?), "
            "(SELECT count(*) FROM quarantine WHERE dataset = ? AND stage = 'ingest' AND seen_at = ?)",
            [dataset, ingested_at, dataset, ingested_at]).fetchone()
        return {"images": images, "quarantined": quarantined}

    def unsegmented_images(self, dataset: str, segmenter_id: str) -> list[tuple]:
        """(image_id, dataset, split, country, source_uri) of images this segmenter has not segmented
        (an `error` outcome is planned again), by image_id."""
        return self.con.execute(
            "SELECT image_id, dataset, split, country, source_uri FROM images WHERE dataset = ? "
            "AND image_id NOT IN (SELECT image_id FROM segmentations "
            "                     WHERE segmenter = ? AND dataset = ? AND status <> 'error') "
            "ORDER BY image_id", [dataset, segmenter_id, dataset]).fetchall()

    def images_without_crops(self, key: str, datasets: list[str]) -> list[tuple]:
        """(image_id, dataset, split, country, source_uri, None) of images with no crop of segmenter value `key`."""
        return self.con.execute(
            "SELECT image_id, dataset, split, country, source_uri, NULL AS boxes FROM images "
            "WHERE dataset IN (SELECT unnest(?)) AND image_id NOT IN "
            "(SELECT image_id FROM features_all WHERE segmenter = ?) ORDER BY dataset, image_id",
            [datasets, key]).fetchall()

    def segmented_without_crops(self, segmenter_id: str, key: str, datasets: list[str]) -> list[tuple]:
        """(image_id, dataset, split, country, source_uri, boxes) of images `segmenter_id` cut crops
        from (boxes: theirs, by feature_id) and that have no crop of segmenter value `key` yet."""
        return self.con.execute(
            "SELECT i.image_id, i.dataset, i.split, i.country, i.source_uri, "
            "list(f.bbox ORDER BY f.feature_id) AS boxes "
            "FROM images i JOIN features f USING (image_id, dataset) "
            "WHERE f.segmenter = ? AND i.dataset IN (SELECT unnest(?)) AND i.image_id NOT IN "
            "(SELECT image_id FROM features_all WHERE segmenter = ?) "
            "GROUP BY ALL ORDER BY i.dataset, i.image_id", [segmenter_id, datasets, key]).fetchall()

    def test_images(self, datasets: list[str] | None) -> pl.DataFrame:
        """image_id, dataset, country, lat, lon of the test images of `datasets` (None: all)."""
        return self.con.sql(
            "SELECT image_id, dataset, country, lat, lon FROM images WHERE split = 'test' "
            "AND (? IS NULL OR dataset IN (SELECT unnest(?))) ORDER BY dataset, image_id",
            params=[datasets, datasets or []]).pl()

    def val_labels(self) -> pl.DataFrame:
        """image_id, country of every val image."""
        return self.con.sql("SELECT image_id, country FROM images WHERE split = 'val'").pl()

    # ------------------------------------------------------------ features

    def latest_segmenter(self, datasets: list[str] | None, allow_untrained: bool = True) -> str | None:
        """The segmenter id (not a baseline) with the most recent train crops in `datasets` (None: any);
        without `allow_untrained`, never one whose crops are marked UNTRAINED."""
        row = self.con.execute(
            "SELECT segmenter FROM features WHERE split = 'train' AND segmenter <> 'whole-image' "
            "AND NOT starts_with(segmenter, 'random@') AND (? IS NULL OR dataset IN (SELECT unnest(?))) "
            "GROUP BY segmenter HAVING ? OR NOT bool_or(untrained) ORDER BY max(created_at) DESC LIMIT 1",
            [datasets, datasets or [], allow_untrained]).fetchone()
        return None if row is None else row[0]

    def untrained_segmenters(self) -> list[str]:
        """Segmenter ids whose crops are marked UNTRAINED (random-init models: their crops are noise)."""
        return [r[0] for r in self.con.execute(
            "SELECT DISTINCT segmenter FROM features_all WHERE untrained ORDER BY 1").fetchall()]

    def segmenters_covering(self, datasets: list[str]) -> list[str]:
        """Segmenter ids that segmented images of every one of `datasets`."""
        return [r[0] for r in self.con.execute(
            "SELECT segmenter FROM segmentations WHERE dataset IN (SELECT unnest(?)) GROUP BY segmenter "
            "HAVING count(DISTINCT dataset) = ? ORDER BY 1", [datasets, len(set(datasets))]).fetchall()]

    def training_crops(self, key: str, group: str, datasets: list[str] | None) -> list[tuple]:
        """(feature_id, country, split, filename) of `group`'s train and val crops of segmenter value
        `key`; split and country are the IMAGE's (the `features` view), so no image is on both sides."""
        return self.con.execute(
            "SELECT feature_id, country, split, filename FROM features WHERE segmenter = ? AND \"group\" = ? "
            "AND split IN ('train', 'val') AND (? IS NULL OR dataset IN (SELECT unnest(?))) ORDER BY feature_id",
            [key, group, datasets, datasets or []]).fetchall()

    def crops(self, keys: list[str], groups: list[str], split: str, datasets: list[str]) -> pl.DataFrame:
        """feature_id, image_id, dataset, group, filename of crops by segmenter values, groups, split, datasets."""
        return self.con.sql(
            "SELECT feature_id, image_id, dataset, \"group\", filename FROM features WHERE split = ? "
            "AND dataset IN (SELECT unnest(?)) AND segmenter IN (SELECT unnest(?)) AND \"group\" IN (SELECT unnest(?)) "
            "ORDER BY dataset, image_id, feature_id", params=[split, datasets, keys, groups]).pl()

    # ------------------------------------------------------------ experts and evaluations

    def experts(self) -> pl.DataFrame:
        """The expert registry, newest first."""
        return self.con.sql("SELECT * FROM experts ORDER BY created_at DESC").pl()

    def expert_summaries(self, expert_ids: list[str]) -> pl.DataFrame:
        return self.con.sql(
            "SELECT \"group\", base_checkpoint, steps, val_accuracy, train_crops, metrics FROM experts "
            "WHERE expert_id IN (SELECT unnest(?)) ORDER BY \"group\"", params=[expert_ids]).pl()

    def evaluation(self, eval_id: str) -> tuple[pl.DataFrame, pl.DataFrame]:
        """(metrics, predictions) of one evaluation."""
        return (self.con.sql("SELECT * FROM metrics WHERE eval_id = ?", params=[eval_id]).pl(),
                self.con.sql("SELECT * FROM predictions WHERE eval_id = ?", params=[eval_id]).pl())

    # ------------------------------------------------------------ reports and checks

    def summary(self) -> dict[str, pa.Table]:
        """The catalog summary tables, by title."""
        return {title: self.con.sql(sql).to_arrow_table() for title, sql in SUMMARY_SQL.items()}

    def quality(self, segmenter_id: str, datasets: list[str], min_train_crops: int) -> dict[str, pa.Table]:
        """Per (group, country) crop counts, per-status image counts, class balance, and the (group,
        country) cells under `min_train_crops` train crops, of one segmenter over `datasets`."""
        p = [segmenter_id, datasets]
        q = lambda sql, params=p: self.con.sql(sql, params=params).to_arrow_table()  # noqa: E731
        return {
            "per": q("""
                SELECT "group", country, count(*) AS crops,
                       count(*) FILTER (WHERE split = 'train') AS train_crops, count(DISTINCT image_id) AS images
                FROM features WHERE segmenter = ? AND list_contains(?, dataset)
                GROUP BY ALL ORDER BY "group", crops DESC"""),
            "status": q("""
                SELECT dataset, status, count(*) AS images FROM segmentations
                WHERE segmenter = ? AND list_contains(?, dataset) GROUP BY ALL ORDER BY ALL"""),
            "balance": q("""
                SELECT "group", max(n) AS largest, min(n) AS smallest, round(max(n) / min(n), 1) AS ratio
                FROM (SELECT "group", country, count(*) AS n FROM features
                      WHERE segmenter = ? AND list_contains(?, dataset) GROUP BY ALL)
                GROUP BY "group" ORDER BY ratio DESC"""),
            "thin": q("""
                SELECT "group", country, count(*) FILTER (WHERE split = 'train') AS train_crops
                FROM features WHERE segmenter = ? AND list_contains(?, dataset)
                GROUP BY ALL HAVING train_crops < ? ORDER BY ALL""", [*p, min_train_crops]),
        }

    def load_every_table(self) -> None:
        """Read every committed file's footer; raises when one is gone or corrupt."""
        for table in TABLES:
            self.con.execute(f"SELECT count(*) FROM {table}_all").fetchall()  # table names are ours, not input

    def _offending(self, name: str, sql: str, params: list, meaning: str) -> Offending:
        total = self.con.execute(f"SELECT count(*) FROM ({sql})", params).fetchall()[0][0]
        return Offending(name, total, self.con.sql(f"{sql} LIMIT {SHOW}", params=params or None).to_arrow_table(),
                         meaning)

    def integrity(self, known_reasons: list[str]) -> list[Offending]:
        """Each integrity query's offending rows (INTEGRITY_SQL), in order."""
        params = {"quarantine reasons are known": [known_reasons]}
        return [self._offending(name, sql, params.get(name, []), meaning)
                for name, (sql, meaning) in INTEGRITY_SQL.items()]

    def shared_images(self) -> Offending:
        """Images in more than one dataset (information, not a failure)."""
        return self._offending("images shared across datasets", SHARED_IMAGES, [],
                               "images sit in more than one dataset, each with one split (test > val > train)")

    def expert_uris(self) -> list[tuple[str, str]]:
        return self.con.execute("SELECT expert_id, uri FROM experts ORDER BY expert_id").fetchall()
