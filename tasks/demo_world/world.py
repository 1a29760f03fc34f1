"""Embedded demo world: a deterministic synthetic street-scene dataset.

Why it exists: the pipeline must run end to end (and be tested) without downloading
Kaggle G50 or IM2GPS and without a GPU. This module draws cartoon street scenes whose
feature groups (ground / structure / vegetation / vehicle / furniture) carry a *known*
country signal of deliberately different strength (see `CountryStyle`), and writes them
in the same layouts as the real inputs:

- Kaggle G50: ``g50/<Country Name>/canvas_<n>.jpg``
- IM2GPS-style held-out set: ``im2gps/images/<IMG_ID>`` + ``im2gps/im2gps_demo.csv``
  (header ``IMG_ID,AUTHOR,LAT,LON``; file-name prefixes lie, like in the real set)
- COCO-panoptic ground truth for both (``panoptic/*.json`` + id PNGs), so segmentation
  can be checked or replaced by the oracle masks.

Pure numpy + PIL. Everything is seeded per image, so the same spec gives byte-identical
files on any machine with the same numpy/Pillow (no timestamps are embedded).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import posixpath
import tempfile
import time
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from storage.locks import held
from storage.publish import AlreadyPublished, staged_folder, sweep_dead_temps
from storage.sources import is_local, url_fs
from tasks.demo_world.render import coco_categories, label_ids_of_map, pick, render_scene
from tasks.demo_world.styles import COUNTRIES, CountryStyle
from tasks.specs import DemoSpec

if TYPE_CHECKING:
    import fsspec

logger = logging.getLogger(__name__)

GENERATOR = "geofeat.demo_world"
GENERATOR_VERSION = 1

# Seed-stream ids: one independent stream per split so adding images never shifts others.
_SPLIT_G50, _SPLIT_IM2GPS, _SPLIT_MESSY = 0, 1, 2


def _image_rng(spec: DemoSpec, country: int, index: int, split: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([spec.seed, country, index, split]))


def _encode(rgb: Image.Image, ids: Image.Image | None, rng: np.random.Generator) -> tuple[bytes, bytes]:
    """JPEG at a random quality 80-95 (like real uploads) and the lossless id PNG."""
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=int(rng.integers(80, 96)), optimize=False)
    png = b""
    if ids is not None:
        pbuf = io.BytesIO()
        ids.save(pbuf, format="PNG")
        png = pbuf.getvalue()
    return buf.getvalue(), png


# --------------------------------------------------------------------------- writing


class _Writer:
    """Writes bytes under a root on any fsspec filesystem, creating folders once."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str):
        self.fs, self.root = fs, root
        self._dirs: set[str] = set()

    def put(self, rel: str, data: bytes) -> None:
        path = f"{self.root}/{rel}"
        parent = posixpath.dirname(path)
        if parent not in self._dirs:
            self.fs.makedirs(parent, exist_ok=True)
            self._dirs.add(parent)
        self.fs.pipe_file(path, data)


def _coco(images: list, annotations: list) -> bytes:
    doc = {"info": {"description": "geofeat demo world", "version": GENERATOR_VERSION},
           "images": images, "annotations": annotations, "categories": coco_categories()}
    return json.dumps(doc, indent=1).encode()


def _write_g50(wr: _Writer, spec: DemoSpec, label_ids: dict[str, int]) -> dict[tuple[int, int], bytes]:
    """Training pool in the Kaggle G50 layout + its panoptic ground truth."""
    images, annotations, jpegs = [], [], {}
    for ci, style in enumerate(COUNTRIES[: spec.countries]):
        for n in range(spec.per_country):
            rng = _image_rng(spec, ci, n, _SPLIT_G50)
            rgb, ids, info = render_scene(style, rng, spec.width, spec.height, label_ids)
            jpg, png = _encode(rgb, ids, rng)
            rel = f"{style.name}/canvas_{n}"
            wr.put(f"g50/{rel}.jpg", jpg)
            wr.put(f"panoptic/g50/{rel}.png", png)
            image_id = len(images)
            images.append({"id": image_id, "file_name": f"{rel}.jpg", "width": spec.width,
                           "height": spec.height, "country": style.name})
            annotations.append({"image_id": image_id, "file_name": f"{rel}.png", "segments_info": info})
            if n == 0:
                jpegs[(ci, n)] = jpg
    wr.put("panoptic/g50.json", _coco(images, annotations))
    return jpegs


