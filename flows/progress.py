"""Listeners of the stages' progress records (tasks/progress.py): Prefect and the CLI.

* `PrefectProgress` (installed when this module is imported, so in every process that runs a flow,
  Dask workers included): inside a flow or task run, each progress scope becomes a Prefect progress
  artifact of that run (its description is the done/total, rate and ETA line) updated every
  ARTIFACT_EVERY s, and a line in the run's log every LOG_EVERY s. The artifacts have no key: they
  belong on the run's page, not among the Artifacts page's results.
* `ConsoleProgress` (`install_cli()`, called by the `geofeat` CLI): a rich progress bar per scope on a
  terminal; elsewhere (a pipe, a log file, CI) one plain line per scope every LINE_EVERY s. While
  the bar is shown, the other log output goes above it and Prefect's per-task-run INFO lines
  ("Finished in state Completed()"), which the bar summarises, are left out of the console (they
  stay in the Prefect API's logs).
"""

from __future__ import annotations

import atexit
import logging
import sys
import threading
import time
from typing import IO, Any

from tasks.progress import LOGGER, ProgressEvent, Scope, event_of, format_duration, format_rate

log = logging.getLogger(__name__)

ARTIFACT_EVERY = 2.0  # s between updates of one progress artifact
LOG_EVERY = 15.0  # s between run-log lines of one scope
LINE_EVERY = 10.0  # s between plain console lines of one scope (not a terminal)
PROGRESS_LINE = "geofeat_progress_line"  # marks our run-log lines (the live console leaves them out)


def _flow_run_id() -> Any:
    """The flow run of the calling thread (a task run's flow run), or None outside a run."""
    from prefect.context import FlowRunContext, TaskRunContext

    task = TaskRunContext.get()
    if task is not None:
        return task.task_run.flow_run_id
    flow = FlowRunContext.get()
    return flow.flow_run.id if flow is not None and flow.flow_run is not None else None


class PrefectProgress(logging.Handler):
    """Progress scopes -> Prefect progress artifacts and run-log lines (throttled)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.scopes: dict[str, dict] = {}  # scope id -> artifact id, last update times

    def emit(self, record: logging.LogRecord) -> None:
        event = event_of(record)
        if event is None or _flow_run_id() is None:
            return
        now = time.monotonic()
        st = self.scopes.get(event.scope)
        try:
            from prefect.artifacts import create_progress_artifact, update_progress_artifact

            if st is None:
                st = self.scopes[event.scope] = {"artifact": None, "artifact_at": now, "log_at": now}
                st["artifact"] = create_progress_artifact(100.0 * event.fraction, description=event.line())
                self._log(event)
            else:
                if event.finished or now - st["artifact_at"] >= ARTIFACT_EVERY:
                    update_progress_artifact(st["artifact"], 100.0 * event.fraction, description=event.line())
                    st["artifact_at"] = now
                if event.finished or now - st["log_at"] >= LOG_EVERY:
                    self._log(event)
                    st["log_at"] = now
        except Exception as exc:  # noqa: BLE001 - progress must never fail the work it reports on
            log.debug("progress artifact for %s not updated: %s", event.scope, exc)
        if event.finished:
            self.scopes.pop(event.scope, None)

    @staticmethod
    def _log(event: ProgressEvent) -> None:
        from prefect.exceptions import MissingContextError
        from prefect.logging import get_run_logger

        try:
            logger = get_run_logger()
        except MissingContextError:
            return
        (logger.warning if event.failed else logger.info)(event.line(), extra={PROGRESS_LINE: True})


def advance_as_completed(bar: Scope, futures: list, sizes: list[int]) -> None:
    """Advance `bar` by each future's size as it completes; a failed future is left to the caller's
    `.result()` (and the bar ends FAILED, short of its total)."""
    from prefect.futures import as_completed

    size = {id(f): n for f, n in zip(futures, sizes)}
    for future in as_completed(futures):
        try:
            future.result()
        except Exception:  # noqa: BLE001 - raised again by the caller, in plan order
            continue
        bar.advance(size[id(future)])
    bar.finish(failed=bar.done < bar.total)


PREFECT_HANDLER = PrefectProgress()
if not any(isinstance(h, PrefectProgress) for h in LOGGER.handlers):
    LOGGER.addHandler(PREFECT_HANDLER)


# ---------------------------------------------------------------- the CLI


class _QuietWhileLive(logging.Filter):
    """On the console while the bar is live: drop per-task-run INFO lines and our own run-log lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, PROGRESS_LINE, False):
            return False
        return not (record.name.startswith("prefect.task_runs") and record.levelno <= logging.INFO)


