"""The `geofeat` command line.

Every command works on one data root: $GEOFEAT_HOME, else the `home:` of the config file (--config) or of the nearest geofeat.yaml, else ./geofeat-data.

Errors end in one line that names the flag or field and the fix: exit code 2 when the command or its configuration is wrong, 1 when it ran and failed. `geofeat --debug ...` shows the traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

import click
import typer
from typer.core import TyperGroup

try:  # typer >= 0.2x carries its own copy of click: catch its exceptions as well as click's
    from typer._click import exceptions as _typer_click
except ImportError:  # an older typer uses click itself
    _typer_click = click.exceptions
UsageError = (click.UsageError, _typer_click.UsageError)
ClickError = (click.ClickException, _typer_click.ClickException)
Abort = (click.exceptions.Abort, typer.Abort, KeyboardInterrupt)

from storage.layout import DataRoot, absolute, find_home
from tasks.specs import DEMO_COUNTRIES, DemoSpec

DEBUG = {"on": False}
USAGE_ERRORS = (ValueError,)  # a configuration mistake (ConfigError, pydantic, a bad source): exit 2


class GeofeatGroup(TyperGroup):
    """Every error becomes one `error: ...` line (exit 2 for usage and configuration, 1 for a failed
    run); `--debug` anywhere on the line lets the exception and its traceback through."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        args = list(sys.argv[1:] if args is None else args)
        DEBUG["on"] = "--debug" in args or os.environ.get("GEOFEAT_DEBUG", "") not in ("", "0")
        args = [a for a in args if a != "--debug"]
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            code = rv if isinstance(rv, int) else 0
        except UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # `geofeat` alone: the help, as click shows it
                typer.echo(exc.format_message(), err=True)
                code = 2
                if standalone_mode:
                    sys.exit(code)
                return code
            cmd = f"{exc.ctx.command_path} --help" if getattr(exc, "ctx", None) else "geofeat --help"
            _say(f"{' '.join(exc.format_message().split())} (see {cmd})")
            code = 2
        except ClickError as exc:
            _say(exc.format_message())
            code = exc.exit_code
        except Abort:
            _say("aborted")
            code = 130
        except Exception as exc:  # noqa: BLE001 - every error ends here as one line
            if DEBUG["on"]:
                raise
            _say(describe(exc))
            code = 2 if isinstance(exc, USAGE_ERRORS) else 1
        if standalone_mode:
            sys.exit(code)
        return code


def describe(exc: BaseException) -> str:
    """One line: the message (pydantic errors condensed), with the type for errors that are not ours."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        from flows.deployments import _says, _where

        return "; ".join(f"{_where(tuple(e['loc']), '')}: {_says(e)}" for e in exc.errors()[:4])
    message = " ".join(str(exc).split()) or type(exc).__name__
    ours = isinstance(exc, (ValueError, LookupError, RuntimeError, OSError))
    return message if ours else f"{type(exc).__name__}: {message}"


def _say(message: str) -> None:
    typer.secho(f"error: {message}", fg="red", err=True)


def _quiet(record: logging.LogRecord) -> bool:
    """Drop the temporary server's goodbye: it would follow the error line, which must come last."""
    return DEBUG["on"] or not (record.name == "prefect" and record.getMessage().startswith("Stopping temporary server"))


class _Console(logging.Formatter):
    """Console log lines without tracebacks (Prefect logs each failure's; the error line says what to
    do); `--debug` keeps them. Wraps the handler's own formatter, so Prefect's format stays."""

    def __init__(self, inner: logging.Formatter | None = None):
        super().__init__("%(levelname)s %(name)s: %(message)s")
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        fmt = self.inner.format if self.inner is not None else super().format
        if DEBUG["on"] or not (record.exc_info or record.exc_text or record.stack_info):
            return fmt(record)
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return fmt(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def _tame_console_logs() -> None:
    """Our console handlers and Prefect's (not its API handler: the UI keeps the tracebacks)."""
    names = ["", *(n for n in list(logging.Logger.manager.loggerDict) if n.split(".")[0] == "prefect")]
    for name in names:
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler.formatter, _Console):
                handler.setFormatter(_Console(handler.formatter))
                handler.addFilter(_quiet)


