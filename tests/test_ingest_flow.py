"""The `ingest` flow end to end on generated data, one test per layout plus the bad-input corpus."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from flows.ingest import ingest
from tasks.specs import IngestOptions, SourceSpec, SplitConfig
from helpers import image_bytes, write
from storage.catalog import connect
from test_validate import jpeg_with_broken_exif, png_with_declared_size

pytestmark = pytest.mark.usefixtures("prefect_harness")


def rotated_jpeg() -> bytes:
    img = Image.fromarray(np.zeros((30, 40, 3), np.uint8))
    exif = img.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes())
    return buf.getvalue()


def png16() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 24), 40000, np.uint16)).save(buf, "PNG")
    return buf.getvalue()


def g50_corpus(base) -> dict[str, str | None]:
    """A G50-layout tree with every kind of input. Maps rel path -> expected quarantine reason."""
    src = base / "compressed_dataset"
    big = image_bytes("JPEG", size=(320, 240), seed=9)
    files = {
        "France/canvas_1.jpg": (image_bytes("JPEG", seed=1), None),
        "France/canvas_2.JPG": (image_bytes("JPEG", seed=2), None),
        "France/sub/canvas_3.jpeg": (image_bytes("JPEG", seed=3), None),
        "Brasil/canvas_1.png": (image_bytes("PNG", mode="P", seed=4), None),
        "Brasil/canvas_2.webp": (image_bytes("WEBP", seed=5), None),
        "Brasil/canvas_3.png": (image_bytes("PNG", mode="RGBA", seed=6), None),
        "South Korea/cmyk.jpg": (image_bytes("JPEG", mode="CMYK", seed=7), None),
        "South Korea/gray.jpg": (image_bytes("JPEG", mode="L", seed=8), None),
        "South Korea/deep.png": (png16(), None),
        "England/rotated.jpg": (rotated_jpeg(), None),
        "England/empty.jpg": (b"", "empty_file"),
        "England/truncated.jpg": (big[: len(big) * 6 // 10], "truncated"),
        "England/notes.jpg": (b"shopping list\n" * 20, "not_an_image"),
        "England/bomb.png": (png_with_declared_size(60_000, 60_000), "decompression_bomb"),
        "England/exif.jpg": (jpeg_with_broken_exif(), "bad_exif"),
        "England/readme.txt": (b"hello", "not_an_image"),  # read like any file: the content decides
        "Utah/canvas_1.jpg": (image_bytes("JPEG", seed=10), "unknown_country"),
        "stray.jpg": (image_bytes("JPEG", seed=11), "no_country_folder"),
        "France/zz_copy.jpg": (image_bytes("JPEG", seed=1), "duplicate"),  # same bytes as canvas_1
    }
    for rel, (data, _) in files.items():
        write(src / rel, data)
    write(src / "France" / ".DS_Store", b"\x00\x01")  # OS litter: ignored, not an input
    return {str(src / rel): reason for rel, (_, reason) in files.items()}


def test_g50_every_input_is_accounted_for(tmp_path, root):
    expected = g50_corpus(tmp_path / "g50")
    write(tmp_path / "g50" / "compressed_dataset" / "Japan" / "huge.jpg", image_bytes("JPEG", size=(640, 480), seed=12))
    expected[str(tmp_path / "g50" / "compressed_dataset" / "Japan" / "huge.jpg")] = "too_large"
    summary = ingest(SourceSpec(layout="g50", source=str(tmp_path / "g50"), dataset="g50"),
                     IngestOptions(shard_size=4, max_bytes=100_000), home=root.url)
    assert summary["shards"] == 6  # 18 files to read in shards of 4, plus the listing rejections
    con = connect(root)
    images = dict(con.sql("SELECT source_uri, country FROM images").fetchall())
    quarantined = dict(con.sql("SELECT source_uri, reason FROM quarantine").fetchall())
    assert set(images) | set(quarantined) == set(expected)
    assert not set(images) & set(quarantined)
    assert quarantined == {uri: r for uri, r in expected.items() if r}
    assert {images[u] for u in images if "/France/" in u} == {"FR"}
    assert {images[u] for u in images if "/Brasil/" in u} == {"BR"}
    assert {images[u] for u in images if "/England/" in u} == {"GB"}
    assert {images[u] for u in images if "/South Korea/" in u} == {"KR"}
    w, h = con.sql("SELECT width, height FROM images WHERE source_uri LIKE '%rotated.jpg'").fetchall()[0]
    assert (w, h) == (30, 40)  # EXIF orientation 6 swaps the stored 40x30
    detail = con.sql("SELECT detail FROM quarantine WHERE reason = 'unknown_country'").fetchall()[0][0]
    assert "Utah" in detail


def test_rerun_is_a_no_op_and_new_files_are_incremental(tmp_path, root):
    src = tmp_path / "g50"
    for i in range(6):
        write(src / "Japan" / f"canvas_{i}.jpg", image_bytes("JPEG", seed=100 + i))
    spec = SourceSpec(layout="g50", source=str(src), dataset="jp")
    first = ingest(spec, IngestOptions(shard_size=4), home=root.url)
    assert (first["shards"], first["images"]) == (2, 6)
    before = {p: os.stat(p).st_mtime_ns for p in root.fs.find(root.url)}
    second = ingest(spec, IngestOptions(shard_size=4), home=root.url)
    assert (second["shards"], second["images"], second["quarantined"]) == (0, 0, 0)
    after = {p: os.stat(p).st_mtime_ns for p in root.fs.find(root.url)}
    assert after == before  # nothing rewritten, catalog.sql included
    write(src / "Japan" / "canvas_new.jpg", image_bytes("JPEG", seed=200))
    third = ingest(spec, IngestOptions(shard_size=4), home=root.url)
    assert (third["shards"], third["images"]) == (1, 1)
    assert connect(root).sql("SELECT count(*) FROM images WHERE dataset = 'jp'").fetchall() == [(7,)]


def test_overwrite_mode_redoes_a_dataset(tmp_path, root):
    src = tmp_path / "g50"
    write(src / "Peru" / "a.jpg", image_bytes("JPEG", seed=300))
    spec = SourceSpec(layout="g50", source=str(src), dataset="pe")
    ingest(spec, home=root.url)
    again = ingest(spec, IngestOptions(mode="overwrite"), home=root.url)
    assert again["images"] == 1
    assert connect(root).sql("SELECT count(*) FROM images_all WHERE dataset = 'pe'").fetchall() == [(1,)]


def write_csv(path, header: str, rows: list[str]):
    write(path, (header + "\n" + "\n".join(rows) + "\n").encode())


def test_im2gps_country_comes_from_coordinates(tmp_path, root):
    imgs = tmp_path / "im2gps" / "images"
    names = ["Moscow_00007_a.jpg", "Montana_00013_b.jpg", "venice_00016_c.jpg", "Tonga_00002_d.jpg",
             "hk_e.jpg", "sea_f.jpg", "range_g.jpg", "swap_h.jpg"]
    for i, n in enumerate(names):
        write(imgs / n, image_bytes("JPEG", seed=400 + i))
    rows = ["Moscow_00007_a.jpg,a@N00,46.73,-117.00", "Montana_00013_b.jpg,b@N00,40.42,-3.70",
            "venice_00016_c.jpg,c@N00,33.99,-118.47", "Tonga_00002_d.jpg,d@N00,-41.29,174.78",
            "hk_e.jpg,e@N00,22.28,114.16", "sea_f.jpg,f@N00,0.0,-30.0", "range_g.jpg,g@N00,95.0,200.0",
            "swap_h.jpg,h@N00,123.4,10.0", "missing_i.jpg,i@N00,10,10"]
    write_csv(tmp_path / "im2gps" / "gt.csv", "IMG_ID,AUTHOR,LAT,LON,S3_Label", [r + ",1" for r in rows])
    summary = ingest(SourceSpec(layout="im2gps", source=str(tmp_path / "im2gps" / "gt.csv"), dataset="im2gps"),
                     home=root.url)
    assert summary["warnings"] == []
    con = connect(root)
    got = {u.rsplit("/", 1)[1]: (c, s) for u, c, s in con.sql("SELECT source_uri, country, split FROM images").fetchall()}
    assert got == {"Moscow_00007_a.jpg": ("US", "test"), "Montana_00013_b.jpg": ("ES", "test"),
                   "venice_00016_c.jpg": ("US", "test"), "Tonga_00002_d.jpg": ("NZ", "test"),
                   "hk_e.jpg": ("HK", "test")}
    reasons = {u.rsplit("/", 1)[1]: r for u, r in con.sql("SELECT source_uri, reason FROM quarantine").fetchall()}
    assert reasons == {"sea_f.jpg": "no_country_at_coordinates", "range_g.jpg": "coordinates_out_of_range",
                       "swap_h.jpg": "ambiguous_coordinates", "missing_i.jpg": "missing_file"}


def test_im2gps_swapped_headers_are_fixed_with_a_warning(tmp_path, root):
    pts = [(40.71, -74.0), (34.05, -118.24), (41.88, -87.63), (29.76, -95.37), (39.74, -104.99),
           (47.61, -122.33), (-33.87, 151.21), (35.68, 139.69), (-23.55, -46.63), (19.43, -99.13),
           (28.61, 77.21), (55.75, 37.62)]
    rows = []
    for i, (lat, lon) in enumerate(pts):
        write(tmp_path / "images" / f"p{i}.jpg", image_bytes("JPEG", seed=500 + i))
        rows.append(f"p{i}.jpg,x,{lon},{lat}")  # values swapped under the LAT,LON header
    write_csv(tmp_path / "swapped.csv", "IMG_ID,AUTHOR,LAT,LON", rows)
    summary = ingest(SourceSpec(layout="im2gps", source=str(tmp_path / "swapped.csv"), dataset="swapped"),
                     home=root.url)
    assert len(summary["warnings"]) == 1 and "swapped" in summary["warnings"][0]
    countries = dict(connect(root).sql("SELECT source_uri, country FROM images").fetchall())
    assert countries[str(tmp_path / "images" / "p0.jpg")] == "US"
    assert countries[str(tmp_path / "images" / "p11.jpg")] == "RU"
    assert len(countries) == len(pts)


def test_osv5m_reads_country_as_a_string(tmp_path, root):
    base = tmp_path / "osv5m"
    ids = ["1001", "1002", "1003", "1004", "1005"]
    for i, n in enumerate(ids):
        write(base / "images" / ("train" if i < 3 else "test") / "00" / f"{n}.jpg", image_bytes("JPEG", seed=600 + i))
    write_csv(base / "train.csv", "id,latitude,longitude,country",
              ["1001,-22.56,17.08,NA", "1002,48.85,2.35,", "1003,,,"])
    write_csv(base / "test.csv", "id,latitude,longitude,country,region", ["1004,1.0,1.0,ZZ,x", "1005,35.68,139.69,JP,y", "1006,1,1,JP,z"])
    ingest(SourceSpec(layout="osv5m", source=str(base), dataset="osv"), home=root.url)
    con = connect(root)
    got = {u.rsplit("/", 1)[1]: c for u, c in con.sql("SELECT source_uri, country FROM images").fetchall()}
    assert got == {"1001.jpg": "NA", "1002.jpg": "FR", "1005.jpg": "JP"}
    splits = dict(con.sql("SELECT regexp_extract(source_uri, '[^/]+$'), split FROM images").fetchall())
    assert splits["1005.jpg"] == "test"  # OSV-5M's own test set is never hashed into train
    name = con.sql("SELECT country_name FROM images WHERE country = 'NA'").fetchall()
    assert name == [("Namibia",)]
    reasons = {u.rsplit("/", 1)[1]: r for u, r in con.sql("SELECT source_uri, reason FROM quarantine").fetchall()}
    assert reasons == {"1003.jpg": "missing_label", "1004.jpg": "unknown_country", "1006.jpg": "missing_file"}


def test_g3_manifest_and_cross_dataset_duplicates_share_a_split(tmp_path, root):
    shared = image_bytes("JPEG", seed=700)
    write(tmp_path / "g3" / "a.jpg", shared)
    write(tmp_path / "g3" / "b.jpg", image_bytes("JPEG", seed=701))
    write(tmp_path / "g3" / "c.jpg", image_bytes("JPEG", seed=702))
    write_csv(tmp_path / "g3" / "manifest.csv", "path,country",
              ["a.jpg,Kazakstan", "b.jpg,England", "c.jpg,Utah", "d.jpg,France"])
    ingest(SourceSpec(layout="g3", source=str(tmp_path / "g3" / "manifest.csv"), dataset="g3",
                      split=SplitConfig(policy="train")), home=root.url)
    # The same bytes in a benchmark held out as test:
    write(tmp_path / "bench" / "Kazakhstan" / "x.jpg", shared)
    ingest(SourceSpec(layout="g50", source=str(tmp_path / "bench"), dataset="bench",
                      split=SplitConfig(policy="test")), home=root.url)
    con = connect(root)
    rows = con.sql("SELECT dataset, country, split, assigned_split FROM images WHERE source_uri LIKE '%a.jpg' "
                   "OR source_uri LIKE '%x.jpg' ORDER BY dataset").fetchall()
    assert rows == [("bench", "KZ", "test", "test"), ("g3", "KZ", "test", "train")]
    leaks = con.sql("SELECT image_id FROM images GROUP BY image_id HAVING count(DISTINCT split) > 1").fetchall()
    assert leaks == []
    reasons = {u.rsplit("/", 1)[1]: r for u, r in con.sql("SELECT source_uri, reason FROM quarantine").fetchall()}
    assert reasons == {"c.jpg": "unknown_country", "d.jpg": "missing_file"}


def test_manifest_names_that_match_several_files_are_not_guessed(tmp_path, root):
    write(tmp_path / "imgs" / "France" / "1.jpg", image_bytes("JPEG", seed=900))
    write(tmp_path / "imgs" / "Spain" / "1.jpg", image_bytes("JPEG", seed=901))
    write_csv(tmp_path / "m.csv", "path,country", ["data/France/1.jpg,France", "Spain/1.jpg,Spain"])
    ingest(SourceSpec(layout="g3", source=str(tmp_path / "m.csv"), images=str(tmp_path / "imgs"), dataset="amb"),
           home=root.url)
    con = connect(root)
    assert con.sql("SELECT regexp_extract(source_uri, '[^/]+/[^/]+$'), country FROM images").fetchall() == [("Spain/1.jpg", "ES")]
    assert con.sql("SELECT reason FROM quarantine").fetchall() == [("missing_file",)]


def test_malformed_csv_is_a_clear_configuration_error(tmp_path, root):
    write(tmp_path / "bad.csv", "IMG_ID,LAT,LON\nZürich.jpg,47.3,8.5\n".encode("latin-1"))
    with pytest.raises(ValueError, match="bad.csv: not a readable CSV"):
        ingest(SourceSpec(layout="im2gps", source=str(tmp_path / "bad.csv"), dataset="bad"), home=root.url)


def test_missing_images_are_reported_not_a_crash(tmp_path, root):
    """Like the real IM2GPS ground-truth CSVs: the images were never downloaded."""
    write_csv(tmp_path / "gt.csv", "IMG_ID,AUTHOR,LAT,LON", [f"img_{i}.jpg,a,{10 + i},{10 + i}" for i in range(5)])
    summary = ingest(SourceSpec(layout="im2gps", source=str(tmp_path / "gt.csv"), dataset="empty"), home=root.url)
    assert (summary["images"], summary["quarantined"]) == (0, 5)
    assert connect(root).sql("SELECT DISTINCT reason FROM quarantine").fetchall() == [("missing_file",)]


def test_configuration_errors_name_the_field(tmp_path, root):
    with pytest.raises(ValueError, match="source.source: .* does not exist"):
        ingest(SourceSpec(layout="g50", source=str(tmp_path / "nope"), dataset="x"), home=root.url)


def test_transient_read_errors_are_retried(tmp_path, root, monkeypatch):
    from storage import sources

    write(tmp_path / "src" / "Chile" / "a.jpg", image_bytes("JPEG", seed=800))
    real, calls = sources.read_bytes, []

    def flaky(uri, **kw):
        calls.append(uri)
        if len(calls) == 1:
            raise ConnectionError("connection reset by peer")
        return real(uri, **kw)

    monkeypatch.setattr(sources, "read_bytes", flaky)
    summary = ingest(SourceSpec(layout="g50", source=str(tmp_path / "src"), dataset="cl"), home=root.url)
    assert summary["images"] == 1 and len(calls) == 2


def test_bugs_are_not_retried(tmp_path, root, monkeypatch):
    from storage import sources

    write(tmp_path / "src" / "Chile" / "a.jpg", image_bytes("JPEG", seed=801))
    calls = []

    def broken(uri, **kw):
        calls.append(uri)
        raise KeyError("a bug, not a flaky disk")

    monkeypatch.setattr(sources, "read_bytes", broken)
    with pytest.raises(KeyError):
        ingest(SourceSpec(layout="g50", source=str(tmp_path / "src"), dataset="cl2"), home=root.url)
    assert len(calls) == 1
    assert not root.fs.exists(root.path("_commits", "ingest", "dataset=cl2"))  # nothing half-written
