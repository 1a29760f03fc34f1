"""The `geofeat` command line. Every command works on the data root $GEOFEAT_HOME."""

from __future__ import annotations

import json
import logging
import sys
from typing import Optional

from flows import env as prefect_env

prefect_env.apply()  # before anything imports prefect

import typer  # noqa: E402

from storage.layout import DataRoot  # noqa: E402
from tasks.specs import DEMO_COUNTRIES, DemoSpec  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per API call otherwise


def _root() -> DataRoot:
    return DataRoot.from_env()


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(2)


def _print_table(table, fmt: str = "table") -> None:
    import polars as pl

    df = pl.from_arrow(table)
    if fmt == "csv":
        sys.stdout.write(df.write_csv())
    elif fmt == "json":
        sys.stdout.write(json.dumps(df.to_dicts(), default=str, indent=1) + "\n")
    else:
        with pl.Config(tbl_rows=-1, tbl_cols=-1, fmt_str_lengths=80, tbl_width_chars=200, tbl_hide_dataframe_shape=True):
            print(df)


def _spec_option(spec_cls, name: str, **kwargs):
    """A typer option whose default and help come from a spec field (one definition of each knob)."""
    field = spec_cls.model_fields[name]
    return typer.Option(field.default, help=field.description, **kwargs)


@app.command("demo-data")
def demo_data(
    out: str = typer.Option("demo-world", help="folder or fsspec URL to write to"),
    seed: int = _spec_option(DemoSpec, "seed", min=0),
    countries: int = _spec_option(DemoSpec, "countries", min=1, max=DEMO_COUNTRIES),
    per_country: int = _spec_option(DemoSpec, "per_country", min=1),
    heldout_per_country: int = _spec_option(DemoSpec, "heldout_per_country", min=0),
    messy: bool = _spec_option(DemoSpec, "messy"),
    overwrite: bool = typer.Option(False, help="replace an existing world made with another spec"),
):
    """Generate the synthetic street-scene demo world (G50 layout + panoptic + IM2GPS-style set)."""
    from tasks.demo_world.world import generate_demo_world

    spec = DemoSpec(seed=seed, countries=countries, per_country=per_country,
                    heldout_per_country=heldout_per_country, messy=messy)
    try:
        world = generate_demo_world(out, spec, overwrite=overwrite)
    except ValueError as exc:
        _fail(str(exc))
    typer.echo(f"demo world at {out}: {json.dumps(world.get('counts', {}))}")


@app.command()
def ingest(
    layout: str = typer.Option(..., help="g50 | g3 | im2gps | osv5m"),
    source: str = typer.Option(..., help="folder or CSV (any fsspec URL)"),
    dataset: str = typer.Option(..., help="catalog name for this dataset"),
    images: Optional[str] = typer.Option(None, help="image folder for CSV layouts"),
    split: Optional[str] = typer.Option(None, help="hash (default) | train | val | test"),
    shard_size: int = typer.Option(256, help="images per shard task"),
    mode: str = typer.Option("incremental", help="incremental | overwrite"),
):
    """Run the `ingest` flow in this process."""
    from pydantic import ValidationError

    from flows.ingest import ingest as ingest_flow
    from tasks.specs import IngestOptions, SourceSpec

    try:
        spec = SourceSpec(layout=layout, source=source, images=images, dataset=dataset,
                          split={"policy": split} if split else None)
        options = IngestOptions(shard_size=shard_size, mode=mode)
    except ValidationError as exc:
        _fail(str(exc))
    try:
        summary = ingest_flow(spec, options, home=_root().url)
    except ValueError as exc:  # configuration errors name the field
        _fail(str(exc))
    typer.echo(json.dumps(summary, indent=1))


def _deployment_params(flow_name: str, deployment: str) -> dict:
    from flows.deployments import deployment_parameters

    try:
        return deployment_parameters(flow_name, deployment)
    except KeyError as exc:
        _fail(str(exc))


def _run_flow(flow, params: dict):
    """Run a flow in this process; a missing checkpoint or empty catalog is said, not dumped."""
    try:
        return flow(**params)
    except (LookupError, RuntimeError, ValueError, OSError) as exc:
        _fail(f"{type(exc).__name__}: {exc}")


@app.command("build-feature-datasets")
@app.command("build", help="Short for build-feature-datasets.")
def build(deployment: str = typer.Argument("demo", help="a deployment name from prefect.yaml")):
    """Run `build-feature-datasets` in this process, with a prefect.yaml deployment's parameters."""
    from flows.build_feature_datasets import build_feature_datasets

    _run_flow(build_feature_datasets, _deployment_params("build-feature-datasets", deployment))
    summary()


