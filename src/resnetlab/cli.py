"""The command line: parse, then call the library API (resnetlab.api). Nothing else lives here."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys

from resnetlab.training.config import FinetuneConfig, TrainConfig, add_config_arguments

EXAMPLES = """examples:
  resnetlab models 'resnet*'                      list architectures with params and MACs
  resnetlab demo                                  train, evaluate and predict on the embedded digits
  resnetlab train --data DIR --epochs 10          train from scratch on a folder of class subfolders
  resnetlab train --config run.yaml --lr 0.05     a YAML config, one value overridden
  resnetlab train --out runs/x --resume           continue an interrupted run
  resnetlab evaluate runs/x --data DIR --tta      accuracy, per-class F1, confusion matrix
  resnetlab predict runs/x a.png b.png --top-k 3  top-3 labels per file
  resnetlab finetune --pretrained runs/x/checkpoints/best.safetensors --data DIR --strategy lp-ft
  resnetlab finetune --pretrained torchvision:resnet50 --data DIR   (the file from the local torch hub cache)
  resnetlab lr-find --data DIR --arch resnet18    learning-rate range test with its plot
"""


class CLIError(Exception):
    """A usage error found after parsing; reported in one line with exit code 2."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="resnetlab", description="Build, train and fine-tune ResNets for images and "
                                "speech.", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    from resnetlab import __version__

    p.add_argument("--version", action="version", version=f"resnetlab {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    m = sub.add_parser("models", help="list the model family with parameters and MACs",
                       description="List registered architectures: parameters, multiply-accumulates at the model's "
                                   "default input size, and a one-line description with its paper.")
    m.add_argument("pattern", nargs="?", help="shell-style name filter, e.g. 'resnet*' or 'preact'")
    m.add_argument("--format", choices=("table", "json"), default="table")

    t = sub.add_parser("train", help="train a ResNet from scratch on a folder of images or audio clips",
                       description="Train from scratch. Every option can also be a key of a YAML --config file; "
                                   "options given here override the file. Unset options are chosen from the data.")
    t.add_argument("--config", metavar="FILE.yaml", help="YAML file of options (keys as below, with underscores)")
    add_config_arguments(t, TrainConfig)

    f = sub.add_parser("finetune", help="fine-tune pretrained weights on your data with a proven strategy",
                       description="Fine-tune a pretrained ResNet: resnetlab checkpoints, torchvision/timm .pth or "
                                   ".safetensors, Hugging Face folders, Keras .h5 — or torchvision:NAME, timm:NAME, "
                                   "hf:ORG/NAME, keras:NAME from the local caches (never downloaded). Writes the same "
                                   "run directory and report as train.")
    f.add_argument("--config", metavar="FILE.yaml", help="YAML file of options")
    add_config_arguments(f, FinetuneConfig)

    lf = sub.add_parser("lr-find", help="learning-rate range test, with its plot",
                        description="Train a few batches with the learning rate rising exponentially and plot the "
                                    "loss; suggests a learning rate. Takes the train/finetune options.")
    lf.add_argument("--config", metavar="FILE.yaml", help="YAML file of options")
    lf.add_argument("--start-lr", type=float, default=1e-6)
    lf.add_argument("--end-lr", type=float, default=10.0)
    lf.add_argument("--steps", type=int, default=100)
    add_config_arguments(lf, FinetuneConfig)

    e = sub.add_parser("evaluate", help="accuracy, per-class F1 and confusion matrix of a trained model",
                       description="Evaluate a run (its best checkpoint) or a checkpoint file on a dataset. Uses the "
                                   "dataset's val/ or test/ split when it has one, else every file. Writes eval.json "
                                   "and eval_confusion.png beside the checkpoint's run.")
    e.add_argument("run", metavar="RUN_DIR_OR_CHECKPOINT")
    e.add_argument("--data", required=True, help="dataset folder, CSV manifest or builtin:NAME")
    e.add_argument("--tta", action="store_true", help="average predictions with horizontally flipped inputs")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    e.add_argument("--out", help="folder for eval.json (default: the run directory)")
    e.add_argument("--format", choices=("table", "json"), default="table")

    pr = sub.add_parser("predict", help="top-k labels for image or audio files",
                        description="Predict with a trained run (its best checkpoint) or a checkpoint file.")
    pr.add_argument("run", metavar="RUN_DIR_OR_CHECKPOINT")
    pr.add_argument("inputs", nargs="+", metavar="FILE_OR_DIR")
    pr.add_argument("--top-k", type=int, default=5)
    pr.add_argument("--format", choices=("table", "json", "csv"), default="table")
    pr.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")

    d = sub.add_parser("demo", help="train, evaluate and predict on an embedded dataset (about a minute)",
                       description="The whole workflow on data shipped with the package: builtin:digits (MNIST "
                                   "subset) or builtin:spoken-digits (FSDD subset).")
    d.add_argument("--task", choices=("image", "speech"), default="image")
    d.add_argument("--epochs", type=int, help="override the demo's epochs")
    d.add_argument("--out", help="run directory (default: runs/demo-<task>)")
    d.add_argument("--quiet", action="store_true")
    return p


