"""Batched image augmentation: shapes, what each transform does to each image, seeding, soft targets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from resnetlab.data.augment import alternating_flip, cutout, mix, random_crop, random_flip, random_resized_crop
from resnetlab.data.image_pipeline import ImagePipeline


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batch(n: int = 16, c: int = 3, h: int = 12, w: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, h, w, generator=_gen(seed))


def _repeat(n: int = 32, c: int = 3, h: int = 12, w: int = 12) -> torch.Tensor:
    """One random (asymmetric) image repeated ``n`` times: any difference between outputs is the per-image draw."""
    return _batch(1, c, h, w).expand(n, -1, -1, -1).contiguous()


def _distinct(images: torch.Tensor) -> int:
    return len({tuple(img.flatten().tolist()) for img in images})


def test_random_crop_keeps_shape_and_is_a_window_of_the_reflect_padded_input():
    pad = 2
    x = _batch()
    out = random_crop(x, pad, _gen(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    h, w = x.shape[-2:]
    offsets = []
    for i in range(len(x)):
        found = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                 if torch.equal(out[i], padded[i, :, dy:dy + h, dx:dx + w])]
        assert found, f"image {i} is not a {h}x{w} window of its padded input"
        offsets.append(found[0])
    assert len(set(offsets)) > 1  # one offset per image, not one per batch


def test_random_crop_pad_zero_is_identity():
    x = _batch()
    assert torch.equal(random_crop(x, 0, _gen()), x)


def test_random_flip_flips_exactly_the_selected_images():
    x = _batch(n=64)
    out = random_flip(x, _gen(2))
    flipped = torch.tensor([torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)])
    kept = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x)])
    assert torch.all(flipped ^ kept)  # each image is either itself or its mirror image, never both or neither
    assert 10 < int(flipped.sum()) < 54  # p=0.5 per image
    # the selection is one Bernoulli(p) draw per image from the generator
    expected = torch.rand(64, generator=_gen(2)) < 0.5
    assert torch.equal(flipped, expected)
    assert torch.equal(random_flip(x, _gen(), p=0.0), x)
    assert torch.equal(random_flip(x, _gen(), p=1.0), x.flip(-1))


@pytest.mark.parametrize("size", [(8, 8), (6, 10), (16, 12)])
def test_random_resized_crop_output_size(size):
    x = _batch(n=5, h=12, w=10)
    out = random_resized_crop(x, size, generator=_gen())
    assert out.shape == (5, 3, *size)
    assert torch.isfinite(out).all()
    assert out.min() >= x.min() - 1e-5 and out.max() <= x.max() + 1e-5  # bilinear: no overshoot


def test_random_resized_crop_of_the_full_image_is_identity():
    x = _batch(n=4, h=8, w=8)
    out = random_resized_crop(x, (8, 8), scale=(1.0, 1.0), ratio=(1.0, 1.0), generator=_gen())
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [3, 4, 5])
def test_cutout_zeroes_one_size_by_size_square(size):
    x = torch.ones(64, 1, 24, 24)
    out = cutout(x, size, _gen(3))
    assert out.shape == x.shape
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    interior = 0
    for img in out[:, 0]:
        rows = torch.nonzero((img == 0).any(1)).flatten()
        cols = torch.nonzero((img == 0).any(0)).flatten()
        assert len(rows) and len(cols)
        # the zeros form a filled rectangle (a square clipped by the border)
        box = img[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert torch.all(box == 0)
        assert int((img == 0).sum()) == len(rows) * len(cols)
        assert len(rows) <= size and len(cols) <= size
        if 0 < rows.min() and rows.max() < 23 and 0 < cols.min() and cols.max() < 23:
            assert (len(rows), len(cols)) == (size, size), "an unclipped cutout square must be size x size"
            interior += 1
    assert interior > 10


def test_cutout_zero_size_is_identity():
    x = _batch()
    assert torch.equal(cutout(x, 0, _gen()), x)


@pytest.mark.parametrize("name, fn", [
    ("crop", lambda x, g: random_crop(x, 2, g)),
    ("flip", lambda x, g: random_flip(x, g)),
    ("rrc", lambda x, g: random_resized_crop(x, (12, 12), generator=g)),
    ("cutout", lambda x, g: cutout(x, 4, g)),
])
def test_same_seed_same_result_and_a_different_draw_per_image(name, fn):
    x = _repeat()
    a, b = fn(x, _gen(7)), fn(x, _gen(7))
    assert torch.equal(a, b), f"{name}: the same seed must give the same batch"
    assert _distinct(a) > 1, f"{name}: every image got the same draw"
    c = fn(x, _gen(8))
    assert not torch.equal(a, c), f"{name}: another seed should give another batch"


@pytest.mark.parametrize("mixup, cutmix", [(0.4, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_mix_returns_soft_targets_that_sum_to_one(mixup, cutmix):
    torch.manual_seed(0)
    x = torch.rand(8, 3, 16, 16)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    xm, ym = mix(x, y, 3, mixup=mixup, cutmix=cutmix)
    assert xm.shape == x.shape
    assert ym.shape == (8, 3) and ym.dtype.is_floating_point
    torch.testing.assert_close(ym.sum(1), torch.ones(8))
    assert (ym >= 0).all() and (ym <= 1).all()
    # each row puts its weight on its own label and (at most) one partner's
    assert all((row > 0).sum() <= 2 for row in ym)
    assert all(ym[i, y[i]] > 0 for i in range(8))


def test_mix_off_returns_inputs_unchanged():
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    xm, ym = mix(x, y, 3)
    assert xm is x and ym is y


def test_image_pipeline_eval_is_deterministic_normalisation():
    pipe = ImagePipeline((8, 8), 3, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25], 3, crop_pad=1, flip=True, cutout=2)
    x = (torch.rand(4, 3, 8, 8, generator=_gen()) * 255).to(torch.uint8)
    out, y = pipe(x, None, train=False)
    torch.testing.assert_close(out, (x.float() / 255 - 0.5) / 0.25)
    assert y is None
    train_out, _ = pipe(x, torch.zeros(4, dtype=torch.long), train=True, generator=_gen())
    assert train_out.shape == out.shape and not torch.equal(train_out, out)


@pytest.mark.parametrize("rrc", [False, True])
def test_progressive_resizing_shrinks_training_batches_only(rrc):
    pipe = ImagePipeline((32, 32), 3, [0.5] * 3, [0.25] * 3, 10, crop_pad=0 if rrc else 4, rrc=rrc)
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    pipe.set_train_scale(0.75)
    assert pipe(x, None, train=True, generator=torch.Generator().manual_seed(0))[0].shape == (4, 3, 24, 24)
    assert pipe(x, None, train=False)[0].shape == (4, 3, 32, 32)  # evaluation: always the full size
    assert "train_size" not in pipe.config()  # inference never sees it
    pipe.set_train_scale(1.0)
    assert pipe(x, None, train=True, generator=torch.Generator().manual_seed(0))[0].shape == (4, 3, 32, 32)


@pytest.mark.parametrize(("side", "scale", "expected"), [(30, 0.5, 16), (32, 0.6, 20), (16, 0.1, 8), (10, 0.9, 8),
                                                         (224, 0.5, 112)])
def test_train_scale_rounds_to_multiples_of_4_within_the_full_size(side, scale, expected):
    pipe = ImagePipeline((side, side), 3, [0.5] * 3, [0.25] * 3, 10)
    pipe.set_train_scale(scale)
    assert pipe.train_size == (expected, expected)


# --- alternating flips (airbench's derandomised flip) ----------------------------------------------------------


def _mirrored(out: torch.Tensor, x: torch.Tensor) -> list[bool]:
    """Which images of ``out`` are the mirror image of ``x``'s (asymmetric inputs: one or the other)."""
    return [bool(torch.equal(o, xi.flip(-1))) for o, xi in zip(out, x)]


