"""Read prefect.yaml: deployment parameters for in-process runs and for tests."""

from __future__ import annotations

import yaml

from flows.env import PROJECT_DIR


def load_prefect_yaml() -> dict:
    return yaml.safe_load((PROJECT_DIR / "prefect.yaml").read_text())


def load_entrypoint(entrypoint: str):
    """The Flow object a deployment entrypoint names (path relative to the project)."""
    from prefect.flows import load_flow_from_entrypoint

    return load_flow_from_entrypoint(str(PROJECT_DIR / entrypoint), use_placeholder_flow=False)


def deployment_parameters(flow_name: str, deployment: str) -> dict:
    """The parameters block of deployment `<flow_name>/<deployment>`."""
    for d in load_prefect_yaml()["deployments"]:
        if d["name"] == deployment and load_entrypoint(d["entrypoint"]).name == flow_name:
            return d.get("parameters") or {}
    raise KeyError(f"no deployment {flow_name}/{deployment} in prefect.yaml")
