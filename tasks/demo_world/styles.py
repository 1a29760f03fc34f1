"""The demo world's country styles: how each country looks, per feature group.

Signal strengths differ per group on purpose (see `CountryStyle`), so the per-group experts have
something to find, and some groups (vehicles) carry little signal, as in real data.
"""

from __future__ import annotations

from dataclasses import dataclass

RGB = tuple[int, int, int]


# Seed-stream ids: one independent stream per split so adding images never shifts others.
_SPLIT_G50, _SPLIT_IM2GPS, _SPLIT_MESSY = 0, 1, 2

# Visualisation colours for the COCO "categories" entry (Cityscapes-like), keyed by label name.
CATEGORY_COLORS: dict[str, RGB] = {
    "road": (128, 64, 128), "lane-marking": (255, 255, 255), "sidewalk": (244, 35, 232),
    "terrain": (152, 251, 152), "building": (70, 70, 70), "vegetation": (107, 142, 35),
    "car": (0, 0, 142), "truck": (0, 0, 70), "pole": (153, 153, 153),
    "bollard": (255, 128, 0), "traffic-sign": (220, 220, 0), "sky": (70, 130, 180),
}

# Shared vehicle colours (white, silver, grey, black, red, blue, dark green, beige):
# every country draws from this, which is what keeps the vehicle signal weak.
VEHICLE_PALETTE: tuple[RGB, ...] = (
    (232, 232, 230), (172, 176, 180), (105, 108, 112), (28, 28, 32),
    (165, 32, 30), (42, 62, 128), (44, 72, 52), (198, 184, 150),
)
BODY_TYPES = ("sedan", "hatch", "suv", "van")

# --------------------------------------------------------------------------- styles


@dataclass(frozen=True)
class CountryStyle:
    """How one country looks, per feature group.

    Signal strength per group is deliberate, so the per-group classifiers have
    something real but uneven to learn:

    - ground, STRONG: the lane-marking pattern/colour is unique per country except
      US/BR (both double yellow + white edges; they differ by asphalt tone, red earth
      and sidewalks). JP/FR are both white dashed but with different dash rhythm.
      Terrain palettes overlap (green grass in US/FR/JP, red earth in BR/AU/ZA).
    - furniture, STRONG: bollard body + band colour and band layout are unique per
      country (FR white/red band, NO black/yellow reflector, US yellow/black cap,
      JP orange/white, ZA dark red/white, AU white/black cap post, BR concrete/yellow,
      IN black/white stripes). Sign shapes overlap (diamond US/AU, triangle FR/ZA/NO,
      circle BR/JP/IN) and pole styles overlap.
    - structure, MEDIUM: facade palettes, roof shapes, window patterns and storeys
      overlap between several countries.
    - vegetation, MEDIUM: tree kinds overlap (deciduous nearly everywhere), leaf
      colours are close; palms (BR/IN) and conifers (NO/US/JP) help a little.
    - vehicle, WEAK: colours come from the shared `VEHICLE_PALETTE`; a country only
      doubles the weight of 1-2 colours and shifts body-type shares slightly.
    """

    name: str                       # English name = G50 folder name
    iso2: str
    anchors: tuple[tuple[float, float], ...]  # (lat, lon) degrees, inland
    cities: tuple[str, ...]         # decoy IM2GPS file-name prefixes
    # ground
    asphalt: RGB
    lane: str                       # key of LANE_PATTERNS
    dash: tuple[float, float]       # (period in depth units, dash share 0..1)
    sidewalk: RGB
    sidewalk_p: float               # probability the street has sidewalks
    terrain: tuple[RGB, ...]
    # structure
    facades: tuple[RGB, ...]
    roofs: tuple[str, ...]          # flat | gabled | hip
    roof_colors: tuple[RGB, ...]
    windows: str                    # grid | bands | sparse
    storeys: tuple[int, int]        # inclusive range
    # vegetation
    trees: tuple[str, ...]          # palm | conifer | deciduous | bush
    leaves: tuple[RGB, ...]
    trunk: RGB
    # vehicle
    car_bias: tuple[int, ...]       # VEHICLE_PALETTE indices with doubled weight
    body_p: tuple[float, float, float, float]  # shares of sedan/hatch/suv/van
    truck_p: float                  # chance a vehicle is a truck
    # furniture
    bollard: RGB
    bollard_band: RGB
    band: str                       # top | middle | stripes | reflector | cap
    bollard_shape: str              # round | square | post
    sign_shape: str                 # circle | triangle | diamond | rectangle
    sign_fill: RGB
    sign_border: RGB
    pole: RGB
    pole_style: str                 # wood | metal | concrete


