"""Ingest: source layouts -> shard plans -> `images` / `quarantine` Parquet shards.

Three steps, each a plain function (the flow `ingest`, flows/ingest.py, runs them as Prefect tasks):
1. `list_source`  reads a layout (g50, g3, im2gps, osv5m) into candidates with labels, and
                  quarantines what is wrong before any pixel is read (unknown country,
                  missing file, bad coordinates).
2. `plan_shards`  drops what is already committed (same uri, size and mtime), groups the
                  rest into shards with deterministic, content-derived ids.
3. `ingest_shard` hashes and validates every image of a shard and commits it atomically.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
from dataclasses import dataclass, field
from datetime import datetime, timezone

from pydantic import BaseModel

from storage import sources
from storage.layout import DataRoot
from storage.queries import catalog
from storage.schema import IMAGES, QUARANTINE, to_table
from storage.shards import Output, commit_shard, drop_shards, is_committed, read_commits, shard_id
from tasks.geo import Country, countries_at, country_from_code, country_from_name, valid_latlon
from tasks.splits import split_of
from tasks.validate import BadInput, inspect_image, is_image_name

log = logging.getLogger(__name__)

STAGE = "ingest"
INGEST_VERSION = "1"  # bump when ingest output changes for the same input


class Candidate(BaseModel):
    """One input file with its label, before its bytes are read."""

    uri: str
    size: int | None = None
    mtime: float | None = None
    country: str  # ISO alpha-2, already resolved
    lat: float | None = None
    lon: float | None = None
    split: str | None = None  # set by the source itself (OSV-5M's test.csv): overrides the hash

    def key(self) -> tuple:
        return (self.uri, self.size, self.mtime)


class Rejected(BaseModel):
    """An input quarantined while listing (it never reaches a shard's image reader)."""

    uri: str
    reason: str
    detail: str
    size: int | None = None
    mtime: float | None = None

    def key(self) -> tuple:
        return (self.uri, self.size, self.mtime)


class ShardPlan(BaseModel):
    """A small manifest: what one shard task reads. Its id hashes everything that matters."""

    dataset: str
    shard_id: str
    params: dict
    candidates: list[Candidate] = []
    rejected: list[Rejected] = []


@dataclass
class Listing:
    candidates: list[Candidate] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def reject(self, uri: str, reason: str, detail: str, size=None, mtime=None) -> None:
        self.rejected.append(Rejected(uri=uri, reason=reason, detail=detail, size=size, mtime=mtime))


# ---------------------------------------------------------------- 1. layouts


def _list_country_folders(listing: Listing, root: str, files: list[sources.SourceFile]) -> None:
    """`<Country Name>/<...>/<file>`: the first folder names the country."""
    for f in files:
        parts = f.rel.split("/")
        if any(p.startswith(".") for p in parts):
            continue  # hidden files (.DS_Store, ._x.jpg) are OS litter, not inputs
        if len(parts) < 2:
            listing.reject(f.uri, "no_country_folder", f"file at the top of {root}", f.size, f.mtime)
            continue
        if not is_image_name(f.rel):
            ext = posixpath.splitext(f.rel)[1] or "(none)"
            listing.reject(f.uri, "unsupported_extension", f"extension {ext}", f.size, f.mtime)
            continue
        country = country_from_name(parts[0])
        if country is None:
            listing.reject(f.uri, "unknown_country", f"folder {parts[0]!r} is not a country", f.size, f.mtime)
            continue
        listing.candidates.append(Candidate(uri=f.uri, size=f.size, mtime=f.mtime, country=country.code))


def list_g50(source: str) -> Listing:
    """Kaggle G50: `[compressed_dataset/]<Country Name>/canvas_<ts>.jpg`."""
    inner = sources.join(source, "compressed_dataset")
    root = inner if sources.is_dir(inner) else source
    listing = Listing()
    _list_country_folders(listing, root, sources.list_files(root))
    return listing


def _index_images(folder: str) -> dict[str, sources.SourceFile]:
    """rel path -> file, plus bare file name -> file where that name is unique in the folder
    (manifests written elsewhere name files by a different prefix)."""
    files = sources.list_files(folder)
    index: dict[str, sources.SourceFile] = {f.rel: f for f in files}
    names: dict[str, list[sources.SourceFile]] = {}
    for f in files:
        names.setdefault(posixpath.basename(f.rel), []).append(f)
    for name, same in names.items():
        if len(same) == 1:
            index.setdefault(name, same[0])
    return index


def _column(df, names: tuple[str, ...], what: str, url: str) -> str:
    for name in df.columns:
        if name.strip().lower() in names:
            return name
    raise ValueError(f"{url}: no {what} column (expected one of {names}; found {df.columns})")


def list_g3(source: str, images: str | None) -> Listing:
    """G3: a folder per country, or a CSV manifest with columns `path,country`."""
    if sources.is_dir(source):
        listing = Listing()
        _list_country_folders(listing, source, sources.list_files(source))
        return listing
    df = sources.read_csv(source)
    path_col = _column(df, ("path", "file", "filename"), "path", source)
    country_col = _column(df, ("country",), "country", source)
    folder = images or sources.parent(source)
    index = _index_images(folder)
    listing = Listing()
    for row_no, row in enumerate(df.iter_rows(named=True), start=2):
        rel = (row[path_col] or "").strip()
        f = index.get(rel) or index.get(posixpath.basename(rel))
        uri = f.uri if f else sources.join(folder, rel)
        if f is None:
            listing.reject(uri, "missing_file", f"{source} line {row_no}: {rel!r} not found under {folder}")
            continue
        raw = (row[country_col] or "").strip()
        country = country_from_code(raw) if len(raw) in (2, 3) and raw.isupper() else country_from_name(raw)
        if country is None:
            listing.reject(uri, "unknown_country", f"{source} line {row_no}: {raw!r} is not a country", f.size, f.mtime)
            continue
        listing.candidates.append(Candidate(uri=f.uri, size=f.size, mtime=f.mtime, country=country.code))
    return listing


def _float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def detect_swapped(lats: list[float | None], lons: list[float | None]) -> bool | None:
    """Are the LAT and LON columns swapped? True/False, or None when the evidence conflicts.

    Each reading scores the rows that are valid coordinates *and* land in a country;
    the swapped reading must win clearly (twice the score, and half the rows).
    """
    pairs = [(a, b) for a, b in zip(lats, lons) if a is not None and b is not None]
    if not pairs:
        return False

    def on_land(points: list[tuple[float, float]]) -> int:
        points = [p for p in points if valid_latlon(*p)]
        found = countries_at([p[0] for p in points], [p[1] for p in points])
        return sum(country is not None for country, _ in found)

    as_is, swapped = on_land(pairs), on_land([(b, a) for a, b in pairs])
    if swapped > 2 * as_is and swapped >= 0.5 * len(pairs):
        return True
    if as_is < 0.5 * len(pairs) and swapped >= 0.5 * len(pairs):
        return None  # both readings plausible for many rows: let the rows be judged alone
    return False


def _geocode_into(listing: Listing, rows: list[tuple[str, sources.SourceFile, float, float, str | None]]) -> None:
    """Resolve (where, file, lat, lon, forced split) rows to countries by polygon lookup, in one batch."""
    found = countries_at([r[2] for r in rows], [r[3] for r in rows])
    for (where, f, lat, lon, split), (country, how) in zip(rows, found):
        if country is None:
            listing.reject(f.uri, "no_country_at_coordinates", f"{where}: ({lat}, {lon}) {how}", f.size, f.mtime)
        else:
            listing.candidates.append(
                Candidate(uri=f.uri, size=f.size, mtime=f.mtime, country=country.code, lat=lat, lon=lon, split=split)
            )


def list_im2gps(source: str, images: str | None) -> Listing:
    """IM2GPS / Im2GPS3k: CSV `IMG_ID,AUTHOR,LAT,LON,...`; the country comes from LAT/LON only."""
    df = sources.read_csv(source)
    id_col = _column(df, ("img_id", "id", "image"), "IMG_ID", source)
    lat_col = _column(df, ("lat", "latitude"), "LAT", source)
    lon_col = _column(df, ("lon", "lng", "longitude"), "LON", source)
    folder = images or _default_images(source)
    index = _index_images(folder) if sources.exists(folder) else {}
    listing = Listing()
    lats = [_float(v) for v in df[lat_col].to_list()]
    lons = [_float(v) for v in df[lon_col].to_list()]
    swapped = detect_swapped(lats, lons)
    if swapped:
        lats, lons = lons, lats
        msg = f"{source}: LAT and LON headers look swapped (far more points land in a country when read the other way); using them swapped"
        log.warning(msg)
        listing.warnings.append(msg)
    located = []
    for row_no, (img_id, lat, lon) in enumerate(zip(df[id_col].to_list(), lats, lons), start=2):
        name = (img_id or "").strip()
        f = index.get(name) or next((index[name + e] for e in (".jpg", ".jpeg", ".png") if name + e in index), None)
        where = f"{source} line {row_no}"
        if f is None:
            listing.reject(sources.join(folder, name), "missing_file", f"{where}: {name!r} not found under {folder}")
            continue
        if not valid_latlon(lat, lon):
            # Valid only when swapped: this row alone may have its columns mixed up.
            reason = "ambiguous_coordinates" if valid_latlon(lon, lat) else "coordinates_out_of_range"
            listing.reject(f.uri, reason, f"{where}: LAT={lat} LON={lon}", f.size, f.mtime)
            continue
        located.append((where, f, lat, lon, None))
    _geocode_into(listing, located)
    return listing


def _default_images(csv_url: str) -> str:
    folder = sources.parent(csv_url)
    inner = sources.join(folder, "images")
    return inner if sources.is_dir(inner) else folder


def list_osv5m(source: str, images: str | None) -> Listing:
    """OSV-5M: `train.csv`/`test.csv` (`id,latitude,longitude,country`), `images/**/<id>.jpg`."""
    csvs = [source]
    if sources.is_dir(source):
        csvs = [sources.join(source, n) for n in ("train.csv", "test.csv") if sources.exists(sources.join(source, n))]
        if not csvs:
            raise ValueError(f"{source}: no train.csv or test.csv in this folder")
    folder = images or _default_images(csvs[0])
    index = _index_images(folder) if sources.exists(folder) else {}
    listing = Listing()
    located = []
    for csv in csvs:
        # OSV-5M's own test set stays test: it is a benchmark, hashing it into train would leak it.
        forced = "test" if posixpath.basename(csv).lower().startswith("test") else None
        df = sources.read_csv(csv)
        id_col = _column(df, ("id",), "id", csv)
        lat_col = _column(df, ("latitude", "lat"), "latitude", csv)
        lon_col = _column(df, ("longitude", "lon"), "longitude", csv)
        country_col = _column(df, ("country",), "country", csv)
        for row_no, row in enumerate(df.iter_rows(named=True), start=2):
            name = (row[id_col] or "").strip()
            f = index.get(f"{name}.jpg") or index.get(name)
            where = f"{csv} line {row_no}"
            if f is None:
                listing.reject(sources.join(folder, f"{name}.jpg"), "missing_file", f"{where}: {name}.jpg not found under {folder}")
                continue
            lat, lon = _float(row[lat_col]), _float(row[lon_col])
            has_coords = row[lat_col] is not None or row[lon_col] is not None
            if has_coords and not valid_latlon(lat, lon):
                listing.reject(f.uri, "coordinates_out_of_range", f"{where}: latitude={row[lat_col]} longitude={row[lon_col]}", f.size, f.mtime)
                continue
            code = (row[country_col] or "").strip()
            if code:
                country = country_from_code(code)
                if country is None:
                    listing.reject(f.uri, "unknown_country", f"{where}: country code {code!r}", f.size, f.mtime)
                else:
                    listing.candidates.append(Candidate(uri=f.uri, size=f.size, mtime=f.mtime, country=country.code,
                                                        lat=lat, lon=lon, split=forced))
            elif has_coords:
                located.append((where, f, lat, lon, forced))
            else:
                listing.reject(f.uri, "missing_label", f"{where}: no country and no coordinates", f.size, f.mtime)
    _geocode_into(listing, located)
    return listing


def list_source(layout: str, source: str, images: str | None = None) -> Listing:
    if not sources.exists(source):
        raise FileNotFoundError(f"source {source!r} does not exist")
    if layout == "g50":
        return list_g50(source)
    if layout == "g3":
        return list_g3(source, images)
    if layout == "im2gps":
        return list_im2gps(source, images)
    if layout == "osv5m":
        return list_osv5m(source, images)
    raise ValueError(f"unknown layout {layout!r}")


# ---------------------------------------------------------------- 2. plan


def committed_keys(root: DataRoot, dataset: str) -> set[tuple]:
    """(uri, size, mtime) of every input this dataset already turned into a row."""
    if not any(r.dataset == dataset for r in read_commits(root, STAGE)):
        return set()
    with catalog(root, fresh=True) as cat:
        return cat.ingested_keys(dataset)


def _shard_id(dataset: str, params: dict, items: list[BaseModel]) -> str:
    return shard_id([dataset, INGEST_VERSION, params, [i.model_dump() for i in items]])


def plan_shards(
    dataset: str, listing: Listing, known: set[tuple], params: dict, shard_size: int
) -> list[ShardPlan]:
    """Group what is new into shards. Same input state -> same shards and ids."""
    new = sorted((c for c in listing.candidates if c.key() not in known), key=lambda c: c.uri)
    rejected = sorted((r for r in listing.rejected if r.key() not in known), key=lambda r: (r.uri, r.reason))
    plans = []
    for start in range(0, len(new), shard_size):
        chunk = new[start : start + shard_size]
        plans.append(ShardPlan(dataset=dataset, shard_id=_shard_id(dataset, params, chunk), params=params, candidates=chunk))
    if rejected:  # listing-time rejections travel in one shard of their own
        plans.append(ShardPlan(dataset=dataset, shard_id=_shard_id(dataset, params, rejected), params=params, rejected=rejected))
    return plans


# ---------------------------------------------------------------- 3. one shard


def assign_split(image_id: str, params: dict, forced: str | None = None) -> str:
    split = params["split"]
    if split["policy"] != "hash":
        return split["policy"]
    return forced or split_of(image_id, split["train"], split["val"])


def _image_row(c: Candidate, data: bytes, params: dict, country: Country, now: datetime) -> dict:
    info = inspect_image(data, max_pixels=params["max_pixels"])
    image_id = hashlib.sha256(data).hexdigest()
    return {
        "image_id": image_id,
        "dataset": params["dataset"],
        "split": assign_split(image_id, params, c.split),
        "country": country.code,
        "country_name": country.name,
        "continent": country.continent,
        "lat": c.lat,
        "lon": c.lon,
        "source_uri": c.uri,
        "width": info.width,
        "height": info.height,
        "format": info.format,
        "size_bytes": len(data),
        "source_mtime": c.mtime,
        "ingested_at": now,
    }


def _quarantine_row(uri, dataset, reason, detail, size, mtime, now) -> dict:
    return {"source_uri": uri, "dataset": dataset, "stage": STAGE, "reason": reason, "detail": detail,
            "size_bytes": size, "source_mtime": mtime, "seen_at": now}


def ingest_shard(root: DataRoot, plan: ShardPlan, ingested_at: datetime | None = None) -> dict:
    """Read, hash and validate each image; commit `images` + `quarantine` rows atomically.

    Bad images become quarantine rows. Transient I/O errors raise, so the task retries
    the whole shard (nothing is visible until the commit record is written).
    `ingested_at` is the run's start: one value per run keeps "first copy" well defined.
    """
    if is_committed(root, STAGE, plan.dataset, plan.shard_id):
        return {"shard_id": plan.shard_id, "cached": True, "images": 0, "quarantined": 0}
    now = ingested_at or datetime.now(timezone.utc)
    images, quarantined = [], []
    for r in plan.rejected:
        quarantined.append(_quarantine_row(r.uri, plan.dataset, r.reason, r.detail, r.size, r.mtime, now))
    for c in plan.candidates:
        if c.size is not None and c.size > plan.params.get("max_bytes", float("inf")):
            quarantined.append(_quarantine_row(c.uri, plan.dataset, "too_large",
                                               f"{c.size} bytes > max_bytes={plan.params['max_bytes']}", c.size, c.mtime, now))
            continue
        try:
            data = sources.read_bytes(c.uri)
        except FileNotFoundError:
            quarantined.append(_quarantine_row(c.uri, plan.dataset, "missing_file", "vanished after listing", c.size, c.mtime, now))
            continue
        except (PermissionError, IsADirectoryError) as exc:
            quarantined.append(_quarantine_row(c.uri, plan.dataset, "unreadable_file", str(exc), c.size, c.mtime, now))
            continue
        try:
            images.append(_image_row(c, data, plan.params, country_from_code(c.country), now))
        except BadInput as bad:
            quarantined.append(_quarantine_row(c.uri, plan.dataset, bad.reason, bad.detail, c.size, c.mtime, now))
    commit_shard(
        root, STAGE, plan.dataset, plan.shard_id,
        [Output("images", {"dataset": plan.dataset}, to_table(images, IMAGES)),
         Output("quarantine", {"dataset": plan.dataset}, to_table(quarantined, QUARANTINE))],
        params=plan.params,
    )
    return {"shard_id": plan.shard_id, "cached": False, "images": len(images), "quarantined": len(quarantined)}


def drop_dataset(root: DataRoot, dataset: str) -> int:
    """Remove a dataset's ingest shards (records first, so readers never see half of it)."""
    return drop_shards(root, STAGE, dataset)


def plan_ingest(root: DataRoot, layout: str, source: str, images: str | None, params: dict,
                shard_size: int) -> tuple[list[ShardPlan], list[str]]:
    """List a source and plan shards of what is new; returns (plans, listing warnings)."""
    listing = list_source(layout, source, images)
    known = committed_keys(root, params["dataset"])
    plans = plan_shards(params["dataset"], listing, known, params, shard_size)
    log.info("%s: %d candidates, %d rejected while listing, %d already ingested, %d shard(s) to do",
             params["dataset"], len(listing.candidates), len(listing.rejected), len(known), len(plans))
    return plans, listing.warnings
