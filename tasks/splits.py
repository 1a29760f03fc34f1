"""Deterministic per-image splits.

An image's split is a pure function of its image_id (the sha256 of its bytes) and the
split fractions. It never depends on which other images exist, so it never changes as
a dataset grows, and the same bytes get the same split in every dataset.
"""

from __future__ import annotations

SPLITS = ("train", "val", "test")
_HEX = 15  # hex digits of the sha256 used as a uniform number in [0, 1)


def split_of(image_id: str, train: float, val: float) -> str:
    """train/val/test from the image hash; test takes the remaining 1 - train - val."""
    u = int(image_id[:_HEX], 16) / 16**_HEX
    if u < train:
        return "train"
    if u < train + val:
        return "val"
    return "test"
