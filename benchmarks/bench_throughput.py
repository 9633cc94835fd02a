"""Training throughput (images/s): resnetlab's default training step vs a plain torchvision loop.

resnetlab: a real ``Trainer`` built as ``resnetlab.train`` builds it, stepped through ``Trainer.train_step`` on
uint8 batches (the image pipeline's crop + flip + normalise on the batch, ``pick_precision('auto')`` autocast,
channels-last, resnetlab's SGD with its parameter groups, label smoothing, the periodic gradient-norm record).
Baseline: ``torchvision.models.<arch>(num_classes=10)`` in fp32, NCHW, eager, ``torch.optim.SGD``, on a
ready float input. Both at 64x64, batch 64, 3 channels, 10 classes.

Warm-up steps are excluded; the two sides alternate step by step, each step timed alone, and the figure is the
ratio of the median step times (also given: the ratio of total times, the median of per-pair ratios, and the
ratio of process CPU seconds per step, which contention from other jobs inflates less than wall time).

    .venv/bin/python benchmarks/bench_throughput.py [--quick] [--arch resnet18 resnet50]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402

from _common import add_threads_arg, apply_threads, machine, median, print_machine, record, verdict  # noqa: E402
from resnetlab import create_model  # noqa: E402
from resnetlab.data.image_pipeline import ImagePipeline  # noqa: E402
from resnetlab.data.loader import ArrayLoader  # noqa: E402
from resnetlab.training.config import TrainConfig  # noqa: E402
from resnetlab.training.defaults import resolve  # noqa: E402
from resnetlab.training.engine import Trainer  # noqa: E402
from resnetlab.training.precision import pick_device, pick_precision  # noqa: E402

TARGET = 2.0
SIZE, BATCH, CLASSES = 64, 64, 10


def resnetlab_stepper(arch: str, run_dir: Path):
    """A Trainer as ``resnetlab.train`` makes it (default config resolved for 64x64 RGB, batch 64)."""
    device = pick_device("cpu")
    n = BATCH * 4
    x = np.random.default_rng(0).integers(0, 256, (n, 3, SIZE, SIZE), dtype=np.uint8)
    y = np.random.default_rng(1).integers(0, CLASSES, n).astype(np.int64)
    cfg = resolve(TrainConfig(data="synthetic", arch=arch, batch_size=BATCH, epochs=1, out=str(run_dir)),
                  modality="image", facts={"img_size": SIZE, "channels": 3}, n_train=n, device_type="cpu")
    pipeline = ImagePipeline((SIZE, SIZE), 3, [0.5] * 3, [0.25] * 3, CLASSES, crop_pad=cfg.crop_pad, flip=cfg.flip,
                             rrc=cfg.rrc)
    model = create_model(arch, num_classes=CLASSES, in_chans=3)
    prec = pick_precision(device, cfg.precision, cfg.channels_last, 2)
    loader = ArrayLoader(x, y, BATCH, shuffle=True, drop_last=True, device=device)
    trainer = Trainer(model, pipeline, loader, None, cfg, run_dir, {"arch": arch}, prec, log=lambda m: None)
    trainer._enter_phase(0)  # builds the optimizer, as fit() does at its first epoch
    trainer.model.train()
    batches = list(loader.epoch(0))

    def step(i: int) -> None:
        xb, yb = batches[i % len(batches)]
        trainer.train_step(xb, yb)
        trainer.step += 1  # fit() counts steps; the gradient-norm record runs every cfg.grad_norm_every of them

    desc = (f"{prec.name}{' channels-last' if prec.channels_last else ''}, {cfg.optimizer} nesterov, "
            f"crop_pad {cfg.crop_pad}, flip {cfg.flip}, label_smoothing {cfg.label_smoothing}, "
            f"grad_norm_every {cfg.grad_norm_every}")
    return step, desc


def baseline_stepper(arch: str):
    model = getattr(torchvision.models, arch)(num_classes=CLASSES)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    crit = torch.nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(BATCH, 3, SIZE, SIZE, generator=g) for _ in range(4)]
    ys = [torch.randint(0, CLASSES, (BATCH,), generator=g) for _ in range(4)]

    def step(i: int) -> None:
        loss = crit(model(xs[i % 4]), ys[i % 4])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, "fp32 NCHW eager, torch.optim.SGD momentum 0.9, float input"


def timed(step, i: int, cpu: list) -> float:
    """Wall seconds of one step; its process CPU seconds (all threads) go to ``cpu``."""
    c0, t0 = time.process_time(), time.perf_counter()
    step(i)
    t = time.perf_counter() - t0
    cpu.append(time.process_time() - c0)
    return t


def bench(arch: str, steps: int, warmup: int) -> dict:
    """Alternate single steps of the two sides (the first side swaps every step) and time each step: with
    other jobs on the machine, load changes within seconds, and step-level interleaving exposes both to it."""
    with tempfile.TemporaryDirectory(prefix="resnetlab-bench-") as tmp:
        lab, lab_desc = resnetlab_stepper(arch, Path(tmp))
        base, base_desc = baseline_stepper(arch)
        for i in range(warmup):
            lab(i)
            base(i)
        lab_s, base_s, lab_cpu, base_cpu = [], [], [], []
        for i in range(warmup, warmup + steps):
            if i % 2:
                lab_s.append(timed(lab, i, lab_cpu))
                base_s.append(timed(base, i, base_cpu))
            else:
                base_s.append(timed(base, i, base_cpu))
                lab_s.append(timed(lab, i, lab_cpu))
            if (i - warmup + 1) % max(steps // 4, 1) == 0:
                print(f"  {arch} step {i - warmup + 1}/{steps}: resnetlab {BATCH / median(lab_s):.1f} img/s, "
                      f"baseline {BATCH / median(base_s):.1f} img/s (medians so far)", flush=True)
    lab_ips, base_ips = BATCH / median(lab_s), BATCH / median(base_s)
    ratio = lab_ips / base_ips
    total_ratio = sum(base_s) / sum(lab_s)
    pair_ratio = median([b / a for a, b in zip(lab_s, base_s)])
    return {"arch": arch, "resnetlab": lab_desc, "baseline": base_desc, "steps": steps, "warmup_steps": warmup,
            "batch": BATCH, "size": SIZE, "resnetlab_step_s": [round(v, 4) for v in lab_s],
            "baseline_step_s": [round(v, 4) for v in base_s], "resnetlab_median_img_s": round(lab_ips, 2),
            "baseline_median_img_s": round(base_ips, 2), "ratio": round(ratio, 3),
            "ratio_of_total_time": round(total_ratio, 3), "median_pair_ratio": round(pair_ratio, 3),
            "resnetlab_cpu_s_per_step": round(median(lab_cpu), 4),
            "baseline_cpu_s_per_step": round(median(base_cpu), 4),
            "cpu_time_ratio": round(median(base_cpu) / median(lab_cpu), 3), "target": TARGET, "met": ratio >= TARGET}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds and steps (smoke run)")
    ap.add_argument("--arch", nargs="+", default=["resnet18", "resnet50"])
    add_threads_arg(ap)
    args = ap.parse_args(argv)
    apply_threads(args.threads)
    info = machine()
    print_machine(info)
    torch.manual_seed(0)
    warmup = 2 if args.quick else 4
    results = []
    for arch in args.arch:
        steps = (6 if args.quick else 30) if arch == "resnet18" else (4 if args.quick else 12)
        res = bench(arch, steps, warmup)
        results.append(res)
        print(f"{arch} 64x64 batch {BATCH}: resnetlab {res['resnetlab_median_img_s']:.1f} img/s vs torchvision fp32 "
              f"{res['baseline_median_img_s']:.1f} img/s -> {res['ratio']:.2f}x "
              f"(total-time ratio {res['ratio_of_total_time']:.2f}x, median pair {res['median_pair_ratio']:.2f}x, "
              f"CPU-time ratio {res['cpu_time_ratio']:.2f}x); "
              f"target >= {TARGET}x: {verdict(res['met'])}",
              flush=True)
        print(f"  resnetlab: {res['resnetlab']}", flush=True)
    record("bench_throughput", {**info, "quick": args.quick, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
