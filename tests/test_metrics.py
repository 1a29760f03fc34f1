import math

import numpy as np
import pytest

from tasks.geo import countries_at
from tasks.metrics import (
    bootstrap_ci,
    continent_of,
    coverage_row,
    haversine_km,
    image_metrics,
    representative_points,
)


def test_bootstrap_ci_contains_mean_and_narrows():
    small = np.arange(20) % 2 == 0
    large = np.arange(2000) % 2 == 0
    m, lo, hi, n = bootstrap_ci(small, n_boot=500, seed=1)
    assert (m, n) == (0.5, 20) and lo < m < hi
    m2, lo2, hi2, n2 = bootstrap_ci(large, n_boot=500, seed=1)
    assert (m2, n2) == (0.5, 2000) and lo2 < m2 < hi2
    assert hi2 - lo2 < (hi - lo) / 5  # ~1/sqrt(100)
    assert 0.4 < lo2 and hi2 < 0.6


def test_bootstrap_ci_deterministic_and_edge_cases():
    v = np.random.default_rng(0).random(100)
    assert bootstrap_ci(v, seed=3) == bootstrap_ci(v, seed=3)
    assert bootstrap_ci(v, seed=3) != bootstrap_ci(v, seed=4)
    m, lo, hi, n = bootstrap_ci([])
    assert n == 0 and all(math.isnan(x) for x in (m, lo, hi))
    assert bootstrap_ci([0.25]) == (0.25, 0.25, 0.25, 1)
    m, lo, hi, n = bootstrap_ci([1.0, 0.0], n_boot=0)
    assert (m, n) == (0.5, 2) and math.isnan(lo) and math.isnan(hi)


def test_continent_of():
    assert continent_of("FR") == "Europe"
    assert continent_of("JP") == "Asia"
    assert continent_of("BR") == "South America"
    assert continent_of("US") == "North America"
    assert continent_of("AU") == "Oceania"
    assert continent_of("ZZ") is None and continent_of("") is None


def test_representative_points_inside_mainland():
    points = representative_points()
    codes = ["FR", "US", "NO", "RU", "ID", "CL", "JP", "BR", "GB", "NZ", "ZA", "CA"]
    found = countries_at([points[c][0] for c in codes], [points[c][1] for c in codes])
    assert [(c.code if c else None, how) for c, how in found] == [(c, "polygon") for c in codes]
    lat, lon = points["FR"]
    assert 42 < lat < 51.5 and -5 < lon < 8.5  # metropolitan France, not Guiana or Réunion
    lat, lon = points["US"]
    assert 25 < lat < 49 and -125 < lon < -67  # contiguous states
    assert points["NO"][0] < 72  # mainland, not Svalbard
    assert representative_points() is points  # cached


def test_haversine():
    assert haversine_km(48.8566, 2.3522, 51.5074, -0.1278) == pytest.approx(344, abs=2)  # Paris-London
    d = haversine_km(np.array([0.0, 0.0]), np.array([0.0, 0.0]), np.array([0.0, 0.0]), np.array([0.0, 180.0]))
    np.testing.assert_allclose(d, [0.0, math.pi * 6371.0])


def test_image_metrics_hand_case():
    truth = ["FR", "JP", "BR", "US"]
    ranked = [
        ["FR", "DE"],  # right
        ["CN", "KR", "TH", "VN", "JP"],  # top-5, same continent
        ["AR"],  # wrong, same continent
        [],  # no answer
    ]
    paris = (48.86, 2.35)
    lat = np.array([paris[0], 35.68, -23.55, np.nan])  # the US image has no coordinates
    lon = np.array([paris[1], 139.69, -46.63, np.nan])
    rows = {r["metric"]: r for r in image_metrics(truth, ranked, lat, lon, n_boot=200)}
    assert list(rows) == ["top1", "top5", "continent", "within_2500km", "within_750km"]
    assert (rows["top1"]["value"], rows["top1"]["n"]) == (0.25, 4)
    assert rows["top5"]["value"] == 0.5
    assert rows["continent"]["value"] == 0.75
    # over the 3 images with coordinates: Paris ~240 km from France's point, Sao Paulo ~2240 km
    # from Argentina's, Tokyo ~3660 km from China's
    assert rows["within_2500km"]["n"] == 3 and rows["within_750km"]["n"] == 3
    assert rows["within_2500km"]["value"] == pytest.approx(2 / 3)
    assert rows["within_750km"]["value"] == pytest.approx(1 / 3)
    for r in rows.values():
        assert r["ci_low"] <= r["value"] <= r["ci_high"]


def test_image_metrics_without_coordinates():
    rows = image_metrics(["FR"], [["FR"]], None, None, n_boot=10)
    assert [r["metric"] for r in rows] == ["top1", "top5", "continent"]
    rows = image_metrics(["FR"], [["FR"]], np.array([np.nan]), np.array([np.nan]), n_boot=10)
    assert [r["metric"] for r in rows] == ["top1", "top5", "continent"]
    with pytest.raises(ValueError):
        image_metrics(["FR"], [], None, None)


def test_coverage_row():
    row = coverage_row(np.array([True, True, False, True]), n_boot=100)
    assert row["metric"] == "coverage" and row["value"] == 0.75 and row["n"] == 4
    assert row["ci_low"] <= 0.75 <= row["ci_high"]
