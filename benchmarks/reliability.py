"""Reliability run: the attacks of the run that filed issue 13, against the code as it stands.

    .venv/bin/python benchmarks/reliability.py [--kills 9] [--train-kills 2] [--skip build,train,...]

Every scenario runs the `geofeat` CLI in child processes on fresh data roots under one temp folder,
and prints what it found, scenario by scenario, then one summary table:
- kill -9 of `geofeat build demo` (the process alone, as the OOM killer does) at targeted moments
  (demo-world generation, ingest, segmentation, the final refresh) and at seeded random ones; each
  followed by a rerun that must end within a bound and give the clean run's catalog, a passing
  `geofeat check`, and no surviving temporary Prefect server;
- kill -9 of `geofeat train demo` mid-training, then a rerun that must end and give the same experts;
- two concurrent `geofeat build demo` on a fresh root;
- ~40 hostile inputs (pipes, sockets, devices, links, loops, lying extensions, broken manifests);
- hostile and endless SQL (the 58 statements of tests/test_sql_guard.py, endless queries, nested columns);
- the cross-dataset leakage trap (the same bytes in a train and a test dataset).
Not a test: it takes ~40-60 min on 2 cores. Wall times are disturbed by other load; they bound hangs.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(PROJECT), str(PROJECT / "tests")]

from flows import env as prefect_env  # noqa: E402

prefect_env.apply()

from PIL import Image  # noqa: E402

from helpers import image_bytes, write  # noqa: E402
from storage.catalog import connect  # noqa: E402
from storage.layout import DataRoot  # noqa: E402

SERVER_APP = "prefect.server.api.server:create_app"
ROWS: list[dict] = []  # the summary table


def say(*parts) -> None:
    print(*parts, flush=True)


# ---------------------------------------------------------------- child processes


class Child:
    """`geofeat ARGS` on a data root, output drained into memory (a full pipe would block it)."""

    def __init__(self, root: DataRoot, *args: str):
        env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
        env.update(GEOFEAT_HOME=root.url, PYTHONPATH=str(PROJECT))
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-c", "from flows.cli import main; main()", *args], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stdout.readline, "")), daemon=True).start()

    def wait(self, bound: float) -> tuple[int | None, float]:
        """(return code, s); None when it ran past `bound` (it hung) and was killed."""
        try:
            rc = self.proc.wait(bound)
        except subprocess.TimeoutExpired:
            self.kill_group()
            rc = None
        time.sleep(0.3)  # the reader thread catches up
        return rc, time.monotonic() - self.started

    def servers(self) -> set[int]:
        found = set()
        for task in Path(f"/proc/{self.proc.pid}/task").glob("*"):
            try:
                for child in map(int, (task / "children").read_text().split()):
                    if SERVER_APP.encode() in Path(f"/proc/{child}/cmdline").read_bytes():
                        found.add(child)
            except OSError:
                continue
        return found

    def kill9(self) -> set[int]:
        """SIGKILL the process alone; returns the temporary servers it had."""
        servers = self.servers()
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        return servers

    def kill_group(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def text(self) -> str:
        return "".join(self.lines)


def alive(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                out.add(pid)
        except OSError:
            pass
    return out


def reaped(pids: set[int], within: float = 30) -> bool:
    deadline = time.monotonic() + within
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = alive(pids)
    for pid in left:  # do not leave them to the next scenario
        os.kill(pid, signal.SIGKILL)
    return not left


def geofeat(root: DataRoot, *args: str, bound: float = 600) -> tuple[int | None, float, str]:
    child = Child(root, *args)
    rc, s = child.wait(bound)
    return rc, s, child.text()


# ---------------------------------------------------------------- catalogs


def snapshot(root: DataRoot) -> dict[str, list]:
    """A build's catalog without run timestamps, with the root taken out of every path."""
    con = connect(root, fresh=True)
    cut = lambda v: v.replace(root.url, "<root>") if isinstance(v, str) else v  # noqa: E731
    rows = lambda sql: sorted(tuple(cut(v) for v in r) for r in con.execute(sql).fetchall())  # noqa: E731
    return {
        "images_all": rows("SELECT * EXCLUDE (ingested_at, source_mtime) FROM images_all"),
        "quarantine": rows("SELECT * EXCLUDE (seen_at) FROM quarantine"),
        "features": rows("SELECT feature_id, md5(crop.bytes), image_id, dataset, split, label, \"group\", segmenter "
                         "FROM features_all"),
        "segmentations": rows("SELECT * EXCLUDE (created_at) FROM segmentations_all"),
    }


