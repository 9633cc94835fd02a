"""Fine-tuning, measured: pretrain with resnetlab on a large set, fine-tune on a few labelled samples of another.

Image: resnet20 pretrained on the CIFAR-10 train split (45,000 RGB JPEGs, 32x32, 2 epochs; validated on the other
5,000, the official 10,000 test images evaluated once at the end; before issue 14 it trained on all 50,000 and
validated on test), then fine-tuned on MNIST (grayscale, 28x28, kept at 28x28) with 10 and 100 images per
class drawn from the official train split, with each strategy (linear-probe, full, staged, gradual, lp-ft), against
the same network trained from scratch on the same images for the same number of epochs. The grayscale data gives a
1-channel model: resnetlab sums the pretrained RGB filters of conv1 (in_chans adaptation). Accuracy is that of the
*last* epoch's model on a fixed 2,000-image subset of the official MNIST test split (200 per class, drawn with
seed 0; ``--full-test`` for all 10,000): no checkpoint is chosen on test data.

Speech: tc_resnet8 on 40 log-mel bands at 16 kHz, pretrained on the official FSDD train split (2,700 clips,
spoken digits, a tenth of it for validation; the 300-clip official test split evaluated once at the end),
fine-tuned on speech_commands_mini (30 words x 10 clips): 3 clips per word to train, the other 7 per word (210
clips) to test, against scratch.

Every run uses resnetlab's defaults except: the epochs (the same for every row of a table), ``flip=False`` for
digits, ``val_fraction=0`` (no validation split: the few samples all train), and the learning rate of the tables
made with ``--image-lrs`` / ``--speech-lrs`` other than ``default`` (every method, scratch included, at that peak
rate; the strategies still lower the pretrained layers' rates). One more row, ``full-uniform``, is full fine-tuning
with one learning rate for every layer (``lr_decay=1`` instead of the default 0.3). Small sets are noisy: each row
is the mean over draws of the training subset (seed s draws subset s and seeds the run with s): ``--seeds``
(default 3) for the smallest sets, ``--seeds-large`` (default 1) for MNIST at 100 per class.

    .venv/bin/python benchmarks/bench_finetune.py [--reuse] [--quick] [--part image|speech|all] [--seeds N]

``--reuse`` keeps the pretrained checkpoints in ``~/.cache/resnetlab-bench/finetune`` from an earlier run with the
same settings (the pretraining is the slow part). Results are appended to ``benchmarks/results/bench_finetune.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import resnetlab  # noqa: E402
from _common import BENCH_CACHE, dataset, machine, print_machine, record  # noqa: E402
from resnetlab.api import evaluate, finetune  # noqa: E402

STRATEGIES = ("linear-probe", "full", "staged", "gradual", "lp-ft")
# rows besides the strategies at their defaults: full fine-tuning with one learning rate for every layer
# (lr_decay 1 instead of 0.3), and the same network trained from scratch
METHODS = (*STRATEGIES, "full-uniform", "scratch")
# Speech runs pin what the figures were measured with: FSDD's 8 kHz clips resampled to 16 kHz like the 16 kHz
# words (the default is now each set's own rate), and background noise mixed into half the clips (the default
# when measured; now off)
SPEECH_FRONT_END = {"sample_rate": 16000, "features": "logmel", "n_mels": 40, "noise_prob": 0.5}
WORK = BENCH_CACHE / "finetune"


def _quiet(msg: str) -> None:
    pass


def write_manifest(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows(rows)
    return path


def per_class_subset(root: Path, n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` files per class folder of ``root``, drawn with ``seed`` from the sorted file list."""
    rng = random.Random(seed)
    rows = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(str(f) for f in d.iterdir() if f.is_file())
        rows += [(f, d.name) for f in sorted(rng.sample(files, n))]
    return rows


def all_files(root: Path) -> list[tuple[str, str]]:
    return [(str(f), d.name) for d in sorted(p for p in root.iterdir() if p.is_dir())
            for f in sorted(d.iterdir()) if f.is_file()]


