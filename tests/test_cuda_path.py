"""The CUDA path (issue 18): what can be checked on the CPU, and the same checks on a GPU (marked gpu).

The CPU tests stand in for the device where they can: a batch on the ``meta`` device plays a CUDA batch for the
generator-device rule, a patched ``torch.Tensor.item``/``__float__``/``tolist``/``__bool__`` counts the host syncs
a GPU would pay, and a checkpoint given a 16-byte generator state plays one written on a GPU. The gpu-marked tests
run where CUDA is (``benchmarks/gpu_all.py`` runs them first on a lent GPU) and are skipped elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import tiny_options
from resnetlab.data import augment
from resnetlab.models import create_model
from resnetlab.training.checkpoint import read_checkpoint

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _quiet(msg: str) -> None:
    pass


class SyncCounter:
    """Counts the ways a device tensor is read on the host (each one a sync on a GPU)."""

    NAMES = ("item", "__float__", "__int__", "__bool__", "tolist", "cpu")

    def __init__(self, monkeypatch):
        self.calls: dict[str, int] = dict.fromkeys(self.NAMES, 0)
        self.paused = False
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counted(self_t, *a, _name=name, _orig=original, **k):
                self.calls[_name] += not self.paused
                return _orig(self_t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, counted)

    @property
    def total(self) -> int:
        return sum(self.calls.values())


# --- item 2: --deterministic with fastresnet ------------------------------------------------------------------


def test_fastresnet_global_max_pool_matches_adaptive_max_pool():
    """The head pools with ``amax`` (a deterministic backward on CUDA): the same output as AdaptiveMaxPool2d(1)."""
    model = create_model("fastresnet_s", num_classes=10).eval()
    assert not any(isinstance(m, nn.AdaptiveMaxPool2d) for m in model.modules())
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    feats = model.forward_features(x)
    torch.testing.assert_close(model.avgpool(feats), nn.AdaptiveMaxPool2d(1)(feats), rtol=0, atol=0)
    reference = model.fc(torch.flatten(nn.AdaptiveMaxPool2d(1)(feats), 1)) * model.logit_scale
    torch.testing.assert_close(model(x), reference, rtol=0, atol=0)


# --- item 4: a CPU generator with a batch on another device ---------------------------------------------------


def test_image_augmentations_draw_on_the_generators_device(monkeypatch):
    """CUDA's ``torch.rand`` refuses a generator of another device; the CPU's does not check, so a wrapped
    ``torch.rand`` enforces that rule here, with a batch on the ``meta`` device standing in for a CUDA batch."""
    original = torch.rand

    def strict_rand(*size, generator=None, device=None, **kw):
        if generator is not None and device is not None and torch.device(device).type != generator.device.type:
            raise RuntimeError(f"Expected a '{torch.device(device).type}' device type for generator")
        return original(*size, generator=generator, device=device, **kw)

    monkeypatch.setattr(augment.torch, "rand", strict_rand)
    gen = torch.Generator().manual_seed(0)
    x = torch.zeros(4, 3, 8, 8, device="meta")
    assert augment.random_crop(x, 2, gen).device.type == "meta"
    assert augment.random_flip(x, gen).device.type == "meta"
    assert augment.cutout(x, 3, gen).device.type == "meta"
    assert augment.random_resized_crop(x, (6, 6), generator=gen).device.type == "meta"


# --- item 5: the audio report's pipeline device -----------------------------------------------------------------


def test_audio_pipeline_says_where_it_is():
    from resnetlab.data.audio_pipeline import AudioPipeline

    pipe = AudioPipeline(num_classes=3, features="mfcc")
    assert pipe.device == torch.device("cpu")
    assert pipe.to("meta").device == torch.device("meta")  # the report featurises where the pipeline is


# --- item 6: CUBLAS_WORKSPACE_CONFIG, bf16 detection ------------------------------------------------------------


def test_cublas_workspace_is_set_before_the_device_is_picked(monkeypatch, tmp_path, tiny_data):
    """cuBLAS reads CUBLAS_WORKSPACE_CONFIG once, at its first use: --deterministic sets it before anything can
    touch CUDA (the device pick is the first thing that may)."""
    from resnetlab import api

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seen = []

    def pick_device(name):
        seen.append(os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
        raise KeyboardInterrupt  # enough: stop before any data is read

    monkeypatch.setattr(api, "pick_device", pick_device)
    from resnetlab.training.config import TrainConfig, make_config

    cfg = make_config(TrainConfig, {**tiny_options(tmp_path), "data": str(tiny_data), "deterministic": True})
    with pytest.raises(KeyboardInterrupt):
        api.prepare_run(cfg, log=_quiet)
    assert seen == [":4096:8"]


def test_auto_precision_on_cuda_asks_for_native_bf16(monkeypatch):
    """Pre-Ampere GPUs emulate bf16 (slower than fp16): ``auto`` must not count that as support."""
    from resnetlab.training import precision

    asked = []

    def is_bf16_supported(including_emulation=True):
        asked.append(including_emulation)
        return including_emulation  # an emulating GPU: yes only when emulation counts

    monkeypatch.setattr(precision.torch.cuda, "is_bf16_supported", is_bf16_supported)
    prec = precision.pick_precision(torch.device("cuda"), "auto")
    assert asked == [False] and prec.dtype == torch.float16


# --- speed-perturbation kernel ---------------------------------------------------------------------------------


def test_resample_keeps_its_kernel_on_the_device():
    from resnetlab.data import audio

    wave = torch.randn(2, 1600)
    audio._device_kernel.cache_clear()
    first = audio.resample(wave, 11, 10)
    second = audio.resample(wave, 11, 10)
    info = audio._device_kernel.cache_info()
    assert (info.misses, info.hits) == (1, 1)  # built and moved once, then reused
    torch.testing.assert_close(first, second, rtol=0, atol=0)


# --- item 1: the augmentation generator's state across device types ------------------------------------------


def test_resume_with_an_augmentation_state_from_another_device_type(tmp_path):
    """A CUDA generator's state is 16 bytes, a CPU one's 5,056: a run resumed on another device type re-seeds its
    augmentation stream (and says so) instead of stopping with "RNG state is wrong size"."""
    from resnetlab.training import checkpoint as ckpt

    _tiny_trainer(tmp_path, epochs=1).fit()
    last = tmp_path / "run" / "checkpoints" / "last.safetensors"
    tensors, meta = read_checkpoint(last)
    assert tensors["rng.aug"].numel() == torch.Generator().get_state().numel()
    tensors["rng.aug"] = torch.arange(16, dtype=torch.uint8)  # what a CUDA generator saves
    ckpt.save_checkpoint(last, tensors, meta)
    said = []
    resumed = _tiny_trainer(tmp_path, epochs=2, resume=True, log=said.append)
    resumed.fit()
    assert any("augmentation stream was saved on another device type" in m for m in said)
    assert read_checkpoint(last)[1]["epoch"] == 2


# --- item 6: the fp16 GradScaler's state travels with checkpoints/last -----------------------------------------


def test_grad_scaler_state_is_saved_and_restored(tmp_path, monkeypatch):
    """fp16 needs CUDA, so a CPU GradScaler stands in (same state_dict): its scale, doubled after every step here
    (growth_interval 1, no overflow in fp32), must continue from where it was, not restart at init_scale."""
    from resnetlab.training.precision import Precision

    monkeypatch.setattr(Precision, "scaler", lambda self: torch.amp.GradScaler("cpu", init_scale=16.0,
                                                                                growth_interval=1))
    _tiny_trainer(tmp_path, epochs=1).fit()
    last = tmp_path / "run" / "checkpoints" / "last.safetensors"
    assert read_checkpoint(last)[1]["scaler"]["scale"] == 16.0 * 2 ** 12
    _tiny_trainer(tmp_path, epochs=2, resume=True).fit()
    meta = read_checkpoint(last)[1]
    assert meta["step"] == 24 and meta["scaler"]["scale"] == 16.0 * 2 ** 24


# --- the syncs ------------------------------------------------------------------------------------------------


def _tiny_trainer(tmp_path: Path, log=_quiet, **cfg):
    """The BatchNorm-free tiny fit of tests/tiny_fit.py as a Trainer (48 samples, batch 4: 12 steps an epoch)."""
    import tiny_fit
    from resnetlab.data.loader import ArrayLoader
    from resnetlab.training.config import TrainConfig, make_config
    from resnetlab.training.engine import Trainer
    from resnetlab.training.precision import pick_precision

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(48, 1, 4, 4), dtype=np.uint8)
    y = rng.integers(0, 3, size=48)
    options = {"batch_size": 4, "epochs": 2, "lr": 0.1, "weight_decay": 1e-3, "warmup_epochs": 0.0,
               "label_smoothing": 0.0, "grad_norm_every": 0, "quiet": True, "out": str(tmp_path / "run"), **cfg}
    loader = ArrayLoader(x, y, 4, shuffle=True, drop_last=True, seed=0)
    prec = pick_precision(torch.device("cpu"), "fp32", False)
    return Trainer(tiny_fit.tiny_model(), tiny_fit.Identity(), loader, None, make_config(TrainConfig, options),
                   tmp_path / "run", {}, prec, log=log)


def test_a_training_step_reads_nothing_back_from_the_device(tmp_path, monkeypatch):
    """Loss and correct counts are added up on the device and read once per epoch; the non-finite check reads one
    flag every FINITE_CHECK_EVERY steps. Before: a finiteness test and two float() per step (3 syncs a step)."""
    from resnetlab.training import engine

    trainer = _tiny_trainer(tmp_path)
    counter = SyncCounter(monkeypatch)
    in_steps = []
    original = engine.Trainer.train_step

    def train_step(self, *a):
        before = counter.total
        out = original(self, *a)
        in_steps.append(counter.total - before)
        return out

    def uncounted(method):  # a checkpoint is moved to the host tensor by tensor: once per save, not counted here
        def run(self, *a):
            counter.paused = True
            method(self, *a)
            counter.paused = False

        return run

    monkeypatch.setattr(engine.Trainer, "train_step", train_step)
    monkeypatch.setattr(engine.Trainer, "save_last", uncounted(engine.Trainer.save_last))
    monkeypatch.setattr(engine.Trainer, "save_best", uncounted(engine.Trainer.save_best))
    trainer.fit()
    monkeypatch.undo()
    assert len(in_steps) == 24 and sum(in_steps) == 0
    # the loop around the steps: at each epoch's end the sums, the loss flag and the weights' finiteness, one read
    # each (the flag's every-20-steps read falls on no step here: 12 steps after the first epoch's)
    assert counter.total == 2 * 3, str(counter.calls)
    records = trainer.history
    assert [r["epoch"] for r in records] == [1, 2] and 0 < records[-1]["train_loss"] < 2


def test_epoch_loss_and_accuracy_match_per_step_reads(tmp_path, monkeypatch):
    """The device-side sums give the epoch's train_loss / train_acc that per-step host reads give."""
    from resnetlab.training import engine

    trainer = _tiny_trainer(tmp_path, epochs=1)
    per_step = []
    original = engine.Trainer.train_step

    def train_step(self, *a):
        loss_sum, correct, n = original(self, *a)
        per_step.append((float(loss_sum), float(correct), n))
        return loss_sum, correct, n

    monkeypatch.setattr(engine.Trainer, "train_step", train_step)
    trainer.fit()
    seen = sum(n for *_, n in per_step)
    record = trainer.history[0]
    assert record["train_loss"] == pytest.approx(sum(s[0] for s in per_step) / seen, rel=1e-12)
    assert record["train_acc"] == pytest.approx(sum(s[1] for s in per_step) / seen, rel=1e-12)


