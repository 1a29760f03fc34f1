"""`geofeat sql` against hostile statements (all refused with a reason, nothing written) and
ordinary analytical queries (all allowed, returning rows). Extends test_catalog's guard tests
through the CLI, on a small catalog whose table folders exist (so a write there would land).

Allowed beyond SELECT: EXPLAIN [ANALYZE] of a SELECT (ANALYZE runs it, which a bare SELECT does
too), and DESCRIBE / SUMMARIZE / SHOW, which DuckDB parses as SELECTs over the catalog's own
schema and rows."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from storage import shards
from storage.catalog import refresh_catalog
from storage.layout import DataRoot
from storage.schema import FEATURES, SEGMENTATIONS, to_table
from test_catalog import commit, image_row

runner = CliRunner()
PROJECT = Path(__file__).resolve().parents[1]
NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)
EVIL = "{home}/images/dataset=g50/evil.parquet"  # inside a folder DuckDB may read
SERIALIZED_COPY = ("SELECT * FROM json_execute_serialized_sql(json_serialize_sql("
                   "''WITH x AS (COPY (SELECT 1 AS a) TO ''''" + EVIL + "'''') SELECT 1''))")

# (statement, what the refusal must say)
HOSTILE = [
    # writes
    ("INSERT INTO images_all SELECT * FROM images_all", "INSERT statements are refused"),
    ("UPDATE images SET country = 'US'", "UPDATE statements are refused"),
    ("DELETE FROM quarantine", "DELETE statements are refused"),
    ("TRUNCATE images_all", "DELETE statements are refused"),
    ("CREATE TABLE t AS SELECT * FROM images", "CREATE statements are refused"),
    ("CREATE OR REPLACE VIEW images AS SELECT 1", "CREATE statements are refused"),
    ("CREATE MACRO m(x) AS x + 1", "CREATE statements are refused"),
    ("CREATE SECRET s (TYPE s3, KEY_ID 'k', SECRET 's')", "CREATE statements are refused"),
    ("DROP VIEW images", "DROP statements are refused"),
    ("ALTER VIEW images RENAME TO gone", "ALTER statements are refused"),
    # COPY / EXPORT / IMPORT, also hidden in a CTE, an EXPLAIN ANALYZE or a serialized plan
    ("COPY images TO '{out}/images.parquet'", "COPY statements are refused"),
    ("COPY (SELECT * FROM images) TO '" + EVIL + "'", "COPY statements are refused"),
    ("COPY images_all FROM '{out}/in.parquet'", "COPY statements are refused"),
    ("EXPORT DATABASE '{out}/export'", "EXPORT statements are refused"),
    ("IMPORT DATABASE '{out}/export'", "PRAGMA statements are refused"),
    ("WITH x AS (COPY (SELECT 1 AS a) TO '" + EVIL + "') SELECT * FROM images", "COPY inside a query is refused"),
    ("WITH x AS (DELETE FROM images_all RETURNING *) SELECT 1", "DELETE inside a query is refused"),
    ("EXPLAIN ANALYZE COPY (SELECT 1 AS a) TO '" + EVIL + "'", "EXPLAIN COPY is refused"),
    ("explain /* x */ analyze create table t as select 1", "EXPLAIN CREATE is refused"),
    ("EXPLAIN (ANALYZE, FORMAT json) DROP VIEW images", "EXPLAIN DROP is refused"),
    ("SELECT * FROM json_execute_serialized_sql(json_serialize_sql('SELECT 1'))", "json_execute_serialized_sql"),
    ("SELECT * FROM query('" + SERIALIZED_COPY + "')", "FROM query"),
    ("SELECT * FROM query('SELECT 1')", "FROM query"),
    # databases and extensions
    ("ATTACH '{out}/x.duckdb' AS x", "ATTACH statements are refused"),
    ("DETACH memory", "DETACH statements are refused"),
    ("USE memory", "SET statements are refused"),
    ("INSTALL httpfs", "LOAD statements are refused"),
    ("LOAD httpfs", "LOAD statements are refused"),
    ("FORCE INSTALL httpfs FROM 'http://127.0.0.1:9'", "LOAD statements are refused"),
    ("UPDATE EXTENSIONS", "UNRECOGNISED statements are refused"),
    # reads outside the catalog's table folders: refused by DuckDB itself
    ("SELECT * FROM read_csv('/etc/passwd')", "Permission Error"),
    ("SELECT count(*) FROM (SELECT * FROM read_csv_auto('/etc/passwd')) t", "Permission Error"),
    ("SELECT * FROM read_text('/etc/hostname')", "Permission Error"),
    ("SELECT * FROM read_text('{home}/images/../catalog.sql')", "Permission Error"),
    ("SELECT * FROM read_blob('{home}/../secret.txt')", "Permission Error"),
    ("SELECT * FROM read_csv('../../etc/passwd')", "Permission Error"),
    ("SELECT * FROM read_json('https://example.com/x.json')", "Permission Error"),
    ("SELECT * FROM read_parquet('http://127.0.0.1:9/x.parquet')", "Permission Error"),
    ("SELECT * FROM read_csv(['{home}/images/dataset=g50/s1.parquet', '/etc/passwd'])", "Permission Error"),
    ("SELECT * FROM glob('/etc/*')", "Permission Error"),
    ("SELECT * FROM '/etc/passwd'", "does not exist"),  # replacement scans are off with external access
    ("SELECT getenv('HOME')", "getenv does not exist"),
    # multiple statements, comment and case tricks
    ("SELECT 1; DROP VIEW images", "exactly one statement"),
    ("select 1 -- harmless\n; drop view images", "exactly one statement"),
    ("  dRoP /* hidden */ vIeW images  ", "DROP statements are refused"),
    ("SELECT 1; SELECT 2", "exactly one statement"),
    (";", "exactly one statement is allowed, got 0"),
    # settings, pragmas, procedures
    ("SET enable_external_access = true", "SET statements are refused"),
    ("SET allowed_directories = ['/']", "SET statements are refused"),
    ("SET GLOBAL lock_configuration = false", "SET statements are refused"),
    ("RESET allowed_directories", "SET statements are refused"),
    ("PRAGMA enable_profiling", "PRAGMA statements are refused"),
    ("PRAGMA threads=1", "SET statements are refused"),  # DuckDB parses it as SET
    ("CALL enable_profiling()", "CALL statements are refused"),
    ("CHECKPOINT", "CALL statements are refused"),
    ("VACUUM", "VACUUM statements are refused"),
    ("SELECT * FROM checkpoint()", "FROM checkpoint"),
    ("SELECT * FROM enable_logging(storage = 'file', storage_path = '{home}/images')", "FROM enable_logging"),
    ("SELECT * FROM duckdb_secrets()", "FROM duckdb_secrets"),
]

ALLOWED = [
    "SELECT dataset, split, count(*) AS n FROM images GROUP BY ALL ORDER BY ALL",
    "SELECT country, count(*) FILTER (WHERE split = 'train') AS train, count(*) AS n FROM images GROUP BY country",
    "SELECT image_id, row_number() OVER (PARTITION BY dataset ORDER BY source_uri) AS rn FROM images",
    "SELECT * FROM images QUALIFY row_number() OVER (PARTITION BY country ORDER BY image_id) = 1",
    "WITH per AS (SELECT dataset, count(*) AS n FROM images GROUP BY 1) SELECT * FROM per WHERE n > 0",
    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) SELECT * FROM r",
    "SELECT f.label, f.\"group\", i.country, i.split FROM features f JOIN images i USING (image_id, dataset)",
    "SELECT i.image_id FROM images i LEFT JOIN features f USING (image_id) WHERE f.image_id IS NULL",
    "SELECT s.status, count(*) FROM segmentations s JOIN images USING (image_id, dataset) GROUP BY 1",
    "SELECT 'images' AS t, count(*) AS n FROM images UNION ALL SELECT 'quarantine', count(*) FROM quarantine",
    "SELECT reason, count(*) AS n FROM quarantine GROUP BY reason HAVING count(*) >= 1",
    "SELECT list(country ORDER BY country) AS countries, avg(width) AS w FROM images",
    "FROM images SELECT country LIMIT 1",
    "EXPLAIN SELECT * FROM features WHERE \"group\" = 'vehicle'",
    "EXPLAIN ANALYZE SELECT count(*) FROM images",
    "DESCRIBE images",
    "SUMMARIZE features",
    "SHOW TABLES",
    "SELECT count(*) FROM read_parquet('{home}/images/**/*.parquet')",
    "SELECT * FROM range(3)",
    "SELECT view_name FROM duckdb_views() WHERE NOT internal",
    "select 1 /* ; drop view images */",
]


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> DataRoot:
    root = DataRoot(str(tmp_path_factory.mktemp("guard") / "home"))
    images = [image_row("a1" * 32, "g50"), image_row("b2" * 32, "g50", split="test"), image_row("c3" * 32, "bench")]
    commit(root, "g50", "s1", images=images[:2], quarantine=[{
        "source_uri": "/g50/Utah/x.jpg", "dataset": "g50", "stage": "ingest", "reason": "unknown_country",
        "detail": "Utah", "size_bytes": 1, "source_mtime": 1.0, "seen_at": NOW}])
    commit(root, "bench", "s2", images=images[2:])
    seg = "annotations@main-x"
    feature = {"feature_id": "f1", "image_id": "a1" * 32, "dataset": "g50", "split": "train", "country": "FR",
               "label": "car", "group": "vehicle", "score": 1.0, "bbox": [0, 0, 4, 4], "area": 16,
               "crop": {"bytes": b"x", "path": "f1.jpg"}, "crop_width": 4, "crop_height": 4,
               "segmenter": seg, "untrained": False, "created_at": NOW}
    outcome = {"image_id": "a1" * 32, "dataset": "g50", "segmenter": seg, "status": "ok", "crops": 1, "created_at": NOW}
    shards.commit_shard(root, "segment", "g50", "seg1", [
        shards.Output("features", {"segmenter": seg, "dataset": "g50", "group": "vehicle"}, to_table([feature], FEATURES)),
        shards.Output("segmentations", {"segmenter": seg, "dataset": "g50"}, to_table([outcome], SEGMENTATIONS))])
    refresh_catalog(root)
    Path(root.url, "..", "secret.txt").write_text("not for the catalog")
    return root


@pytest.fixture
def home(catalog, monkeypatch) -> DataRoot:
    monkeypatch.setenv("GEOFEAT_HOME", catalog.url)
    return catalog


def files(root: DataRoot) -> dict[str, int]:
    return {str(p): p.stat().st_size for p in Path(root.url).rglob("*") if p.is_file()}


@pytest.mark.parametrize("statement,reason", HOSTILE, ids=[h[0][:60] for h in HOSTILE])
def test_hostile_statements_are_refused_with_a_reason(home, tmp_path, statement, reason):
    before = files(home)
    res = runner.invoke(app, ["sql", statement.format(home=home.url, out=tmp_path)])
    assert res.exit_code == 2, res.output
    assert reason in res.output and ("query refused" in res.output or "does not exist" in res.output), res.output
    assert files(home) == before  # nothing written, not even inside the table folders
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("statement", ALLOWED)
def test_analytical_queries_are_allowed(home, statement):
    res = runner.invoke(app, ["sql", statement.format(home=home.url), "--format", "json"])
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.stdout)) >= 1


def test_the_tables_are_big_enough():
    assert len(HOSTILE) >= 30 and len(ALLOWED) >= 15


# ---------------------------------------------------------------- bounded (issue 13, finding 4)


def geofeat(home: DataRoot, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The CLI in a child process: a query that never ends fails this test instead of hanging it."""
    env = {**os.environ, "GEOFEAT_HOME": home.url, "PYTHONPATH": str(PROJECT)}
    try:
        return subprocess.run([sys.executable, "-c", "from flows.cli import main; main()", *args], env=env,
                              capture_output=True, text=True, timeout=timeout, cwd=home.url)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`geofeat {' '.join(args)}` ran past {timeout} s")