@app.command()
def segment(
    deployment: str = typer.Argument("resegment", help="a `segment` deployment name from prefect.yaml"),
    dataset: Optional[list[str]] = typer.Option(None, "--dataset", "-d", help="datasets (default: all)"),
):
    """Run the `segment` flow in this process, with a prefect.yaml deployment's parameters."""
    from flows.segment import segment as segment_flow

    params = _deployment_params("segment", deployment)
    if dataset:
        params["datasets"] = dataset
    typer.echo(json.dumps(_run_flow(segment_flow, params), indent=1))


@app.command("train-experts")
@app.command("train", help="Short for train-experts.")
def train(deployment: str = typer.Argument("demo", help="a `train-experts` deployment name from prefect.yaml")):
    """Run `train-experts` in this process, with a prefect.yaml deployment's parameters."""
    from flows.train_experts import train_experts

    result = _run_flow(train_experts, _deployment_params("train-experts", deployment))
    typer.echo(json.dumps(result, indent=1, default=str))


@app.command()
def evaluate(deployment: str = typer.Argument("demo", help="an `evaluate` deployment name from prefect.yaml")):
    """Run `evaluate` in this process, with a prefect.yaml deployment's parameters; prints the report."""
    from flows.evaluate import evaluate as evaluate_flow

    _run_flow(evaluate_flow, _deployment_params("evaluate", deployment))
    report()


@app.command()
def report():
    """Print the latest evaluation report (Tables 1 and 2, the poster's numbers beside ours)."""
    root = _root()
    path = root.path("reports", "latest.md")
    if not root.fs.exists(path):
        _fail(f"no evaluation report under {root.url} yet; run `geofeat evaluate` (or the evaluate flow)")
    text = root.fs.cat_file(path).decode()
    typer.echo(text.split("\n## Figures")[0].rstrip())
    typer.echo(f"\nreport with figures: {path}")


@app.command()
def predict(
    images: list[str] = typer.Argument(..., help="image paths or URLs (any fsspec URL)"),
    top_k: int = typer.Option(5, "--top-k", min=1),
    method: str = typer.Option("logprob", help="logprob (confidence-weighted) | majority (the poster's vote)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
    device: str = typer.Option("auto", help="auto | cuda | mps | cpu"),
):
    """Predict the country of images with the latest experts and their segmenter."""
    from tasks.predict import METHODS, Predictor, predictions_text

    if method not in METHODS:
        _fail(f"--method must be one of {METHODS}, not {method!r}")
    try:
        predictor = Predictor(_root(), device=device)
    except (LookupError, RuntimeError, ValueError, OSError) as exc:
        _fail(f"{type(exc).__name__}: {exc}")
    results = [predictor.predict(uri, top_k=top_k, method=method) for uri in images]
    typer.echo(json.dumps(results, indent=1) if as_json else predictions_text(results).rstrip())
    if any("error" in r for r in results):
        raise typer.Exit(1)


SIZE = r"^\s*\d+(\.\d+)?\s*([KMGT]i?B|B)\s*$"  # a DuckDB size: 512MB, 2GB, 1.5GiB


def _json_value(value):
    """A value as JSON can hold it: bytes as base64, times as ISO 8601, nested values recursively."""
    import base64
    import math
    from datetime import date, datetime, time, timedelta
    from decimal import Decimal

    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (Decimal, timedelta)) or not isinstance(value, (str, int, float, bool, type(None))):
        return str(value)
    return value


def _write_rows(table, fmt: str) -> None:
    """`geofeat sql` output. Every format takes every column type: csv writes a nested value (list,
    struct, map: `bbox`, `crop`) as JSON text and bytes as base64, json the same inside its rows."""
    if fmt == "table":
        _print_table(table)
        return
    rows = [{k: _json_value(v) for k, v in row.items()} for row in table.to_pylist()]
    if fmt == "json":
        sys.stdout.write(json.dumps(rows, indent=1) + "\n")
        return
    import csv

    out = csv.writer(sys.stdout, lineterminator="\n")
    out.writerow(table.column_names)
    for row in rows:
        out.writerow(["" if v is None else json.dumps(v) if isinstance(v, (dict, list)) else v for v in row.values()])


