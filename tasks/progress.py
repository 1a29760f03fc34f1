"""Progress of long work (ingest, segment, train-experts, evaluate), reported where the work happens.

Plain Python, no Prefect: a stage opens `scope(stage, what, total, unit)` around its work and calls
`advance(n)` (or `Scope.advance`) as units finish. Every change is one record on the
`geofeat.progress` logger carrying a `ProgressEvent` (done/total, rate, ETA). Listeners decide what
to show: flows/progress.py turns the records into a Prefect progress artifact and run-log lines, and
the CLI renders them with rich. Without a listener a record costs one logging call.

`advance()` reports to the innermost scope of the calling thread (a ContextVar), so a helper deep
inside a stage (a loader loop) can report without a parameter threaded through every signature.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator

LOGGER = logging.getLogger("geofeat.progress")
LOGGER.propagate = False  # listeners attach to this logger; plain log output is not spammed
LOGGER.setLevel(logging.INFO)


@dataclass(frozen=True)
class ProgressEvent:
    """One snapshot of a scope: what is being done, how far, how fast."""

    scope: str  # unique per scope (listeners keep one bar / artifact per scope)
    stage: str  # ingest | segment | train-experts | evaluate | ...
    what: str  # e.g. "demo, demo-im2gps" or "ground expert"
    done: int
    total: int
    unit: str  # images | steps | crops
    start: int  # `done` when the scope opened (a resumed run does not count what it skipped)
    elapsed: float  # s since the scope opened
    finished: bool = False
    failed: bool = False

    @property
    def fraction(self) -> float:
        """0..1; a scope that finished without failing is complete (training may stop early)."""
        if self.finished and not self.failed or self.total <= 0:
            return 1.0 if self.finished else 0.0
        return min(1.0, self.done / self.total)

    @property
    def rate(self) -> float | None:
        """Units per second since the scope opened; None before there is anything to measure."""
        if self.elapsed <= 0 or self.done <= self.start:
            return None
        return (self.done - self.start) / self.elapsed

    @property
    def eta(self) -> float | None:
        """Seconds left at the current rate; None when unknown."""
        if self.finished:
            return 0.0
        rate = self.rate
        if rate is None or self.total <= 0:
            return None
        return max(0.0, (self.total - self.done) / rate)

    def line(self) -> str:
        """`segment demo: 120/2,000 images (6%), 8.1 images/s, ETA 3m52s`."""
        head = f"{self.stage} {self.what}".strip()
        early = self.finished and not self.failed and self.done < self.total
        parts = [f"{self.done:,}/{self.total:,} {self.unit} " + ("(ended early)" if early else
                                                                  f"({min(1.0, self.done / self.total) if self.total else self.fraction:.0%})")]
        if self.rate is not None:
            parts.append(f"{format_rate(self.rate)} {self.unit}/s")
        if self.failed:
            parts.append("FAILED")
        elif self.finished:
            parts.append(f"done in {format_duration(self.elapsed)}")
        else:
            parts.append("ETA " + (format_duration(self.eta) if self.eta is not None else "unknown"))
        return f"{head}: " + ", ".join(parts)


def format_rate(rate: float) -> str:
    return f"{rate:,.0f}" if rate >= 100 else f"{rate:.1f}" if rate >= 1 else f"{rate:.2f}"


def format_duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Scope:
    """A unit of long work with a known total. Thread-safe; every change emits an event."""

    def __init__(self, stage: str, what: str, total: int, unit: str, done: int = 0):
        self.stage, self.what, self.total, self.unit = stage, what, max(0, int(total)), unit
        self.id = f"{stage}:{uuid.uuid4().hex[:12]}"
        self.done = self.start = int(done)
        self.opened = time.monotonic()
        self.finished = self.failed = False
        self._lock = threading.Lock()

    def event(self) -> ProgressEvent:
        return ProgressEvent(self.id, self.stage, self.what, self.done, self.total, self.unit,
                             self.start, time.monotonic() - self.opened, self.finished, self.failed)

    def emit(self) -> None:
        event = self.event()
        LOGGER.info(event.line(), extra={"geofeat_progress": event})

    def advance(self, n: int = 1) -> None:
        with self._lock:
            self.done += int(n)
        self.emit()

    def update(self, done: int) -> None:
        with self._lock:
            self.done = int(done)
        self.emit()

    def finish(self, failed: bool = False) -> None:
        with self._lock:
            if self.finished:
                return
            self.finished, self.failed = True, failed
        self.emit()


_CURRENT: ContextVar[Scope | None] = ContextVar("geofeat_progress_scope", default=None)


@contextmanager
def scope(stage: str, what: str, total: int, unit: str, done: int = 0) -> Iterator[Scope]:
    """Open a progress scope for the block; `advance()` in this thread (and below) reports to it."""
    s = Scope(stage, what, total, unit, done=done)
    token = _CURRENT.set(s)
    s.emit()
    try:
        yield s
    except BaseException:
        s.finish(failed=True)
        raise
    finally:
        _CURRENT.reset(token)
        s.finish()


def advance(n: int = 1) -> None:
    """Report `n` more units done to the innermost open scope of this thread (none: nothing)."""
    s = _CURRENT.get()
    if s is not None:
        s.advance(n)


def event_of(record: logging.LogRecord) -> ProgressEvent | None:
    """The event a `geofeat.progress` record carries (listeners call this)."""
    event = getattr(record, "geofeat_progress", None)
    return event if isinstance(event, ProgressEvent) else None
