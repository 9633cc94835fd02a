"""Inference latency and throughput: resnetlab's predict path on each backend vs torchvision eager and onnxruntime.

Model: ResNet-50 at 224x224, 1000 classes, seeded random weights (the same weights in every candidate:
resnetlab's ResNet keeps torchvision's parameter names, so ``load_state_dict`` copies them). Batches of 1 and 32.

Candidates, all fed the same batch:

- ``torchvision``: ``torchvision.models.resnet50()`` fp32, NCHW, eager, ``torch.no_grad()``, on a ready
  normalised float input (the baseline; its preprocessing is not timed).
- ``resnetlab/<backend>``: ``Predictor.logits`` on a uint8 batch, as ``predict`` and ``serve`` call it: the
  preprocessing (x / 255, mean/std) is inside the timed call. Backends: ``eager`` (fp32 channels-last),
  ``bf16`` (bf16 weights, channels-last), ``onnxruntime`` (the exported graph with preprocessing), and
  ``auto`` (what the Predictor picks by default here).
- ``compile``: ``torch.compile`` of the bf16 channels-last network (``--compile``; minutes to compile on a CPU).
- ``onnxruntime``: an ``onnxruntime.InferenceSession`` on the same exported .onnx file, called directly on the
  uint8 numpy batch (onnxruntime alone, no resnetlab code in the loop).

Timing: warm-up calls first; then rounds in which every candidate runs once, in turn, so a burst of load from
other processes on this shared machine hits all of them alike. Figures are per-candidate medians of the
rounds; ratios are of medians. The load average is printed at the start and recorded at the end.

    .venv/bin/python benchmarks/bench_inference.py [--quick] [--batches 1 32] [--compile] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402

from _common import machine, median, print_machine, record, scratch, verdict  # noqa: E402
from resnetlab.data.image_pipeline import ImagePipeline  # noqa: E402
from resnetlab.deploy.predictor import Predictor  # noqa: E402
from resnetlab.models import create_model  # noqa: E402
from resnetlab.training.checkpoint import save_checkpoint  # noqa: E402

TARGET = 1.5  # resnetlab's best vs torchvision eager
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def write_run(root: Path, arch: str = "resnet50", size: int = 224, classes: int = 1000) -> tuple[Path, dict]:
    """A run directory holding ``arch`` with seeded random weights (BN statistics made non-trivial)."""
    torch.manual_seed(0)
    model = create_model(arch, num_classes=classes)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    pipe = ImagePipeline((size, size), 3, MEAN, STD, classes)
    meta = {"arch": arch, "num_classes": classes, "in_chans": 3, "model_overrides": {},
            "classes": [f"class{i}" for i in range(classes)], "modality": "image", "pipeline": pipe.config()}
    state = model.state_dict()
    save_checkpoint(root / "checkpoints" / "best.safetensors", {f"model.{k}": v for k, v in state.items()}, meta)
    return root, state


def candidates(run: Path, state: dict, threads: int, compile_: bool, log) -> tuple[dict, dict]:
    """name -> (prepare(x_uint8) -> args, fn(args) -> logits as numpy)."""
    import onnxruntime as ort

    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    tv = torchvision.models.resnet50().eval()
    tv.load_state_dict(state)

    def tv_prep(x):
        return (x.float() / 255 - mean) / std

    def tv_run(inp):
        with torch.no_grad():
            return tv(inp).numpy()

    out = {"torchvision": (tv_prep, tv_run)}
    preds, setup = {}, {}
    for backend in ("eager", "bf16", "onnxruntime"):
        t0 = time.perf_counter()
        preds[backend] = Predictor.load(run, backend=backend, device="cpu", threads=threads, log=log)
        setup[f"resnetlab/{backend}"] = round(time.perf_counter() - t0, 1)
        out[f"resnetlab/{backend}"] = (lambda x: x, lambda x, p=preds[backend]: p.logits(x).numpy())
    auto = Predictor.load(run, backend="auto", device="cpu", threads=threads)
    log(f"Predictor backend 'auto' resolves to {auto.backend!r} on this machine")
    onnx_file = preds["onnxruntime"].onnx_path  # onnxruntime alone, on the file the Predictor exported
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(onnx_file), opts, providers=["CPUExecutionProvider"])
    out["onnxruntime"] = (lambda x: x.numpy(), lambda a: sess.run(None, {"input": a})[0])
    if compile_:
        import copy

        net = copy.deepcopy(preds["eager"].model).to(torch.bfloat16).to(memory_format=torch.channels_last)
        t0 = time.perf_counter()
        comp = torch.compile(net, dynamic=False)

        def comp_prep(x):
            return tv_prep(x).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)

        def comp_run(inp):
            with torch.inference_mode():
                return comp(inp).float().numpy()

        comp_run(comp_prep(torch.zeros(1, 3, 224, 224, dtype=torch.uint8)))
        setup["compile(bf16)"] = round(time.perf_counter() - t0, 1)
        out["compile(bf16)"] = (comp_prep, comp_run)
    return out, {"setup_s": setup, "auto": auto.backend}


def measure(cands: dict, batch: int, rounds: int, warmup: int, log) -> dict:
    x = torch.from_numpy(np.random.default_rng(batch).integers(0, 256, (batch, 3, 224, 224), dtype=np.uint8))
    ref = None
    agree = {}
    for name, (prep, fn) in cands.items():  # warm-up (and, for torch.compile, one compile per batch size)
        args = prep(x)
        for _ in range(warmup):
            y = fn(args)
        y = np.asarray(y, dtype=np.float32)
        if ref is None:
            ref = y
        p, q = torch.from_numpy(ref).softmax(1), torch.from_numpy(y).softmax(1)
        agree[name] = {"max_abs_logit_diff": float(np.abs(y - ref).max()),
                       "max_abs_prob_diff": float((p - q).abs().max()),
                       "top1_agreement": float((p.argmax(1) == q.argmax(1)).float().mean())}
    times = {name: [] for name in cands}
    for r in range(rounds):
        order = list(cands) if r % 2 == 0 else list(reversed(cands))  # alternate who goes first
        for name in order:
            prep, fn = cands[name]
            t0 = time.perf_counter()
            fn(prep(x))
            times[name].append(time.perf_counter() - t0)
    res = {}
    for name, ts in times.items():
        m = median(ts)
        res[name] = {"median_ms": round(m * 1000, 2), "per_s": round(batch / m, 1), "rounds": len(ts), **agree[name]}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--rounds", type=int, nargs="+", default=None, help="rounds per batch size (default 21 / 7)")
    ap.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (minutes of compilation)")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    args = ap.parse_args()
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    info = machine()
    print_machine(info)
    run, state = write_run(scratch("bench-inference"))
    cands, extra = candidates(run, state, threads, args.compile, log=print)
    print(f"setup seconds (load + export): {extra['setup_s']}", flush=True)
    rounds = args.rounds or [3 if args.quick else (21 if b == 1 else 7) for b in args.batches]
    results = {}
    for batch, n in zip(args.batches, rounds):
        results[batch] = measure(cands, batch, n, warmup=1 if args.quick else 3, log=print)
        tv = results[batch]["torchvision"]["median_ms"]
        ort_ms = results[batch]["onnxruntime"]["median_ms"]
        print(f"\nbatch {batch} ({n} rounds; load average now {[round(v, 2) for v in __import__('os').getloadavg()]})")
        print(f"{'candidate':<22} {'median ms':>10} {'img/s':>8} {'vs tv':>6} {'vs ort':>7} {'top-1 agree':>11} "
              f"{'max |dp|':>9}")
        for name, r in results[batch].items():
            print(f"{name:<22} {r['median_ms']:>10.1f} {r['per_s']:>8.1f} {tv / r['median_ms']:>6.2f} "
                  f"{ort_ms / r['median_ms']:>7.2f} {r['top1_agreement']:>11.3f} {r['max_abs_prob_diff']:>9.2e}")
    best = {b: min((n for n in r if n.startswith("resnetlab/")), key=lambda n: r[n]["median_ms"])
            for b, r in results.items()}
    auto = f"resnetlab/{extra['auto']}"
    print()
    for b, r in results.items():
        speedup = r["torchvision"]["median_ms"] / r[auto]["median_ms"]
        vs_ort = r["onnxruntime"]["median_ms"] / r[auto]["median_ms"]
        print(f"batch {b}: resnetlab default ({extra['auto']}) {speedup:.2f}x torchvision eager "
              f"[target {TARGET}x: {verdict(speedup >= TARGET)}]; {vs_ort:.2f}x onnxruntime alone "
              f"[never slower (within 5% noise): {verdict(vs_ort >= 0.95)}]; fastest resnetlab backend: {best[b]}")
    record("bench_inference", {"machine": info, "threads": threads, "auto_backend": extra["auto"],
                               "setup_s": extra["setup_s"], "results": {str(b): r for b, r in results.items()},
                               "quick": args.quick})


if __name__ == "__main__":
    main()
