"""Loading for the stages' DataLoaders: the crop stream that training, evaluation and predict read
crops through, the device half of its transforms, and the worker settings every stage's loader shares.

The data path is split in two, so the GPU is never waiting on Python maths in the workers:
* workers (`CropStream`): read crop bytes straight from the catalog's Parquet shards (one row group at
  a time, footers read once per worker), decode (reduced DCT scale, simplejpeg when installed), take
  the random resized crop and deliver uint8 [S, S, 3] plus each sample's jitter factors; collate and
  the transfer to the main process move uint8, 4x fewer bytes than float32;
* the device (`device_batches`): dtype change, colour jitter and normalisation per batch, vectorised,
  on a side CUDA stream that prepares batch k+1 while the model works on batch k.

Reproducible: a sample's augmentation is keyed by (seed, epoch, crop, copy), never by which worker
read it, and the order is a function of (seed, epoch, worker count). The loaders persist across
epochs (`persistent_workers`): the epoch, what each worker already delivered (a resume skips it
undecoded) and which worker goes first live in a small shared-memory tensor the workers read whenever
an epoch starts.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from models.expert import Expert, Transforms
from storage.layout import DataRoot
from storage.shards import iter_row_groups, parquet_footer

Unit = tuple[str, list[str], list[int]]  # (Parquet file, feature_ids, labels) of one file's selected crops


class CropError(ValueError):
    """A crop in the catalog cannot be decoded."""


def worker_init(_: int) -> None:
    """Every stage's loader workers: one intra-op thread each, so they never compete with the
    model (or each other) for cores."""
    torch.set_num_threads(1)


def repeat_factors(labels: np.ndarray, balance: str) -> np.ndarray:
    """Expected copies of each crop per epoch: ~ count(class)^-alpha, normalised to one epoch's worth."""
    if balance == "none" or len(labels) == 0:
        return np.ones(len(labels))
    alpha = 0.5 if balance == "sqrt" else 1.0
    counts = np.bincount(labels)
    weight = counts[labels].astype(np.float64) ** -alpha
    return weight * len(labels) / weight.sum()


def sample_key(feature_id: str) -> int:
    """The crop's part of its augmentation key: its hex id as an integer (any other id: a hash of it)."""
    try:
        return int(feature_id, 16)
    except ValueError:
        return int.from_bytes(hashlib.blake2b(feature_id.encode(), digest_size=12).digest(), "big")


# ---------------------------------------------------------------- data


