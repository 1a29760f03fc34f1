"""The `annotations` segmenter: COCO-panoptic ground truth instead of a model.

It gives a feature dataset built from perfect masks (the segmentation-quality upper bound)
and is the demo's default. The segment stage calls `segments_for` in its reader workers, beside
the decoded image (no model, no batch); `prepare` + `predict` serve single images (`geofeat predict`).
"""

from __future__ import annotations

import io
import json
import os
import posixpath
from functools import cached_property

import numpy as np
from PIL import Image

from models.segmenter import Segment
from storage import sources
from storage.sources import url_fs

MASK_STRIDE = 4  # masks are kept at 1/4 resolution, like Mask2Former's


def _norm(url: str) -> str:
    """One spelling per location: absolute local paths, protocol URLs as fsspec writes them."""
    if "://" not in url:
        return os.path.abspath(url)
    fs, path = url_fs(url)
    return fs.unstrip_protocol(path)


class PanopticAnnotations:
    """One COCO-panoptic JSON + PNG folder, looked up by an image's path under images_root."""

    def __init__(self, json_url: str, png_dir: str, images_root: str):
        self.json_url, self.png_dir, self.images_root = json_url, png_dir.rstrip("/"), _norm(images_root.rstrip("/"))

    @cached_property
    def _index(self) -> tuple[dict[str, dict], dict[int, dict]]:
        coco = json.loads(sources.read_bytes(self.json_url))
        names = {img["id"]: img["file_name"] for img in coco["images"]}
        by_file = {names[a["image_id"]]: a for a in coco["annotations"]}
        categories = {c["id"]: c for c in coco["categories"]}
        return by_file, categories

    @property
    def categories(self) -> dict[int, dict]:
        return self._index[1]

    def annotation_for(self, source_uri: str) -> dict | None:
        uri = _norm(source_uri)
        if not uri.startswith(self.images_root + "/"):
            return None
        return self._index[0].get(uri[len(self.images_root) + 1:])

    def read_ids(self, annotation: dict) -> np.ndarray:
        """The panoptic id map (int32, full resolution): id = R + 256 G + 256^2 B."""
        data = sources.read_bytes(posixpath.join(self.png_dir, annotation["file_name"]))
        rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int32)
        return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


class AnnotationsSegmenter:
    """Backend over several datasets' ground truth (dataset name -> PanopticAnnotations)."""

    untrained = False

    def __init__(self, sources: dict[str, PanopticAnnotations]):
        self.sources = sources

    @property
    def identity(self) -> dict:
        return {"kind": "annotations", "sources": {d: s.json_url for d, s in self.sources.items()}}

    def label_groups(self) -> dict[str, str]:
        """label -> group from the categories' supercategory, when it names a group (the demo world)."""
        out = {}
        for src in self.sources.values():
            for c in src.categories.values():
                out[c["name"]] = c.get("supercategory", "")
        return out

    def prepare(self, dataset: str, source_uri: str, top: int, height: int) -> dict:
        """Runs in a DataLoader worker: the id map rows [top, top + height) of this image."""
        src = self.sources.get(dataset)
        ann = src.annotation_for(source_uri) if src else None
        if ann is None:
            return {"ids": None}
        ids = src.read_ids(ann)[top : top + height]
        return {"ids": ids, "segments_info": ann["segments_info"], "categories": src.categories}

    def segments_for(self, dataset: str, source_uri: str, top: int, height: int, width: int) -> list[Segment] | None:
        """The segments of rows [top, top + height) of one image (None: it has no annotation). The
        segment stream's workers call this next to the decoded frame, so the full-resolution id
        map never leaves the process that decoded it."""
        item = self.prepare(dataset, source_uri, top, height)
        return None if item["ids"] is None else _segments(item, (height, width))

    def predict(self, items: list[dict], sizes: list[tuple[int, int]]) -> list[list[Segment] | None]:
        """Segments per image; None where the image has no annotation."""
        return [_segments(item, size) if item.get("ids") is not None else None for item, size in zip(items, sizes)]


def _segments(item: dict, size: tuple[int, int]) -> list[Segment]:
    ids, categories = item["ids"], item["categories"]
    h, w = size
    small = ids[::MASK_STRIDE, ::MASK_STRIDE]
    out = []
    for info in item["segments_info"]:
        full = ids == info["id"]
        area = int(full.sum())
        if area == 0:  # the segment lies in the cut-off overlay band
            continue
        ys, xs = np.nonzero(full.any(axis=1))[0], np.nonzero(full.any(axis=0))[0]
        cat = categories[info["category_id"]]
        out.append(Segment(label=cat["name"], label_id=int(info["category_id"]), score=1.0,
                           bbox=(int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1),
                           area=area, mask=small == info["id"]))
    assert all(0 <= s.bbox[2] <= w and 0 <= s.bbox[3] <= h for s in out)
    return out