def pretrain(name: str, data: str, settings: dict, reuse: bool, log) -> dict:
    """Train ``settings`` on ``data`` into WORK/name, or reuse a finished run made with the same settings."""
    out = WORK / name
    stamp = out / "bench_settings.json"
    wanted = {"data": data, **settings}
    best = out / "checkpoints" / "best.safetensors"
    if reuse and best.exists() and stamp.exists() and json.loads(stamp.read_text()) == wanted:
        info = json.loads((out / "bench_pretrain.json").read_text())
        log(f"reusing {best} (val acc {info['best_val_acc']:.4f}, trained in {info['seconds']:.0f} s)")
        return {**info, "reused": True}
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    res = resnetlab.train(data, out=str(out), cache_dir=str(WORK / "cache"), quiet=True, log=_quiet, **settings)
    wall = time.perf_counter() - t0
    if res.interrupted:  # SIGTERM / Ctrl-C: the engine saved checkpoints/last; this is no pretrained network
        raise SystemExit(f"pretraining {name} was interrupted")
    info = {"run_dir": str(out), "checkpoint": str(best), "best_val_acc": round(res.best_acc, 4),
            "best_epoch": res.best_epoch, "seconds": round(res.seconds, 1), "wall_s": round(wall, 1),
            "settings": wanted, "batch_size": res.config.batch_size, "lr": res.config.lr}
    (out / "bench_pretrain.json").write_text(json.dumps(info, indent=1))
    stamp.write_text(json.dumps(wanted))
    log(f"pretrained {name}: best val acc {res.best_acc:.4f} at epoch {res.best_epoch}, fit {res.seconds:.0f} s, "
        f"wall {wall:.0f} s")
    return {**info, "reused": False}


def one_row(method: str, train_csv: Path, test_csv: Path, checkpoint: str, options: dict, out: Path) -> dict:
    """Fine-tune (``method`` a strategy) or train from scratch; test accuracy of the last epoch's model."""
    shutil.rmtree(out, ignore_errors=True)
    opts = dict(options, out=str(out), cache_dir=str(WORK / "cache"), quiet=True, val_fraction=0.0)
    t0 = time.perf_counter()
    if method == "scratch":
        res = resnetlab.train(str(train_csv), log=_quiet, **opts)
    else:
        opts.pop("arch", None)  # the checkpoint says which architecture it is
        strategy = method
        if method == "full-uniform":
            strategy, opts["lr_decay"] = "full", 1.0
        res = finetune(str(train_csv), pretrained=checkpoint, strategy=strategy, log=_quiet, **opts)
    wall = time.perf_counter() - t0
    if res.interrupted:
        raise SystemExit(f"{method} run in {out} was interrupted")
    summary = evaluate(out / "checkpoints" / "last.safetensors", str(test_csv), cache_dir=str(WORK / "cache"),
                       out=out / "eval", log=_quiet)
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"method": method, "test_acc": round(summary["top1"], 4), "n_test": summary["n"],
            "final_train_acc": round(history[-1]["train_acc"], 4), "fit_s": round(res.seconds, 1),
            "wall_s": round(wall, 1), "epochs": res.epochs, "batch_size": res.config.batch_size,
            "lr": res.config.lr}


def run_table(title: str, subsets: dict[int, list[tuple[str, str]]], test_csv: Path, checkpoint: str,
              options: dict, methods: list[str], tag: str, log) -> list[dict]:
    """Every method on every seed's subset; rows are averaged over seeds."""
    runs = []
    for seed, rows in subsets.items():
        train_csv = write_manifest(WORK / "manifests" / f"{tag}-seed{seed}.csv", rows)
        for method in methods:
            r = one_row(method, train_csv, test_csv, checkpoint, {**options, "seed": seed},
                        WORK / "runs" / f"{tag}-{method}-seed{seed}")
            r["seed"] = seed
            runs.append(r)
            log(f"  {tag} seed {seed} {method:<13} test acc {r['test_acc']:.4f}  fit {r['fit_s']:6.1f} s  "
                f"wall {r['wall_s']:6.1f} s")
    table = []
    for method in methods:
        rs = [r for r in runs if r["method"] == method]
        accs = [r["test_acc"] for r in rs]
        mean = sum(accs) / len(accs)
        std = (sum((a - mean) ** 2 for a in accs) / max(len(accs) - 1, 1)) ** 0.5
        table.append({"method": method, "test_acc_mean": round(mean, 4), "test_acc_std": round(std, 4),
                      "test_acc_per_seed": accs, "fit_s_mean": round(sum(r["fit_s"] for r in rs) / len(rs), 1),
                      "wall_s_mean": round(sum(r["wall_s"] for r in rs) / len(rs), 1),
                      "epochs": rs[0]["epochs"], "batch_size": rs[0]["batch_size"], "lr": rs[0]["lr"]})
    log(f"{title}:")
    log(f"  {'method':<13} {'test acc':>16} {'fit s':>7} {'wall s':>7}")
    for t in table:
        log(f"  {t['method']:<13} {t['test_acc_mean']:.4f} +- {t['test_acc_std']:.4f} {t['fit_s_mean']:7.1f} "
            f"{t['wall_s_mean']:7.1f}")
    return table


