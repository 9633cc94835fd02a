"""One training epoch over the CIFAR-10 test split (10,000 JPEGs in class folders) with resnet20, end to end.

resnetlab: ``resnetlab.train(data=cifar10/test, arch="resnet20", epochs=1, val_fraction=0)`` with everything
else at its defaults. Cold: a fresh cache folder, so the call scans, decodes every JPEG once into the cache and
then trains; warm: the same call again, reading the cache built by the cold run.

Baseline: torchvision ``ImageFolder`` + ``DataLoader(num_workers=2, shuffle=True)`` with the usual
``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize``, and the same resnet20
(``resnetlab.create_model('resnet20', num_classes=10)``) in a plain fp32 NCHW loop with ``torch.optim.SGD``, at the
batch size resnetlab chose. The baseline has no cache, so its "cold" and "warm" runs do the same work (the
JPEGs sit in the OS page cache for both sides after unpacking).

Runs alternate: resnetlab cold, baseline, resnetlab warm, baseline (and one more warm pair without --quick).
Figures: wall time of the whole call (what a user waits for, including resnetlab's checkpoints and run report)
and of the epoch loop alone, and the CPU seconds of each side (with the baseline's DataLoader workers), which
contention from other jobs inflates less than wall time; the target is on the warm whole-call ratio.

    .venv/bin/python benchmarks/bench_pipeline.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import resnetlab  # noqa: E402
from _common import (  # noqa: E402
    add_threads_arg,
    apply_threads,
    dataset,
    machine,
    median,
    print_machine,
    record,
    scratch,
    verdict,
)

TARGET = 3.0
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def cpu_seconds() -> float:
    """CPU seconds of this process (all threads) and of its reaped children (DataLoader workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run_resnetlab(data: Path, cache: Path, out: Path) -> dict:
    c0, t0 = cpu_seconds(), time.perf_counter()
    res = resnetlab.train(data=str(data), arch="resnet20", epochs=1, val_fraction=0.0, cache_dir=str(cache),
                          out=str(out), quiet=True, log=lambda m: None)
    total = time.perf_counter() - t0
    cpu = cpu_seconds() - c0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    epoch_s = metrics[0]["seconds"]
    return {"total_s": round(total, 2), "epoch_loop_s": round(epoch_s, 2), "other_s": round(total - epoch_s, 2),
            "cpu_s": round(cpu, 2), "train_acc": round(metrics[0]["train_acc"], 4), "batch_size": res.config.batch_size,
            "loadavg_after": round(os.getloadavg()[0], 2)}


def run_baseline(data: Path, batch_size: int, workers: int) -> dict:
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    c0, t0 = cpu_seconds(), time.perf_counter()
    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
    ds = ImageFolder(str(data), transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         drop_last=True)
    model = resnetlab.create_model("resnet20", num_classes=len(ds.classes))
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1 * batch_size / 128, momentum=0.9, weight_decay=5e-4)
    crit = torch.nn.CrossEntropyLoss()
    t1 = time.perf_counter()
    correct = seen = 0
    for x, y in loader:
        logits = model(x)
        loss = crit(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
    del loader  # workers exit and are reaped, so their CPU time is counted
    end = time.perf_counter()
    return {"total_s": round(end - t0, 2), "epoch_loop_s": round(end - t1, 2), "other_s": round(t1 - t0, 2),
            "cpu_s": round(cpu_seconds() - c0, 2), "loadavg_after": round(os.getloadavg()[0], 2),
            "train_acc": round(correct / max(seen, 1), 4), "batch_size": batch_size, "num_workers": workers}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one warm pair instead of two")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the baseline")
    add_threads_arg(ap)
    args = ap.parse_args(argv)
    apply_threads(args.threads)
    info = machine()
    print_machine(info)
    data = dataset("cifar10") / "test"
    cache = scratch("pipeline-cache")
    runs = scratch("pipeline-runs")
    torch.manual_seed(0)

    lab, base = [], []

    def do_lab(kind: str) -> dict:
        r = run_resnetlab(data, cache, runs / f"{kind}-{len(lab)}")
        r["kind"] = kind
        lab.append(r)
        print(f"resnetlab {kind}: {r['total_s']:.1f} s total (epoch loop {r['epoch_loop_s']:.1f} s, "
              f"other {r['other_s']:.1f} s; CPU {r['cpu_s']:.0f} s), batch {r['batch_size']}", flush=True)
        return r

    def do_base() -> dict:
        r = run_baseline(data, lab[0]["batch_size"], args.workers)
        base.append(r)
        print(f"baseline run {len(base)}: {r['total_s']:.1f} s total (epoch loop {r['epoch_loop_s']:.1f} s, "
              f"setup {r['other_s']:.1f} s; CPU {r['cpu_s']:.0f} s), batch {r['batch_size']}, {args.workers} workers",
              flush=True)
        return r

    do_lab("cold")
    do_base()
    for _ in range(1 if args.quick else 2):
        do_lab("warm")
        do_base()

    cold = lab[0]
    warm = [r for r in lab if r["kind"] == "warm"]
    base_total = median([r["total_s"] for r in base])
    base_loop = median([r["epoch_loop_s"] for r in base])
    warm_total = median([r["total_s"] for r in warm])
    warm_loop = median([r["epoch_loop_s"] for r in warm])
    pairs = [round(b["total_s"] / a["total_s"], 3) for a, b in zip(lab, base)]  # each run and the next baseline
    summary = {
        "pair_ratios_total": pairs,
        "warm_cpu_ratio": round(median([r["cpu_s"] for r in base]) / median([r["cpu_s"] for r in warm]), 3),
        "cold_ratio_total": round(base_total / cold["total_s"], 3),
        "warm_ratio_total": round(base_total / warm_total, 3),
        "warm_ratio_epoch_loop": round(base_loop / warm_loop, 3),
        "resnetlab_cold_total_s": cold["total_s"], "resnetlab_warm_total_s": warm_total,
        "resnetlab_warm_epoch_loop_s": warm_loop, "baseline_total_s": base_total, "baseline_epoch_loop_s": base_loop,
        "target": TARGET, "met": base_total / warm_total >= TARGET,
    }
    print(f"cold: resnetlab {cold['total_s']:.1f} s vs baseline {base_total:.1f} s -> "
          f"{summary['cold_ratio_total']:.2f}x", flush=True)
    print(f"warm: resnetlab {warm_total:.1f} s vs baseline {base_total:.1f} s -> {summary['warm_ratio_total']:.2f}x "
          f"(epoch loop alone {warm_loop:.1f} s vs {base_loop:.1f} s -> {summary['warm_ratio_epoch_loop']:.2f}x); "
          f"target >= {TARGET}x warm: {verdict(summary['met'])}; CPU-time ratio warm {summary['warm_cpu_ratio']:.2f}x; "
          f"per-pair ratios {pairs}", flush=True)
    record("bench_pipeline", {**info, "quick": args.quick, "data": "cifar10/test (10,000 JPEGs)", "arch": "resnet20",
                              "resnetlab_runs": lab, "baseline_runs": base, **summary})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
