"""Input fuzzing: a few hundred mutated JPEG and PNG files (seeded) through the `ingest` flow,
then the segmentation stage over what ingested. Nothing crashes, and every input file is
exactly one row of `images` or `quarantine`."""

from __future__ import annotations

import random
import resource
import struct
import zlib
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from helpers import image_bytes
from storage.catalog import connect
from tasks.validate import MAX_PIXELS, REASONS

SEED = 20260101
CASES = 300
COUNTRIES = ["France", "Japan", "Brazil"]
GIANT = 60_000  # px per side: 3.6 Gpx, a 10 GB RGB buffer if anything decoded it


def base_images() -> dict[str, bytes]:
    """A few real encodings: baseline and progressive JPEG, grey JPEG with EXIF, PNG in four modes."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated
    return {
        "rgb.jpg": image_bytes("JPEG", seed=1, quality=90),
        "progressive.jpg": image_bytes("JPEG", seed=2, progressive=True),
        "grey_exif.jpg": image_bytes("JPEG", mode="L", seed=3, exif=exif.tobytes()),
        "rgb.png": image_bytes("PNG", seed=4),
        "rgba.png": image_bytes("PNG", mode="RGBA", seed=5),
        "palette.png": image_bytes("PNG", mode="P", seed=6),
        "grey16.png": image_bytes("PNG", mode="I;16", seed=7),
    }


def png_with_size(data: bytes, width: int, height: int, fix_crc: bool = True) -> bytes:
    """Rewrite the IHDR chunk's declared size (bytes 16-24), with a valid or a stale CRC."""
    assert data[12:16] == b"IHDR"
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", width, height)
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) if fix_crc else data[29:33]
    return data[:16] + bytes(ihdr) + crc + data[33:]


def jpeg_with_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite the start-of-frame marker's declared size."""
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        at = data.find(marker)
        if at > 0:
            return data[:at + 5] + struct.pack(">HH", height, width) + data[at + 9:]
    raise AssertionError("no SOF marker")


def with_size(name: str, data: bytes, width: int, height: int) -> bytes:
    return png_with_size(data, width, height) if name.endswith(".png") else jpeg_with_size(data, width, height)