def cmd_models(args) -> int:
    from resnetlab.models import list_models
    from resnetlab.models.table import model_table

    if not list_models(args.pattern):  # before measuring anything
        raise CLIError(f"no model matches {args.pattern!r}; known: {', '.join(list_models())}")
    rows = model_table(args.pattern)
    if args.format == "json":
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'name':<20} {'params':>8} {'MACs':>8}  {'input':<12} description")
    for r in rows:
        size = "x".join(str(s) for s in r["input_size"])
        print(f"{r['name']:<20} {_human(r['params']):>8} {_human(r['macs']):>8}  {size:<12} {r['description']}"
              f" [{r['paper']}]")
    return 0


def _human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def cmd_train(args) -> int:
    from resnetlab.api import train

    options = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    result = train(config=args.config, **options)
    return 130 if result.interrupted else 0


def cmd_finetune(args) -> int:
    from resnetlab.api import finetune

    options = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    result = finetune(config=args.config, **options)
    return 130 if result.interrupted else 0


def cmd_lr_find(args) -> int:
    from resnetlab.api import lr_find

    options = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    lr_find(config=args.config, **options)
    return 0


def _to_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_evaluate(args) -> int:
    from resnetlab.api import evaluate
    from resnetlab.report.metrics import format_report_table

    summary = evaluate(args.run, args.data, tta=args.tta, batch_size=args.batch_size, device=args.device,
                       out=args.out, log=_to_stderr)  # stdout holds only the result (parseable with --format json)
    if args.format == "json":
        print(json.dumps({k: v for k, v in summary.items() if k != "confusion_matrix"}, indent=1))
        return 0
    print(format_report_table(summary))
    print(f"top-1 {summary['top1']:.4f}  top-5 {summary['top5']:.4f}  on {summary['n']} samples"
          f"{' (TTA)' if args.tta else ''}; written {summary['eval_json']}")
    return 0


def cmd_predict(args) -> int:
    from resnetlab.api import predict

    results = predict(args.run, args.inputs, top_k=args.top_k, device=args.device)
    if args.format == "json":
        print(json.dumps(results, indent=1))
    elif args.format == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["file", "rank", "label", "prob", "error"])
        for r in results:
            if "error" in r:
                w.writerow([r["file"], "", "", "", r["error"]])
            for i, t in enumerate(r.get("top_k", []), 1):
                w.writerow([r["file"], i, t["label"], f"{t['prob']:.6f}", ""])
        print(buf.getvalue(), end="")
    else:
        for r in results:
            if "error" in r:
                print(f"{r['file']}: error: {r['error']}")
                continue
            tops = ", ".join(f"{t['label']} ({t['prob']:.3f})" for t in r["top_k"])
            print(f"{r['file']}: {tops}")
    errors = [r for r in results if "error" in r]
    if errors:
        print(f"resnetlab: {len(errors)} of {len(results)} files could not be read", file=sys.stderr)
        return 1
    return 0


def cmd_demo(args) -> int:
    from resnetlab.demo import run_demo

    run_demo(task=args.task, epochs=args.epochs, out=args.out, quiet=args.quiet)
    return 0


COMMANDS = {"models": cmd_models, "train": cmd_train, "finetune": cmd_finetune, "lr-find": cmd_lr_find,
            "evaluate": cmd_evaluate, "predict": cmd_predict, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except CLIError as e:
        print(f"resnetlab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # bad arguments and bad input (DataError, CheckpointError): one line, no traceback
        print(f"resnetlab {args.command}: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
              file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"resnetlab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and closed early
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"resnetlab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
