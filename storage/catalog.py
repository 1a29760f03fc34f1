"""The DuckDB catalog: views over committed Parquet shards, and a read-only SQL runner.

Only views, never a persistent .duckdb file (its format changes across DuckDB versions).
`catalog.sql` under the data root holds the same view definitions, so any DuckDB client
can run `duckdb -init $GEOFEAT_HOME/catalog.sql`.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import tempfile
import threading
import uuid
from dataclasses import dataclass

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from storage.layout import DataRoot
from storage.schema import TABLES
from storage.publish import temp_name
from storage.shards import atomic_write, read_commits, retry_io
from storage.sources import url_fs

log = logging.getLogger(__name__)

SPLIT_RANK = "CASE split WHEN 'test' THEN 3 WHEN 'val' THEN 2 ELSE 1 END"

# Views built on the raw `<table>_all` views:
# - `image_copies`: the latest row per (dataset, source_uri), so a file re-ingested after it
#   changed replaces its old row, ranked among the copies of the same bytes;
# - `images`: the first copy per (dataset, image_id), with one split per image_id across all
#   datasets (test > val > train), so the same bytes never sit in two splits;
# - `quarantine`: what a stage refused (for ingest: the latest refusal per file, minus files
#   ingested after all, and minus unlistable folders whose files were ingested since), plus later
#   copies of the same bytes in one dataset, as `duplicate` (or `duplicate_conflicting_label`
#   when the copies' countries differ: the first copy's label is used, and the detail names both);
# - `features`: crops whose image is in `images`, taking split and country from the image;
# - `segmentations`: the latest outcome per (segmenter, dataset, image);
# - `experts`: the expert registry (flow `train-experts`); `predictions` / `metrics`: flow `evaluate`.
DERIVED_VIEWS = f"""
CREATE OR REPLACE VIEW image_copies AS
WITH latest AS (
  SELECT * FROM images_all
  QUALIFY row_number() OVER (PARTITION BY dataset, source_uri ORDER BY ingested_at DESC) = 1)
SELECT *,
  row_number() OVER (PARTITION BY dataset, image_id ORDER BY ingested_at, source_uri) AS copy_rank,
  first_value(source_uri) OVER (PARTITION BY dataset, image_id ORDER BY ingested_at, source_uri) AS first_uri,
  first_value(country) OVER (PARTITION BY dataset, image_id ORDER BY ingested_at, source_uri) AS first_country,
  max({SPLIT_RANK}) OVER (PARTITION BY image_id) AS split_rank
FROM latest;

CREATE OR REPLACE VIEW images AS
SELECT image_id, dataset,
  CASE split_rank WHEN 3 THEN 'test' WHEN 2 THEN 'val' ELSE 'train' END AS split,
  country, country_name, continent, lat, lon, source_uri, width, height, format,
  size_bytes, source_mtime, ingested_at, split AS assigned_split
FROM image_copies WHERE copy_rank = 1;

CREATE OR REPLACE VIEW quarantine AS
WITH refused AS (
  SELECT * FROM quarantine_all
  QUALIFY stage <> 'ingest'
    OR row_number() OVER (PARTITION BY dataset, stage, source_uri ORDER BY seen_at DESC, reason, detail) = 1)
SELECT source_uri, dataset, stage, reason, detail, seen_at FROM refused q
WHERE stage <> 'ingest' OR (NOT EXISTS (
    SELECT 1 FROM images_all i WHERE i.dataset = q.dataset AND i.source_uri = q.source_uri AND i.ingested_at > q.seen_at)
  AND NOT (q.reason = 'unlistable_folder' AND EXISTS (
    SELECT 1 FROM images_all i WHERE i.dataset = q.dataset AND starts_with(i.source_uri, q.source_uri || '/')
      AND i.ingested_at > q.seen_at)))
UNION ALL
SELECT source_uri, dataset, 'ingest' AS stage,
  CASE WHEN country = first_country THEN 'duplicate' ELSE 'duplicate_conflicting_label' END AS reason,
  'same bytes as ' || first_uri || ' (image_id ' || image_id || ')'
    || CASE WHEN country = first_country THEN ''
       ELSE ', labelled ' || first_country || ' there and ' || country || ' here; the image keeps ' || first_country END
    AS detail,
  ingested_at AS seen_at
FROM image_copies WHERE copy_rank > 1;

CREATE OR REPLACE VIEW features AS
SELECT f.* REPLACE (i.split AS split, i.country AS country)
FROM features_all f JOIN images i USING (image_id, dataset);