def test_alternating_flip_mirrors_each_image_every_other_epoch():
    x = torch.rand(200, 1, 2, 3, generator=_gen())
    index = torch.arange(1000, 1200)
    flips = [_mirrored(alternating_flip(x, index, epoch, seed=3), x) for epoch in range(4)]
    for epoch in range(3):  # over any two consecutive epochs each image is seen both ways
        assert all(a != b for a, b in zip(flips[epoch], flips[epoch + 1]))
    assert flips[0] == flips[2] and flips[1] == flips[3]
    assert 80 <= sum(flips[0]) <= 120  # about half of the images mirrored in each epoch
    unflipped = alternating_flip(x, index, 0, seed=3)
    assert all(torch.equal(o, xi) for o, xi, f in zip(unflipped, x, flips[0]) if not f)


def test_alternating_flip_start_is_random_per_seed_and_balanced_along_the_stored_order():
    index = torch.arange(10_000)
    x = torch.arange(2.0).view(1, 1, 1, 2).expand(10_000, 1, 1, 2)  # [0, 1]: mirrored reads [1, 0]
    first = alternating_flip(x, index, 0, seed=0)[:, 0, 0, 0] == 1
    other_seed = alternating_flip(x, index, 0, seed=1)[:, 0, 0, 0] == 1
    assert 0.45 < first.float().mean() < 0.55
    assert 0.45 < (first == other_seed).float().mean() < 0.55  # another seed: an unrelated start
    # a cache stores the classes one after the other: every stretch of 500 must be about half mirrored
    assert all(0.4 < chunk.float().mean() < 0.6 for chunk in first.split(500))
    assert 0.45 < (first[1:] == first[:-1]).float().mean() < 0.55  # neighbours independent: no stripes
    assert torch.equal(first, alternating_flip(x, index, 0, seed=0)[:, 0, 0, 0] == 1)  # a pure function
    big_seed = alternating_flip(x, index, 0, seed=2**31)[:, 0, 0, 0] == 1
    assert 0.45 < (first == big_seed).float().mean() < 0.55  # every bit of a 32-bit seed counts


