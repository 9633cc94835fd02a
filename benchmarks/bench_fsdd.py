"""Speech: the Free Spoken Digit Dataset (FSDD), official split and speaker-disjoint, resnetlab vs the seed model.

Official split (the dataset's README): take 0-4 of every speaker and digit is the test set (300 clips), takes 5-49
train (2,700). The clips are arranged as ``train/<digit>/`` and ``test/<digit>/`` folders of symbolic links in the
benchmark cache, so ``resnetlab.train(data=...)`` reads them as a split-folders dataset: it validates after every
epoch on a tenth of ``train/`` (stratified, seeded; the test split holds the training speakers, so this validation
split does too) and evaluates the best checkpoint once on ``test/`` at the end. The figure is that test accuracy:
nothing is selected on the test set. (Until the validation split was carved out of train, ``test/`` was the
validation set, the model trained on all 2,700 clips and the figure was the last epoch's test accuracy.)

resnetlab: ``resnetlab.train`` with the recipe below (everything else at its defaults). Baseline: the seed model
``seed_resnet1d`` (Conv1D 7/2 stem + max-pool, two residual blocks of 64, classifier) through the same call, so the
same features, augmentation, optimiser and schedule. Both read the same decoded cache.

Speaker-disjoint: for each of the six speakers, train on the other five and test on that speaker's 500 clips;
validation takes whole speakers out of the five (the FSDD file naming is recognised and the test speaker is
unseen, so validation holds an unseen speaker too: one of the five, about a fifth of the clips); per-speaker and
mean test accuracy of the best checkpoint, with the recipe and with the recipe plus the library's default
augmentation.

Timing: the decode-once cache build (cold, a fresh cache folder) is reported apart from training; "train wall" is
the whole ``resnetlab.train`` call on the warm cache (setup, every epoch with its validation pass, checkpoints and
the run report); "total" is the two together. Process CPU seconds are given beside every wall time, because the
machine is shared and wall time follows its load.

    .venv/bin/python benchmarks/bench_fsdd.py [--quick] [--skip-speakers] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import resnetlab  # noqa: E402
from _common import BENCH_CACHE, dataset, machine, print_machine, record, verdict  # noqa: E402
from resnetlab.data.prepare import prepare_data  # noqa: E402

TARGET_ACC = 0.99
TARGET_WALL_S = 60.0
SPEAKERS = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")
_NAME = re.compile(r"^(\d)_([a-z]+)_(\d+)\.wav$")

# The tuned recipe (what was tried is in BENCHMARKS.md). FSDD is 8 kHz: resampled to the default 16 kHz, the mel
# bands above 4 kHz would be empty, so it stays at its native rate. The clips are clean and the test speakers are
# the training speakers: noise and SpecAugment only slowed convergence here (98.7% vs 99.3% after 10 epochs).
RECIPE = {"arch": "tc_resnet8", "sample_rate": 8000, "epochs": 10, "batch_size": 64, "lr": 0.1, "noise_prob": 0.0,
          "spec_augment": False, "precision": "fp32"}
# Speaker-disjoint folds: the same recipe, and beside it the library's default augmentation (background noise in
# half the clips, SpecAugment), which targets exactly this kind of shift. Both are reported; neither was tuned on
# the held-out speakers.
SPEAKER_RECIPES = {"recipe": dict(RECIPE), "recipe+augmentation": {**RECIPE, "noise_prob": 0.5, "spec_augment": True}}


def parse_name(name: str) -> tuple[str, str, int] | None:
    """``"7_theo_12.wav"`` -> ``("7", "theo", 12)``; ``None`` for anything else."""
    m = _NAME.match(name)
    return (m.group(1), m.group(2), int(m.group(3))) if m else None


def arrange(recordings: Path, dest: Path, side) -> Path:
    """``dest/{train,test}/<digit>/`` of symbolic links to ``recordings``; ``side(speaker, index)`` says
    ``"train"``, ``"test"`` or ``None`` (left out). Rebuilt from scratch each time (cheap: 3,000 links)."""
    shutil.rmtree(dest, ignore_errors=True)
    for f in sorted(recordings.iterdir()):
        parsed = parse_name(f.name)
        if parsed is None:
            continue
        digit, speaker, index = parsed
        where = side(speaker, index)
        if where is None:
            continue
        folder = dest / where / digit
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f.name).symlink_to(f.resolve())
    return dest


def official_split(recordings: Path) -> Path:
    return arrange(recordings, BENCH_CACHE / "fsdd-official", lambda s, i: "test" if i <= 4 else "train")


def speaker_split(recordings: Path, held_out: str) -> Path:
    return arrange(recordings, BENCH_CACHE / f"fsdd-speaker-{held_out}",
                   lambda s, i: "test" if s == held_out else "train")


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def build_cache(data: Path, recipe: dict, cache: Path, seeds: int = 1) -> dict:
    """Decode ``data`` into ``cache`` (removed first: a cold build); seconds and what was cached. The caches of
    the other seeds' train/validation splits are built after the timed one, so each training call reads a warm
    cache."""
    shutil.rmtree(cache, ignore_errors=True)
    w0, c0 = _clock()
    opts = {"sample_rate": recipe.get("sample_rate", 16000), "duration": recipe.get("duration"),
            "cache_dir": str(cache), "progress": False, "log": lambda m: None}
    prepared = prepare_data(str(data), **opts)
    w1, c1 = _clock()
    for seed in range(1, seeds):
        prepare_data(str(data), seed=seed, **opts)
    return {"wall_s": round(w1 - w0, 2), "cpu_s": round(c1 - c0, 2), "train": len(prepared.train),
            "val": len(prepared.val) if prepared.val is not None else 0,
            "test": len(prepared.test) if prepared.test is not None else 0, "skipped": len(prepared.skipped),
            "duration_s": prepared.facts["duration"]}


def train(data: Path, recipe: dict, cache: Path, out: Path, seed: int = 0) -> dict:
    """One ``resnetlab.train`` call on the warm cache: the best checkpoint's test accuracy, best epoch, times."""
    load0 = os.getloadavg()[0]
    w0, c0 = _clock()
    res = resnetlab.train(data=str(data), cache_dir=str(cache), out=str(out), quiet=True, seed=seed,
                          log=lambda m: None, **recipe)
    w1, c1 = _clock()
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"arch": res.config.arch, "final_acc": round(res.test["accuracy"], 4),
            "best_val_acc": round(res.best_acc, 4), "best_epoch": res.best_epoch,
            "epochs": res.epochs, "train_wall_s": round(w1 - w0, 2), "train_cpu_s": round(c1 - c0, 2),
            "epoch_loop_s": round(sum(r["seconds"] for r in history), 2), "loadavg_1min": [round(load0, 2),
                                                                                          round(os.getloadavg()[0], 2)],
            "config": {k: getattr(res.config, k) for k in ("arch", "sample_rate", "duration", "epochs", "batch_size",
                                                           "lr", "optimizer", "weight_decay", "schedule",
                                                           "warmup_epochs", "label_smoothing", "noise_prob",
                                                           "spec_augment", "time_shift_ms", "features", "n_mels",
                                                           "precision")}}


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _summary(runs: list[dict]) -> dict:
    accs = [r["final_acc"] for r in runs]
    walls = sorted(r["train_wall_s"] for r in runs)
    return {"final_acc_per_seed": accs, "mean_acc": round(sum(accs) / len(accs), 4), "min_acc": min(accs),
            "median_train_wall_s": walls[len(walls) // 2], "runs": runs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 epochs, one seed, one held-out speaker (a smoke run)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds of the official-split runs (each side)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (0: torch's default, one per core; see BENCHMARKS.md)")
    ap.add_argument("--skip-speakers", action="store_true", help="only the official split")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="override the recipe (tuning)")
    ap.add_argument("--speaker-set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="override the speaker-disjoint recipe")
    ap.add_argument("--no-record", action="store_true", help="print, do not append to benchmarks/results")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = {**RECIPE, **{k: _value(v) for k, v in (s.split("=", 1) for s in args.set)}}
    speaker_recipes = {name: {**r, **{k: _value(v) for k, v in (s.split("=", 1) for s in args.speaker_set)}}
                       for name, r in SPEAKER_RECIPES.items()}
    seeds = 1 if args.quick else args.seeds
    if args.quick:
        for r in (recipe, *speaker_recipes.values()):
            r["epochs"] = 3
    info = machine()
    print_machine(info)
    print(f"recipe: {recipe}", flush=True)
    recordings = dataset("fsdd") / "recordings"
    runs = BENCH_CACHE / "fsdd-runs"
    shutil.rmtree(runs, ignore_errors=True)

    data = official_split(recordings)
    cache = BENCH_CACHE / "fsdd-cache"
    built = build_cache(data, recipe, cache, seeds=seeds)
    print(f"cache build (cold): {built['train']} train + {built['val']} val + {built['test']} test clips, "
          f"{built['duration_s']} s each "
          f"at {recipe.get('sample_rate', 16000)} Hz, in {built['wall_s']} s wall ({built['cpu_s']} s CPU)",
          flush=True)
    ours_runs, base_runs = [], []
    for seed in range(seeds):  # the two sides alternate, so both see the same load on average
        r = train(data, recipe, cache, runs / f"official-resnetlab-{seed}", seed=seed)
        ours_runs.append(r)
        print(f"  resnetlab {r['arch']} seed {seed}: test accuracy {r['final_acc']:.4f} (the checkpoint of epoch "
              f"{r['best_epoch']} of {r['epochs']}, best val {r['best_val_acc']:.4f}); train wall "
              f"{r['train_wall_s']} s ({r['train_cpu_s']} s CPU, epochs {r['epoch_loop_s']} s); "
              f"load {r['loadavg_1min']}", flush=True)
        if not args.skip_baseline:
            b = train(data, {**recipe, "arch": "seed_resnet1d"}, cache, runs / f"official-seed-{seed}", seed=seed)
            base_runs.append(b)
            print(f"  baseline seed_resnet1d seed {seed}: test accuracy {b['final_acc']:.4f} (best val "
                  f"{b['best_val_acc']:.4f}); train wall {b['train_wall_s']} s ({b['train_cpu_s']} s "
                  f"CPU, epochs {b['epoch_loop_s']} s); load {b['loadavg_1min']}", flush=True)
    ours = _summary(ours_runs)
    base = _summary(base_runs) if base_runs else None
    total = round(built["wall_s"] + ours["median_train_wall_s"], 2)
    print(f"resnetlab {recipe['arch']}: mean test accuracy {ours['mean_acc']:.4f} over {seeds} seed(s) (min "
          f"{ours['min_acc']:.4f}); median train wall {ours['median_train_wall_s']} s; total with the cold cache "
          f"build {total} s", flush=True)
    if base:
        print(f"baseline seed_resnet1d: mean test accuracy {base['mean_acc']:.4f} (min {base['min_acc']:.4f}); "
              f"median train wall {base['median_train_wall_s']} s", flush=True)

    speakers: dict[str, dict] = {name: {} for name in speaker_recipes}
    if not args.skip_speakers:
        for held_out in SPEAKERS[:1] if args.quick else SPEAKERS:
            fold = speaker_split(recordings, held_out)
            fold_cache = BENCH_CACHE / f"fsdd-cache-speaker-{held_out}"
            fold_built = build_cache(fold, recipe, fold_cache)
            for name, rec_ in speaker_recipes.items():
                r = train(fold, rec_, fold_cache, runs / f"speaker-{held_out}-{name.replace('+', '-')}")
                r.update(cache_wall_s=fold_built["wall_s"], test_clips=fold_built["test"])
                speakers[name][held_out] = r
                print(f"  speaker-disjoint ({name}), {held_out} held out: {r['final_acc']:.4f} on "
                      f"{fold_built['test']} clips; train wall {r['train_wall_s']} s; load {r['loadavg_1min']}",
                      flush=True)
            shutil.rmtree(fold_cache, ignore_errors=True)
            shutil.rmtree(fold, ignore_errors=True)
    speaker_summary = {}
    for name, per in speakers.items():
        if per:
            mean = round(sum(r["final_acc"] for r in per.values()) / len(per), 4)
            speaker_summary[name] = {"recipe": speaker_recipes[name], "mean_acc": mean,
                                     "acc_per_speaker": {k: r["final_acc"] for k, r in per.items()}, "runs": per}
            print(f"speaker-disjoint ({name}): mean accuracy {mean:.4f} over {len(per)} speakers "
                  f"{speaker_summary[name]['acc_per_speaker']}", flush=True)

    acc_ok = ours["mean_acc"] >= TARGET_ACC
    wall_ok = ours["median_train_wall_s"] < TARGET_WALL_S
    print(f"target mean test accuracy >= {TARGET_ACC:.1%}: {verdict(acc_ok)} ({ours['mean_acc']:.2%}); "
          f"target train wall < {TARGET_WALL_S:.0f} s: {verdict(wall_ok)} ({ours['median_train_wall_s']} s; "
          f"{total} s with the cache build)")
    rec = {"benchmark": "bench_fsdd", "machine": info, "quick": args.quick, "torch_threads": torch.get_num_threads(),
           "recipe": recipe, "cache_build": built, "resnetlab": ours, "total_wall_s": total,
           "baseline_seed_resnet1d": base,
           "speaker_disjoint": speaker_summary,
           "targets": {"mean_test_acc": TARGET_ACC, "train_wall_s": TARGET_WALL_S, "acc_met": acc_ok,
                       "wall_met": wall_ok}}
    if args.no_record:
        print(json.dumps(rec, indent=1))
    else:
        record("bench_fsdd", rec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
