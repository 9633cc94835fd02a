"""Batched image augmentation on the device: one call per batch, a different random draw per image.

torchvision's v2 transforms draw one set of random parameters per call, so applied to a batch tensor they
crop and flip every image the same way; these functions draw per image, without Python loops over the batch
(the airbench approach). MixUp and CutMix come from torchvision's v2 batch transforms.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _rand(n: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """Uniform [0, 1) on ``device``, drawn on the generator's device (a CPU generator with a CUDA batch: ``torch.rand``
    refuses a generator of another device type), as ``audio_augment._rand`` does."""
    src = generator.device if generator is not None else device
    return torch.rand(n, generator=generator, device=src).to(device, non_blocking=True)


def crop_offsets(n: int, pad: int, generator: torch.Generator | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image crop offsets ``(dy, dx)`` in ``[0, 2 * pad]`` (int64, on ``device``), as :func:`random_crop` draws
    them."""
    dy = (_rand(n, generator, device) * (2 * pad + 1)).long().clamp_(max=2 * pad)
    dx = (_rand(n, generator, device) * (2 * pad + 1)).long().clamp_(max=2 * pad)
    return dy, dx


def random_crop(x: torch.Tensor, pad: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pad by ``pad`` pixels (reflect) and crop back to the input size at a random offset per image."""
    if pad <= 0:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy, dx = crop_offsets(n, pad, generator, x.device)
    rows = (torch.arange(h, device=x.device)[None, :] + dy[:, None])  # (N, H)
    cols = (torch.arange(w, device=x.device)[None, :] + dx[:, None])  # (N, W)
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous(memory_format=torch.contiguous_format)


def flip_mask(n: int, generator: torch.Generator | None, device, p: float = 0.5) -> torch.Tensor:
    """Which of ``n`` images to mirror (bool, on ``device``), as :func:`random_flip` draws it."""
    return _rand(n, generator, device) < p


def random_flip(x: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5) -> torch.Tensor:
    """Horizontal flip of each image with probability ``p``."""
    mask = flip_mask(x.shape[0], generator, x.device, p).view(-1, 1, 1, 1)
    return torch.where(mask, x.flip(-1), x)


def crop_flip_nhwc(x: torch.Tensor, pad: int, offsets: tuple[torch.Tensor, torch.Tensor] | None,
                   flip: torch.Tensor | None) -> torch.Tensor:
    """:func:`random_crop` (reflect padding, ``offsets`` from :func:`crop_offsets`) then a mirror of the images in
    ``flip``, as one gather of ``x`` ``(N, C, H, W)`` in any dtype (uint8: a quarter of the bytes of float32) into
    ``(N, H, W, C)``: no padded copy, no float passes, and channels-last for free.

    Reflect padding is index arithmetic here: row ``i - pad`` of the padded image is row ``|i - pad|`` of the
    image, folded back at the far edge, exactly what ``F.pad(mode="reflect")`` stores (``pad`` < the image side).
    """
    n, _, h, w = x.shape
    dev = x.device
    rows = torch.arange(h, device=dev).expand(n, h)
    cols = torch.arange(w, device=dev).expand(n, w)
    if offsets is not None and pad > 0:
        dy, dx = offsets
        rows = _reflect(rows + dy[:, None] - pad, h)
        cols = _reflect(cols + dx[:, None] - pad, w)
    if flip is not None:
        cols = torch.where(flip[:, None], cols.flip(1), cols)  # mirrored after the crop: column j reads w - 1 - j
    batch = torch.arange(n, device=dev)[:, None, None]
    return x.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]


def _reflect(i: torch.Tensor, size: int) -> torch.Tensor:
    """Index ``i`` in ``[-(size - 1), 2 * (size - 1)]`` reflected into ``[0, size)`` without repeating the edge."""
    i = i.abs()
    return torch.where(i > size - 1, 2 * (size - 1) - i, i)


def _hash_bits(index: torch.Tensor, seed: int) -> torch.Tensor:
    """A fixed pseudo-random bit per (seed, index): an integer hash (two xor-shift-multiply rounds, 32 bits) in
    int64 arithmetic that cannot overflow, so the same on every device and in every process."""
    mask = 0xFFFFFFFF
    h = (index.long() + ((int(seed) * 0x9E3779B1) & mask)) & mask  # the seed's part in Python's exact integers
    for _ in range(2):
        h = ((h ^ (h >> 16)) * 0x45D9F3B) & mask
    return ((h ^ (h >> 16)) & 1).bool()


def alternating_flip(x: torch.Tensor, index: torch.Tensor, epoch: int, seed: int = 0) -> torch.Tensor:
    """Horizontal flips that alternate per image (Jordan 2024, airbench's derandomised flip).

    Image ``index[i]`` is mirrored in the even epochs if its fixed random bit (from ``seed``) is set, and in the odd
    epochs if not: a random half of the data is mirrored in each epoch, as with random flips, but over any two
    consecutive epochs every image is seen both ways, never twice the same way.
    """
    mask = alternating_mask(index, epoch, seed, x.device)
    return torch.where(mask.view(-1, 1, 1, 1), x.flip(-1), x)


def alternating_mask(index: torch.Tensor, epoch: int, seed: int, device) -> torch.Tensor:
    """Which images :func:`alternating_flip` mirrors in ``epoch`` (bool, on ``device``)."""
    return _hash_bits(index.to(device), seed) ^ bool(epoch % 2)


def random_resized_crop(x: torch.Tensor, size: tuple[int, int], scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3),
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Inception-style crop: a random area fraction and aspect ratio per image, resized to ``size`` (bilinear).

    One ``grid_sample`` for the whole batch. Boxes that would leave the image are shrunk to fit, rather than
    re-drawn up to 10 times as torchvision does per image.
    """
    n = x.shape[0]
    dev = x.device
    area = scale[0] + (scale[1] - scale[0]) * _rand(n, generator, dev)
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * _rand(n, generator, dev)
    r = torch.exp(log_r)
    # box size as a fraction of the image side (aspect = w/h)
    bw = torch.sqrt(area * r).clamp(max=1.0)
    bh = torch.sqrt(area / r).clamp(max=1.0)
    cx = (1 - bw) * (2 * _rand(n, generator, dev) - 1)  # centre in [-1, 1] coordinates, box inside the image
    cy = (1 - bh) * (2 * _rand(n, generator, dev) - 1)
    theta = torch.zeros(n, 2, 3, device=dev, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = bw, cx
    theta[:, 1, 1], theta[:, 1, 2] = bh, cy
    grid = F.affine_grid(theta, (n, x.shape[1], *size), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def cutout(x: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero a ``size`` x ``size`` square at a random centre per image (DeVries & Taylor 2017)."""
    if size <= 0:
        return x
    n, _, h, w = x.shape
    cy = (_rand(n, generator, x.device) * h).long()
    cx = (_rand(n, generator, x.device) * w).long()
    top, left = (cy - size // 2)[:, None], (cx - size // 2)[:, None]  # exactly size x size, also for even sizes
    ys = torch.arange(h, device=x.device)[None, :]
    xs = torch.arange(w, device=x.device)[None, :]
    in_y = ((ys >= top) & (ys < top + size))[:, :, None]
    in_x = ((xs >= left) & (xs < left + size))[:, None, :]
    return x * (~(in_y & in_x))[:, None].to(x.dtype)


def mix(x: torch.Tensor, y: torch.Tensor, num_classes: int, mixup: float = 0.0,
        cutmix: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp and/or CutMix (torchvision v2; one chosen at random per batch when both are on).

    Returns the mixed batch and soft targets ``(N, num_classes)``.
    """
    from torchvision.transforms import v2

    ops = []
    if mixup > 0:
        ops.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
    if cutmix > 0:
        ops.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
    if not ops:
        return x, y
    op = ops[0] if len(ops) == 1 else v2.RandomChoice(ops)
    return op(x, y)