def _heldout_name(rng: np.random.Generator, ci: int, number: int) -> str:
    """IM2GPS-style name whose city prefix lies: always a city of ANOTHER country."""
    decoy = pick(rng, tuple(s for k, s in enumerate(COUNTRIES) if k != ci))
    return f"{pick(rng, decoy.cities)}_{number:05d}_{int(rng.integers(0, 2**32)):08x}.jpg"


def _coords(rng: np.random.Generator, style: CountryStyle) -> tuple[float, float]:
    """Uniform +/-0.15 degree jitter around one inland anchor (stays on land)."""
    lat, lon = pick(rng, style.anchors)
    return round(lat + rng.uniform(-0.15, 0.15), 6), round(lon + rng.uniform(-0.15, 0.15), 6)


def _write_im2gps(wr: _Writer, spec: DemoSpec, label_ids: dict[str, int]) -> tuple[list, list]:
    """Held-out set: images, CSV rows and panoptic ground truth. Returns (rows, truth)."""
    images, annotations, rows, truth = [], [], [], []
    number = 0
    for n in range(spec.heldout_per_country):  # interleave countries, like a mixed photo pool
        for ci, style in enumerate(COUNTRIES[: spec.countries]):
            rng = _image_rng(spec, ci, n, _SPLIT_IM2GPS)
            rgb, ids, info = render_scene(style, rng, spec.width, spec.height, label_ids)
            jpg, png = _encode(rgb, ids, rng)
            img_id = _heldout_name(rng, ci, number)
            lat, lon = _coords(rng, style)
            number += 1
            wr.put(f"im2gps/images/{img_id}", jpg)
            wr.put(f"panoptic/im2gps/{img_id[:-4]}.png", png)
            images.append({"id": len(images), "file_name": img_id, "width": spec.width, "height": spec.height,
                           "country": style.name})
            annotations.append({"image_id": len(annotations), "file_name": f"{img_id[:-4]}.png",
                                "segments_info": info})
            rows.append([img_id, f"demo@N0{int(rng.integers(1, 9))}", f"{lat:.6f}", f"{lon:.6f}"])
            truth.append({"img_id": img_id, "country": style.name, "iso2": style.iso2})
    wr.put("panoptic/im2gps.json", _coco(images, annotations))
    return rows, truth


def _write_messy(wr: _Writer, spec: DemoSpec, jpegs: dict, rows: list,
                 label_ids: dict[str, int]) -> list[dict[str, str]]:
    """Realistic bad inputs the ingest step must quarantine (never annotated)."""
    styles = COUNTRIES[: spec.countries]
    nth = lambda k: styles[k % len(styles)]  # noqa: E731 - wraps when fewer than 4 countries

    def scene(k: int) -> bytes:
        rng = _image_rng(spec, 0, k, _SPLIT_MESSY)
        rgb, _, _ = render_scene(COUNTRIES[0], rng, spec.width, spec.height, label_ids)
        return _encode(rgb, None, rng)[0]

    real = scene(1)
    dup_ci = 3 % len(styles)
    extra_rng = _image_rng(spec, 0, 99, _SPLIT_MESSY)
    bad_coord_id = _heldout_name(extra_rng, 0, 90000)
    missing_id = _heldout_name(extra_rng, 0, 90001)
    files = [
        ("g50/Utah/canvas_0.jpg", scene(0), "unknown_country"),
        (f"g50/{nth(0).name}/canvas_empty.jpg", b"", "empty_file"),
        (f"g50/{nth(1).name}/canvas_truncated.jpg", real[: int(len(real) * 0.4)], "truncated"),
        (f"g50/{nth(2).name}/canvas_notes.jpg",
         b"field notes: camera battery died here, re-shoot tomorrow\n", "not_an_image"),
        (f"g50/{nth(3).name}/canvas_dup.jpg", jpegs[(dup_ci, 0)], "duplicate"),
        (f"im2gps/images/{bad_coord_id}", scene(2), "coordinates_out_of_range"),
    ]
    messy = []
    for rel, data, reason in files:
        wr.put(rel, data)
        messy.append({"path": rel, "reason": reason})
    lat, lon = _coords(extra_rng, COUNTRIES[0])
    rows.append([bad_coord_id, "demo@N01", "123.400000", f"{lon:.6f}"])
    rows.append([missing_id, "demo@N02", f"{lat:.6f}", f"{lon:.6f}"])
    messy.append({"path": f"im2gps/images/{missing_id}", "reason": "missing_file"})
    return messy


def _write_csv(wr: _Writer, rows: list) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["IMG_ID", "AUTHOR", "LAT", "LON"])
    w.writerows(rows)
    wr.put("im2gps/im2gps_demo.csv", buf.getvalue().encode())