def check_ok(root: DataRoot) -> tuple[bool, list[str]]:
    rc, _, out = geofeat(root, "check", "--json", bound=300)
    try:
        failed = [c["name"] for c in json.loads(out[out.index("["):]) if not c["passed"]]
    except (ValueError, KeyError):
        return False, [f"check rc {rc}: {out[-300:]}"]
    return rc == 0 and not failed, failed


def copy_root(src: DataRoot, dst: Path) -> DataRoot:
    shutil.copytree(src.url, dst, ignore=shutil.ignore_patterns("prefect", "_locks", "_tmp"), symlinks=True)
    return DataRoot(str(dst))


# ---------------------------------------------------------------- 1. kill -9 during `geofeat build demo`


def moments(clean_s: float, segment_shards: int, n: int, seed: int) -> list[tuple[str, object]]:
    """(name, condition on a root or seconds): targeted moments first, then seeded random ones."""
    count = lambda r, stage: len(list((r / "_commits" / stage).rglob("*.json")))  # noqa: E731
    targeted = [
        ("demo-world generation", lambda r: any(r.glob("demo-world.tmp-*"))),
        ("world written, before ingest", lambda r: (r / "demo-world" / "world.json").exists()),
        ("mid-ingest", lambda r: count(r, "ingest") >= 1),
        ("mid-segmentation (1st shard)", lambda r: count(r, "segment") >= 1),
        ("mid-segmentation (later)", lambda r: count(r, "segment") >= 2),
        ("after the last segment shard (refresh, checks, gate)", lambda r: count(r, "segment") >= segment_shards),
    ]
    rng = random.Random(seed)
    randoms = [(f"random at {t:.1f} s", t) for t in sorted(rng.uniform(0.05, 0.95) * clean_s for _ in range(n))]
    return targeted[:n] + randoms[: max(0, n - len(targeted))]


def build_kills(base: Path, n: int, seed: int) -> DataRoot:
    say("\n## kill -9 during `geofeat build demo`, then a rerun")
    clean = DataRoot(str(base / "clean"))
    rc, clean_s, out = geofeat(clean, "build", "demo", bound=1800)
    assert rc == 0, out[-3000:]
    reference = snapshot(clean)
    say(f"clean build: {clean_s:.0f} s; images_all {len(reference['images_all'])}, quarantine "
        f"{len(reference['quarantine'])}, crops {len(reference['features'])}")
    bound = max(300.0, 3 * clean_s)
    segment_shards = len(list(Path(clean.url, "_commits", "segment").rglob("*.json")))
    for i, (name, when) in enumerate(moments(clean_s, segment_shards, n, seed), start=1):
        root = DataRoot(str(base / f"kill{i}"))
        child = Child(root, "build", "demo")
        if callable(when):
            while not when(Path(root.url)) and child.proc.poll() is None:
                time.sleep(0.01)
        else:
            time.sleep(max(0.0, when - (time.monotonic() - child.started)))
        at = time.monotonic() - child.started
        finished = child.proc.poll() is not None
        servers = set() if finished else child.kill9()
        server_gone = reaped(servers)
        rc, rerun_s, out = geofeat(root, "build", "demo", bound=bound)
        same = rc == 0 and snapshot(root) == reference
        ok, failed = check_ok(root) if rc == 0 else (False, ["rerun failed"])
        say(f"kill {i} ({name}) at {at:.1f} s{' (had finished)' if finished else ''}: server reaped "
            f"{server_gone}; rerun rc {rc} in {rerun_s:.0f} s (bound {bound:.0f}); catalog == clean {same}; "
            f"check {'PASS' if ok else failed}")
        ROWS.append({"scenario": f"build kill {i}: {name}", "ok": server_gone and same and ok,
                     "detail": f"rerun {rerun_s:.0f} s, rc {rc}"})
    return clean


