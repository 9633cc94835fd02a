"""Hostile files through the CLI: what each one gets, how long until the one-line error, and the peak memory.

    python benchmarks/bench_hostile_files.py [--repeats 3] [--mnist]

Builds each file with the builders the tests use (tests/hostile_files.py) and runs the command a user would, in a
fresh process: ``resnetlab predict RUN FILE`` for data files (RUN: a run directory with fresh weights, image or
audio), ``resnetlab finetune --pretrained FILE --data builtin:digits`` for weights files (read before any data).
Each case's time is the median of ``--repeats`` runs. The start-up figure is the same command on a good file of
the same kind (predict: start-up, model load and one prediction; finetune: a missing file, so start-up only), and
"beyond start-up" is the difference, which a busy machine makes noisy; so the step that meets the file (the
decoder a predict run uses, or reading the weights) is also timed inside one process ("in process": the time to
the error). Peak RSS is the child's ``ru_maxrss``. Target (issue 15): a one-line error in under 1 s (in process)
for a file under 1 MB, a non-zero exit and no traceback. ``--mnist`` also times the cache key's content
fingerprint over MNIST's 70,000 files against the stat-only key. Results: benchmarks/results/bench_hostile_files.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the hostile-file builders

import hostile_files  # noqa: E402
from _common import RESULTS, ROOT, machine  # noqa: E402

RUN_ONE = ("import resource, subprocess, sys, time\n"
           "t = time.perf_counter()\n"
           "r = subprocess.run(sys.argv[1:], capture_output=True, text=True, timeout=600)\n"
           "dt = time.perf_counter() - t\n"
           "import json\n"
           "print(json.dumps({'rc': r.returncode, 'seconds': dt, 'stdout': r.stdout, 'stderr': r.stderr,\n"
           "                  'maxrss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))\n")


def run_cli(args: list[str]) -> dict:
    """One ``resnetlab ...`` in a fresh process (its own parent, so ru_maxrss is that command's alone)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, "-c", RUN_ONE, sys.executable, "-m", "resnetlab", *args],
                         capture_output=True, text=True, env=env, timeout=900)
    return json.loads(out.stdout)


def message(r: dict, path: Path) -> str:
    """The line that answers for the file: predict prints ``FILE: error: ...``; other errors go to stderr."""
    for line in (r["stdout"] + r["stderr"]).splitlines():
        if str(path) in line or "error" in line:
            return line.replace(str(path.parent) + "/", "")
    return (r["stdout"] + r["stderr"]).strip().splitlines()[-1] if (r["stdout"] + r["stderr"]).strip() else ""


def build(work: Path) -> tuple[list[tuple[str, str, Path]], dict[str, Path]]:
    from safetensors.torch import save_file

    from deploy_helpers import make_run, write_image, write_wave

    runs = {"image": make_run(work / "run-image", img_size=32),
            "audio": make_run(work / "run-audio", modality="audio", sample_rate=16000, num_samples=16000)}
    good = {"image": write_image(work / "good.png", size=32), "audio": work / "good.wav",
            "weights": work / "missing.keras"}
    write_wave(good["audio"], sample_rate=16000, seconds=1.0)
    cases = []

    def data(name: str, kind: str, filename: str, content: bytes) -> None:
        (work / filename).write_bytes(content)
        cases.append((name, kind, work / filename))

    data("WAV declaring 600,000,000 Hz (8 KB)", "audio", "rate600M.wav", hostile_files.wav(600_000_000, 4000))
    data("WAV declaring 1 Hz (100 KB)", "audio", "rate1.wav", hostile_files.wav(1, 50_000))
    data("FLAC declaring 2**36-1 frames", "audio", "frames.flac", hostile_files.flac(declared_frames=2**36 - 1))
    data("FLAC declaring 2**26 frames (under the sample cap)", "audio", "frames26.flac",
         hostile_files.flac(declared_frames=2**26))
    data("EPS named x.png", "image", "eps.png", hostile_files.EPS)
    data("PNG of 7000x7000 = 49 MP (under the 50 MP cap)", "image", "big49mp.png", hostile_files.big_png(7000))
    data("PNG header declaring 65535x65535", "image", "bomb.png", hostile_files.png(declared=(65535, 65535)))
    data(".keras with a 512 MiB zero member (zip bomb)", "weights", "bomb.keras", hostile_files.keras_zip_bomb())
    hostile_files.h5_external_link(work / "external.weights.h5", str(work / "good.png"))
    cases.append(("HDF5 weights with an external link", "weights", work / "external.weights.h5"))
    save_file({"conv1.weight": __import__("torch").zeros(1)}, str(work / "outside.safetensors"))
    index = hostile_files.shard_folder(work / "sharded", "../outside.safetensors")
    cases.append(("shard index naming ../outside.safetensors", "weights", index))
    return cases, {**{k: v for k, v in runs.items()}, **{f"good-{k}": v for k, v in good.items()}}


def command(kind: str, path: Path, runs: dict, work: Path) -> list[str]:
    if kind == "weights":
        return ["finetune", "--pretrained", str(path), "--data", "builtin:digits", "--out", str(work / "ft")]
    return ["predict", str(runs[kind]), str(path), "--device", "cpu"]


