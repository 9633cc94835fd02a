"""The CUDA path (issue 18): what can be checked on the CPU, and the same checks on a GPU (marked gpu).

The CPU tests stand in for the device where they can: a batch on the ``meta`` device plays a CUDA batch for the
generator-device rule, a patched ``torch.Tensor.item``/``__float__``/``tolist``/``__bool__`` counts the host syncs
a GPU would pay, and a checkpoint given a 16-byte generator state plays one written on a GPU. The gpu-marked tests
run where CUDA is (``benchmarks/gpu_all.py`` runs them first on a lent GPU) and are skipped elsewhere.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from conftest import tiny_options
from resnetlab.data import augment
from resnetlab.models import create_model

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _quiet(msg: str) -> None:
    pass


class SyncCounter:
    """Counts the ways a device tensor is read on the host (each one a sync on a GPU)."""

    NAMES = ("item", "__float__", "__int__", "__bool__", "tolist", "cpu")

    def __init__(self, monkeypatch):
        self.calls: dict[str, int] = dict.fromkeys(self.NAMES, 0)
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counted(self_t, *a, _name=name, _orig=original, **k):
                self.calls[_name] += 1
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
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
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