def test_a_nan_loss_is_caught_at_the_next_check_naming_its_step(tmp_path, monkeypatch):
    """The loss turns NaN at step 5; the flag is read at step 20 (or the epoch's end), and the error names step 5;
    no checkpoint holds the NaN weights."""
    from resnetlab.training import engine

    trainer = _tiny_trainer(tmp_path, epochs=3)
    original = trainer.criterion

    def criterion(logits, y):
        loss = original(logits, y)
        return loss * float("nan") if trainer.step == 5 else loss

    trainer.criterion = criterion
    with pytest.raises(engine.TrainingDiverged, match=r"loss is nan at epoch 1, step 5: lower --lr"):
        trainer.fit()
    assert trainer.step == 12  # read at the end of epoch 1, before its checkpoint
    assert not (tmp_path / "run" / "checkpoints" / "last.safetensors").exists()


def test_grad_norms_one_read_same_values(tmp_path, monkeypatch):
    """Per-stage gradient norms with one _foreach_norm and one transfer equal the per-tensor float() sums."""
    import math

    from resnetlab.training.optim import stage_of

    model = create_model("resnet20", num_classes=10)
    trainer = _tiny_trainer(tmp_path)
    trainer.model = model
    model(torch.randn(4, 3, 16, 16)).square().mean().backward()
    stages = model.stage_names
    expected: dict[str, float] = {}
    for name, p in model.named_parameters():
        s = stage_of(name, stages)
        expected[s] = expected.get(s, 0.0) + float(p.grad.float().pow(2).sum())
    counter = SyncCounter(monkeypatch)
    norms = trainer._grad_norms()
    assert counter.total == 1, counter.calls
    monkeypatch.undo()
    assert list(norms) == [s for s in ("stem", *stages, "final", "head") if s in expected]
    for s, v in norms.items():
        assert v == pytest.approx(math.sqrt(expected[s]), rel=1e-5)


