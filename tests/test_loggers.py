"""Loggers and callbacks (issue 16, point 1): metrics.csv / steps.csv, TensorBoard event files read back, W&B and
MLflow adapters against fake modules, the API's callbacks, resume without duplicated rows."""

from __future__ import annotations

import csv
import importlib.machinery
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_one_line_error, run_cli, tiny_options
from resnetlab.training.loggers import STEP_COLUMNS, RunLoggers
from tiny_fit import trainer

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def _data():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(48, 1, 4, 4), dtype=np.uint8), rng.integers(0, 3, size=48)


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


class Recorder:
    def __init__(self):
        self.steps, self.epochs = [], []

    def on_step_end(self, step, values):
        self.steps.append((step, values))

    def on_epoch_end(self, epoch, metrics):
        self.epochs.append((epoch, metrics))


def test_csv_tensorboard_and_callbacks_get_every_log_every_step_and_every_epoch(tmp_path):
    x, y = _data()
    out = tmp_path / "run"
    rec, plain = Recorder(), []
    # 48 samples / batch 8: 6 steps an epoch, 12 in all; every 4th step logged; clipping computes the grad norm
    t = trainer(out, x, y, 8, epochs=2, lr=0.1, weight_decay=0.0, loggers="tensorboard", log_every=4, grad_clip=100.0)
    t.callbacks = [rec, lambda epoch, metrics: plain.append(epoch)]
    t.fit()

    steps = _rows(out / "steps.csv")
    assert list(steps[0]) == list(STEP_COLUMNS)
    assert [int(r["step"]) for r in steps] == [4, 8, 12]
    for r in steps:
        assert float(r["loss"]) > 0 and float(r["lr"]) > 0 and float(r["samples_per_s"]) > 0
        assert float(r["grad_norm"]) > 0
    assert [float(r["epoch"]) for r in steps] == pytest.approx([4 / 6, 8 / 6, 2.0], abs=1e-3)
    # the callbacks got the same values as the CSV
    assert [s for s, _ in rec.steps] == [4, 8, 12]
    assert [v["loss"] for _, v in rec.steps] == [float(r["loss"]) for r in steps]
    assert [v["grad_norm"] for _, v in rec.steps] == [float(r["grad_norm"]) for r in steps]

    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e for e, _ in rec.epochs] == [1, 2] and plain == [1, 2]
    for (_, m), r in zip(rec.epochs, records):
        assert m == {**r, "step": 6 * r["epoch"]}
    table = _rows(out / "metrics.csv")
    assert [float(r["train_loss"]) for r in table] == [r["train_loss"] for r in records]
    assert list(table[0]) == list(records[0])

    tb = out / "tensorboard"
    loss = _scalars(tb, "train/loss")
    assert [s for s, _ in loss] == [4, 8, 12]
    assert [v for _, v in loss] == pytest.approx([float(r["loss"]) for r in steps], rel=1e-6)
    epoch_loss = _scalars(tb, "epoch/train_loss")
    assert [s for s, _ in epoch_loss] == [6, 12]
    assert [v for _, v in epoch_loss] == pytest.approx([r["train_loss"] for r in records], rel=1e-6)
    assert len(_scalars(tb, "train/grad_norm")) == 3


