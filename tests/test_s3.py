"""The data root and the sources on S3: a real S3 protocol endpoint (moto's server) on 127.0.0.1.

Ingest, segment, SQL, train and evaluate run end to end with GEOFEAT_HOME=s3://...; the catalog
matches the same build on a local root, a rerun writes nothing, and the SQL guard holds.
"""

from __future__ import annotations

import re
import socket
import tempfile
from pathlib import Path

import duckdb
import fsspec
import pytest
import s3fs

from storage import catalog, sources
from storage.catalog import QueryRefused
from storage.layout import DataRoot

pytestmark = pytest.mark.server  # starts a real (S3) server

BUCKET = "geofeat"
HOME = f"s3://{BUCKET}/home"
WORLD = f"s3://{BUCKET}/world"
# seed 2: one of the 8 images lands in val (training refuses a selection without val crops)
DEMO = {"seed": 2, "countries": 2, "per_country": 4, "heldout_per_country": 1, "messy": True}
COUNTS = ("images", "quarantine", "features", "segmentations")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def endpoint():
    """moto's S3 server, reached the documented way: AWS_ENDPOINT_URL + credentials in the env."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
            mp.delenv(var, raising=False)
        mp.setenv("AWS_ENDPOINT_URL", url)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        s3fs.S3FileSystem.clear_instance_cache()  # instances remember the endpoint they were made with
        sources.url_fs(f"s3://{BUCKET}")[0].mkdir(BUCKET)
        yield url
        s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def _objects(url: str) -> dict[str, tuple]:
    """Every object under a URL: path -> (ETag, LastModified); a rewrite changes LastModified."""
    fs, path = sources.url_fs(url)
    return {p: (i.get("ETag"), i.get("LastModified")) for p, i in fs.find(path, detail=True).items()}


@pytest.fixture(scope="module")
def built(endpoint, prefect_harness, tmp_path_factory):
    """The demo world on S3, built into an S3 root and (as the reference) into a local root."""
    from flows.build_feature_datasets import build_feature_datasets
    from tasks.specs import CropSpec, DemoSpec, SegmenterSpec
    from tasks.demo_world.world import generate_demo_world

    # generate_demo_world cannot write to S3 yet (its recursive fs.mv of the temp folder fails
    # there), so the world is made locally and uploaded: the sources are still read from S3.
    local_world = tmp_path_factory.mktemp("world") / "world"
    demo = DemoSpec(**DEMO, out=WORLD)
    generate_demo_world(str(local_world), demo)
    sources.url_fs(WORLD)[0].put(f"{local_world}/", WORLD + "/", recursive=True)

    def build(home: str) -> dict:
        return build_feature_datasets(demo=demo, segmenter=SegmenterSpec(kind="annotations"),
                                      crops=CropSpec(min_area=40), home=home)

    local = DataRoot(str(tmp_path_factory.mktemp("local") / "home"))
    first = build(HOME)
    build(local.url)
    return {"root": DataRoot(HOME), "local": local, "build": build, "first": first}


def counts(root: DataRoot) -> dict[str, int]:
    return {t: catalog.query(root, f"SELECT count(*) AS n FROM {t}").column("n")[0].as_py() for t in COUNTS}


def test_build_on_s3_matches_the_same_build_on_a_local_root(built):
    root, local = built["root"], built["local"]
    assert built["first"]["catalog"] == f"{HOME}/catalog.sql"
    on_s3 = counts(root)
    assert on_s3 == counts(local)
    assert all(on_s3[t] > 0 for t in COUNTS), on_s3
    reasons = "SELECT reason, count(*) AS n FROM quarantine GROUP BY ALL ORDER BY ALL"
    assert catalog.query(root, reasons).to_pylist() == catalog.query(local, reasons).to_pylist()
    uris = catalog.query(root, "SELECT DISTINCT source_uri FROM images").column("source_uri").to_pylist()
    assert uris and all(u.startswith(f"{WORLD}/") for u in uris)
    shards = catalog.query(root, "SELECT DISTINCT filename FROM features").column("filename").to_pylist()
    assert shards and all(f.startswith(f"{HOME}/features/") for f in shards)


def test_no_temp_objects_remain_and_every_listed_shard_exists(built):
    root = built["root"]
    objects = {f"s3://{p}" for p in _objects(HOME)}
    assert not [p for p in objects if ".tmp-" in p]
    listed = set(re.findall(r"'(s3://[^']+\.parquet)'", root.fs.cat_file(root.catalog_sql).decode()))
    assert listed and listed <= objects
    assert any("/_commits/" in p for p in objects)


def test_a_rerun_writes_nothing(built):
    before = _objects(HOME)
    result = built["build"](HOME)
    assert result["segmented"]["crops"] == 0
    assert _objects(HOME) == before


HOSTILE = [
    "CREATE TABLE t AS SELECT 1",
    "DROP VIEW images",
    f"COPY (SELECT 1) TO 's3://{BUCKET}/x.csv'",
    f"COPY images TO '{HOME}/images/x.parquet'",
    f"ATTACH 's3://{BUCKET}/x.db' AS x",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SET enable_external_access = true",
    "SELECT 1; SELECT 2",
    "SELECT * FROM read_csv('/etc/passwd')",
    f"SELECT * FROM read_blob('{HOME}/catalog.sql')",
    f"SELECT * FROM read_blob('{WORLD}/world.json')",
    f"SELECT * FROM read_blob('{HOME}/images/../../world/world.json')",
    f"SELECT * FROM glob('s3://{BUCKET}/*')",
    "SELECT * FROM duckdb_extensions()",
]
ALLOWED = [
    "SELECT country, split, count(*) AS n FROM images GROUP BY ALL",
    "SELECT \"group\", count(*) FROM features GROUP BY ALL",
    "EXPLAIN SELECT * FROM quarantine",
]


def test_sql_guard_holds_on_s3(built):
    before = _objects(f"s3://{BUCKET}")
    for sql in ALLOWED:
        assert catalog.query(built["root"], sql).num_rows > 0, sql
    accepted = []
    for sql in HOSTILE:
        try:
            catalog.query(built["root"], sql)
            accepted.append(sql)
        except QueryRefused:
            pass
    assert accepted == []
    assert _objects(f"s3://{BUCKET}") == before


def test_duckdb_itself_cannot_write_through_the_registered_filesystem(built):
    """Below the statement check: the read-only connection's filesystem refuses writes, even under
    a table folder that allowed_directories opens for reading."""
    con = catalog.connect(built["root"], read_only=True)
    inside, outside = f"{HOME}/images/x.parquet", f"s3://{BUCKET}/x.parquet"
    try:
        with pytest.raises(duckdb.Error, match="the catalog is read-only"):
            con.execute(f"COPY (SELECT 1 AS x) TO '{inside}'")
        with pytest.raises(duckdb.PermissionException, match="disabled by configuration"):
            con.execute(f"COPY (SELECT 1 AS x) TO '{outside}'")
        assert con.sql("SELECT count(*) FROM images").fetchall()[0][0] > 0
    finally:
        con.close()
    assert not built["root"].fs.exists(inside) and not built["root"].fs.exists(outside)


def test_queries_need_no_extension(built):
    """Autoload/autoinstall are off on every connection: a query that needed httpfs would fail."""
    con = catalog.connect(built["root"])
    try:
        assert con.sql("SELECT current_setting('autoload_known_extensions')").fetchall() == [(False,)]
        assert con.sql("SELECT count(*) FROM features WHERE \"group\" = 'ground'").fetchall()[0][0] > 0
        httpfs = con.sql("SELECT loaded FROM duckdb_extensions() WHERE extension_name = 'httpfs'").fetchall()
        assert httpfs in ([], [(False,)])
    finally:
        con.close()


def test_endpoint_from_fsspec_configuration(built, endpoint, monkeypatch):
    """The alternative to AWS_ENDPOINT_URL: fsspec's own configuration (FSSPEC_S3_ENDPOINT_URL)."""
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", endpoint)
    monkeypatch.setattr(fsspec.config, "conf", {})
    fsspec.config.set_conf_env(fsspec.config.conf)  # what fsspec does with the environment at import
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        one = "SELECT count(*) AS n FROM features"
        assert catalog.query(DataRoot(HOME), one) == catalog.query(built["root"], one)
        assert len(sources.list_files(f"{WORLD}/g50")) > 0
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