CREATE OR REPLACE VIEW segmentations AS
SELECT * FROM segmentations_all
QUALIFY row_number() OVER (PARTITION BY segmenter, dataset, image_id ORDER BY created_at DESC) = 1;

CREATE OR REPLACE VIEW segmenters AS
SELECT segmenter, dataset, count(*) AS images, sum(crops)::BIGINT AS crops,
  count(*) FILTER (WHERE status <> 'ok') AS images_without_crops, max(created_at) AS last_run
FROM segmentations GROUP BY ALL;

CREATE OR REPLACE VIEW experts AS
SELECT * FROM experts_all QUALIFY row_number() OVER (PARTITION BY expert_id ORDER BY created_at DESC) = 1;

CREATE OR REPLACE VIEW predictions AS SELECT * FROM predictions_all;

CREATE OR REPLACE VIEW metrics AS SELECT * FROM metrics_all;
"""

# `feature_meta`: the `features` view without the crop bytes, compacted into one file sorted by
# (segmenter, dataset, group, country) whenever the catalog changes. Metadata queries at a million
# crops then read one small file instead of joining thousands of shard footers to `images`
# (benchmarks/catalog_queries.py). Planners (fresh views) get the same columns from the live view.
META_COLUMNS = ('feature_id, image_id, dataset, split, country, label, "group", score, bbox, area, '
                "crop_width, crop_height, segmenter, untrained, created_at, filename")
META_QUERY = f'SELECT {META_COLUMNS} FROM features ORDER BY segmenter, dataset, "group", country, feature_id'
INDEX_DIR = "_index"
ROOT_LINE = "-- Data root: "  # catalog.sql names the root its paths are under


TMP_DIR = "_tmp"  # DuckDB's spill folders under the data root, one per connection, swept when dead


@dataclass(frozen=True)
class SqlLimits:
    """Bounds of one `geofeat sql` query; DuckDB's own defaults (80% of RAM, spilling up to 90% of
    the disk into ./.tmp, no time limit) are not sane for an interactive command."""

    timeout_s: float | None = 60.0  # s for the query, fetch included; None: no limit
    memory_limit: str = "2GB"  # DuckDB memory_limit; larger sorts and joins spill to temp_limit
    temp_limit: str = "8GB"  # DuckDB max_temp_directory_size, in the data root's _tmp/
    max_rows: int | None = None  # rows fetched; the CLI sets it (a result bigger than that is cut)


class QueryTimeout(RuntimeError):
    """A query ran past its time limit and was interrupted."""


class QueryTooLarge(RuntimeError):
    """A query needed more memory (and spill space) than its limits allow."""


def temp_dir(root: DataRoot) -> str:
    """A fresh spill folder for one DuckDB connection: under the data root's `_tmp/` (a remote
    root: the system temp folder), named after this process, so a killed process's is swept.
    DuckDB creates it on the first spill and removes it when the connection closes."""
    if root.is_local:
        base = posixpath.join(url_fs(root.url)[1], TMP_DIR)
    else:
        base = os.path.join(tempfile.gettempdir(), "geofeat-duckdb")
    os.makedirs(base, exist_ok=True)
    return temp_name(posixpath.join(base, "duckdb"))


def _duckdb(root: DataRoot) -> duckdb.DuckDBPyConnection:
    """An in-memory connection that never installs or loads an extension (offline that fails, and a
    remote root is read through the registered fsspec filesystem, never httpfs) and spills under
    the data root, never into the current folder."""
    return duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False,
                                  "temp_directory": temp_dir(root)})


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _read(root: DataRoot, path: str) -> bytes | None:
    """A small file's bytes, None if missing: one request on an object store (no exists + read)."""
    try:
        return root.fs.cat_file(path)
    except FileNotFoundError:
        return None


def _write_schema_files(root: DataRoot) -> None:
    """Empty Parquet files carrying each schema: views stay valid and typed with no data."""
    for name, schema in TABLES.items():
        path = root.schema_path(name)
        data = _read(root, path)
        if data is not None and pq.read_schema(pa.BufferReader(data)).equals(schema, check_metadata=False):
            continue
        atomic_write(root, path, lambda f, s=schema: pq.write_table(s.empty_table(), f))


def meta_path(root: DataRoot) -> str:
    return root.path(INDEX_DIR, "feature_meta.parquet")