app = typer.Typer(cls=GeofeatGroup, add_completion=False, no_args_is_help=True, help=__doc__,
                  pretty_exceptions_enable=False)
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
_tame_console_logs()
logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per API call otherwise


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="show the full traceback of an error")):
    """The `geofeat` command line (see the README's CLI section)."""


# ---------------------------------------------------------------- the data root


def _start(config: Optional[Path] = None) -> DataRoot:
    """The data root, found; and the offline Prefect environment for it, set before anything imports
    Prefect (loading a config file does). Nothing is created or printed yet."""
    url, how = find_home(config=config)
    root = DataRoot(url)
    if "prefect" not in sys.modules:
        import warnings

        from flows import env as prefect_env

        prefect_env.apply(root, create=False)
        # Prefect tries to make its home at import; `_run` makes it just before a run (a refused command
        # leaves no folder behind), so that first attempt's warning is noise.
        warnings.filterwarnings("ignore", message="Failed to create the Prefect home directory")
    FOUND[root.url] = how
    return root


FOUND: dict[str, str] = {}  # data root -> how it was found (for the line that says it)


def _root(config: Optional[Path] = None, *, create: bool = False, root: DataRoot | None = None) -> DataRoot:
    """The data root, said on stderr when it is new or empty (and for commands that write: always).
    A command that only reads refuses a root that does not exist (exit 2) instead of creating it."""
    root = root or _start(config)
    url, how = root.url, FOUND.get(root.url, "")
    try:
        present = root.fs.exists(root.url)
    except OSError as exc:  # e.g. a bucket that does not exist
        _fail(str(exc))
    if not present and not create:
        _fail(f"no catalog at {url} (data root from {how}); set GEOFEAT_HOME to your data root, or add "
              "`home: PATH` to geofeat.yaml in your project folder")
    state = "new" if not present else "empty" if not root.fs.exists(root.path("_commits")) else None
    if create or state:
        typer.secho(f"data root: {url} ({', '.join(filter(None, [state, 'from ' + how]))})", err=True,
                    fg="yellow" if state else None)
    return root


def _fail(message: str) -> None:
    """A usage or configuration error (exit 2)."""
    _say(message)
    raise typer.Exit(2)


def _failed(message: str) -> None:
    """The command ran and failed (exit 1)."""
    _say(message)
    raise typer.Exit(1)


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


# ---------------------------------------------------------------- parameters: deployment, file, flags

CONFIG = typer.Option(None, "--config", "-c", help="YAML with the flow's parameters: a project file with a "
                      "section per flow, or one flow's parameters; relative paths resolve against its folder")
LAYOUT = typer.Option(None, "--layout", help="source layout: g50 | g3 | im2gps | osv5m")
SOURCE = typer.Option(None, "--source", help="the dataset's folder or CSV (any fsspec URL)")
DATASET = typer.Option(None, "--dataset", help="catalog name of the dataset (lower-case, digits, _ and -)")
IMAGES = typer.Option(None, "--images", help="photo folder for CSV layouts (default: next to the CSV)")
SEGMENTER_CHECKPOINT = typer.Option(None, "--segmenter-checkpoint", help="Mask2Former hub id or local "
                                    "directory (sets segmenter.kind: mask2former)")
DEVICE = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N | mps")
BATCH_SIZE = typer.Option(None, "--batch-size", help="images (segment) or crops (train, evaluate) per batch")
SEGMENTER = typer.Option(None, "--segmenter", help="pin the segmenter id (default: the latest trained one)")
ALLOW_UNTRAINED = typer.Option(False, "--allow-untrained", help="let the default be an UNTRAINED (random-init) "
                               "segmenter or expert: demos and tests only")
