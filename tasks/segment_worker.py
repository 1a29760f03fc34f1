"""The host side of the segment stage: everything done to an image outside the model.

`FrameWorker` reads an image, decodes it, cuts the overlay bands, checks it can be segmented,
resizes it into its model-input slot (a row of a shared-memory ring) and KEEPS the decoded frame;
once the model has chosen the segments, the same worker cuts, downscales and encodes that frame's
crops. Only small things cross a process boundary: the job, the model input (through shared
memory), the boxes, and the encoded crops. The full frame never does.

It runs in long-lived worker processes (`worker_main`), started once per stage run by the stream
(tasks/segment_stream.py), or inline in the stream's own thread (`run.num_workers: 0`). No torch,
no model, no Prefect here: only PIL and numpy, which release the GIL only in part, so the parallel
work is done by processes, not threads (PIL holds the GIL for a whole JPEG encode into a BytesIO).

The pure crop functions (`select_segments`, `crop_box`, `cut_crop`, `encode`) are the stage's
definition of a crop: tasks/segment.py re-exports them, and their output is pinned by tests.
"""

from __future__ import annotations

import io
import os
import queue
import resource
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from models.labels import GROUPS
from storage import sources
from tasks.specs import CropSpec, SegmenterSpec
from tasks.validate import MAX_PIXELS, ORIENTATION_TAG, BadInput, load_rgb

MIN_SIDE = 16  # px; smaller images (after the overlay cut) cannot be segmented
MAX_ASPECT = 12.0  # width/height (or inverse) beyond this is a strip, not a scene
ROTATED = range(2, 9)  # EXIF orientations that load_rgb turns upright
POLL_S = 1.0  # s between checks that the stage process is still alive (an orphaned worker exits)


# ---------------------------------------------------------------- crops (pure)


def select_segments(segments: list, groups: dict[str, str], crops: CropSpec) -> list[tuple[Any, str, int]]:
    """(segment, group, rank within its label) for the segments worth a crop."""
    by_label: dict[str, list] = {}
    for seg in segments:
        if groups.get(seg.label) in GROUPS and seg.score >= crops.min_score and seg.area >= crops.min_area:
            by_label.setdefault(seg.label, []).append(seg)
    out = []
    for label in sorted(by_label):
        ranked = sorted(by_label[label], key=lambda s: (-s.area, s.bbox))[: crops.max_per_label]
        out.extend((seg, groups[label], rank) for rank, seg in enumerate(ranked))
    return out


def crop_box(bbox: tuple[int, int, int, int], width: int, height: int, crops: CropSpec) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = bbox
    px = int(round((x1 - x0) * crops.padding)) + crops.padding_px
    py = int(round((y1 - y0) * crops.padding)) + crops.padding_px
    return max(0, x0 - px), max(0, y0 - py), min(width, x1 + px), min(height, y1 + py)


def cut_crop(image: np.ndarray | Image.Image, seg, crops: CropSpec) -> Image.Image:
    """The crop from the full-resolution image (an RGB array or PIL image); the mask (low-res) only
    greys the background. `frame.crop(box)` gives the same pixels as slicing the array, without
    converting the whole frame."""
    frame = image if isinstance(image, Image.Image) else Image.fromarray(np.ascontiguousarray(image))
    return _cut(frame, crop_box(seg.bbox, frame.width, frame.height, crops), seg.mask, crops)


