"""The one switch for speed tricks: device, autocast precision, channels-last, compile.

Kept out of the model code (airbench's lesson). Measured on this project's CPUs (BENCHMARKS.md): bf16
autocast plus channels-last trains a ResNet several times faster than fp32 NCHW where the CPU has native
bf16 (AVX512-BF16 / AMX), so ``auto`` turns both on there; on CUDA, bf16 where supported, else fp16 with a
gradient scaler.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA device is available (use --device cpu or auto)")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}; allowed: auto, cpu, cuda")
    return torch.device(name)


def cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cuda_has_bf16() -> bool:
    """Native bf16 on the current CUDA device (Ampere, compute capability 8.0, and later). Without
    ``including_emulation=False`` torch says yes on older GPUs too, where bf16 is emulated and slower than fp16."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


@dataclass
class Precision:
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype, None: fp32
    channels_last: bool

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def scaler(self):
        enabled = self.dtype == torch.float16 and self.device.type == "cuda"
        return torch.amp.GradScaler("cuda", enabled=enabled) if enabled else None

    def format_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x


def pick_precision(device: torch.device, precision: str = "auto", channels_last: bool | None = None,
                   ndim: int = 2) -> Precision:
    """Resolve ``auto`` choices for this device. ``ndim`` is the model's (channels-last applies to 2-D only)."""
    if precision == "auto":
        if device.type == "cuda":
            dtype = torch.bfloat16 if cuda_has_bf16() else torch.float16
        else:
            dtype = torch.bfloat16 if cpu_has_bf16() else None
    elif precision == "fp32":
        dtype = None
    elif precision == "bf16":
        dtype = torch.bfloat16
    elif precision == "fp16":
        if device.type != "cuda":
            raise ValueError("--precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
        dtype = torch.float16
    else:
        raise ValueError(f"unknown precision {precision!r}; allowed: auto, fp32, bf16, fp16")
    cl = (True if channels_last is None else channels_last) and ndim == 2
    return Precision(device, dtype, cl)