def catalog_sql(root: DataRoot, *, index: bool = False) -> str:
    """The view definitions over every committed shard, as one SQL script (`index`: `feature_meta`
    reads the compacted file that refresh_catalog writes; else it is a live view)."""
    files: dict[str, list[str]] = {name: [] for name in TABLES}
    for record in read_commits(root):
        for table, rels in record.files.items():
            files.setdefault(table, []).extend(root.path(rel) for rel in rels)
    lines = [
        "-- geofeat catalog: DuckDB views over committed Parquet shards.",
        "-- Generated by `geofeat refresh` / every flow run; do not edit.",
        f"{ROOT_LINE}{root.url}",
    ]
    for table in TABLES:
        paths = [root.schema_path(table), *sorted(files[table])]
        listing = ",\n  ".join(_sql_str(p) for p in paths)
        # features also name their shard file, so a trainer can read crop bytes from it directly
        extra = ", filename = true" if table == "features" else ""
        lines.append(
            f"CREATE OR REPLACE VIEW {table}_all AS SELECT * FROM read_parquet([\n  {listing}\n], hive_partitioning = false{extra});"
        )
    lines.append(DERIVED_VIEWS.strip())
    meta = f"SELECT * FROM read_parquet({_sql_str(meta_path(root))})" if index else META_QUERY
    lines.append(f"CREATE OR REPLACE VIEW feature_meta AS {meta};")
    return "\n".join(lines) + "\n"


def _write_feature_meta(root: DataRoot) -> None:
    """Compact the live `feature_meta` query into one Parquet file: DuckDB streams it (the sort
    spills to disk), so memory stays bounded at any catalog size; then an atomic rename."""
    path = meta_path(root)
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    retry_io(root.fs.makedirs, posixpath.dirname(path), exist_ok=True, what=f"prepare {path}")
    con = _duckdb(root)
    try:
        if not root.is_local:
            con.register_filesystem(root.fs)
        con.execute(catalog_sql(root))
        con.execute(f"COPY ({META_QUERY}) TO {_sql_str(tmp)} (FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE 1048576)")
        retry_io(root.fs.mv, tmp, path, what=f"rename to {path}")  # transient storage errors, like shards
    finally:
        con.close()
        try:
            if root.fs.exists(tmp):
                root.fs.rm(tmp)
        except OSError:  # best effort: a leftover temp is invisible to the views
            pass


def refresh_catalog(root: DataRoot) -> str:
    """Rewrite catalog.sql from the completion records (only if it changed); returns the SQL."""
    _write_schema_files(root)
    sql = catalog_sql(root, index=True)
    data = sql.encode()
    if _read(root, root.catalog_sql) == data and root.fs.exists(meta_path(root)):
        return sql  # a no-op run rewrites nothing
    _write_feature_meta(root)  # before catalog.sql: the views never name a missing file
    atomic_write(root, root.catalog_sql, lambda f: f.write(data))
    log.info("catalog refreshed: %s", root.catalog_sql)
    return sql


class QueryRefused(ValueError):
    """A statement that would write, change settings or read outside the catalog."""


# Query nodes that only read; DuckDB 2 also parses COPY/INSERT/UPDATE/DELETE nodes inside CTEs.
READ_ONLY_NODES = {"SELECT_NODE", "SET_OPERATION_NODE", "RECURSIVE_CTE_NODE", "CTE_NODE"}
# FROM-clause functions a read-only query may call: readers (DuckDB confines their files to the
# catalog's folders), generators and introspection. Not `query()` or `json_execute_serialized_sql()`,
# which run SQL hidden in a string, nor the ones that change state (checkpoint, logging, resources).
TABLE_FUNCTIONS = {
    "read_parquet", "parquet_scan", "parquet_metadata", "parquet_file_metadata", "parquet_kv_metadata",
    "parquet_schema", "read_csv", "read_csv_auto", "read_json", "read_json_auto", "read_ndjson",
    "read_ndjson_auto", "read_json_objects", "read_ndjson_objects", "read_text", "read_blob", "glob", "sniff_csv",
    "range", "generate_series", "unnest", "repeat", "repeat_row", "json_each", "json_tree", "query_table",
    "histogram", "histogram_values", "duckdb_columns", "duckdb_constraints", "duckdb_databases", "duckdb_functions",
    "duckdb_keywords", "duckdb_schemas", "duckdb_settings", "duckdb_tables", "duckdb_types", "duckdb_views",
    "pragma_table_info", "pragma_show", "pragma_version",
}


