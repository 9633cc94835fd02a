"""The streaming path (decode on the fly in DataLoader workers) trains exactly like the cache."""

from __future__ import annotations

from pathlib import Path

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


def _break_after_scan(path) -> None:
    """Keep the PNG header (so the scan-time check passes) and cut the pixel data: decoding fails."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("workers", [0, 1])
def test_a_file_that_fails_to_decode_mid_run_is_skipped_and_listed_not_zeroed(tiny_data, tmp_path, workers):
    """Before: the file became an all-zero sample that kept its label, in training and validation alike."""
    from resnetlab.data.loader import ArrayLoader

    prepared = prepare_data(str(tiny_data), img_size=16, progress=False, stream=True, val_fraction=0.0,
                            log=lambda m: None)
    train = prepared.train
    bad = 4
    _break_after_scan(Path(train.files[bad]))
    loader = ArrayLoader(train.x, train.y, 5, shuffle=True, drop_last=False, seed=1, workers=workers)
    seen = []
    for epoch in range(2):
        for xb, yb, idx in loader.epoch(epoch, with_index=True):
            assert len(xb) == len(yb) == len(idx)
            assert torch.equal(yb, torch.as_tensor(train.y)[idx])  # every label still belongs to its sample
            assert all(xb[j].any() for j in range(len(xb)))  # no blank stand-in
            seen += idx.tolist()
    assert sorted(set(seen)) == [i for i in range(len(train.files)) if i != bad]
    assert [p for p, _ in train.skipped] == [train.files[bad]]  # listed once, though read in two epochs
    assert "truncated" in train.skipped[0][1] and train.files[bad] in [p for p, _ in prepared.skipped]


def test_strict_streaming_stops_at_a_file_that_fails_to_decode(tiny_data):
    from resnetlab.data.errors import DataError
    from resnetlab.data.loader import ArrayLoader

    prepared = prepare_data(str(tiny_data), img_size=16, progress=False, stream=True, val_fraction=0.0,
                            strict=True, log=lambda m: None)
    _break_after_scan(Path(prepared.train.files[2]))
    loader = ArrayLoader(prepared.train.x, prepared.train.y, 4, shuffle=False, drop_last=False, workers=0)
    with pytest.raises(DataError, match=f"{prepared.train.files[2]}: .*truncated"):
        list(loader.epoch(0))



def test_the_streaming_header_check_refuses_a_forged_sample_rate(tmp_path):
    import hostile_files
    from resnetlab.data.errors import DataError
    from resnetlab.data.prepare import _check_header

    path = tmp_path / "forged.wav"
    path.write_bytes(hostile_files.wav(600_000_000))
    with pytest.raises(DataError, match="forged.wav: header declares a sample rate of 600,000,000 Hz"):
        _check_header(str(path))
