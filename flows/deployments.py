"""Parameters of flow runs from YAML: prefect.yaml deployments and user config files; and
`geofeat deploy`, which turns a config file into deployments on the local server.

A config file is either a project file with one section per flow (plus an optional `home:`):

    home: ./geofeat-data                       # the data root ($GEOFEAT_HOME wins)
    build-feature-datasets: {sources: [...], segmenter: {...}, run: {...}}
    train-experts: {spec: {...}}
    evaluate: {spec: {...}}

or one flow's parameters alone (the shape of a prefect.yaml deployment's `parameters:`). Relative
paths in it resolve against the file's folder (those in prefect.yaml against the project folder,
where the worker runs), here, before anything runs or is deployed: a run means the same in this
process and on a worker. The fields that hold paths are marked in tasks/specs.py.
"""

from __future__ import annotations

import contextlib
import io
import typing
from pathlib import Path
from types import UnionType
from typing import Any

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from flows.env import PROJECT_DIR
from storage.layout import absolute
from tasks.specs import DATASET_NAME, DEVICE

# Flow name -> entrypoint (as in prefect.yaml): the flows a config file may hold a section for.
FLOWS = {
    "ingest": "flows/ingest.py:ingest",
    "build-feature-datasets": "flows/build_feature_datasets.py:build_feature_datasets",
    "segment": "flows/segment.py:segment",
    "train-experts": "flows/train_experts.py:train_experts",
    "evaluate": "flows/evaluate.py:evaluate",
}
TOP_LEVEL_PATHS = {"home"}  # flow parameters that are paths themselves (not inside a spec)


class ConfigError(ValueError):
    """A mistake in a config file, a deployment's parameters or a flag: the message names where and the fix."""


def load_prefect_yaml() -> dict:
    return yaml.safe_load((PROJECT_DIR / "prefect.yaml").read_text())


def load_entrypoint(entrypoint: str):
    """The Flow object a deployment entrypoint names (path relative to the project)."""
    from prefect.flows import load_flow_from_entrypoint

    return load_flow_from_entrypoint(str(PROJECT_DIR / entrypoint), use_placeholder_flow=False)


def load_flow(flow_name: str):
    return load_entrypoint(FLOWS[flow_name])


def deployment_parameters(flow_name: str, deployment: str) -> dict:
    """The parameters block of deployment `<flow_name>/<deployment>`, relative paths resolved against
    the project folder (where `geofeat up`'s worker runs it)."""
    names = []
    for d in load_prefect_yaml()["deployments"]:
        if d["entrypoint"] == FLOWS[flow_name]:
            names.append(d["name"])
            if d["name"] == deployment:
                return resolve_paths(flow_name, d.get("parameters") or {}, PROJECT_DIR)
    raise ConfigError(f"no deployment {flow_name}/{deployment} in prefect.yaml; choose one of {names} "
                      "or give --config FILE")


# ---------------------------------------------------------------- config files


def read_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"--config {path}: not valid YAML ({' '.join(str(exc).split())[:200]})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping (home:, {', '.join(FLOWS)}: or one flow's "
                          f"parameters), not a {type(data).__name__}")
    return data


def config_parameters(path: str | Path, flow_name: str) -> dict:
    """The parameters of `flow_name` in a config file, relative paths resolved against its folder."""
    path = Path(path)
    data = read_config(path)
    if any(key in FLOWS for key in data):  # a project file: one section per flow
        unknown = sorted(set(data) - set(FLOWS) - {"home"})
        if unknown:
            raise ConfigError(f"--config {path}: unknown top-level key(s) {unknown}; expected home: and sections "
                              f"named after flows: {', '.join(FLOWS)}")
        params = data.get(flow_name) or {}
        if not isinstance(params, dict):
            raise ConfigError(f"--config {path}: section {flow_name}: expected a mapping of its parameters")
    else:
        params = data
    return resolve_paths(flow_name, dict(params), path.parent.resolve())


def config_sections(path: str | Path) -> list[str]:
    """The flows a project file has a section for (empty for a one-flow file)."""
    return [key for key in read_config(path) if key in FLOWS]


def _hints(flow_name: str) -> dict[str, Any]:
    flow = load_flow(flow_name)
    hints = typing.get_type_hints(flow.fn)
    hints.pop("return", None)
    return hints


def resolve_path(value: str, base: Path, kind: str) -> str:
    """One path value: URLs as they are; `checkpoint` values only when they look like or are a directory."""
    if "://" in value:
        return value
    if kind == "checkpoint":
        looks_local = value.startswith((".", "~", "/")) or (base / value).exists()
        if not looks_local:
            return value  # a hub id (org/name)
    return absolute(value, base)


