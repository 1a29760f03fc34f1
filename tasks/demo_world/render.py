"""Drawing one demo street scene: the RGB image, its COCO-panoptic id image and segments.

Pure numpy + PIL, seeded by the caller's generator: the same generator gives the same pixels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from tasks.demo_world.styles import (BODY_TYPES, CATEGORY_COLORS, LANE_PATTERNS, RGB, VEHICLE_PALETTE,
                                     CountryStyle)

LABEL_MAP_PATH = Path(__file__).resolve().parents[2] / "models" / "label_maps" / "demo.json"

# --------------------------------------------------------------------------- labels


def load_demo_labels() -> list[dict[str, Any]]:
    """The demo label map is the single source of truth for ids, things and groups."""
    data = json.loads(LABEL_MAP_PATH.read_text())
    return list(data["labels"])


def label_ids_of_map() -> dict[str, int]:
    ids = {lab["name"]: int(lab["id"]) for lab in load_demo_labels()}
    missing = set(CATEGORY_COLORS) - set(ids)
    if missing:
        raise ValueError(f"{LABEL_MAP_PATH} lacks labels the generator draws: {sorted(missing)}")
    return ids


def coco_categories() -> list[dict[str, Any]]:
    """COCO-panoptic categories; supercategory = feature group."""
    return [
        {"id": int(lab["id"]), "name": lab["name"], "isthing": int(bool(lab["isthing"])),
         "supercategory": lab["group"], "color": list(CATEGORY_COLORS.get(lab["name"], (0, 0, 0)))}
        for lab in load_demo_labels()
    ]


# --------------------------------------------------------------------------- drawing


def _id_rgb(seg_id: int) -> RGB:
    """COCO-panoptic encoding: id = R + 256*G + 256**2*B."""
    return (seg_id & 255, (seg_id >> 8) & 255, (seg_id >> 16) & 255)


def _jitter(rng: np.random.Generator, color: RGB, sigma: float) -> RGB:
    c = np.asarray(color, float) + rng.normal(0.0, sigma, 3)
    return tuple(int(v) for v in np.clip(c, 0, 255))  # type: ignore[return-value]


def _mix(a: RGB, b: RGB, w: float) -> RGB:
    """(1-w)*a + w*b."""
    return tuple(int(round((1 - w) * x + w * y)) for x, y in zip(a, b))  # type: ignore[return-value]


def pick(rng: np.random.Generator, seq: tuple) -> Any:
    return seq[int(rng.integers(len(seq)))]


class _Canvas:
    """Paints the RGB frame and the panoptic id map with identical shapes.

    Shapes go to both images (so masks match pixels exactly); `detail_*` paints only the
    RGB frame and must stay inside an already labelled shape (windows, bands, lights).
    """

    def __init__(self, w: int, h: int, label_ids: dict[str, int]):
        self.w, self.h = w, h
        self.rgb = Image.new("RGB", (w, h))
        self.ids = Image.new("RGB", (w, h))
        self.paint = ImageDraw.Draw(self.rgb)
        self.label = ImageDraw.Draw(self.ids)
        self.label_ids = label_ids
        self.segments: dict[int, int] = {}  # segment id -> category id
        self._count: dict[int, int] = {}

    def segment(self, name: str, thing: bool) -> int:
        """Stuff: one segment per class (cat*1000); things: cat*1000 + instance number."""
        cat = self.label_ids[name]
        k = 0
        if thing:
            k = self._count.get(cat, 0) + 1
            self._count[cat] = k
        sid = cat * 1000 + k
        self.segments[sid] = cat
        return sid

    def polygon(self, pts: list, color: RGB, sid: int) -> None:
        self.paint.polygon(pts, fill=color)
        self.label.polygon(pts, fill=_id_rgb(sid))

    def rect(self, box: list, color: RGB, sid: int) -> None:
        box = _ordered(box)
        self.paint.rectangle(box, fill=color)
        self.label.rectangle(box, fill=_id_rgb(sid))

    def ellipse(self, box: list, color: RGB, sid: int) -> None:
        box = _ordered(box)
        self.paint.ellipse(box, fill=color)
        self.label.ellipse(box, fill=_id_rgb(sid))

    def detail_rect(self, box: list, color: RGB) -> None:
        self.paint.rectangle(_ordered(box), fill=color)

    def detail_polygon(self, pts: list, color: RGB) -> None:
        self.paint.polygon(pts, fill=color)

    def detail_ellipse(self, box: list, color: RGB) -> None:
        self.paint.ellipse(_ordered(box), fill=color)


def _ordered(box: list) -> list:
    """PIL wants x0 <= x1 and y0 <= y1; tiny far objects can invert their insets."""
    x0, y0, x1, y1 = box
    return [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]


@dataclass(frozen=True)
class _Street:
    """Perspective street geometry in px. t = depth parameter: 0 at the horizon, 1 at the
    bottom row (screen y is linear in t, real depth ~ 1/t)."""

    w: float
    h: float
    horizon: float      # px from top
    vx: float           # vanishing point x, px
    bx: float           # road centre at the bottom row, px
    half_bottom: float  # road half-width at the bottom row, px
    half_top: float     # road half-width at the horizon, px
    sidewalk: float     # sidewalk width at the bottom row, px (0 = none)
    scale: float        # global object scale

    def y(self, t: float) -> float:
        return self.horizon + t * (self.h - self.horizon)

    def left(self, t: float) -> float:
        return (self.vx - self.half_top) + t * ((self.bx - self.half_bottom) - (self.vx - self.half_top))

    def right(self, t: float) -> float:
        return (self.vx + self.half_top) + t * ((self.bx + self.half_bottom) - (self.vx + self.half_top))

    def across(self, t: float, f: float) -> float:
        """x of the point a fraction f across the road at depth t."""
        return self.left(t) + f * (self.right(t) - self.left(t))

    def outer(self, t: float, side: int) -> float:
        """Outer edge of the sidewalk (or the road edge without one); side -1 = left."""
        return self.left(t) - self.sidewalk * t if side < 0 else self.right(t) + self.sidewalk * t


def _make_street(rng: np.random.Generator, w: int, h: int, style: CountryStyle) -> _Street:
    """Random camera: horizon height, vanishing point, road and sidewalk widths vary."""
    has_sidewalk = rng.random() < style.sidewalk_p
    return _Street(
        w=float(w), h=float(h),
        horizon=h * rng.uniform(0.36, 0.50),
        vx=w * rng.uniform(0.38, 0.62),
        bx=w * rng.uniform(0.40, 0.60),
        half_bottom=w * rng.uniform(0.28, 0.42),
        half_top=w * 0.004,
        sidewalk=w * rng.uniform(0.06, 0.14) if has_sidewalk else 0.0,
        scale=rng.uniform(0.85, 1.15),
    )


def _draw_sky(c: _Canvas, st: _Street, rng: np.random.Generator) -> None:
    """Vertical gradient plus a few clouds (sky is dropped downstream; kept for realism)."""
    top = pick(rng, ((88, 148, 214), (150, 180, 214), (178, 180, 186), (110, 160, 220)))
    bottom = _mix(top, (226, 230, 236), rng.uniform(0.4, 0.8))
    rows = int(np.ceil(st.horizon)) + 1
    ramp = np.linspace(0.0, 1.0, rows)[:, None, None]
    grad = (1 - ramp) * np.asarray(top, float) + ramp * np.asarray(bottom, float)
    band = np.broadcast_to(grad, (rows, c.w, 3)).astype(np.uint8)
    c.rgb.paste(Image.fromarray(np.ascontiguousarray(band)), (0, 0))
    c.label.rectangle([0, 0, c.w, rows], fill=_id_rgb(c.segment("sky", False)))
    for _ in range(int(rng.integers(0, 4))):
        cw, ch = st.w * rng.uniform(0.06, 0.18), st.horizon * rng.uniform(0.08, 0.18)
        cx, cy = rng.uniform(0, st.w), rng.uniform(0.1, 0.6) * st.horizon
        c.detail_ellipse([cx - cw, cy - ch, cx + cw, cy + ch], _jitter(rng, (240, 242, 246), 6))


def _draw_ground(c: _Canvas, st: _Street, s: CountryStyle, rng: np.random.Generator) -> None:
    """Terrain everywhere below the horizon, then sidewalks and the road over it."""
    sid = c.segment("terrain", False)
    base = _jitter(rng, pick(rng, s.terrain), 8)
    c.rect([0, st.horizon, c.w, c.h], base, sid)
    for _ in range(int(rng.integers(10, 25))):  # texture blotches, strictly below the horizon
        r = st.w * rng.uniform(0.01, 0.05)
        x, y = rng.uniform(0, st.w), rng.uniform(st.horizon + r * 0.4, st.h + r)
        shade = _mix(base, pick(rng, ((30, 30, 20), (235, 230, 210))), rng.uniform(0.05, 0.2))
        c.detail_ellipse([x - r, y - r * 0.35, x + r, y + r * 0.35], _jitter(rng, shade, 4))
    t_far = 0.0
    if st.sidewalk > 0:
        sw = c.segment("sidewalk", False)
        walk = _jitter(rng, s.sidewalk, 6)
        for side in (-1, 1):
            edge = st.left if side < 0 else st.right
            pts = [(edge(t_far), st.y(t_far)), (st.outer(t_far, side), st.y(t_far)),
                   (st.outer(1.05, side), st.y(1.05)), (edge(1.05), st.y(1.05))]
            c.polygon(pts, walk, sw)
    road = c.segment("road", False)
    tone = _jitter(rng, s.asphalt, 5)
    c.polygon([(st.left(t_far), st.horizon), (st.right(t_far), st.horizon),
               (st.right(1.05), st.y(1.05)), (st.left(1.05), st.y(1.05))], tone, road)
    for f0, f1 in ((0.18, 0.32), (0.68, 0.82)):  # darker wheel tracks, inside the road
        c.detail_polygon(_strip(st, f0, f1, 0.0, 1.05), _mix(tone, (30, 30, 30), rng.uniform(0.05, 0.15)))


def _strip(st: _Street, f0: float, f1: float, t0: float, t1: float) -> list:
    """Quad between road fractions f0..f1 and depths t0..t1 (perspective-correct width)."""
    return [(st.across(t0, f0), st.y(t0)), (st.across(t0, f1), st.y(t0)),
            (st.across(t1, f1), st.y(t1)), (st.across(t1, f0), st.y(t1))]


def _draw_lanes(c: _Canvas, st: _Street, s: CountryStyle, rng: np.random.Generator) -> None:
    """Country lane pattern; dashes are equally spaced in depth (z = 1/t)."""
    faded = s.lane == "faded"
    if faded and rng.random() < 0.5:
        return
    wear = rng.uniform(0.55, 0.8) if faded else rng.uniform(0.0, 0.3)
    period = s.dash[0] * rng.uniform(0.85, 1.15)
    phase = rng.uniform(0.0, period)
    sid = None
    for f, hw, color, dashed in LANE_PATTERNS[s.lane]:
        paint = _mix(_jitter(rng, color, 6), s.asphalt, wear)
        spans = [(0.02, 1.05)]
        if dashed:
            spans = []
            z = 1.0 / 1.05 + phase
            while z < 50.0:  # z=50 is ~2% of the ground height below the horizon
                spans.append((1.0 / (z + period * s.dash[1]), 1.0 / z))
                z += period
        for t0, t1 in spans:
            if st.y(t1) - st.y(t0) < 0.6:  # sub-pixel dash
                continue
            if sid is None:
                sid = c.segment("lane-marking", False)
            c.polygon(_strip(st, f - hw, f + hw, t0, t1), paint, sid)


# --------------------------------------------------------------------------- objects


def _building(c: _Canvas, st: _Street, s: CountryStyle, rng: np.random.Generator, sid: int,
              x0: float, base: float, w: float, storeys: int, storey_h: float) -> None:
    """Facade + roof in the building segment; windows are RGB-only details inside it."""
    top = base - storeys * storey_h
    facade = _jitter(rng, pick(rng, s.facades), 10)
    c.rect([x0, top, x0 + w, base], facade, sid)
    roof = pick(rng, s.roofs)
    roof_c = _jitter(rng, pick(rng, s.roof_colors), 8)
    rh = w * rng.uniform(0.18, 0.35)
    if roof == "gabled":
        c.polygon([(x0 - 1, top), (x0 + w + 1, top), (x0 + w / 2, top - rh)], roof_c, sid)
    elif roof == "hip":
        c.polygon([(x0 - 1, top), (x0 + w + 1, top), (x0 + w * 0.75, top - rh * 0.6),
                   (x0 + w * 0.25, top - rh * 0.6)], roof_c, sid)
    else:  # flat: parapet
        c.rect([x0, top - max(1.0, storey_h * 0.15), x0 + w, top], roof_c, sid)
    _windows(c, s, rng, x0, top, w, storeys, storey_h, facade)


def _windows(c: _Canvas, s: CountryStyle, rng: np.random.Generator, x0: float, top: float,
             w: float, storeys: int, storey_h: float, facade: RGB) -> None:
    if storey_h < 4:
        return
    glass = _jitter(rng, pick(rng, ((58, 70, 92), (90, 110, 130), (200, 190, 140))), 8)
    frame = _mix(facade, (20, 20, 20), 0.25)
    for k in range(storeys):
        y0 = top + k * storey_h + storey_h * 0.25
        y1 = top + k * storey_h + storey_h * 0.75
        if s.windows == "bands":
            c.detail_rect([x0 + w * 0.06, y0, x0 + w * 0.94, y1], glass)
            for m in np.arange(x0 + w * 0.06, x0 + w * 0.94, max(3.0, storey_h * 0.8)):
                c.detail_rect([m, y0, m, y1], frame)
        elif s.windows == "grid":
            cols = max(1, int(round(w / max(4.0, storey_h * 0.9))))
            cell = w / cols
            for j in range(cols):
                cx = x0 + (j + 0.5) * cell
                c.detail_rect([cx - cell * 0.22, y0, cx + cell * 0.22, y1], glass)
        else:  # sparse: 1-2 windows a storey, a door on the ground floor
            for _ in range(int(rng.integers(1, 3))):
                ww = min(w * 0.3, storey_h * 0.6)
                cx = rng.uniform(x0 + ww, x0 + w - ww) if w > 2 * ww else x0 + w / 2
                c.detail_rect([cx - ww / 2, y0, cx + ww / 2, y1], glass)
    door_w = min(w * 0.2, storey_h * 0.45)
    dx = rng.uniform(x0 + door_w, x0 + w - door_w) if w > 2 * door_w else x0 + w / 2
    base = top + storeys * storey_h
    c.detail_rect([dx - door_w / 2, base - storey_h * 0.7, dx + door_w / 2, base - 1], frame)


def _plan_buildings(st: _Street, s: CountryStyle, rng: np.random.Generator) -> list[tuple]:
    """Buildings stand just below the horizon, left/right of the street, never on it."""
    plans = []
    for i in range(int(rng.integers(2, 7))):
        side = (-1, 1)[i] if i < 2 else (-1 if rng.random() < 0.5 else 1)  # first two: one per side
        t = rng.uniform(0.0, 0.07)
        base = st.y(t)
        storey_h = st.h * rng.uniform(0.055, 0.085) * st.scale  # px
        storeys = int(rng.integers(s.storeys[0], s.storeys[1] + 1))
        w = st.w * rng.uniform(0.08, 0.24) * st.scale  # px
        edge = st.outer(t, side)
        # at least half of the facade stays in frame
        lo, hi = (-0.5 * w, edge - 2 - w) if side < 0 else (edge + 2, st.w - 0.5 * w)
        if hi <= lo:
            continue
        plans.append((t, ("building", rng.uniform(lo, hi), base, w, storeys, storey_h)))
    return plans


def _tree(c: _Canvas, s: CountryStyle, rng: np.random.Generator, sid: int, kind: str,
          x: float, base: float, size: float) -> None:
    """One plant in the (stuff) vegetation segment, trunk included."""
    leaf = _jitter(rng, pick(rng, s.leaves), 10)
    trunk = _jitter(rng, s.trunk, 8)
    tw = max(1.0, size * 0.07)
    if kind == "bush":
        for _ in range(int(rng.integers(2, 5))):
            r = size * rng.uniform(0.12, 0.22)
            cx = x + rng.uniform(-0.25, 0.25) * size
            c.ellipse([cx - r, base - 2 * r, cx + r, base], _jitter(rng, leaf, 8), sid)
    elif kind == "conifer":
        c.rect([x - tw / 2, base - size * 0.2, x + tw / 2, base], trunk, sid)
        for k in range(3):
            yb, half = base - size * (0.15 + 0.25 * k), size * (0.3 - 0.07 * k)
            c.polygon([(x - half, yb), (x + half, yb), (x, yb - size * 0.4)], _jitter(rng, leaf, 6), sid)
    elif kind == "palm":
        lean = rng.uniform(-0.15, 0.15) * size
        tx, ty = x + lean, base - size
        c.polygon([(x - tw, base), (x + tw, base), (tx + tw * 0.6, ty), (tx - tw * 0.6, ty)], trunk, sid)
        for ang in np.linspace(0, 2 * np.pi, int(rng.integers(5, 8)), endpoint=False) + rng.uniform(0, 1):
            ex, ey = tx + np.cos(ang) * size * 0.4, ty + abs(np.sin(ang)) * size * 0.25 - size * 0.05
            mx, my = (tx + ex) / 2, min(ty, ey) - size * 0.08
            c.polygon([(tx, ty), (mx, my), (ex, ey), (mx, my + size * 0.06)], _jitter(rng, leaf, 8), sid)
    else:  # deciduous
        c.rect([x - tw / 2, base - size * 0.5, x + tw / 2, base], trunk, sid)
        for _ in range(int(rng.integers(3, 6))):
            r = size * rng.uniform(0.18, 0.28)
            cx, cy = x + rng.uniform(-0.2, 0.2) * size, base - size * rng.uniform(0.6, 0.8)
            c.ellipse([cx - r, cy - r, cx + r, cy + r], _jitter(rng, leaf, 8), sid)


def _plan_trees(st: _Street, s: CountryStyle, rng: np.random.Generator) -> list[tuple]:
    """1-5 plants beside the street; nearer ones are bigger."""
    plans = []
    for _ in range(int(rng.integers(1, 6))):
        side = -1 if rng.random() < 0.5 else 1
        t = rng.uniform(0.05, 0.7)
        size = st.h * rng.uniform(0.3, 0.55) * st.scale  # px at t=1
        kind = pick(rng, s.trees)
        for _try in range(4):  # find a verge that is inside the frame; nearer verges leave it
            grown = size * (0.25 + 0.75 * t)
            spans = {-1: (grown * 0.3, st.outer(t, -1) - grown * 0.35),
                     1: (st.outer(t, 1) + grown * 0.35, st.w - grown * 0.3)}
            if spans[side][1] <= spans[side][0]:
                side = -side
            lo, hi = spans[side]
            if hi > lo:
                plans.append((t, ("tree", kind, rng.uniform(lo, hi), st.y(t), grown)))
                break
            t *= 0.6
    return plans


def _vehicle(c: _Canvas, rng: np.random.Generator, sid: int, truck: bool, body: str,
             color: RGB, xc: float, base: float, cw: float) -> None:
    """Rear view: wheels, body, cabin/box; window, lights and plate are RGB details."""
    ch = cw * {"sedan": 0.72, "hatch": 0.8, "suv": 0.9, "van": 1.0}[body] * (1.2 if truck else 1.0)
    dark = (26, 26, 28)
    for side in (-1, 1):  # wheels
        c.rect([xc + side * 0.45 * cw - 0.09 * cw, base - 0.18 * ch, xc + side * 0.45 * cw + 0.09 * cw, base],
               dark, sid)
    lower = [xc - 0.5 * cw, base - 0.6 * ch, xc + 0.5 * cw, base - 0.1 * ch]
    if truck:
        box = [xc - 0.5 * cw, base - ch, xc + 0.5 * cw, base - 0.1 * ch]
        c.rect(box, color, sid)
        c.detail_rect([xc, box[1] + 2, xc, box[3] - 2], _mix(color, dark, 0.5))  # door seam
        c.detail_rect([box[0], box[3] - 0.08 * ch, box[2], box[3]], dark)  # bumper
    else:
        c.rect(lower, color, sid)
        roof_in = {"sedan": 0.32, "hatch": 0.3, "suv": 0.36, "van": 0.4}[body]
        cabin = [(xc - 0.44 * cw, base - 0.6 * ch), (xc + 0.44 * cw, base - 0.6 * ch),
                 (xc + roof_in * cw, base - ch), (xc - roof_in * cw, base - ch)]
        c.polygon(cabin, color, sid)
        glass = _jitter(rng, (50, 62, 78), 8)
        c.detail_polygon([(xc - 0.38 * cw, base - 0.64 * ch), (xc + 0.38 * cw, base - 0.64 * ch),
                          (xc + (roof_in - 0.05) * cw, base - 0.94 * ch),
                          (xc - (roof_in - 0.05) * cw, base - 0.94 * ch)], glass)
        c.detail_rect([lower[0], lower[3] - 0.1 * ch, lower[2], lower[3]], dark)  # bumper
    light_y = base - 0.5 * ch
    for side in (-1, 1):
        x_out = xc + side * 0.5 * cw
        c.detail_rect([x_out, light_y, x_out - side * 0.12 * cw, light_y + 0.1 * ch], (200, 30, 30))
    c.detail_rect([xc - 0.1 * cw, base - 0.35 * ch, xc + 0.1 * cw, base - 0.25 * ch], (230, 230, 225))


def _plan_vehicles(st: _Street, s: CountryStyle, rng: np.random.Generator) -> list[tuple]:
    """0-3 vehicles in the two lanes; colour from the shared palette with a mild country prior."""
    weights = np.ones(len(VEHICLE_PALETTE))
    weights[list(s.car_bias)] += 1.0
    weights /= weights.sum()
    plans = []
    for _ in range(int(rng.choice(4, p=[0.15, 0.35, 0.3, 0.2]))):
        t = rng.uniform(0.25, 0.85)
        truck = bool(rng.random() < s.truck_p)
        body = BODY_TYPES[int(rng.choice(4, p=s.body_p))]
        road_w = st.right(t) - st.left(t)
        cw = road_w * (rng.uniform(0.34, 0.4) if truck else rng.uniform(0.26, 0.33))
        xc = st.across(t, pick(rng, (0.27, 0.73)) + rng.uniform(-0.05, 0.05))
        color = _jitter(rng, VEHICLE_PALETTE[int(rng.choice(len(weights), p=weights))], 10)
        if truck and rng.random() < 0.5:
            color = _jitter(rng, (236, 236, 232), 8)  # white box trucks everywhere
        plans.append((t, ("vehicle", truck, body, color, xc, st.y(t), cw)))
    return plans


def _pole(c: _Canvas, s: CountryStyle, rng: np.random.Generator, sid: int, x: float,
          base: float, h: float, pw: float, side: int) -> None:
    """Country pole style: wood with crossbar, metal with lamp arm, or plain concrete."""
    color = _jitter(rng, s.pole, 8)
    if s.pole_style == "concrete":
        c.polygon([(x - pw * 0.7, base), (x + pw * 0.7, base), (x + pw * 0.4, base - h),
                   (x - pw * 0.4, base - h)], color, sid)
        return
    c.rect([x - pw / 2, base - h, x + pw / 2, base], color, sid)
    if s.pole_style == "wood":
        c.rect([x - h * 0.12, base - h * 0.92, x + h * 0.12, base - h * 0.92 + max(1.0, pw * 0.6)], color, sid)
    else:  # metal: arm towards the road (side -1 = left of road -> arm points right)
        arm = h * 0.25
        x1 = x - side * arm
        c.rect([x, base - h, x1, base - h + max(1.0, pw * 0.5)], color, sid)
        c.rect([x1 - pw, base - h, x1 + pw, base - h + max(1.5, pw)], color, sid)


def _sign(c: _Canvas, s: CountryStyle, rng: np.random.Generator, pole_sid: int, sign_sid: int,
          x: float, base: float, h: float) -> None:
    """A sign on its own grey post: the post is a pole instance, the plate a traffic-sign."""
    pw = max(1.0, h * 0.04)
    c.rect([x - pw / 2, base - h, x + pw / 2, base], _jitter(rng, (150, 152, 156), 8), pole_sid)
    r = h * rng.uniform(0.16, 0.21)
    cx, cy = x, base - h - r * 0.6
    border, fill = _jitter(rng, s.sign_border, 6), _jitter(rng, s.sign_fill, 6)

    def shape(k: float) -> list:
        if s.sign_shape == "triangle":
            return [(cx, cy - r * k), (cx + r * k, cy + r * 0.75 * k), (cx - r * k, cy + r * 0.75 * k)]
        if s.sign_shape == "diamond":
            return [(cx, cy - r * k), (cx + r * k, cy), (cx, cy + r * k), (cx - r * k, cy)]
        if s.sign_shape == "rectangle":
            return [(cx - r * 1.2 * k, cy - r * 0.8 * k), (cx + r * 1.2 * k, cy - r * 0.8 * k),
                    (cx + r * 1.2 * k, cy + r * 0.8 * k), (cx - r * 1.2 * k, cy + r * 0.8 * k)]
        return []

    if s.sign_shape == "circle":
        c.ellipse([cx - r, cy - r, cx + r, cy + r], border, sign_sid)
        c.detail_ellipse([cx - r * 0.7, cy - r * 0.7, cx + r * 0.7, cy + r * 0.7], fill)
    else:
        c.polygon(shape(1.0), border, sign_sid)
        inner = 0.55 if s.sign_shape == "triangle" else 0.75
        c.detail_polygon([(cx + (px - cx) * inner, cy + (py - cy) * inner) for px, py in shape(1.0)], fill)
    c.detail_rect([cx - r * 0.12, cy - r * 0.25, cx + r * 0.12, cy + r * 0.25], (30, 30, 30))  # symbol


def _bollard(c: _Canvas, s: CountryStyle, rng: np.random.Generator, sid: int, x: float,
             base: float, bh: float, body: RGB, band: RGB) -> None:
    """Country bollard: body shape plus band layout (the strongest furniture cue)."""
    bw = bh * (0.2 if s.bollard_shape == "post" else 0.3)
    top = base - bh
    if s.bollard_shape == "round":
        c.rect([x - bw / 2, top + bw / 2, x + bw / 2, base], body, sid)
        c.ellipse([x - bw / 2, top, x + bw / 2, top + bw], body, sid)
    else:
        c.rect([x - bw / 2, top, x + bw / 2, base], body, sid)
    inner = [x - bw / 2, x + bw / 2]
    if s.band == "top":
        c.detail_rect([inner[0], top + bh * 0.12, inner[1], top + bh * 0.3], band)
    elif s.band == "cap":
        c.detail_rect([inner[0], top + bh * (0.15 if s.bollard_shape == "round" else 0.0), inner[1],
                       top + bh * 0.32], band)
    elif s.band == "middle":
        c.detail_rect([inner[0], top + bh * 0.35, inner[1], top + bh * 0.6], band)
    elif s.band == "stripes":
        for k in range(4):
            c.detail_rect([inner[0], top + bh * (0.08 + 0.22 * k), inner[1], top + bh * (0.18 + 0.22 * k)], band)
    else:  # reflector
        c.detail_rect([x - bw * 0.3, top + bh * 0.1, x + bw * 0.3, top + bh * 0.3], band)


def _plan_furniture(st: _Street, s: CountryStyle, rng: np.random.Generator) -> list[tuple]:
    """Poles and signs on the verge, 0-4 bollards in a row along one kerb."""
    plans = []
    grow = lambda t: (0.3 + 0.7 * t) * st.scale  # noqa: E731 - perspective size factor
    for _ in range(int(rng.integers(0, 3))):
        side, t = (-1 if rng.random() < 0.5 else 1), rng.uniform(0.12, 0.8)
        x = st.outer(t, side) + side * rng.uniform(0.005, 0.03) * st.w * grow(t)
        h = st.h * rng.uniform(0.5, 0.8) * grow(t)
        pw = max(1.5, st.w * 0.008 * grow(t)) * (1.3 if s.pole_style == "concrete" else 1.0)
        plans.append((t, ("pole", x, st.y(t), h, pw, side)))
    for _ in range(int(rng.choice(3, p=[0.3, 0.5, 0.2]))):
        side, t = (-1 if rng.random() < 0.5 else 1), rng.uniform(0.2, 0.9)
        x = st.outer(t, side) + side * rng.uniform(0.005, 0.02) * st.w * grow(t)
        plans.append((t, ("sign", x, st.y(t), st.h * rng.uniform(0.26, 0.36) * grow(t))))
    n = int(rng.choice(5, p=[0.15, 0.2, 0.25, 0.2, 0.2]))
    side = -1 if rng.random() < 0.5 else 1
    z, dz = 1.0 / rng.uniform(0.5, 0.95), rng.uniform(0.12, 0.3)  # depth z = 1/t
    body = _jitter(rng, s.bollard, 8)
    band = _jitter(rng, s.bollard_band, 8)
    for _ in range(n):
        t = 1.0 / z
        z += dz
        if t < 0.3:
            break
        bh = st.h * rng.uniform(0.14, 0.19) * grow(t) * (1.25 if s.bollard_shape == "post" else 1.0)
        edge = st.left(t) if side < 0 else st.right(t)
        x = edge + side * bh * 0.2
        plans.append((t, ("bollard", x, st.y(t), bh, _jitter(rng, body, 4), band)))
    return plans


def _draw_objects(c: _Canvas, st: _Street, s: CountryStyle, rng: np.random.Generator) -> None:
    """Painter's order by depth (far first) so occlusion is physically plausible."""
    plans = (_plan_buildings(st, s, rng) + _plan_trees(st, s, rng)
             + _plan_vehicles(st, s, rng) + _plan_furniture(st, s, rng))
    plans.sort(key=lambda p: p[0])  # stable: ties keep creation order
    building_sid = veg_sid = None
    for _, (kind, *args) in plans:
        if kind == "building":
            building_sid = building_sid or c.segment("building", False)
            _building(c, st, s, rng, building_sid, *args)
        elif kind == "tree":
            veg_sid = veg_sid or c.segment("vegetation", False)
            _tree(c, s, rng, veg_sid, *args)
        elif kind == "vehicle":
            truck = args[0]
            _vehicle(c, rng, c.segment("truck" if truck else "car", True), *args)
        elif kind == "pole":
            _pole(c, s, rng, c.segment("pole", True), *args)
        elif kind == "sign":
            _sign(c, s, rng, c.segment("pole", True), c.segment("traffic-sign", True), *args)
        else:
            _bollard(c, s, rng, c.segment("bollard", True), *args)


