"""Every config field says why it exists, and each spec says which fields change the output."""

from __future__ import annotations

import pytest

from flows.runner import RunnerSpec
from tasks import specs
from tasks.specs import CropSpec, EvalSpec, SegmenterSpec, Spec, TrainSpec

ALL = sorted({cls for cls in vars(specs).values() if isinstance(cls, type) and issubclass(cls, Spec) and cls is not Spec}
             | {RunnerSpec}, key=lambda c: c.__name__)


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_every_field_has_a_one_line_description(cls):
    missing = [name for name, f in cls.model_fields.items() if not (f.description or "").strip()]
    assert not missing, f"{cls.__name__}: fields without a description: {missing}"
    multi = [name for name, f in cls.model_fields.items() if "\n" in f.description]
    assert not multi, f"{cls.__name__}: descriptions are one line: {multi}"
    unknown = (cls.RUN_ONLY | cls.ADDED_LATER) - set(cls.model_fields)
    assert not unknown, f"{cls.__name__}: RUN_ONLY/ADDED_LATER name no field: {unknown}"


def test_run_only_fields_never_change_ids():
    base = TrainSpec().identity()
    assert TrainSpec(device="cpu", num_workers=3, baseline_shard_size=7).identity() == base
    assert "device" not in EvalSpec().identity() and "num_workers" not in EvalSpec().identity()
    assert TrainSpec(lr=1e-3).identity() != base


def test_a_field_added_later_is_hashed_only_away_from_its_default():
    spec = TrainSpec()
    assert "grad_clip" in spec.resolved()  # saved in every checkpoint's resolved config
    assert "grad_clip" not in spec.identity()  # ...but ids of experts trained before it existed hold
    assert TrainSpec(grad_clip=0.5).identity()["grad_clip"] == 0.5


def test_segmenter_and_crop_specs_hash_everything():
    assert SegmenterSpec().identity() == SegmenterSpec().model_dump()
    assert CropSpec().identity() == CropSpec().model_dump()