FS_WRITE_METHODS = ("mkdir", "makedirs", "rm", "rm_file", "mv", "copy", "cp_file", "touch", "pipe_file", "put")


def _refuse(*_args, **_kwargs):
    raise PermissionError("the catalog is read-only")


def _duckdb_fs(root: DataRoot, read_only: bool):
    """The filesystem DuckDB reads a remote root through: a private instance of the root's.

    Its listing cache holds one listing of each table folder, taken after the view SQL was
    read (so it has every file the views name): DuckDB asks for each file's existence, size
    and mtime several times per query, answered from memory instead of a HEAD request each.
    read_only: every write method refuses, so DuckDB cannot write even under the table
    folders that `allowed_directories` opens for reading."""
    fs = type(root.fs)(**{**root.fs.storage_options, "use_listings_cache": True, "skip_instance_cache": True})
    present = {posixpath.basename(p.rstrip("/")) for p in fs.ls(root.url, detail=False)}
    for folder in present & {*TABLES, "_schema", INDEX_DIR}:
        fs.find(root.path(folder))
    if read_only:
        read_open = fs.open

        def open_for_reading(path, mode="rb", *args, **kwargs):
            if set(mode) - set("rbt"):
                _refuse()
            return read_open(path, mode, *args, **kwargs)

        fs.open = open_for_reading
        for name in FS_WRITE_METHODS:
            setattr(fs, name, _refuse)
    return fs


