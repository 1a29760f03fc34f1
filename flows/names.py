"""Artifact keys and run names, derived safely from any name geofeat accepts.

Prefect artifact keys allow only lowercase letters, digits and dashes (`prefect.types.names.ArtifactKey`,
`^[a-z0-9-]*$`), while a dataset name may hold `_` (tasks/specs.py DATASET_NAME) and a segmenter id
holds `@`, `.` and capitals. `artifact_key` maps each part onto the allowed characters and, where it
had to change a part, appends a short hash of the original, so `osv_sample` and `osv-sample` never
share a key (one would silently show the other's "latest").

Run names are free text in Prefect except for `/ % & < >` (`prefect.types.names.Name`); the
callables here build them from a run's parameters: dataset, segmenter and shard.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Iterable

from tasks.specs import CropSpec, EvalSpec, SegmenterSpec, SourceSpec, TrainSpec

BANNED_IN_NAMES = re.compile(r"[/%&<>]")  # prefect.types.names.BANNED_CHARACTERS
NAME_LIMIT = 120  # characters of a run name; the UI cuts long names anyway


def key_part(value: str) -> str:
    """One part of an artifact key: lowercase letters, digits and dashes; plus a hash when changed."""
    slug = re.sub(r"[^a-z0-9-]+", "-", value.lower())
    if slug == value:
        return value
    digest = hashlib.sha256(value.encode()).hexdigest()[:6]
    return f"{slug.strip('-')}-{digest}" if slug.strip("-") else digest


def artifact_key(*parts: str) -> str:
    """A valid, collision-safe Prefect artifact key from `parts` joined by dashes."""
    return "-".join(key_part(p) for p in parts if p)


def run_name(*parts: Any) -> str:
    """A readable run name: parts joined by spaces, banned characters replaced, cut to NAME_LIMIT."""
    text = " ".join(str(p) for p in parts if p not in (None, "", []))
    text = BANNED_IN_NAMES.sub("-", text)
    return text if len(text) <= NAME_LIMIT else text[: NAME_LIMIT - 1] + "…"


def short_segmenter(segmenter_id: str | None) -> str:
    """`facebook--mask2former-swin-large-…@main-ef1167dd87` -> `mask2former-swin-large-…@ef1167dd87`."""
    if not segmenter_id:
        return "latest segmenter"
    name, _, version = segmenter_id.partition("@")
    name = name.split("--")[-1]
    return f"{name}@{version.rsplit('-', 1)[-1]}" if version else name


def datasets_label(names: Iterable[str] | None, default: str = "all datasets") -> str:
    names = list(names or [])
    if not names:
        return default
    return ", ".join(names) if len(names) <= 3 else f"{', '.join(names[:3])} +{len(names) - 3}"


# ---------------------------------------------------------------- flow run names


def _parameters() -> dict[str, Any]:
    """The running flow's parameters (called by Prefect while it names the run)."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return dict(ctx.parameters or {}) if ctx else {}


def _model(value: Any, cls):
    if value is None or isinstance(value, cls):
        return value
    try:
        return cls.model_validate(value)
    except Exception:  # noqa: BLE001 - a name must never fail a run; Prefect validates parameters itself
        return None


def _segmenter_label(params: dict[str, Any]) -> str:
    """The segmenter a run's parameters name, short; `annotations` alone while the flow still has to
    fill in the demo world's annotations (the id would hash the wrong value)."""
    from tasks.segment import segmenter_id

    spec = _model(params.get("segmenter", SegmenterSpec()), SegmenterSpec)
    crops = _model(params.get("crops", CropSpec()), CropSpec)
    if spec is None or crops is None:
        return "a segmenter"
    if spec.kind == "annotations" and not spec.annotations:
        return "annotations"
    return short_segmenter(segmenter_id(spec, crops))


def ingest_run_name() -> str:
    source = _model(_parameters().get("source"), SourceSpec)
    return run_name("ingest", source.dataset if source else None)


def segment_run_name() -> str:
    params = _parameters()
    return run_name("segment", datasets_label(params.get("datasets")), "with", _segmenter_label(params))


def build_run_name() -> str:
    params = _parameters()
    names = [s.dataset for s in (_model(s, SourceSpec) for s in params.get("sources") or []) if s]
    if params.get("demo") is not None:
        names = ["demo world", *names]
    segmenter = "ingest only" if params.get("segmenter", SegmenterSpec()) is None else \
        "with " + _segmenter_label(params)
    return run_name("build", datasets_label(names, default="no sources"), segmenter)


def train_run_name() -> str:
    spec = _model(_parameters().get("spec", TrainSpec()), TrainSpec) or TrainSpec()
    return run_name("train", spec.checkpoint.rstrip("/").rsplit("/", 1)[-1], "experts on",
                    short_segmenter(spec.segmenter), "crops of", datasets_label(spec.datasets))


def evaluate_run_name() -> str:
    spec = _model(_parameters().get("spec", EvalSpec()), EvalSpec) or EvalSpec()
    experts = f"experts {spec.experts_run}" if spec.experts_run else "latest experts"
    return run_name("evaluate", experts, "on", datasets_label(spec.datasets, default="every test split"))


# ---------------------------------------------------------------- task run names


def plan_ingest_name(parameters: dict[str, Any]) -> str:
    return run_name("plan ingest", parameters["params"].get("dataset"))


def plan_segment_name(parameters: dict[str, Any]) -> str:
    return run_name("plan segment", parameters["dataset"], "with", short_segmenter(parameters["segmenter_id"]))


def ingest_shard_name(parameters: dict[str, Any]) -> str:
    plan = parameters["plan"]
    return run_name("ingest", plan.dataset, f"shard {plan.shard_id[:8]}",
                    f"({len(plan.candidates) + len(plan.rejected)} files)")


def segment_shard_name(parameters: dict[str, Any]) -> str:
    plan = parameters["plan"]
    return run_name("segment", plan.dataset, f"shard {plan.shard_id[:8]}", f"({len(plan.images)} images)",
                    "with", short_segmenter(plan.segmenter_id))


def baselines_name(parameters: dict[str, Any]) -> str:
    plan = parameters["plan"]
    return run_name(f"{plan.kind} crops", plan.dataset, f"shard {plan.shard_id[:8]}", f"({len(plan.images)} images)")


def train_expert_name(parameters: dict[str, Any]) -> str:
    return run_name("train", parameters["group"], "expert on", short_segmenter(parameters["segmenter_id"]))
