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
  resnetlab train --data DIR --group-by '^([^_]+)_'   validation by whole groups (the name before the first _)
  resnetlab train --config run.yaml --lr 0.05     a YAML config, one value overridden
  resnetlab train --resume runs/x                 continue an interrupted run (or --out runs/x --resume)
  resnetlab evaluate runs/x --data DIR --tta      accuracy, per-class F1, confusion matrix
  resnetlab predict runs/x a.png b.png --top-k 3  top-3 labels per file
  resnetlab finetune --pretrained runs/x/checkpoints/best.safetensors --data DIR --strategy lp-ft
  resnetlab finetune --pretrained torchvision:resnet50 --data DIR   (the file from the local torch hub cache)
  resnetlab lr-find --data DIR --arch resnet18    learning-rate range test with its plot
  resnetlab export runs/x --format onnx --dynamic-batch   ONNX with preprocessing and class names inside
  resnetlab serve runs/x --port 8000              HTTP API + web page (drop a file, see label and heat map)
  resnetlab explain runs/x a.png b.wav            Grad-CAM overlay PNGs in runs/x/explain/
"""


class CLIError(Exception):
    """A usage error found after parsing; reported in one line with exit code 2."""


CROP_PCT_HELP = ("images: scale to cover size / FRACTION, then center-crop size (timm and torchvision evaluate "
                 "ImageNet weights at 0.875); default 1: the whole image, as the run was trained on")


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
                                   "dataset's test split when it has one (test/, CSV test rows), else its val/ split, "
                                   "else every file, and warns when the run trained or validated on some of those "
                                   "files (its splits.json). Writes eval.json and eval_confusion.png beside the "
                                   "checkpoint's run.")
    e.add_argument("run", metavar="RUN_DIR_OR_CHECKPOINT")
    e.add_argument("--data", required=True, help="dataset folder, CSV manifest or builtin:NAME")
    e.add_argument("--tta", action="store_true", help="average predictions with horizontally flipped inputs")
    e.add_argument("--tta-shift", action="store_true",
                   help="average over flipped and 1-pixel-shifted inputs too (6 views, as airbench; implies --tta)")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    e.add_argument("--out", help="folder for eval.json (default: the run directory)")
    e.add_argument("--format", choices=("table", "json"), default="table")
    e.add_argument("--crop-pct", type=float, metavar="FRACTION", help=CROP_PCT_HELP)

    pr = sub.add_parser("predict", help="top-k labels for image or audio files",
                        description="Predict with a trained run (its best checkpoint) or a checkpoint file. "
                                    "A file that cannot be read (corrupt, unknown type, wrong modality) gets an "
                                    "error line in the output and the others are predicted; the exit code is then "
                                    "1 (0 when every file was predicted, 2 for a missing run or input path).")
    pr.add_argument("run", metavar="RUN_DIR_OR_CHECKPOINT")
    pr.add_argument("inputs", nargs="+", metavar="FILE_OR_DIR")
    pr.add_argument("--top-k", type=int, default=5)
    pr.add_argument("--format", choices=("table", "json", "csv"), default="table")
    pr.add_argument("--crop-pct", type=float, metavar="FRACTION", help=CROP_PCT_HELP)
    pr.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    pr.add_argument("--backend", choices=("auto", "eager", "bf16", "onnxruntime"),
                    help="run through the deploy Predictor (auto: ONNX Runtime on CPUs, the fastest for many files; "
                         "the first call exports the model). Default: PyTorch in the precision the model was "
                         "trained in")

    x = sub.add_parser("experiment", help="reproduce a finding of the papers (degradation: plain vs residual)",
                       description="degradation: train plain and residual nets of two depths identically and plot "
                                   "training error and the gradient reaching the stem (He et al. 2015, Fig. 6).")
    x.add_argument("name", choices=("degradation",))
    x.add_argument("--data", default="builtin:digits", help="dataset (default: builtin:digits)")
    x.add_argument("--depths", type=int, nargs=2, default=[20, 56], metavar=("SHALLOW", "DEEP"))
    x.add_argument("--epochs", type=int, default=6)
    x.add_argument("--batch-size", type=int)
    x.add_argument("--lr", type=float)
    x.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    x.add_argument("--out", default="runs/degradation")

    d = sub.add_parser("demo", help="train, evaluate and predict on an embedded dataset (about a minute)",
                       description="The whole workflow on data shipped with the package: builtin:digits (MNIST "
                                   "subset) or builtin:spoken-digits (FSDD subset).")
    d.add_argument("--task", choices=("image", "speech"), default="image")
    d.add_argument("--epochs", type=int, help="override the demo's epochs")
    d.add_argument("--out", help="run directory (default: runs/demo-<task>)")
    d.add_argument("--quiet", action="store_true")
    _add_deploy_parsers(sub)
    return p


def _add_deploy_parsers(sub) -> None:
    """export, serve, explain (resnetlab.deploy and resnetlab.explain)."""
    from resnetlab.deploy.export import DEFAULT_OPSET, FORMATS
    from resnetlab.deploy.interop import WEIGHT_FORMATS
    from resnetlab.deploy.predictor import BACKENDS

    ex = sub.add_parser("export", help="export a trained model with its preprocessing (ONNX, TorchScript, .pt2)",
                        description="Export a run's model with its eval-time preprocessing inside the graph "
                                    "(images: uint8 NCHW in; audio: float waves in, log-mel/MFCC in the graph) and "
                                    "the class names, mean/std, input size and audio settings embedded; then check "
                                    "the file against eager PyTorch. ONNX needs pip install 'resnetlab[export]'.")
    ex.add_argument("run", metavar="RUN_DIR_OR_CHECKPOINT")
    ex.add_argument("--format", choices=FORMATS + WEIGHT_FORMATS, default="onnx",
                    help="onnx, torchscript, torch-export: the network with its preprocessing; safetensors: a folder "
                         "with model.safetensors (torchvision/timm names) and timm's config.json; hf: a transformers "
                         "ResNet folder (default: onnx)")
    ex.add_argument("--dynamic-batch", action="store_true", help="a free batch axis (default: batch 1)")
    ex.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset, >= 17 (default {DEFAULT_OPSET})")
    ex.add_argument("--out", metavar="FILE", help="output file (default: RUN_DIR/export/best.<ext>)")
    ex.add_argument("--no-check", action="store_true", help="skip running the exported file against PyTorch")

    sv = sub.add_parser("serve", help="HTTP API and web page for a trained model (POST /predict, GET /health)",
                        description="Serve a run's model: POST /predict (multipart field 'file'; ?top_k=, "
                                    "?explain=1 adds a Grad-CAM PNG), GET /health, GET /info, and a web page at / to "
                                    "drop a file or record from the microphone. Concurrent requests are batched.")
    sv.add_argument("run", metavar="RUN_DIR_OR_CHECKPOINT")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000, help="port (0: any free one)")
    sv.add_argument("--backend", choices=BACKENDS, default="auto")
    sv.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    sv.add_argument("--max-batch", type=int, default=16, help="largest batch the worker forms")
    sv.add_argument("--max-wait-ms", type=float, default=5.0, help="how long the worker waits to fill a batch")
    sv.add_argument("--max-upload-mb", type=float, default=16.0, help="larger uploads get 413")
    sv.add_argument("--top-k", type=int, default=5)
    sv.add_argument("--allow-host", action="append", default=[], metavar="NAME[:PORT]",
                    help="also accept requests whose Host is NAME (any port) or NAME:PORT; repeatable. Without it "
                         "only the bound address, localhost, 127.0.0.1 and [::1] are served (DNS-rebinding defence)")
    sv.add_argument("--max-connections", type=int, default=64,
                    help="open connections (and threads) at most; one more gets 503 (default 64)")
    sv.add_argument("--request-deadline", type=float, default=30.0, metavar="S",
                    help="seconds a client has to send a whole request, however slowly (default 30)")
    sv.add_argument("--max-decodes", type=int, default=2, help="uploads decoded at once at most (default 2)")
    sv.add_argument("--max-pixels", type=int, default=2**24, help="larger images get 400 (default 16,777,216)")
    sv.add_argument("--max-audio-seconds", type=float, default=60.0, help="longer clips get 400 (default 60)")
    sv.add_argument("--verbose", action="store_true", help="log every request")

    xp = sub.add_parser("explain", help="Grad-CAM (and audio saliency) overlay PNGs for files",
                        description="Write FILE.gradcam.png per input: the heat map of the last stage's Grad-CAM for "
                                    "the predicted class over the image, or over the spectrogram the network reads "
                                    "with the input saliency below it.")
    xp.add_argument("run", metavar="RUN_DIR_OR_CHECKPOINT")
    xp.add_argument("inputs", nargs="+", metavar="FILE_OR_DIR")
    xp.add_argument("--out", metavar="DIR", help="output folder (default: RUN_DIR/explain)")
    xp.add_argument("--target", metavar="CLASS", help="explain this class instead of the predicted one")
    xp.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")


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

    tta = "flip-shift" if args.tta_shift else "flip" if args.tta else False
    summary = evaluate(args.run, args.data, tta=tta, batch_size=args.batch_size, device=args.device,
                       out=args.out, crop_pct=args.crop_pct, log=_to_stderr)  # stdout: only the result
    if args.format == "json":
        print(json.dumps({k: v for k, v in summary.items() if k != "confusion_matrix"}, indent=1))
        return 0
    print(format_report_table(summary))
    used = f" (TTA {summary['tta']})" if summary["tta"] else ""
    print(f"top-1 {summary['top1']:.4f}  top-5 {summary['top5']:.4f}  on {summary['n']} samples"
          f"{used}; written {summary['eval_json']}")
    return 0


def cmd_predict(args) -> int:
    from resnetlab.api import predict

    results = predict(args.run, args.inputs, top_k=args.top_k, device=args.device, backend=args.backend,
                      crop_pct=args.crop_pct)
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


def cmd_experiment(args) -> int:
    from resnetlab.experiments.degradation import run_degradation

    options = {k: v for k, v in {"batch_size": args.batch_size, "lr": args.lr, "device": args.device}.items()
               if v is not None}
    run_degradation(args.data, depths=tuple(args.depths), epochs=args.epochs, out=args.out, **options)
    return 0


def cmd_demo(args) -> int:
    from resnetlab.demo import run_demo

    run_demo(task=args.task, epochs=args.epochs, out=args.out, quiet=args.quiet)
    return 0


def cmd_export(args) -> int:
    from resnetlab.deploy.export import export_model
    from resnetlab.deploy.interop import WEIGHT_FORMATS, export_weights

    if args.format in WEIGHT_FORMATS:
        folder, notes = export_weights(args.run, args.format, args.out)
        print(f"wrote {folder / 'model.safetensors'} and {folder / 'config.json'}")
        for note in notes:
            print(f"note: {note}")
        return 0
    res = export_model(args.run, args.format, args.out, dynamic_batch=args.dynamic_batch, opset=args.opset,
                       check=not args.no_check)
    m = res.metadata
    shape = "x".join(str(d) for d in m["input"]["shape"])
    print(f"wrote {res.path} ({res.path.stat().st_size / 2**20:.1f} MiB): {m['arch']}, input {m['input']['dtype']} "
          f"{shape}, output logits over {m['num_classes']} classes; metadata embedded")
    if res.max_abs_diff is not None:
        print(f"check: max |logit difference| vs PyTorch {res.max_abs_diff:.2e} ({res.check})")
    else:
        print(f"check: {res.check}")
    return 0


def cmd_serve(args) -> int:
    from resnetlab.deploy.serve import serve

    serve(args.run, host=args.host, port=args.port, backend=args.backend, device=args.device,
          max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_upload_mb=args.max_upload_mb, top_k=args.top_k,
          verbose=args.verbose, allow_hosts=tuple(args.allow_host), max_connections=args.max_connections,
          request_deadline=args.request_deadline, max_decodes=args.max_decodes, max_pixels=args.max_pixels,
          max_audio_seconds=args.max_audio_seconds, log=_to_stderr)
    return 0


def cmd_explain(args) -> int:
    from resnetlab.explain.gradcam import explain_files

    results = explain_files(args.run, args.inputs, args.out, device=args.device, target=args.target)
    for r in results:
        if "error" in r:
            print(f"{r['file']}: error: {r['error']}")
        else:
            print(f"{r['file']}: {r['label']} ({r['prob']:.3f}) -> {r['png']}")
    errors = sum("error" in r for r in results)
    if errors:
        print(f"resnetlab: {errors} of {len(results)} files could not be read", file=sys.stderr)
        return 1
    return 0


COMMANDS = {"models": cmd_models, "train": cmd_train, "finetune": cmd_finetune, "lr-find": cmd_lr_find,
            "evaluate": cmd_evaluate, "predict": cmd_predict, "experiment": cmd_experiment, "demo": cmd_demo}
COMMANDS.update({"export": cmd_export, "serve": cmd_serve, "explain": cmd_explain})


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
    except OSError as e:  # disk full, no permission: one line naming the file, exit 1
        where = f": {e.filename}" if e.filename else ""
        print(f"resnetlab {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        from resnetlab.training.engine import TrainingDiverged  # already loaded if it is what was raised

        if not isinstance(e, TrainingDiverged):
            raise
        from resnetlab.training import distributed

        if distributed.is_main():  # under torchrun every rank stops at the same step: rank 0 says why, once
            print(f"resnetlab {args.command}: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"resnetlab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
