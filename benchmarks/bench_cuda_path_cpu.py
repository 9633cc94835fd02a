"""The CPU side of issue 18's changes: the image pipeline's direct uint8 crop/flip path against the general float
path it replaced for training batches, alone and inside a real training step, alternating in one run.

(a) pipeline: one CIFAR-sized training batch (uint8 (B, 3, 32, 32), 2-pixel crops, alternating flips) to model
    input in the trainer's precision (``auto``: bf16 channels-last on a CPU with AVX512-BF16), ms per batch. The
    general path then pays ``format_input``'s layout pass and autocast's cast of the batch; the direct path writes
    bf16 channels-last at once.
(b) step: ``Trainer.train_step`` of ``fastresnet_s`` (the fast recipe's CPU network) on such batches, steps/s.

Both sides share the trainer, model and data; only ``ImagePipeline._direct`` decides the path. The host syncs the
engine no longer takes (issue 18) cost next to nothing on a CPU, so they are not timed here.

    .venv/bin/python benchmarks/bench_cuda_path_cpu.py [--batch 256] [--rounds 5] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _common import add_threads_arg, apply_threads, machine, median, print_machine, record, scratch  # noqa: E402
from resnetlab.data.image_pipeline import ImagePipeline  # noqa: E402
from resnetlab.data.loader import ArrayLoader  # noqa: E402
from resnetlab.models import create_model  # noqa: E402
from resnetlab.training.config import TrainConfig, make_config  # noqa: E402
from resnetlab.training.engine import Trainer  # noqa: E402
from resnetlab.training.precision import pick_precision  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4, help="training steps per round and side")
    add_threads_arg(ap)
    args = ap.parse_args(argv)
    apply_threads(args.threads)
    info = machine()
    print_machine(info)
    b = args.batch
    x = np.random.default_rng(0).integers(0, 256, size=(b * 4, 3, 32, 32), dtype=np.uint8)
    y = np.arange(len(x)) % 10
    prec = pick_precision(torch.device("cpu"), "auto")
    pipe = ImagePipeline((32, 32), 3, [0.49, 0.48, 0.45], [0.25, 0.24, 0.26], 10, crop_pad=2, flip_mode="alternate")
    out = scratch("bench-cuda-path-cpu")
    cfg = make_config(TrainConfig, {"batch_size": b, "epochs": 1, "lr": 0.1, "weight_decay": 5e-4, "quiet": True,
                                    "warmup_epochs": 0.0, "grad_norm_every": 0, "out": str(out)})
    loader = ArrayLoader(x, y, b, shuffle=True, drop_last=True, seed=0)
    trainer = Trainer(create_model("fastresnet_s", num_classes=10), pipe, loader, None, cfg, out, {}, prec,
                      log=lambda m: None)
    trainer._enter_phase(0)
    batches = list(loader.epoch(0, with_index=True))
    direct = pipe._direct

    def use(path: str) -> None:
        pipe._direct = direct if path == "direct" else (lambda xb: False)

    def pipeline_ms() -> float:
        t0 = time.perf_counter()
        for xb, yb, idx in batches:
            xin, _ = pipe(xb, yb, train=True, generator=trainer.aug_gen, index=idx, epoch=1)
            xin = prec.format_input(xin)
            if prec.dtype is not None:
                xin = xin.to(prec.dtype)  # what autocast does to the batch at the first convolution
        return (time.perf_counter() - t0) / len(batches) * 1e3

    def steps_per_s() -> float:
        t0 = time.perf_counter()
        for i in range(args.steps):
            xb, yb, idx = batches[i % len(batches)]
            trainer.train_step(xb, yb, idx)
        return args.steps / (time.perf_counter() - t0)

    for path in ("general", "direct"):  # warm-up
        use(path)
        pipeline_ms()
        steps_per_s()
    res = {"general": {"pipeline_ms": [], "steps_per_s": []}, "direct": {"pipeline_ms": [], "steps_per_s": []}}
    for _ in range(args.rounds):
        for path in ("general", "direct"):
            use(path)
            res[path]["pipeline_ms"].append(round(pipeline_ms(), 3))
            res[path]["steps_per_s"].append(round(steps_per_s(), 4))
    use("direct")
    summary = {p: {k: median(v) for k, v in r.items()} for p, r in res.items()}
    rec = {**info, "batch": b, "precision": prec.name, "channels_last": prec.channels_last, "rounds": args.rounds,
           "steps_per_round": args.steps, "raw": res, "median": summary,
           "pipeline_speedup": round(summary["general"]["pipeline_ms"] / summary["direct"]["pipeline_ms"], 3),
           "step_speedup": round(summary["direct"]["steps_per_s"] / summary["general"]["steps_per_s"], 3)}
    print(f"pipeline, batch {b} ({prec.name}, channels-last {prec.channels_last}): general "
          f"{summary['general']['pipeline_ms']:.2f} ms, direct {summary['direct']['pipeline_ms']:.2f} ms "
          f"({rec['pipeline_speedup']}x)")
    print(f"fastresnet_s train step: general {summary['general']['steps_per_s']:.3f} steps/s, direct "
          f"{summary['direct']['steps_per_s']:.3f} steps/s ({rec['step_speedup']}x)")
    record("bench_cuda_path_cpu", rec)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