def _resolve(annotation: Any, value: Any, base: Path) -> Any:
    if value is None:
        return value
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, UnionType):
        for arg in typing.get_args(annotation):
            if arg is not type(None):
                value = _resolve(arg, value, base)
        return value
    if origin is list and isinstance(value, list):
        (item,) = typing.get_args(annotation)
        return [_resolve(item, v, base) for v in value]
    if origin is dict and isinstance(value, dict):
        _, item = typing.get_args(annotation)
        return {k: _resolve(item, v, base) for k, v in value.items()}
    if isinstance(annotation, type) and issubclass(annotation, BaseModel) and isinstance(value, dict):
        out = dict(value)
        for name, field in annotation.model_fields.items():
            if name not in out:
                continue
            kind = (field.json_schema_extra or {}).get("path") if isinstance(field.json_schema_extra, dict) else None
            if kind and isinstance(out[name], str):
                out[name] = resolve_path(out[name], base, kind)
            else:
                out[name] = _resolve(field.annotation, out[name], base)
        return out
    return value


def resolve_paths(flow_name: str, params: dict, base: str | Path) -> dict:
    """`params` with every relative path (fields marked in tasks/specs.py) made absolute against `base`."""
    base = Path(base)
    hints = _hints(flow_name)
    out = {}
    for name, value in params.items():
        if name in TOP_LEVEL_PATHS and isinstance(value, str):
            out[name] = resolve_path(value, base, "always")
        else:
            out[name] = _resolve(hints[name], value, base) if name in hints else value
    return out


# ---------------------------------------------------------------- validation


def _where(loc: tuple, prefix: str) -> str:
    parts = [prefix] if prefix else []
    for p in loc:
        if isinstance(p, int):
            parts[-1:] = [f"{parts[-1] if parts else ''}[{p}]"]
        else:
            parts.append(str(p))
    return ".".join(parts)


# Regex patterns of tasks/specs.py said as what they accept.
PATTERN_HINTS = {DATASET_NAME: "use lower-case letters, digits, _ and - (at most 64, starting with a letter or "
                               "digit), e.g. g50",
                 DEVICE: "use auto, cpu, cuda, cuda:N or mps"}


def _says(error: dict) -> str:
    msg = error["msg"].removeprefix("Value error, ")
    if error.get("type") in ("missing", "extra_forbidden"):
        return msg.lower()
    pattern = (error.get("ctx") or {}).get("pattern")
    if pattern in PATTERN_HINTS:
        return f"{error['input']!r} is not accepted: {PATTERN_HINTS[pattern]}"
    return f"{msg} (got {error['input']!r})" if "input" in error and not isinstance(error["input"], dict) else msg


def validate_parameters(flow_name: str, params: dict, where: str = "", flags: dict[str, str] | None = None) -> dict:
    """The flow's parameters as its typed models. Every problem is collected and raised once as a
    ConfigError: one line each, naming the flag that set the value (`flags`: dotted field -> flag)
    or the field and `where` it came from (a file, a deployment)."""
    hints = _hints(flow_name)
    flags = flags or {}
    unknown = sorted(set(params) - set(hints))
    problems = [f"{where}{name}: not a parameter of {flow_name} (expected one of {sorted(hints)})" for name in unknown]
    typed = {}
    for name, value in params.items():
        if name in unknown:
            continue
        try:
            typed[name] = TypeAdapter(hints[name]).validate_python(value)
        except ValidationError as exc:
            for error in exc.errors():
                field = _where(tuple(p for p in error["loc"] if not (isinstance(p, str) and p.startswith(("function-", "list[", "dict[")))), name)
                flag = next((f for key, f in flags.items() if field == key or field.endswith("." + key)), None)
                problems.append(f"{flag}: {_says(error)}" if flag else f"{where}{field}: {_says(error)}")
    if problems:
        shown = list(dict.fromkeys(problems))
        raise ConfigError("; ".join(shown[:4]) + (f" (and {len(shown) - 4} more)" if len(shown) > 4 else ""))
    return typed


def as_json(value: Any) -> Any:
    """Typed parameters back to plain JSON values (for a deployment)."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_unset=True)
    if isinstance(value, list):
        return [as_json(v) for v in value]
    if isinstance(value, dict):
        return {k: as_json(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------- geofeat deploy


def deploy(flow_name: str, name: str, params: dict, api_url: str, description: str | None = None) -> str:
    """Create (or update) deployment `<flow_name>/<name>` on the server at `api_url`, in work pool
    `geofeat`, run from the project folder like prefect.yaml's; returns its id."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.server import WORK_POOL

    entrypoint = FLOWS[flow_name]
    with temporary_settings({PREFECT_API_URL: api_url}), contextlib.redirect_stdout(io.StringIO()):  # its table
        flow = load_entrypoint(entrypoint).from_source(source=str(PROJECT_DIR), entrypoint=entrypoint)
        deployment_id = flow.deploy(name=name, work_pool_name=WORK_POOL, parameters=params, build=False, push=False,
                                    description=description, print_next_steps=False, ignore_warnings=True)
    return str(deployment_id)
