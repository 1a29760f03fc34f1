"""Shared fixtures. The Prefect environment is set before anything imports prefect."""

from __future__ import annotations

import os
import tempfile

_SESSION_DIR = tempfile.mkdtemp(prefix="geofeat-tests-")
os.environ["GEOFEAT_HOME"] = os.path.join(_SESSION_DIR, "home")
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

