"""Tests for the embedded demo world (tasks/demo_world/): CPU only, small specs."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from tasks.demo_world.render import LABEL_MAP_PATH
from tasks.demo_world.styles import COUNTRIES
from tasks.demo_world.world import generate_demo_world
from tasks.specs import DemoSpec

SMALL = DemoSpec(seed=3, countries=3, per_country=4, heldout_per_country=2)
GROUPS = {"ground", "structure", "vegetation", "vehicle", "furniture", "drop"}


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _ids(png: Path) -> np.ndarray:
    a = np.asarray(Image.open(png), dtype=np.uint32)
    return a[..., 0] + 256 * a[..., 1] + 256 ** 2 * a[..., 2]


def _labels() -> dict[int, dict]:
    return {lab["id"]: lab for lab in json.loads(LABEL_MAP_PATH.read_text())["labels"]}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("small") / "world"
    return out, generate_demo_world(str(out), SMALL)


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("clean") / "world"
    spec = DemoSpec(seed=3, countries=3, per_country=4, heldout_per_country=2, messy=False)
    return out, generate_demo_world(str(out), spec)


# --------------------------------------------------------------------------- determinism


def test_same_spec_gives_identical_bytes(small, tmp_path):
    root, _ = small
    again = tmp_path / "again"
    generate_demo_world(str(again), SMALL)
    assert _hashes(root) == _hashes(again)


def test_other_seed_gives_other_images(small, tmp_path):
    root, _ = small
    other = tmp_path / "other"
    generate_demo_world(str(other), SMALL.model_copy(update={"seed": 4}))
    a, b = _hashes(root), _hashes(other)
    jpgs = [k for k in a if k.startswith(("g50/", "im2gps/images/")) and k in b]
    canvases = [k for k in jpgs if Path(k).stem.split("_")[-1].isdigit()]  # incl. g50/Utah
    assert len(canvases) == 12 + 1 and all(a[k] != b[k] for k in canvases)
    assert a["panoptic/g50/Japan/canvas_0.png"] != b["panoptic/g50/Japan/canvas_0.png"]


# --------------------------------------------------------------------------- layout


def test_g50_layout(clean):
    root, world = clean
    names = [c.name for c in COUNTRIES[:3]]
    assert sorted(p.name for p in (root / "g50").iterdir()) == sorted(names)
    for name in names:
        files = sorted(p.name for p in (root / "g50" / name).iterdir())
        assert files == sorted(f"canvas_{n}.jpg" for n in range(4))
        for f in files:
            assert (root / "panoptic" / "g50" / name / f).with_suffix(".png").exists()
    assert world["counts"]["g50_images"] == 12 and world["counts"]["im2gps_images"] == 6
    assert [c["name"] for c in world["countries"]] == names
    with Image.open(root / "g50" / names[0] / "canvas_0.jpg") as im:
        assert im.format == "JPEG" and im.size == (SMALL.width, SMALL.height)


def test_im2gps_csv_and_coordinates(clean):
    root, _ = clean
    with open(root / "im2gps" / "im2gps_demo.csv", newline="") as f:
        text = f.read()
    assert text.splitlines()[0] == "IMG_ID,AUTHOR,LAT,LON"
    rows = list(csv.DictReader(text.splitlines()))
    assert len(rows) == 3 * 2
    by_iso = {c.iso2: c for c in COUNTRIES}
    truth = {t["img_id"]: t["iso2"] for t in json.loads((root / "world.json").read_text())["heldout_truth"]}
    for row in rows:
        assert (root / "im2gps" / "images" / row["IMG_ID"]).is_file()
        assert row["IMG_ID"].endswith(".jpg")
        lat, lon = float(row["LAT"]), float(row["LON"])
        anchors = by_iso[truth[row["IMG_ID"]]].anchors
        assert any(abs(lat - a) <= 0.15 + 1e-6 and abs(lon - o) <= 0.15 + 1e-6 for a, o in anchors)


def test_decoy_prefix_never_names_own_country(small):
    root, world = small
    cities = {c.iso2: set(c.cities) for c in COUNTRIES}
    truth = world["heldout_truth"]
    assert len(truth) == 6
    for t in truth:
        prefix = t["img_id"].split("_")[0]
        assert prefix not in cities[t["iso2"]]
        assert any(prefix in cs for cs in cities.values())  # still a real-looking city


# --------------------------------------------------------------------------- panoptic


def test_label_map_groups():
    labels = _labels()
    assert sorted(labels) == list(range(1, 13))
    assert all(lab["group"] in GROUPS for lab in labels.values())


def test_panoptic_matches_png(small):
    root, _ = small
    labels = _labels()
    seen: set[int] = set()
    for split in ("g50", "im2gps"):
        seen |= _check_panoptic(root, split, labels)
    assert seen == set(labels), f"labels never drawn: {set(labels) - seen}"


def _check_panoptic(root: Path, split: str, labels: dict[int, dict]) -> set[int]:
    """Exact area/bbox on a few images; required groups on all. Returns category ids seen."""
    coco = json.loads((root / "panoptic" / f"{split}.json").read_text())
    assert {c["id"]: c["supercategory"] for c in coco["categories"]} == {
        i: lab["group"] for i, lab in labels.items()}
    seen: set[int] = set()
    for k, ann in enumerate(coco["annotations"]):
        image = coco["images"][k]
        assert image["id"] == ann["image_id"]
        ids = _ids(root / "panoptic" / split / ann["file_name"])
        assert ids.shape == (image["height"], image["width"])
        groups = set()
        for seg in ann["segments_info"]:
            assert seg["category_id"] in labels
            seen.add(seg["category_id"])
            groups.add(labels[seg["category_id"]]["group"])
            if k < 4:  # exact pixel check on a few images
                ys, xs = np.nonzero(ids == seg["id"])
                assert seg["area"] == len(ys) > 0
                assert seg["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        if k < 4:  # no pixel belongs to an unlisted segment
            assert set(np.unique(ids)) <= {s["id"] for s in ann["segments_info"]}
        assert {"ground", "structure", "vegetation"} <= groups, ann["file_name"]
    return seen


# --------------------------------------------------------------------------- messy extras


def test_messy_extras(small, monkeypatch):
    root, world = small
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)  # other code may relax it
    reasons = {m["path"]: m["reason"] for m in world["messy"]}
    names = [c.name for c in COUNTRIES[:3]]
    assert sorted(reasons.values()) == sorted([
        "unknown_country", "empty_file", "truncated", "not_an_image", "duplicate",
        "missing_file", "coordinates_out_of_range"])
    by_reason = {r: root / p for p, r in reasons.items()}
    assert by_reason["unknown_country"] == root / "g50" / "Utah" / "canvas_0.jpg"
    with Image.open(by_reason["unknown_country"]) as im:
        im.load()
    assert by_reason["empty_file"].stat().st_size == 0
    assert by_reason["empty_file"].parent.name == names[0]
    truncated = by_reason["truncated"].read_bytes()
    assert truncated[:2] == b"\xff\xd8" and not truncated.endswith(b"\xff\xd9")
    with pytest.raises(OSError):
        with Image.open(by_reason["truncated"]) as im:
            im.load()
    with pytest.raises(OSError):
        Image.open(by_reason["not_an_image"])
    dup = by_reason["duplicate"]
    assert dup.read_bytes() == (dup.parent / "canvas_0.jpg").read_bytes()
    assert not by_reason["missing_file"].exists()
    assert by_reason["coordinates_out_of_range"].is_file()
    rows = {r["IMG_ID"]: r for r in csv.DictReader(open(root / "im2gps" / "im2gps_demo.csv", newline=""))}
    assert by_reason["missing_file"].name in rows
    assert float(rows[by_reason["coordinates_out_of_range"].name]["LAT"]) == 123.4
    # messy files never get panoptic annotations
    annotated = set()
    for split in ("g50", "im2gps"):
        coco = json.loads((root / "panoptic" / f"{split}.json").read_text())
        annotated |= {im["file_name"] for im in coco["images"]}
    for path in reasons:
        rel = path.split("/", 1)[1].removeprefix("images/")
        assert rel not in annotated
    assert not (root / "panoptic" / "g50" / "Utah").exists()


def test_no_messy_extras_without_flag(clean):
    root, world = clean
    assert world["messy"] == []
    assert not (root / "g50" / "Utah").exists()
    assert not [p for p in (root / "g50").rglob("*") if p.is_file() and not p.stem.split("_")[1].isdigit()]
    assert len(list((root / "im2gps" / "images").iterdir())) == 6


# --------------------------------------------------------------------------- idempotence, atomicity


def test_idempotent_and_spec_mismatch(tmp_path):
    out = tmp_path / "world"
    spec = DemoSpec(countries=1, per_country=2, heldout_per_country=1)
    first = generate_demo_world(str(out), spec)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    second = generate_demo_world(str(out), spec)
    assert second == first == json.loads((out / "world.json").read_text())
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps
    other = DemoSpec(countries=1, per_country=3, heldout_per_country=1)
    with pytest.raises(ValueError, match="overwrite"):
        generate_demo_world(str(out), other)
    replaced = generate_demo_world(str(out), other, overwrite=True)
    assert replaced["spec"]["per_country"] == 3
    assert len(list((out / "g50" / COUNTRIES[0].name).glob("canvas_[0-9]*.jpg"))) == 3
    assert sorted(os.listdir(tmp_path)) == ["world"]  # no .tmp-/.old- leftovers


def test_refuses_foreign_directory(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("not a demo world")
    with pytest.raises(ValueError, match="overwrite"):
        generate_demo_world(str(out), DemoSpec(countries=1, per_country=1, heldout_per_country=0))
    assert (out / "keep.txt").exists()


def test_fsspec_url():
    import fsspec

    spec = DemoSpec(countries=1, per_country=1, heldout_per_country=1)
    world = generate_demo_world("memory://geofeat-demo-test/world", spec)
    fs = fsspec.filesystem("memory")
    assert fs.exists("/geofeat-demo-test/world/world.json")
    assert world["counts"]["g50_images"] == 1
    assert not [p for p in fs.ls("/geofeat-demo-test") if ".tmp-" in p["name"]]
    fs.rm("/geofeat-demo-test", recursive=True)


def test_flow_parameters_build_the_spec(tmp_path):
    from flows.build_feature_datasets import generate_demo_world_task

    out = tmp_path / "via-task"
    spec = DemoSpec(seed=1, countries=1, per_country=1, heldout_per_country=0, messy=False)
    assert generate_demo_world_task.fn(str(out) + "/", spec) == str(out)
    assert json.loads((out / "world.json").read_text())["spec"]["seed"] == 1


def test_spec_validation():
    with pytest.raises(ValueError):
        DemoSpec(countries=9)
    with pytest.raises(ValueError):
        DemoSpec(per_country=0)


# --------------------------------------------------------------------------- signal strength


def _loo_nearest_centroid(x: np.ndarray, y: np.ndarray) -> float:
    hits = 0
    for i in range(len(y)):
        rest = np.arange(len(y)) != i
        classes = np.unique(y[rest])
        centroids = np.stack([x[rest & (y == c)].mean(axis=0) for c in classes])
        hits += classes[np.argmin(((centroids - x[i]) ** 2).sum(axis=1))] == y[i]
    return hits / len(y)


def test_bollards_carry_strong_signal_cars_weak(tmp_path):
    """Mean colour of bollard pixels separates countries; of car pixels it barely does."""
    out = tmp_path / "signal"
    generate_demo_world(str(out), DemoSpec(seed=0, countries=6, per_country=10,
                                                heldout_per_country=0, messy=False))
    coco = json.loads((out / "panoptic" / "g50.json").read_text())
    by_name = {c["name"]: c["id"] for c in coco["categories"]}
    feats: dict[str, list] = {"bollard": [], "car": []}
    labels: dict[str, list] = {"bollard": [], "car": []}
    for image, ann in zip(coco["images"], coco["annotations"]):
        rgb = np.asarray(Image.open(out / "g50" / image["file_name"]), dtype=np.float32)
        ids = _ids(out / "panoptic" / "g50" / ann["file_name"])
        for name in feats:
            segs = [s["id"] for s in ann["segments_info"] if s["category_id"] == by_name[name]]
            mask = np.isin(ids, segs)
            if mask.sum() >= 10:
                feats[name].append(rgb[mask].mean(axis=0))
                labels[name].append(image["file_name"].split("/")[0])
    acc = {n: _loo_nearest_centroid(np.stack(feats[n]), np.array(labels[n])) for n in feats}
    assert min(len(v) for v in labels.values()) >= 30
    assert acc["bollard"] > 0.6, acc
    assert acc["car"] < acc["bollard"] - 0.3, acc
