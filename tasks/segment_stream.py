"""One streaming pipeline per stage run: the model never waits on host work.

    shard tasks --submit(plan)--> SegmentStream (one per process and segmenter version)
      reader/crop workers (processes, alive for the whole run; tasks/segment_worker.py):
          read -> decode -> overlay cut -> resize into a shared-memory slot; keep the frame
      driver thread (the only thread that touches the model):
          chunks of `batch_size` images, in plan order -> BatchSegmenter (bf16 on CUDA, batch
          halved on OOM, a breaking image isolated) -> select segments -> boxes back to the
          worker that holds the frame
      workers: cut, downscale and encode the crops, while the model runs the next chunk
      commit thread: a finished shard's rows -> Parquet -> completion record (last), in shard order;
          only then does the shard task's future resolve

Bounded everywhere: 2 chunks of model-input slots, at most 3 chunks of frames in flight, 2 shards
queued for commit; crop rows are held only for shards not yet committed. So memory does not grow
with the number of images, and reading runs ahead across shard boundaries (the flow keeps
`run.concurrent_shards` shards submitted) while the previous shard commits in the background.

Exactly-once is unchanged: a shard is committed by `commit_shard` (files renamed into place, the
record written last) and its task returns only after the record exists. A kill -9 at any moment
leaves at most files without a record, which a rerun overwrites with the same bytes. Batches never
span shards and follow plan order, so a shard's crops do not depend on what else is in flight.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import sys
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

from models.labels import GROUPS
from storage.layout import DataRoot
from storage.schema import FEATURES, QUARANTINE, SEGMENTATIONS, to_table
from storage.shards import Output, commit_shard
from tasks.segment_worker import (FrameWorker, WorkerSetup, crop_box, segment_meta, select_segments,
                                  worker_main)
from tasks.specs import CropSpec, RunOptions, SegmenterSpec

log = logging.getLogger(__name__)

STAGE = "segment"
# fork on Linux: workers start in milliseconds with the parent's imports and never touch torch or
# CUDA (the DataLoader forks the same way). Elsewhere spawn: workers import this package afresh.
START_METHOD = "fork" if sys.platform.startswith("linux") else "spawn"
IDLE_S = 30.0  # s without work before a stream stops its workers (Dask workers between stage runs)
COMMITS_QUEUED = 2  # finished shards waiting for the commit thread; beyond that the driver waits
POLL_S = 0.2  # s between liveness checks of the workers while waiting for a reply
STOP_S = 10.0  # s a worker gets to exit after it is told to


# ---------------------------------------------------------------- the model, with OOM back-off


@dataclass
class BatchSegmenter:
    """Runs a loaded segmenter over a batch. On CUDA OOM the batch is halved (and stays halved);
    a batch that fails otherwise is retried image by image, so one bad image cannot fail the
    shard: its result is the exception, where the others' are their segments.

    `layout` is how `pixels` hold an image: "chw" ([B, 3, H, W], the Preprocessor's) or "hwc"
    ([B, H, W, 3], the stream's slots; permuted on the model's device)."""

    segmenter: Any
    spec: SegmenterSpec
    size: int  # images per model call; shrinks on OOM
    layout: str = "chw"

    def __call__(self, items: list[dict], pixels) -> list:
        """Segments (or None: no annotation, or the exception) per item, in order. Items carry the
        decoded `image` (or its `size`); annotations items carry what `prepare` returned."""
        sizes = [tuple(item["size"]) if "size" in item else tuple(item["image"].shape[:2]) for item in items]
        return self.segments(sizes, pixels, items)

    def segments(self, sizes: list[tuple[int, int]], pixels, items: list[dict] | None = None) -> list:
        def part(a: int, b: int) -> list:
            return self.segments(sizes[a:b], None if pixels is None else pixels[a:b],
                                 None if items is None else items[a:b])

        if len(sizes) > self.size:
            step = self.size  # fixed for this split, even if a part shrinks self.size on OOM
            return [seg for k in range(0, len(sizes), step) for seg in part(k, k + step)]
        spec = self.spec
        try:
            if spec.kind == "annotations":
                return self.segmenter.predict(items, sizes)
            kwargs = {"layout": "hwc"} if self.layout == "hwc" else {}
            return self.segmenter.predict(pixels, sizes, mode=spec.mode, score_threshold=spec.score_threshold,
                                          mask_threshold=spec.mask_threshold, overlap_threshold=spec.overlap_threshold,
                                          **kwargs)
        except torch.cuda.OutOfMemoryError:
            if len(sizes) == 1:
                raise
            torch.cuda.empty_cache()
            self.size = max(1, len(sizes) // 2)
            log.warning("CUDA out of memory at batch %d: continuing at batch %d", len(sizes), self.size)
            return part(0, len(sizes))
        except Exception as exc:  # noqa: BLE001 - isolate the image that breaks the model
            if len(sizes) == 1:
                return [exc]
            return [seg for k in range(len(sizes)) for seg in part(k, k + 1)]


def feature_id(segmenter_id: str, dataset: str, image_id: str, label: str, rank: int) -> str:
    """Deterministic: the same crop gets the same id on every run (and a rerun after kill -9)."""
    import hashlib

    return hashlib.sha256(f"{segmenter_id}|{dataset}|{image_id}|{label}|{rank}".encode()).hexdigest()[:24]


# ---------------------------------------------------------------- statistics (benchmarks read them)

_STATS: Counter = Counter()  # step -> core-ns, plus counts; summed over every stream of this process
_STATS_LOCK = threading.Lock()


def stream_stats(reset: bool = False) -> dict[str, int]:
    """Core-ns per step of every stream closed in this process (workers' steps, their whole CPU,
    the driver's model / post-processing / row assembly, the commit thread), and image counts."""
    with _STATS_LOCK:
        out = dict(_STATS)
        if reset:
            _STATS.clear()
    return out


def _add_stats(values: dict) -> None:
    with _STATS_LOCK:
        _STATS.update({k: int(v) for k, v in values.items()})


# ---------------------------------------------------------------- one shard in the stream


@dataclass(eq=False)
class _Shard:
    root: DataRoot
    plan: Any  # SegmentPlan
    future: Future
    now: datetime
    next_read: int = 0  # next image to hand to a worker
    next_chunk: int = 0  # next chunk of `batch` images to give the model
    remaining: int = 0  # images not finished
    read: dict = field(default_factory=dict)  # image index -> (slot, (width, kept, top)) waiting for the model
    reads_done: Counter = field(default_factory=Counter)  # chunk -> images read (or failed)
    chosen: dict = field(default_factory=dict)  # image index -> (status, [segment_meta], top)
    rows: dict = field(default_factory=dict)  # image index -> feature rows
    logs: dict = field(default_factory=dict)  # image index -> segmentations row
    quarantined: dict = field(default_factory=dict)  # image index -> quarantine row
    unknown: set = field(default_factory=set)
    model_calls: int = 0
    failed: BaseException | None = None

    def __post_init__(self) -> None:
        self.remaining = len(self.plan.images)

    @property
    def size(self) -> int:
        return len(self.plan.images)


class SegmentStream:
    """The streaming pipeline of one segmenter version in this process: its model, its reader/crop
    workers, its driver and commit threads. `submit` is thread-safe; shards run in submission order."""

    def __init__(self, spec: SegmenterSpec, crops: CropSpec, run: RunOptions, segmenter, groups: dict[str, str],
                 workers: int):
        self.spec, self.crops, self.run = spec, crops, run
        self.segmenter, self.groups = segmenter, groups
        self.untrained = bool(getattr(segmenter, "untrained", False))
        self.batch = run.batch_size
        self.annotations = segmenter if spec.kind == "annotations" else None
        pre = getattr(segmenter, "preprocessor", None)
        self.input_size = None if self.annotations is not None else tuple(pre.size)
        device = getattr(segmenter, "device", None)
        self.cuda = device is not None and device.type == "cuda"
        if workers and mp.current_process().daemon:
            log.warning("segment: this process is daemonic (a Dask worker?) and cannot start reader processes; "
                        "reading inline. On Dask GPU workers set DASK_DISTRIBUTED__WORKER__DAEMON=False")
            workers = 0
        self.nworkers = workers
        self.threads_before = None
        self.segment_batch = BatchSegmenter(segmenter, spec, run.batch_size, layout="hwc")
        # Bounds: slots hold model inputs between read and model; frames wait in the workers until cut.
        self.nslots = 0 if self.input_size is None else 2 * self.batch
        if self.input_size is None:
            self.max_inflight = max(4, 2 * workers)
        else:
            self.max_inflight = 3 * self.batch if workers else self.batch
        self.per_worker = -(-self.max_inflight // max(1, workers)) + 1
        self.clock: Counter = Counter()
        self._cv = threading.Condition()
        self._shards: deque[_Shard] = deque()  # submitted, not yet handed to the commit thread
        self._closing = False
        self.stopped = False
        self._seq = 0
        self._where: dict[int, tuple[_Shard, int, int]] = {}  # seq -> (shard, image index, worker)
        self._inflight = [0] * max(1, workers)
        self._local: deque = deque()  # inline replies
        self._free = list(range(self.nslots))
        self._start_workers()
        # On a CPU the model's threads and the readers share the cores: the model gets the cores the
        # readers leave (restored when the stream stops). Oversubscribed OpenMP threads spin-wait:
        # measured on 2 busy cores, the tiny model at 2 threads beside a reader took 3-5x the CPU
        # per image of 1 thread.
        if workers and device is not None and device.type == "cpu":
            self.threads_before = torch.get_num_threads()
            torch.set_num_threads(max(1, min(self.threads_before, (os.cpu_count() or 2) - workers)))
        self._commits: queue.Queue = queue.Queue(maxsize=COMMITS_QUEUED)
        self._committer = threading.Thread(target=self._commit_loop, name="segment-commit", daemon=True)
        self._committer.start()
        self._driver = threading.Thread(target=self._drive, name="segment-driver", daemon=True)
        self._driver.start()

    # ------------------------------------------------------------ workers

    def _start_workers(self) -> None:
        shape = (self.nslots, *self.input_size, 3) if self.nslots else None
        setup = WorkerSetup(spec=self.spec, crops=self.crops, input_size=self.input_size,
                            annotations=self.annotations, groups=self.groups)
        self.procs, self.inboxes = [], []
        if self.cuda and shape:  # model inputs go to the GPU from page-locked memory, without blocking
            self.staging = torch.empty((self.batch, *self.input_size, 3), dtype=torch.uint8).pin_memory()
        if not self.nworkers:
            self.slots = np.zeros(shape, np.uint8) if shape else None
            self.inline = FrameWorker(setup, self.slots)
            return
        ctx = mp.get_context(START_METHOD)
        ring = ctx.RawArray("B", int(np.prod(shape))) if shape else None  # shared memory, unlinked at birth
        self.slots = np.frombuffer(ring, np.uint8).reshape(shape) if shape else None
        self.inline = None
        self.outbox = ctx.Queue()
        for k in range(self.nworkers):
            inbox = ctx.Queue()
            proc = ctx.Process(target=worker_main, name=f"segment-reader-{k}", daemon=True,
                               args=(k, setup, inbox, self.outbox, ring, shape, os.getpid()))
            proc.start()
            self.procs.append(proc)
            self.inboxes.append(inbox)

    def _send(self, worker: int, msg: tuple) -> None:
        if self.inline is not None:
            self._local.append(self.inline.handle(msg))
        else:
            self.inboxes[worker].put(msg)

    def _receive(self) -> tuple | None:
        if self._local:
            return self._local.popleft()
        if self.inline is not None:
            return None
        try:
            return self.outbox.get(timeout=POLL_S)
        except queue.Empty:
            for proc in self.procs:
                if proc.exitcode is not None:
                    raise RuntimeError(f"segment: reader process {proc.pid} exited with code {proc.exitcode} "
                                       "(killed? out of memory?); the shards in flight failed, committed ones "
                                       "are kept: run the stage again to do the rest")
            return None

    # ------------------------------------------------------------ the public side

    def submit(self, root: DataRoot, plan) -> Future | None:
        """Queue a shard; the future resolves to the task's result once its record exists. None:
        this stream has stopped (idle or broken), ask for a new one."""
        shard = _Shard(root=root, plan=plan, future=Future(), now=datetime.now(timezone.utc))
        with self._cv:
            if self.stopped or self._closing:
                return None
            self._shards.append(shard)
            self._cv.notify_all()
        return shard.future

    @property
    def idle(self) -> bool:
        with self._cv:
            return not self._shards

    def close(self) -> None:
        """Finish what was submitted, stop the workers and threads, add the CPU clocks to the stats."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        self._driver.join()

    # ------------------------------------------------------------ driver thread

    def _drive(self) -> None:
        started = time.thread_time_ns()
        error: BaseException | None = None
        try:
            while self._wait_for_work():
                self._flush()
                dispatched = self._dispatch()
                if self._model_step():
                    continue
                msg = self._receive()
                if msg is not None:
                    self._on_message(msg)
                elif self.inline is not None and not dispatched:
                    time.sleep(0.01)  # inline with nothing to do (cannot happen; never spin if it does)
        except BaseException as exc:  # noqa: BLE001 - every waiting shard task gets it
            error = exc
            log.exception("segment stream failed")
        finally:
            with self._cv:
                self.stopped = True
                pending = list(self._shards)
                self._shards.clear()
            for shard in pending:
                if not shard.future.done():
                    shard.future.set_exception(error or RuntimeError("segment stream stopped"))
            self._commits.put(None)
            self._committer.join()
            self.clock["driver"] += time.thread_time_ns() - started
            self._stop_workers()
            if self.threads_before is not None:
                torch.set_num_threads(self.threads_before)
            _add_stats(self.clock)

    def _wait_for_work(self) -> bool:
        """True when there is work; False (and no more submissions) when closed or idle too long."""
        with self._cv:
            deadline = time.monotonic() + IDLE_S
            while not self._shards:
                if self._closing or time.monotonic() >= deadline:
                    self.stopped = True
                    return False
                self._cv.wait(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            return True

    def _dispatch(self) -> int:
        """Hand the next images (in submission order, across shards) to the least busy workers;
        returns how many."""
        with self._cv:
            shards = list(self._shards)
        sent = 0
        for shard in shards:
            while shard.next_read < shard.size:
                if self.nslots and not self._free:
                    return sent
                if sum(self._inflight) >= self.max_inflight:
                    return sent
                worker = min(range(len(self._inflight)), key=self._inflight.__getitem__)
                if self._inflight[worker] >= self.per_worker:
                    return sent
                sent += 1
                ref, index = shard.plan.images[shard.next_read], shard.next_read
                shard.next_read += 1
                seq, self._seq = self._seq, self._seq + 1
                slot = self._free.pop() if self.nslots else None
                self._where[seq] = (shard, index, worker)
                self._inflight[worker] += 1
                self._send(worker, ("read", seq, ref.source_uri, ref.dataset, slot, ref.layout))
        return sent

    def _on_message(self, msg: tuple) -> None:
        kind, seq = msg[0], msg[1]
        if kind in ("started", "stopped"):
            return
        shard, index, worker = self._where[seq]
        if kind == "read":
            _, _, slot, info = msg
            shard.read[index] = (slot, info)
            shard.reads_done[index // self.batch] += 1
            return
        if kind in ("failed", "crashed") and msg[2] is not None:
            self._free.append(msg[2])
        if kind == "failed":
            _, _, _, reason, detail = msg
            self._reject(shard, index, reason, detail)
            shard.reads_done[index // self.batch] += 1
        elif kind == "crashed":
            shard.failed = shard.failed or msg[3]
            shard.reads_done[index // self.batch] += 1
        elif kind == "annotated":
            _, _, status, meta, crops, unknown, top = msg
            shard.unknown.update(unknown)
            shard.model_calls += 1
            self._rows(shard, index, status, meta, crops, top)
        else:  # done: the crops of a frame the model segmented
            status, meta, top = shard.chosen.pop(index)
            self._rows(shard, index, status, meta, msg[2], top)
        self._finish(seq, worker, shard)

    def _model_step(self) -> bool:
        """Run the model on the oldest chunk whose images are all read. True if it ran one."""
        if self.input_size is None:
            return False
        with self._cv:
            shard = next((s for s in self._shards if s.next_chunk * self.batch < s.size), None)
        if shard is None:
            return False
        chunk = shard.next_chunk
        first, last = chunk * self.batch, min(shard.size, (chunk + 1) * self.batch)
        if shard.reads_done[chunk] < last - first:
            return False
        shard.next_chunk += 1
        good = [(k, *shard.read.pop(k)) for k in range(first, last) if k in shard.read]
        if not good:
            return True
        seqs = {index: seq for seq, (s, index, _) in self._where.items() if s is shard and first <= index < last}
        if shard.failed is not None:  # its task fails anyway: free the slots and frames
            self._free.extend(slot for _, slot, _ in good)
            for k, _, _ in good:
                shard.chosen[k] = (None, [], 0)
                self._send(self._where[seqs[k]][2], ("crop", seqs[k], []))
            return True
        t = time.thread_time_ns()
        pixels = self._gather([slot for _, slot, _ in good])
        self._free.extend(slot for _, slot, _ in good)
        sizes = [(info[1], info[0]) for _, _, info in good]  # (kept height, width) of each frame
        t1 = time.thread_time_ns()
        results = self.segment_batch.segments(sizes, pixels)
        t2 = time.thread_time_ns()
        shard.model_calls += 1
        for (k, _, (width, kept, top)), segments in zip(good, results):
            seq = seqs[k]
            if isinstance(segments, Exception):
                self._reject(shard, k, "segmenter_error", f"{type(segments).__name__}: {segments}")
                shard.chosen[k] = (None, [], top)
                self._send(self._where[seq][2], ("crop", seq, []))
                continue
            shard.unknown.update(seg.label for seg in segments if seg.label not in self.groups)
            chosen = select_segments(segments, self.groups, self.crops)
            meta = [segment_meta(seg, group, rank) for seg, group, rank in chosen]
            boxes = [(crop_box(seg.bbox, width, kept, self.crops), seg.mask if self.crops.mask_background else None)
                     for seg, _, _ in chosen]
            shard.chosen[k] = ("ok" if chosen else "no_crops", meta, top)
            self._send(self._where[seq][2], ("crop", seq, boxes))
        t3 = time.thread_time_ns()
        self.clock["batch"] += t1 - t
        self.clock["model"] += t2 - t1
        self.clock["postprocess"] += t3 - t2
        return True

    def _gather(self, slots: list[int]) -> torch.Tensor:
        """The model inputs of a chunk as one [B, H, W, 3] uint8 tensor (pinned on CUDA); the slots
        are free again once this returns."""
        if self.cuda:
            out = self.staging[: len(slots)]
            np.take(self.slots, slots, axis=0, out=out.numpy(), mode="clip")  # "raise" would buffer a copy
            return out
        return torch.from_numpy(np.take(self.slots, slots, axis=0))

    def _reject(self, shard: _Shard, index: int, reason: str, detail: str) -> None:
        ref = shard.plan.images[index]
        shard.quarantined[index] = {"source_uri": ref.source_uri, "dataset": ref.dataset, "stage": STAGE,
                                    "reason": reason, "detail": f"segmenter {shard.plan.segmenter_id}: {detail}",
                                    "size_bytes": None, "source_mtime": None, "seen_at": shard.now}
        # A model failure may be transient (CUDA, a bug fixed later): `error` is planned again.
        self._log(shard, index, "error" if reason == "segmenter_error" else "quarantined", 0)

    def _log(self, shard: _Shard, index: int, status: str, n: int) -> None:
        ref = shard.plan.images[index]
        shard.logs[index] = {"image_id": ref.image_id, "dataset": ref.dataset, "segmenter": shard.plan.segmenter_id,
                             "status": status, "crops": n, "created_at": shard.now}

    def _rows(self, shard: _Shard, index: int, status: str | None, meta: list, crops: list, top: int) -> None:
        if status is None:  # rejected by the model: already logged
            return
        t = time.thread_time_ns()
        ref, plan = shard.plan.images[index], shard.plan
        ext = "jpg" if self.crops.format == "jpeg" else "webp"
        rows = []
        for (label, group, rank, score, (x0, y0, x1, y1), area), (cw, ch, data) in zip(meta, crops):
            fid = feature_id(plan.segmenter_id, ref.dataset, ref.image_id, label, rank)
            rows.append({"feature_id": fid, "image_id": ref.image_id, "dataset": ref.dataset, "split": ref.split,
                         "country": ref.country, "label": label, "group": group, "score": score,
                         "bbox": [x0, y0 + top, x1, y1 + top], "area": area, "crop": {"bytes": data, "path": f"{fid}.{ext}"},
                         "crop_width": cw, "crop_height": ch, "segmenter": plan.segmenter_id,
                         "untrained": self.untrained, "created_at": shard.now})
        shard.rows[index] = rows
        self._log(shard, index, status, len(rows))
        self.clock["rows"] += time.thread_time_ns() - t

    def _finish(self, seq: int, worker: int, shard: _Shard) -> None:
        del self._where[seq]
        self._inflight[worker] -= 1
        shard.remaining -= 1
        self.clock["images"] += 1
        self._flush()

    def _flush(self) -> None:
        # Hand finished shards to the commit thread in submission order (a rerun after a kill then
        # finds the committed shards a prefix of the plan, and re-plans the rest identically).
        while True:
            with self._cv:
                head = self._shards[0] if self._shards else None
                if head is None or head.remaining:
                    return
                self._shards.popleft()
            self._commits.put(head)  # blocks while COMMITS_QUEUED shards wait: backpressure

    # ------------------------------------------------------------ commit thread

    def _commit_loop(self) -> None:
        started = time.thread_time_ns()
        while (shard := self._commits.get()) is not None:
            t = time.thread_time_ns()
            try:
                if shard.failed is not None:
                    raise shard.failed
                result = self._commit(shard)
            except BaseException as exc:  # noqa: BLE001 - the shard's task raises it (and may be retried)
                shard.future.set_exception(exc)
            else:
                shard.future.set_result(result)
            self.clock["commit"] += time.thread_time_ns() - t
        self.clock["commit_thread"] += time.thread_time_ns() - started

    def _commit(self, shard: _Shard) -> dict:
        plan = shard.plan
        order = range(shard.size)
        rows = [row for k in order for row in shard.rows.get(k, [])]
        logs = [shard.logs[k] for k in order if k in shard.logs]
        quarantined = [shard.quarantined[k] for k in order if k in shard.quarantined]
        outputs = [Output("features", {"segmenter": plan.segmenter_id, "dataset": plan.dataset, "group": g},
                          to_table([r for r in rows if r["group"] == g], FEATURES)) for g in GROUPS]
        outputs += [Output("segmentations", {"segmenter": plan.segmenter_id, "dataset": plan.dataset},
                           to_table(logs, SEGMENTATIONS)),
                    Output("quarantine", {"dataset": plan.dataset}, to_table(quarantined, QUARANTINE))]
        commit_shard(shard.root, STAGE, plan.dataset, plan.shard_id, outputs,
                     params={"segmenter": plan.segmenter_id, "spec": self.spec.model_dump(),
                             "crops": self.crops.model_dump()})
        self.clock["crops"] += len(rows)
        return {"shard_id": plan.shard_id, "cached": False, "images": shard.size, "crops": len(rows),
                "quarantined": len(quarantined), "model_calls": shard.model_calls, "unknown": sorted(shard.unknown),
                "untrained": self.untrained}

    # ------------------------------------------------------------ shutdown

    def _stop_workers(self) -> None:
        if self.inline is not None:
            self.clock.update({f"worker_{k}": v for k, v in self.inline.clock.items()})
            return
        for inbox in self.inboxes:
            inbox.put(None)
        deadline, stopped = time.monotonic() + STOP_S, 0
        while stopped < len(self.procs) and time.monotonic() < deadline:
            try:
                msg = self.outbox.get(timeout=POLL_S)
            except queue.Empty:
                if all(p.exitcode is not None for p in self.procs):
                    break
                continue
            if msg[0] == "stopped":
                stopped += 1
                self.clock.update({f"worker_{k}": v for k, v in msg[2].items()})
                self.clock["worker_cpu"] += int(msg[3] * 1e9)
        for proc in self.procs:
            proc.join(timeout=max(0.1, deadline - time.monotonic()))
            if proc.exitcode is None:
                proc.kill()
                proc.join()
        self.outbox.close()
        for inbox in self.inboxes:
            inbox.close()
