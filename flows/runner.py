"""Where a flow's tasks run, chosen per run by the flows' `runner` parameter (RunnerSpec): Prefect's
thread pool (the default, unchanged) or a Dask cluster through prefect-dask. See docs/dask.md.

A Prefect 3 flow binds its task runner when it is decorated, and `Task.submit`/`Task.map` hand
their work to the task runner of the current flow-run context. `use_runner` starts a
DaskTaskRunner for a block and enters a copy of that context with the runner swapped in: the run
stays one flow run (a subflow would add ~1 s and a second run), the stages' `.submit`/`.map` calls
stay as they are, and the thread path does nothing at all.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Callable, Iterator
from urllib.parse import urlparse

from prefect.client.base import ServerType
from prefect.context import FlowRunContext
from prefect.logging import get_run_logger

from flows.params import RunnerSpec

if TYPE_CHECKING:
    from distributed import Client
    from prefect_dask import DaskTaskRunner

_ACTIVE: ContextVar[tuple[RunnerSpec, DaskTaskRunner] | None] = ContextVar("geofeat_dask_runner", default=None)
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def dask_runner(spec: RunnerSpec, api_url: str, ephemeral: bool) -> DaskTaskRunner:
    """The DaskTaskRunner for `spec`; its tasks report to the Prefect API at `api_url`."""
    from prefect_dask import DaskTaskRunner

    if spec.address or spec.cluster_class:
        field = "address" if spec.address else "cluster_class"
        if ephemeral:  # workers elsewhere would each start a temporary server of their own
            raise ValueError(
                f"runner.{field}: this flow run uses a temporary Prefect server inside its own process, "
                "which Dask workers on other machines cannot reach. Start a server (`geofeat up`, then "
                "`eval \"$(geofeat env)\"`) or set PREFECT_API_URL to a server the workers can reach")
        if spec.address:
            return DaskTaskRunner(address=spec.address)
        try:
            return DaskTaskRunner(cluster_class=spec.cluster_class, cluster_kwargs=spec.cluster_kwargs,
                                  adapt_kwargs=spec.adapt)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"runner.cluster_class: cannot import {spec.cluster_class!r} ({exc}); install its "
                             "package (dask-kubernetes, dask-jobqueue) where the flow runs") from exc
    # A LocalCluster: worker processes start with this run's API URL, so they never start a temporary
    # server each (Prefect's default without PREFECT_API_URL); a temporary server of this process
    # outlives the cluster, and its workers reach it on 127.0.0.1.
    resources = spec.worker_resources
    if resources is None:
        resources = {spec.gpu_resource: spec.gpu_amount} if spec.gpu_resource else {}
    env = {**spec.cluster_kwargs.get("env", {}), "PREFECT_API_URL": api_url}
    kwargs = {**spec.cluster_kwargs, "threads_per_worker": spec.threads_per_worker, "resources": resources, "env": env}
    if spec.workers:
        kwargs["n_workers"] = spec.workers
    return DaskTaskRunner(cluster_kwargs=kwargs, adapt_kwargs=spec.adapt)


@contextmanager
def use_runner(spec: RunnerSpec) -> Iterator[None]:
    """Run the block's `.submit`/`.map` calls on `spec`'s runner. kind thread: nothing changes."""
    if spec.kind == "thread":
        yield
        return
    ctx = FlowRunContext.get()
    if ctx is None:
        raise RuntimeError("runner: kind dask works inside a flow run only")
    api_url = str(ctx.client.api_url)
    runner = dask_runner(spec, api_url, ephemeral=ctx.client.server_type == ServerType.EPHEMERAL)
    if (spec.address or spec.cluster_class) and urlparse(api_url).hostname in LOCAL_HOSTS:
        get_run_logger().warning("Dask workers on other machines cannot reach the Prefect API at %s; give them "
                                 "(and this flow) a PREFECT_API_URL they can reach", api_url)
    with runner, ctx.model_copy(update={"task_runner": runner}):
        token = _ACTIVE.set((spec, runner))
        try:
            yield
        finally:
            _ACTIVE.reset(token)


def wait_for_gpu_worker(client: Client, spec: RunnerSpec) -> None:
    """Fail fast, instead of queueing GPU tasks forever, when no worker offers the resource."""
    deadline = time.monotonic() + spec.worker_timeout
    while True:
        workers = client.scheduler_info()["workers"]
        if any((w.get("resources") or {}).get(spec.gpu_resource, 0) >= spec.gpu_amount for w in workers.values()):
            return
        if time.monotonic() >= deadline:
            offered = {w.get("name", addr): w.get("resources") or {} for addr, w in workers.items()}
            raise RuntimeError(
                f"runner.gpu_resource: no Dask worker offers {spec.gpu_resource}={spec.gpu_amount:g} after "
                f"{spec.worker_timeout:g} s (workers: {offered or 'none'}). Start GPU workers with `dask worker "
                f"<scheduler> --resources {spec.gpu_resource}={spec.gpu_amount:g}`, raise runner.worker_timeout "
                "while they queue, or set runner.gpu_resource: null to run these tasks on any worker")
        time.sleep(0.5)


@contextmanager
def gpu_tasks(submits: bool = True) -> Iterator[None]:
    """Tasks submitted in the block need the runner's `gpu_resource` on Dask; otherwise a no-op.
    `submits=False` (nothing to submit) skips starting the cluster to check its workers."""
    active = _ACTIVE.get()
    if active is None or active[0].gpu_resource is None or not submits:
        yield
        return
    import dask

    spec, runner = active
    wait_for_gpu_worker(runner.client, spec)
    with dask.annotate(resources={spec.gpu_resource: spec.gpu_amount}):
        yield


def run_gpu_task(task: Callable[..., Any], *args: Any) -> Any:
    """Call a GPU task in this process (thread runner: as before), or run it on a Dask GPU worker."""
    if _ACTIVE.get() is None:
        return task(*args)
    with gpu_tasks():
        return task.submit(*args).result()
