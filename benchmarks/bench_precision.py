"""Where a CPU training step's time goes: precision, memory format and optimizer, one model at a time.

The bare step (forward, cross-entropy, backward, optimizer step on a ready float batch) of one model, in every
combination that ``precision.py`` chooses between: fp32 or bf16 autocast, NCHW or channels-last, and the
optimizer's per-tensor loop (PyTorch's default on the CPU) or its fused kernel (what resnetlab builds). The
variants alternate step by step; figures are medians. It explains the two speed benchmarks: the step
throughput's ceiling (``bench_throughput.py``: resnet18 / resnet50 at 64x64) and the pipeline's (``bench_pipeline``:
resnet20 at 32x32, where resnetlab's epoch loop takes about the bare step's time per batch).

    .venv/bin/python benchmarks/bench_precision.py [--quick] [--model resnet20:32 resnet18:64]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import add_threads_arg, apply_threads, machine, median, print_machine, record  # noqa: E402
from resnetlab import create_model  # noqa: E402
from resnetlab.training.precision import cpu_has_bf16  # noqa: E402

BATCH, CLASSES = 64, 10


def stepper(arch: str, size: int, bf16: bool, channels_last: bool, fused: bool):
    torch.manual_seed(0)
    model = create_model(arch, num_classes=CLASSES, in_chans=3)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4,
                          **({"fused": True} if fused else {}))
    x = torch.randn(BATCH, 3, size, size).contiguous(memory_format=fmt)
    y = torch.randint(0, CLASSES, (BATCH,))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def bench(arch: str, size: int, rounds: int) -> list[dict]:
    variants = {}
    for bf16, cl, fused in itertools.product((False, True), (False, True), (False, True)):
        if bf16 and not cpu_has_bf16():
            continue
        name = f"{'bf16' if bf16 else 'fp32'} {'channels-last' if cl else 'NCHW'} {'fused' if fused else 'loop'}"
        variants[name] = stepper(arch, size, bf16, cl, fused)
    for step in variants.values():  # warm-up: oneDNN primitive caches, allocator
        step()
        step()
    times = {name: [] for name in variants}
    for r in range(rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            t0 = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - t0)
    base = median(times["fp32 NCHW loop"])
    return [{"arch": arch, "size": size, "variant": name, "img_s": round(BATCH / median(t), 1),
             "vs_fp32_nchw_loop": round(base / median(t), 3)} for name, t in times.items()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds (smoke run)")
    ap.add_argument("--model", nargs="+", default=["resnet20:32", "resnet18:64", "resnet50:64"],
                    help="ARCH:SIZE pairs")
    add_threads_arg(ap)
    args = ap.parse_args(argv)
    apply_threads(args.threads)
    info = machine()
    print_machine(info)
    rows = []
    for spec in args.model:
        arch, size = spec.split(":")
        rounds = 3 if args.quick else (6 if arch == "resnet50" else 12)
        for row in bench(arch, int(size), rounds):
            rows.append(row)
            print(f"{arch} {size}x{size} batch {BATCH} {row['variant']:28s} {row['img_s']:8.1f} img/s "
                  f"{row['vs_fp32_nchw_loop']:5.2f}x", flush=True)
    record("bench_precision", {**info, "quick": args.quick, "batch": BATCH, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
