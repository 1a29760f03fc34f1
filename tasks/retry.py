"""Retry policy shared by every shard task: retry transient I/O, never bad code or bad input."""

from __future__ import annotations

# Not transient: retrying cannot make a missing file appear or fix a permission.
PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
RETRY_DELAYS = [1, 5, 20]  # s between the attempts of one shard


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, PERMANENT_OS_ERRORS):
        return False
    return isinstance(exc, (OSError, TimeoutError, ConnectionError))


def retry_transient(task, task_run, state) -> bool:
    """Prefect `retry_condition_fn`: retry only when the failure was a transient I/O error."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            state.result(raise_on_failure=True)
        except BaseException as raised:  # noqa: BLE001 - we only classify it
            exc = raised
    return exc is not None and is_transient(exc)