def test_read_only_queries_on_roots_the_filesystem_spells_differently(built):
    """DuckDB checks allowed_directories against the paths as the registered filesystem spells
    them: s3:// for an s3a:// root, memory:///x for memory://x."""
    one = "SELECT count(*) AS n FROM images"
    assert catalog.query(DataRoot(f"s3a://{BUCKET}/home"), one) == catalog.query(built["root"], one)
    memory = DataRoot("memory://geofeat-test-s3/home")
    try:
        catalog.refresh_catalog(memory)
        assert catalog.query(memory, one).column("n")[0].as_py() == 0
        with pytest.raises(QueryRefused):
            catalog.query(memory, f"SELECT * FROM read_blob('{memory.catalog_sql}')")
    finally:
        memory.fs.rm("/geofeat-test-s3", recursive=True)


def test_objects_written_by_another_process_are_seen_at_once(endpoint):
    """No listing cache: a folder listed once must not hide a completion record written since."""
    root = DataRoot(f"s3://{BUCKET}/fresh")
    other = s3fs.S3FileSystem(skip_instance_cache=True)  # as another process would write
    folder = f"{BUCKET}/fresh/_commits/ingest/dataset=d"
    other.pipe_file(f"{folder}/a.json", b"{}")
    assert len(root.fs.ls(folder)) == 1
    other.pipe_file(f"{folder}/b.json", b"{}")
    assert root.fs.exists(f"{folder}/b.json") and len(root.fs.ls(folder)) == 2