class ConsoleProgress(logging.Handler):
    """Progress scopes on the console: rich bars on a terminal, else plain lines every `line_every` s."""

    def __init__(self, stream: IO[str] | None = None, live: bool | None = None, line_every: float = LINE_EVERY):
        super().__init__(logging.INFO)
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.line_every = line_every
        self.lines_at: dict[str, float] = {}
        self.tasks: dict[str, Any] = {}  # scope id -> rich task id
        self.running: set[str] = set()  # scopes not finished yet
        self.progress = None
        self.patched: list[tuple[Any, str, Any]] = []  # (object, attribute, original) restored on stop
        self.quiet = _QuietWhileLive()
        self.mutex = threading.RLock()

    # -- plain lines
    def _line(self, event: ProgressEvent) -> None:
        if _flow_run_id() is not None:  # PrefectProgress logs it to the run's log, which prints it here
            return
        now = time.monotonic()
        last = self.lines_at.get(event.scope)
        if last is None or event.finished or now - last >= self.line_every:
            self.stream.write(event.line() + "\n")
            self.stream.flush()
            self.lines_at[event.scope] = now
        if event.finished:
            self.lines_at.pop(event.scope, None)

    # -- rich bars
    def _start(self) -> None:
        from rich.console import Console
        from rich.file_proxy import FileProxy
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        console = Console(file=self.stream, force_terminal=True if self.live else None)
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                                 TextColumn("{task.fields[unit]} {task.percentage:>3.0f}%"),
                                 TextColumn("{task.fields[rate]}"), TextColumn("{task.fields[eta]}"),
                                 console=console, redirect_stdout=True, redirect_stderr=True)
        # Handlers that hold the terminal's stream would draw through the bar: send them above it.
        for handler in _handlers():
            if handler is self:
                continue
            rich_console = getattr(handler, "console", None)
            if rich_console is not None and getattr(rich_console, "file", None) in (sys.stderr, sys.stdout):
                self.patched.append((rich_console, "file", rich_console.file))
                rich_console.file = FileProxy(console, rich_console.file)
            elif isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stderr, sys.stdout):
                self.patched.append((handler, "stream", handler.stream))
                handler.setStream(FileProxy(console, handler.stream))
            else:
                continue
            handler.addFilter(self.quiet)
        self.progress.start()

    def _stop(self) -> None:
        self.progress.stop()
        for obj, attr, original in reversed(self.patched):
            if attr == "stream":
                obj.setStream(original)
                obj.removeFilter(self.quiet)
            else:
                setattr(obj, attr, original)
        for handler in _handlers():
            handler.removeFilter(self.quiet)
        self.patched.clear()
        self.progress, self.tasks, self.running = None, {}, set()

    def _bar(self, event: ProgressEvent) -> None:
        if self.progress is None:
            self._start()
        fields = {"unit": event.unit, "rate": f"{format_rate(event.rate)} {event.unit}/s" if event.rate else "",
                  "eta": "ETA " + (format_duration(event.eta) if event.eta is not None else "?")}
        if event.finished:
            fields["eta"] = "FAILED" if event.failed else \
                ("ended early, " if event.done < event.total else "") + f"done in {format_duration(event.elapsed)}"
        task = self.tasks.get(event.scope)
        if task is None:
            task = self.tasks[event.scope] = self.progress.add_task(f"{event.stage} {event.what}", total=event.total or None,
                                                                   completed=event.done, **fields)
            self.running.add(event.scope)
        self.progress.update(task, completed=event.done, total=event.total or None, **fields)
        if event.finished:
            self.progress.stop_task(task)
            self.running.discard(event.scope)
            if not self.running:  # the bars stay on screen as they ended
                self._stop()

    def emit(self, record: logging.LogRecord) -> None:
        event = event_of(record)
        if event is None:
            return
        with self.mutex:
            try:
                (self._bar if self.live else self._line)(event)
            except Exception:  # noqa: BLE001 - a display problem must not stop the work
                self.live = False
                self._line(event)

    def close(self) -> None:
        with self.mutex:
            if self.progress is not None:
                self._stop()
        super().close()


def _handlers() -> list[logging.Handler]:
    loggers = [logging.getLogger()] + [lg for lg in list(logging.Logger.manager.loggerDict.values())
                                       if isinstance(lg, logging.Logger)]
    return [h for lg in loggers for h in lg.handlers]


_CLI: ConsoleProgress | None = None


def install_cli(stream: IO[str] | None = None, live: bool | None = None) -> ConsoleProgress:
    """Show progress on the console for the rest of this process (the `geofeat` CLI)."""
    global _CLI
    if _CLI is None:
        _CLI = ConsoleProgress(stream, live)
        LOGGER.handlers.insert(0, _CLI)  # before PrefectProgress: the bar is up before a run-log line prints
        atexit.register(_CLI.close)
    return _CLI
