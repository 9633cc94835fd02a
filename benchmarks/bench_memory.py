"""Peak memory (RSS) of resnetlab on CIFAR-10 train (50,000 images) vs its test split (10,000): growth < 25%.

Each case runs in its own child process, which reports its peak resident set (``getrusage(RUSAGE_SELF).ru_maxrss``;
file-backed pages of the memory-mapped cache that the process touched count in it):

- ``floor``: the imports alone (torch, torchvision, resnetlab);
- ``cache-10k`` / ``cache-50k``: ``prepare_data`` into a fresh cache folder (decode every JPEG once);
- ``train-10k`` / ``train-50k``: ``resnetlab.train(epochs=1, val_fraction=0)`` on the warm cache: one full pass of
  the loader over every sample but the last partial batch (so every memmap page is touched), with a tiny model
  (``TINY``: a 7x7/2 stem and max-pool, one basic block of 8 channels; registered in the child) so that the pass is
  quick and the memory is the data path's, and the same batch size on both sides so that only the data size
  differs. The child also records its peak before the first step (scan, cache open, normalisation statistics)
  and, after resetting the peak through ``/proc/self/clear_refs``, the peak of the training pass alone.

    .venv/bin/python benchmarks/bench_memory.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import dataset, machine, print_machine, record, scratch, verdict  # noqa: E402

TARGET_GROWTH = 0.25
BATCH = 128
TINY = {"block": "basic", "layers": [1], "widths": [8], "strides": [1], "stem_width": 8}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def child(case: str, data: str, cache: str, out: str) -> dict:
    import torch  # noqa: F401
    import torchvision  # noqa: F401

    import resnetlab
    from resnetlab.data.prepare import prepare_data

    marks = {"after_imports_hwm_mb": _status_kb("VmHWM") / 1024}
    t0 = time.perf_counter()
    if case == "floor":
        pass
    elif case.startswith("cache"):
        prepared = prepare_data(data, val_fraction=0.0, cache_dir=cache, progress=False, log=lambda m: None)
        marks["samples"] = len(prepared.train)
        marks["cache_mb"] = prepared.train.x.nbytes / 2**20
    else:
        from resnetlab.models.registry import register_model
        from resnetlab.models.resnet import ResNet

        register_model("bench_tiny", ResNet, TINY, "tiny ResNet (memory benchmark)", "", (3, 32, 32))

        def log(msg: str) -> None:
            if "parameters;" in msg:  # run_training's first line: data prepared, statistics measured, model built
                marks["before_training_hwm_mb"] = _status_kb("VmHWM") / 1024
                try:  # reset the peak (Linux >= 4.0), so the training pass gets a peak of its own
                    Path("/proc/self/clear_refs").write_text("5")
                    marks["hwm_reset"] = True
                except OSError:
                    marks["hwm_reset"] = False

        res = resnetlab.train(data=data, arch="bench_tiny", epochs=1, batch_size=BATCH, val_fraction=0.0,
                              cache_dir=cache, out=out, quiet=True, log=log)
        metrics = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines() if x.strip()]
        n = sum(1 for p in Path(data).rglob("*") if p.is_file())
        marks["samples"] = n
        marks["samples_in_pass"] = n // BATCH * BATCH  # drop_last: the last partial batch of a shuffled epoch
        marks["epoch_s"] = metrics[0]["seconds"]
        marks["train_acc"] = round(res.best_acc, 4)
        marks["training_hwm_mb"] = _status_kb("VmHWM") / 1024
    marks["seconds"] = round(time.perf_counter() - t0, 1)
    # Linux: KiB. clear_refs resets this too, so the whole child's peak is the larger of the two spans.
    marks["peak_rss_mb"] = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                               marks.get("before_training_hwm_mb", 0.0))
    return {k: (round(v, 1) if isinstance(v, float) else v) for k, v in marks.items()}


def run_child(case: str, data: Path, cache: Path, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", case, str(data), str(cache), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"child {case} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        case, data, cache, out = sys.argv[2:6]
        print("RESULT " + json.dumps(child(case, data, cache, out)), flush=True)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="accepted for symmetry; every case is needed, so the "
                                                         "run is the same")
    args = ap.parse_args(argv)
    info = machine()
    print_machine(info)
    root = dataset("cifar10")
    cache = scratch("memory-cache")
    runs = scratch("memory-runs")
    cases = [("floor", root / "test"), ("cache-10k", root / "test"), ("cache-50k", root / "train"),
             ("train-10k", root / "test"), ("train-50k", root / "train")]
    results = {}
    for case, data in cases:
        r = run_child(case, data, cache, runs / case)
        results[case] = r
        print(f"{case:10s} peak RSS {r['peak_rss_mb']:7.1f} MB  {json.dumps(r)}", flush=True)
    growth_train = results["train-50k"]["peak_rss_mb"] / results["train-10k"]["peak_rss_mb"] - 1
    growth_cache = results["cache-50k"]["peak_rss_mb"] / results["cache-10k"]["peak_rss_mb"] - 1
    growth_pass = None
    if results["train-10k"].get("hwm_reset") and results["train-50k"].get("hwm_reset"):
        growth_pass = results["train-50k"]["training_hwm_mb"] / results["train-10k"]["training_hwm_mb"] - 1
        print(f"training pass alone (peak after the reset): {results['train-10k']['training_hwm_mb']:.0f} -> "
              f"{results['train-50k']['training_hwm_mb']:.0f} MB (+{growth_pass:.1%})", flush=True)
    summary = {"growth_train": round(growth_train, 4), "growth_cache_build": round(growth_cache, 4),
               "growth_training_pass": None if growth_pass is None else round(growth_pass, 4),
               "target_growth": TARGET_GROWTH, "met": growth_train < TARGET_GROWTH and growth_cache < TARGET_GROWTH}
    print(f"peak RSS 10k -> 50k: training +{growth_train:.1%} ({results['train-10k']['peak_rss_mb']:.0f} -> "
          f"{results['train-50k']['peak_rss_mb']:.0f} MB), cache build +{growth_cache:.1%} "
          f"({results['cache-10k']['peak_rss_mb']:.0f} -> {results['cache-50k']['peak_rss_mb']:.0f} MB); "
          f"target < {TARGET_GROWTH:.0%}: {verdict(summary['met'])}", flush=True)
    record("bench_memory", {**info, "quick": args.quick, "model": TINY, "batch_size": BATCH,
                            "cases": results, **summary})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