EXPERTS_RUN = typer.Option(None, "--experts-run", help="pin the experts of one train-experts run (run_id)")
EXPERT = typer.Option(None, "--expert", help="pin one expert by expert_id (repeat per group)")


class Params:
    """One flow's parameters: from a deployment or a config file, then flag overrides, each flag
    remembered so a bad value is reported by its flag."""

    def __init__(self, flow_name: str, deployment: Optional[str], config: Optional[Path], default: Optional[str],
                 flags_given: bool = False):
        from flows.deployments import config_parameters, deployment_parameters

        if deployment and config:
            _fail(f"give a deployment name ({deployment}) or --config {config}, not both")
        self.flow_name, self.config, self.flags = flow_name, config, {}
        if config:
            self.values = config_parameters(config, flow_name)
            self.where = f"{config}: {flow_name}."
        elif deployment or (default and not flags_given):
            self.values = deployment_parameters(flow_name, deployment or default)
            self.where = f"prefect.yaml {flow_name}/{deployment or default}: "
        else:
            self.values, self.where = {}, ""

    def block(self, name: str) -> dict:
        value = self.values.get(name)
        self.values[name] = dict(value) if isinstance(value, dict) else {}
        return self.values[name]

    def set(self, path: str, value: Any, flag: str) -> None:
        """Set `block.field` (or a top-level parameter) from `flag`, when the flag was given."""
        if value is None or value == [] or value is False:
            return
        *blocks, field = path.split(".")
        target = self.values
        for b in blocks:
            target = self.block(b) if target is self.values else target.setdefault(b, {})
        target[field] = value
        self.flags[path] = flag

    def source(self, key: str, layout, source, dataset, images, as_list: bool) -> None:
        """--layout/--source/--dataset/--images: one source (replacing the file's or deployment's)."""
        given = {k: v for k, v in dict(layout=layout, source=source, dataset=dataset, images=images).items() if v}
        if not given:
            return
        current = self.values.get(key)
        base = dict((current[0] if current and len(current) == 1 else {}) if as_list else (current or {}))
        if as_list and current and len(current) > 1 and not {"source", "dataset"} <= set(given):
            _fail(f"--{sorted(given)[0]}: the {'file' if self.config else 'deployment'} has {len(current)} sources; "
                  "give --layout, --source and --dataset for one source, or edit the file")
        base.update({k: absolute(v) if k in ("source", "images") else v for k, v in given.items()})
        for k in ("layout", "source", "dataset"):
            if not base.get(k):
                _fail(f"--{k} is missing: a source needs --layout (g50 | g3 | im2gps | osv5m), --source (its folder "
                      "or CSV) and --dataset (a catalog name), e.g. --layout g50 --source ~/g50 --dataset g50")
        self.values[key] = [base] if as_list else base
        prefix = f"{key}[0]" if as_list else key
        self.flags.update({f"{prefix}.{k}": f"--{k}" for k in given})

    def segmenter_checkpoint(self, checkpoint: Optional[str]) -> None:
        if not checkpoint:
            return
        from flows.deployments import resolve_path

        seg = {k: v for k, v in self.block("segmenter").items() if k not in ("kind", "annotations")}
        seg.update(kind="mask2former", checkpoint=resolve_path(checkpoint, Path.cwd(), "checkpoint"))
        self.values["segmenter"] = seg
        self.flags["segmenter.checkpoint"] = "--segmenter-checkpoint"

    def typed(self) -> dict:
        from flows.deployments import validate_parameters

        return validate_parameters(self.flow_name, self.values, self.where, self.flags)


def _check_inputs(typed: dict, flags: dict[str, str]) -> None:
    """Sources and checkpoints checked before any Prefect run starts: a mistake costs no server start.
    A message about a value a flag set names the flag."""
    try:
        _check(typed)
    except ValueError as exc:
        message = str(exc)
        for field, flag in flags.items():
            if message.startswith(field + ":"):
                raise ValueError(flag + message[len(field):]) from exc
        raise


