"""Progress: scopes report where the work happens (tasks/progress.py, no Prefect); flows/progress.py
turns them into Prefect progress artifacts and run-log lines, and the CLI into rich bars or lines."""

from __future__ import annotations

import io
import logging

import pytest

from tasks import progress
from tasks.progress import LOGGER, ProgressEvent


class Capture(logging.Handler):
    def __init__(self):
        super().__init__()
        self.events: list[ProgressEvent] = []

    def emit(self, record):
        self.events.append(progress.event_of(record))


@pytest.fixture
def captured():
    handler = Capture()
    LOGGER.addHandler(handler)
    yield handler.events
    LOGGER.removeHandler(handler)


def event(**kw) -> ProgressEvent:
    base = dict(scope="s", stage="segment", what="demo", done=120, total=2000, unit="images", start=0, elapsed=15.0)
    return ProgressEvent(**{**base, **kw})


def test_event_line_has_done_total_rate_and_eta():
    e = event()
    assert e.rate == pytest.approx(8.0) and e.eta == pytest.approx(1880 / 8.0)
    assert e.line() == "segment demo: 120/2,000 images (6%), 8.0 images/s, ETA 3m55s"
    resumed = event(start=100, done=120, elapsed=10.0)  # a resumed run does not count what it skipped
    assert resumed.rate == pytest.approx(2.0)
    assert event(done=0).line().endswith("ETA unknown") and event(done=0).rate is None
    assert event(done=2000, finished=True).line() == "segment demo: 2,000/2,000 images (100%), 133 images/s, done in 15s"
    assert event(finished=True, failed=True).line().endswith("FAILED")
    assert event(total=0, done=0, finished=True).fraction == 1.0
    early = event(done=42, total=90, unit="steps", finished=True)  # early stopping: complete, and said so
    assert early.fraction == 1.0 and early.line().startswith("segment demo: 42/90 steps (ended early), ")
    assert event(done=42, total=90, finished=True, failed=True).fraction == pytest.approx(42 / 90)


def test_scope_reports_to_the_innermost_scope_and_marks_failures(captured):
    progress.advance(5)  # no scope open: nothing happens
    assert captured == []
    with progress.scope("evaluate", "test crops", 10, "crops") as outer:
        progress.advance(4)
        with progress.scope("train-experts", "ground expert", 3, "steps", done=1):
            progress.advance()
        progress.advance(6)
    assert outer.done == 10
    by_scope: dict[str, list[ProgressEvent]] = {}
    for e in captured:
        by_scope.setdefault(e.what, []).append(e)
    assert [e.done for e in by_scope["test crops"]] == [0, 4, 10, 10]
    assert [e.done for e in by_scope["ground expert"]] == [1, 2, 2] and by_scope["ground expert"][0].start == 1
    assert by_scope["test crops"][-1].finished and not by_scope["test crops"][-1].failed
    captured.clear()
    with pytest.raises(RuntimeError):
        with progress.scope("segment", "x", 5, "images"):
            progress.advance(2)
            raise RuntimeError("boom")
    assert captured[-1].finished and captured[-1].failed and captured[-1].done == 2
    assert sum(e.finished for e in captured) == 1  # finished exactly once


def test_console_lines_are_periodic_with_the_last_one_always():
    from flows.progress import ConsoleProgress

    out = io.StringIO()
    handler = ConsoleProgress(out, live=False, line_every=3600)
    LOGGER.addHandler(handler)
    try:
        with progress.scope("ingest", "osv_sample", 50, "files") as bar:
            for _ in range(50):
                bar.advance()
    finally:
        LOGGER.removeHandler(handler)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2  # the first and the last; the rest inside line_every
    assert lines[0] == "ingest osv_sample: 0/50 files (0%), ETA unknown"
    assert lines[1].startswith("ingest osv_sample: 50/50 files (100%), ") and "files/s, done in" in lines[1]


def test_console_bar_renders_with_rich_and_gives_the_terminal_back():
    from flows.progress import ConsoleProgress

    out = io.StringIO()
    other = logging.StreamHandler(io.StringIO())
    logging.getLogger("geofeat.test").addHandler(other)
    stream = other.stream
    handler = ConsoleProgress(out, live=True)
    LOGGER.addHandler(handler)
    try:
        with progress.scope("train-experts", "ground expert", 8, "steps") as bar:
            for _ in range(8):
                bar.advance()
    finally:
        LOGGER.removeHandler(handler)
        logging.getLogger("geofeat.test").removeHandler(other)
    text = out.getvalue()
    assert "train-experts ground expert" in text and "8/8" in text and "steps" in text
    assert handler.progress is None and other.stream is stream  # stopped, streams restored


@pytest.mark.usefixtures("prefect_harness")
def test_progress_becomes_a_prefect_artifact_of_the_run_from_the_flow_and_from_a_task():
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType

    @task
    def work():
        with progress.scope("train-experts", "ground expert", 4, "steps"):
            for _ in range(4):
                progress.advance()

    @flow
    def run():
        with progress.scope("segment", "d_1", 3, "images") as bar:
            bar.advance(3)
        work()

    state = run(return_state=True)
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        got = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), type=ArtifactFilterType(any_=["progress"])))
    by = {a.description.split(":")[0]: a for a in got}
    assert set(by) == {"segment d_1", "train-experts ground expert"}
    for a in got:
        assert float(a.data) == 100.0 and a.key is None  # on the run's page, not the Artifacts page
    assert by["segment d_1"].description.startswith("segment d_1: 3/3 images (100%)")
    assert by["segment d_1"].task_run_id is None
    assert by["train-experts ground expert"].task_run_id is not None  # reported from inside the task run