def image_part(args, log) -> dict:
    cifar = dataset("cifar10", log=log)
    mnist = dataset("mnist", log=log)
    settings = {"arch": "resnet20", "epochs": 2 if args.quick else args.pretrain_epochs, "batch_size": 128,
                "warmup_epochs": 0.3, "seed": 0}
    if args.quick:  # a 5,000-image subset instead of the 50,000
        settings["data_subset"] = 500
    if "data_subset" in settings:
        data = str(write_manifest(WORK / "manifests" / "cifar10-quick.csv",
                                  per_class_subset(cifar / "train", settings["data_subset"], 0)))
        pre_settings = {k: v for k, v in settings.items() if k != "data_subset"}
        pre_settings["val_fraction"] = 0.1
    else:
        data, pre_settings = str(cifar), dict(settings)  # train/ + test/: the official test split validates
    log(f"== pretraining resnet20 on CIFAR-10 ({'quick subset' if args.quick else 'train split'}) ==")
    pre = pretrain("pretrain-cifar10-resnet20" + ("-quick" if args.quick else ""), data, pre_settings,
                   args.reuse, log)
    test_rows = (all_files(mnist / "test") if args.full_test else
                 per_class_subset(mnist / "test", 20 if args.quick else 200, 0))
    test_csv = write_manifest(WORK / "manifests" / f"mnist-test-{len(test_rows)}.csv", test_rows)
    methods = list(METHODS)
    tables = {}
    for n, epochs in ((10, 30), (100, 10)):
        if args.quick and n == 100:
            continue
        seeds = args.seeds if n == 10 else args.seeds_large
        subsets = {s: per_class_subset(mnist / "train", n, s) for s in range(seeds)}
        for lr in args.image_lrs:
            options = {"arch": "resnet20", "epochs": 4 if args.quick else epochs, "flip": False, "lr": lr}
            tables[f"mnist_{n}_per_class_lr_{lr or 'default'}"] = {
                "train_images": 10 * n, "epochs": options["epochs"], "lr": lr or "default",
                "rows": run_table(f"MNIST {n}/class, lr {lr or 'default'}", subsets, test_csv, pre["checkpoint"],
                                  options, methods, f"mnist{n}-lr{lr or 'default'}", log)}
    return {"pretrain": pre, "test_set": f"MNIST official test split: {len(test_rows)} images"
            + ("" if args.full_test else " (a fixed per-class subset, seed 0)"),
            "input": "MNIST kept 1-channel 28x28; conv1's RGB filters summed", "tables": tables}


def fsdd_rows(root: Path) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """FSDD's official split from the file names ``{digit}_{speaker}_{index}.wav``: index 0-4 test, 5-49 train."""
    train, test = [], []
    for f in sorted((root / "recordings").glob("*.wav")):
        digit, _, index = f.stem.split("_")
        (test if int(index) < 5 else train).append((str(f), digit))
    return train, test


def speech_part(args, log) -> dict:
    fsdd = dataset("fsdd", log=log)
    sc = dataset("speech_commands_mini", log=log)
    train_rows, test_rows = fsdd_rows(fsdd)
    if args.quick:
        train_rows, test_rows = train_rows[::10], test_rows[::5]
    rows = [(p, lab, "train") for p, lab in train_rows] + [(p, lab, "test") for p, lab in test_rows]
    manifest = WORK / "manifests" / f"fsdd{'-quick' if args.quick else ''}.csv"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        w.writerows(rows)
    settings = {"arch": "tc_resnet8", "epochs": 3 if args.quick else args.speech_pretrain_epochs, "seed": 0,
                **SPEECH_FRONT_END}
    log(f"== pretraining tc_resnet8 on FSDD ({len(train_rows)} train clips, {len(test_rows)} validation) ==")
    pre = pretrain("pretrain-fsdd-tc_resnet8" + ("-quick" if args.quick else ""), str(manifest), settings,
                   args.reuse, log)
    words = sorted(p for p in sc.iterdir() if p.is_dir())
    subsets, tests = {}, {}
    for s in range(args.seeds):
        rng = random.Random(s)
        tr, te = [], []
        for d in words:
            files = sorted(str(f) for f in d.glob("*.wav"))
            pick = set(rng.sample(files, 3))
            tr += [(f, d.name) for f in files if f in pick]
            te += [(f, d.name) for f in files if f not in pick]
        subsets[s], tests[s] = tr, te
    # each seed has its own test clips (the 7 of each word it did not train on): one table per seed, then averaged
    tables = {}
    for lr in args.speech_lrs:
        tables[f"speech_commands_mini_3_per_word_lr_{lr or 'default'}"] = speech_table(args, subsets, tests, pre, lr,
                                                                                       log)
    return {"pretrain": pre, "test_set": "speech_commands_mini: the 7 clips per word not trained on (210 clips)",
            "tables": tables}