def _check(typed: dict) -> None:
    from flows.ingest import check_source
    from models.hub import EXPERT_FIELD, SEGMENTER_FIELD, check_checkpoint
    from models.segmenter import SegmenterUnavailable
    from tasks.specs import TINY

    sources = typed.get("sources") or ([typed["source"]] if typed.get("source") else [])
    for i, spec in enumerate(sources):
        check_source(spec, f"sources[{i}]" if "sources" in typed else "source")
    seg = typed.get("segmenter")
    if seg is not None and seg.kind == "mask2former":
        check_checkpoint(seg.checkpoint, SEGMENTER_FIELD, SegmenterUnavailable, seg.revision)
    spec = typed.get("spec")
    if spec is not None and hasattr(spec, "checkpoint") and spec.checkpoint != TINY:
        from models.expert import ExpertUnavailable

        check_checkpoint(spec.checkpoint, EXPERT_FIELD, ExpertUnavailable)


def _run(flow_name: str, params: Params, root: DataRoot, announced: bool = False) -> Any:
    """Validate, check the inputs, then run the flow in this process on `root`."""
    typed = params.typed()
    _check_inputs(typed, params.flags)
    if not announced:
        _root(root=root, create=True)
    typed["home"] = root.url
    from flows import env as prefect_env
    from flows.deployments import load_flow

    if os.environ.get("PREFECT_HOME"):
        prefect_env.ensure_prefect_home()

    flow = load_flow(flow_name)
    _tame_console_logs()  # Prefect's handlers exist now
    try:
        return flow(**typed)
    except ValueError as exc:  # e.g. a CSV without the layout's columns: name the flag that gave the file
        message = str(exc)
        for field, flag in params.flags.items():
            value = _get(params.values, field)
            if isinstance(value, str) and message.startswith(value):
                raise ValueError(f"{flag} {message}") from exc
        raise


def _get(values: dict, dotted: str) -> Any:
    for part in dotted.replace("[0]", ".0").split("."):
        values = values[int(part)] if isinstance(values, list) else (values or {}).get(part)
    return values


# ---------------------------------------------------------------- commands


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
    layout: Optional[str] = LAYOUT,
    source: Optional[str] = SOURCE,
    dataset: Optional[str] = DATASET,
    images: Optional[str] = IMAGES,
    split: Optional[str] = typer.Option(None, help="hash (default) | train | val | test"),
    shard_size: Optional[int] = typer.Option(None, help="images per shard task (default 256)"),
    mode: Optional[str] = typer.Option(None, help="incremental (default) | overwrite"),
    config: Optional[Path] = CONFIG,
):
    """Run the `ingest` flow in this process: one dataset into the catalog."""
    root = _start(config)
    params = Params("ingest", None, config, default=None)
    params.source("source", layout, source, dataset, images, as_list=False)
    if not params.values.get("source"):
        _fail("--source is missing: give --layout, --source and --dataset (e.g. --layout g50 --source ~/g50 "
              "--dataset g50), or a `source:` block in --config FILE")
    if split:
        params.block("source")["split"] = {"policy": split}
        params.flags["source.split.policy"] = "--split"
    params.set("options.shard_size", shard_size, "--shard-size")
    params.set("options.mode", mode, "--mode")
    summary = _run("ingest", params, root)
    typer.echo(json.dumps(summary, indent=1))