def _cut(frame: Image.Image, box: tuple[int, int, int, int], mask: np.ndarray | None, crops: CropSpec) -> Image.Image:
    img = frame.crop(box)
    if crops.mask_background:
        x0, y0, x1, y1 = box
        w, h = frame.size
        mh, mw = mask.shape
        rows = np.minimum((np.arange(y0, y1) * mh) // h, mh - 1)
        cols = np.minimum((np.arange(x0, x1) * mw) // w, mw - 1)
        keep = mask[np.ix_(rows, cols)]
        img = Image.fromarray(np.ascontiguousarray(np.where(keep[..., None], np.asarray(img), np.uint8(128))))
    if max(img.size) > crops.max_side:
        img.thumbnail((crops.max_side, crops.max_side), Image.BILINEAR)
    return img


def encode(img: Image.Image, crops: CropSpec) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG" if crops.format == "jpeg" else "WEBP", quality=crops.quality)
    return buf.getvalue()


# ---------------------------------------------------------------- reading


def overlay_rows(height: int, spec: SegmenterSpec, dataset: str, layout: str | None = None) -> tuple[int, int]:
    """(top, kept height) in px after cutting the dataset's (or its layout's) overlay bands (GeoGuessr UI)."""
    cut = spec.overlay_for(dataset, layout)
    if cut is None:
        return 0, height
    top, bottom = int(round(height * cut.top)), int(round(height * cut.bottom))
    return top, max(0, height - top - bottom)


def decode_rgb(data: bytes) -> Image.Image:
    """`load_rgb`'s image. A plain RGB JPEG that needs no rotation is returned as decoded: load_rgb's
    exif_transpose and convert("RGB") would each copy the whole frame (1.5-7 ms on a G50 frame)
    for the same pixels. Anything else (other formats and modes, rotation, a warning, an error)
    goes through load_rgb itself, which also gives bad input its quarantine reason."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            img = Image.open(io.BytesIO(data))
            if (img.format == "JPEG" and img.mode == "RGB" and img.width * img.height <= MAX_PIXELS
                    and int(img.getexif().get(ORIENTATION_TAG, 1) or 1) not in ROTATED):
                img.load()
                if not caught:
                    return img
    except Exception:  # noqa: BLE001 - load_rgb below names the problem
        pass
    return load_rgb(data)


def frame_from_bytes(data: bytes, dataset: str, spec: SegmenterSpec,
                     layout: str | None = None) -> tuple[Image.Image, int]:
    """The decoded image with its overlay bands cut, and the px cut from its top. Raises BadInput for
    an image the model cannot take (too small, a strip)."""
    img = decode_rgb(data)
    top, kept = overlay_rows(img.height, spec, dataset, layout)
    if min(img.width, kept) < MIN_SIDE or max(img.width / max(kept, 1), kept / img.width) > MAX_ASPECT:
        raise BadInput("unsegmentable", f"{img.width}x{img.height} px, {kept} px tall after the overlay cut")
    if top or kept != img.height:  # a row band: PIL copies it; the decoded image is then dropped
        img = img.crop((0, top, img.width, top + kept))
    return img, top


def read_frame(uri: str, dataset: str, spec: SegmenterSpec, layout: str | None = None) -> tuple[Image.Image, int]:
    """`frame_from_bytes` of the image at `uri`."""
    return frame_from_bytes(sources.read_bytes(uri), dataset, spec, layout)


# ---------------------------------------------------------------- the worker


@dataclass
class WorkerSetup:
    """What every worker needs, given once when it starts (inherited by fork, else pickled)."""

    spec: SegmenterSpec
    crops: CropSpec
    input_size: tuple[int, int] | None  # (height, width) of the model input; None: no model (annotations)
    annotations: Any = None  # AnnotationsSegmenter: the worker looks its segments up itself
    groups: dict[str, str] = field(default_factory=dict)  # label -> group, to select annotated segments


class FrameWorker:
    """One worker's state: its decoded frames (by sequence number) until their crops are cut.

    Messages in (tuples): ("read", seq, uri, dataset, slot, layout) and ("crop", seq, chosen), where chosen
    is [(box in frame px, mask or None)]. Replies: ("read", seq, slot, (width, kept, top)) or
    ("failed", seq, slot, reason, detail) or ("crashed", seq, slot, exception);
    ("done", seq, crops) with crops = [(width, height, bytes)]; for annotations ("annotated", seq,
    status, chosen, crops, unknown labels, top) straight after the read."""

    def __init__(self, setup: WorkerSetup, slots: np.ndarray | None):
        self.setup, self.slots = setup, slots
        self.frames: dict[int, Image.Image] = {}
        self.clock: Counter = Counter()  # step -> thread CPU ns (read, decode, resize, annotate, crop, encode)

    def _timed(self, step: str, start: int) -> int:
        now = time.thread_time_ns()
        self.clock[step] += now - start
        return now

    def handle(self, msg: tuple) -> tuple:
        if msg[0] == "read":
            return self.read(*msg[1:])
        return self.crop(*msg[1:])

    def read(self, seq: int, uri: str, dataset: str, slot: int | None, layout: str | None = None) -> tuple:
        setup = self.setup
        t = time.thread_time_ns()
        try:
            data = sources.read_bytes(uri)
            t = self._timed("read", t)
            frame, top = frame_from_bytes(data, dataset, setup.spec, layout)
            t = self._timed("decode", t)
        except BadInput as bad:
            return ("failed", seq, slot, bad.reason, bad.detail)
        except FileNotFoundError as exc:
            return ("failed", seq, slot, "missing_file", f"vanished after ingest: {exc}")
        except Exception as exc:  # noqa: BLE001 - the shard fails with it (a transient one is retried)
            return ("crashed", seq, slot, _portable(exc))
        if setup.annotations is not None:
            return self._annotated(seq, uri, dataset, frame, top)
        h, w = setup.input_size
        resized = frame if frame.size == (w, h) else frame.resize((w, h), Image.Resampling.BILINEAR)
        np.copyto(self.slots[slot], np.asarray(resized))
        self._timed("resize", t)
        self.frames[seq] = frame
        return ("read", seq, slot, (frame.width, frame.height, top))

    def crop(self, seq: int, chosen: list[tuple]) -> tuple:
        frame = self.frames.pop(seq)
        return ("done", seq, self._crops(frame, chosen))

    def _crops(self, frame: Image.Image, chosen: list[tuple]) -> list[tuple[int, int, bytes]]:
        out = []
        crops = self.setup.crops
        for box, mask in chosen:
            t = time.thread_time_ns()
            img = _cut(frame, box, mask, crops)
            t = self._timed("crop", t)
            out.append((img.width, img.height, encode(img, crops)))
            self._timed("encode", t)
        return out

    def _annotated(self, seq: int, uri: str, dataset: str, frame: Image.Image, top: int) -> tuple:
        """Ground truth instead of a model: look the segments up and cut the crops right here."""
        setup, t = self.setup, time.thread_time_ns()
        try:
            segments = setup.annotations.segments_for(dataset, uri, top, frame.height, frame.width)
        except FileNotFoundError as exc:
            return ("failed", seq, None, "missing_file", f"annotation vanished: {exc}")
        except Exception as exc:  # noqa: BLE001 - one image's broken annotation is its own quarantine row
            return ("failed", seq, None, "segmenter_error", f"{type(exc).__name__}: {exc}")
        self._timed("annotate", t)
        if segments is None:
            return ("annotated", seq, "no_annotation", [], [], [], top)
        unknown = sorted({s.label for s in segments if s.label not in setup.groups})
        chosen = select_segments(segments, setup.groups, setup.crops)
        meta = [segment_meta(seg, group, rank) for seg, group, rank in chosen]
        boxes = [(crop_box(seg.bbox, frame.width, frame.height, setup.crops), seg.mask) for seg, _, _ in chosen]
        return ("annotated", seq, "ok" if chosen else "no_crops", meta, self._crops(frame, boxes), unknown, top)


def segment_meta(seg, group: str, rank: int) -> tuple:
    """What a feature row keeps of a chosen segment: (label, group, rank, score, bbox, area)."""
    return (seg.label, group, rank, float(seg.score), tuple(int(v) for v in seg.bbox), int(seg.area))


def _portable(exc: BaseException) -> BaseException:
    """The exception if it survives pickling (its type decides whether Prefect retries), else a
    RuntimeError that names it."""
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def cpu_seconds() -> float:
    """CPU time of the calling process (user + system), s."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def worker_main(wid: int, setup: WorkerSetup, inbox, outbox, ring, shape: tuple, parent: int) -> None:
    """A worker process: handle messages until None, then report its CPU clock and exit. It exits
    on its own when the stage process is gone (a kill -9 leaves no orphaned reader behind).
    `ring` is the model-input slots (a multiprocessing RawArray: shared memory whose file is
    unlinked at birth, so nothing is left in /dev/shm after any kill)."""
    slots = np.frombuffer(ring, np.uint8).reshape(shape) if ring is not None else None
    worker = FrameWorker(setup, slots)
    outbox.put(("started", wid, os.getpid()))
    while True:
        try:
            msg = inbox.get(timeout=POLL_S)
        except queue.Empty:
            if os.getppid() != parent:  # orphaned: exit now, without waiting to flush replies nobody reads
                os._exit(0)
            continue
        if msg is None:
            break
        outbox.put(worker.handle(msg))
    outbox.put(("stopped", wid, dict(worker.clock), cpu_seconds()))
