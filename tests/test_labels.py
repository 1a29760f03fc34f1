"""models/labels.py and the label-to-group data files in models/label_maps/."""

from __future__ import annotations

import json

import pytest

from models.labels import (
    ALL_GROUPS,
    GROUPS,
    LABEL_MAPS_DIR,
    LABEL_SETS,
    Label,
    LabelMap,
    is_instance_only,
    label_set_for_checkpoint,
    load_label_map,
)

# Number of classes in the HF checkpoints' config.id2label (ids 0..N-1).
HF_SIZES = {"coco_panoptic": 133, "cityscapes": 19, "mapillary_vistas": 65, "ade20k": 150}
# "thing" classes: COCO 80 things; Cityscapes person..bicycle; Vistas v1.2 panoptic isthing=1;
# ADE20K-150 panoptic (Mask2Former register_ade20k_panoptic.py) 100 things.
HF_THINGS = {"coco_panoptic": 80, "cityscapes": 8, "mapillary_vistas": 37, "ade20k": 100}


def test_label_sets_and_files_match():
    files = {p.stem for p in LABEL_MAPS_DIR.glob("*.json")}
    assert set(LABEL_SETS) <= files
    assert set(GROUPS) < set(ALL_GROUPS) and ALL_GROUPS[-1] == "drop"


@pytest.mark.parametrize("name", LABEL_SETS)
def test_every_label_set_loads_and_is_well_formed(name):
    lm = load_label_map(name)
    assert lm.name == name
    assert lm.source.strip()
    assert len(lm) == len(lm.labels) > 0
    assert all(isinstance(lab, Label) for lab in lm)
    assert all(lab.group in ALL_GROUPS for lab in lm)
    assert len(set(lm.ids())) == len(lm)
    assert len(set(lm.names())) == len(lm)
    for lab in lm:
        assert lm.by_id(lab.id) is lab
        assert lm.label(lab.name) is lab
        assert lm.group_of(lab.name) == lab.group
    # every expert group gets crops from every set (ADE20K has no bollard/hydrant, but its
    # pole/streetlight/signboard/traffic light are furniture; Cityscapes: pole, traffic light/sign)
    for group in GROUPS:
        assert lm.in_group(group), f"{name}: group {group!r} is empty"


@pytest.mark.parametrize("name,size", sorted(HF_SIZES.items()))
def test_hf_label_sets_have_contiguous_ids(name, size):
    lm = load_label_map(name)
    assert lm.ids() == tuple(range(size))
    assert sum(lab.isthing for lab in lm) == HF_THINGS[name]


def test_demo_matches_the_file_it_was_read_from():
    lm = load_label_map("demo")
    raw = json.loads((LABEL_MAPS_DIR / "demo.json").read_text())
    assert [(lab.id, lab.name, lab.isthing, lab.group) for lab in lm] == \
        [(d["id"], d["name"], d["isthing"], d["group"]) for d in raw["labels"]]


SPOT = {
    "cityscapes": {"road": "ground", "sidewalk": "ground", "terrain": "ground", "building": "structure",
                   "fence": "structure", "vegetation": "vegetation", "car": "vehicle", "bicycle": "vehicle",
                   "pole": "furniture", "traffic sign": "furniture", "traffic light": "furniture",
                   "sky": "drop", "person": "drop", "rider": "drop"},
    "mapillary_vistas": {"Road": "ground", "Curb": "ground", "Lane Marking - General": "ground",
                         "Crosswalk - Plain": "ground", "Terrain": "ground", "Building": "structure",
                         "Wall": "structure", "Vegetation": "vegetation", "Car": "vehicle", "Boat": "vehicle",
                         "Pole": "furniture", "Utility Pole": "furniture", "Traffic Sign (Front)": "furniture",
                         "Traffic Sign (Back)": "furniture", "Guard Rail": "furniture", "Barrier": "furniture",
                         "Sky": "drop", "Person": "drop", "Bicyclist": "drop", "Water": "drop",
                         "Ego Vehicle": "drop", "Car Mount": "drop", "Bird": "drop"},
    "coco_panoptic": {"road": "ground", "pavement-merged": "ground", "dirt-merged": "ground",
                      "building-other-merged": "structure", "house": "structure", "wall-other-merged": "structure",
                      "tree-merged": "vegetation", "grass-merged": "vegetation", "car": "vehicle",
                      "truck": "vehicle", "traffic light": "furniture", "stop sign": "furniture",
                      "fire hydrant": "furniture", "sky-other-merged": "drop", "person": "drop", "dog": "drop",
                      "toothbrush": "drop", "water-other": "drop"},
    "ade20k": {"road": "ground", "sidewalk": "ground", "earth": "ground", "building": "structure",
               "house": "structure", "skyscraper": "structure", "tree": "vegetation", "grass": "vegetation",
               "plant": "vegetation", "car": "vehicle", "bus": "vehicle", "pole": "furniture",
               "streetlight": "furniture", "signboard": "furniture", "traffic light": "furniture",
               "sky": "drop", "person": "drop", "bed ": "drop", "water": "drop"},
    "demo": {"road": "ground", "building": "structure", "vegetation": "vegetation", "car": "vehicle",
             "pole": "furniture", "traffic-sign": "furniture", "bollard": "furniture", "sky": "drop"},
}