def test_foreach_ema_matches_averaged_model_without_syncs(monkeypatch):
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from resnetlab.training.ema import WeightEMA

    model = create_model("resnet20", num_classes=10)
    old = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    new = WeightEMA(model, 0.9)
    counter = SyncCounter(monkeypatch)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(3):
        model(torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(i))).square().mean().backward()
        opt.step()
        opt.zero_grad()
        before = counter.total
        new.update_parameters(model)
        assert counter.total == before  # AveragedModel reads n_averaged (a device tensor) at every update
        old.update_parameters(model)
    monkeypatch.undo()
    assert new.n_averaged == int(old.n_averaged) == 3
    ref = old.module.state_dict()
    for k, v in new.module.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, ref[k], rtol=0, atol=0)


def test_save_at_end_writes_last_once(tmp_path, monkeypatch):
    from resnetlab.training import engine

    saved = []
    original = engine.ckpt.save_checkpoint

    def save_checkpoint(path, *a, **k):
        saved.append(Path(path).name)
        return original(path, *a, **k)

    monkeypatch.setattr(engine.ckpt, "save_checkpoint", save_checkpoint)
    _tiny_trainer(tmp_path, epochs=3, save_at_end=True, val_every=0).fit()  # (a new best is saved at once)
    assert saved.count("last.safetensors") == 1 and saved.count("best.safetensors") == 1
    assert read_checkpoint(tmp_path / "run" / "checkpoints" / "last.safetensors")[1]["epoch"] == 3
    saved.clear()
    _tiny_trainer(tmp_path / "b", epochs=3, val_every=0).fit()
    assert saved.count("last.safetensors") == 3  # the default: after every epoch


