"""The CUDA path (issue 18): what can be checked on the CPU, and the same checks on a GPU (marked gpu).

The CPU tests stand in for the device where they can: a batch on the ``meta`` device plays a CUDA batch for the
generator-device rule, a patched ``torch.Tensor.item``/``__float__``/``tolist``/``__bool__`` counts the host syncs
a GPU would pay, and a checkpoint given a 16-byte generator state plays one written on a GPU. The gpu-marked tests
run where CUDA is (``benchmarks/gpu_all.py`` runs them first on a lent GPU) and are skipped elsewhere.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import resnetlab
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
    """tests/tiny_fit.py's Trainer (a BatchNorm-free model; 48 samples, batch 4: 12 steps an epoch) in tmp_path/run."""
    import tiny_fit

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(48, 1, 4, 4), dtype=np.uint8)
    y = rng.integers(0, 3, size=48)
    trainer = tiny_fit.trainer(tmp_path / "run", x, y, 4, **{"epochs": 2, "lr": 0.1, "weight_decay": 1e-3, **cfg})
    trainer.log = log
    return trainer


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
    assert trainer.history[0]["compile_seconds"] >= 100.0 and "compile_seconds" not in trainer.history[1]


def test_step_schedule_is_he_et_al_2015():
    """64k iterations: lr 0.1 to 32k, 0.01 to 48k, 0.001 after."""
    from resnetlab.training.optim import lr_at

    factors = [lr_at(s, 64_000, 0, "step") for s in (0, 31_999, 32_000, 47_999, 48_000, 63_999)]
    assert factors == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.01])


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


# --- the image pipeline's direct uint8 crop/flip path ----------------------------------------------------------


def _pipelines(**kw):
    from resnetlab.data.image_pipeline import ImagePipeline

    make = lambda: ImagePipeline((12, 10), 3, [0.4, 0.5, 0.6], [0.2, 0.25, 0.3], 10, **kw)  # noqa: E731
    direct, general = make(), make()
    general._direct = lambda x: False  # the general float path, as every batch took before
    return direct, general


@pytest.mark.parametrize("flip_mode", ["random", "alternate"])
@pytest.mark.parametrize("crop_pad", [0, 2, 4])
def test_direct_crop_flip_matches_the_float_path(crop_pad, flip_mode):
    """Same draws in the same order, reflect padding as index arithmetic, normalisation as one multiply-add: the
    same images as pad + gather + flip + normalise in float32, in float32 (to rounding) and in bf16 channels-last."""
    direct, general = _pipelines(crop_pad=crop_pad, flip_mode=flip_mode)
    x = torch.randint(0, 256, (16, 3, 12, 10), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    index = torch.arange(100, 116)
    kw = {"index": index, "epoch": 3}
    want, _ = general(x, None, train=True, generator=torch.Generator().manual_seed(5), **kw)
    got, _ = direct(x, None, train=True, generator=torch.Generator().manual_seed(5), **kw)
    assert got.dtype == torch.float32 and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    direct.set_output(torch.bfloat16, channels_last=True)
    got, _ = direct(x, None, train=True, generator=torch.Generator().manual_seed(5), **kw)
    assert got.dtype == torch.bfloat16 and got.is_contiguous(memory_format=torch.channels_last)
    assert got.shape == want.shape
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=2e-2)  # bf16: 8 bits of mantissa


def test_the_general_path_still_takes_what_the_direct_one_cannot():
    direct, _ = _pipelines(crop_pad=2, cutout=3)
    x = torch.zeros(2, 3, 12, 10, dtype=torch.uint8)
    assert not direct._direct(x)
    assert not _pipelines(rrc=True)[0]._direct(x) and _pipelines(crop_pad=2)[0]._direct(x)


# --- on a GPU (benchmarks/gpu_all.py runs these first on a lent device) ------------------------------------------

def _cuda_run(tmp_path: Path, data: Path, **overrides):
    opts = tiny_options(tmp_path, device="cuda", precision="bf16", channels_last=True, epochs=2)
    opts.update(overrides)
    return resnetlab.train(str(data), log=_quiet, **opts)


