"""How and where the flows' tasks run: the retry policy of every task, the `gpu` slot, and the
runner chosen per run by the flows' `runner` parameter (RunnerSpec): Prefect's thread pool (the
default, unchanged) or a Dask cluster through prefect-dask. See docs/dask.md.

A Prefect 3 flow binds its task runner when it is decorated, and `Task.submit`/`Task.map` hand
their work to the task runner of the current flow-run context. `use_runner` starts a
DaskTaskRunner for a block and enters a copy of that context with the runner swapped in: the run
stays one flow run (a subflow would add ~1 s and a second run), the stages' `.submit`/`.map` calls
stay as they are, and the thread path does nothing at all.
"""

from __future__ import annotations

import logging
import os
import re
import time
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal
from urllib.parse import urlparse

from prefect.cache_policies import NO_CACHE
from prefect.client.base import ServerType
from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging import get_run_logger
from pydantic import Field, model_validator

from storage.layout import DataRoot
from storage.locks import held, lock_path
from storage.shards import is_transient
from tasks.specs import Spec

if TYPE_CHECKING:
    from distributed import Client
    from prefect_dask import DaskTaskRunner


# ---------------------------------------------------------------- retries

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
    """Prefect `retry_condition_fn`: retry only when the failure was a transient I/O error (each
    storage operation already retries on its own, storage.shards.retry_io: this is the second line)."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            state.result(raise_on_failure=True)
        except BaseException as raised:  # noqa: BLE001 - we only classify it
            exc = raised
    return exc is not None and is_transient(exc)


def retried(retries: int) -> dict[str, Any]:
    """@task options of every stage task. The commit record is the cache: shard ids hash their inputs,
    parameters and stage version, and a committed shard is never redone. Prefect's own result cache
    is off, so it can never claim a shard done whose files were deleted."""
    return {"cache_policy": NO_CACHE, "retries": retries, "retry_delay_seconds": RETRY_DELAYS,
            "retry_condition_fn": retry_transient}


# ---------------------------------------------------------------- the gpu slot

# The `gpu` slot: held by a GPU stage (segmentation, training, evaluation) while it runs, so two runs
# on one data root never share a GPU. It is a file lock (storage/locks.py: flock on
# <data root>/_locks/gpu.lock), not a Prefect global concurrency limit: a slot's lease lived in the
# temporary server's memory, so a run killed with -9 left `gpu` held in prefect.db forever and every
# later run hung without a word. The kernel drops a flock with its process, whatever killed it, and
# taking it costs microseconds (a Prefect slot taken inside a task cost ~2 s). Waiting runs log who
# holds it every GPU_WAIT_LOG_S seconds. $GEOFEAT_GPU_SLOTS (default 1) gives one slot per GPU, for a
# machine (or a Dask cluster on a shared local root) with several; Dask's `GPU` resources still
# decide which worker runs a task.
GPU_LOCK = "gpu"
GPU_WAIT_LOG_S = 30.0  # s between "waiting for the GPU" lines
ENV_GPU_SLOTS = "GEOFEAT_GPU_SLOTS"


def gpu_slots(value: str | None = None) -> int:
    """How many GPU stages may run at once on a data root: `value`, else $GEOFEAT_GPU_SLOTS, else 1."""
    value = value if value is not None else os.environ.get(ENV_GPU_SLOTS, "")
    if not value.strip():
        return 1
    if not value.strip().isdigit() or not 1 <= int(value) <= 64:
        raise ValueError(f"{ENV_GPU_SLOTS}={value!r}: give the number of GPUs, 1 to 64")
    return int(value)


@contextmanager
def stage_lock(root: DataRoot | str | None, name: str, what: str, every: float = GPU_WAIT_LOG_S,
               slots: int = 1) -> Iterator[None]:
    """Hold the lock `name` of `root` (a DataRoot or its URL; default: $GEOFEAT_HOME), or one of its
    `slots`, for the block. A run that has to wait logs, every `every` seconds, who holds it and the
    way out."""
    root = root if isinstance(root, DataRoot) else DataRoot.from_env(root)
    ctx, task_ctx = FlowRunContext.get(), TaskRunContext.get()
    run = f"flow run {ctx.flow_run.name!r} ({ctx.flow.name})" if ctx is not None and ctx.flow_run else "a run"
    if task_ctx is not None:
        run += f", task {task_ctx.task_run.name!r}"
    try:
        logger = get_run_logger()
    except Exception:  # noqa: BLE001 - outside a run: plain logging
        logger = logging.getLogger(__name__)
    name = re.sub(r"[^\w.-]", "_", name)
    paths = [lock_path(root, name if i == 0 else f"{name}-{i}") for i in range(slots)]
    with held(paths, f"{what} of data root {root.url}", by=run, log=logger, every=every):
        yield


def gpu_slot(root: DataRoot | str | None = None, every: float = GPU_WAIT_LOG_S):
    """Hold a `gpu` slot of `root` for the block ($GEOFEAT_GPU_SLOTS of them, default 1); other GPU
    stages on the same root wait for one."""
    return stage_lock(root, GPU_LOCK, "the `gpu` slot", every, slots=gpu_slots())


# ---------------------------------------------------------------- the runner


class RunnerSpec(Spec):
    """Where a flow's tasks run (flows/runner.py, docs/dask.md); none of this changes the output.

    `thread`: Prefect's thread pool in the flow's process (the default). `dask`: a Dask cluster
    through prefect-dask: a running scheduler (`address`), a cluster of `cluster_class` started for
    the run (dask-kubernetes, dask-jobqueue), or else a LocalCluster of `workers` processes.
    """

    kind: Literal["thread", "dask"] = Field("thread", description="thread: Prefect's thread pool; dask: prefect-dask")
    address: str | None = Field(None, pattern=r"^\S+$", description="scheduler of a running Dask cluster, "
                                "e.g. tcp://10.0.0.5:8786 (its workers need this project and PREFECT_API_URL)")
    cluster_class: str | None = Field(
        None, pattern=r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$", description="import path of a cluster class started "
        "for the run, e.g. dask_jobqueue.SLURMCluster or dask_kubernetes.operator.KubeCluster")
    cluster_kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of "
                                           "cluster_class (or of the LocalCluster, e.g. memory_limit)")
    adapt: dict[str, int] | None = Field(None, description="adaptive scaling of a cluster started for the run: "
                                         "cluster.adapt(**adapt), e.g. {minimum: 0, maximum: 20}")
    workers: int | None = Field(None, ge=1, description="LocalCluster worker processes; default: Dask's (per core)")
    threads_per_worker: int = Field(1, ge=1, description="LocalCluster threads per worker process")
    worker_resources: dict[str, float] | None = Field(
        None, description="resources every LocalCluster worker offers; default {<gpu_resource>: <gpu_amount>}: "
        "local workers share this machine's GPU (the `gpu` slot, a file lock, still guards it)")
    gpu_resource: str | None = Field("GPU", pattern=r"^[A-Za-z_][\w.-]*$", description="Dask resource that "
                                     "segmentation and training tasks need; null: they run on any worker")
    gpu_amount: float = Field(1, gt=0, description="how much of gpu_resource one such task takes")
    worker_timeout: float = Field(60, gt=0, description="s to wait for a worker offering gpu_resource before "
                                  "failing (raise it while batch jobs queue)")

    @model_validator(mode="after")
    def _consistent(self) -> "RunnerSpec":
        if self.kind == "thread":
            unused = sorted(self.model_fields_set - {"kind"})
            if unused:
                raise ValueError(f"runner.{unused[0]}: only used with kind: dask; set kind: dask or drop it")
            return self
        if "asynchronous" in self.cluster_kwargs:
            raise ValueError("runner.cluster_kwargs.asynchronous: prefect-dask manages it; remove it")
        if self.address and self.cluster_class:
            raise ValueError("runner.cluster_class: give `address` (a running cluster) or `cluster_class` "
                             "(one started for the run), not both")
        if self.address or self.cluster_class:
            given = "address" if self.address else "cluster_class"
            local = sorted(self.model_fields_set & {"workers", "threads_per_worker", "worker_resources"})
            if local:
                raise ValueError(f"runner.{local[0]}: configures the LocalCluster only; with `{given}` the "
                                 "workers are configured where they start (cluster_kwargs, `dask worker` options)")
            if self.address and (self.cluster_kwargs or self.adapt):
                raise ValueError(f"runner.{'adapt' if self.adapt else 'cluster_kwargs'}: unused with `address` "
                                 "(a running cluster is configured where it runs)")
            return self
        for key, field in (("n_workers", "workers"), ("threads_per_worker", "threads_per_worker"),
                           ("resources", "worker_resources")):
            if key in self.cluster_kwargs:
                raise ValueError(f"runner.cluster_kwargs.{key}: set runner.{field} instead")
        if self.gpu_resource and self.worker_resources is not None \
                and self.worker_resources.get(self.gpu_resource, 0) < self.gpu_amount:
            raise ValueError(f"runner.worker_resources: offers no {self.gpu_resource}={self.gpu_amount:g}, so "
                             f"segmentation and training could never run; add it or set gpu_resource: null")
        return self


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
