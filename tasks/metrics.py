"""Image-level evaluation metrics, each with a percentile bootstrap CI over images.

Continents come from tasks.geo (country_converter's 7-continent classification, the same the
ingest writes into `images.continent`); a country's point for distance metrics is a
representative point of its largest Natural Earth polygon (the same polygons tasks.geo uses).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from tasks.geo import _geocoder, country_from_code

EARTH_RADIUS_KM = 6371.0
DISTANCE_KM = (2500, 750)
_BOOT_CELLS = 2**23  # resample indices drawn per chunk (bounds memory for large n)


def bootstrap_ci(values: np.ndarray, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float, int]:
    """(mean, low, high, n): percentile bootstrap of the mean over images. n_boot=0: no CI (NaN)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    n = len(v)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    mean = float(v.mean())
    if n_boot <= 0:
        return mean, math.nan, math.nan, n
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOT_CELLS // n)
    means = np.concatenate([v[rng.integers(0, n, size=(min(chunk, n_boot - start), n))].mean(axis=1)
                            for start in range(0, n_boot, chunk)])
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return mean, float(low), float(high), n


def continent_of(iso2: str) -> str | None:
    """ISO alpha-2 -> one of Africa, Antarctica, Asia, Europe, North America, Oceania, South America."""
    country = country_from_code(iso2) if iso2 else None
    return country.continent if country else None


def _largest_part(geom):
    """The part with the largest area (degrees^2 scaled by cos(latitude), ~ true area)."""
    parts = getattr(geom, "geoms", [geom])
    return max(parts, key=lambda p: p.area * math.cos(math.radians(p.centroid.y)))


@lru_cache(maxsize=1)
def representative_points() -> dict[str, tuple[float, float]]:
    """iso2 -> (lat, lon): a point inside each country's largest polygon (mainland France, not Guiana)."""
    tree, iso2, _ = _geocoder()
    best: dict[str, tuple[float, object]] = {}
    for code, geom in zip(iso2, tree.geometries):
        country = country_from_code(code) if code and code != "-99" else None
        if country is None:  # areas without an ISO code: their sovereign has its own polygon
            continue
        part = _largest_part(geom)
        size = part.area * math.cos(math.radians(part.centroid.y))
        if country.code not in best or size > best[country.code][0]:
            best[country.code] = (size, part)
    out = {}
    for code, (_, part) in sorted(best.items()):
        point = part.representative_point()
        out[code] = (float(point.y), float(point.x))
    return out


def haversine_km(lat1, lon1, lat2, lon2) -> np.ndarray:
    """Great-circle distance in km (numpy broadcasting; degrees in)."""
    lat1, lon1, lat2, lon2 = (np.radians(np.asarray(a, dtype=np.float64)) for a in (lat1, lon1, lat2, lon2))
    h = np.sin((lat2 - lat1) / 2) ** 2 + np.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0)))


def _row(metric: str, values: np.ndarray, n_boot: int, seed: int) -> dict:
    value, low, high, n = bootstrap_ci(values, n_boot=n_boot, seed=seed)
    return {"metric": metric, "value": value, "ci_low": low, "ci_high": high, "n": n}


def coverage_row(has_answer: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict:
    """`coverage`: the fraction of images with at least one crop."""
    return _row("coverage", np.asarray(has_answer, dtype=bool), n_boot, seed)


def image_metrics(truth: list[str], ranked: list[list[str]], lat: np.ndarray | None, lon: np.ndarray | None,
                  n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """top1, top5, continent and (over images with coordinates) within_2500km / within_750km.

    `ranked[i]` is image i's predicted iso2 codes, best first; an empty list counts as wrong.
    """
    if len(truth) != len(ranked):
        raise ValueError(f"truth has {len(truth)} images, ranked {len(ranked)}")
    top1 = [r[0] if r else None for r in ranked]
    rows = [
        _row("top1", np.array([p is not None and p == t for p, t in zip(top1, truth)]), n_boot, seed),
        _row("top5", np.array([t in r[:5] for t, r in zip(truth, ranked)]), n_boot, seed),
    ]
    same_continent = []
    for p, t in zip(top1, truth):
        cont = continent_of(t)
        same_continent.append(p is not None and cont is not None and continent_of(p) == cont)
    rows.append(_row("continent", np.array(same_continent), n_boot, seed))
    if lat is None or lon is None:
        return rows
    lat, lon = np.asarray(lat, dtype=np.float64), np.asarray(lon, dtype=np.float64)
    has_coords = np.isfinite(lat) & np.isfinite(lon)
    if not has_coords.any():
        return rows
    points = representative_points()
    pred = np.array([points.get(p, (math.nan, math.nan)) if p else (math.nan, math.nan) for p in top1]).reshape(-1, 2)
    dist = haversine_km(lat, lon, pred[:, 0], pred[:, 1])[has_coords]  # NaN: no prediction -> wrong
    for km in DISTANCE_KM:
        rows.append(_row(f"within_{km}km", dist <= km, n_boot, seed))
    return rows
