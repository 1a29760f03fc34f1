"""storage/: schemas, atomic shards, the DuckDB views and the read-only SQL guard."""

import os
from datetime import datetime, timezone

import pyarrow as pa
import pytest

from storage import shards
from storage.catalog import QueryRefused, check_read_only, connect, query, refresh_catalog
from storage.layout import DataRoot
from storage.schema import IMAGES, QUARANTINE, to_table

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


def image_row(image_id: str, dataset: str, split: str = "train", uri: str | None = None, when=NOW) -> dict:
    return {"image_id": image_id, "dataset": dataset, "split": split, "country": "FR", "country_name": "France",
            "continent": "Europe", "lat": None, "lon": None, "source_uri": uri or f"/src/{dataset}/{image_id}.jpg",
            "width": 64, "height": 32, "format": "JPEG", "size_bytes": 100, "source_mtime": 1.5, "ingested_at": when}


def commit(root: DataRoot, dataset: str, shard_id: str, images=(), quarantine=()):
    return shards.commit_shard(root, "ingest", dataset, shard_id,
                               [shards.Output("images", {"dataset": dataset}, to_table(images, IMAGES)),
                                shards.Output("quarantine", {"dataset": dataset}, to_table(quarantine, QUARANTINE))])


def test_schema_round_trip_through_parquet_and_duckdb(root):
    row = image_row("a" * 64, "demo")
    row.update(lat=48.85, lon=2.35)
    commit(root, "demo", "s1", images=[row])
    refresh_catalog(root)
    back = connect(root).sql("SELECT * FROM images_all").to_arrow_table()
    assert back.schema.names == IMAGES.names
    assert back.to_pylist() == [row]


def test_to_table_rejects_rows_that_do_not_match():
    with pytest.raises(ValueError, match="missing=\\['width'\\]"):
        to_table([{k: v for k, v in image_row("a" * 64, "d").items() if k != "width"}], IMAGES)


def test_views_exist_and_are_typed_before_any_data(root):
    refresh_catalog(root)
    con = connect(root)
    for view in ("images", "quarantine", "images_all", "quarantine_all"):
        assert con.sql(f"SELECT count(*) FROM {view}").fetchall() == [(0,)]
    assert "image_id" in con.sql("SELECT * FROM images").columns


def test_catalog_sql_works_from_a_plain_duckdb_client(root):
    import duckdb

    commit(root, "demo", "s1", images=[image_row("b" * 64, "demo")])
    refresh_catalog(root)
    con = duckdb.connect()  # what `duckdb -init catalog.sql` does
    con.execute(open(root.catalog_sql).read())
    assert con.sql("SELECT count(*) FROM images").fetchall() == [(1,)]


def test_only_committed_shards_are_visible(root):
    commit(root, "demo", "s1", images=[image_row("c" * 64, "demo")])
    # A shard file renamed into place but killed before its completion record:
    orphan = to_table([image_row("d" * 64, "demo")], IMAGES)
    shards.write_parquet_atomic(root, orphan, root.shard_path("images", "s2", dataset="demo"))
    refresh_catalog(root)
    assert connect(root).sql("SELECT image_id FROM images").fetchall() == [("c" * 64,)]


def test_atomic_write_leaves_nothing_behind_on_failure(root):
    path = root.shard_path("images", "s3", dataset="demo")

    def boom(f):
        f.write(b"half a shard")
        raise OSError("disk full")

    with pytest.raises(OSError):
        shards.atomic_write(root, path, boom)
    assert not root.fs.exists(path)
    assert root.fs.glob(path + "*") == []


def test_temp_files_of_dead_writers_are_swept_and_live_ones_kept(root):
    path = root.shard_path("images", "s4", dataset="demo")
    root.fs.makedirs(root.path("images", "dataset=demo"), exist_ok=True)
    dead, live = f"{path}.tmp-999999999-aaaa", f"{path}.tmp-{os.getpid()}-bbbb"
    for p in (dead, live):
        root.fs.pipe(p, b"partial")
    shards.atomic_write(root, path, lambda f: f.write(b"done"))
    assert not root.fs.exists(dead) and root.fs.exists(live)
    assert root.fs.cat(path) == b"done"


def test_data_root_with_glob_characters(tmp_path):
    odd = DataRoot(str(tmp_path / "h[1]"))
    commit(odd, "demo", "s1", images=[image_row("9" * 64, "demo")])
    refresh_catalog(odd)
    assert connect(odd).sql("SELECT count(*) FROM images").fetchall() == [(1,)]


def test_duplicates_and_split_resolution(root):
    later = datetime(2026, 2, 1, tzinfo=timezone.utc)
    commit(root, "g50", "s1", images=[image_row("e" * 64, "g50", "train", "/g50/a.jpg"),
                                      image_row("e" * 64, "g50", "train", "/g50/b.jpg")])
    # The same bytes arrive later in a benchmark held out as test:
    commit(root, "bench", "s2", images=[image_row("e" * 64, "bench", "test", "/bench/x.jpg", later)])
    refresh_catalog(root)
    con = connect(root)
    rows = con.sql("SELECT dataset, split, source_uri FROM images ORDER BY dataset").fetchall()
    assert rows == [("bench", "test", "/bench/x.jpg"), ("g50", "test", "/g50/a.jpg")]
    dup = con.sql("SELECT source_uri, reason FROM quarantine").fetchall()
    assert dup == [("/g50/b.jpg", "duplicate")]


