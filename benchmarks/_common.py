"""Shared helpers of the benchmark scripts: machine facts, dataset unpacking, result records.

Every benchmark measures resnetlab and its baseline side by side in the same run (interleaved where it can),
because the machines these run on are shared and absolute times are noisy: ratios are the figures that matter.
Datasets are unpacked from ``/work/shared/data/*.tar.gz`` (or ``$RESNETLAB_BENCH_DATA``) into
``~/.cache/resnetlab-bench/data`` (or ``$RESNETLAB_BENCH_CACHE``), never into the repository.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHARED_DATA = Path(os.environ.get("RESNETLAB_BENCH_DATA", "/work/shared/data"))
BENCH_CACHE = Path(os.environ.get("RESNETLAB_BENCH_CACHE", "~/.cache/resnetlab-bench")).expanduser()

SHA256 = {
    "cifar10": "8ca1b30603d249b1e268d8208dfd5e14380f8f7a3a207a76ee95d5d528c7faca",
    "mnist": "d1fc139c87c53a5d1363e4c8767f67bb4ec6ee471790099bb5c0ea70aa510181",
}


def cpu_model() -> str:
    """The ``Model name`` line of ``lscpu`` (falls back to /proc/cpuinfo, then platform)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    """What a figure needs beside it to be read: CPU, cores, torch threads, load average, versions, commit."""
    import torch

    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": [round(v, 2) for v in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    try:
        from resnetlab.training.precision import cpu_has_bf16

        info["cpu_bf16"] = cpu_has_bf16()
    except ImportError:
        pass
    try:
        r = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                           text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"], capture_output=True,
                               text=True, timeout=5).stdout.strip()
        info["git"] = r.stdout.strip() + ("+dirty(src)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def add_threads_arg(ap) -> None:
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads for both sides (default: torch's own choice, one per core); "
                         "1 avoids the stalls of parallel regions when other jobs share the cores")


def apply_threads(n: int | None) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


def print_machine(info: dict) -> None:
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads)"
          f"{', ' + info['cuda'] if info.get('cuda') else ''}; load average at start {info['loadavg_start']}; "
          f"{info['date']}; commit {info.get('git', '?')}", flush=True)


def dataset(name: str, log=print) -> Path:
    """``BENCH_CACHE/data/<name>``, unpacked from ``<name>.tar.gz`` (checked against its SHA-256) on first use."""
    dest = BENCH_CACHE / "data"
    folder = dest / name
    stamp = dest / f".{name}.unpacked"
    if folder.is_dir() and stamp.exists():
        return folder
    tarball = SHARED_DATA / f"{name}.tar.gz"
    if not tarball.exists():
        raise SystemExit(f"{tarball} not found: set RESNETLAB_BENCH_DATA to the folder holding {name}.tar.gz")
    t0 = time.perf_counter()
    h = hashlib.sha256()
    with open(tarball, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if name in SHA256 and h.hexdigest() != SHA256[name]:
        raise SystemExit(f"{tarball}: SHA-256 {h.hexdigest()} differs from the documented {SHA256[name]}")
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tarball) as tar:
        if sys.version_info >= (3, 12):
            tar.extractall(dest, filter="data")
        else:
            tar.extractall(dest)
    stamp.write_text(h.hexdigest())
    log(f"unpacked {tarball.name} into {folder} in {time.perf_counter() - t0:.1f} s")
    return folder


def scratch(name: str) -> Path:
    """A fresh, empty folder ``BENCH_CACHE/<name>`` (removed first if it exists)."""
    import shutil

    path = BENCH_CACHE / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def cold_cache(data: Path, name: str, kind: str):
    """Decode ``data`` into a fresh cache folder ``BENCH_CACHE/<name>``, timed and printed.

    Returns ``(prepared, cache folder, seconds)``; ``kind`` names the files in the printed line ("JPEGs").
    """
    from resnetlab.data.prepare import prepare_data

    cache = scratch(name)
    t0 = time.perf_counter()
    prepared = prepare_data(str(data), cache_dir=str(cache), progress=False, log=lambda m: None)
    seconds = round(time.perf_counter() - t0, 1)
    n_val, n_test = (len(ds) if ds is not None else 0 for ds in (prepared.val, prepared.test))
    print(f"cache build (cold, {len(prepared.train)} train + {n_val} val + {n_test} test {kind}): {seconds} s",
          flush=True)
    return prepared, cache, seconds


def record(name: str, rec: dict) -> Path:
    """Append ``rec`` to ``benchmarks/results/<name>.json`` (a JSON list, one entry per run)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    runs = json.loads(path.read_text()) if path.exists() else []
    rec = {**rec, "loadavg_end": [round(v, 2) for v in os.getloadavg()]}
    runs.append(rec)
    path.write_text(json.dumps(runs, indent=1) + "\n")
    print(f"appended to {path.relative_to(ROOT)}", flush=True)
    return path


def median(values) -> float:
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


def verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"
