"""Retry policy shared by every shard task: retry transient I/O, never bad code or bad input.

Each storage operation already retries on its own (storage.shards.retry_io); these task
retries are the second line, for a shard whose storage kept failing for a while.
"""

from __future__ import annotations

import os

from storage.shards import is_transient

ENV_DELAYS = "GEOFEAT_RETRY_DELAYS"  # e.g. "0,0,0" in tests; read at import
DEFAULT_DELAYS = [1.0, 5.0, 20.0]  # s between the attempts of one shard


def retry_delays(value: str | None = None) -> list[float]:
    """The task retry delays: `value` (comma-separated seconds), else $GEOFEAT_RETRY_DELAYS, else the default."""
    value = value if value is not None else os.environ.get(ENV_DELAYS, "")
    if not value.strip():
        return list(DEFAULT_DELAYS)
    try:
        delays = [float(v) for v in value.split(",")]
    except ValueError:
        delays = []
    if not delays or any(d < 0 for d in delays) or len(delays) > 50:
        raise ValueError(f"{ENV_DELAYS}={value!r}: give 1 to 50 comma-separated seconds >= 0, e.g. '1,5,20'")
    return delays


# One list shared by every task (Prefect keeps the object): tests may change it in place.
RETRY_DELAYS = retry_delays()


def retry_transient(task, task_run, state) -> bool:
    """Prefect `retry_condition_fn`: retry only when the failure was a transient I/O error."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            state.result(raise_on_failure=True)
        except BaseException as raised:  # noqa: BLE001 - we only classify it
            exc = raised
    return exc is not None and is_transient(exc)