@pytest.mark.parametrize("statement", [
    "WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t) SELECT count(*) FROM t",
    "SELECT count(*) FROM range(1000000000000)",
])
def test_an_endless_query_is_stopped_at_its_time_limit(home, statement):
    started = time.monotonic()
    res = geofeat(home, "sql", statement, "--timeout", "2")
    assert res.returncode == 2 and "ran longer than 2 s" in res.stderr and "--timeout" in res.stderr, res.stderr
    assert time.monotonic() - started < 60  # 2 s of query plus the CLI's start


def test_memory_and_spill_are_bounded_under_the_data_root(home, tmp_path):
    settings = ("SELECT current_setting('memory_limit') AS mem, current_setting('max_temp_directory_size') AS spill, "
                "current_setting('temp_directory') AS tmp")
    default = json.loads(geofeat(home, "sql", settings, "--format", "json").stdout)[0]
    assert default["mem"] in ("1.8 GiB", "2.0 GB", "1.8GiB") and default["spill"] in ("7.4 GiB", "8.0 GB", "7.4GiB")
    assert default["tmp"].startswith(home.path("_tmp") + "/duckdb.tmp-")  # not ./.tmp of the current folder
    set_ = json.loads(geofeat(home, "sql", settings, "--format", "json", "--memory-limit", "512MB").stdout)[0]
    assert set_["mem"] in ("488.2 MiB", "512.0 MB", "488.2MiB")
    bad = geofeat(home, "sql", "SELECT 1", "--memory-limit", "lots")
    assert bad.returncode == 2 and "--memory-limit must be a size" in bad.stderr
    huge = geofeat(home, "sql", "SELECT * FROM range(30000000) t(i) ORDER BY hash(i)", "--memory-limit", "64MB",
                   "--temp-limit", "64MB", "--max-rows", "1")
    assert huge.returncode == 2 and "needs more than memory_limit=64MB" in huge.stderr, huge.stderr
    assert not [p for p in Path(home.path("_tmp")).iterdir()]  # each query's spill folder went with it