def test_resume_keeps_rows_once_and_drops_what_a_killed_session_logged_past_its_checkpoint(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    x, y = _data()
    out = tmp_path / "run"
    trainer(out, x, y, 8, epochs=1, lr=0.1, weight_decay=0.0, loggers="tensorboard", log_every=4).fit()
    # a session killed after logging step 9 but before its next checkpoint (last holds step 6)
    with open(out / "steps.csv", "a") as f:
        f.write("9,1.5,0.5,0.1,100.0,\n")
    with SummaryWriter(str(out / "tensorboard")) as w:
        w.add_scalar("train/loss", 0.5, 9)

    trainer(out, x, y, 8, epochs=2, lr=0.1, weight_decay=0.0, loggers="tensorboard", log_every=4, resume=True).fit()
    assert [int(r["step"]) for r in _rows(out / "steps.csv")] == [4, 8, 12]
    assert [int(r["epoch"]) for r in _rows(out / "metrics.csv")] == [1, 2]
    assert [s for s, _ in _scalars(out / "tensorboard", "train/loss")] == [4, 8, 12]
    assert [s for s, _ in _scalars(out / "tensorboard", "epoch/train_loss")] == [6, 12]


def _fake_module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    for k, v in attrs.items():
        setattr(mod, k, v)
    return mod


def test_wandb_and_mlflow_adapters_send_steps_epochs_and_config_to_the_installed_modules(tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, values, step):
            calls.append(("wandb.log", step, values))

        def finish(self):
            calls.append(("wandb.finish",))

    def init(**kw):
        calls.append(("wandb.init", kw))
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", _fake_module("wandb", init=init))
    monkeypatch.setitem(sys.modules, "mlflow", _fake_module(
        "mlflow", start_run=lambda **kw: calls.append(("mlflow.start_run", kw)),
        log_params=lambda p: calls.append(("mlflow.log_params", p)),
        log_metrics=lambda m, step: calls.append(("mlflow.log_metrics", step, m)),
        end_run=lambda: calls.append(("mlflow.end_run",))))
    x, y = _data()
    out = tmp_path / "myrun"
    trainer(out, x, y, 8, epochs=1, lr=0.1, weight_decay=0.0, loggers="wandb,mlflow", log_every=3).fit()

    kinds = [c[0] for c in calls]
    assert kinds[:3] == ["wandb.init", "mlflow.start_run", "mlflow.log_params"]
    assert kinds[-2:] == ["wandb.finish", "mlflow.end_run"]
    init_kw = calls[0][1]
    assert init_kw["name"] == "myrun" and init_kw["config"]["log_every"] == 3
    assert calls[1][1] == {"run_name": "myrun"} and calls[2][1]["lr"] == 0.1
    wandb_steps = [(c[1], sorted(c[2])) for c in calls if c[0] == "wandb.log"]
    assert [s for s, _ in wandb_steps] == [3, 6, 6]  # two step logs, then the epoch at its last step
    assert "train/loss" in wandb_steps[0][1] and "epoch/train_loss" in wandb_steps[2][1]
    mlflow_steps = [(c[1], c[2]) for c in calls if c[0] == "mlflow.log_metrics"]
    assert [s for s, _ in mlflow_steps] == [3, 6, 6] and "epoch/train_acc" in mlflow_steps[2][1]


def test_a_logger_whose_package_is_missing_or_unknown_is_one_line_before_any_data_is_read(tmp_path, capsys,
                                                                                          monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    code, _, err = run_cli(capsys, "train", "--data", tmp_path / "nothing-here", "--log", "csv,tensorboard")
    assert code != 0
    assert_one_line_error(err, "--log tensorboard", "tensorboard package", "pip install")
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ValueError, match="--log wandb needs the wandb package"):
        RunLoggers.open("wandb", tmp_path, every=1)
    code, _, err = run_cli(capsys, "train", "--data", tmp_path / "nothing-here", "--log", "csv,tensorbored")
    assert code != 0
    assert_one_line_error(err, "tensorbored", "allowed")


def test_api_train_passes_callbacks_and_refuses_one_without_the_methods(tmp_path, tiny_data):
    import resnetlab

    with pytest.raises(ValueError, match="neither on_step_end nor on_epoch_end"):
        resnetlab.train(str(tiny_data), callbacks=[object()], log=lambda m: None, **tiny_options(tmp_path))
    rec = Recorder()
    result = resnetlab.train(str(tiny_data), callbacks=rec, log=lambda m: None,
                             **tiny_options(tmp_path, epochs=1, log_every=1))
    n_steps = len(_rows(result.run_dir / "steps.csv"))
    assert n_steps >= 2 and [s for s, _ in rec.steps] == list(range(1, n_steps + 1))
    assert [e for e, _ in rec.epochs] == [1] and rec.epochs[0][1]["val_acc"] >= 0
