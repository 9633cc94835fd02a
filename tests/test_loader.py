"""ArrayLoader: seeded epoch order, mid-epoch resume, drop_last, distributed sharding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from resnetlab.data.loader import ArrayLoader


def _data(n: int):
    """x[i] holds i, so every yielded sample says which row it is; y[i] = i % 3."""
    x = np.arange(n, dtype=np.int64).reshape(n, 1)
    return x, np.arange(n) % 3


def _loader(n: int = 23, bs: int = 4, **kw) -> ArrayLoader:
    x, y = _data(n)
    kw.setdefault("shuffle", True)
    kw.setdefault("drop_last", False)
    return ArrayLoader(x, y, bs, **kw)


def _epoch(loader: ArrayLoader, epoch: int, start: int = 0) -> list[list[int]]:
    """The rows of each batch (sorted inside a batch: the order within a batch does not matter)."""
    out = []
    for xb, yb in loader.epoch(epoch, start):
        rows = xb[:, 0].tolist()
        assert yb.tolist() == [r % 3 for r in rows]  # labels travel with their samples
        out.append(sorted(rows))
    return out


def test_order_is_a_pure_function_of_seed_and_epoch():
    a, b = _loader(seed=5), _loader(seed=5)
    list(a.epoch(0))  # iterating other epochs first changes nothing
    _epoch(a, 7)
    assert _epoch(a, 3) == _epoch(b, 3)
    assert torch.equal(a.order(3), b.order(3))
    assert not torch.equal(a.order(3), a.order(4))
    assert not torch.equal(a.order(3), _loader(seed=6).order(3))
    assert sorted(a.order(3).tolist()) == list(range(23))  # a permutation


def test_no_shuffle_keeps_stored_order():
    loader = _loader(n=10, bs=4, shuffle=False)
    assert _epoch(loader, 0) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert _epoch(loader, 5) == _epoch(loader, 0)


@pytest.mark.parametrize("start", [0, 1, 3, 5])
def test_start_batch_resumes_with_the_same_remaining_batches(start):
    loader = _loader(n=23, bs=4, seed=1)
    full = _epoch(loader, 2)
    assert len(full) == 6
    assert _epoch(_loader(n=23, bs=4, seed=1), 2, start) == full[start:]


def test_start_batch_past_the_end_yields_nothing():
    loader = _loader(n=8, bs=4)
    assert _epoch(loader, 0, 2) == []
    assert _epoch(loader, 0, 9) == []


@pytest.mark.parametrize("n, bs", [(10, 4), (12, 4), (3, 4), (1, 1), (17, 5)])
def test_drop_last_and_len(n, bs):
    keep = _loader(n=n, bs=bs, drop_last=False)
    drop = _loader(n=n, bs=bs, drop_last=True)
    kept, dropped = _epoch(keep, 0), _epoch(drop, 0)
    assert len(keep) == len(kept) == -(-n // bs)
    assert sorted(r for b in kept for r in b) == list(range(n))
    assert len(drop) == len(dropped)
    if n >= bs:
        assert len(dropped) == n // bs
        assert all(len(b) == bs for b in dropped)
    else:  # fewer samples than one batch: one short batch rather than none
        assert dropped == [list(range(n))]


@pytest.mark.parametrize("n, world", [(23, 2), (24, 2), (10, 3)])
def test_distributed_ranks_cover_the_epoch_disjoint_apart_from_padding(n, world):
    shards = [_loader(n=n, bs=2, seed=4, rank=r, world_size=world) for r in range(world)]
    orders = [s.order(1).tolist() for s in shards]
    per_rank = -(-n // world)
    assert all(len(o) == per_rank for o in orders)  # every rank takes the same number of steps
    assert len({len(s) for s in shards}) == 1
    everything = [i for o in orders for i in o]
    assert set(everything) == set(range(n))  # together they cover the epoch
    assert len(everything) - len(set(everything)) == per_rank * world - n  # repeats only for padding
    # each rank takes its slice of the one shared permutation
    full = _loader(n=n, bs=2, seed=4).order(1)
    padded = torch.cat([full, full[: per_rank * world - n]])
    for r, o in enumerate(orders):
        assert o == padded[r::world].tolist()
    # and the yielded batches are that slice
    batches = _epoch(shards[0], 1)
    assert sorted(i for b in batches for i in b) == sorted(orders[0])


def test_bad_batch_size_is_refused():
    x, y = _data(4)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        ArrayLoader(x, y, 0, shuffle=False, drop_last=False)


def test_on_device_path_gives_the_same_batches():
    host, dev = _loader(seed=2), _loader(seed=2, on_device=True)
    assert _epoch(host, 1) == _epoch(dev, 1)


@pytest.mark.parametrize("on_device", [False, True])
def test_with_index_yields_each_samples_position_in_the_dataset(on_device):
    loader = _loader(n=23, bs=4, seed=2, on_device=on_device)
    batches = list(loader.epoch(1, 2, with_index=True))
    assert len(batches) == 4  # from batch 2 of 6
    for xb, yb, index in batches:
        assert index.dtype == torch.int64 and index.device.type == "cpu"
        assert index.tolist() == xb[:, 0].tolist()  # x[i] holds i
        assert yb.tolist() == [i % 3 for i in index.tolist()]
    assert [sorted(i.tolist()) for _, _, i in batches] == _epoch(loader, 1, 2)
