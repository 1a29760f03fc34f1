import pytest

from tasks.geo import countries_at, country_from_code, country_from_name
from tasks.ingest import detect_swapped

# Real spellings seen in G50 folders, OSV-5M captions and G3 manifests.
VARIANTS = [
    ("Brasil", "BR"),
    ("Brazil", "BR"),
    ("Kazakstan", "KZ"),
    ("South Korea", "KR"),
    ("Czechia", "CZ"),
    ("Czech Republic", "CZ"),
    ("Türkiye", "TR"),
    ("Turkey", "TR"),
    ("England", "GB"),
    ("Scotland", "GB"),
    ("Wales", "GB"),
    ("United Kingdom", "GB"),
    ("United States", "US"),
    ("United_States", "US"),
    ("Russia", "RU"),
    ("Hong Kong", "HK"),
    ("Ivory Coast", "CI"),
    ("Eswatini", "SZ"),
    ("North Macedonia", "MK"),
    ("Namibia", "NA"),
    ("Curaçao", "CW"),
]
NOT_COUNTRIES = ["Utah", "Idaho", "California", "Texas", "Moscow", "Paris", "Bavaria", "", "   ", "asdf"]


@pytest.mark.parametrize("name,code", VARIANTS)
def test_country_variants_resolve(name, code):
    country = country_from_name(name)
    assert country is not None and country.code == code
    assert country.name and country.continent


@pytest.mark.parametrize("name", NOT_COUNTRIES)
def test_non_countries_are_not_guessed(name):
    assert country_from_name(name) is None


def test_codes_and_continents():
    assert country_from_code("NA").name == "Namibia"  # the OSV-5M trap: a string, not a null
    assert country_from_code("gbr").code == "GB"
    assert country_from_code("ZZ") is None
    assert country_from_code("XK").name == "Kosovo"
    assert {country_from_code(c).continent for c in ("US", "BR", "JP", "FR", "ZA", "AU")} == {
        "North America", "South America", "Asia", "Europe", "Africa", "Oceania"}


# (lat, lon) -> expected ISO code: borders, enclaves, islands and the IM2GPS traps.
POINTS = [
    ((46.73, -117.00), "US"),  # "Moscow_00007" is Moscow, Idaho
    ((55.75, 37.62), "RU"),  # the real Moscow
    ((22.28, 114.16), "HK"),  # Hong Kong, not China
    ((78.22, 15.65), "NO"),  # Svalbard (Longyearbyen, on the coast)
    ((-0.74, -90.31), "EC"),  # Galapagos
    ((12.52, -70.03), "AW"),  # Aruba
    ((47.56, 7.59), "CH"),  # Basel ...
    ((47.59, 7.56), "FR"),  # ... and Saint-Louis across the border
    ((41.9029, 12.4534), "VA"),  # Vatican City inside Rome
    ((43.7384, 7.4246), "MC"),  # Monaco
    ((36.14, -5.35), "GI"),  # Gibraltar
    ((-21.13, -175.20), "TO"),  # Tonga
    ((-41.29, 174.78), "NZ"),  # Wellington ("Tonga_00002" is in New Zealand)
]


def test_reverse_geocoding_at_known_points():
    found = countries_at([p[0][0] for p in POINTS], [p[0][1] for p in POINTS])
    assert [c.code if c else None for c, _ in found] == [code for _, code in POINTS]


def test_open_sea_has_no_country():
    (country, how), = countries_at([0.0], [-30.0])  # mid-Atlantic
    assert country is None and how == "at_sea"


def test_swapped_columns_detected_by_range_and_by_land():
    lats = [40.7, 34.0, 51.5, -33.9, 35.7, 48.9, 19.4, -23.5, 55.8, 1.3, 37.6, 28.6]
    lons = [-74.0, -118.2, -0.1, 151.2, 139.7, 2.35, -99.1, -46.6, 37.6, 103.8, 127.0, 77.2]
    assert detect_swapped(lats, lons) is False
    assert detect_swapped(lons, lats) is True  # many |LAT| > 90
    europe = [(48.9, 2.35), (52.5, 13.4), (41.9, 12.5), (40.4, -3.7), (50.1, 14.4), (59.3, 18.1),
              (47.5, 19.0), (45.8, 16.0), (44.4, 26.1), (53.3, -6.3), (60.2, 24.9), (38.7, -9.1)]
    la, lo = [p[0] for p in europe], [p[1] for p in europe]
    assert detect_swapped(la, lo) is False
    assert detect_swapped(lo, la) is True  # in range both ways, but only one way lands on land
    # one bad row in an otherwise fine file is that row's problem, not the file's
    assert detect_swapped(la + [123.4], lo + [10.0]) is False