# ---------------------------------------------------------------- 2. kill -9 during `geofeat train demo`


def experts(root: DataRoot) -> list[tuple]:
    return sorted(connect(root, fresh=True).execute(
        "SELECT \"group\", expert_id, steps, round(val_accuracy, 6) FROM experts").fetchall())


def train_kills(base: Path, built: DataRoot, n: int, seed: int) -> None:
    say("\n## kill -9 during `geofeat train demo`, then a rerun")
    clean = copy_root(built, base / "train-clean")
    rc, clean_s, out = geofeat(clean, "train", "demo", bound=3600)
    assert rc == 0, out[-3000:]
    reference = experts(clean)
    say(f"clean training: {clean_s:.0f} s, {len(reference)} experts")
    rng = random.Random(seed)
    for i in range(1, n + 1):
        root = copy_root(built, base / f"train-kill{i}")
        child = Child(root, "train", "demo")
        if i == 1:  # targeted: once a resumable checkpoint exists
            name = "first checkpoint saved"
            while not any(Path(root.url, "checkpoints").glob("*/last/trainer_state.json")) and child.proc.poll() is None:
                time.sleep(0.05)
        else:
            t = rng.uniform(0.3, 0.8) * clean_s
            name = f"random at {t:.0f} s"
            while time.monotonic() - child.started < t and child.proc.poll() is None:
                time.sleep(0.05)
        at = time.monotonic() - child.started
        servers = set() if child.proc.poll() is not None else child.kill9()
        server_gone = reaped(servers)
        rc, rerun_s, out = geofeat(root, "train", "demo", bound=max(600.0, 3 * clean_s))
        resumed = out.count("resum")
        same = rc == 0 and experts(root) == reference
        say(f"train kill {i} ({name}) at {at:.0f} s: server reaped {server_gone}; rerun rc {rc} in {rerun_s:.0f} s; "
            f"experts == clean {same}; 'resum' in the rerun's log {resumed}x")
        ROWS.append({"scenario": f"train kill {i}: {name}", "ok": server_gone and same,
                     "detail": f"rerun {rerun_s:.0f} s, rc {rc}"})


# ---------------------------------------------------------------- 3. two concurrent builds


def concurrent_builds(base: Path, clean: DataRoot) -> None:
    say("\n## two concurrent `geofeat build demo` on a fresh root")
    root = DataRoot(str(base / "concurrent"))
    children = [Child(root, "build", "demo") for _ in range(2)]
    results = [c.wait(1800) for c in children]
    texts = [c.text() for c in children]
    got, reference = snapshot(root), snapshot(clean)
    ok, failed = check_ok(root)
    generated = sum(t.count("generating demo world") for t in texts)
    tracebacks = sum(t.count("Traceback") for t in texts)
    con = connect(root, fresh=True)
    n_all = con.execute("SELECT count(*) FROM images_all").fetchall()[0][0]
    n_q = con.execute("SELECT count(*) FROM quarantine").fetchall()[0][0]
    say(f"rc {[r for r, _ in results]} in {[round(s) for _, s in results]} s; demo world generated {generated}x; "
        f"images_all {n_all} rows (clean {len(reference['images_all'])}); quarantine {n_q} rows (clean "
        f"{len(reference['quarantine'])}); catalog == clean {got == reference}; tracebacks {tracebacks}; "
        f"check {'PASS' if ok else failed}")
    ROWS.append({"scenario": "two concurrent builds", "ok": got == reference and ok and generated == 1 and not tracebacks,
                 "detail": f"images_all {n_all}, quarantine {n_q}"})


# ---------------------------------------------------------------- 4. hostile inputs


