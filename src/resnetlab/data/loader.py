"""Batches of a decoded array: index the memory-mapped cache, move each batch to the device, one batch ahead in a
thread.

The order of an epoch is a pure function of (seed, epoch), so a resumed run sees exactly the batches an
uninterrupted one would, from any batch index. Under torchrun each rank takes its own slice of that order.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch


class ArrayLoader:
    """Iterate ``(x, y)`` batches on ``device`` over arrays ``x`` (N, ...) and ``y`` (N,).

    The arrays stay where they are (host memory or the memory-mapped cache) and each batch is copied to
    ``device``; ``on_device`` copies the whole dataset to the device once instead. (Formerly ``DeviceLoader``.)

    Args:
        x, y: numpy arrays or memmaps (the decoded cache). Kept on the host unless ``on_device``.
        batch_size: per process.
        shuffle: a fresh seeded permutation each epoch; otherwise the stored order.
        drop_last: drop the last incomplete batch (training: keeps BN statistics sane).
        on_device: copy the whole dataset to the device once (fast path for GPUs when it fits).
        rank, world_size: shard for distributed training (each rank gets every world_size-th sample of
            the epoch's permutation, padded by repetition so all ranks take the same number of steps).
        workers: DataLoader worker processes when ``x`` is a streaming :class:`~resnetlab.data.stream.LazyArray`
            (files decoded on the fly); unused for the cache.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, *, shuffle: bool, drop_last: bool,
                 device: torch.device | str = "cpu", seed: int = 0, on_device: bool = False, rank: int = 0,
                 world_size: int = 1, workers: int = 2):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.x, self.y = x, np.array(y, dtype=np.int64)  # a private, writable copy of the labels
        self.n = len(self.y)
        self.batch_size = batch_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.device = torch.device(device)
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.per_rank = -(-self.n // world_size)
        from resnetlab.data.stream import LazyArray

        self.streaming = isinstance(x, LazyArray)
        self.workers = workers
        on_device = on_device and not self.streaming
        self._x_dev = torch.from_numpy(np.ascontiguousarray(x)).to(self.device) if on_device else None
        self._y_all = torch.from_numpy(self.y)
        self._y_dev = self._y_all.to(self.device) if on_device else None  # labels beside the images
        self._pin = self.device.type == "cuda"

    def __len__(self) -> int:
        if self.drop_last:
            return max(self.per_rank // self.batch_size, 1)
        return -(-self.per_rank // self.batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        """Sample indices of this rank for ``epoch``."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n, generator=g)
        else:
            perm = torch.arange(self.n)
        if self.world_size > 1:
            pad = self.per_rank * self.world_size - self.n
            if pad:
                perm = torch.cat([perm, perm[:pad]])
            perm = perm[self.rank::self.world_size]
        return perm

    def _batches(self, epoch: int, start: int) -> list[torch.Tensor]:
        perm = self.order(epoch)
        bs = self.batch_size
        if self.drop_last and len(perm) >= bs:
            perm = perm[: len(perm) // bs * bs]
        return [perm[i:i + bs] for i in range(start * bs, len(perm), bs)]

    def _fetch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Sorted reads are sequential on the memmap; the order inside a batch does not matter to SGD.
        idx = idx.sort().values
        xb = torch.from_numpy(self.x[idx.numpy()])
        yb = self._y_all[idx]
        if self._pin:
            xb, yb = xb.pin_memory(), yb.pin_memory()
        return xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True), idx

    def epoch(self, epoch: int, start_batch: int = 0, with_index: bool = False) -> Iterator[tuple[torch.Tensor, ...]]:
        """Yield the batches ``(x, y)`` of ``epoch`` from batch ``start_batch`` on (for mid-epoch resume);
        ``(x, y, index)`` with ``with_index``, ``index`` the samples' positions in the dataset (int64; on the
        device when the dataset is held there, else on the host), for augmentations that treat each image by its
        identity (alternating flips)."""
        for x, y, idx in self._epoch(epoch, start_batch):
            yield (x, y, idx) if with_index else (x, y)

    def _epoch(self, epoch: int, start_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        batches = self._batches(epoch, start_batch)
        if not batches:
            return
        if self._x_dev is not None:
            # the epoch's order goes to the device in one (pinned, asynchronous) copy; each batch is then a slice
            # of it and gathers its images and labels there: no host-to-device copy and no sync per batch
            order = torch.cat(batches)
            if self._pin:
                order = order.pin_memory()
            order = order.to(self.device, non_blocking=True)
            start = 0
            for idx in batches:
                dev_idx = order[start:start + len(idx)]
                start += len(idx)
                yield self._x_dev[dev_idx], self._y_dev[dev_idx], dev_idx
            return
        if self.streaming:
            from resnetlab.data.stream import stream_batches

            # files that fail to decode are left out of the batch with their labels (and listed in x.skipped), so
            # a batch may come back smaller; ``idx`` says which samples it holds
            for idx, xb in stream_batches(self.x, [b.sort().values for b in batches], self.workers):
                yb = self._y_all[idx]
                xb = xb if torch.is_tensor(xb) else torch.from_numpy(xb)  # DataLoader converts arrays itself
                if self._pin:  # a copy from pageable memory is synchronous, whatever non_blocking says
                    xb, yb = xb.pin_memory(), yb.pin_memory()
                yield xb.to(self.device, non_blocking=self._pin), yb.to(self.device, non_blocking=self._pin), idx
            return
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(self._fetch, batches[0])
            for nxt in batches[1:]:
                ready = pending.result()
                pending = pool.submit(self._fetch, nxt)
                yield ready
            yield pending.result()

    def __iter__(self):
        return self.epoch(0)
