"""Checkpoints: round trip, atomic write with a previous copy, corruption detection and fallback, lookup."""

from __future__ import annotations

import json

import pytest
import torch

from resnetlab.training import checkpoint as ckpt
from resnetlab.training.checkpoint import (
    CheckpointError,
    find_checkpoint,
    previous_path,
    read_checkpoint,
    read_latest,
    save_checkpoint,
)


def _tensors(scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.conv.weight": torch.randn(4, 3, 3, 3, generator=g) * scale,
        "model.bn.num_batches_tracked": torch.tensor(7),
        "model.fc.bias": torch.randn(3, generator=g).to(torch.bfloat16),
        "rng.torch": torch.get_rng_state(),
        "empty": torch.zeros(0),
    }


META = {"arch": "resnet20", "classes": ["a", "b", "c"], "epoch": 3, "best_acc": 0.5, "nested": {"k": [1, 2]}}


def test_round_trip_keeps_tensors_and_meta(tmp_path):
    path = save_checkpoint(tmp_path / "ck" / "last.safetensors", _tensors(), META)
    assert path.is_file()
    tensors, meta = read_checkpoint(path)
    assert meta == META
    expected = _tensors()
    assert set(tensors) == set(expected)
    for k, v in expected.items():
        assert tensors[k].dtype == v.dtype and torch.equal(tensors[k], v), k
    # reading a subset by prefix
    only_model, _ = read_checkpoint(path, prefixes=("model.",))
    assert set(only_model) == {k for k in expected if k.startswith("model.")}
    assert ckpt.strip_prefix(tensors, "model.").keys() == {"conv.weight", "bn.num_batches_tracked", "fc.bias"}


def test_atomic_write_keeps_the_previous_as_prev(tmp_path):
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, _tensors(1.0), {"epoch": 1})
    save_checkpoint(path, _tensors(2.0), {"epoch": 2})
    prev = previous_path(path)
    assert prev.name == "last.prev.safetensors"
    assert read_checkpoint(path)[1] == {"epoch": 2}
    assert read_checkpoint(prev)[1] == {"epoch": 1}
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind
    save_checkpoint(tmp_path / "best.safetensors", _tensors(), {"epoch": 1}, keep_previous=False)
    save_checkpoint(tmp_path / "best.safetensors", _tensors(), {"epoch": 2}, keep_previous=False)
    assert not previous_path(tmp_path / "best.safetensors").exists()


def test_a_failed_write_leaves_the_existing_checkpoint_untouched(tmp_path, monkeypatch):
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, _tensors(), {"epoch": 1})

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(path, _tensors(2.0), {"epoch": 2})
    monkeypatch.undo()
    assert not previous_path(path).exists()
    assert read_checkpoint(path)[1] == {"epoch": 1}
    assert not list(tmp_path.glob(".*tmp*"))


def _corrupt_truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt_flip_byte(path):
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # inside the tensor data, after the header
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("corrupt, fragment", [(_corrupt_truncate, "truncated"), (_corrupt_flip_byte, "corrupt")])
def test_damaged_checkpoint_is_detected_and_read_latest_falls_back(tmp_path, corrupt, fragment):
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, _tensors(1.0), {"epoch": 1})
    save_checkpoint(path, _tensors(2.0), {"epoch": 2})
    corrupt(path)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    assert str(path) in str(err.value) and fragment in str(err.value)
    logged = []
    tensors, meta, used = read_latest(path, log=logged.append)
    assert used == previous_path(path)
    assert meta == {"epoch": 1}
    assert torch.equal(tensors["model.conv.weight"], _tensors(1.0)["model.conv.weight"])
    assert len(logged) == 1 and "last.prev.safetensors" in logged[0] and "warning" in logged[0]


def test_read_latest_without_prev_raises(tmp_path):
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, _tensors(), {"epoch": 1})
    _corrupt_flip_byte(path)
    with pytest.raises(CheckpointError, match="corrupt"):
        read_latest(path, log=lambda m: None)


def test_not_a_safetensors_file_gives_a_clear_error(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_text("this is not a checkpoint\n")
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    msg = str(err.value)
    assert str(path) in msg and "not a safetensors file" in msg and "\n" not in msg


def test_a_foreign_safetensors_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="not a resnetlab checkpoint"):
        read_checkpoint(path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        read_checkpoint(tmp_path / "nope.safetensors")


def test_find_checkpoint_in_a_run_dir(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(CheckpointError, match="no such run directory"):
        find_checkpoint(run)
    run.mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        find_checkpoint(run)
    last = save_checkpoint(run / "checkpoints" / "last.safetensors", _tensors(), {})
    assert find_checkpoint(run) == last  # no best yet: last
    best = save_checkpoint(run / "checkpoints" / "best.safetensors", _tensors(), {})
    assert find_checkpoint(run) == best
    assert find_checkpoint(run, "last") == last
    assert find_checkpoint(last) == last  # a file is taken as is
    flat = save_checkpoint(tmp_path / "flat" / "best.safetensors", _tensors(), {})
    assert find_checkpoint(tmp_path / "flat") == flat


def test_optimizer_state_round_trip(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors, info = ckpt.flatten_optimizer(opt)
    path = save_checkpoint(tmp_path / "o.safetensors", tensors, {"optimizer": info})
    loaded, meta = read_checkpoint(path)
    fresh = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.5)
    fresh.load_state_dict(ckpt.unflatten_optimizer(loaded, meta["optimizer"]))
    a, b = opt.state_dict(), fresh.state_dict()
    # JSON turns AdamW's betas tuple into a list; the values are what matters
    assert json.loads(json.dumps(a["param_groups"])) == json.loads(json.dumps(b["param_groups"]))
    for pid, st in a["state"].items():
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["state"][pid][k])), (pid, k)