def encoded(fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 24), (120, 60, 30)).save(buf, fmt, **kw)
    return buf.getvalue()


def hostile_inputs(base: Path) -> None:
    say("\n## hostile inputs")
    src = base / "hostile" / "g50"
    fr, es = src / "France", src / "Spain"
    good = image_bytes("JPEG", seed=1)
    jpeg = image_bytes("JPEG", size=(320, 240), seed=2)
    files = {
        "France/good.jpg": good, "France/empty.jpg": b"", "France/half.jpg": jpeg[: len(jpeg) // 2],
        "France/notes.jpg": b"battery died\n", "France/pdf.jpg": b"%PDF-1.7\n" + b"x" * 100,
        "France/gif.jpg": encoded("GIF"), "France/gif.gif": encoded("GIF"), "France/avif.jpg": encoded("AVIF"),
        "France/avif.avif": encoded("AVIF"), "France/tiff.jpg": encoded("TIFF"), "France/tiff.tif": encoded("TIFF"),
        "France/bmp.jpg": encoded("BMP"), "France/heic.jpg": b"\0\0\0\x18ftypheic" + b"\0" * 40,
        "France/jpeg.png": encoded("JPEG"), "France/readme.txt": b"hello", "France/jpeg_magic_zeros.jpg": b"\xff\xd8\xff" + b"\0" * 3_000_000,
        "France/dup.jpg": good, "Spain/dup_other_country.jpg": good, "Spain/ok.jpg": image_bytes("PNG", seed=3),
        "Utah/x.jpg": image_bytes("JPEG", seed=4), "top.jpg": image_bytes("JPEG", seed=5),
        "France/.DS_Store": b"\0", "France/sub/deep.webp": image_bytes("WEBP", seed=6),
        "France/name with spaces é.jpg": image_bytes("JPEG", seed=7),
    }
    for rel, data in files.items():
        write(src / rel, data)
    os.mkfifo(fr / "pipe.jpg")
    sock = socket.socket(socket.AF_UNIX)
    cwd = os.getcwd()
    os.chdir(fr)
    sock.bind("sock.jpg")
    os.chdir(cwd)
    for name, target in (("zero.jpg", "/dev/zero"), ("null.jpg", "/dev/null"), ("loop.jpg", "loop.jpg"),
                         ("dangling.jpg", "nowhere.jpg"), ("up", ".."), ("link_to_good.jpg", "good.jpg")):
        os.symlink(target, fr / name)
    (es / "locked").mkdir()
    write(es / "locked" / "hidden.jpg", image_bytes("JPEG", seed=8))
    (es / "locked").chmod(0)
    inputs = [r for r in files if not r.endswith(".DS_Store")] + [
        f"France/{n}" for n in ("pipe.jpg", "sock.jpg", "zero.jpg", "null.jpg", "loop.jpg", "dangling.jpg", "up",
                                "link_to_good.jpg")] + ["Spain/locked/hidden.jpg" if os.geteuid() == 0 else "Spain/locked"]
    csv_rows = ["IMG_ID,AUTHOR,LAT,LON", "paris.jpg,a,48.8566,2.3522", "paris.jpg,a,35.6762,139.6503",
                'comma.jpg,b,"48,8566",2.35', "north.jpg,c,35.68N,139.69", "sea.jpg,d,0.0,-30.0",
                "range.jpg,e,95,200", "swap.jpg,f,123.4,10.0", "missing.jpg,g,10,10", "empty.jpg,h,,"]
    for i, name in enumerate(["paris.jpg", "comma.jpg", "north.jpg", "sea.jpg", "range.jpg", "swap.jpg", "empty.jpg"]):
        write(base / "hostile" / "im2gps" / "images" / name, image_bytes("JPEG", seed=20 + i))
    write(base / "hostile" / "im2gps" / "gt.csv", ("\n".join(csv_rows) + "\n").encode())
    m_inputs = ["paris.jpg", "comma.jpg", "north.jpg", "sea.jpg", "range.jpg", "swap.jpg", "missing.jpg", "empty.jpg"]
    root = DataRoot(str(base / "hostile" / "home"))
    results = []
    try:
        for args in (["--layout", "g50", "--source", str(src), "--dataset", "hostile"],
                     ["--layout", "im2gps", "--source", str(base / "hostile" / "im2gps" / "gt.csv"), "--dataset", "hcsv"]):
            results.append(geofeat(root, "ingest", *args, "--shard-size", "8", bound=300))
    finally:
        (es / "locked").chmod(0o755)
        sock.close()
    con = connect(root, fresh=True)
    rows = con.execute("SELECT dataset, source_uri, 'image' FROM images UNION ALL "
                       "SELECT dataset, source_uri, reason FROM quarantine").fetchall()
    got = {(d, u.split("/g50/", 1)[-1] if d == "hostile" else u.rsplit("/", 1)[-1]): r for d, u, r in rows}
    per_input = {("hostile", i): [r for (d, u), r in got.items() if d == "hostile" and u == i] for i in inputs}
    per_input.update({("hcsv", i): [r for (d, u), r in got.items() if d == "hcsv" and u == i] for i in m_inputs})
    once = sum(len(v) == 1 for v in per_input.values())
    hung = sum(rc is None for rc, _, _ in results)
    tracebacks = sum(out.count("Traceback") for _, _, out in results)
    root_user = os.geteuid() == 0
    say(f"{len(per_input)} hostile inputs: {once} accounted for exactly once; ingests rc "
        f"{[rc for rc, _, _ in results]} in {[round(s) for _, s, _ in results]} s; hung {hung}; tracebacks {tracebacks}")
    for key, reasons in sorted(per_input.items()):
        say(f"  {key[0]:8} {key[1]:32} {reasons}")
    if root_user:
        say("  (running as root, which reads a chmod-000 folder anyway: Spain/locked is listed and its file "
            "ingested; tests/test_hostile_inputs.py denies the listing another way)")
    ROWS.append({"scenario": f"{len(per_input)} hostile inputs", "ok": once == len(per_input) and not hung
                 and not tracebacks, "detail": f"{once} once, {hung} hung"})


# ---------------------------------------------------------------- 5. hostile and endless SQL


def hostile_sql(base: Path, built: DataRoot) -> None:
    say("\n## hostile and endless SQL")
    from test_sql_guard import HOSTILE

    root = copy_root(built, base / "sql")
    out_dir = base / "sql-out"
    out_dir.mkdir()
    geofeat(root, "sql", "SELECT count(*) FROM images", bound=120)  # the copy's catalog.sql is rewritten here
    before = {str(p): p.stat().st_size for p in Path(root.url).rglob("*") if p.is_file()}
    refused, other, slowest = 0, [], 0.0
    for statement, reason in HOSTILE:
        rc, s, out = geofeat(root, "sql", statement.format(home=root.url, out=out_dir), bound=120)
        refused += rc == 2
        if rc == 2 and reason not in out:  # refused, for another reason than on the tests' catalog
            other.append(f"{statement[:70]!r}: {out.strip().splitlines()[-1][:110]}")
        slowest = max(slowest, s)
    after = {str(p): p.stat().st_size for p in Path(root.url).rglob("*") if p.is_file()}
    wrote = sorted(set(after) - set(before)) + sorted(p for p in before if after.get(p) != before[p])
    endless = ["WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t) SELECT count(*) FROM t",
               "SELECT count(*) FROM range(1000000000000)",
               "SELECT count(*) FROM range(100000) a, range(100000) b, range(100000) c",
               "SELECT * FROM range(1000000000) t(i) ORDER BY random()"]
    bounded = []
    for statement in endless:
        rc, s, out = geofeat(root, "sql", statement, "--timeout", "5", bound=120)
        bounded.append((rc == 2 and ("ran longer" in out or "needs more than" in out), round(s, 1)))
    nested = [geofeat(root, "sql", 'SELECT feature_id, bbox, crop FROM features LIMIT 3', "--format", f, bound=120)[0]
              for f in ("table", "csv", "json")]
    say(f"{len(HOSTILE)} hostile statements: {refused} refused, {refused - len(other)} with the reason the tests "
        f"expect (slowest {slowest:.1f} s); files written: {wrote or 'none'}, under --out: "
        f"{list(out_dir.iterdir()) or 'none'}")
    for line in other:
        say(f"  refused otherwise: {line}")
    say(f"{len(endless)} endless queries with --timeout 5: stopped {sum(b for b, _ in bounded)}, wall s "
        f"{[s for _, s in bounded]}; nested columns in table/csv/json: rc {nested}")
    ROWS.append({"scenario": f"{len(HOSTILE)} hostile SQL", "ok": refused == len(HOSTILE) and not wrote,
                 "detail": f"{refused} refused"})
    ROWS.append({"scenario": f"{len(endless)} endless SQL", "ok": all(b for b, _ in bounded),
                 "detail": f"stopped in {[s for _, s in bounded]} s"})
    ROWS.append({"scenario": "nested columns, 3 formats", "ok": nested == [0, 0, 0], "detail": f"rc {nested}"})


# ---------------------------------------------------------------- 6. the leakage trap


def leakage_trap(base: Path) -> None:
    say("\n## cross-dataset leakage trap")
    shared = image_bytes("JPEG", seed=99)
    for i in range(6):
        write(base / "trap" / "g50" / "France" / f"{i}.jpg", image_bytes("JPEG", seed=100 + i))
    write(base / "trap" / "g50" / "France" / "shared.jpg", shared)
    write(base / "trap" / "bench" / "France" / "copy.jpg", shared)
    root = DataRoot(str(base / "trap" / "home"))
    geofeat(root, "ingest", "--layout", "g50", "--source", str(base / "trap" / "g50"), "--dataset", "g50",
            "--split", "train", bound=300)
    geofeat(root, "ingest", "--layout", "g50", "--source", str(base / "trap" / "bench"), "--dataset", "bench",
            "--split", "test", bound=300)
    rows = connect(root, fresh=True).execute(
        "SELECT dataset, split, assigned_split FROM images WHERE source_uri LIKE '%shared.jpg' OR source_uri LIKE "
        "'%copy.jpg' ORDER BY 1").fetchall()
    ok, failed = check_ok(root)
    say(f"the shared image: {rows}; check {'PASS' if ok else failed}")
    ROWS.append({"scenario": "leakage trap", "ok": rows == [("bench", "test", "test"), ("g50", "test", "train")] and ok,
                 "detail": str(rows)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=9, help="kill -9s of `geofeat build demo`")
    parser.add_argument("--train-kills", type=int, default=2, help="kill -9s of `geofeat train demo`")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--skip", default="", help="comma-separated: build,train,concurrent,inputs,sql,trap")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    base = Path(tempfile.mkdtemp(prefix="geofeat-reliability-"))
    say(f"machine: {platform.node()}, {os.cpu_count()} cores, {platform.platform()}; root {base}")
    started = time.monotonic()
    try:
        clean = build_kills(base, args.kills, args.seed) if "build" not in skip else None
        if clean is None and {"train", "concurrent", "sql"} - skip:
            clean = DataRoot(str(base / "clean"))
            rc, _, out = geofeat(clean, "build", "demo", bound=1800)
            assert rc == 0, out[-3000:]
        if "train" not in skip:
            train_kills(base, clean, args.train_kills, args.seed)
        if "concurrent" not in skip:
            concurrent_builds(base, clean)
        if "inputs" not in skip:
            hostile_inputs(base)
        if "sql" not in skip:
            hostile_sql(base, clean)
        if "trap" not in skip:
            leakage_trap(base)
    finally:
        say(f"\n## summary ({time.monotonic() - started:.0f} s)")
        for row in ROWS:
            say(f"{'OK  ' if row['ok'] else 'FAIL'}  {row['scenario']:42} {row['detail']}")
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