def _records(run_dir) -> list[dict]:
    return [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if ln.strip()]


@pytest.mark.gpu
@needs_cuda
def test_cuda_bf16_channels_last_step(tmp_path, monkeypatch):
    """One training step on CUDA in bf16 with channels-last: the batch reaches the model as bf16 channels-last
    (the direct uint8 path), the loss is finite and no host read happens inside the step."""
    from resnetlab.data.image_pipeline import ImagePipeline
    from resnetlab.data.loader import ArrayLoader
    from resnetlab.training.config import TrainConfig, make_config
    from resnetlab.training.engine import Trainer
    from resnetlab.training.precision import pick_precision

    x = np.random.default_rng(0).integers(0, 256, size=(64, 3, 32, 32), dtype=np.uint8)
    y = np.arange(64) % 10
    prec = pick_precision(torch.device("cuda"), "bf16", True)
    pipe = ImagePipeline((32, 32), 3, [0.5] * 3, [0.25] * 3, 10, crop_pad=4)
    cfg = make_config(TrainConfig, {"batch_size": 32, "epochs": 1, "lr": 0.05, "weight_decay": 5e-4,
                                    "warmup_epochs": 0.0, "grad_norm_every": 0, "quiet": True,
                                    "out": str(tmp_path / "run")})
    loader = ArrayLoader(x, y, 32, shuffle=True, drop_last=True, device="cuda", on_device=True)
    trainer = Trainer(create_model("resnet20", num_classes=10), pipe, loader, None, cfg, tmp_path / "run", {}, prec,
                      log=_quiet)
    trainer._enter_phase(0)
    seen = []
    forward = trainer.forward_model
    trainer.forward_model = lambda inp: (seen.append((inp.dtype, inp.is_contiguous(
        memory_format=torch.channels_last))), forward(inp))[1]
    xb, yb, idx = next(loader.epoch(0, with_index=True))
    counter = SyncCounter(monkeypatch)
    loss_sum, correct, n = trainer.train_step(xb, yb, idx)
    assert counter.total == 0, str(counter.calls)
    monkeypatch.undo()
    assert seen == [(torch.bfloat16, True)] and loss_sum.device.type == "cuda"
    assert math.isfinite(float(loss_sum)) and 0 <= float(correct) <= n == 32