# --- item 3: --compile with a time budget and progressive resizing ---------------------------------------------


def test_compile_time_is_not_charged_to_the_budget(tmp_path, monkeypatch):
    """A stand-in for torch.compile that costs 100 s of (fake) time at each new input shape: with a 12-second budget
    the run must still train its schedule, the clock charged only for the steps themselves."""
    from conftest import FakeClock
    from resnetlab.training import engine

    clock = FakeClock(0.01)
    monkeypatch.setattr(engine, "time", clock)
    compiled = []

    def fake_compile(model, **kwargs):
        compiled.append(kwargs)
        shapes = set()

        def forward(x):
            if tuple(x.shape) not in shapes:
                shapes.add(tuple(x.shape))
                clock.now += 100.0
            return model(x)

        return forward

    monkeypatch.setattr(engine.torch, "compile", fake_compile)
    trainer = _tiny_trainer(tmp_path, epochs=3, time_budget=0.2, compile=True)
    trainer.fit()
    assert compiled == [{"dynamic": False}]
    assert [r["epoch"] for r in trainer.history] == [1, 2, 3] and "batches" not in trainer.history[0]
    assert trainer.clock < 12.0  # before: the first step alone spent the budget, and the run stopped there


def test_compiled_progressive_resizing_uses_a_few_fixed_sizes():
    from types import SimpleNamespace

    from resnetlab.training.engine import COMPILE_SIZE_BUCKETS, Trainer

    scales = {}
    for compile_ in (False, True):
        fake = SimpleNamespace(cfg=SimpleNamespace(progressive_resize=0.25, compile=compile_))
        seen = set()
        for i in range(101):
            fake._progress = lambda i=i: i / 100
            seen.add(round(Trainer._train_scale(fake), 9))
        scales[compile_] = seen
    assert len(scales[False]) > 50
    assert len(scales[True]) == COMPILE_SIZE_BUCKETS + 1 and max(scales[True]) == 1.0 and min(scales[True]) == 0.25


def test_data_on_the_device_needs_one_copy_per_epoch(monkeypatch):
    """With the dataset on the device, labels live there too and the epoch's order goes over in one copy: before,
    each batch copied its indices and its labels (two host-to-device copies and a sync per batch)."""
    from resnetlab.data.loader import ArrayLoader

    x = np.arange(40 * 2, dtype=np.uint8).reshape(40, 1, 2, 1)
    y = np.arange(40) % 3
    loader = ArrayLoader(x, y, 4, shuffle=True, drop_last=True, seed=1, on_device=True)
    copies = []
    original = torch.Tensor.to

    def to(self, *a, **k):
        copies.append(a)
        return original(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "to", to)
    batches = list(loader.epoch(0, with_index=True))
    monkeypatch.undo()
    assert len(batches) == 10 and len(copies) == 1
    order = loader.order(0)
    for i, (xb, yb, idx) in enumerate(batches):
        assert idx.tolist() == order[4 * i:4 * i + 4].tolist()
        assert torch.equal(xb, torch.from_numpy(x[idx.numpy()])) and yb.tolist() == y[idx.numpy()].tolist()
