"""The streaming path (decode on the fly in DataLoader workers) trains exactly like the cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import resnetlab
from conftest import tiny_options
from resnetlab.data.prepare import prepare_data
from resnetlab.data.stream import LazyArray
from resnetlab.training import checkpoint as ckpt


def test_lazy_array_decodes_like_the_cache(tiny_data, tmp_path):
    cached = prepare_data(str(tiny_data), img_size=16, cache_dir=str(tmp_path / "c"), progress=False,
                          log=lambda m: None)
    streamed = prepare_data(str(tiny_data), img_size=16, cache_dir=str(tmp_path / "c"), progress=False,
                            stream=True, log=lambda m: None)
    assert isinstance(streamed.train.x, LazyArray)
    assert streamed.train.x.shape == cached.train.x.shape
    idx = np.array([3, 0, 5])
    np.testing.assert_array_equal(streamed.train.x[idx], np.asarray(cached.train.x)[idx])
    np.testing.assert_array_equal(streamed.train.y, cached.train.y)


@pytest.mark.parametrize("flip_mode", ["random", "alternate"])  # alternate: the batches' sample indices agree
def test_streaming_run_equals_cached_run(tiny_data, tmp_path, flip_mode):
    runs = {}
    for stream in (False, True):
        opts = tiny_options(tmp_path / f"s{stream}", deterministic=True, workers=1, flip_mode=flip_mode)
        runs[stream] = resnetlab.train(str(tiny_data), stream=stream, **opts)
    a, _ = ckpt.read_checkpoint(runs[False].run_dir / "checkpoints" / "last.safetensors")
    b, _ = ckpt.read_checkpoint(runs[True].run_dir / "checkpoints" / "last.safetensors")
    weights = [k for k in a if k.startswith("model.")]
    assert weights and all(torch.equal(a[k], b[k]) for k in weights)


def test_streaming_skips_unreadable_headers(tiny_data, tmp_path):
    bad = tiny_data / "c0" / "broken.png"
    bad.write_bytes(b"not an image at all")
    prepared = prepare_data(str(tiny_data), img_size=16, progress=False, stream=True, log=lambda m: None)
    skipped = [p for p, _ in prepared.skipped]
    assert str(bad) in skipped
    assert str(bad) not in prepared.train.files + (prepared.val.files if prepared.val else [])
