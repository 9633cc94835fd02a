"""Every CUDA check of issue 18 in one call, sized for a lent H200 (about 8 of its 15 minutes; each step has its
own time limit, so a rerun fits in the rest). On a device machine, from the repository root:

    # here, once, in the session's checkout (.cache is git-ignored; add .whl to .git/info/exclude): the CIFAR-10
    # tarball, and the wheels of the one dependency the device image lacks (soundfile, with cffi and pycparser)
    mkdir -p .cache/data && cp ../shared/data/cifar10.tar.gz .cache/data/
    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl soundfile cffi pycparser
    # then one device call (carry: .cache/data and .whl; timeout_s 600):
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site || exit; PYTHONUNBUFFERED=1 python3 benchmarks/gpu_all.py

Steps, in order; each writes ``$OUT/gpu_<step>.json`` (or ``--out``) as soon as it finishes, and
``gpu_all.json`` sums them up after every step:

1. ``tests``: ``pytest -m gpu`` (every gpu-marked test: bf16 channels-last step, fused optimizer, compile, EMA,
   resume CPU<->CUDA, export/predict, server, NCCL under torchrun, audio CUDA vs CPU, determinism per family).
2. ``cifar_fast``: ``gpu_cifar10.py``'s fast recipe (airbench94's on fastresnet) over ``--seeds`` seeds (default
   5): mean test accuracy (goal >= 94.0%) and the training time per run without compilation (goal <= 2.5 s;
   airbench94: 3.83 s on an A100, 3.09 s compiled).
3. ``resnet20_paper``: He et al. 2015's ResNet-20 recipe (64k iterations): test accuracy (>= 91.25%) and time.
   Cut at its time limit if slower than planned: the record then says how far it got.
4. ``r50_train``: training throughput of ResNet-50 at 224 px, batch 256, synthetic uint8 data on the device:
   resnetlab's default CUDA path (``Trainer.train_step``: bf16 autocast, channels-last, its pipeline with crop and
   flip) against torchvision's resnet50 in a plain AMP bf16 channels-last loop, alternating; images/s and their
   ratio (goal >= 1.2x). Then the same trainer fed from a host (pinned) uint8 array instead of the device:
   the share of the synthetic rate the host data path keeps (goal >= 90%; GPU JPEG decoding is not measured).
5. ``inference``: ResNet-50 at 224, batch 1 and 256: resnetlab's ``Predictor`` (uint8 in, logits out, its
   preprocessing included) against torchvision eager fp32 and bf16 on the same uint8 batches, and onnxruntime's
   CUDA provider when it is installed.

``--smoke`` runs every step at toy size on the CPU (CIFAR subset of 20 images a class, 1 epoch; ResNet-18 for
ResNet-50, at 32 px, batch 4; the gpu tests skip): a check of the script itself, a few minutes on a laptop.

    python benchmarks/gpu_all.py --smoke --out /tmp/gpu-smoke
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

STEPS = ("tests", "cifar_fast", "resnet20_paper", "r50_train", "inference")
# seconds per step: about 8 minutes in all with the device's start-up, inside the device tool's 10-minute call
LIMITS = {"tests": 100, "cifar_fast": 130, "resnet20_paper": 150, "r50_train": 45, "inference": 35}
SMOKE_LIMITS = {"tests": 300, "cifar_fast": 300, "resnet20_paper": 300, "r50_train": 120, "inference": 120}
ROOT = Path(__file__).resolve().parents[1]


# --- the parent: one child process per step, each with its own time limit ---------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="every step at toy size on the CPU")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "results" / "gpu_all"))
    ap.add_argument("--only", default=",".join(STEPS), help=f"comma-separated steps of {', '.join(STEPS)}")
    ap.add_argument("--seeds", type=int, default=None, help="cifar_fast runs (default 5; 2 with --smoke)")
    ap.add_argument("--limit", action="append", default=[], metavar="STEP=SECONDS", help="override a time limit")
    ap.add_argument("--step", default=None, help=argparse.SUPPRESS)  # a child: run this one step
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.step:
        return run_step(args.step, out, args.smoke, args.seeds)
    limits = dict(SMOKE_LIMITS if args.smoke else LIMITS)
    for item in args.limit:
        name, _, seconds = item.partition("=")
        limits[name] = float(seconds)
    steps = [s for s in args.only.split(",") if s]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise SystemExit(f"unknown step(s) {unknown}; allowed: {', '.join(STEPS)}")
    summary = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "smoke": args.smoke, "limits": limits, "steps": {}}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "PYTHONUNBUFFERED": "1"}
    t_all = time.perf_counter()
    for step in steps:
        cmd = [sys.executable, __file__, "--step", step, "--out", str(out)] + (["--smoke"] if args.smoke else [])
        if args.seeds:
            cmd += ["--seeds", str(args.seeds)]
        print(f"=== {step} (limit {limits[step]:.0f} s)", flush=True)
        t0 = time.perf_counter()
        status = "ok"
        try:
            done = subprocess.run(cmd, env=env, cwd=ROOT, timeout=limits[step])
            if done.returncode != 0:
                status = f"exit {done.returncode}"
        except subprocess.TimeoutExpired:
            status = "timed out"
        seconds = round(time.perf_counter() - t0, 1)
        rec_path = out / f"gpu_{step}.json"
        rec = json.loads(rec_path.read_text()) if rec_path.exists() else {}
        if status == "timed out" and step == "resnet20_paper":
            rec.update(_paper_progress(out))
        summary["steps"][step] = {"status": status, "seconds": seconds, **_headline(step, rec)}
        (out / "gpu_all.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(f"=== {step}: {status} in {seconds} s", flush=True)
    summary["total_s"] = round(time.perf_counter() - t_all, 1)
    (out / "gpu_all.json").write_text(json.dumps(summary, indent=1) + "\n")
    print("\nstep            status        seconds  headline")
    for step, s in summary["steps"].items():
        head = {k: v for k, v in s.items() if k not in ("status", "seconds")}
        print(f"{step:15s} {s['status']:13s} {s['seconds']:7.1f}  {json.dumps(head)}")
    print(f"total {summary['total_s']} s; records in {out}")
    return 0 if all(s["status"] == "ok" for s in summary["steps"].values()) else 1


def _headline(step: str, rec: dict) -> dict:
    keys = {"tests": ("passed", "failed", "skipped", "errors"),
            "cifar_fast": ("mean_acc", "mean_train_s_excl_compile", "runs", "met_acc", "met_time"),
            "resnet20_paper": ("final_acc", "train_loop_s", "epochs_done", "met"),
            "r50_train": ("resnetlab_img_s", "torchvision_img_s", "ratio", "host_data_share"),
            "inference": ("batch1_ms", "batch256_img_s", "batch4_img_s", "onnxruntime")}[step]
    return {k: rec[k] for k in keys if k in rec}


def _paper_progress(out: Path) -> dict:
    """How far a paper run cut by its time limit got (from its metrics.jsonl)."""
    metrics = Path(json.loads((out / ".paper_run").read_text())["run"]) / "metrics.jsonl" \
        if (out / ".paper_run").exists() else None
    if metrics is None or not metrics.exists():
        return {"epochs_done": 0}
    rows = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
    return {"epochs_done": len(rows), "train_loop_s": round(sum(r["seconds"] for r in rows), 1), "met": False}


# --- the children ------------------------------------------------------------------------------------------------


def run_step(step: str, out: Path, smoke: bool, seeds: int | None) -> int:
    import torch

    from _common import machine

    if not smoke and not torch.cuda.is_available():
        print(f"{step}: needs CUDA (torch.cuda.is_available() is False); use --smoke on the CPU", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    rec = {"step": step, "smoke": smoke, **machine()}
    if torch.cuda.is_available():
        rec["gpu"] = torch.cuda.get_device_name(0)
    rec.update({"tests": step_tests, "cifar_fast": step_cifar_fast, "resnet20_paper": step_paper,
                "r50_train": step_r50_train, "inference": step_inference}[step](out, smoke, seeds))
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    (out / f"gpu_{step}.json").write_text(json.dumps(rec, indent=1) + "\n")
    print(json.dumps({k: v for k, v in rec.items() if not isinstance(v, (list, dict))}), flush=True)
    return 0


def step_tests(out: Path, smoke: bool, seeds) -> dict:
    import re

    # (a test module that imports a package the device lacks must not stop the others from running)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "-rfEs",
           "--continue-on-collection-errors", "tests"]
    if smoke:  # on the CPU every gpu test skips: collect them all, run one file's worth
        cmd[-1] = "tests/test_cuda_path.py"
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    tail = (done.stdout + done.stderr)[-6000:]
    print(tail, flush=True)
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", tail)}
    return {"passed": counts.get("passed", 0), "failed": counts.get("failed", 0),
            "skipped": counts.get("skipped", 0), "errors": counts.get("error", 0) + counts.get("errors", 0),
            "failures": re.findall(r"^(?:FAILED|ERROR) (\S+)", tail, flags=re.M), "returncode": done.returncode,
            "command": " ".join(cmd[1:])}


def _cifar(smoke: bool):
    import _common
    import gpu_cifar10

    tarball = gpu_cifar10.find_tarball(None)
    _common.SHARED_DATA = tarball.parent
    data = _common.dataset("cifar10")
    if smoke:
        data = gpu_cifar10.smoke_subset(data, per_class=20)  # 200 images a split: seconds on a CPU
    return gpu_cifar10, data, _common.scratch("gpu-all-cache"), _common.scratch("gpu-all-runs")


def step_cifar_fast(out: Path, smoke: bool, seeds) -> dict:
    gpu_cifar10, data, cache, runs = _cifar(smoke)
    n = seeds or (2 if smoke else 5)
    device, compile_, epochs = ("cpu", False, 1) if smoke else ("cuda", True, None)
    results = []
    for seed in range(n):
        results.append(gpu_cifar10.run_recipe("fast", data, cache, runs, device, compile_, epochs, seed=seed))
        (out / "gpu_cifar_fast.partial.json").write_text(json.dumps(results))  # (not fetched: over the file count)
    accs = [r["final_acc"] for r in results]
    times = [r["train_loop_excl_compile_s"] for r in results]
    mean_acc = sum(accs) / len(accs)
    mean_t = sum(times) / len(times)
    return {"runs": len(results), "accs": accs, "mean_acc": round(mean_acc, 4), "train_s_excl_compile": times,
            "mean_train_s_excl_compile": round(mean_t, 3), "met_acc": mean_acc >= 0.94, "met_time": mean_t <= 2.5,
            "results": results}


def step_paper(out: Path, smoke: bool, seeds) -> dict:
    gpu_cifar10, data, cache, runs = _cifar(smoke)
    device, compile_, epochs = ("cpu", False, 1) if smoke else ("cuda", True, None)
    (out / ".paper_run").write_text(json.dumps({"run": str(runs / "paper-seed0")}))  # for a cut run's record
    r = gpu_cifar10.run_recipe("paper", data, cache, runs, device, compile_, epochs)
    (out / ".paper_run").unlink()
    return {**r, "epochs_done": len(r["val_acc_per_epoch"])}


def _timed(fn, steps: int, sync) -> float:
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return time.perf_counter() - t0


def step_r50_train(out: Path, smoke: bool, seeds) -> dict:
    import numpy as np
    import torch
    import torchvision

    from resnetlab.data.image_pipeline import ImagePipeline
    from resnetlab.data.loader import ArrayLoader
    from resnetlab.models import create_model
    from resnetlab.training.config import TrainConfig, make_config
    from resnetlab.training.engine import Trainer
    from resnetlab.training.precision import pick_precision

    dev = torch.device("cpu" if smoke else "cuda")
    size, batch, steps, rounds = (32, 4, 1, 1) if smoke else (224, 256, 15, 3)
    arch = "resnet18" if smoke else "resnet50"  # the smoke checks the script, not the model
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    x = np.random.default_rng(0).integers(0, 256, size=(batch * 4, 3, size, size), dtype=np.uint8)
    y = np.arange(len(x)) % 1000
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

    def trainer_for(on_device: bool) -> tuple[Trainer, ArrayLoader]:
        cfg = make_config(TrainConfig, {"batch_size": batch, "epochs": 1, "lr": 0.1, "weight_decay": 5e-5,
                                        "warmup_epochs": 0.0, "grad_norm_every": 0, "quiet": True,
                                        "out": str(out / ".r50-run")})
        loader = ArrayLoader(x, y, batch, shuffle=True, drop_last=True, device=dev, on_device=on_device)
        pipe = ImagePipeline((size, size), 3, mean, std, 1000, crop_pad=4 if smoke else 16)
        tr = Trainer(create_model(arch, num_classes=1000), pipe, loader, None, cfg, out / ".r50-run", {},
                     pick_precision(dev, "auto"), log=lambda m: None)
        tr._enter_phase(0)
        return tr, loader

    def resnetlab_steps(tr: Trainer, loader: ArrayLoader):
        batches = iter(())

        def one():
            nonlocal batches
            try:
                xb, yb, idx = next(batches)
            except StopIteration:
                batches = iter(loader.epoch(0, with_index=True))
                xb, yb, idx = next(batches)
            tr.train_step(xb, yb, idx)

        return one

    tr, loader = trainer_for(on_device=True)
    ours = resnetlab_steps(tr, loader)
    tv = getattr(torchvision.models, arch)().to(dev).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(tv.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-5, **(
        {"fused": True} if dev.type == "cuda" else {}))
    tv_x = torch.randn(batch, 3, size, size, device=dev).contiguous(memory_format=torch.channels_last)
    tv_y = torch.randint(0, 1000, (batch,), device=dev)

    def theirs():
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(tv(tv_x), tv_y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for fn in (ours, theirs):  # warm-up: cuDNN autotuning, allocator
        _timed(fn, 1 if smoke else 3, sync)
    rates = {"resnetlab": [], "torchvision": []}
    for _ in range(rounds):  # alternating, so drift in clocks or load hits both sides alike
        rates["resnetlab"].append(batch * steps / _timed(ours, steps, sync))
        rates["torchvision"].append(batch * steps / _timed(theirs, steps, sync))
    host_tr, host_loader = trainer_for(on_device=False)  # the same trainer, batches copied from pinned host memory
    host = resnetlab_steps(host_tr, host_loader)
    _timed(host, 1 if smoke else 3, sync)
    host_rate = [batch * steps / _timed(host, steps, sync) for _ in range(rounds)]
    best = {k: max(v) for k, v in rates.items()}
    return {"arch": arch, "size": size, "batch": batch, "steps_per_round": steps, "rounds": rounds, "rates": rates,
            "resnetlab_img_s": round(best["resnetlab"], 1), "torchvision_img_s": round(best["torchvision"], 1),
            "ratio": round(best["resnetlab"] / best["torchvision"], 3), "goal_ratio": 1.2,
            "host_data_img_s": round(max(host_rate), 1),
            "host_data_share": round(max(host_rate) / best["resnetlab"], 3), "goal_share": 0.9,
            "resnetlab_path": "Trainer.train_step, precision auto (bf16 on CUDA), channels-last, crop+flip pipeline"}


def step_inference(out: Path, smoke: bool, seeds) -> dict:
    import numpy as np
    import torch
    import torchvision

    from resnetlab.data.image_pipeline import ImagePipeline
    from resnetlab.deploy.predictor import Predictor
    from resnetlab.models import create_model
    from resnetlab.training.checkpoint import save_checkpoint

    dev = torch.device("cpu" if smoke else "cuda")
    size, batches, reps = (32, (1, 4), 1) if smoke else (224, (1, 256), 20)
    arch = "resnet18" if smoke else "resnet50"
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    pipe = ImagePipeline((size, size), 3, mean, std, 1000)
    model = create_model(arch, num_classes=1000).eval()
    run = out / ".r50-infer"
    meta = {"arch": arch, "num_classes": 1000, "in_chans": 3, "model_overrides": {},
            "classes": [str(i) for i in range(1000)], "modality": "image", "pipeline": pipe.config(),
            "precision": "bf16" if dev.type == "cuda" else "fp32"}
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    save_checkpoint(run / "checkpoints" / "best.safetensors", tensors, meta)
    tv = getattr(torchvision.models, arch)().eval().to(dev)
    mean_t = torch.tensor(mean, device=dev).view(1, 3, 1, 1) * 255
    std_t = torch.tensor(std, device=dev).view(1, 3, 1, 1) * 255

    def tv_fn(x, dtype):
        def run_():
            with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype is not None):
                xb = (torch.from_numpy(x).to(dev, non_blocking=True).float() - mean_t) / std_t
                return tv(xb.contiguous(memory_format=torch.channels_last) if dtype is not None else xb)
        return run_

    result = {"arch": arch, "size": size, "reps": reps}
    predictor = Predictor.load(run, backend="auto", device=dev.type)
    result["resnetlab_backend"] = predictor.backend
    ort = _ort_session(run, dev, result)
    for n in batches:
        x = np.random.default_rng(n).integers(0, 256, size=(n, 3, size, size), dtype=np.uint8)
        fns = {"resnetlab": lambda x=x: predictor.logits(x)}
        if ort is not None:
            fns["onnxruntime"] = lambda x=x: ort.run(None, {ort.get_inputs()[0].name: x})
        fns["torchvision_fp32"] = tv_fn(x, None)
        fns["torchvision_bf16"] = tv_fn(x, torch.bfloat16)
        row = {}
        for fn in fns.values():
            _timed(fn, 1 if smoke else 3, sync)
        for name, fn in fns.items():
            seconds = min(_timed(fn, reps, sync) for _ in range(1 if smoke else 3)) / reps
            row[name] = {"ms_per_batch": round(seconds * 1e3, 3), "img_s": round(n / seconds, 1)}
        result[f"batch{n}"] = row
        if n == 1:
            result["batch1_ms"] = {k: v["ms_per_batch"] for k, v in row.items()}
        else:
            result[f"batch{n}_img_s"] = {k: v["img_s"] for k, v in row.items()}
    return result


def _ort_session(run: Path, dev, result: dict):
    """onnxruntime on the exported model (preprocessing included), with the CUDA provider on a GPU; None (and why,
    in ``result``) when onnxruntime, its CUDA provider or the exporter is missing."""
    try:
        import onnxruntime

        from resnetlab.deploy.export import export_model
    except ImportError as e:
        result["onnxruntime"] = f"not installed ({e.name})"
        return None
    provider = "CUDAExecutionProvider" if dev.type == "cuda" else "CPUExecutionProvider"
    if provider not in onnxruntime.get_available_providers():
        result["onnxruntime"] = f"no {provider}"
        return None
    try:
        exported = export_model(run, "onnx", run / "model.onnx", dynamic_batch=True, check=False)
        session = onnxruntime.InferenceSession(str(exported.path), providers=[provider])
    except Exception as e:  # the exporter's own failure: recorded, the other figures still come
        result["onnxruntime"] = f"export or load failed: {str(e).splitlines()[0][:200]}"
        return None
    result["onnxruntime"] = provider
    return session


if __name__ == "__main__":
    raise SystemExit(main())