class CropStream(IterableDataset):
    """Train: (uint8 [S, S, 3], jitter factors [2], label, worker); eval: (uint8 [S, S, 3], label, worker),
    from crop bytes in the catalog's Parquet files.

    Each epoch, the files' selected rows are cut into pieces and dealt to the workers by size (an
    order drawn from (seed, epoch)), so workers get equal shares; each worker reads one row group
    at a time (only `feature_id` and `crop`), keeps its rows, repeats each by its class repeat
    factor (train: whole copies plus one more with the fractional part's probability, drawn per
    (seed, epoch, file, row)) and yields through a shuffle buffer. `worker` is the logical worker
    that produced the sample: what `set_epoch(consumed=)` counts."""

    PIECES_PER_WORKER = 4  # finer pieces balance better; each costs one more read of its row group
    MAX_WORKERS = 256  # slots in the shared control tensor
    FOOTERS = 4096  # Parquet footers each process keeps (a few kB each)

    def __init__(self, home: str, units: list[Unit], transforms: Transforms, *,
                 train: bool, balance: str = "none", shuffle_buffer: int = 1024, seed: int = 0):
        self.home = home
        self.units = units
        self.transforms = transforms
        self.train = train
        self.shuffle_buffer = shuffle_buffer if train else 1
        self.seed = seed
        labels = np.array([lab for _, _, labels in units for lab in labels], dtype=np.int64)
        factors = repeat_factors(labels, balance) if train else np.ones(len(labels))
        self.factors, start = [], 0
        for _, ids, _ in units:
            self.factors.append(factors[start:start + len(ids)])
            start += len(ids)
        self.crops = len(labels)
        # [epoch, first worker, samples to skip per logical worker...]: shared with the workers, which
        # persist across epochs and read it when an epoch starts
        self._control = torch.zeros(2 + self.MAX_WORKERS, dtype=torch.int64).share_memory_()
        self._footers: OrderedDict[str, object] = OrderedDict()

    def __len__(self) -> int:
        return self.crops

    # ------------------------------------------------------------ main process

    def set_epoch(self, epoch: int, consumed: dict | None = None, first_worker: int = 0) -> None:
        """Before iterating the loader: the epoch; `consumed` (logical worker -> samples it delivered
        before a crash) are skipped undecoded; `first_worker`: the logical worker whose batch was due
        next (DataLoader serves its workers round robin from worker 0), so a resumed epoch continues
        in the same order."""
        control = torch.zeros_like(self._control)
        control[0], control[1] = int(epoch), int(first_worker)
        for w, n in (consumed or {}).items():
            control[2 + int(w)] = int(n)
        self._control.copy_(control)

    @property
    def epoch(self) -> int:
        return int(self._control[0])

    def deal(self, workers: int, epoch: int | None = None) -> list[list[tuple[int, slice]]]:
        """Per logical worker, the (unit, row slice) pieces it reads this epoch: largest piece to the
        least loaded worker. Deterministic for (seed, epoch, workers)."""
        epoch = self.epoch if epoch is None else epoch
        size = max(1, math.ceil(self.crops / (workers * self.PIECES_PER_WORKER)))
        pieces = [(u, slice(k, k + size)) for u, (_, ids, _) in enumerate(self.units) for k in range(0, len(ids), size)]
        if self.train:
            pieces = [pieces[i] for i in np.random.default_rng((self.seed, epoch)).permutation(len(pieces))]
        else:  # eval: keep file order; workers still get equal shares
            pieces = sorted(pieces, key=lambda p: (p[0], p[1].start))
        load, out = [0] * workers, [[] for _ in range(workers)]
        for u, sl in sorted(pieces, key=lambda p: -len(self.units[p[0]][1][p[1]])):
            w = int(np.argmin(load))
            out[w].append((u, sl))
            load[w] += len(self.units[u][1][sl])
        return out

    # ------------------------------------------------------------ workers

    def _footer(self, root: DataRoot, path: str):
        md = self._footers.get(path)
        if md is None:
            md = self._footers[path] = parquet_footer(root, path)
            if len(self._footers) > self.FOOTERS:
                self._footers.popitem(last=False)
        else:
            self._footers.move_to_end(path)
        return md

    def _rows(self, pieces: list[tuple[int, slice]], epoch: int):
        """(bytes, label, unit, feature_id, copy) of each selected crop copy of the pieces, in file order."""
        root = DataRoot(self.home)
        for u, sl in pieces:
            path, ids, labels = self.units[u]
            if self.train:  # one uniform per (seed, epoch, file, row): the same whatever the pieces
                factor = self.factors[u][sl]
                uniform = np.random.default_rng((self.seed, epoch, u)).random(len(ids))[sl]
                copies = (factor.astype(np.int64) + (uniform < factor - np.floor(factor))).tolist()
            else:
                copies = [1] * len(ids[sl])
            wanted = {fid: (label, n) for fid, label, n in zip(ids[sl], labels[sl], copies) if n}
            for t in iter_row_groups(root, path, ["feature_id", "crop"], metadata=self._footer(root, path)):
                blobs = t.column("crop").combine_chunks().field("bytes")
                for i, fid in enumerate(t.column("feature_id").to_pylist()):
                    hit = wanted.get(fid)
                    if hit is None:
                        continue
                    data = blobs[i].as_py()
                    for copy in range(hit[1]):
                        yield data, hit[0], u, fid, copy

    def __iter__(self):
        info = get_worker_info()
        physical, workers = (info.id, info.num_workers) if info else (0, 1)
        if workers > self.MAX_WORKERS:
            raise ValueError(f"num_workers: at most {self.MAX_WORKERS} loader workers, got {workers}")
        control = self._control.tolist()
        epoch, worker = control[0], (physical + control[1]) % workers  # logical worker
        skip = control[2 + worker]
        pieces = self.deal(workers, epoch)[worker]
        rng = np.random.default_rng((self.seed, epoch, 10_000 + worker))
        share = sum(len(self.units[u][1][sl]) for u, sl in pieces)
        capacity = max(1, min(self.shuffle_buffer, share // 2))  # a small share is not read whole before yielding
        buffer: list[tuple] = []
        n = 0

        def emit(item):
            nonlocal n
            n += 1
            if n <= skip:
                return None
            data, label, u, fid, copy = item
            try:
                x, factors = self.transforms.pixels(data, (epoch, sample_key(fid), copy))
            except (OSError, ValueError) as exc:
                raise CropError(f"crop {fid} in {self.units[u][0]} cannot be decoded ({type(exc).__name__}: "
                                f"{exc}); run `geofeat check`, and segment that shard again") from exc
            return (x, factors, label, worker) if self.train else (x, label, worker)

        for item in self._rows(pieces, epoch):
            if len(buffer) < capacity:
                buffer.append(item)
                continue
            j = int(rng.integers(len(buffer)))
            buffer[j], item = item, buffer[j]
            out = emit(item)
            if out is not None:
                yield out
        rng.shuffle(buffer)
        for item in buffer:
            out = emit(item)
            if out is not None:
                yield out


def make_loader(stream: CropStream, batch_size: int, workers: int, pin: bool = False,
                persistent: bool = False) -> DataLoader:
    """The stages' crop loader. `persistent`: workers live until `close_loader` (training: one loader per
    stream for the whole run, each epoch started by `stream.set_epoch`)."""
    return DataLoader(stream, batch_size=batch_size, num_workers=workers, prefetch_factor=4 if workers else None,
                      persistent_workers=persistent and workers > 0,
                      worker_init_fn=worker_init if workers else None, pin_memory=pin)


def close_loader(loader: DataLoader) -> None:
    """Stop a loader's persistent workers now (not whenever the garbage collector gets to it)."""
    iterator, loader._iterator = getattr(loader, "_iterator", None), None
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


# ---------------------------------------------------------------- device


def device_batches(batches, expert: Expert, *, train: bool):
    """A crop loader's uint8 batches as model input on the expert's device: (pixel values, labels, workers).

    Train batches carry jitter factors; their labels move to the device too. On CUDA, batch k+1 is
    copied (from pinned memory, non-blocking) and augmented on a side stream while the model works on
    batch k, as timm's prefetcher does; elsewhere it is prepared in line."""
    device = expert.device

    def prepare(batch):
        if train:
            x, factors, y, workers = batch
            return expert.pixel_values(x, factors), y.to(device, non_blocking=True), workers
        x, y, workers = batch
        return expert.pixel_values(x), y, workers

    if device.type != "cuda":
        for batch in batches:
            yield prepare(batch)
        return
    side = torch.cuda.Stream(device)
    pending = None
    for batch in batches:
        with torch.cuda.stream(side):
            ready = prepare(batch)
        if pending is not None:
            yield pending
        main = torch.cuda.current_stream(device)
        main.wait_stream(side)
        for t in ready[:2]:  # made on the side stream, used on the main one: not recycled before it is done
            if t.is_cuda:
                t.record_stream(main)
        pending = ready
    if pending is not None:
        yield pending
