"""Ingest: source layouts -> shard plans -> `images` / `quarantine` Parquet shards.

Three steps, each a plain function (the flow `ingest`, flows/ingest.py, runs them as Prefect tasks):
1. `list_source`  reads a layout (g50, g3, im2gps, osv5m) into candidates with labels, and
                  quarantines what is wrong before any pixel is read (unknown country,
                  missing file, bad coordinates, anything that is not a regular file, a folder
                  that cannot be listed, a manifest that labels one file twice differently).
2. `plan_shards`  drops what is already committed (same uri, size and mtime), groups the
                  rest into shards with deterministic, content-derived ids.
3. `ingest_shard` hashes and validates every image of a shard and commits it atomically.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone

from pydantic import BaseModel

from storage import sources
from storage.layout import DataRoot
from storage.queries import catalog
from storage.schema import IMAGES, QUARANTINE, to_table
from storage.shards import Output, commit_shard, drop_shards, is_committed, is_transient, read_commits, shard_id
from tasks.geo import Country, countries_at, country_from_code, country_from_name, valid_latlon
from tasks.splits import split_of
from tasks.validate import BadInput, inspect_image

log = logging.getLogger(__name__)

STAGE = "ingest"
# Bump when ingest output changes for the same input. 2: the content decides the format (no
# extension filter), non-regular files and unlistable folders are quarantined, reads are bounded.
INGEST_VERSION = "2"


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

    def refuse(self, entry: sources.Refused) -> None:
        """A listing entry that is not a regular file (or a folder that could not be listed)."""
        self.reject(entry.uri, entry.reason, entry.detail, None, entry.mtime)

    def merge_repeats(self, source: str) -> None:
        """One row per file, whatever the manifest says. Rows naming the same file with the same
        label are one input (and a warning); rows that disagree (Paris and Tokyo, or a label and a
        refusal) make the file one `conflicting_labels` row that names every label: no label wins."""
        counts = Counter(c.uri for c in self.candidates)
        counts.update(r.uri for r in self.rejected)
        repeated = {uri for uri, n in counts.items() if n > 1}
        if not repeated:
            return
        groups: dict[str, tuple[list[Candidate], list[Rejected]]] = {uri: ([], []) for uri in repeated}
        for c in self.candidates:
            if c.uri in groups:
                groups[c.uri][0].append(c)
        for r in self.rejected:
            if r.uri in groups:
                groups[r.uri][1].append(r)
        self.candidates = [c for c in self.candidates if c.uri not in repeated]
        self.rejected = [r for r in self.rejected if r.uri not in repeated]
        agreed = 0
        for uri, (cands, rejs) in sorted(groups.items()):
            if cands and not rejs and all(c == cands[0] for c in cands):
                self.candidates.append(cands[0])
                agreed += 1
            elif rejs and not cands and all(r.reason == rejs[0].reason for r in rejs):
                self.rejected.append(rejs[0])
                agreed += 1
            else:
                labels = [_label(c) for c in cands] + [f"{r.reason} ({r.detail})" for r in rejs]
                first = cands[0] if cands else rejs[0]
                self.reject(uri, "conflicting_labels", f"{source}: {len(labels)} rows name this file: " + "; ".join(labels),
                            first.size, first.mtime)
        if agreed:
            self.warnings.append(f"{source}: {agreed} file(s) are named by more than one row with the same label; "
                                 "each is ingested once")


def _label(c: Candidate) -> str:
    where = "" if c.lat is None and c.lon is None else f" at ({c.lat}, {c.lon})"
    return f"{c.country}{where}" + (f", split {c.split}" if c.split else "")


# ---------------------------------------------------------------- 1. layouts


def _list_country_folders(listing: Listing, root: str, scan: sources.Scan) -> None:
    """`<Country Name>/<...>/<file>`: the first folder names the country. Every regular file is a
    candidate whatever its extension (its bytes decide); hidden files (.DS_Store, ._x.jpg) are OS
    litter, not inputs, and are never listed; every other entry is refused with its reason."""
    for entry in scan.refused:
        listing.refuse(entry)
    for f in scan.files:
        parts = f.rel.split("/")
        if len(parts) < 2:
            listing.reject(f.uri, "no_country_folder", f"file at the top of {root}", f.size, f.mtime)
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
    _list_country_folders(listing, root, sources.scan(root, skip_hidden=True))
    return listing


@dataclass
class ImageIndex:
    """A manifest's image folder: files by rel path (and by bare name where that is unique), and
    what the listing refused, so a row naming a FIFO or a file in an unlistable folder says so."""

    folder: str
    files: dict[str, sources.SourceFile] = field(default_factory=dict)
    refused: dict[str, sources.Refused] = field(default_factory=dict)

    @classmethod
    def of(cls, folder: str) -> "ImageIndex":
        if not sources.exists(folder):
            return cls(folder)
        scan = sources.scan(folder, skip_hidden=True)
        index = cls(folder, {f.rel: f for f in scan.files}, {r.rel: r for r in scan.refused})
        for table in (index.files, index.refused):
            names: dict[str, list] = {}
            for entry in list(table.values()):
                names.setdefault(posixpath.basename(entry.rel), []).append(entry)
            for name, same in names.items():
                if len(same) == 1:
                    table.setdefault(name, same[0])
        return index

    def get(self, *names: str) -> sources.SourceFile | None:
        return next((self.files[n] for n in names if n in self.files), None)

    def reject_missing(self, listing: Listing, rel: str, where: str, *names: str) -> None:
        """A row whose file was not found: refused by the listing (its reason), inside a folder that
        could not be listed, or missing."""
        uri = sources.join(self.folder, rel)
        found = next((self.refused[n] for n in names if n in self.refused), None)
        if found is not None:
            listing.reject(found.uri, found.reason, f"{where}: {found.detail}", None, found.mtime)
            return
        folder = next((r for r in self.refused.values() if r.reason == "unlistable_folder"
                       and any(n.startswith(r.rel + "/") for n in names)), None)
        if folder is not None:
            listing.reject(uri, "unlistable_folder", f"{where}: {rel!r} is inside {folder.rel!r}, which cannot be listed")
            return
        listing.reject(uri, "missing_file", f"{where}: {rel!r} not found under {self.folder}")


def _column(df, names: tuple[str, ...], what: str, url: str) -> str:
    for name in df.columns:
        if name.strip().lower() in names:
            return name
    raise ValueError(f"{url}: no {what} column (expected one of {names}; found {df.columns})")


def list_g3(source: str, images: str | None) -> Listing:
    """G3: a folder per country, or a CSV manifest with columns `path,country`."""
    if sources.is_dir(source):
        listing = Listing()
        _list_country_folders(listing, source, sources.scan(source, skip_hidden=True))
        return listing
    df = sources.read_csv(source)
    path_col = _column(df, ("path", "file", "filename"), "path", source)
    country_col = _column(df, ("country",), "country", source)
    folder = images or sources.parent(source)
    index = ImageIndex.of(folder)
    listing = Listing()
    for row_no, row in enumerate(df.iter_rows(named=True), start=2):
        rel = (row[path_col] or "").strip()
        where = f"{source} line {row_no}"
        f = index.get(rel, posixpath.basename(rel))
        if f is None:
            index.reject_missing(listing, rel, where, rel, posixpath.basename(rel))
            continue
        raw = (row[country_col] or "").strip()
        country = country_from_code(raw) if len(raw) in (2, 3) and raw.isupper() else country_from_name(raw)
        if country is None:
            listing.reject(f.uri, "unknown_country", f"{where}: {raw!r} is not a country", f.size, f.mtime)
            continue
        listing.candidates.append(Candidate(uri=f.uri, size=f.size, mtime=f.mtime, country=country.code))
    listing.merge_repeats(source)
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
    index = ImageIndex.of(folder)
    listing = Listing()
    raw_lats, raw_lons = df[lat_col].to_list(), df[lon_col].to_list()
    lats, lons = [_float(v) for v in raw_lats], [_float(v) for v in raw_lons]
    swapped = detect_swapped(lats, lons)
    if swapped:
        lats, lons = lons, lats
        raw_lats, raw_lons = raw_lons, raw_lats
        msg = f"{source}: LAT and LON headers look swapped (far more points land in a country when read the other way); using them swapped"
        log.warning(msg)
        listing.warnings.append(msg)
    located = []
    rows = zip(df[id_col].to_list(), lats, lons, raw_lats, raw_lons)
    for row_no, (img_id, lat, lon, raw_lat, raw_lon) in enumerate(rows, start=2):
        name = (img_id or "").strip()
        names = (name, *(name + e for e in (".jpg", ".jpeg", ".png")))
        f = index.get(*names)
        where = f"{source} line {row_no}"
        if f is None:
            index.reject_missing(listing, name, where, *names)
            continue
        if not valid_latlon(lat, lon):
            # Valid only when swapped: this row alone may have its columns mixed up.
            reason = "ambiguous_coordinates" if valid_latlon(lon, lat) else "coordinates_out_of_range"
            listing.reject(f.uri, reason, f"{where}: {_raw('LAT', raw_lat, lat)} {_raw('LON', raw_lon, lon)}",
                           f.size, f.mtime)
            continue
        located.append((where, f, lat, lon, None))
    _geocode_into(listing, located)
    listing.merge_repeats(source)
    return listing


def _raw(name: str, raw, value: float | None) -> str:
    """A coordinate as the file wrote it: the raw text is what a user can find and fix."""
    if value is None:
        return f"{name}={raw!r} (not a number)" if raw not in (None, "") else f"{name}=(empty)"
    return f"{name}={raw}"


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
    index = ImageIndex.of(folder)
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
            f = index.get(f"{name}.jpg", name)
            where = f"{csv} line {row_no}"
            if f is None:
                index.reject_missing(listing, f"{name}.jpg", where, f"{name}.jpg", name)
                continue
            lat, lon = _float(row[lat_col]), _float(row[lon_col])
            has_coords = row[lat_col] is not None or row[lon_col] is not None
            if has_coords and not valid_latlon(lat, lon):
                listing.reject(f.uri, "coordinates_out_of_range",
                               f"{where}: {_raw('latitude', row[lat_col], lat)} {_raw('longitude', row[lon_col], lon)}",
                               f.size, f.mtime)
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
    listing.merge_repeats(" + ".join(csvs))
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


def _read(c: Candidate, max_bytes: int | None) -> bytes | tuple[str, str]:
    """The candidate's bytes, or (reason, detail) when it cannot be an image. Reads stop at
    max_bytes + 1 whatever the listing said (a symlink to /dev/zero is listed as 0 bytes).
    Transient I/O errors raise, so the task retries the shard."""
    try:
        return sources.read_bytes(c.uri, limit=max_bytes)
    except sources.TooLarge as exc:
        return "too_large", f"more than max_bytes={exc.limit} bytes read (listed as {c.size}); read no further"
    except FileNotFoundError:
        return "missing_file", "vanished after listing"
    except sources.NotRegularFile as exc:
        return "not_a_regular_file", f"{exc.strerror} (found when reading); never read"
    except OSError as exc:
        if is_transient(exc):
            raise
        return "unreadable_file", f"{type(exc).__name__}: {exc.strerror or exc}"


def _named(detail: str, uri: str) -> str:
    """A format verdict with the file's name: the content decided, the name may say otherwise."""
    ext = posixpath.splitext(uri)[1] or "no extension"
    return f"{detail}; named {ext}"


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
    max_bytes = plan.params.get("max_bytes")
    for c in plan.candidates:
        if c.size is not None and max_bytes is not None and c.size > max_bytes:
            quarantined.append(_quarantine_row(c.uri, plan.dataset, "too_large",
                                               f"{c.size} bytes > max_bytes={max_bytes}", c.size, c.mtime, now))
            continue
        data = _read(c, max_bytes)
        if isinstance(data, tuple):
            quarantined.append(_quarantine_row(c.uri, plan.dataset, *data, c.size, c.mtime, now))
            continue
        try:
            images.append(_image_row(c, data, plan.params, country_from_code(c.country), now))
        except BadInput as bad:
            detail = _named(bad.detail, c.uri) if bad.reason in ("unsupported_format", "not_an_image") else bad.detail
            quarantined.append(_quarantine_row(c.uri, plan.dataset, bad.reason, detail, c.size, c.mtime, now))
    commit_shard(
        root, STAGE, plan.dataset, plan.shard_id,
        [Output("images", {"dataset": plan.dataset}, to_table(images, IMAGES)),
         Output("quarantine", {"dataset": plan.dataset}, to_table(quarantined, QUARANTINE))],
        params=plan.params,
    )
    return {"shard_id": plan.shard_id, "cached": False, "images": len(images), "quarantined": len(quarantined)}


def run_counts(root: DataRoot, dataset: str, ingested_at: datetime) -> dict[str, int]:
    """What one run added, as the views show it: images (first copies) and quarantine rows
    (refusals and later copies of the same bytes) stamped with the run's start."""
    with catalog(root) as cat:
        return cat.ingested_in_run(dataset, ingested_at)


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
