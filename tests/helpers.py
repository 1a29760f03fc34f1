"""Test data made on the fly: no test reads the shared real samples or the network."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def image_bytes(fmt: str = "JPEG", size=(96, 64), mode: str = "RGB", seed: int = 0, **save) -> bytes:
    """A small noisy image (noise keeps JPEGs large enough to truncate meaningfully)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
