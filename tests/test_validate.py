import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from helpers import image_bytes
from tasks.validate import REASONS, BadInput, inspect_image, load_rgb


def reason_of(data: bytes, **kw) -> str:
    with pytest.raises(BadInput) as err:
        inspect_image(data, **kw)
    assert err.value.reason in REASONS
    return err.value.reason


def png_with_declared_size(width: int, height: int) -> bytes:
    """A valid tiny PNG whose header claims width x height (a decompression bomb)."""
    data = bytearray(image_bytes("PNG", size=(8, 8), mode="L"))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def jpeg_with_broken_exif() -> bytes:
    data = image_bytes("JPEG")
    segment = b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\x00\x05\x01\x12\x00\x03\xff\xff\xff\xff"  # IFD runs past the block
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(segment) + 2) + segment + data[2:]


def test_bad_inputs_get_their_reason():
    jpeg = image_bytes("JPEG", size=(320, 240))
    assert reason_of(b"") == "empty_file"
    assert reason_of(jpeg[: int(len(jpeg) * 0.6)]) == "truncated"
    assert reason_of(b"just some notes, saved as .jpg\n" * 10) == "not_an_image"
    assert reason_of(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40) == "not_an_image"  # right magic, no header
    assert reason_of(png_with_declared_size(100_000, 100_000)) == "decompression_bomb"
    assert reason_of(png_with_declared_size(5000, 5000), max_pixels=1_000_000) == "decompression_bomb"
    assert reason_of(jpeg_with_broken_exif()) == "bad_exif"


@pytest.mark.parametrize("mode,fmt", [("RGB", "JPEG"), ("CMYK", "JPEG"), ("L", "JPEG"), ("P", "PNG"),
                                      ("RGBA", "PNG"), ("LA", "PNG"), ("1", "PNG"), ("RGB", "WEBP")])
def test_normal_modes_are_usable(mode, fmt):
    data = image_bytes(fmt, size=(48, 32), mode=mode)
    info = inspect_image(data)
    assert (info.width, info.height, info.format) == (48, 32, fmt)
    rgb = load_rgb(data)
    assert rgb.mode == "RGB" and rgb.size == (48, 32)


def test_16_bit_png_is_scaled_not_clipped():
    arr = np.full((10, 20), 0x8000, dtype=np.uint16)  # mid-grey at 16 bits
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    rgb = load_rgb(buf.getvalue())
    assert rgb.getpixel((0, 0)) == (128, 128, 128)


def test_exif_orientation_is_respected():
    img = Image.fromarray(np.zeros((30, 40, 3), np.uint8))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes())
    info = inspect_image(buf.getvalue())
    assert (info.width, info.height) == (30, 40)
    assert load_rgb(buf.getvalue()).size == (30, 40)


@pytest.mark.parametrize("fmt", ["GIF", "TIFF", "BMP", "AVIF"])
def test_other_image_formats_are_unsupported_and_say_what_they_are(fmt):
    """Issue 13, finding 8: the bytes decide, never the file name (ingest adds the name to the detail)."""
    buf = io.BytesIO()
    Image.new("RGB", (20, 10)).save(buf, fmt)
    with pytest.raises(BadInput) as err:
        inspect_image(buf.getvalue())
    assert err.value.reason == "unsupported_format" and err.value.detail.startswith(f"{fmt} image (20x10 px)")


def test_what_a_non_image_is_is_said():
    assert "HEIC image" in pytest.raises(BadInput, inspect_image, b"\0\0\0\x18ftypheic" + b"\0" * 40).value.detail
    assert "PDF document" in pytest.raises(BadInput, inspect_image, b"%PDF-1.7" + b"\0" * 40).value.detail
    assert "text ('shopping list" in pytest.raises(BadInput, inspect_image, b"shopping list\n" * 4).value.detail