@app.command("build-feature-datasets")
@app.command("build", help="Short for build-feature-datasets.")
def build(
    deployment: Optional[str] = typer.Argument(None, help="a prefect.yaml deployment (default: demo, unless "
                                               "--config or --source is given)"),
    config: Optional[Path] = CONFIG,
    layout: Optional[str] = LAYOUT,
    source: Optional[str] = SOURCE,
    dataset: Optional[str] = DATASET,
    images: Optional[str] = IMAGES,
    segmenter_checkpoint: Optional[str] = SEGMENTER_CHECKPOINT,
    device: Optional[str] = DEVICE,
    batch_size: Optional[int] = BATCH_SIZE,
):
    """Run `build-feature-datasets` in this process: ingest, segment, check.

    Parameters from a prefect.yaml deployment or --config FILE, with flag overrides."""
    root = _start(config)
    params = Params("build-feature-datasets", deployment, config, default="demo",
                    flags_given=bool(source or layout or dataset))
    params.source("sources", layout, source, dataset, images, as_list=True)
    params.segmenter_checkpoint(segmenter_checkpoint)
    params.set("run.device", device, "--device")
    params.set("run.batch_size", batch_size, "--batch-size")
    result = _run("build-feature-datasets", params, root)
    if result.get("segmented"):
        typer.echo(f"segmenter: {result['segmented']['segmenter']}", err=True)
    summary(config)


@app.command()
def segment(
    deployment: Optional[str] = typer.Argument(None, help="a `segment` deployment of prefect.yaml (default: "
                                               "resegment; demo = untrained tiny model)"),
    dataset: Optional[list[str]] = typer.Option(None, "--dataset", "-d", help="datasets (default: all)"),
    config: Optional[Path] = CONFIG,
    segmenter_checkpoint: Optional[str] = SEGMENTER_CHECKPOINT,
    device: Optional[str] = DEVICE,
    batch_size: Optional[int] = BATCH_SIZE,
):
    """Run the `segment` flow in this process, with a deployment's or --config FILE's parameters."""
    root = _start(config)
    params = Params("segment", deployment, config, default="resegment")
    params.set("datasets", dataset, "--dataset")
    params.segmenter_checkpoint(segmenter_checkpoint)
    params.set("run.device", device, "--device")
    params.set("run.batch_size", batch_size, "--batch-size")
    typer.echo(json.dumps(_run("segment", params, root), indent=1))


@app.command("train-experts")
@app.command("train", help="Short for train-experts.")
def train(
    deployment: Optional[str] = typer.Argument(None, help="a `train-experts` deployment of prefect.yaml "
                                               "(default: demo)"),
    config: Optional[Path] = CONFIG,
    experts_checkpoint: Optional[str] = typer.Option(None, "--experts-checkpoint", help="ViT hub id or local "
                                                     "directory to fine-tune from (spec.checkpoint)"),
    segmenter: Optional[str] = SEGMENTER,
    dataset: Optional[list[str]] = typer.Option(None, "--dataset", "-d", help="training datasets (default: all)"),
    device: Optional[str] = DEVICE,
    batch_size: Optional[int] = BATCH_SIZE,
    allow_untrained: bool = ALLOW_UNTRAINED,
):
    """Run `train-experts` in this process: one expert per feature group on one segmenter's crops."""
    from flows.deployments import resolve_path

    root = _start(config)
    params = Params("train-experts", deployment, config, default="demo")
    if experts_checkpoint:
        params.set("spec.checkpoint", resolve_path(experts_checkpoint, Path.cwd(), "checkpoint"), "--experts-checkpoint")
    params.set("spec.segmenter", segmenter, "--segmenter")
    params.set("spec.datasets", dataset, "--dataset")
    params.set("spec.device", device, "--device")
    params.set("spec.batch_size", batch_size, "--batch-size")
    params.set("spec.allow_untrained", allow_untrained, "--allow-untrained")
    typed = params.typed()
    _check_inputs(typed, params.flags)  # a missing checkpoint is said before anything else
    spec = typed.get("spec")
    _root(root=root, create=True)
    if spec is None or not spec.segmenter:
        from storage.catalog import refresh_catalog
        from tasks.train_experts import default_segmenter

        refresh_catalog(root)
        chosen = default_segmenter(root, spec.datasets if spec else None, bool(spec and spec.allow_untrained))
        typer.echo(f"segmenter: {chosen} (the latest trained one with train crops; pin it with --segmenter)", err=True)
    result = _run("train-experts", params, root, announced=True)
    typer.echo(json.dumps(result, indent=1, default=str))