def speech_table(args, subsets: dict, tests: dict, pre: dict, lr: float | None, log) -> dict:
    tables_per_seed = []
    for s in subsets:
        test_csv = write_manifest(WORK / "manifests" / f"speech-test-seed{s}.csv", tests[s])
        options = {"arch": "tc_resnet8", "epochs": 5 if args.quick else 30, "lr": lr, **SPEECH_FRONT_END}
        tables_per_seed.append(run_table(f"speech_commands_mini 3/word, lr {lr or 'default'}, seed {s}",
                                         {s: subsets[s]}, test_csv, pre["checkpoint"], options,
                                         list(METHODS), f"speech-lr{lr or 'default'}", log))
    rows = []
    for i, first in enumerate(tables_per_seed[0]):
        accs = [t[i]["test_acc_mean"] for t in tables_per_seed]
        mean = sum(accs) / len(accs)
        std = (sum((a - mean) ** 2 for a in accs) / max(len(accs) - 1, 1)) ** 0.5
        rows.append({**first, "test_acc_mean": round(mean, 4), "test_acc_std": round(std, 4),
                     "test_acc_per_seed": accs,
                     "fit_s_mean": round(sum(t[i]["fit_s_mean"] for t in tables_per_seed) / len(accs), 1),
                     "wall_s_mean": round(sum(t[i]["wall_s_mean"] for t in tables_per_seed) / len(accs), 1)})
    log(f"speech_commands_mini 3/word, lr {lr or 'default'}, mean over seeds:")
    for r in rows:
        log(f"  {r['method']:<13} {r['test_acc_mean']:.4f} +- {r['test_acc_std']:.4f} {r['fit_s_mean']:7.1f} "
            f"{r['wall_s_mean']:7.1f}")
    return {"train_clips": 90, "epochs": rows[0]["epochs"], "lr": lr or "default", "rows": rows}


def _lr(text: str) -> float | None:
    return None if text == "default" else float(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reuse", action="store_true", help="reuse pretrained checkpoints made with the same settings")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared, oversubscribed CPU, 2 OpenMP threads spin-wait and run "
                         "several times slower than 1)")
    ap.add_argument("--quick", action="store_true", help="tiny subsets and few epochs: checks the script runs")
    ap.add_argument("--part", choices=("image", "speech", "all"), default="all")
    ap.add_argument("--seeds", type=int, default=3, help="training subsets drawn per table (rows are averaged)")
    ap.add_argument("--seeds-large", type=int, default=1, help="training subsets drawn for MNIST 100/class")
    ap.add_argument("--full-test", action="store_true", help="all 10,000 MNIST test images instead of 2,000")
    ap.add_argument("--pretrain-epochs", type=int, default=2, help="CIFAR-10 pretraining epochs")
    ap.add_argument("--image-lrs", nargs="+", type=_lr, default=[None, 0.1], metavar="LR",
                    help="learning rates of the MNIST tables, every method at each ('default': the library's "
                         "choice; 0.1: the best from-scratch rate for 100 images)")
    ap.add_argument("--speech-lrs", nargs="+", type=_lr, default=[None], metavar="LR",
                    help="learning rates of the speech tables ('default': 0.1, from scratch and fine-tuning)")
    ap.add_argument("--speech-pretrain-epochs", type=int, default=15, help="FSDD pretraining epochs")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine()
    print_machine(info)
    t0 = time.perf_counter()
    rec = {**info, "quick": args.quick, "seeds": args.seeds,
           "command": "python benchmarks/bench_finetune.py " + " ".join(argv if argv is not None else sys.argv[1:])}

    def log(msg: str) -> None:
        print(msg, flush=True)

    if args.part in ("image", "all"):
        rec["image"] = image_part(args, log)
    if args.part in ("speech", "all"):
        rec["speech"] = speech_part(args, log)
    rec["total_s"] = round(time.perf_counter() - t0, 1)
    rec["torch_threads_end"] = torch.get_num_threads()
    if args.quick:  # a check that the script runs: not a figure
        print(json.dumps(rec, indent=1)[:4000])
    else:
        record("bench_finetune", rec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
