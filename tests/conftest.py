"""Shared fixtures. The Prefect environment is set before anything imports prefect."""

from __future__ import annotations

import os
import tempfile

_SESSION_DIR = tempfile.mkdtemp(prefix="geofeat-tests-")
os.environ["GEOFEAT_HOME"] = os.path.join(_SESSION_DIR, "home")
os.environ["GEOFEAT_STATE_DIR"] = os.path.join(_SESSION_DIR, "state")  # `geofeat up` notes its root here, not in ~
os.environ.pop("PREFECT_API_URL", None)  # never talk to a user's server from tests

from flows import env as prefect_env  # noqa: E402

prefect_env.apply()

import pytest  # noqa: E402

from storage.layout import DataRoot  # noqa: E402


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API (SQLite) for every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture
def root(tmp_path) -> DataRoot:
    return DataRoot(str(tmp_path / "home"))



# A small demo catalog (annotations segmenter) with tiny experts, shared by the expert tests.
EXPERT_DEMO = {"seed": 1, "countries": 3, "per_country": 24, "heldout_per_country": 8, "messy": False}
EXPERT_TRAIN = {"checkpoint": "tiny-random", "groups": ["ground", "furniture"], "random_crops": True,
                "epochs": 8, "batch_size": 16, "lr": 1e-3, "warmup_ratio": 0.05, "min_crops_per_country": 3,
                "num_workers": 0}


@pytest.fixture(scope="session")
def demo_catalog(prefect_harness, tmp_path_factory) -> DataRoot:
    from flows.build_feature_datasets import build_feature_datasets
    from tasks.specs import CropSpec, DemoSpec, SegmenterSpec

    root = DataRoot(str(tmp_path_factory.mktemp("experts") / "home"))
    build_feature_datasets(demo=DemoSpec(**EXPERT_DEMO), segmenter=SegmenterSpec(kind="annotations"),
                           crops=CropSpec(min_area=40), home=root.url)
    return root


@pytest.fixture(scope="session")
def trained_demo(demo_catalog) -> tuple[DataRoot, dict]:
    from tasks.specs import TrainSpec
    from flows.train_experts import train_experts

    return demo_catalog, train_experts(TrainSpec(**EXPERT_TRAIN), home=demo_catalog.url)
