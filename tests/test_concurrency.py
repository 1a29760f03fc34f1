"""Issue 13, finding 5: two builds on one data root never duplicate work or rows.

Two concurrent builds on a fresh root both generated the demo world (the second replaced the first,
with new mtimes, so every file was ingested twice: 482 rows in `images_all`, 12 quarantine rows
instead of 7), `geofeat check` passed, and one temporary server printed a SQLite migration
traceback. Now the world is generated once, each stage plans under its lock, and `check` finds
duplicate rows in every table (tests/test_check.py)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from storage.catalog import connect
from storage.layout import DataRoot
from tasks.check import integrity_checks
from tasks.demo_world.world import generate_demo_world
from tasks.specs import DemoSpec

PROJECT = Path(__file__).resolve().parents[1]
SMALL = DemoSpec(seed=5, countries=2, per_country=3, heldout_per_country=1, width=96, height=48)


def test_racing_generations_of_the_demo_world_make_it_once(tmp_path, caplog):
    out, worlds, barrier = str(tmp_path / "world"), [], threading.Barrier(2)

    def generate() -> None:
        barrier.wait()
        worlds.append(generate_demo_world(out, SMALL))

    caplog.set_level(logging.INFO, logger="tasks.demo_world.world")
    threads = [threading.Thread(target=generate) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(worlds) == 2 and worlds[0] == worlds[1]
    assert sum(r.getMessage().startswith("generating demo world") for r in caplog.records) == 1
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


@pytest.mark.parametrize("url", ["{tmp}/folder", "memory://geofeat-concurrency/folder"])
def test_the_second_publisher_of_a_folder_reuses_the_first(tmp_path, url):
    from storage.publish import AlreadyPublished, staged_folder

    url = url.format(tmp=tmp_path)
    with pytest.raises(AlreadyPublished):
        with staged_folder(url, replace=False) as (fs_a, tmp_a):
            fs_a.pipe_file(f"{tmp_a}/who", b"a")
            with staged_folder(url, replace=False) as (fs_b, tmp_b):  # b finishes first and publishes
                fs_b.pipe_file(f"{tmp_b}/who", b"b")
    fs, path = fs_a, url.split("://", 1)[-1] if url.startswith("memory") else url
    assert fs.cat_file(f"{path}/who") == b"b"
    parent = path.rsplit("/", 1)[0]
    assert [p for p in fs.ls(parent, detail=False) if ".tmp-" in p] == []


BUILD = """
import logging
logging.basicConfig(level=logging.WARNING)
logging.getLogger("tasks.demo_world.world").setLevel(logging.INFO)
from flows import env; env.apply()
from flows.build_feature_datasets import build_feature_datasets
from tasks.specs import CropSpec, DemoSpec, RunOptions, SegmenterSpec
build_feature_datasets(demo=DemoSpec(seed=5, countries=2, per_country=10, heldout_per_country=2),
                       segmenter=SegmenterSpec(kind="annotations"), crops=CropSpec(min_area=40),
                       run=RunOptions(num_workers=0, shard_size=3))
print("BUILT", flush=True)
"""


def test_two_builds_on_a_fresh_root_do_the_work_once(tmp_path):
    root = DataRoot(str(tmp_path / "home"))
    env = {**{k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}, "GEOFEAT_HOME": root.url,
           "PYTHONPATH": str(PROJECT)}
    runs = [subprocess.Popen([sys.executable, "-c", BUILD], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True) for _ in range(2)]
    started = time.monotonic()
    try:
        outputs = [run.communicate(timeout=600)[0] for run in runs]
    finally:
        for run in runs:
            run.kill()
    print(f"two concurrent builds: {time.monotonic() - started:.0f} s")
    assert [run.returncode for run in runs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert all("BUILT" in o for o in outputs)
    assert sum(o.count("generating demo world") for o in outputs) == 1
    assert not any("Traceback" in o for o in outputs), "\n".join(o[-3000:] for o in outputs)  # the migration race
    con = connect(root, fresh=True)
    one = lambda sql: con.execute(sql).fetchall()[0]  # noqa: E731
    files, distinct = one("SELECT count(*), count(DISTINCT (dataset, source_uri)) FROM images_all")
    assert files == distinct == 2 * 10 + 2 * 2 + 1  # every image once (+ the messy duplicate copy)
    refused, distinct = one("SELECT count(*), count(DISTINCT (dataset, source_uri)) FROM quarantine_all")
    assert refused == distinct == 6  # the messy files refused once each
    assert one("SELECT count(*) FROM quarantine")[0] == 7  # + the duplicate copy
    failed = {c.name for c in integrity_checks(root) if not c.passed}
    assert failed == set(), failed
