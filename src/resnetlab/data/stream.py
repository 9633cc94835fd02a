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

from resnetlab.data.cache import failure_reason
from resnetlab.data.errors import DataError

log = logging.getLogger(__name__)


class LazyArray:
    """``(N, *sample_shape)`` samples decoded from ``files`` when indexed; nothing is held in memory.

    A file that fails to decode at this point (it passed the header check at scan time) is skipped, as the cache
    skips it: :meth:`take` leaves its row out and says why, the loader drops its label with it, and
    :meth:`note_failures` lists the file once in ``skipped`` (the dataset's own list, so the run report names it).
    Indexing with an array leaves such rows out too. Strict mode raises ``DataError`` at the first one instead.
    """

    def __init__(self, files: Sequence[str], decode: Callable[[str], np.ndarray], sample_shape: tuple,
                 dtype, *, strict: bool = False, skipped: list[tuple[str, str]] | None = None):
        self.files = list(files)
        self.decode = decode
        self.sample_shape = tuple(sample_shape)
        self.dtype = np.dtype(dtype)
        self.strict = strict
        self.skipped = [] if skipped is None else skipped  # (path, reason), shared with the ArrayDataset
        self._failed: set[int] = set()

    def __len__(self) -> int:
        return len(self.files)

    @property
    def shape(self) -> tuple:
        return (len(self.files), *self.sample_shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def take(self, idx) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
        """Decode the samples at ``idx``: ``(samples that decoded, their indices, [(index, reason)] of the others)``.

        Records nothing (it runs in DataLoader workers); pass the failures to :meth:`note_failures`. In strict mode
        the first failure raises ``DataError`` naming the file. A decoder that returns the wrong shape or dtype is a
        bug, and raises ``ValueError``.
        """
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        out = np.empty((len(idx), *self.sample_shape), self.dtype)
        keep = np.ones(len(idx), dtype=bool)
        failures = []
        for j, i in enumerate(idx.tolist()):
            path = self.files[i]
            try:
                sample = np.asarray(self.decode(path))
            except Exception as e:  # whatever a damaged file provokes, as the cache catches it
                reason = failure_reason(path, e)
                if self.strict:
                    raise DataError(f"{path}: {reason}") from None
                keep[j] = False
                failures.append((i, reason))
                continue
            if sample.shape != self.sample_shape or sample.dtype != self.dtype:
                raise ValueError(f"decode returned {sample.dtype} {sample.shape} for {path}; expected "
                                 f"{self.dtype} {self.sample_shape}")
            out[j] = sample
        return (out, idx, failures) if keep.all() else (out[keep], idx[keep], failures)

    def note_failures(self, failures: Sequence[tuple[int, str]]) -> None:
        """List each newly failed file in ``skipped`` (once, however often it is read) with a warning."""
        for i, reason in failures:
            i = int(i)
            if i not in self._failed:
                self._failed.add(i)
                self.skipped.append((self.files[i], reason))
                log.warning("streaming: skipped %s: %s", self.files[i], reason)

    def __getitem__(self, idx):
        if isinstance(idx, (int, np.integer)):
            x, _, failures = self.take([int(idx)])
            self.note_failures(failures)
            if failures:
                raise DataError(f"{self.files[int(idx)]}: {failures[0][1]}")
            return x[0]
        idx = np.arange(len(self))[idx] if isinstance(idx, slice) else np.asarray(idx)
        x, _, failures = self.take(idx)
        self.note_failures(failures)
        return x

    def __array__(self, dtype=None, copy=None):
        arr = self[np.arange(len(self))]
        return arr.astype(dtype) if dtype is not None else arr


class _BatchDataset:
    """A map-style dataset whose items are whole batches: index arrays in, :meth:`LazyArray.take` out."""

    def __init__(self, x: LazyArray):
        self.x = x

    def __getitem__(self, idx) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
        return self.x.take(idx)


def stream_batches(x: LazyArray, batches: list, workers: int):
    """Yield ``(idx, x[idx])`` for each index batch, decoded by ``workers`` DataLoader processes in order.

    Files that fail to decode are left out of both (and listed in ``x.skipped``); a batch in which every file
    fails raises ``DataError``, since a step needs at least one sample.
    """
    import torch

    loader = torch.utils.data.DataLoader(_BatchDataset(x), batch_size=None, sampler=[b.numpy() for b in batches],
                                         num_workers=workers, persistent_workers=False,
                                         prefetch_factor=2 if workers > 0 else None)
    for batch, (xb, kept, failures) in zip(batches, loader):
        x.note_failures(failures)
        if not len(kept):
            i, reason = failures[0]
            raise DataError(f"all {len(batch)} files of a batch failed to decode (first: {x.files[int(i)]}: "
                            f"{reason}); remove the broken files or use the cache, which skips them up front")
        yield torch.as_tensor(kept), xb