def connect(root: DataRoot, *, read_only: bool = False, fresh: bool = False,
            limits: SqlLimits | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the catalog views.

    `fresh` builds the views from the completion records now (for planners: nothing is
    written); otherwise from catalog.sql. With read_only, the database itself is locked
    down: file access only under the catalog's table folders, no extension install/load,
    and the configuration locked. On a remote root the same settings hold for the
    registered fsspec filesystem (docs/object-storage.md). `limits` bounds its memory and
    spill space (set before the configuration is locked).
    """
    if fresh:
        _write_schema_files(root)
        sql = catalog_sql(root)
    else:
        data = _read(root, root.catalog_sql)
        sql = None if data is None else data.decode()
        if sql is None or f"\n{ROOT_LINE}{root.url}\n" not in sql[:4096]:
            sql = refresh_catalog(root)  # none yet, or written for a root since moved or copied here
    con = _duckdb(root)
    if limits is not None:
        con.execute("SET memory_limit = ?", [limits.memory_limit])
        con.execute("SET max_temp_directory_size = ?", [limits.temp_limit])
    if not root.is_local:
        con.register_filesystem(_duckdb_fs(root, read_only))
    con.execute(sql)
    if read_only:
        dirs = {root.path(t) + "/" for t in [*TABLES, "_schema", INDEX_DIR]}
        if not root.is_local:  # also as the registered filesystem spells them (memory:///x, s3:// for s3a://)
            dirs |= {root.fs.unstrip_protocol(root.fs._strip_protocol(d)) + "/" for d in dirs}
        con.execute("SET allowed_directories = ?", [sorted(dirs)])
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    return con


def _one_statement(sql: str) -> duckdb.Statement:
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryRefused(f"could not parse the query: {exc}") from exc
    if len(statements) != 1:
        raise QueryRefused(f"exactly one statement is allowed, got {len(statements)}")
    return statements[0]


def _kind(statement: duckdb.Statement) -> str:
    try:
        return statement.type.name
    except ValueError:  # a statement type this duckdb's Python enum does not name (UPDATE EXTENSIONS)
        return "UNRECOGNISED"


def _explained(sql: str) -> str:
    """The statement inside `EXPLAIN [ANALYZE | (options)] <statement>`."""
    tokens = duckdb.tokenize(sql)
    spans = [(pos, sql[pos:tokens[i + 1][0] if i + 1 < len(tokens) else len(sql)].strip())
             for i, (pos, kind) in enumerate(tokens) if kind != duckdb.token_type.comment]
    i = 1  # spans[0] is EXPLAIN
    if i < len(spans) and spans[i][1].upper() in ("ANALYZE", "ANALYSE"):
        i += 1
    elif i < len(spans) and spans[i][1].startswith("("):
        depth = 0
        while i < len(spans):
            depth += spans[i][1].count("(") - spans[i][1].count(")")
            i += 1
            if depth <= 0:
                break
    return sql[spans[i][0]:] if i < len(spans) else ""


def _check_tree(sql: str) -> None:
    """Walk DuckDB's own parse tree of a SELECT: a COPY/INSERT/UPDATE/DELETE in a CTE
    (`WITH x AS (COPY ... TO ...) SELECT 1`) or a FROM function outside TABLE_FUNCTIONS is refused."""
    con = duckdb.connect()  # parse only: nothing is bound or run here
    try:
        tree = json.loads(con.execute("SELECT json_serialize_sql(?)", [sql]).fetchall()[0][0])
    finally:
        con.close()
    if tree.get("error"):
        raise QueryRefused(f"could not verify that the query only reads: {tree.get('error_message')}")
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        kind = node.get("type")
        if isinstance(kind, str) and kind.endswith("_NODE") and kind not in READ_ONLY_NODES:
            raise QueryRefused(f"{kind.removesuffix('_NODE').removesuffix('_QUERY')} inside a query is refused: "
                               "the catalog is read-only")
        if kind == "TABLE_FUNCTION":
            function = str(node["function"].get("function_name", "")).lower()
            if function not in TABLE_FUNCTIONS:
                raise QueryRefused(f"FROM {function}(...) is refused: the read-only catalog allows only readers, "
                                   "generators and introspection functions in FROM (query() and friends run SQL "
                                   "hidden in a string)")
        stack.extend(node.values())


def check_read_only(sql: str) -> str:
    """Accept exactly one SELECT (or EXPLAIN of one) that only reads; anything else is refused
    with the reason. DuckDB's own parser decides, never string matching."""
    statement = _one_statement(sql)
    kind = _kind(statement)
    if kind == "EXPLAIN":  # EXPLAIN ANALYZE runs its statement: it must pass like a bare one
        inner = _one_statement(_explained(statement.query))
        if _kind(inner) != "SELECT":
            raise QueryRefused(f"EXPLAIN {_kind(inner)} is refused: EXPLAIN a SELECT only")
        statement, kind = inner, "SELECT"
    if kind != "SELECT":
        raise QueryRefused(f"{kind} statements are refused: the catalog is read-only (SELECT or EXPLAIN only)")
    _check_tree(statement.query)
    return sql


@dataclass(frozen=True)
class QueryResult:
    table: pa.Table
    truncated: bool  # the query had more than limits.max_rows rows; `table` holds the first ones


def run_query(root: DataRoot, sql: str, params: list | None = None, limits: SqlLimits = SqlLimits()) -> QueryResult:
    """Run one read-only query over the catalog within `limits`: interrupted after timeout_s
    (DuckDB's interrupt, from a timer thread), within memory_limit and temp_limit, and cut after
    max_rows rows (streamed, so a huge result is never held whole)."""
    check_read_only(sql)
    con = connect(root, read_only=True, limits=limits)
    timer = None
    if limits.timeout_s is not None:
        timer = threading.Timer(limits.timeout_s, con.interrupt)
        timer.daemon = True
        timer.start()
    try:
        reader = con.sql(sql, params=params).to_arrow_reader()
        batches, rows, truncated = [], 0, False
        for batch in reader:
            if limits.max_rows is not None and rows + batch.num_rows > limits.max_rows:
                batches.append(batch.slice(0, limits.max_rows - rows))
                truncated = True
                break
            batches.append(batch)
            rows += batch.num_rows
        return QueryResult(pa.Table.from_batches(batches, schema=reader.schema), truncated)
    except duckdb.InterruptException as exc:
        raise QueryTimeout(f"the query ran longer than {limits.timeout_s:g} s and was stopped; narrow it "
                           "or raise the time limit (geofeat sql --timeout SECONDS)") from exc
    except duckdb.OutOfMemoryException as exc:
        raise QueryTooLarge(f"the query needs more than memory_limit={limits.memory_limit} and "
                            f"temp_limit={limits.temp_limit} of spill space; narrow it or raise the limit "
                            f"(geofeat sql --memory-limit 8GB). DuckDB: {str(exc).splitlines()[0]}") from exc
    except duckdb.PermissionException as exc:
        raise QueryRefused(f"refused by the read-only catalog: {exc}") from exc
    finally:
        if timer is not None:
            timer.cancel()
        con.close()


def query(root: DataRoot, sql: str, params: list | None = None, limits: SqlLimits = SqlLimits()) -> pa.Table:
    """Run one read-only query over the catalog (time and memory bounded) and return an Arrow table."""
    return run_query(root, sql, params, limits).table
