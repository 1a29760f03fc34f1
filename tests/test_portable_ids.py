"""Issue 13, finding 7: segmenter (and so expert) ids never hash the absolute data root.

The annotations segmenter's id hashed the annotation paths under GEOFEAT_HOME, so moving or copying
a data root re-segmented everything. It now hashes the panoptic JSON's content and the PNG folder and
image root relative to the JSON's folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import EXPERT_DEMO
from storage.catalog import query
from storage.layout import DataRoot
from tasks.segment import plan_segment, segmenter_id
from tasks.specs import AnnotationSource, CropSpec, DemoSpec, SegmenterSpec, TrainSpec
from tasks.train_experts import run_id

CROPS = CropSpec(min_area=40)  # what demo_catalog was built with


def demo_segmenter(root: DataRoot) -> SegmenterSpec:
    world = root.path("demo-world")  # the default: inside the data root
    return SegmenterSpec(kind="annotations", annotations=DemoSpec(**EXPERT_DEMO).annotations(world))


def test_a_copied_data_root_keeps_its_segmenter_and_expert_ids(demo_catalog, tmp_path):
    copy = DataRoot(str(tmp_path / "elsewhere" / "home"))
    shutil.copytree(demo_catalog.url, copy.url, ignore=shutil.ignore_patterns("prefect"))
    here, there = segmenter_id(demo_segmenter(demo_catalog), CROPS), segmenter_id(demo_segmenter(copy), CROPS)
    assert here == there
    assert run_id(TrainSpec(), here) == run_id(TrainSpec(), there)
    assert plan_segment(copy, "demo", there, 64) == []  # nothing to segment again in the copy
    assert plan_segment(copy, "demo", there + "x", 64) != []  # (while another id would redo it all)
    # its catalog.sql, copied along, named the first root's files: the read-only query reads the copy's
    assert query(copy, "SELECT count(*) AS n FROM features").column("n")[0].as_py() > 0
    assert f"-- Data root: {copy.url}\n" in Path(copy.catalog_sql).read_text()


def source(folder, content: bytes) -> AnnotationSource:
    (folder / "panoptic").mkdir(parents=True, exist_ok=True)
    (folder / "panoptic" / "set.json").write_bytes(content)
    return AnnotationSource(panoptic_json=str(folder / "panoptic" / "set.json"), png_dir=str(folder / "panoptic" / "set"),
                            images_root=str(folder / "images"))


COCO = json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "road"}]}).encode()


def test_annotation_ids_hash_content_and_layout_not_location(tmp_path):
    spec = lambda src: SegmenterSpec(kind="annotations", annotations={"demo": src})  # noqa: E731
    a = segmenter_id(spec(source(tmp_path / "a", COCO)), CROPS)
    assert a == "annotations@main-438f238895"  # golden: the content and relative layout, nothing else
    assert segmenter_id(spec(source(tmp_path / "deeper" / "b", COCO)), CROPS) == a
    changed = COCO.replace(b"road", b"street")
    assert segmenter_id(spec(source(tmp_path / "c", changed)), CROPS) != a  # new masks: a new version
    moved_pngs = source(tmp_path / "d", COCO).model_copy(update={"png_dir": str(tmp_path / "d" / "pngs")})
    assert segmenter_id(spec(moved_pngs), CROPS) != a  # another layout
    assert segmenter_id(SegmenterSpec(kind="annotations"), CROPS) == "annotations@main-afc81d0f77"  # unchanged


def test_missing_annotations_are_a_configuration_error(tmp_path):
    missing = AnnotationSource(panoptic_json=str(tmp_path / "nope.json"), png_dir=str(tmp_path), images_root=str(tmp_path))
    with pytest.raises(ValueError, match="segmenter.annotations.demo.panoptic_json: .* does not exist"):
        segmenter_id(SegmenterSpec(kind="annotations", annotations={"demo": missing}), CROPS)