ALLOWED = [
    "SELECT 1",
    "select country, count(*) from images group by all",
    "WITH t AS (SELECT * FROM images) SELECT count(*) FROM t",
    "SELECT * FROM quarantine WHERE reason = 'truncated' LIMIT 5",
    "EXPLAIN SELECT * FROM images",
    "DESCRIBE images",
    "SUMMARIZE images",
    "  select 1 ;  ",
]
REFUSED = [
    "INSERT INTO t VALUES (1)",
    "CREATE TABLE t AS SELECT 1",
    "CREATE VIEW v AS SELECT 1",
    "DROP VIEW images",
    "UPDATE images SET country = 'US'",
    "DELETE FROM images",
    "COPY (SELECT 1) TO '/tmp/out.csv'",
    "COPY images TO 'out.parquet'",
    "EXPORT DATABASE '/tmp/x'",
    "ATTACH '/tmp/x.db' AS x",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SET enable_external_access = true",
    "PRAGMA threads=1",
    "SELECT 1; SELECT 2",
    "SELECT 1; DROP VIEW images",
    "",
]


@pytest.mark.parametrize("sql", ALLOWED)
def test_guard_allows_analytics(sql):
    assert check_read_only(sql) == sql


@pytest.mark.parametrize("sql", REFUSED)
def test_guard_refuses_writes_and_settings(sql):
    with pytest.raises(QueryRefused):
        check_read_only(sql)


@pytest.mark.parametrize("sql", [
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_text('/etc/hostname')",
    "SELECT * FROM read_parquet('/tmp/**/*.parquet')",
    "SELECT * FROM glob('/*')",
    "SELECT * FROM read_blob('{home}/catalog.sql')",
])
def test_reads_outside_the_catalog_are_refused_by_duckdb_itself(root, sql):
    refresh_catalog(root)
    with pytest.raises(QueryRefused):
        query(root, sql.format(home=root.url))


def test_query_returns_arrow(root):
    commit(root, "demo", "s1", images=[image_row("f" * 64, "demo")])
    refresh_catalog(root)
    table = query(root, "SELECT dataset, count(*) AS n FROM images GROUP BY dataset")
    assert isinstance(table, pa.Table) and table.to_pylist() == [{"dataset": "demo", "n": 1}]


def test_a_reingested_file_replaces_its_row_and_relabels_its_features(root):
    from storage.schema import FEATURES

    later = datetime(2026, 3, 1, tzinfo=timezone.utc)
    first = image_row("a1" * 32, "g50", uri="/g50/France/x.jpg")
    commit(root, "g50", "s1", images=[first],
           quarantine=[{"source_uri": "/g50/France/late.jpg", "dataset": "g50", "stage": "ingest",
                        "reason": "missing_file", "detail": "not yet", "size_bytes": None,
                        "source_mtime": None, "seen_at": NOW}])
    feature = {"feature_id": "f1", "image_id": "a1" * 32, "dataset": "g50", "split": "train", "country": "FR",
               "label": "car", "group": "vehicle", "score": 1.0, "bbox": [0, 0, 4, 4], "area": 16,
               "crop": {"bytes": b"x", "path": "f1.jpg"}, "crop_width": 4, "crop_height": 4,
               "segmenter": "annotations@main-x", "untrained": False, "created_at": NOW}
    shards.commit_shard(root, "segment", "g50", "seg1", [shards.Output("features", {"dataset": "g50"},
                                                                       to_table([feature], FEATURES))])
    # The same file re-ingested later (touched, relabelled), and the missing file arrived:
    again = dict(first, country="ES", country_name="Spain", ingested_at=later, source_mtime=2.5)
    arrived = image_row("b2" * 32, "g50", uri="/g50/France/late.jpg", when=later)
    commit(root, "g50", "s2", images=[again, arrived])
    refresh_catalog(root)
    con = connect(root)
    assert con.sql("SELECT country FROM images WHERE source_uri = '/g50/France/x.jpg'").fetchall() == [("ES",)]
    assert con.sql("SELECT count(*) FROM quarantine").fetchall() == [(0,)]  # no self-duplicate, no stale row
    assert con.sql("SELECT country FROM features").fetchall() == [("ES",)]


def test_feature_meta_is_the_features_view_without_crops(demo_catalog):
    from storage.catalog import META_COLUMNS, meta_path, refresh_catalog

    root = demo_catalog
    refresh_catalog(root)
    con = connect(root)
    compact = con.sql("SELECT * FROM feature_meta ORDER BY feature_id").fetchall()
    live = con.sql(f"SELECT {META_COLUMNS} FROM features ORDER BY feature_id").fetchall()
    assert compact == live and len(compact) > 100
    assert "crop" not in [c[0] for c in con.sql("DESCRIBE feature_meta").fetchall()]
    before = os.stat(meta_path(root)).st_mtime_ns
    refresh_catalog(root)  # nothing changed: nothing rewritten
    assert os.stat(meta_path(root)).st_mtime_ns == before
    assert query(root, 'SELECT "group", count(*) AS n FROM feature_meta GROUP BY 1').num_rows >= 2  # read-only OK


def test_records_under_a_renamed_stage_still_count(root):
    """`train-experts` was `train`: a catalog written before the rename keeps its registered experts
    (a rerun must not retrain them), and new records go to the new folder only."""
    shards.commit_shard(root, "train", "experts", "e-old", [])
    assert shards.is_committed(root, "train-experts", "experts", "e-old")
    shards.commit_shard(root, "train-experts", "experts", "e-new", [])
    assert {r.shard_id for r in shards.read_commits(root, "train-experts")} == {"e-old", "e-new"}
    assert not root.fs.exists(root.commit_path("train", "experts", "e-new"))
    assert not shards.is_committed(root, "ingest", "experts", "e-old")
