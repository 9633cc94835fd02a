"""``resnetlab demo``: the whole workflow on data shipped with the package, in about a minute on a CPU."""

from __future__ import annotations

from pathlib import Path

from resnetlab.data.builtin import resolve_builtin

DEMOS = {
    # MNIST subset, 28x28 gray: CIFAR-style ResNet-20; no flips (a mirrored digit is another symbol).
    "image": {"data": "builtin:digits", "arch": "resnet20", "epochs": 5, "batch_size": 64, "flip": False},
    # FSDD subset (8 kHz): a 1-D TC-ResNet over 40 log-mel bands; SpecAugment off on this small clean set
    # (it cost 0.7 points on FSDD, BENCHMARKS.md).
    "speech": {"data": "builtin:spoken-digits", "arch": "tc_resnet8", "epochs": 30, "batch_size": 32,
               "spec_augment": False},
}


def run_demo(task: str = "image", epochs: int | None = None, out: str | None = None, quiet: bool = False) -> dict:
    """Train on the embedded data set (validating on a part of its train split), evaluate the best checkpoint on
    its test split, predict three files; returns the figures."""
    from resnetlab.api import evaluate, predict, train

    if task not in DEMOS:
        raise ValueError(f"unknown demo task {task!r}; allowed: {', '.join(DEMOS)}")
    preset = dict(DEMOS[task])
    if epochs:
        preset["epochs"] = epochs
    run_dir = out or f"runs/demo-{task}"
    print(f"== resnetlab demo ({task}): train {preset['arch']} on {preset['data']} ==", flush=True)
    result = train(out=run_dir, quiet=quiet, **preset)
    print("\n== the test split: the best checkpoint (chosen on the validation split carved out of train), "
          "evaluated once ==", flush=True)
    # train() evaluated it already (eval.json); evaluate() reads the same test split (a later evaluation's way)
    summary = result.test or evaluate(result.run_dir, preset["data"], log=lambda m: None)
    print(f"test top-1 {summary['top1']:.4f} on {summary['n']} samples (macro F1 {summary['macro_f1']:.4f})")
    test_dir = Path(resolve_builtin(preset["data"])) / "test"
    files = [sorted(d.iterdir())[0] for d in sorted(test_dir.iterdir()) if d.is_dir()][:3]
    print("\n== predict ==", flush=True)
    for r in predict(result.run_dir, [str(f) for f in files], top_k=3):
        tops = ", ".join(f"{t['label']} ({t['prob']:.3f})" for t in r["top_k"])
        print(f"{Path(r['file']).parent.name}/{Path(r['file']).name}: {tops}")
    print(f"\nrun directory: {result.run_dir}\nreport: {result.report}")
    print(f"next: resnetlab predict {result.run_dir} YOUR_FILES... | resnetlab evaluate {result.run_dir} --data DIR")
    return {"run_dir": str(result.run_dir), "test_top1": summary["top1"], "seconds": result.seconds}