@app.command()
def sql(
    query: str = typer.Argument(..., help="one SELECT over images, quarantine, ..."),
    format: str = typer.Option("table", "--format", "-f", help="table | csv | json"),
    timeout: Optional[float] = typer.Option(None, "--timeout", min=0, help="seconds the query may run, fetching "
                                            "included (default 60; 0: no limit)"),
    memory_limit: Optional[str] = typer.Option(None, "--memory-limit", help="DuckDB memory limit, e.g. 4GB "
                                               "(default 2GB); larger sorts and joins spill to the data root's _tmp/"),
    temp_limit: Optional[str] = typer.Option(None, "--temp-limit", help="how much the query may spill to disk "
                                             "(default 8GB)"),
    max_rows: int = typer.Option(10_000, "--max-rows", min=0, help="rows printed (0: all); a longer result is "
                                 "cut, and said so on stderr"),
):
    """Run one read-only SQL query over the catalog (writes and file access are refused), bounded in
    time, memory and spill space."""
    import re

    from storage.catalog import QueryRefused, QueryTimeout, QueryTooLarge, SqlLimits, run_query

    if format not in ("table", "csv", "json"):
        _fail(f"--format must be table, csv or json, not {format!r}")
    for flag, value in (("--memory-limit", memory_limit), ("--temp-limit", temp_limit)):
        if value is not None and not re.match(SIZE, value, re.IGNORECASE):
            _fail(f"{flag} must be a size such as 512MB or 4GB, not {value!r}")
    defaults = SqlLimits()
    limits = SqlLimits(timeout_s=defaults.timeout_s if timeout is None else (timeout or None),
                       memory_limit=memory_limit or defaults.memory_limit, temp_limit=temp_limit or defaults.temp_limit,
                       max_rows=max_rows or None)
    try:
        result = run_query(_root(), query, limits=limits)
    except QueryRefused as exc:
        _fail(f"query refused: {exc}")
    except (QueryTimeout, QueryTooLarge) as exc:
        _fail(str(exc))
    except Exception as exc:  # duckdb errors: bad SQL, unknown column, ...
        _fail(f"{type(exc).__name__}: {exc}")
    _write_rows(result.table, format)
    if result.truncated:
        typer.secho(f"(the first {max_rows} rows; the result has more: --max-rows N, or 0 for all)", err=True,
                    fg="yellow")


@app.command()
def summary():
    """Print the catalog summary (images per dataset/split/country, quarantine reasons)."""
    from tasks.report import catalog_summary

    root = _root()
    typer.echo(f"catalog: {root.catalog_sql}")
    for title, table in catalog_summary(root).items():
        typer.secho(f"\n{title}", bold=True)
        _print_table(table)


@app.command()
def refresh():
    """Rewrite catalog.sql from the committed shards."""
    from storage.catalog import refresh_catalog

    root = _root()
    refresh_catalog(root)
    typer.echo(root.catalog_sql)


@app.command()
def check(as_json: bool = typer.Option(False, "--json", help="print JSON")):
    """Check the catalog's integrity (leaks across splits, stale crops, orphans, uncommitted shards).

    Exit code 0 when every check passes, 1 when any fails."""
    from tasks.check import integrity_checks

    root = _root()
    try:
        present = root.fs.exists(root.url)
    except OSError as exc:  # e.g. a bucket that does not exist
        _fail(str(exc))
    if not present:
        _fail(f"no catalog at {root.url}; set GEOFEAT_HOME to a data root")
    checks = integrity_checks(root)
    if as_json:
        typer.echo(json.dumps([{"name": c.name, "passed": c.passed, "detail": c.detail,
                                "rows": c.table.to_pylist() if c.table is not None else []} for c in checks],
                              indent=1, default=str))
    else:
        typer.echo(f"catalog: {root.url}")
        for c in checks:  # plain lines: file paths and details are too long for a table
            typer.secho(f"{'PASS' if c.passed else 'FAIL'}  {c.name}: {c.detail}", fg=None if c.passed else "red")
            for row in (c.table.to_pylist() if not c.passed and c.table is not None else []):
                typer.echo("      " + ", ".join(f"{k}={v}" for k, v in row.items()))
    if not all(c.passed for c in checks):
        raise typer.Exit(1)


@app.command()
def up(port: int = typer.Option(4200, help="server port on 127.0.0.1")):
    """Start a local Prefect server, work pool, deployments and worker (idempotent)."""
    from flows import server

    try:
        info = server.up(_root(), port=port)
    except RuntimeError as exc:
        _fail(str(exc))
    typer.echo(f"Prefect API {info['api_url']}  worker pid {info['worker_pid']}  logs {info['logs']}")
    typer.echo('For the prefect CLI in this shell: eval "$(geofeat env)"')


@app.command()
def down():
    """Stop the worker and server that `geofeat up` started."""
    from flows import server

    stopped = server.down(_root())
    typer.echo("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


@app.command("env")
def show_env(get: Optional[str] = typer.Option(None, help="print only this variable's value")):
    """Print the environment for running `prefect` against this data root (eval it)."""
    env = prefect_env.prefect_env(_root())
    if get:
        typer.echo(env.get(get, ""))
        return
    for key, value in env.items():
        typer.echo(f"export {key}={json.dumps(value)}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