def _world_doc(spec: DemoSpec, truth: list, messy: list) -> dict[str, Any]:
    styles = COUNTRIES[: spec.countries]
    return {
        "generator": GENERATOR,
        "version": GENERATOR_VERSION,
        "spec": spec.resolved(),
        "label_map": "demo",
        "countries": [{"name": s.name, "iso2": s.iso2, "folder": f"g50/{s.name}",
                       "anchors": [list(a) for a in s.anchors], "cities": list(s.cities)} for s in styles],
        "counts": {"g50_images": spec.countries * spec.per_country,
                   "im2gps_images": spec.countries * spec.heldout_per_country,
                   "messy": len(messy)},
        "heldout_truth": truth,
        "messy": messy,
    }


def _write_world(fs: fsspec.AbstractFileSystem, root: str, spec: DemoSpec) -> dict[str, Any]:
    label_ids = label_ids_of_map()
    wr = _Writer(fs, root)
    jpegs = _write_g50(wr, spec, label_ids)
    rows, truth = _write_im2gps(wr, spec, label_ids)
    messy = _write_messy(wr, spec, jpegs, rows, label_ids) if spec.messy else []
    _write_csv(wr, rows)
    doc = _world_doc(spec, truth, messy)
    wr.put("world.json", json.dumps(doc, indent=1).encode())  # last: marks a complete world
    return json.loads(json.dumps(doc))


# --------------------------------------------------------------------------- public entry


def read_world(out: str) -> dict[str, Any] | None:
    """The parsed world.json at `out`, None when there is no complete world there."""
    fs, root = url_fs(out)
    path = f"{root.rstrip('/')}/world.json"
    return json.loads(fs.cat_file(path)) if fs.exists(path) else None


def _matches(world: dict[str, Any], spec: DemoSpec) -> bool:
    return world.get("spec") == spec.resolved() and world.get("version") == GENERATOR_VERSION


def generate_demo_world(out: str, spec: DemoSpec = DemoSpec(), overwrite: bool = False) -> dict:
    """Generate (or reuse) the demo world at `out` (fsspec URL or local path).

    Idempotent: an existing world with the same spec and generator version is returned
    untouched. A different one raises ValueError unless overwrite=True (which always
    regenerates). Written into a sibling temp folder and swapped in (storage.publish), so
    readers never see a half-written world; a killed generation's temp folder is swept first.
    Generated once when runs race: on a local `out` a lock (in the system temp folder) makes the
    second wait and reuse the first's world; elsewhere the first to publish wins and the other
    drops its copy and reuses it. Returns the parsed world.json.
    """
    fs, root = url_fs(out)
    root = root.rstrip("/")
    swept = sweep_dead_temps(fs, root)
    if swept:
        logger.info("removed %d temp folder(s) of demo-world generations that died: %s", len(swept), swept)
    # The lock sits in the system temp folder, keyed by the world's path: nothing beside the world.
    key = hashlib.sha256(root.encode()).hexdigest()[:16]
    lock = held(os.path.join(tempfile.gettempdir(), "geofeat-locks", f"demo-world-{key}.lock"),
                f"generating the demo world at {out}", log=logger) if is_local(out) else nullcontext()
    with lock:
        existing = read_world(out)
        if existing is not None and not overwrite:
            if _matches(existing, spec):
                logger.info("demo world at %s is up to date (%s)", out, existing["spec"])
                return existing
            raise ValueError(
                f"{out} holds a demo world with spec {existing.get('spec')} (version {existing.get('version')}), "
                f"not {spec.resolved()} (version {GENERATOR_VERSION}); pass overwrite=True or choose another --out")
        if existing is None and not overwrite and fs.exists(root) and fs.ls(root):
            raise ValueError(f"{out} exists and is not a demo world; pass overwrite=True or choose another --out")
        started = time.perf_counter()
        logger.info("generating demo world %s at %s", spec.resolved(), out)
        try:
            with staged_folder(out, replace=overwrite) as (tmp_fs, tmp):
                world = _write_world(tmp_fs, tmp, spec)
        except AlreadyPublished:
            world = read_world(out)
            if world is None or not _matches(world, spec):
                raise ValueError(f"{out}: another run published a different demo world meanwhile "
                                 f"({None if world is None else world.get('spec')}); choose another --out") from None
            logger.info("demo world at %s was published by another run meanwhile; using it", out)
            return world
    logger.info("demo world ready at %s: %d G50 + %d held-out images, %d messy files in %.1f s", out,
                world["counts"]["g50_images"], world["counts"]["im2gps_images"], len(world["messy"]),
                time.perf_counter() - started)
    return world