@pytest.mark.gpu
@needs_cuda
def test_cuda_fused_optimizer_matches_the_foreach_one():
    from resnetlab.training.optim import build_optimizer, param_groups

    models = [create_model("resnet20", num_classes=10).cuda() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [build_optimizer(param_groups(m, 5e-4, 0.1), "sgd", 0.1, 0.9) for m in models]
    assert opts[0].defaults.get("fused") is True
    opts[1] = torch.optim.SGD(param_groups(models[1], 5e-4, 0.1), lr=0.1, momentum=0.9, nesterov=True,
                              foreach=True)
    x = torch.randn(8, 3, 32, 32, device="cuda")
    for m, o in zip(models, opts):
        for _ in range(3):
            m(x).square().mean().backward()
            o.step()
            o.zero_grad()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@needs_cuda
def test_cuda_compile_trains_and_records_its_compile_time(tmp_path, tiny_data):
    result = _cuda_run(tmp_path, tiny_data, compile=True)
    records = _records(result.run_dir)
    assert len(records) == 2 and all(math.isfinite(r["train_loss"]) for r in records)
    assert records[0].get("compile_seconds", 0) > 0


@pytest.mark.gpu
@needs_cuda
def test_cuda_ema(tmp_path, tiny_data):
    result = _cuda_run(tmp_path, tiny_data, ema=0.9)
    tensors, meta = read_checkpoint(Path(result.run_dir) / "checkpoints" / "last.safetensors")
    assert int(tensors["ema_n_averaged"].reshape(())) == meta["step"] > 0
    assert "ema_val_acc" in _records(result.run_dir)[-1]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("first,second", [("cpu", "cuda"), ("cuda", "cpu")])
def test_resume_across_cpu_and_cuda(capsys, tmp_path, tiny_data, first, second):
    """A run started on one device type finishes on the other: weights, optimizer and EMA move; the augmentation
    stream is re-seeded (its state does not fit the other type's generator)."""
    import yaml

    from conftest import run_cli

    opts = tiny_options(tmp_path, device=first, precision="fp32", epochs=1, ema=0.9)
    result = resnetlab.train(str(tiny_data), log=_quiet, **opts)
    run = Path(result.run_dir)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["epochs"] = 2
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    code, out, err = run_cli(capsys, "train", "--out", run, "--resume", "--quiet", "--device", second)
    assert code == 0, err
    assert "augmentation stream was saved on another device type" in out
    assert read_checkpoint(run / "checkpoints" / "last.safetensors")[1]["epoch"] == 2


@pytest.mark.gpu
@needs_cuda
def test_cuda_export_and_predict(tmp_path):
    from deploy_helpers import make_run, write_image
    from resnetlab.deploy.export import export_model
    from resnetlab.deploy.predictor import Predictor

    run = make_run(tmp_path / "run", num_classes=3)
    image = write_image(tmp_path / "x.png", 16)
    cpu = Predictor.load(run, backend="eager", device="cpu").predict_files([image])
    gpu = Predictor.load(run, backend="eager", device="cuda")
    assert gpu.device.type == "cuda"
    got = gpu.predict_files([image])
    assert got[0]["top_k"][0]["label"] == cpu[0]["top_k"][0]["label"]
    exported = export_model(run, "torchscript", tmp_path / "m.pt")
    assert exported.path.is_file()
    bf16 = Predictor.load(run, backend="bf16", device="cuda")  # channels-last input into channels-last weights
    assert bf16._runner.net.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert "top_k" in bf16.predict_files([image])[0]  # (bf16 may reorder close scores of a random model)


@pytest.mark.gpu
@needs_cuda
def test_cuda_server(tmp_path):
    import http.client

    from deploy_helpers import make_run, write_image
    from resnetlab.deploy.predictor import Predictor
    from test_serve import multipart, running, stop

    run = make_run(tmp_path / "run", num_classes=3)
    server, thread = running(Predictor.load(run, backend="eager", device="cuda"))
    try:
        body, ctype = multipart({"file": ("x.png", write_image(tmp_path / "x.png", 16).read_bytes())})
        conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
        conn.request("POST", "/predict", body=body, headers={"Content-Type": ctype})
        r = conn.getresponse()
        answer = json.loads(r.read())
        conn.close()
        assert r.status == 200, answer
    finally:
        stop(server, thread)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.slow
def test_one_process_nccl_under_torchrun(tmp_path, tiny_data):
    """torchrun with one process: the NCCL group forms and the collectives the trainer uses run on the GPU; then a
    training run under torchrun finishes."""
    import subprocess
    import sys

    script = tmp_path / "nccl.py"
    script.write_text(
        "import torch, torch.distributed as dist\n"
        "from resnetlab.training import distributed as d\n"
        "dist.init_process_group('nccl')\n"
        "torch.cuda.set_device(0)\n"
        "t = torch.tensor([1.0, 2.0], device='cuda')\n"
        "dist.all_reduce(t)\n"
        "assert t.tolist() == [1.0, 2.0]\n"
        "m = torch.nn.BatchNorm2d(3).cuda()\n"
        "for b in m.buffers():\n"
        "    dist.broadcast(b, src=0)\n"
        "dist.barrier(device_ids=[0])\n"
        "dist.destroy_process_group()\n"
        "print('NCCL OK')\n")
    env = {**os.environ, "RESNETLAB_CACHE": str(tmp_path / "cache")}
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
    done = subprocess.run([*run, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "NCCL OK" in done.stdout, done.stderr[-3000:]
    from conftest import train_argv

    argv = train_argv(tmp_path, tiny_data, device="cuda", epochs=1)
    done = subprocess.run([*run, "-m", "resnetlab", *argv], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.gpu
@needs_cuda
def test_cuda_audio_pipeline_matches_cpu():
    from resnetlab.data.audio_pipeline import AudioPipeline

    waves = (torch.randn(6, 8000, generator=torch.Generator().manual_seed(0)) * 3000).to(torch.int16)
    pipe = AudioPipeline(num_classes=3, sample_rate=8000, num_samples=8000, features="logmel", n_mels=20)
    cpu, _ = pipe(waves, None, train=False)
    assert pipe.to("cuda").device.type == "cuda"
    gpu, _ = pipe(waves.cuda(), None, train=False)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=2e-3)
    # training augmentation with a CPU generator and a CUDA batch (drawn on the CPU, moved)
    out, _ = pipe(waves.cuda(), torch.zeros(6, dtype=torch.long, device="cuda"), train=True,
                  generator=torch.Generator().manual_seed(0))
    assert out.device.type == "cuda" and torch.isfinite(out).all()


@pytest.mark.gpu
@needs_cuda
def test_cuda_image_augmentations_with_a_cpu_generator():
    x = torch.rand(4, 3, 8, 8, device="cuda")
    gen = torch.Generator().manual_seed(0)
    for out in (augment.random_crop(x, 2, gen), augment.random_flip(x, gen), augment.cutout(x, 3, gen),
                augment.random_resized_crop(x, (6, 6), generator=gen)):
        assert out.device.type == "cuda"


DETERMINISM_SCRIPT = """
import os, sys, torch
from resnetlab.models import create_model
from resnetlab.models.registry import get_spec
torch.use_deterministic_algorithms(True)
failed = []
for arch in sys.argv[1:]:
    spec = get_spec(arch)
    grads = []
    for _ in range(2):
        torch.manual_seed(0)
        model = create_model(arch, num_classes=5).cuda()
        x = torch.randn((4, 1, 32, 32) if spec.ndim == 2 and getattr(spec, "modality", "image") == "audio" else
                        (4, 3, 32, 32) if spec.ndim == 2 else (4, model.in_chans, 400),
                        generator=torch.Generator().manual_seed(1)).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x).float().square().mean()
        loss.backward()
        grads.append(torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None]))
    if not torch.equal(grads[0], grads[1]):
        failed.append(arch)
    print(arch, "ok" if arch not in failed else "DIFFERS", flush=True)
sys.exit(1 if failed else 0)
"""


@pytest.mark.gpu
@needs_cuda
@pytest.mark.slow
def test_deterministic_every_model_family_on_cuda(tmp_path):
    """--deterministic with one model of each family: forward and backward run (no op without a deterministic
    CUDA kernel; fastresnet's global max-pool was one) and two runs give bitwise equal gradients."""
    import subprocess
    import sys

    families = ["resnet20", "resnet18", "resnet50d", "resnext50_32x4d", "wide_resnet50_2", "preact_resnet20",
                "plain20", "fastresnet", "fastplain", "seed_resnet", "res8", "tc_resnet8", "resnet1d18",
                "seed_resnet1d"]
    script = tmp_path / "det.py"
    script.write_text(DETERMINISM_SCRIPT)
    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    done = subprocess.run([sys.executable, str(script), *families], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count(" ok") == len(families)


@pytest.mark.gpu
@needs_cuda
def test_cudnn_benchmark_on_unless_deterministic(tmp_path, tiny_data, monkeypatch):
    from resnetlab.training import engine

    seen = []
    original = engine.Trainer.fit

    def fit(self):
        seen.append(torch.backends.cudnn.benchmark)
        return original(self)

    monkeypatch.setattr(engine.Trainer, "fit", fit)
    _cuda_run(tmp_path / "a", tiny_data, epochs=1)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    _cuda_run(tmp_path / "b", tiny_data, epochs=1, deterministic=True)
    assert seen == [True, False]
