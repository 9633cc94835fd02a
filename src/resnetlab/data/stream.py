"""The streaming path: for data sets too large to cache, decode files on the fly in DataLoader workers.

``LazyArray`` looks like the cache's array (``len``, ``shape``, ``dtype``, fancy indexing), so the loader, the
pipeline (with the same batched augmentations on the device) and the report work unchanged; the
:class:`~resnetlab.data.loader.ArrayLoader` hands batches of a ``LazyArray`` to a ``torch.utils.data.DataLoader``
with worker processes instead of its prefetch thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np

from resnetlab.data.errors import DataError

log = logging.getLogger(__name__)


class LazyArray:
    """``(N, *sample_shape)`` samples decoded from ``files`` when indexed; nothing is held in memory.

    A file that fails to decode at this point (it passed the header check at scan time) becomes an all-zero
    sample with a warning, so one bad file cannot stop a long run; strict mode raises instead.
    """

    def __init__(self, files: Sequence[str], decode: Callable[[str], np.ndarray], sample_shape: tuple,
                 dtype, *, strict: bool = False):
        self.files = list(files)
        self.decode = decode
        self.sample_shape = tuple(sample_shape)
        self.dtype = np.dtype(dtype)
        self.strict = strict

    def __len__(self) -> int:
        return len(self.files)

    @property
    def shape(self) -> tuple:
        return (len(self.files), *self.sample_shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def _one(self, i: int) -> np.ndarray:
        try:
            return self.decode(self.files[i])
        except DataError as e:
            if self.strict:
                raise
            log.warning("streaming: %s; using a blank sample", e)
            return np.zeros(self.sample_shape, self.dtype)

    def __getitem__(self, idx):
        if isinstance(idx, (int, np.integer)):
            return self._one(int(idx))
        idx = np.arange(len(self))[idx] if isinstance(idx, slice) else np.asarray(idx)
        out = np.empty((len(idx), *self.sample_shape), self.dtype)
        for j, i in enumerate(idx.tolist()):
            out[j] = self._one(i)
        return out

    def __array__(self, dtype=None, copy=None):
        arr = self[np.arange(len(self))]
        return arr.astype(dtype) if dtype is not None else arr


class _BatchDataset:
    """A map-style dataset whose items are whole batches (index arrays in, stacked samples out)."""

    def __init__(self, x: LazyArray):
        self.x = x

    def __getitem__(self, idx) -> np.ndarray:
        return self.x[np.asarray(idx)]


def stream_batches(x: LazyArray, batches: list, workers: int):
    """Yield ``(idx, x[idx])`` for each index batch, decoded by ``workers`` DataLoader processes in order."""
    import torch

    loader = torch.utils.data.DataLoader(_BatchDataset(x), batch_size=None, sampler=[b.numpy() for b in batches],
                                         num_workers=workers, persistent_workers=False,
                                         prefetch_factor=2 if workers > 0 else None)
    yield from zip(batches, loader)
