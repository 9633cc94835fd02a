"""Run every benchmark of the image-training issue in sequence (each appends to benchmarks/results/NAME.json).

    .venv/bin/python benchmarks/run_all.py [--quick] [--only bench_throughput bench_pipeline ...]

Each script runs in its own process (a crash or a memory peak in one does not touch the others); the exit
status is non-zero when any script failed. ``gpu_cifar10.py`` runs only where CUDA is available (else its
``--cpu-smoke`` mode).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["bench_precision", "bench_throughput", "bench_pipeline", "bench_memory", "bench_mnist", "bench_cifar10_cpu",
           "gpu_cifar10"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="pass --quick to every script (smoke runs)")
    ap.add_argument("--only", nargs="+", choices=SCRIPTS, default=SCRIPTS)
    args = ap.parse_args(argv)
    failed = []
    for name in args.only:
        cmd = [sys.executable, str(HERE / f"{name}.py")]
        if name == "gpu_cifar10":
            import torch

            if not torch.cuda.is_available():
                cmd.append("--cpu-smoke")
        elif args.quick:
            cmd.append("--quick")
        print(f"\n=== {' '.join(cmd[1:])} (load average {os.getloadavg()[0]:.2f})", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, cwd=HERE.parent)
        print(f"=== {name}: exit {rc}, {time.perf_counter() - t0:.0f} s", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