def test_forked_dataloader_workers_read_from_s3(built):
    """The parent has used s3fs (its event loop, its sessions); forked workers read on their own."""
    import torch.multiprocessing as mp
    from torch.utils.data import DataLoader

    uris = [f.uri for f in sources.list_files(f"{WORLD}/g50")]
    sizes = DataLoader(uris, batch_size=None, num_workers=2, collate_fn=lambda u: len(sources.read_bytes(u)),
                       multiprocessing_context=mp.get_context("fork"), timeout=60)  # a hung worker fails
    assert list(sizes) == [len(sources.read_bytes(u)) for u in uris]


def test_a_missing_bucket_is_an_error_not_a_new_bucket(endpoint):
    with pytest.raises(FileNotFoundError, match="bucket 'no-such-bucket' does not exist"):
        DataRoot("s3://no-such-bucket/home").fs
    assert not sources.url_fs("s3://no-such-bucket")[0].exists("no-such-bucket")


def test_remote_checkpoints_are_mirrored_once_per_content(endpoint, tmp_path, monkeypatch):
    from models.hub import mirror_checkpoint

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the local cache lives under the temp dir
    url = f"s3://{BUCKET}/ckpt/best"
    fs = sources.url_fs(url)[0]
    fs.pipe({f"{url}/config.json": b"{}", f"{url}/model.safetensors": b"v1", f"{url}/sub/x.json": b"[]"})
    local = mirror_checkpoint(url, "experts.checkpoint", ValueError)
    assert local.startswith(str(tmp_path))
    assert sorted(str(p.relative_to(local)) for p in Path(local).rglob("*") if p.is_file()) == \
        ["config.json", "model.safetensors", "sub/x.json"]
    assert mirror_checkpoint(url, "experts.checkpoint", ValueError) == local
    fs.pipe_file(f"{url}/model.safetensors", b"v2")
    changed = mirror_checkpoint(url, "experts.checkpoint", ValueError)
    assert changed != local and Path(changed, "model.safetensors").read_bytes() == b"v2"
    with pytest.raises(ValueError, match="does not exist.*experts.checkpoint"):
        mirror_checkpoint(f"s3://{BUCKET}/ckpt/nothing", "experts.checkpoint", ValueError)


def test_experts_train_and_evaluate_on_s3(built, tmp_path, monkeypatch):
    from flows.evaluate import evaluate
    from tasks.specs import EvalSpec, TrainSpec
    from flows.train_experts import train_experts
    from models.hub import REMOTE_CACHE
    from tasks.train_experts import STAGE

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # local training dirs and checkpoint copies
    root = built["root"]
    spec = TrainSpec(checkpoint="tiny-random", groups=["ground"], baseline=True, epochs=1,
                     min_crops_per_country=1, num_workers=0)
    train_experts(spec, home=HOME)
    experts = catalog.query(root, "SELECT \"group\", expert_id, uri FROM experts ORDER BY ALL").to_pylist()
    assert [e["group"] for e in experts] == ["ground", "image"]
    for e in experts:
        assert e["uri"].startswith(f"{HOME}/checkpoints/")
        assert root.fs.exists(f"{e['uri']}/model.safetensors")
    # a registration lost after the upload: the retrain uploads to the same place again, not into best/best/
    record = root.commit_path(STAGE, "experts", experts[0]["expert_id"])
    root.fs.rm(record)
    train_experts(spec, home=HOME)
    assert root.fs.exists(record)  # trained, uploaded and registered again
    uploaded = sources.url_fs(experts[0]["uri"])[0].find(experts[0]["uri"])
    assert uploaded and not [p for p in uploaded if "/best/best/" in p]
    evaluate(EvalSpec(bootstrap=10, device="cpu", allow_untrained=True), home=HOME)
    metrics = catalog.query(root, "SELECT count(*) AS n FROM metrics WHERE metric = 'top1'").column("n")[0].as_py()
    assert metrics > 0
    assert len(list((tmp_path / REMOTE_CACHE).iterdir())) == 2  # evaluation loaded the s3:// experts