COUNTRIES: tuple[CountryStyle, ...] = (
    CountryStyle(
        name="United States", iso2="US",
        anchors=((39.74, -104.99), (39.10, -94.58), (32.78, -96.80)),
        cities=("NewYork", "Chicago", "Seattle", "Boston"),
        asphalt=(68, 68, 72), lane="double_yellow", dash=(1.0, 0.35),
        sidewalk=(184, 180, 172), sidewalk_p=0.6,
        terrain=((118, 140, 70), (176, 152, 102), (98, 124, 62)),
        facades=((168, 92, 72), (200, 190, 170), (150, 150, 156), (222, 212, 192)),
        roofs=("flat", "gabled"), roof_colors=((78, 78, 84), (108, 72, 52)),
        windows="grid", storeys=(1, 4),
        trees=("deciduous", "conifer"), leaves=((62, 110, 52), (44, 92, 48)),
        trunk=(92, 66, 46),
        car_bias=(3, 4), body_p=(0.3, 0.15, 0.4, 0.15), truck_p=0.22,
        bollard=(238, 198, 24), bollard_band=(24, 24, 24), band="cap", bollard_shape="round",
        sign_shape="diamond", sign_fill=(244, 198, 24), sign_border=(24, 24, 24),
        pole=(112, 82, 56), pole_style="wood",
    ),
    CountryStyle(
        name="Brazil", iso2="BR",
        anchors=((-15.79, -47.88), (-19.92, -43.94), (-16.68, -49.25)),
        cities=("Rio", "SaoPaulo", "Salvador", "Recife"),
        asphalt=(88, 85, 82), lane="double_yellow", dash=(1.0, 0.35),
        sidewalk=(202, 196, 186), sidewalk_p=0.8,
        terrain=((152, 78, 46), (112, 142, 62), (140, 96, 60)),
        facades=((228, 200, 122), (122, 190, 180), (228, 152, 132), (236, 234, 224)),
        roofs=("flat", "hip"), roof_colors=((168, 82, 52), (150, 150, 150)),
        windows="sparse", storeys=(1, 3),
        trees=("palm", "deciduous", "bush"), leaves=((52, 130, 52), (72, 140, 42)),
        trunk=(110, 86, 60),
        car_bias=(0, 1), body_p=(0.35, 0.35, 0.2, 0.1), truck_p=0.18,
        bollard=(150, 150, 146), bollard_band=(240, 200, 30), band="middle", bollard_shape="square",
        sign_shape="circle", sign_fill=(240, 240, 236), sign_border=(200, 30, 30),
        pole=(178, 178, 172), pole_style="concrete",
    ),
    CountryStyle(
        name="Japan", iso2="JP",
        anchors=((36.65, 138.18), (36.14, 137.25), (35.18, 136.91)),
        cities=("Tokyo", "Kyoto", "Osaka", "Sapporo"),
        asphalt=(58, 60, 66), lane="white_dashed", dash=(0.8, 0.5),
        sidewalk=(168, 168, 164), sidewalk_p=0.7,
        terrain=((108, 130, 72), (90, 110, 62), (130, 124, 96)),
        facades=((210, 206, 196), (180, 176, 166), (160, 150, 140), (230, 226, 216)),
        roofs=("flat", "hip"), roof_colors=((70, 76, 92), (60, 60, 62)),
        windows="bands", storeys=(2, 6),
        trees=("deciduous", "conifer", "bush"), leaves=((70, 120, 62), (52, 100, 60)),
        trunk=(86, 70, 56),
        car_bias=(0,), body_p=(0.25, 0.3, 0.15, 0.3), truck_p=0.2,
        bollard=(240, 122, 32), bollard_band=(240, 240, 236), band="top", bollard_shape="round",
        sign_shape="circle", sign_fill=(32, 72, 172), sign_border=(240, 240, 240),
        pole=(180, 180, 176), pole_style="concrete",
    ),
    CountryStyle(
        name="France", iso2="FR",
        anchors=((48.86, 2.35), (45.76, 4.84), (47.90, 1.90)),
        cities=("Paris", "Marseille", "Lyon", "Toulouse"),
        asphalt=(78, 76, 78), lane="white_dashed", dash=(1.6, 0.3),
        sidewalk=(190, 184, 170), sidewalk_p=0.75,
        terrain=((100, 134, 62), (130, 150, 82), (150, 140, 100)),
        facades=((226, 216, 190), (210, 200, 176), (236, 226, 206), (190, 170, 140)),
        roofs=("gabled", "hip"), roof_colors=((88, 94, 106), (176, 86, 56)),
        windows="grid", storeys=(3, 6),
        trees=("deciduous",), leaves=((80, 126, 56), (62, 110, 50)),
        trunk=(96, 80, 62),
        car_bias=(1, 5), body_p=(0.3, 0.45, 0.15, 0.1), truck_p=0.18,
        bollard=(236, 236, 230), bollard_band=(200, 30, 30), band="top", bollard_shape="round",
        sign_shape="triangle", sign_fill=(240, 240, 236), sign_border=(200, 30, 30),
        pole=(120, 126, 132), pole_style="metal",
    ),
    CountryStyle(
        name="South Africa", iso2="ZA",
        anchors=((-26.20, 28.05), (-29.12, 26.21), (-25.75, 28.19)),
        cities=("CapeTown", "Durban", "Johannesburg", "Pretoria"),
        asphalt=(90, 88, 84), lane="yellow_edge", dash=(1.0, 0.4),
        sidewalk=(176, 168, 150), sidewalk_p=0.35,
        terrain=((172, 140, 80), (150, 96, 60), (140, 150, 82)),
        facades=((222, 216, 200), (190, 170, 140), (170, 160, 150), (200, 120, 90)),
        roofs=("hip", "flat"), roof_colors=((130, 136, 142), (160, 72, 52)),
        windows="sparse", storeys=(1, 2),
        trees=("bush", "deciduous"), leaves=((92, 116, 52), (110, 122, 62)),
        trunk=(100, 80, 60),
        car_bias=(0, 2), body_p=(0.3, 0.3, 0.25, 0.15), truck_p=0.25,
        bollard=(150, 44, 40), bollard_band=(238, 238, 232), band="middle", bollard_shape="square",
        sign_shape="triangle", sign_fill=(240, 240, 236), sign_border=(200, 30, 30),
        pole=(122, 126, 130), pole_style="metal",
    ),
    CountryStyle(
        name="Australia", iso2="AU",
        anchors=((-23.70, 133.88), (-35.28, 149.13), (-32.25, 148.60)),
        cities=("Sydney", "Melbourne", "Perth", "Brisbane"),
        asphalt=(96, 92, 88), lane="white_dashed_edge", dash=(1.2, 0.35),
        sidewalk=(196, 188, 172), sidewalk_p=0.45,
        terrain=((176, 92, 52), (190, 160, 100), (150, 150, 92)),
        facades=((200, 180, 150), (230, 226, 210), (172, 120, 92), (190, 190, 180)),
        roofs=("hip", "gabled"), roof_colors=((150, 62, 46), (122, 126, 132)),
        windows="sparse", storeys=(1, 2),
        trees=("deciduous", "bush"), leaves=((112, 132, 92), (92, 116, 82)),
        trunk=(170, 160, 140),
        car_bias=(0, 3), body_p=(0.3, 0.2, 0.35, 0.15), truck_p=0.25,
        bollard=(242, 242, 238), bollard_band=(22, 22, 22), band="cap", bollard_shape="post",
        sign_shape="diamond", sign_fill=(244, 198, 24), sign_border=(24, 24, 24),
        pole=(112, 82, 56), pole_style="wood",
    ),
    CountryStyle(
        name="Norway", iso2="NO",
        anchors=((61.11, 10.47), (62.57, 11.38), (60.80, 11.07)),
        cities=("Oslo", "Bergen", "Tromso", "Trondheim"),
        asphalt=(66, 67, 72), lane="yellow_dashed", dash=(1.0, 0.4),
        sidewalk=(170, 170, 170), sidewalk_p=0.4,
        terrain=((236, 238, 242), (100, 124, 66), (212, 216, 226)),
        facades=((160, 42, 36), (230, 226, 212), (212, 182, 92), (230, 226, 212)),
        roofs=("gabled",), roof_colors=((50, 50, 56), (70, 60, 56)),
        windows="sparse", storeys=(1, 3),
        trees=("conifer",), leaves=((30, 70, 46), (40, 82, 52)),
        trunk=(80, 62, 50),
        car_bias=(1, 6), body_p=(0.25, 0.3, 0.35, 0.1), truck_p=0.2,
        bollard=(26, 26, 26), bollard_band=(244, 214, 30), band="reflector", bollard_shape="post",
        sign_shape="triangle", sign_fill=(244, 214, 40), sign_border=(200, 30, 30),
        pole=(122, 126, 130), pole_style="metal",
    ),
    CountryStyle(
        name="India", iso2="IN",
        anchors=((28.61, 77.21), (21.15, 79.09), (26.91, 75.79)),
        cities=("Mumbai", "Delhi", "Kolkata", "Chennai"),
        asphalt=(100, 98, 92), lane="faded", dash=(1.0, 0.3),
        sidewalk=(180, 170, 150), sidewalk_p=0.3,
        terrain=((190, 160, 110), (160, 120, 80), (130, 140, 80)),
        facades=((230, 200, 150), (200, 120, 90), (150, 180, 170), (222, 222, 210)),
        roofs=("flat",), roof_colors=((150, 140, 130), (120, 110, 100)),
        windows="sparse", storeys=(1, 4),
        trees=("deciduous", "palm", "bush"), leaves=((80, 120, 50), (100, 130, 52)),
        trunk=(100, 80, 60),
        car_bias=(0, 1), body_p=(0.2, 0.5, 0.15, 0.15), truck_p=0.3,
        bollard=(236, 236, 230), bollard_band=(22, 22, 22), band="stripes", bollard_shape="square",
        sign_shape="circle", sign_fill=(240, 240, 236), sign_border=(200, 30, 30),
        pole=(180, 180, 176), pole_style="concrete",
    ),
)

WHITE: RGB = (236, 236, 230)
YELLOW: RGB = (236, 190, 40)
# Lane patterns: (fraction across the road 0..1, half-width as a fraction of road width,
# colour, dashed?) per painted line.
LANE_PATTERNS: dict[str, tuple[tuple[float, float, RGB, bool], ...]] = {
    "double_yellow": ((0.488, 0.006, YELLOW, False), (0.512, 0.006, YELLOW, False),
                      (0.025, 0.007, WHITE, False), (0.975, 0.007, WHITE, False)),
    "white_dashed": ((0.5, 0.008, WHITE, True),),
    "white_dashed_edge": ((0.5, 0.008, WHITE, True), (0.025, 0.007, WHITE, False),
                          (0.975, 0.007, WHITE, False)),
    "yellow_edge": ((0.03, 0.009, YELLOW, False), (0.97, 0.009, YELLOW, False),
                    (0.5, 0.006, WHITE, True)),
    "yellow_dashed": ((0.5, 0.008, YELLOW, True),),
    "faded": ((0.5, 0.006, WHITE, True),),
}
