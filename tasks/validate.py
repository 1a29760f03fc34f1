"""Image validation: decide from the bytes alone whether an image is usable.

Pure functions. A bad image raises `BadInput(reason, detail)`, which ingest turns into a
quarantine row; nothing here ever stops a shard. The content decides the format, never the file
name: a JPEG named .png is a JPEG, a GIF named .jpg is a GIF (`unsupported_format`), and the
detail says what was found.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

# Every quarantine reason, in one place.
REASONS = {
    "empty_file": "zero bytes",
    "not_an_image": "not decodable as an image (wrong extension or garbage)",
    "truncated": "image data ends early or is corrupt",
    "decompression_bomb": "declared dimensions exceed max_pixels",
    "bad_exif": "EXIF block unreadable",
    "unsupported_extension": "file extension is not an image type (catalogs before ingest version 2)",
    "unsupported_format": "an image format geofeat does not ingest (GIF, TIFF, AVIF, ...), whatever its name",
    "missing_file": "a manifest row names a file that does not exist",
    "unreadable_file": "the file could not be read",
    "not_a_regular_file": "a named pipe, socket or device (or a symlink to one): never read",
    "symlink_loop": "a symlink that never reaches a file (it points to itself, or to a folder above it)",
    "broken_symlink": "a symlink whose target does not exist",
    "unlistable_folder": "a sub-folder that could not be listed: the files in it are unknown",
    "too_large": "the file is larger than max_bytes; it was not read",
    "unknown_country": "the label is not a country (a state, a city, a typo)",
    "missing_label": "no country and no coordinates",
    "coordinates_out_of_range": "lat/lon outside [-90,90] x [-180,180] or not numbers",
    "no_country_at_coordinates": "coordinates fall at sea or in an area without an ISO code",
    "ambiguous_coordinates": "lat/lon could be swapped and no interpretation wins",
    "no_country_folder": "file is not inside a country folder",
    "conflicting_labels": "a manifest names the same file more than once, with different labels",
    "duplicate": "same bytes as an earlier image of the same dataset",
    "duplicate_conflicting_label": "same bytes as an earlier image of the same dataset, labelled with another country",
    "unsegmentable": "too small or too elongated to segment (after the overlay cut)",
    "segmenter_error": "the segmenter failed on this image alone",
}

SUPPORTED_FORMATS = {"JPEG", "MPO", "PNG", "WEBP"}  # PIL format names; MPO: a camera's multi-picture JPEG
# What some bytes are, by their first bytes: for details of files PIL cannot (or should not) open.
MAGIC = [
    (b"\xff\xd8\xff", "JPEG image"), (b"\x89PNG\r\n\x1a\n", "PNG image"), (b"GIF87a", "GIF image"),
    (b"GIF89a", "GIF image"), (b"II*\x00", "TIFF image"), (b"MM\x00*", "TIFF image"), (b"BM", "BMP image"),
    (b"%PDF", "PDF document"), (b"PK\x03\x04", "ZIP archive"), (b"\x1f\x8b", "gzip archive"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000 image"), (b"<svg", "SVG drawing"), (b"<?xml", "XML document"),
]
FTYP_BRANDS = {b"avif": "AVIF image", b"avis": "AVIF image", b"heic": "HEIC image", b"heix": "HEIC image",
               b"mif1": "HEIF image", b"msf1": "HEIF image", b"isom": "MP4 video", b"mp42": "MP4 video",
               b"qt  ": "QuickTime video"}
MAX_PIXELS = 80_000_000  # px; a 16k x 5k panorama fits, a decompression bomb does not
ORIENTATION_TAG = 0x0112  # EXIF orientation
_TRANSPOSED = {5, 6, 7, 8}  # orientations that swap width and height


class BadInput(Exception):
    def __init__(self, reason: str, detail: str):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class ImageInfo:
    width: int  # px, after EXIF orientation
    height: int  # px
    format: str


def sniff(data: bytes) -> str:
    """What the bytes look like, in a few words ("GIF image", "PDF document", "text", ...)."""
    head = data[:64]
    if head[4:8] == b"ftyp":
        return FTYP_BRANDS.get(head[8:12], f"ISO media file (brand {head[8:12].decode('latin-1')!r})")
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP image"
    for magic, what in MAGIC:
        if head.startswith(magic):
            return what
    try:
        text = data[:512].decode("utf-8")
    except UnicodeDecodeError:
        return f"unidentified data (starts {head[:8].hex(' ')})"
    if text and all(c.isprintable() or c in "\r\n\t" for c in text):
        return f"text ({' '.join(text.split())[:24]!r}...)"
    return f"unidentified data (starts {head[:8].hex(' ')})"


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise BadInput("empty_file", "0 bytes")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise BadInput("decompression_bomb", str(exc)) from exc
    except UnidentifiedImageError as exc:
        found = sniff(data)
        if found in ("JPEG image", "PNG image", "WebP image"):
            raise BadInput("not_an_image", f"{found} signature but no readable header, {len(data)} bytes") from exc
        if found.endswith(" image"):  # an image format this PIL build cannot open (HEIC, say)
            raise BadInput("unsupported_format", f"{found}, which geofeat does not ingest (JPEG, PNG, WebP)") from exc
        raise BadInput("not_an_image", f"{found}, {len(data)} bytes") from exc
    except (OSError, ValueError, SyntaxError) as exc:  # broken headers
        raise BadInput("not_an_image", f"{type(exc).__name__}: {exc}") from exc
    for w in caught:  # PIL only *warns* about a corrupt EXIF block while opening
        if "exif" in str(w.message).lower():
            raise BadInput("bad_exif", str(w.message).strip())
    w, h = img.size
    if w * h > max_pixels:
        raise BadInput("decompression_bomb", f"{w}x{h} px > max_pixels={max_pixels}")
    if w < 1 or h < 1:
        raise BadInput("not_an_image", f"{w}x{h} px")
    return img


def _orientation(img: Image.Image) -> int:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # PIL only warns on "Corrupt EXIF data"
            return int(img.getexif().get(ORIENTATION_TAG, 1) or 1)
    except Exception as exc:  # PIL raises many types on malformed EXIF
        raise BadInput("bad_exif", f"{type(exc).__name__}: {exc}") from exc


def _load(img: Image.Image) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise BadInput("truncated", f"{type(exc).__name__}: {exc}") from exc


def inspect_image(data: bytes, max_pixels: int = MAX_PIXELS) -> ImageInfo:
    """Fully decode the image once (cheaply) to prove it is usable; return its oriented size."""
    img = _open(data, max_pixels)
    fmt = img.format or "UNKNOWN"
    if fmt not in SUPPORTED_FORMATS:
        raise BadInput("unsupported_format", f"{fmt} image ({img.size[0]}x{img.size[1]} px), which geofeat does not "
                       "ingest (JPEG, PNG, WebP)")
    w, h = img.size
    if fmt in ("JPEG", "MPO"):
        # DCT-domain downscale: still reads every byte (so truncation is caught) at ~1/8 the cost.
        img.draft(img.mode, (max(1, w // 8), max(1, h // 8)))
    _load(img)
    orientation = _orientation(img)  # after the load: a PNG's EXIF read would load (and fail) first
    if orientation in _TRANSPOSED:
        w, h = h, w
    return ImageInfo(width=w, height=h, format=fmt)


def load_rgb(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode to an upright 8-bit RGB image (CMYK, L, P, RGBA, 16-bit all handled)."""
    img = _open(data, max_pixels)
    _load(img)
    _orientation(img)
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit: scale to 8 bits instead of clipping everything above 255 to white.
        import numpy as np

        arr = np.asarray(img, dtype=np.uint32)
        img = Image.fromarray((arr >> 8).clip(0, 255).astype("uint8"), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img.convert("RGB")
