"""Every prefect.yaml deployment loads its flow and its parameters validate into the typed models."""

import pytest
from prefect.exceptions import ParameterTypeError

from flows.deployments import deployment_parameters, load_entrypoint, load_prefect_yaml
from pydantic import BaseModel

from tasks.specs import DemoSpec
from flows.server import WORK_POOL

DEPLOYMENTS = load_prefect_yaml()["deployments"]


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: f"{d['entrypoint'].split(':')[1]}/{d['name']}")
def test_parameters_validate_against_the_flow(deployment):
    flow = load_entrypoint(deployment["entrypoint"])
    params = flow.validate_parameters(deployment.get("parameters") or {})
    for name, value in params.items():  # blocks arrive as the typed models, not dicts
        values = value if isinstance(value, list) else [value]
        assert all(v is None or isinstance(v, (BaseModel, str)) for v in values), name
    assert deployment["work_pool"]["name"] == WORK_POOL


def test_deployment_names_are_unique_per_flow():
    keys = [(load_entrypoint(d["entrypoint"]).name, d["name"]) for d in DEPLOYMENTS]
    assert len(keys) == len(set(keys))
    assert ("build-feature-datasets", "demo") in keys and ("build-feature-datasets", "g50-im2gps") in keys


def test_deployment_names_say_what_they_are_and_no_schedule_runs_unasked():
    """No `default`: each name says what it runs. The nightly resegment (Swin-L over everything) ships paused."""
    assert "default" not in {d["name"] for d in DEPLOYMENTS}
    scheduled = [(d["name"], s) for d in DEPLOYMENTS for s in d.get("schedules") or []]
    assert scheduled and all(s.get("active") is False for _, s in scheduled), scheduled


def test_demo_deployment_is_the_demo_world():
    params = deployment_parameters("build-feature-datasets", "demo")
    assert DemoSpec(**params["demo"]).countries >= 6


@pytest.mark.parametrize("params,field", [
    ({"sources": [{"layout": "g51", "source": "x", "dataset": "d"}]}, "layout"),
    ({"sources": [{"layout": "g50", "source": "x", "dataset": "Bad Name"}]}, "dataset"),
    ({"sources": [{"layout": "g50", "source": "x", "dataset": "d", "split": {"train": 0.9, "val": 0.2}}]}, "split"),
    ({"options": {"shard_size": 0}}, "shard_size"),
    ({"options": {"shard_sise": 10}}, "shard_sise"),  # typos are errors, not silently ignored
    ({"demo": {"countries": 40}}, "countries"),
    ({"segmenter": {"kind": "sam"}}, "kind"),
    ({"segmenter": {"overlay": {"g50": {"top": 0.6, "bottom": 0.5}}}}, "overlay"),
    ({"crops": {"format": "png"}}, "format"),
    ({"run": {"batch_size": 0}}, "batch_size"),
])
def test_bad_parameters_are_refused_naming_the_field(params, field):
    flow = load_entrypoint("flows/build_feature_datasets.py:build_feature_datasets")
    with pytest.raises(ParameterTypeError, match=field):
        flow.validate_parameters(params)


def test_each_train_deployment_is_triggered_by_its_own_retrain_events():
    """build-feature-datasets' `retrain.deployment` addresses exactly one train-experts trigger."""
    from flows.build_feature_datasets import FEATURES_ADDED

    train = [d for d in DEPLOYMENTS if load_entrypoint(d["entrypoint"]).name == "train-experts"]
    assert {d["name"] for d in train} >= {"vit-b16", "demo"}
    for d in train:
        (trigger,) = d["triggers"]
        assert trigger["expect"] == [FEATURES_ADDED] and trigger["posture"] == "Reactive"
        assert trigger["match"]["geofeat.train-deployment"] == d["name"]
        flow = load_entrypoint(d["entrypoint"])
        flow.validate_parameters({**(d.get("parameters") or {}), **{k: "x" for k in trigger["parameters"]}})
    retrain = deployment_parameters("build-feature-datasets", "g50-im2gps")["retrain"]
    assert retrain["deployment"] in {d["name"] for d in train}
    from tasks.specs import RetrainSpec

    assert RetrainSpec().deployment in {d["name"] for d in train}  # the default addresses a real trigger