def in_process_seconds(kind: str, path: Path, runs: dict, repeats: int) -> tuple[float, str]:
    """Median seconds of the step that meets the file (decoding it, or reading the weights) inside one process,
    and its outcome: the time to the error without the CLI's start-up, which on a busy machine is the steadier
    figure."""
    from resnetlab.data.errors import DataError
    from resnetlab.data.prepare import decoder_for
    from resnetlab.models.pretrained import read_pretrained
    from resnetlab.training.checkpoint import read_checkpoint

    if kind == "weights":
        step = read_pretrained
    else:
        _, meta = read_checkpoint(runs[kind] / "checkpoints" / "best.safetensors")
        step = decoder_for(meta["pipeline"])[0]
    times, outcome = [], ""
    for _ in range(repeats):
        t = time.perf_counter()
        try:
            step(str(path))
            outcome = "decoded"
        except (DataError, ValueError, OSError) as e:
            outcome = f"{type(e).__name__}: {str(e).replace(str(path.parent) + '/', '')}"
        times.append(time.perf_counter() - t)
    return statistics.median(times), outcome


def median_run(args: list[str], repeats: int) -> dict:
    rs = [run_cli(args) for _ in range(repeats)]
    best = rs[0]
    best["seconds_all"] = [round(r["seconds"], 3) for r in rs]
    best["seconds"] = statistics.median(r["seconds"] for r in rs)
    best["maxrss_kb"] = max(r["maxrss_kb"] for r in rs)
    return best


def fingerprint_cost(log) -> dict:
    """The cache key over MNIST's files: stat only (the old key) against stat + BLAKE2b of the content (the new)."""
    import hashlib

    from _common import dataset
    from resnetlab.data.cache import file_fingerprint

    root = dataset("mnist", log=log)
    files = sorted(str(p) for p in root.rglob("*.png"))

    def stat_only():
        h = hashlib.sha256()
        for p in files:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}".encode())

    def with_content():
        h = hashlib.sha256()
        for p in files:
            size, mtime, content = file_fingerprint(p)
            h.update(f"{p}\0{size}\0{mtime}\0".encode() + content)

    times = {"stat_only_s": [], "stat_and_blake2b_s": []}
    for _ in range(3):  # interleaved, warm page cache after the first pass
        for name, fn in (("stat_only_s", stat_only), ("stat_and_blake2b_s", with_content)):
            t = time.perf_counter()
            fn()
            times[name].append(round(time.perf_counter() - t, 3))
    return {"files": len(files), "bytes": sum(os.path.getsize(p) for p in files),
            **{k: {"median": statistics.median(v), "all": v} for k, v in times.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mnist", action="store_true", help="also time the cache key's fingerprint over MNIST")
    args = ap.parse_args()
    info = machine()
    sys.path.insert(0, str(ROOT / "src"))
    with tempfile.TemporaryDirectory(prefix="hostile-") as tmp:
        work = Path(tmp)
        cases, runs = build(work)
        startup = {kind: median_run(command(kind, runs[f"good-{kind}"], runs, work), args.repeats)
                   for kind in ("image", "audio", "weights")}
        for kind, r in startup.items():
            print(f"start-up ({kind}): {r['seconds']:.2f} s, rc {r['rc']}, peak RSS {r['maxrss_kb'] / 1024:.0f} MiB")
        rows = []
        for name, kind, path in cases:
            r = median_run(command(kind, path, runs, work), args.repeats)
            size = path.stat().st_size
            beyond = r["seconds"] - startup[kind]["seconds"]
            row = {"case": name, "file_bytes": size, "command": "resnetlab " + " ".join(
                       a.replace(str(work) + "/", "") for a in command(kind, path, runs, work)),
                   "rc": r["rc"], "message": message(r, path), "seconds": round(r["seconds"], 3),
                   "seconds_all": r["seconds_all"], "beyond_startup_s": round(beyond, 3),
                   "peak_rss_mib": round(r["maxrss_kb"] / 1024), "traceback": "Traceback" in r["stderr"]}
            row["in_process_s"], row["in_process_outcome"] = in_process_seconds(kind, path, runs, args.repeats)
            row["in_process_s"] = round(row["in_process_s"], 4)
            row["target_met"] = (size < 1 << 20 and row["in_process_s"] < 1.0 and r["rc"] != 0
                                 and "Traceback" not in r["stderr"])
            rows.append(row)
            print(f"{name}: rc {row['rc']}, CLI {row['seconds']:.2f} s ({beyond:+.2f} s beyond start-up), in process "
                  f"{row['in_process_s'] * 1000:.1f} ms, {row['peak_rss_mib']} MiB: {row['message']}")
    out = {"machine": info, "command": "python benchmarks/bench_hostile_files.py " + " ".join(sys.argv[1:]),
           "startup": {k: {"seconds": round(v["seconds"], 3), "seconds_all": v["seconds_all"], "rc": v["rc"],
                           "peak_rss_mib": round(v["maxrss_kb"] / 1024)} for k, v in startup.items()},
           "cases": rows}
    if args.mnist:
        out["cache_key_fingerprint"] = fingerprint_cost(print)
        print("cache key over MNIST:", json.dumps(out["cache_key_fingerprint"]))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_hostile_files.json").write_text(json.dumps(out, indent=1))
    print(f"written {RESULTS / 'bench_hostile_files.json'}")


if __name__ == "__main__":
    main()