def mutate(rng: random.Random, name: str, data: bytes) -> tuple[str, bytes]:
    kind = rng.choice(["truncate", "truncate", "bitflip", "bitflip", "magic", "giant", "splice"])
    if kind == "truncate":
        return kind, data[:rng.randrange(0, len(data))]
    if kind == "bitflip":
        out = bytearray(data)
        for _ in range(rng.randint(1, 16)):
            pos = rng.randrange(len(out))
            out[pos] ^= 1 << rng.randrange(8)
        return kind, bytes(out)
    if kind == "magic":
        head = rng.choice([b"\x00" * 8, b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"%PDF-1.7",
                           bytes(rng.randrange(256) for _ in range(8))])
        return kind, head + data[len(head):]
    if kind == "giant":  # a bomb when its area is over max_pixels, else a long strip
        width, height = rng.choice([GIANT, 65_535]), rng.choice([GIANT, 65_535, 10_000, 1])
        if name.endswith(".png") and rng.random() < 0.3:
            return "giant_bad_crc", png_with_size(data, width, height, fix_crc=False)
        return "giant" if width * height > MAX_PIXELS else "strip", with_size(name, data, width, height)
    other = rng.choice(list(base_images().values()))  # splice: one file's head, another's tail
    cut = rng.randrange(1, len(data))
    return kind, data[:cut] + other[cut:]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, tuple[str, bytes]]]:
    """G50 layout: `<Country>/<case>.<ext>` -> (mutation, bytes)."""
    rng, bases = random.Random(SEED), base_images()
    folder = tmp_path_factory.mktemp("fuzz") / "g50"
    cases: dict[str, tuple[str, bytes]] = {}
    known = {  # a few cases whose outcome is certain
        "known_empty": ("truncate", b""),
        "known_half_jpeg": ("truncate", bases["rgb.jpg"][: len(bases["rgb.jpg"]) // 2]),
        "known_half_png": ("truncate", bases["rgb.png"][: len(bases["rgb.png"]) // 2]),
        "known_zero_magic": ("magic", b"\x00" * 8 + bases["rgb.png"][8:]),
        "known_giant_png": ("giant", png_with_size(bases["rgb.png"], GIANT, GIANT)),
        "known_giant_jpeg": ("giant", jpeg_with_size(bases["rgb.jpg"], GIANT, GIANT)),
        "known_strip": ("strip", jpeg_with_size(bases["rgb.jpg"], GIANT, 1)),  # decodes: 60000x1 px
        "known_clean": ("none", bases["rgba.png"]),
        "known_copy": ("none", bases["rgba.png"]),  # same bytes again: a duplicate
    }
    for i in range(CASES):
        name = rng.choice(sorted(bases))
        kind, data = mutate(rng, name, bases[name])
        ext = name.rsplit(".", 1)[1] if rng.random() < 0.9 else rng.choice(["jpg", "png", "JPG"])
        cases[f"{COUNTRIES[i % len(COUNTRIES)]}/case{i:03d}_{kind}.{ext}"] = (kind, data)
    for stem, (kind, data) in known.items():
        cases[f"France/{stem}.{'jpg' if 'jpeg' in stem else 'png'}"] = (kind, data)
    for rel, (_, data) in cases.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return folder, cases


@pytest.fixture(scope="module")
def ingested(prefect_harness, corpus, tmp_path_factory):
    from flows.ingest import ingest
    from tasks.specs import IngestOptions, SourceSpec
    from storage.layout import DataRoot

    folder, _ = corpus
    root = DataRoot(str(tmp_path_factory.mktemp("fuzz-home") / "home"))
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    summary = ingest(SourceSpec(layout="g50", source=str(folder), dataset="fuzz"), IngestOptions(shard_size=100),
                     home=root.url)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    return root, summary, grown_mib


def rows(root, sql: str) -> list[tuple]:
    return connect(root, fresh=True).execute(sql).fetchall()


def test_every_fuzzed_input_is_one_row_of_images_or_quarantine(corpus, ingested):
    folder, cases = corpus
    root, summary, grown_mib = ingested
    uris = rows(root, "SELECT source_uri FROM images WHERE dataset = 'fuzz' "
                      "UNION ALL SELECT source_uri FROM quarantine WHERE dataset = 'fuzz'")
    assert Counter(u for (u,) in uris) == Counter(str(folder / rel) for rel in cases)  # each exactly once
    reasons = dict(rows(root, "SELECT reason, count(*) FROM quarantine GROUP BY 1"))
    assert set(reasons) <= set(REASONS)
    images = rows(root, "SELECT count(*) FROM images")[0][0]
    assert images + sum(reasons.values()) == len(cases) > CASES
    assert 30 <= images <= len(cases) - 50, reasons  # both outcomes well represented
    assert grown_mib < 500  # no decoder ever allocated the giant declared frames
    print(f"{len(cases)} inputs: {images} images, quarantine {dict(sorted(reasons.items()))}, "
          f"peak RSS +{grown_mib:.0f} MiB")


@pytest.mark.parametrize("stem,reason", [
    ("known_empty", "empty_file"), ("known_half_jpeg", "truncated"), ("known_zero_magic", "not_an_image"),
    ("known_giant_png", "decompression_bomb"), ("known_giant_jpeg", "decompression_bomb"),
    ("known_copy", "duplicate"), ("known_half_png", "truncated"),
])
def test_known_bad_inputs_get_their_reason(corpus, ingested, stem, reason):
    folder, cases = corpus
    root, _, _ = ingested
    if reason == "duplicate":  # a fuzz case may hold the same bytes under another country, and sort first
        data = next(d for rel, (_, d) in cases.items() if f"/{stem}." in f"/{rel}")
        first = min(str(folder / rel) for rel, (_, d) in cases.items() if d == data)
        if not first.startswith(str(folder / "France")):
            reason = "duplicate_conflicting_label"
    assert rows(root, f"SELECT reason FROM quarantine WHERE source_uri LIKE '%/{stem}.%'") == [(reason,)]


def test_giant_declared_sizes_are_decompression_bombs(corpus, ingested):
    folder, cases = corpus
    root, _, _ = ingested
    giant = {str(folder / rel) for rel, (kind, _) in cases.items() if kind == "giant"}
    reasons = dict(rows(root, "SELECT source_uri, reason FROM quarantine"))
    assert len(giant) >= 15 and {reasons.get(u) for u in giant} == {"decompression_bomb"}
    assert rows(root, f"SELECT source_uri FROM images WHERE width * height > {MAX_PIXELS}") == []


def test_segmentation_over_the_fuzzed_images_completes(ingested):
    """Bit-flipped files that passed ingest still decode in the segmentation stage, or are
    quarantined there; every ingested image gets a segmentation outcome."""
    from tasks.specs import CropSpec, RunOptions, SegmenterSpec
    from flows.segment import segment

    root, _, _ = ingested
    tiny = SegmenterSpec(kind="tiny-random", label_set="demo", input_height=64, input_width=128, score_threshold=0.0)
    segment(datasets=["fuzz"], segmenter=tiny, crops=CropSpec(min_area=16), run=RunOptions(shard_size=64),
            home=root.url)
    images = {i for (i,) in rows(root, "SELECT image_id FROM images")}
    outcomes = dict(rows(root, "SELECT image_id, status FROM segmentations"))
    assert set(outcomes) == images
    assert set(outcomes.values()) <= {"ok", "no_crops", "quarantined"}
    refused = dict(rows(root, "SELECT source_uri, reason FROM quarantine WHERE stage = 'segment'"))
    assert set(refused.values()) <= set(REASONS)
    assert [r for u, r in refused.items() if "known_strip" in u] == ["unsegmentable"]