def test_every_format_prints_nested_columns(home):
    """`--format csv` crashed on any list or struct column (`SELECT feature_id, bbox FROM features`)."""
    query = "SELECT feature_id, bbox, crop, {'a': [1, 2]} AS s, map([1], ['x']) AS m FROM features"
    out = {fmt: geofeat(home, "sql", query, "--format", fmt) for fmt in ("table", "csv", "json")}
    assert all(r.returncode == 0 for r in out.values()), {f: r.stderr[-500:] for f, r in out.items()}
    row = next(csv.DictReader(io.StringIO(out["csv"].stdout)))
    assert json.loads(row["bbox"]) == [0, 0, 4, 4] and base64.b64decode(json.loads(row["crop"])["bytes"]) == b"x"
    assert json.loads(row["s"]) == {"a": [1, 2]}
    got = json.loads(out["json"].stdout)[0]
    assert got["bbox"] == [0, 0, 4, 4] and base64.b64decode(got["crop"]["bytes"]) == b"x"
    assert "f1" in out["table"].stdout


def test_a_long_result_is_cut_and_says_so(home):
    res = geofeat(home, "sql", "SELECT * FROM range(50) t(i)", "--format", "csv", "--max-rows", "10")
    assert res.returncode == 0 and len(res.stdout.splitlines()) == 11 and "the first 10 rows" in res.stderr
    whole = geofeat(home, "sql", "SELECT * FROM range(50) t(i)", "--format", "csv", "--max-rows", "0")
    assert len(whole.stdout.splitlines()) == 51 and whole.stderr == ""
