"""Loading for the stages' DataLoaders: the crop stream that training, evaluation and predict
read crops through, and the worker settings every stage's loader shares.

`CropStream` reads crop bytes straight from the catalog's Parquet shards (one row group at a
time, never the whole table) in DataLoader workers, with a per-worker shuffle buffer and optional
class-balanced repeat factors. The order is a function of (seed, epoch), so a resumed run sees
the same batches.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from models.expert import Transforms
from storage.layout import DataRoot
from storage.shards import iter_row_groups

Unit = tuple[str, list[str], list[int]]  # (Parquet file, feature_ids, labels) of one file's selected crops


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


# ---------------------------------------------------------------- data


class CropStream(IterableDataset):
    """(pixels, label, worker) from crop bytes in the catalog's Parquet files.

    Each epoch, the files' selected rows are cut into pieces and dealt to the workers by size (an
    order drawn from (seed, epoch)), so workers get equal shares; each worker reads one row group
    at a time (only `feature_id` and `crop`), keeps its rows, repeats each by its class repeat
    factor (train) and yields through a shuffle buffer. `skip` (worker -> samples) drops the
    first samples of each worker's stream undecoded: resuming mid-epoch replays nothing, since
    the trainer counts what each worker delivered (the `worker` item)."""

    PIECES_PER_WORKER = 4  # finer pieces balance better; each costs one more read of its row group

    def __init__(self, home: str, units: list[Unit], transforms: Transforms, *,
                 train: bool, balance: str = "none", shuffle_buffer: int = 1024, seed: int = 0):
        self.home = home
        self.units = units
        self.transforms = transforms
        self.train = train
        self.shuffle_buffer = shuffle_buffer if train else 1
        self.seed = seed
        self.epoch = 0
        self.skip: dict[int, int] = {}
        labels = np.array([lab for _, _, labels in units for lab in labels], dtype=np.int64)
        factors = repeat_factors(labels, balance) if train else np.ones(len(labels))
        self.factors, start = [], 0
        for _, ids, _ in units:
            self.factors.append(factors[start:start + len(ids)])
            start += len(ids)
        self.crops = len(labels)

    def __len__(self) -> int:
        return self.crops

    def deal(self, workers: int) -> list[list[tuple[int, slice]]]:
        """Per worker, the (unit, row slice) pieces it reads this epoch: largest piece to the least
        loaded worker. Deterministic for (seed, epoch, workers)."""
        size = max(1, math.ceil(self.crops / (workers * self.PIECES_PER_WORKER)))
        pieces = [(u, slice(k, k + size)) for u, (_, ids, _) in enumerate(self.units) for k in range(0, len(ids), size)]
        if self.train:
            pieces = [pieces[i] for i in np.random.default_rng((self.seed, self.epoch)).permutation(len(pieces))]
        else:  # eval: keep file order; workers still get equal shares
            pieces = sorted(pieces, key=lambda p: (p[0], p[1].start))
        load, out = [0] * workers, [[] for _ in range(workers)]
        for u, sl in sorted(pieces, key=lambda p: -len(self.units[p[0]][1][p[1]])):
            w = int(np.argmin(load))
            out[w].append((u, sl))
            load[w] += len(self.units[u][1][sl])
        return out

    def _rows(self, pieces: list[tuple[int, slice]]):
        root = DataRoot(self.home)
        for u, sl in pieces:
            path, ids, labels = self.units[u]
            wanted = dict(zip(ids[sl], zip(labels[sl], self.factors[u][sl])))
            rng = np.random.default_rng((self.seed, self.epoch, u, sl.start))
            for t in iter_row_groups(root, path, ["feature_id", "crop"]):
                blobs = t.column("crop").combine_chunks().field("bytes")
                for i, fid in enumerate(t.column("feature_id").to_pylist()):
                    if fid not in wanted:
                        continue
                    label, factor = wanted[fid]
                    copies = int(factor) + int(rng.random() < factor - int(factor)) if self.train else 1
                    for _ in range(copies):
                        yield blobs[i].as_py(), label

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        pieces = self.deal(workers)[worker]
        rng = np.random.default_rng((self.seed, self.epoch, 10_000 + worker))
        skip = self.skip.get(worker, 0)
        share = sum(len(self.units[u][1][sl]) for u, sl in pieces)
        capacity = max(1, min(self.shuffle_buffer, share // 2))  # a small share is not read whole before yielding
        buffer: list[tuple[bytes, int]] = []
        n = 0

        def emit(item):
            nonlocal n
            n += 1
            if n <= skip:
                return None
            data, label = item
            img = Image.open(io.BytesIO(data))
            img.draft("RGB", (self.transforms.size, self.transforms.size))  # JPEG: decode at a reduced scale
            index = (self.epoch << 40) + (worker << 32) + n  # a distinct augmentation per sample, worker, epoch
            return self.transforms(img.convert("RGB"), index=index), label, worker

        for item in self._rows(pieces):
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


def make_loader(stream: CropStream, batch_size: int, workers: int, pin: bool = False) -> DataLoader:
    return DataLoader(stream, batch_size=batch_size, num_workers=workers, prefetch_factor=4 if workers else None,
                      worker_init_fn=worker_init if workers else None, pin_memory=pin)