def _finish(c: _Canvas, rng: np.random.Generator) -> Image.Image:
    """Camera: slight blur, global brightness/contrast/colour temperature, sensor noise."""
    img = c.rgb.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.3, 0.8)))
    a = np.asarray(img, dtype=np.float32)
    contrast, bright = rng.uniform(0.85, 1.15), rng.uniform(-18.0, 18.0)
    warm = rng.uniform(-0.06, 0.06)  # colour temperature: + warmer, - cooler
    gains = np.array([1 + warm, 1.0, 1 - warm], np.float32)
    a = ((a - 128.0) * contrast + 128.0 + bright) * gains
    a += rng.standard_normal(a.shape, dtype=np.float32) * np.float32(rng.uniform(1.5, 5.0))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def _segments_info(c: _Canvas) -> list[dict[str, Any]]:
    """COCO segments_info from the id map itself: exact areas/bboxes after occlusion.
    Fully hidden instances are dropped."""
    a = np.asarray(c.ids, dtype=np.uint32)
    idmap = a[..., 0] | (a[..., 1] << 8) | (a[..., 2] << 16)
    ids, counts = np.unique(idmap, return_counts=True)
    info = []
    for sid, area in zip(ids.tolist(), counts.tolist()):
        if sid == 0:
            continue
        m = idmap == sid
        rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
        bbox = [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]
        info.append({"id": sid, "category_id": c.segments[sid], "iscrowd": 0, "bbox": bbox, "area": area})
    return info


def render_scene(style: CountryStyle, rng: np.random.Generator, width: int, height: int,
                 label_ids: dict[str, int] | None = None) -> tuple[Image.Image, Image.Image, list[dict]]:
    """One street scene: (RGB image, panoptic id image, segments_info)."""
    c = _Canvas(width, height, label_ids or label_ids_of_map())
    st = _make_street(rng, width, height, style)
    _draw_sky(c, st, rng)
    _draw_ground(c, st, style, rng)
    _draw_lanes(c, st, style, rng)
    _draw_objects(c, st, style, rng)
    return _finish(c, rng), c.ids, _segments_info(c)