@pytest.mark.parametrize("name", sorted(SPOT))
def test_spot_checks(name):
    lm = load_label_map(name)
    for label, group in SPOT[name].items():
        assert lm.group_of(label) == group, f"{name}: {label!r}"


def test_exact_hf_strings_and_ids():
    ade, coco = load_label_map("ade20k"), load_label_map("coco_panoptic")
    vistas, city = load_label_map("mapillary_vistas"), load_label_map("cityscapes")
    assert ade.by_id(7).name == "bed "  # the HF config's odd trailing space
    assert [ade.by_id(i).name for i in (0, 1, 2, 6, 87, 93, 149)] == \
        ["wall", "building", "sky", "road", "streetlight", "pole", "flag"]
    assert [coco.by_id(i).name for i in (0, 79, 80, 119, 132)] == \
        ["person", "toothbrush", "banner", "sky-other-merged", "rug-merged"]
    assert coco.by_id(79).isthing and not coco.by_id(80).isthing
    assert [vistas.by_id(i).name for i in (0, 13, 40, 50, 63, 64)] == \
        ["Bird", "Road", "Mailbox", "Traffic Sign (Front)", "Car Mount", "Ego Vehicle"]
    assert vistas.by_id(58).name == "On Rails" and not vistas.by_id(58).isthing
    assert city.names()[:3] == ("road", "sidewalk", "building") and city.by_id(18).name == "bicycle"


def test_lookup_is_exact_first_then_case_and_whitespace_insensitive():
    ade = load_label_map("ade20k")
    assert ade.label("bed ").name == "bed "
    assert ade.group_of("bed") == "drop" and ade.group_of("  BED") == "drop"
    assert ade.group_of("Traffic  Light") == "furniture"
    assert "bed" in ade and "Bed " in ade and "bollard" not in ade and 3 not in ade
    vistas = load_label_map("mapillary_vistas")
    assert vistas.group_of("road") == "ground" and vistas.group_of("traffic sign (front)") == "furniture"
    assert vistas.get_group("bollard") is None and vistas.get_group("bollard", "drop") == "drop"


def test_unknown_label_and_id_raise_keyerror_naming_the_set():
    lm = load_label_map("cityscapes")
    with pytest.raises(KeyError, match="bollard.*cityscapes"):
        lm.group_of("bollard")
    with pytest.raises(KeyError, match="cityscapes"):
        lm.by_id(19)


def test_groups_partition_the_labels():
    for name in LABEL_SETS:
        lm = load_label_map(name)
        groups = lm.groups()
        assert tuple(groups) == ALL_GROUPS
        assert sorted(n for names in groups.values() for n in names) == sorted(lm.names())
        assert lm.name_to_group() == {lab.name: lab.group for lab in lm}
        assert lm.id_to_group() == {lab.id: lab.group for lab in lm}


def test_named_sets_are_cached_paths_are_read(tmp_path):
    assert load_label_map("ade20k") is load_label_map("ade20k")
    path = tmp_path / "copy.json"
    path.write_text((LABEL_MAPS_DIR / "demo.json").read_text())
    a, b = load_label_map(str(path)), load_label_map(path)
    assert a == b == load_label_map("demo") and a is not b


