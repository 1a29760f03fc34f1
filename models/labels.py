"""Segmenter labels -> feature groups, read from data files in models/label_maps/.

Every label set a segmenter can emit (the `config.id2label` of a Mask2Former checkpoint, or the
demo world's categories) has one JSON file:

    {"name": "...", "source": "<where the label list comes from>", "notes": "<optional>",
     "labels": [{"id": <model class id>, "name": "<exact label string>", "isthing": <bool>,
                 "group": "<one of ALL_GROUPS>"}, ...]}

`group` is the feature group an expert is trained on (GROUPS), or "drop" (sky, people, animals,
water, indoor objects, the ego vehicle...). The grouping policy is written in each file's "notes".

Pure Python: no torch, no transformers.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Mapping

GROUPS: tuple[str, ...] = ("ground", "structure", "vegetation", "vehicle", "furniture")  # one expert each
ALL_GROUPS: tuple[str, ...] = GROUPS + ("drop",)
LABEL_SETS: tuple[str, ...] = ("coco_panoptic", "cityscapes", "mapillary_vistas", "ade20k", "demo")

LABEL_MAPS_DIR = Path(__file__).resolve().parent / "label_maps"


def normalize_label(name: str) -> str:
    """Case- and whitespace-insensitive key: 'Bed ' -> 'bed', 'traffic  Light' -> 'traffic light'."""
    return " ".join(name.split()).casefold()


@dataclass(frozen=True)
class Label:
    id: int
    name: str
    isthing: bool
    group: str


@dataclass(frozen=True)
class LabelMap:
    """One segmenter label set. Constructing it validates it (ValueError naming the problem)."""

    name: str
    source: str
    labels: tuple[Label, ...]
    notes: str = ""
    _by_id: dict[int, Label] = field(init=False, repr=False, compare=False)
    _by_name: dict[str, Label] = field(init=False, repr=False, compare=False)
    _by_key: dict[str, Label] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        where = f"label set {self.name!r}"
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"label set: 'name' must be a non-empty string, got {self.name!r}")
        if not isinstance(self.source, str):
            raise ValueError(f"{where}: 'source' must be a string, got {self.source!r}")
        labels = tuple(self.labels)
        object.__setattr__(self, "labels", labels)
        if not labels:
            raise ValueError(f"{where}: no labels")
        by_id: dict[int, Label] = {}
        by_name: dict[str, Label] = {}
        by_key: dict[str, Label] = {}
        for lab in labels:
            if not isinstance(lab, Label):
                raise ValueError(f"{where}: not a Label: {lab!r}")
            if lab.group not in ALL_GROUPS:
                raise ValueError(f"{where}: label {lab.name!r} (id {lab.id}) has unknown group {lab.group!r}; "
                                 f"expected one of {ALL_GROUPS}")
            if lab.id in by_id:
                raise ValueError(f"{where}: duplicate id {lab.id} (labels {by_id[lab.id].name!r} and {lab.name!r})")
            if lab.name in by_name:
                raise ValueError(f"{where}: duplicate name {lab.name!r} (ids {by_name[lab.name].id} and {lab.id})")
            key = normalize_label(lab.name)
            if key in by_key:
                raise ValueError(f"{where}: duplicate name {lab.name!r}: same as {by_key[key].name!r} "
                                 f"ignoring case and whitespace (ids {by_key[key].id} and {lab.id})")
            by_id[lab.id], by_name[lab.name], by_key[key] = lab, lab, lab
        object.__setattr__(self, "_by_id", by_id)
        object.__setattr__(self, "_by_name", by_name)
        object.__setattr__(self, "_by_key", by_key)

    # ------------------------------------------------------------ construction

    @classmethod
    def from_dict(cls, data: Any, where: str = "label map") -> "LabelMap":
        """Build from the JSON document; every malformed field is a ValueError that says which."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
        for key in ("name", "source", "labels"):
            if key not in data:
                raise ValueError(f"{where}: missing key {key!r}")
        name, source, notes = data["name"], data["source"], data.get("notes", "")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{where}: 'name' must be a non-empty string, got {name!r}")
        if not isinstance(source, str):
            raise ValueError(f"{where}: 'source' must be a string, got {source!r}")
        if not isinstance(notes, str):
            raise ValueError(f"{where}: 'notes' must be a string, got {notes!r}")
        raw = data["labels"]
        if not isinstance(raw, list) or not raw:
            raise ValueError(f"{where}: 'labels' must be a non-empty list")
        labels = []
        for i, item in enumerate(raw):
            at = f"{where}: labels[{i}]"
            if not isinstance(item, Mapping):
                raise ValueError(f"{at}: expected an object, got {item!r}")
            missing = [k for k in ("id", "name", "isthing", "group") if k not in item]
            if missing:
                raise ValueError(f"{at}: missing {missing}")
            lid, lname, thing, group = item["id"], item["name"], item["isthing"], item["group"]
            if not isinstance(lid, int) or isinstance(lid, bool) or lid < 0:
                raise ValueError(f"{at}: 'id' must be a non-negative integer, got {lid!r}")
            if not isinstance(lname, str) or not lname.strip():
                raise ValueError(f"{at}: 'name' must be a non-empty string, got {lname!r}")
            if not isinstance(thing, bool):
                raise ValueError(f"{at} ({lname!r}): 'isthing' must be true or false, got {thing!r}")
            if not isinstance(group, str):
                raise ValueError(f"{at} ({lname!r}): 'group' must be a string, got {group!r}")
            labels.append(Label(lid, lname, thing, group))
        try:
            return cls(name=name, source=source, labels=tuple(labels), notes=notes)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    # ------------------------------------------------------------ lookups

    def label(self, name: str) -> Label:
        """The label called `name`: exact match first, then ignoring case and whitespace."""
        lab = self._by_name.get(name)
        if lab is None and isinstance(name, str):
            lab = self._by_key.get(normalize_label(name))
        if lab is None:
            raise KeyError(f"label {name!r} is not in label set {self.name!r} ({len(self.labels)} labels; "
                           f"source: {self.source[:120]})")
        return lab

    def group_of(self, name: str) -> str:
        """Group of the label called `name` (exact, then case/whitespace-insensitive); KeyError if unknown."""
        return self.label(name).group

    def get_group(self, name: str, default: str | None = None) -> str | None:
        """Like group_of, but `default` for labels this set does not have."""
        try:
            return self.group_of(name)
        except KeyError:
            return default

    def by_id(self, label_id: int) -> Label:
        try:
            return self._by_id[label_id]
        except KeyError:
            raise KeyError(f"no label with id {label_id!r} in label set {self.name!r}") from None

    def names(self) -> tuple[str, ...]:
        return tuple(lab.name for lab in self.labels)

    def ids(self) -> tuple[int, ...]:
        return tuple(lab.id for lab in self.labels)

    def in_group(self, group: str) -> tuple[Label, ...]:
        if group not in ALL_GROUPS:
            raise ValueError(f"unknown group {group!r}; expected one of {ALL_GROUPS}")
        return tuple(lab for lab in self.labels if lab.group == group)

    def groups(self) -> dict[str, tuple[str, ...]]:
        """group -> label names, for every group in ALL_GROUPS (possibly empty)."""
        return {g: tuple(lab.name for lab in self.in_group(g)) for g in ALL_GROUPS}

    def name_to_group(self) -> dict[str, str]:
        return {lab.name: lab.group for lab in self.labels}

    def id_to_group(self) -> dict[int, str]:
        return {lab.id: lab.group for lab in self.labels}

    def __len__(self) -> int:
        return len(self.labels)

    def __iter__(self) -> Iterator[Label]:
        return iter(self.labels)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        return name in self._by_name or normalize_label(name) in self._by_key


