"""The Dask task runner (flows/runner.py, docs/dask.md): RunnerSpec validation, the GPU resource
annotation, and `build-feature-datasets` on a 2-worker LocalCluster producing exactly the catalog
of the thread runner, its workers reporting to the session's Prefect server (a process of its own
on 127.0.0.1, reached over HTTP like `geofeat up`'s).

One Prefect API per process: Prefect keeps process-wide services (the concurrency-slot service,
EventsWorker) bound to the API they first talked to, so a second server entered with
`temporary_settings` after the session's harness took `gpu` slots on one server and released them
on the other; the leaked 300 s lease then blocked the next run's segmentation."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from flows.runner import RunnerSpec
from tasks.specs import CropSpec, DemoSpec, SegmenterSpec
from flows.runner import dask_runner

API = "http://127.0.0.1:4200/api"


@pytest.mark.parametrize("params,match", [
    ({"kind": "spark"}, "kind"),
    ({"workers": 2}, "runner.workers: only used with kind: dask"),
    ({"kind": "dask", "workers": 0}, "workers"),
    ({"kind": "dask", "address": "tcp://a:8786", "cluster_class": "dask_jobqueue.SLURMCluster"}, "runner.cluster_class"),
    ({"kind": "dask", "address": "tcp://a:8786", "workers": 2}, "runner.workers: configures the LocalCluster only"),
    ({"kind": "dask", "address": "tcp://a:8786", "cluster_kwargs": {"n_workers": 2}}, "runner.cluster_kwargs: unused"),
    ({"kind": "dask", "address": "tcp://a 8786"}, "address"),
    ({"kind": "dask", "cluster_class": "SLURMCluster"}, "cluster_class"),
    ({"kind": "dask", "cluster_kwargs": {"n_workers": 4}}, "runner.cluster_kwargs.n_workers: set runner.workers"),
    ({"kind": "dask", "cluster_kwargs": {"asynchronous": True}}, "runner.cluster_kwargs.asynchronous"),
    ({"kind": "dask", "worker_resources": {"TPU": 1}}, "runner.worker_resources: offers no GPU=1"),
    ({"kind": "dask", "gpu_resource": "GPU 0"}, "gpu_resource"),
    ({"kind": "dask", "gpu_amount": 0}, "gpu_amount"),
    ({"kind": "dask", "wokers": 2}, "wokers"),  # typos are errors
])
def test_runner_spec_refuses_bad_values_naming_the_field(params, match):
    with pytest.raises(ValidationError, match=match):
        RunnerSpec(**params)


def test_local_cluster_workers_get_the_api_url_and_the_gpu_resource():
    spec = RunnerSpec(kind="dask", workers=2, cluster_kwargs={"memory_limit": "2GiB", "env": {"X": "1"}})
    runner = dask_runner(spec, API, ephemeral=True)  # this process's temporary server is fine locally
    assert runner.cluster_class is None and runner.address is None
    assert runner.cluster_kwargs == {"memory_limit": "2GiB", "n_workers": 2, "threads_per_worker": 1,
                                     "resources": {"GPU": 1}, "env": {"X": "1", "PREFECT_API_URL": API}}
    none = dask_runner(RunnerSpec(kind="dask", gpu_resource=None), API, ephemeral=False)
    assert none.cluster_kwargs["resources"] == {} and "n_workers" not in none.cluster_kwargs


def test_remote_clusters_need_a_reachable_server_and_an_importable_class():
    address = RunnerSpec(kind="dask", address="tcp://10.0.0.5:8786")
    assert dask_runner(address, API, ephemeral=False).address == "tcp://10.0.0.5:8786"
    with pytest.raises(ValueError, match=r"runner.address: .*temporary Prefect server.*geofeat up"):
        dask_runner(address, API, ephemeral=True)
    slurm = RunnerSpec(kind="dask", cluster_class="distributed.LocalCluster", cluster_kwargs={"n_workers": 1},
                       adapt={"minimum": 0, "maximum": 4})
    runner = dask_runner(slurm, API, ephemeral=False)
    assert runner.cluster_kwargs == {"n_workers": 1} and runner.adapt_kwargs == {"minimum": 0, "maximum": 4}
    with pytest.raises(ValueError, match=r"runner.cluster_class: cannot import 'dask_nope.SLURMCluster'"):
        dask_runner(RunnerSpec(kind="dask", cluster_class="dask_nope.SLURMCluster"), API, ephemeral=False)


def test_the_runner_examples_in_the_docs_validate():
    import re

    import yaml

    def runners(node):
        if isinstance(node, dict):
            yield from ([node["runner"]] if "runner" in node else [])
            yield from (r for v in node.values() for r in runners(v))
        elif isinstance(node, list):
            yield from (r for v in node for r in runners(v))

    doc = (Path(__file__).parents[1] / "docs" / "dask.md").read_text()
    found = [r for block in re.findall(r"```yaml\n(.*?)```", doc, re.S) for r in runners(yaml.safe_load(block))]
    assert {RunnerSpec(**r).cluster_class for r in found} == {None, "dask_kubernetes.operator.KubeCluster",
                                                             "dask_jobqueue.SLURMCluster"}


# --- GPU tasks on a cluster where one of two in-process workers offers the GPU ------------------

@pytest.fixture(scope="module")
def gpu_and_cpu_workers():
    from distributed import Scheduler, SpecCluster, Worker

    workers = {name: {"cls": Worker, "options": {"nthreads": 1, "name": name, "resources": res}}
               for name, res in (("gpu-worker", {"GPU": 1}), ("cpu-worker", {}))}
    cluster = SpecCluster(scheduler={"cls": Scheduler, "options": {"dashboard_address": ":0"}}, workers=workers)
    try:
        yield cluster.scheduler_address
    finally:
        cluster.close(timeout=30)  # a stuck close fails the teardown instead of hanging the session


def _routing_flow():
    from distributed import get_worker
    from prefect import flow, task

    from flows.runner import gpu_tasks, use_runner

    @task
    def where(i: int) -> str:
        time.sleep(0.3)  # long enough that a free worker would take the next task
        return get_worker().name

    @flow
    def routing(runner: RunnerSpec) -> dict:
        with use_runner(runner):
            with gpu_tasks():
                gpu = where.map(range(6))
            cpu = where.map(range(6))
            return {"gpu": [f.result() for f in gpu], "cpu": [f.result() for f in cpu]}

    return routing


def test_gpu_tasks_run_only_on_workers_offering_the_resource(prefect_harness, gpu_and_cpu_workers):
    ran = _routing_flow()(RunnerSpec(kind="dask", address=gpu_and_cpu_workers))
    assert ran["gpu"] == ["gpu-worker"] * 6
    assert set(ran["cpu"]) <= {"gpu-worker", "cpu-worker"} and len(ran["cpu"]) == 6


def test_no_worker_with_the_resource_fails_fast(prefect_harness, gpu_and_cpu_workers):
    spec = RunnerSpec(kind="dask", address=gpu_and_cpu_workers, gpu_resource="TPU", worker_timeout=1)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"no Dask worker offers TPU=1 after 1 s .*gpu-worker.*--resources TPU=1"):
        _routing_flow()(spec)
    assert time.monotonic() - started < 30


# --- the same catalog from Dask as from the thread pool, against a real Prefect server -----------

def _catalog(root) -> dict:
    """Everything but timestamps and shard file names; crops by the sha256 of their bytes."""
    from storage.catalog import connect

    con = connect(root)
    try:
        return {
            "features": con.sql(
                "SELECT * EXCLUDE (crop, created_at, filename), sha256(crop.bytes) FROM features ORDER BY feature_id"
            ).fetchall(),
            "images": con.sql("SELECT * EXCLUDE (ingested_at) FROM images ORDER BY ALL").fetchall(),
            "quarantine": con.sql("SELECT * EXCLUDE (seen_at) FROM quarantine ORDER BY ALL").fetchall(),
        }
    finally:
        con.close()


@pytest.fixture
def new_children():
    """The child processes started since the test began (the LocalCluster's nannies and workers;
    not multiprocessing's resource tracker, which stays for the session). Any still alive at the
    end are killed, so a test that fails mid-build never leaves the session waiting on them."""
    import psutil

    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}

    def started() -> list[psutil.Process]:
        found = []
        for p in me.children(recursive=True):
            try:
                if p.pid not in before and "resource_tracker" not in " ".join(p.cmdline()):
                    found.append(p)
            except psutil.NoSuchProcess:
                pass
        return found

    yield started
    left = started()
    for p in left:
        p.kill()
    psutil.wait_procs(left, timeout=10)


@pytest.mark.server  # starts a scheduler and 2 worker processes; against the session's server
def test_dask_build_matches_the_thread_build(prefect_harness, new_children, tmp_path, monkeypatch):
    import dask
    import psutil
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL
    from prefect_dask import DaskTaskRunner

    from flows.build_feature_datasets import build_feature_datasets
    from storage.layout import DataRoot

    submitted = []  # (task name, dask annotations, the workers' PREFECT_API_URL) of every task handed to Dask
    submit = DaskTaskRunner.submit

    def spy(self, task, *args, **kwargs):
        submitted.append((task.name, dask.get_annotations(), self.cluster_kwargs["env"]["PREFECT_API_URL"]))
        return submit(self, task, *args, **kwargs)

    monkeypatch.setattr(DaskTaskRunner, "submit", spy)
    # One demo world for both runs: the segmenter id hashes the annotation paths, so both runs
    # cut crops of the same segmenter version and the feature_ids are comparable.
    demo = DemoSpec(countries=2, per_country=4, heldout_per_country=1, messy=True, out=str(tmp_path / "world"))
    runners = {"thread": RunnerSpec(), "dask": RunnerSpec(kind="dask", workers=2)}
    results = {}
    for name, runner in runners.items():
        started = time.monotonic()
        results[name] = build_feature_datasets(demo=demo, segmenter=SegmenterSpec(kind="annotations"),
                                               crops=CropSpec(min_area=40), home=str(tmp_path / name),
                                               runner=runner, return_state=True)
        print(f"{name}: {time.monotonic() - started:.1f} s")
    # Leaving use_runner closed the LocalCluster: no worker process outlives the flow run.
    assert not psutil.wait_procs(new_children(), timeout=15)[1]
    with get_client(sync_client=True) as client:
        dask_run = results["dask"].state_details.flow_run_id
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[dask_run])))

    thread, dask_out = (_catalog(DataRoot(str(tmp_path / name))) for name in runners)
    assert thread["features"] and thread["images"] and thread["quarantine"]
    assert [r[0] for r in dask_out["features"]] == [r[0] for r in thread["features"]]  # the same feature_ids
    assert dask_out == thread  # ... and the same crop bytes, metadata, images and quarantine rows
    built = results["dask"].result()
    assert built["segmented"]["crops"] == len(thread["features"]) > 0

    # The shard tasks ran on Dask, segmentation asked for a GPU worker, ingest did not, and the
    # workers, started with the flow's API URL, reported their task runs to this session's server
    # (not to temporary servers of their own).
    shards = {"ingest-shard": sum(i["shards"] for i in built["ingested"]), "segment-shard": built["segmented"]["shards"]}
    assert sorted(n for n, _, _ in submitted) == sorted(n for n, k in shards.items() for _ in range(k))
    assert {n: a.get("resources") for n, a, _ in submitted} == {"ingest-shard": None, "segment-shard": {"GPU": 1}}
    assert {url.rstrip("/") for _, _, url in submitted} == {PREFECT_API_URL.value().rstrip("/")}
    on_server = [t for t in task_runs if t.name.startswith(("ingest demo", "segment demo"))]  # shard run names
    assert len(on_server) == len(submitted) and all(t.state_name == "Completed" for t in on_server)
    assert Path(tmp_path / "dask" / "catalog.sql").exists()