def test_image_pipeline_alternating_flip_follows_the_index_and_epoch():
    pipe = ImagePipeline((4, 4), 1, [0.0], [1.0], 2, flip_mode="alternate", flip_seed=7)
    x = (torch.rand(64, 1, 4, 4, generator=_gen()) * 255).to(torch.uint8)
    index = torch.arange(64) * 5
    e0, _ = pipe(x, None, train=True, generator=_gen(), index=index, epoch=0)
    e1, _ = pipe(x, None, train=True, generator=_gen(1), index=index, epoch=1)  # the generator plays no part
    torch.testing.assert_close(e1, e0.flip(-1))
    e2, _ = pipe(x, None, train=True, generator=_gen(2), index=index, epoch=2)
    torch.testing.assert_close(e2, e0)
    # without indices (lr-find's sweep): random flips from the generator
    r1, _ = pipe(x, None, train=True, generator=_gen(1))
    r2, _ = pipe(x, None, train=True, generator=_gen(1))
    torch.testing.assert_close(r1, r2)
    assert not torch.equal(r1, pipe(x, None, train=True, generator=_gen(2))[0])
    config = pipe.config()
    assert config["flip_mode"] == "alternate" and config["flip_seed"] == 7
    assert ImagePipeline.from_config(config).config() == config
    old = {k: v for k, v in config.items() if k not in ("flip_mode", "flip_seed")}  # a checkpoint from before
    assert ImagePipeline.from_config(old).flip_mode == "random"
    # random flips write no new keys: their checkpoints stay readable by versions from before flip_mode
    assert ImagePipeline.from_config(old).config() == old
    with pytest.raises(ValueError, match="flip_mode.*'sometimes'"):
        ImagePipeline((4, 4), 1, [0.0], [1.0], 2, flip_mode="sometimes")