# ---------------------------------------------------------------- loading


def _read(path: Path) -> LabelMap:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    return LabelMap.from_dict(data, where=str(path))


@lru_cache(maxsize=None)
def _load_builtin(name: str) -> LabelMap:
    return _read(LABEL_MAPS_DIR / f"{name}.json")


def load_label_map(name_or_path: str | os.PathLike[str]) -> LabelMap:
    """A LABEL_SETS name (cached) or the path of a JSON file in the same format (read each call).

    Raises ValueError for a malformed file or an unknown name, FileNotFoundError for a missing path.
    """
    if isinstance(name_or_path, str) and name_or_path in LABEL_SETS:
        return _load_builtin(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return _read(path)
    text = os.fspath(name_or_path)
    if text.endswith(".json") or os.sep in text or "/" in text:
        raise FileNotFoundError(f"label map file not found: {text}")
    raise ValueError(f"unknown label set {text!r}: expected one of {LABEL_SETS} or the path of a JSON label map")


# ---------------------------------------------------------------- checkpoints

_ADE = re.compile(r"(^|[^a-z0-9])ade(20k)?([^a-z0-9]|$)")
_FULL = re.compile(r"(^|[^a-z0-9])full([^a-z0-9]|$)")
_INSTANCE = re.compile(r"(^|[^a-z0-9])instance([^a-z0-9]|$)")


def label_set_for_checkpoint(checkpoint: str) -> str | None:
    """The label set a checkpoint (hub id or local path) predicts, from its name; None if unknown.

    Instance checkpoints map to their dataset's set too, but emit only its "thing" classes with
    their own ids (coco-instance: 80, cityscapes-instance: 8) -- match them by name, not id,
    and see is_instance_only().
    """
    name = checkpoint.casefold()
    if "mapillary" in name or "vistas" in name:
        return "mapillary_vistas"
    if "cityscapes" in name:
        return "cityscapes"
    if _ADE.search(name):
        # ADE20K-full (847 classes) is another label set: make the caller say which map to use.
        return None if _FULL.search(name) else "ade20k"
    if "coco" in name:
        # COCO-Stuff (171 classes) is another label set, as above.
        return None if "stuff" in name else "coco_panoptic"
    return None


def is_instance_only(checkpoint: str) -> bool:
    """True for instance-segmentation checkpoints (`*-coco-instance`, `*-cityscapes-instance`).

    They have no stuff classes (no road, building, vegetation, sky), so the ground, structure and
    (mostly) vegetation experts get no crops from them; the caller should warn.
    """
    name = Path(checkpoint.rstrip("/\\")).name.casefold() or checkpoint.casefold()
    return bool(_INSTANCE.search(name))