def _write(tmp_path, labels, **top):
    doc = {"name": "bad", "source": "test", "labels": labels, **top}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    return str(path)


GOOD = [{"id": 0, "name": "road", "isthing": False, "group": "ground"},
        {"id": 1, "name": "car", "isthing": True, "group": "vehicle"}]


@pytest.mark.parametrize("labels,message", [
    ([GOOD[0], {**GOOD[1], "id": 0}], r"duplicate id 0 \(labels 'road' and 'car'\)"),
    ([GOOD[0], {**GOOD[1], "name": "road"}], r"duplicate name 'road'"),
    ([GOOD[0], {**GOOD[1], "name": "Road "}], r"duplicate name 'Road '.*ignoring case and whitespace"),
    ([GOOD[0], {**GOOD[1], "group": "cars"}], r"label 'car' \(id 1\) has unknown group 'cars'"),
    ([GOOD[0], {"id": 1, "name": "car", "group": "vehicle"}], r"labels\[1\]: missing \['isthing'\]"),
    ([GOOD[0], {**GOOD[1], "id": "1"}], r"labels\[1\]: 'id' must be a non-negative integer"),
    ([GOOD[0], {**GOOD[1], "isthing": 1}], r"'isthing' must be true or false"),
    ([], r"'labels' must be a non-empty list"),
])
def test_bad_files_raise_valueerror_naming_the_problem(tmp_path, labels, message):
    path = _write(tmp_path, labels)
    with pytest.raises(ValueError, match=message) as err:
        load_label_map(path)
    assert "bad.json" in str(err.value)


def test_bad_documents(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_label_map(str(path))
    path.write_text(json.dumps({"source": "s", "labels": GOOD}))
    with pytest.raises(ValueError, match="missing key 'name'"):
        load_label_map(str(path))
    with pytest.raises(FileNotFoundError):
        load_label_map(str(tmp_path / "nope.json"))
    with pytest.raises(ValueError, match="unknown label set 'kitti'"):
        load_label_map("kitti")


def test_labelmap_constructor_validates():
    with pytest.raises(ValueError, match="unknown group 'sky'"):
        LabelMap("x", "s", (Label(0, "sky", False, "sky"),))
    with pytest.raises(ValueError, match="no labels"):
        LabelMap("x", "s", ())


@pytest.mark.parametrize("checkpoint,expected", [
    ("facebook/mask2former-swin-large-mapillary-vistas-panoptic", "mapillary_vistas"),
    ("facebook/mask2former-swin-large-mapillary-vistas-semantic", "mapillary_vistas"),
    ("facebook/mask2former-swin-tiny-cityscapes-panoptic", "cityscapes"),
    ("facebook/mask2former-swin-small-cityscapes-semantic", "cityscapes"),
    ("facebook/mask2former-swin-base-coco-panoptic", "coco_panoptic"),
    ("facebook/mask2former-swin-large-ade-semantic", "ade20k"),
    ("facebook/mask2former-swin-base-IN21k-ade-semantic", "ade20k"),
    ("/models/mask2former-swin-large-mapillary-vistas-panoptic/", "mapillary_vistas"),
    ("facebook/mask2former-swin-small-coco-instance", "coco_panoptic"),
    ("facebook/maskformer-swin-large-coco-stuff", None),     # 171 classes: not this label set
    ("some-org/upgraded-segmenter", None),                   # 'ade' inside a word is not ADE20K
    ("my/own-checkpoint", None),
])
def test_label_set_for_checkpoint(checkpoint, expected):
    assert label_set_for_checkpoint(checkpoint) == expected
    if expected is not None:
        assert expected in LABEL_SETS


@pytest.mark.parametrize("checkpoint,expected", [
    ("facebook/mask2former-swin-small-coco-instance", True),
    ("facebook/mask2former-swin-tiny-cityscapes-instance", True),
    ("/ckpt/mask2former-swin-small-coco-instance/", True),
    ("facebook/mask2former-swin-base-coco-panoptic", False),
    ("facebook/mask2former-swin-large-mapillary-vistas-panoptic", False),
    ("facebook/mask2former-swin-large-ade-semantic", False),
    ("/data/instance-models/mask2former-swin-tiny-cityscapes-panoptic", False),
])
def test_is_instance_only(checkpoint, expected):
    assert is_instance_only(checkpoint) is expected