@app.command()
def evaluate(
    deployment: Optional[str] = typer.Argument(None, help="an `evaluate` deployment of prefect.yaml (default: demo)"),
    config: Optional[Path] = CONFIG,
    segmenter: Optional[str] = SEGMENTER,
    experts_run: Optional[str] = EXPERTS_RUN,
    expert: Optional[list[str]] = EXPERT,
    dataset: Optional[list[str]] = typer.Option(None, "--dataset", "-d", help="datasets whose test split to "
                                                "evaluate (default: all)"),
    device: Optional[str] = DEVICE,
    batch_size: Optional[int] = BATCH_SIZE,
    allow_untrained: bool = ALLOW_UNTRAINED,
):
    """Run `evaluate` in this process and print the report (Tables 1 and 2)."""
    root = _start(config)
    params = Params("evaluate", deployment, config, default="demo")
    params.set("spec.segmenter", segmenter, "--segmenter")
    params.set("spec.experts_run", experts_run, "--experts-run")
    params.set("spec.experts", expert, "--expert")
    params.set("spec.datasets", dataset, "--dataset")
    params.set("spec.device", device, "--device")
    params.set("spec.batch_size", batch_size, "--batch-size")
    params.set("spec.allow_untrained", allow_untrained, "--allow-untrained")
    spec = params.typed().get("spec")
    _root(root=root, create=True)
    _say_experts(root, spec)
    _run("evaluate", params, root, announced=True)
    report(config)


def _say_experts(root: DataRoot, spec) -> None:
    """Which experts (and segmenter) a command will use: said before it runs."""
    from storage.catalog import refresh_catalog
    from tasks.evaluate import select_experts
    from tasks.specs import EvalSpec

    refresh_catalog(root)
    experts = select_experts(root, spec or EvalSpec())
    pinned = spec is not None and (spec.experts or spec.experts_run or spec.segmenter)
    typer.echo(f"segmenter: {experts['segmenter'][0]}; experts: "
               + ", ".join(f"{g}={e}" for g, e in zip(experts["group"], experts["expert_id"]))
               + ("" if pinned else " (the latest; pin with --segmenter, --experts-run or --expert)"), err=True)


