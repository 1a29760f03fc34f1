"""The structure we keep: storage <- models <- tasks <- flows <- cli (each layer imports only the
layers to its left), only flows/ imports Prefect, and only storage/ runs SQL or opens filesystems.

Every import of every module counts, lazy ones inside functions included (read from the AST)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["storage", "models", "tasks", "flows", "cli"]  # each may import only those before it
PREFECT = {"prefect", "prefect_dask", "dask", "distributed"}
SQL_AND_FS = {"duckdb", "fsspec", "s3fs"}  # storage/ only (type hints under TYPE_CHECKING are fine)


def layer(module: str) -> str | None:
    if module == "flows.cli":
        return "cli"
    top = module.split(".")[0]
    return top if top in LAYERS else None


def modules() -> list[tuple[str, Path]]:
    out = []
    for top in ("storage", "models", "tasks", "flows"):
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            out.append((".".join(p for p in rel.parts if p != "__init__"), path))
    return out


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import outside `if TYPE_CHECKING:` blocks."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for child in node.body for n in ast.walk(child)}
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names
                      if layer(f"{node.module}.{alias.name}") == "cli"]
    return found


MODULES = modules()


def test_every_package_is_seen():
    names = {m for m, _ in MODULES}
    assert {"storage.queries", "models.segmenter", "tasks.segment", "tasks.demo_world.world", "flows.cli"} <= names


@pytest.mark.parametrize("module,path", MODULES, ids=[m for m, _ in MODULES])
def test_no_import_runs_upward(module, path):
    mine = LAYERS.index(layer(module))
    upward = [f"{path.relative_to(ROOT)}:{line} imports {name}" for line, name in imports(path)
              if layer(name) is not None and LAYERS.index(layer(name)) > mine]
    assert not upward, "imports that run upward (storage <- models <- tasks <- flows <- cli):\n" + "\n".join(upward)


@pytest.mark.parametrize("module,path", MODULES, ids=[m for m, _ in MODULES])
def test_prefect_only_in_flows_and_sql_only_in_storage(module, path):
    where = layer(module)
    tops = [(line, name.split(".")[0]) for line, name in imports(path)]
    if where not in ("flows", "cli"):
        assert not [t for t in tops if t[1] in PREFECT], f"{path.relative_to(ROOT)} imports Prefect/Dask"
    if where != "storage":
        bad = [f"line {line}: {name}" for line, name in tops if name in SQL_AND_FS]
        assert not bad, f"{path.relative_to(ROOT)}: SQL and filesystems live in storage/ ({bad})"


def test_no_sql_strings_above_storage():
    """Catalog SQL is named queries in storage/queries.py; flows and tasks call them."""
    offenders = []
    for module, path in MODULES:
        if layer(module) == "storage":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                text = " ".join(node.value.split()).upper()
                if text.startswith(("SELECT ", "WITH ")) and " FROM " in text:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders
