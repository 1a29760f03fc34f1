"""Issue 13, findings 1 and 6: a crash never leaves the `gpu` slot held, and never leaves a temporary
Prefect server behind.

The old slot was a Prefect global concurrency limit whose lease lived in the temporary server's
memory: after a kill -9 during segmentation or training, prefect.db kept `gpu` at 1 active slot and
every later run on the data root hung at 0% CPU without a word. The slot is now a file lock that
the kernel drops with its process. These tests kill the process itself (as the OOM killer would),
not its process group, so its temporary server survives unless it is reaped."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from storage.layout import DataRoot
from tasks.check import integrity_checks

PROJECT = Path(__file__).resolve().parents[1]
SERVER_APP = "prefect.server.api.server:create_app"
BOUND_S = 300  # s a rerun may take here (2 shared cores; a temporary server alone takes ~15-30 s to start)

needs_proc = pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="Linux /proc needed to find children")


def env_for(root: DataRoot) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return {**env, "GEOFEAT_HOME": root.url, "PYTHONPATH": str(PROJECT), "GEOFEAT_RETRY_DELAYS": "0,0,0"}


def servers_of(pid: int) -> set[int]:
    """The temporary Prefect servers among a process's children."""
    found = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            try:
                if SERVER_APP.encode() in Path(f"/proc/{child}/cmdline").read_bytes():
                    found.add(child)
            except OSError:
                pass
    return found


def gone(pids: set[int], within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        alive = set()
        for pid in pids:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z":
                alive.add(pid)
        if not alive:
            return True
        time.sleep(0.2)
    return False


class Run:
    """A child process whose output is drained by a thread (a full pipe would block it) and kept."""

    def __init__(self, args: list[str], root: DataRoot):
        self.proc = subprocess.Popen([sys.executable, "-c", *args], env=env_for(root), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.pid, self.lines = self.proc.pid, []
        self.reader = threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stdout.readline, "")),
                                       daemon=True)
        self.reader.start()

    def line(self, marker: str) -> str | None:
        return next((line for line in list(self.lines) if line.startswith(marker)), None)

    def wait_for(self, what: str, condition, within: float) -> None:
        """Until `condition()`; fails when the run ends first or `within` seconds pass (it hung)."""
        deadline = time.monotonic() + within
        while not condition():
            if self.proc.poll() is not None:
                self.reader.join(5)
                pytest.fail(f"the run ended (rc {self.proc.returncode}) before {what}:\n{self.tail()}")
            if time.monotonic() > deadline:
                self.kill_group()
                pytest.fail(f"no {what} within {within:.0f} s (it hung):\n{self.tail()}")
            time.sleep(0.1)

    def kill9(self) -> None:
        """SIGKILL the process itself, as the OOM killer does: no exit handler runs."""
        os.kill(self.pid, signal.SIGKILL)
        self.proc.wait()

    def kill_group(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def tail(self) -> str:
        return "".join(self.lines[-60:])


# ---------------------------------------------------------------- the gpu slot alone

HOLDER = """
import sys, time
from storage.layout import DataRoot
from storage.locks import held, lock_path
with held(lock_path(DataRoot(sys.argv[1]), "gpu"), "the gpu slot", by="a segmentation that will be killed"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_waiting_run_says_who_holds_the_gpu_and_gets_it_once_the_holder_is_killed(root, caplog):
    from flows.runner import GPU_LOCK, gpu_slot
    from storage.locks import holder_of, lock_path

    holder = subprocess.Popen([sys.executable, "-c", HOLDER, root.url], env=env_for(root), stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert holder_of(lock_path(root, GPU_LOCK)).pid == holder.pid
        got = threading.Event()

        def take() -> None:
            with gpu_slot(root, every=0.3):
                got.set()

        caplog.set_level(logging.INFO)
        waiter = threading.Thread(target=take, daemon=True)
        waiter.start()
        time.sleep(1.5)
        assert not got.is_set()
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting")]
        assert len(lines) >= 3  # one at once, then one every 0.3 s
        assert f"pid {holder.pid}" in lines[-1] and "a segmentation that will be killed" in lines[-1]
        assert f"kill {holder.pid}" in lines[-1] and "Ctrl-C" in lines[-1]
        os.kill(holder.pid, signal.SIGKILL)  # no exit handler runs: the kernel drops the lock
        holder.wait()
        assert got.wait(5), "the gpu slot of a killed holder was not free"
        waiter.join(5)
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------- kill -9 during segmentation and training

RUN = """
import json, sys
from flows import env; env.apply()
from flows.build_feature_datasets import build_feature_datasets
from flows.train_experts import train_experts
from tasks.specs import CropSpec, DemoSpec, RunOptions, SegmenterSpec, TrainSpec
if "build" in sys.argv[1]:
    build_feature_datasets(demo=DemoSpec(countries=2, per_country=12, heldout_per_country=2, messy=False),
                           segmenter=SegmenterSpec(kind="annotations"), crops=CropSpec(min_area=40),
                           run=RunOptions(batch_size=2, num_workers=0, shard_size=2))
    print("BUILT", flush=True)
if "train" in sys.argv[1]:
    result = train_experts(TrainSpec(checkpoint="tiny-random", groups=["ground"], baseline=False, epochs=60,
                                     eval_every=2, batch_size=4, lr=1e-3, min_crops_per_country=2, num_workers=1))
    print("TRAINED", json.dumps([e.get("resumed_at_step") for e in result["experts"]]), flush=True)
"""


@needs_proc
@pytest.mark.timeout(1200)
def test_kill_9_during_segmentation_and_during_training_then_reruns_end_in_bounded_time(tmp_path):
    root = DataRoot(str(tmp_path / "home"))
    commits = Path(root.url) / "_commits" / "segment"
    runs = []
    try:
        # 1. kill -9 the build mid-segmentation, while it holds the gpu slot
        build = Run([RUN, "build"], root)
        runs.append(build)
        build.wait_for("a segmentation shard committed (the stage holds the gpu slot)",
                       lambda: len(list(commits.rglob("*.json"))) >= 1, BOUND_S)
        servers = servers_of(build.pid)
        build.kill9()
        assert servers and gone(servers, 30), "the killed build's temporary Prefect server lives on"

        # 2. the rerun finishes the build; then kill -9 it mid-training, while training holds the gpu slot
        started = time.monotonic()
        both = Run([RUN, "build+train"], root)
        runs.append(both)
        both.wait_for("the rerun's build to finish", lambda: both.line("BUILT"), BOUND_S)
        built_s = time.monotonic() - started
        both.wait_for("a training checkpoint saved (the training task holds the gpu slot)",
                      lambda: any(Path(root.url, "checkpoints").glob("*/last/trainer_state.json")), BOUND_S)
        servers = servers_of(both.pid)
        both.kill9()
        assert servers and gone(servers, 30), "the killed training's temporary Prefect server lives on"

        # 3. the rerun of training resumes from its last checkpoint and finishes
        started = time.monotonic()
        train = Run([RUN, "train"], root)
        runs.append(train)
        train.wait_for("the rerun's training to finish", lambda: train.line("TRAINED"), BOUND_S)
        trained_s = time.monotonic() - started
        assert json.loads(train.line("TRAINED").split(" ", 1)[1])[0] > 0  # resumed, not from step 0
        assert train.proc.wait(60) == 0, train.tail()
    finally:
        for run in runs:
            run.kill_group()
    failed = {c.name for c in integrity_checks(root) if not c.passed}
    assert failed == set(), failed
    print(f"reruns: {built_s:.0f} s to finish the build killed in segmentation, "
          f"{trained_s:.0f} s to finish the training killed mid-way")


# ---------------------------------------------------------------- the temporary server

SERVE = """
import time
from flows import env; env.apply()
from prefect import flow

@flow(name="noop")
def noop():
    return 1

noop()
print("ready", flush=True)
time.sleep(600)
"""


@needs_proc
def test_the_temporary_server_dies_with_its_parent(root):
    """Finding 6: if only the main process died (the OOM killer), its temporary Prefect server lived on."""
    run = Run([SERVE], root)
    try:
        run.wait_for("a flow run on a temporary server", lambda: run.line("ready"), BOUND_S)
        servers = servers_of(run.pid)
        assert len(servers) == 1
        run.kill9()
        assert gone(servers, 30), "the temporary server outlived its parent"
    finally:
        run.kill_group()


def test_one_gpu_slot_per_gpu(root, monkeypatch):
    """$GEOFEAT_GPU_SLOTS=2 (two GPUs): two GPU stages run side by side, a third waits for one of them."""
    from flows.runner import gpu_slot, gpu_slots

    monkeypatch.setenv("GEOFEAT_GPU_SLOTS", "2")
    inside, release, third = [], threading.Event(), threading.Event()

    def stage() -> None:
        with gpu_slot(root, every=0.2):
            inside.append(1)
            release.wait(10)

    holders = [threading.Thread(target=stage, daemon=True) for _ in range(2)]
    for t in holders:
        t.start()
    deadline = time.monotonic() + 10
    while len(inside) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(inside) == 2  # both slots taken at once

    def wait_third() -> None:
        with gpu_slot(root, every=0.2):
            third.set()

    waiter = threading.Thread(target=wait_third, daemon=True)
    waiter.start()
    assert not third.wait(1.0)
    release.set()
    assert third.wait(5)
    for t in [*holders, waiter]:
        t.join(5)
    with pytest.raises(ValueError, match="GEOFEAT_GPU_SLOTS"):
        gpu_slots("lots")