@app.command()
def report(config: Optional[Path] = CONFIG):
    """Print the latest evaluation report (Tables 1 and 2, the poster's numbers beside ours)."""
    root = _root(config)
    path = root.path("reports", "latest.md")
    if not root.fs.exists(path):
        _failed(f"no evaluation report under {root.url} yet; run `geofeat evaluate` (or the evaluate flow)")
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
    segmenter: Optional[str] = SEGMENTER,
    experts_run: Optional[str] = EXPERTS_RUN,
    expert: Optional[list[str]] = EXPERT,
    allow_untrained: bool = ALLOW_UNTRAINED,
):
    """Predict the country of images with the latest experts (or the pinned ones) and their segmenter."""
    from tasks.predict import METHODS, Predictor, predictions_text
    from tasks.specs import EvalSpec

    if method not in METHODS:
        _fail(f"--method must be one of {METHODS}, not {method!r}")
    root = _root()
    selection = EvalSpec(segmenter=segmenter, experts_run=experts_run, experts=expert or None,
                         allow_untrained=allow_untrained)
    predictor = Predictor(root, device=device, selection=selection)
    typer.echo(f"segmenter: {predictor.segmenter_id}; experts: "
               + ", ".join(f"{g}={e}" for g, e in zip(predictor.experts["group"], predictor.experts["expert_id"])),
               err=True)
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
    root = _root()
    try:
        result = run_query(root, query, limits=limits)
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
def summary(config: Optional[Path] = CONFIG):
    """Print the catalog summary (images per dataset/split/country, quarantine reasons)."""
    from tasks.report import catalog_summary

    root = _root(config)
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

    Exit code 0 when every check passes, 1 when any fails, 2 when there is no catalog."""
    from tasks.check import integrity_checks

    root = _root()
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
        info = server.up(_root(create=True), port=port)
    except RuntimeError as exc:
        _failed(str(exc))
    typer.echo(f"Prefect API {info['api_url']}  worker pid {info['worker_pid']}  logs {info['logs']}")
    typer.echo('For the prefect CLI in this shell: eval "$(geofeat env)"')


@app.command()
def down():
    """Stop the worker and server that `geofeat up` started (for this data root, or the one started from another folder)."""
    from flows import server

    url, how = find_home()
    root = DataRoot(url)
    stopped = server.down(root)
    if not stopped:
        others = [r for r in server.started_elsewhere() if r.url != root.url]
        explicit = how == "$GEOFEAT_HOME"
        if len(others) == 1 and not explicit:
            stopped = server.down(others[0])
            typer.echo(f"data root {url} has no server; stopping the one `geofeat up` started for {others[0].url}",
                       err=True)
        elif others:
            _failed(f"nothing runs for data root {url}; servers run for: "
                    + "; ".join(f"GEOFEAT_HOME={r.url} geofeat down" for r in others))
    typer.echo("stopped: " + (", ".join(stopped) if stopped else f"nothing was running (data root {url})"))


@app.command()
def deploy(
    config: Path = typer.Argument(..., help="a config file (as for --config)"),
    name: str = typer.Option(..., "--name", "-n", help="deployment name, e.g. my-g50 (run it as FLOW/NAME)"),
    flow: Optional[list[str]] = typer.Option(None, "--flow", help="which of the file's flows (default: every "
                                             "section; a one-flow file needs it)"),
):
    """Deploy a config file's flows to the server that `geofeat up` started (work pool `geofeat`).

    The same parameters as `--config FILE`; relative paths resolve against the file's folder."""
    root = _start(config)
    from flows import env as prefect_env
    from flows.deployments import FLOWS, config_parameters, config_sections, deploy as deploy_flow

    sections = config_sections(config)
    flows = list(flow or sections)
    unknown = [f for f in flows if f not in FLOWS]
    if unknown:
        _fail(f"--flow {unknown[0]}: not a flow; give one or more of {', '.join(FLOWS)}")
    if not flows:
        _fail(f"--flow is missing: {config} holds one flow's parameters; say which flow they are for "
              f"({', '.join(FLOWS)})")
    missing = [f for f in flows if sections and f not in sections]
    if missing:
        _fail(f"--flow {missing[0]}: {config} has no section {missing[0]} (it has {', '.join(sections)})")
    _root(root=root, create=True)
    server = prefect_env.running_server(root)
    if not server:
        _failed(f"no Prefect server for data root {root.url}; start one with `geofeat up` (same GEOFEAT_HOME)")
    for flow_name in flows:
        params = Params(flow_name, None, config, default=None)
        params.values = config_parameters(config, flow_name)
        params.values["home"] = root.url
        params.typed()  # refuse a bad file here, not on the worker
        deploy_flow(flow_name, name, params.values, server["api_url"],
                    description=f"{Path(config).resolve()} (geofeat deploy)")
        typer.echo(f"deployed {flow_name}/{name}: prefect deployment run {flow_name}/{name}")


@app.command("env")
def show_env(get: Optional[str] = typer.Option(None, help="print only this variable's value")):
    """Print the environment for running `prefect` against this data root (eval it)."""
    from flows import env as prefect_env

    env = prefect_env.prefect_env(DataRoot(find_home()[0]))
    if get:
        typer.echo(env.get(get, ""))
        return
    for key, value in env.items():
        typer.echo(f"export {key}={json.dumps(value)}")


def main() -> None:
    from flows.progress import install_cli

    install_cli()  # long commands show done/total, rate and ETA: rich bars on a terminal, lines elsewhere
    app()


if __name__ == "__main__":
    main()
