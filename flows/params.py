"""Typed flow parameters. prefect.yaml parameter blocks load into these (tests check it).

Every field is validated when the model is built; errors name the field and the fix.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.demo_world import DemoWorldSpec
from tasks.validate import MAX_PIXELS

Layout = Literal["g50", "g3", "im2gps", "osv5m"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo in prefect.yaml is an error, not ignored


class SplitConfig(_Strict):
    """How a dataset's images are split. `hash`: from the image's sha256, stable forever."""

    policy: Literal["hash", "train", "val", "test"] = Field("hash", description="hash, or put every image in one split")
    train: float = Field(0.8, ge=0, le=1, description="fraction in train (policy=hash)")
    val: float = Field(0.1, ge=0, le=1, description="fraction in val; test gets the rest")

    @model_validator(mode="after")
    def _fractions(self) -> "SplitConfig":
        if self.train + self.val > 1 + 1e-9:
            raise ValueError(f"split.train + split.val = {self.train + self.val:.3f} > 1; lower one of them")
        return self


# Benchmarks are held out whole: every IM2GPS image is a test image.
DEFAULT_SPLIT = {"im2gps": SplitConfig(policy="test")}


class SourceSpec(_Strict):
    """One dataset to ingest."""

    layout: Layout = Field(description="g50 | g3 | im2gps | osv5m")
    source: str = Field(description="URL: a folder (g50, g3) or a CSV (g3 manifest, im2gps, osv5m)")
    images: str | None = Field(None, description="image folder for CSV layouts; default: next to the CSV")
    dataset: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$", description="catalog name, e.g. g50")
    split: SplitConfig | None = Field(None, description="default: hash 80/10/10; im2gps: all test")

    def resolved_split(self) -> SplitConfig:
        return self.split or DEFAULT_SPLIT.get(self.layout, SplitConfig())


class IngestOptions(_Strict):
    shard_size: int = Field(256, ge=1, le=100_000, description="images per shard task")
    max_pixels: int = Field(MAX_PIXELS, ge=1, description="larger images are decompression bombs (px)")
    mode: Literal["incremental", "overwrite"] = Field(
        "incremental", description="incremental: only new files; overwrite: drop the dataset and redo it"
    )


class DemoSpec(_Strict):
    """The embedded demo world (tasks/demo_world.py), generated under the data root."""

    seed: int = 0
    countries: int = Field(6, ge=1, le=8)
    per_country: int = Field(40, ge=1, description="G50-layout images per country")
    heldout_per_country: int = Field(8, ge=0, description="IM2GPS-style held-out images per country")
    width: int = Field(384, ge=64, description="px; G50 frames are 1536x662, same aspect")
    height: int = Field(166, ge=32, description="px")
    messy: bool = Field(True, description="include a few bad inputs, to show the quarantine at work")
    out: str | None = Field(None, description="where to write it; default <data root>/demo-world")

    def world_spec(self) -> DemoWorldSpec:
        return DemoWorldSpec(**self.model_dump(exclude={"out"}))

    def sources(self, world: str) -> list[SourceSpec]:
        """The demo world's two datasets: a G50-layout pool and an IM2GPS-style held-out set."""
        return [
            SourceSpec(layout="g50", source=f"{world}/g50", dataset="demo"),
            SourceSpec(layout="im2gps", source=f"{world}/im2gps/im2gps_demo.csv",
                       images=f"{world}/im2gps/images", dataset="demo-im2gps"),
        ]
