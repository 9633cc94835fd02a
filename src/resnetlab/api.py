"""The Python API: ``train``, ``evaluate``, ``predict`` and ``load_model``; the CLI is a thin layer over these.

    import resnetlab
    run = resnetlab.train("builtin:digits", epochs=3)
    resnetlab.evaluate(run.run_dir, "path/to/test_images")
    resnetlab.predict(run.run_dir, ["a.png", "b.png"], top_k=3)
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from resnetlab.data.errors import DataError
from resnetlab.data.loader import ArrayLoader
from resnetlab.data.pipeline import Pipeline
from resnetlab.data.prepare import (
    PreparedData,
    channel_stats,
    check_crop_pct,
    decoder_for,
    prepare_data,
    prepare_held_out,
)
from resnetlab.data.splits import overlap, read_splits, splits_record, write_splits
from resnetlab.fileio import atomic_write
from resnetlab.models import create_model, get_spec
from resnetlab.training import checkpoint as ckpt
from resnetlab.training import distributed
from resnetlab.training.config import TrainConfig, inert_options, load_yaml, make_config, save_config
from resnetlab.training.defaults import resolve
from resnetlab.training.engine import Phase, Trainer
from resnetlab.training.evaluate import predict_loader
from resnetlab.training.inference import forward_logits, predict_files, tta_mode
from resnetlab.training.loggers import as_callbacks, check_available
from resnetlab.training.precision import pick_device, pick_precision
from resnetlab.training.run_dir import code_version, inference_precision, load_model


@dataclass
class TrainResult:
    run_dir: Path
    best_acc: float
    best_epoch: int
    epochs: int
    seconds: float
    interrupted: bool
    config: TrainConfig
    report: Path | None = None
    test: dict | None = None  # the best checkpoint's one evaluation on the data's test split (eval.json), if any
    best_on: str = "val"  # what best_acc measures: "val", or "train" (the training accuracy) with no validation split

    def summary_lines(self) -> list[str]:
        """The run's last lines: the best validation figure (training accuracy where there is no validation split,
        and labelled so), then the test figures, apart."""
        what = "val" if self.best_on == "val" else "train (no validation split)"
        lines = []
        if self.best_epoch >= 0:  # (none when Ctrl-C came before the first epoch's end)
            lines.append(f"best {what} accuracy {self.best_acc:.4f} at epoch {self.best_epoch}; {self.seconds:.1f} s; "
                         f"report: {self.report}")
        if self.test is not None:
            lines.append(f"test accuracy {self.test['accuracy']:.4f} (loss {self.test['loss']:.4f}) on "
                         f"{self.test['n']} test samples, the best checkpoint evaluated once: "
                         f"{self.run_dir / 'eval.json'}")
        return lines


def build_config(config: str | Path | dict | TrainConfig | None = None, **options) -> TrainConfig:
    """Defaults, then ``config`` (a YAML path, a mapping or a TrainConfig), then keyword ``options``."""
    if isinstance(config, TrainConfig):
        base = dataclasses.asdict(config)
    elif isinstance(config, (str, Path)):
        base = load_yaml(config)
    else:
        base = dict(config or {})
    options = {k: v for k, v in options.items() if v is not None or k in ("arch",)}
    return make_config(TrainConfig, base, options)


def make_pipeline(cfg: TrainConfig, prepared: PreparedData, model_ndim: int, device: torch.device) -> Pipeline:
    """The modality's pipeline for a run, with normalisation statistics measured on the training cache."""
    num_classes = prepared.spec.num_classes
    if prepared.spec.modality == "image":
        from resnetlab.data.image_pipeline import ImagePipeline

        mean, std = cfg.mean, cfg.std
        if mean is None or std is None:
            m, s = channel_stats(prepared.train.x, seed=cfg.seed)
            mean, std = mean or m, std or s
        return ImagePipeline((cfg.img_size, cfg.img_size), cfg.channels, mean, std, num_classes,
                             crop_pad=cfg.crop_pad, flip=cfg.flip, flip_mode=cfg.flip_mode, flip_seed=cfg.seed,
                             rrc=cfg.rrc, cutout=cfg.cutout, mixup=cfg.mixup, cutmix=cfg.cutmix)
    from resnetlab.data.audio_pipeline import AudioPipeline

    sr = prepared.facts["sample_rate"]
    win = round(cfg.win_ms * sr / 1000)
    pipe = AudioPipeline(
        sample_rate=sr, num_samples=prepared.facts["num_samples"], features=cfg.features, n_mels=cfg.n_mels,
        n_mfcc=cfg.n_mels, win_length=win, hop_length=round(cfg.hop_ms * sr / 1000),
        n_fft=max(512, 1 << (win - 1).bit_length()),
        layout="1d" if model_ndim == 1 else "2d", normalize="global", time_shift_ms=cfg.time_shift_ms,
        noise_prob=cfg.noise_prob, snr_db=tuple(cfg.snr_db), noise_dir=cfg.noise_dir, spec_augment=cfg.spec_augment,
        speed_perturb=cfg.speed_perturb, num_classes=num_classes)
    # from clips spread over the whole training set: the cache is in class order, so its first clips are the first
    # classes only
    idx = init_indices(len(prepared.train), prepared.sample_shape)
    pipe.fit_normalization(torch.from_numpy(np.array(prepared.train.x[idx])))
    return pipe


def _log_to(quiet: bool):
    def log(msg: str) -> None:
        print(msg, flush=True)

    return log


def prepare_run(cfg: TrainConfig, log=print):
    """Data, resolved config, pipeline and model for a run (shared by train and finetune)."""
    if not cfg.data:
        raise ValueError("no data: pass --data PATH (a folder, a CSV manifest, or builtin:digits)")
    check_available(cfg.loggers)  # --log tensorboard without tensorboard: one line, before any data is read
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:  # cuBLAS reads its workspace size once, at its first use: before anything touches CUDA
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # (the audio front-end's matmul, say)
    device = distributed.setup(pick_device(cfg.device))  # under torchrun: join the group, take this rank's GPU
    log = distributed.main_only(log)
    torch.manual_seed(cfg.seed)
    with distributed.main_first():  # one process per node builds the cache; the others then open it
        prepared = prepare_data(cfg.data, val_fraction=cfg.val_fraction, seed=cfg.seed, img_size=cfg.img_size,
                                channels=cfg.channels, sample_rate=cfg.sample_rate, duration=cfg.duration,
                                cache_dir=cfg.cache_dir, strict=cfg.strict_data,
                                progress=not cfg.quiet and distributed.is_main(), stream=cfg.stream,
                                group_by=cfg.group_by, log=log)
    if cfg.progressive_resize and prepared.spec.modality != "image":
        raise ValueError(f"--progressive-resize works on images; {cfg.data} holds {prepared.spec.modality}")
    cfg = resolve(cfg, modality=prepared.spec.modality, facts=prepared.facts, n_train=len(prepared.train),
                  device_type=device.type)
    cfg.out = distributed.broadcast_object(cfg.out)  # the default name holds the time: rank 0's for all
    if distributed.is_main():
        for note in inert_options(cfg):
            print(f"note: {note}", file=sys.stderr)
    spec = get_spec(cfg.arch)
    pipeline = make_pipeline(cfg, prepared, spec.ndim, device)
    return cfg, device, prepared, pipeline


def make_loaders(cfg: TrainConfig, prepared: PreparedData, device: torch.device, rank: int = 0, world: int = 1):
    on_device = device.type == "cuda" and prepared.train.x.nbytes < 4 * 2**30
    train_loader = ArrayLoader(prepared.train.x, prepared.train.y, cfg.batch_size, shuffle=True, drop_last=True,
                                device=device, seed=cfg.seed, on_device=on_device, rank=rank, world_size=world,
                                workers=cfg.workers)
    val_loader = None
    if prepared.val is not None and len(prepared.val):
        val_loader = ArrayLoader(prepared.val.x, prepared.val.y, max(cfg.batch_size, 256), shuffle=False,
                                  drop_last=False, device=device, on_device=on_device, workers=cfg.workers)
    return train_loader, val_loader


def run_training(cfg: TrainConfig, model: torch.nn.Module, prepared: PreparedData, pipeline: Pipeline,
                 device: torch.device, meta: dict, *, phases: list[Phase] | None = None, log=print,
                 callbacks=None) -> TrainResult:
    """Fit, then write the report from the best checkpoint. Shared by ``train`` and ``finetune``.

    Under torchrun every rank trains its shard; rank 0 alone writes the run directory.
    """
    run_dir = Path(cfg.out)
    log = distributed.main_only(log)
    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        extra = {"code_version": code_version()}
        if prepared.spec.grouping is not None:
            extra["grouping"] = prepared.spec.grouping.to_dict()
        save_config(cfg, run_dir / "config.yaml", extra)
        write_splits(run_dir, splits_record(prepared.spec, {name: ds.files for name, ds in prepared.splits().items()},
                                            data=cfg.data))
        if not cfg.resume:  # a new run in an old run's folder: that run's test evaluation is not this one's
            for stale in [run_dir / "eval.json", *(run_dir / "report").glob("test_*.png")]:
                stale.unlink(missing_ok=True)
    prec = pick_precision(device, cfg.precision, cfg.channels_last, getattr(model, "ndim", 2))
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_benchmark = torch.backends.cudnn.benchmark
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)  # (CUBLAS_WORKSPACE_CONFIG was set by prepare_run)
    if device.type == "cuda":  # cuDNN autotunes each convolution shape once, unless that would be nondeterministic
        torch.backends.cudnn.benchmark = not cfg.deterministic
    try:
        result = _fit_and_report(cfg, model, prepared, pipeline, device, meta, prec, run_dir, phases, log, callbacks)
        distributed.teardown()
        return result
    finally:  # process-wide switches: later runs in this process (tests, notebooks) get back what they had
        torch.use_deterministic_algorithms(was_deterministic)
        torch.backends.cudnn.benchmark = was_benchmark


def _optimizer_line(cfg) -> str:
    if cfg.optimizer == "muon":
        return f"muon lr {cfg.muon_lr:g} (the stages' filters) + sgd lr {cfg.lr:g}"
    return f"{cfg.optimizer} lr {cfg.lr:g}"


def _length(cfg: TrainConfig) -> str:
    if not cfg.time_budget:
        return f"{cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''}"
    from resnetlab.training.defaults import BUDGET_EPOCH_CAP

    cap = f" (at most {cfg.epochs} epochs)" if cfg.epochs != BUDGET_EPOCH_CAP else ""
    return f"a {cfg.time_budget:g}-minute time budget{cap}"


def _fit_and_report(cfg: TrainConfig, model: torch.nn.Module, prepared: PreparedData, pipeline: Pipeline,
                    device: torch.device, meta: dict, prec, run_dir: Path, phases: list[Phase] | None,
                    log, callbacks=None) -> TrainResult:
    world = distributed.world_size()
    train_loader, val_loader = make_loaders(cfg, prepared, device, distributed.rank(), world)
    n_params = sum(p.numel() for p in model.parameters())
    batch = f"batch {cfg.batch_size}" + (f" per process x {world} processes" if world > 1 else "")
    if cfg.accum_steps > 1:
        batch += f" x {cfg.accum_steps} accumulated"
    log(f"{cfg.arch}: {n_params:,} parameters; {len(prepared.train)} train samples, {batch}, "
        f"{_length(cfg)}, {_optimizer_line(cfg)}; {device.type} {prec.name}"
        f"{' channels-last' if prec.channels_last else ''}; run directory {run_dir}")
    trainer = Trainer(model, pipeline, train_loader, val_loader, cfg, run_dir, meta, prec, phases=phases, log=log,
                      callbacks=callbacks)
    fit = trainer.fit()
    report = test = None
    best = run_dir / "checkpoints" / "best.safetensors"
    if best.exists() and distributed.is_main():
        tensors, _ = ckpt.read_checkpoint(best)
        ckpt.unwrap(trainer.model).load_state_dict(ckpt.strip_prefix(tensors, "model."))
        val_pred = trainer.validate(trainer.model)
        from resnetlab.report.run_report import write_run_report

        if prepared.test is not None and len(prepared.test) and not fit.interrupted:
            test = _final_test(cfg, trainer, prepared, device, run_dir)
        report = write_run_report(run_dir, val_x=prepared.val.x if prepared.val is not None else None,
                                  val_pred=val_pred, classes=prepared.spec.classes, modality=prepared.spec.modality,
                                  pipeline=trainer.pipeline, skipped=prepared.skipped, model=trainer.model)
    return TrainResult(run_dir, fit.best_acc, fit.best_epoch, fit.epochs, fit.seconds, fit.interrupted, cfg, report,
                       test=test, best_on="val" if val_loader is not None else "train")


def _final_test(cfg: TrainConfig, trainer: Trainer, prepared: PreparedData, device: torch.device,
                run_dir: Path) -> dict:
    """The one evaluation of the best checkpoint (loaded in ``trainer.model``) on the data's test split, after
    training: nothing was selected on it. Writes ``eval.json`` (``"split": "test"``) and the report's test
    figures; returns the summary."""
    from resnetlab.report.run_report import evaluation_summary, write_eval_plots

    t0 = time.perf_counter()
    loader = ArrayLoader(prepared.test.x, prepared.test.y, max(cfg.batch_size, 256), shuffle=False, drop_last=False,
                         device=device, workers=cfg.workers)
    pred = predict_loader(trainer.model, trainer.pipeline, loader, trainer.prec)
    summary = {"split": "test", **evaluation_summary(pred.logits, pred.targets, prepared.spec.classes)}
    summary.update(checkpoint=str(run_dir / "checkpoints" / "best.safetensors"), data=str(cfg.data), tta=False,
                   seconds=round(time.perf_counter() - t0, 3), skipped=[list(s) for s in prepared.test.skipped])
    atomic_write(run_dir / "eval.json", json.dumps(summary, indent=1))
    write_eval_plots(run_dir / "report", summary, prepared.spec.classes, prefix="test_")
    return summary


DATA_INIT_SAMPLES = 5000  # training samples a data-dependent initialisation (a whitening stem) looks at;
DATA_INIT_VALUES = 5000 * 3 * 32 * 32  # fewer when they are large: at most this many input values


def new_model(arch: str, prepared: PreparedData, pipeline: Pipeline, log, **overrides) -> torch.nn.Module:
    """A freshly initialised ``arch`` for ``prepared``'s classes and ``pipeline``'s input channels, its
    data-dependent initialisation done (``init_from_data``). (A resumed run loads its saved weights over it.)"""
    model = create_model(arch, num_classes=prepared.spec.num_classes, in_chans=pipeline.input_size()[0], **overrides)
    init_from_data(model, prepared, pipeline, log)
    return model


def init_from_data(model: torch.nn.Module, prepared: PreparedData, pipeline: Pipeline, log) -> None:
    """A model's data-dependent initialisation (``FastResNet``'s whitening stem), if it has one, from training
    samples spread over the set (``init_indices``), normalised as the model will see them, unaugmented: the same
    on every rank."""
    if not hasattr(model, "init_from_data"):
        return
    idx = init_indices(len(prepared.train), prepared.sample_shape)
    x, _ = pipeline(torch.from_numpy(np.array(prepared.train.x[idx])), None, train=False)
    model.init_from_data(x)
    log(f"initialised {type(model).__name__}'s stem from {len(idx)} training samples")


def init_indices(n_train: int, sample_shape: tuple[int, ...]) -> np.ndarray:
    """Which training samples a data-dependent initialisation sees: at most ``DATA_INIT_SAMPLES``, fewer for large
    samples (``DATA_INIT_VALUES`` input values in all, at least 16 samples), evenly spaced over the set (the cache
    is in class order: its first samples are often all of one class)."""
    n = min(n_train, DATA_INIT_SAMPLES, max(16, DATA_INIT_VALUES // int(np.prod(sample_shape))))
    return np.linspace(0, n_train - 1, n).round().astype(np.int64)


def model_meta(cfg: TrainConfig, prepared: PreparedData, in_chans: int, overrides: dict) -> dict:
    return {"arch": cfg.arch, "num_classes": prepared.spec.num_classes, "in_chans": in_chans,
            "model_overrides": overrides, "classes": prepared.spec.classes, "modality": prepared.spec.modality,
            "code_version": code_version()}


def resume_target(options: dict) -> None:
    """``resume=RUN_DIR`` or ``resume=RUN_DIR/checkpoints/last.safetensors`` (``--resume PATH``) becomes
    ``resume=True, out=RUN_DIR``, in place; ``resume=True`` (the run in ``out``) and ``False`` stay."""
    target = options.get("resume")
    if target is None or isinstance(target, bool):
        return
    path = Path(target)
    if path.is_file() or path.suffix == ".safetensors":
        # only last holds the optimizer state, RNG states and position a run continues from
        if path.parent.name != "checkpoints" or not path.name.startswith("last"):
            raise ValueError(f"--resume {target}: a run continues from its checkpoints/last.safetensors; to start a "
                             f"new run from these weights: resnetlab finetune --pretrained {target}")
        path = path.parent.parent
    out = options.get("out")
    if out and Path(out).resolve() != path.resolve():
        raise ValueError(f"--resume {target} and --out {out} name different runs")
    options.update(resume=True, out=str(path))


def resumed_config(cls, cfg, options: dict):
    """The saved config of the run in ``cfg.out`` (the same schedule), with only quiet/device/log/log_every
    overridable."""
    if not cfg.out or not (Path(cfg.out) / "config.yaml").exists():
        raise ValueError(f"--resume needs --out pointing at an existing run directory (got {cfg.out!r})")
    saved = load_yaml(Path(cfg.out) / "config.yaml")
    for key in ("code_version", "grouping"):  # what the run found, saved beside its options
        saved.pop(key, None)
    explicit = {k: v for k, v in options.items() if k in ("quiet", "device", "loggers", "log_every")}
    ignored = sorted(k for k, v in options.items()
                     if k not in explicit and k not in ("resume", "out", "data", "config") and v is not None
                     and saved.get(k) != v)
    if ignored:
        print(f"note: --resume continues the saved schedule of {cfg.out}; ignoring {', '.join(ignored)}",
              file=sys.stderr)
    return make_config(cls, saved, explicit, {"resume": True, "out": cfg.out})


def train(data: str | None = None, *, config: str | Path | dict | TrainConfig | None = None, log=None,
          callbacks=None, **options) -> TrainResult:
    """Train a ResNet from scratch on ``data``; every option of ``resnetlab train`` is a keyword here.

    Returns a :class:`TrainResult` with the run directory, the best validation accuracy and the report path.
    ``resume=True`` with ``out=RUN_DIR`` (or ``resume=RUN_DIR``, or its ``checkpoints/last.safetensors``)
    continues that run's schedule from its last checkpoint.
    ``callbacks``: an object or a list of objects with ``on_step_end(step, values)`` (called every ``log_every``
    steps with loss, lr, samples_per_s, epoch and grad_norm when computed) and/or ``on_epoch_end(epoch, metrics)``
    (each epoch's record, as in metrics.jsonl, plus ``step``); a plain callable is called as ``on_epoch_end``.
    """
    callbacks = as_callbacks(callbacks)
    if data is not None:
        options["data"] = data
    resume_target(options)
    cfg = build_config(config, **options)
    if cfg.arch is not None:
        get_spec(cfg.arch)  # an unknown name fails before any data is read
    log = distributed.main_only(log or _log_to(cfg.quiet))  # under torchrun only rank 0 speaks
    if cfg.resume:
        cfg = resumed_config(TrainConfig, cfg, options)
    cfg, device, prepared, pipeline = prepare_run(cfg, log)
    overrides = {"drop_rate": cfg.drop_rate}
    if cfg.zero_init_last:
        overrides["zero_init_last"] = True
    in_chans = pipeline.input_size()[0]
    model = new_model(cfg.arch, prepared, pipeline, log, **overrides)
    meta = model_meta(cfg, prepared, in_chans, overrides)
    result = run_training(cfg, model, prepared, pipeline, device, meta, log=log, callbacks=callbacks)
    for line in result.summary_lines():
        log(line)
    return result


def evaluate(run_or_checkpoint: str | Path, data: str, *, tta: bool | str = False, batch_size: int = 256,
             device: str = "auto", out: str | Path | None = None, cache_dir: str | None = None,
             strict_data: bool = False, crop_pct: float | None = None, log=print) -> dict:
    """Top-1/top-5 accuracy, per-class precision/recall/F1 and a confusion matrix of a trained model on ``data``.

    Uses the test split of ``data`` when it has one (``test/``, CSV ``test`` rows), else its validation split
    (``val/``, ``val`` rows), else every file. Writes ``eval.json`` (``"split"`` says which was read) and
    ``eval_confusion.png`` into ``out`` (default: the run directory). When the run's ``splits.json`` shows that it
    trained or validated on some of these files, a one-line warning goes to stderr and ``eval.json`` counts them
    (``"overlap"``).
    ``tta``: ``"flip"`` (or ``True``) or ``"flip-shift"`` test-time augmentation (``predict_loader``).
    ``crop_pct``: images are scaled to cover ``size / crop_pct`` and center-cropped (timm's and torchvision's
    0.875 for ImageNet weights); default 1, the whole image as the run was trained on.
    """
    from resnetlab.report.run_report import evaluation_summary, write_eval_plots

    tta = tta_mode(tta) or False  # a bad name fails before anything is read
    check_crop_pct(crop_pct)

    model, pipeline, meta = load_model(run_or_checkpoint, device=device)
    dev = next(model.parameters()).device
    pc = meta["pipeline"]
    facts = ({"img_size": tuple(pc["size"]), "channels": pc["channels"], "crop_pct": crop_pct}
             if pc["modality"] == "image" else
             {"sample_rate": pc["sample_rate"], "num_samples": pc["num_samples"],
              "duration": pc["num_samples"] / pc["sample_rate"]})
    spec, split, arrays = prepare_held_out(data, modality=pc["modality"], modality_facts=facts,
                                           classes=meta["classes"], cache_dir=cache_dir, strict=strict_data, log=log)
    run_dir = Path(meta["checkpoint"]).parent.parent
    shared = _training_overlap(run_dir, arrays.files, spec.data_root)
    loader = ArrayLoader(arrays.x, arrays.y, batch_size, shuffle=False, drop_last=False, device=dev)
    prec = inference_precision(dev, meta, getattr(model, "ndim", 2), channels_last=None)
    model = model.to(memory_format=torch.channels_last) if prec.channels_last else model
    t0 = time.perf_counter()
    if tta == "flip-shift" and getattr(model, "ndim", 2) != 2:
        tta = "flip"  # what predict_loader does for 1-D inputs: no shifts; eval.json says what was applied
    pred = predict_loader(model, pipeline, loader, prec, tta=tta)
    summary = {"split": split, **evaluation_summary(pred.logits, pred.targets, meta["classes"])}
    summary.update(checkpoint=meta["checkpoint"], data=str(data), tta=tta, seconds=round(time.perf_counter() - t0, 3),
                   skipped=[list(s) for s in arrays.skipped])
    if shared is not None:
        summary["overlap"] = shared
    out_dir = Path(out) if out else run_dir
    if not out and not (out_dir / "config.yaml").exists():
        out_dir = Path(meta["checkpoint"]).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "eval.json", json.dumps(summary, indent=1))
    write_eval_plots(out_dir, summary, meta["classes"], prefix="eval_")
    summary["eval_json"] = str(out_dir / "eval.json")
    return summary


def _training_overlap(run_dir: Path, files: list[str], data_root: str) -> dict | None:
    """How many of ``files`` the run in ``run_dir`` trained or validated on (its ``splits.json``), with a one-line
    warning on stderr when any; ``None`` when the run has no ``splits.json``."""
    record = read_splits(run_dir)
    if record is None:
        return None
    found = overlap(files, record, data_root=data_root)
    if found["train"] or found["val"]:
        parts = [f"{found[name]} in its {what} split" for name, what in (("train", "training"), ("val", "validation"))
                 if found[name]]
        by = found["by"].replace("+", " or ")
        print(f"warning: {found['train'] + found['val']} of the {len(files)} evaluated files were seen by this run "
              f"({' and '.join(parts)}; matched by {by} against {run_dir / 'splits.json'}): these figures do not "
              f"measure unseen data", file=sys.stderr, flush=True)
    return found


def predict(run_or_checkpoint: str | Path, inputs, *, top_k: int = 5, batch_size: int = 64,
            device: str = "auto", backend: str | None = None, crop_pct: float | None = None) -> list[dict]:
    """Top-k labels for each input file (or every known file inside input folders).

    Returns a list of ``{"file": path, "top_k": [{"label": str, "prob": float}, ...]}``; an unreadable file
    gets ``{"file": path, "error": "..."}`` instead, and the others are still predicted.
    ``backend``: ``None`` runs the model as trained (its precision, PyTorch); ``"auto"``, ``"onnxruntime"``,
    ``"bf16"`` or ``"eager"`` go through :class:`~resnetlab.deploy.predictor.Predictor` (``auto``: ONNX Runtime
    on CPUs when installed, the fastest here; the first call exports and caches the model).
    ``crop_pct``: as in :func:`evaluate` (images only).
    """
    from resnetlab.data.layout import list_input_files

    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    if backend is not None:
        from resnetlab.deploy.predictor import Predictor

        predictor = Predictor.load(run_or_checkpoint, backend=backend, device=device)
        if crop_pct:
            predictor.decode_file = decoder_for(predictor.pipeline_cfg, crop_pct)[0]
        return predictor.predict_files([str(p) for p in inputs], top_k=top_k, batch_size=batch_size)
    files = list_input_files([str(p) for p in inputs], keep_unknown=True)
    if not files:
        raise DataError(f"no image or audio files in {', '.join(map(str, inputs))}")
    model, pipeline, meta = load_model(run_or_checkpoint, device=device)
    decode, _, _ = decoder_for(meta["pipeline"], crop_pct)
    dev = next(model.parameters()).device
    prec = inference_precision(dev, meta, getattr(model, "ndim", 2), channels_last=False)

    def logits(batch: np.ndarray) -> torch.Tensor:
        return forward_logits(model, pipeline, torch.from_numpy(batch).to(dev), prec)

    return predict_files(files, decode, logits, meta["classes"], top_k=top_k, batch_size=batch_size)


def _finetune_model(cfg, prepared: PreparedData, pipeline: Pipeline, cw, log):
    """Build the pretrained architecture for this data (classes, channels, truncation, head) and load weights."""
    from resnetlab.models.pretrained import _architecture, load_pretrained
    from resnetlab.models.resnet import ResNet

    name, kwargs = _architecture(cw, cfg.arch)
    overrides = {**kwargs, **cw.required_kwargs, "drop_rate": cfg.drop_rate}
    if cfg.head_hidden:
        overrides["head_hidden"] = cfg.head_hidden
    if cfg.keep_stages:
        spec = get_spec(name)
        if spec.cls is not ResNet:
            raise ValueError(f"--keep-stages works on ResNet architectures, not {name}")
        defaults = {"widths": [64, 128, 256, 512], "strides": None}
        layers = list(overrides.get("layers", spec.config["layers"]))
        if not 1 <= cfg.keep_stages <= len(layers):
            raise ValueError(f"--keep-stages must be between 1 and {len(layers)} for {name}, got {cfg.keep_stages}")
        k = cfg.keep_stages
        widths = list(overrides.get("widths", spec.config.get("widths", defaults["widths"])))
        strides = overrides.get("strides", spec.config.get("strides")) or [1] + [2] * (len(layers) - 1)
        overrides.update(layers=layers[:k], widths=widths[:k], strides=list(strides)[:k])
    if cw.bn_eps is not None and get_spec(name).cls is ResNet:
        overrides["norm_eps"] = cw.bn_eps
    in_chans = pipeline.input_size()[0]
    model = create_model(name, num_classes=prepared.spec.num_classes, in_chans=in_chans, **overrides)
    report = load_pretrained(model, cw)
    log(str(report))
    if "conv1.weight" not in report.loaded:  # a whitening stem for other channels: set from this data
        init_from_data(model, prepared, pipeline, log)
    return name, model, overrides, report


def _finetune_config(data, pretrained, config, options: dict):
    """A FinetuneConfig from defaults, a YAML path or mapping, then keyword options (``None`` values skipped)."""
    from resnetlab.training.config import FinetuneConfig

    if data is not None:
        options["data"] = data
    if pretrained is not None:
        options["pretrained"] = pretrained
    if isinstance(config, (str, Path)):
        config = load_yaml(config)
    return make_config(FinetuneConfig, dict(config or {}), {k: v for k, v in options.items() if v is not None})


def finetune(data: str | None = None, *, pretrained: str | None = None, config=None, log=None, callbacks=None,
             **options) -> TrainResult:
    """Fine-tune pretrained weights on ``data`` with a strategy; the same run directory and report as ``train``.

    ``pretrained``: a file or folder in any supported format, or a known name looked up in the local caches
    (``torchvision:resnet50``, ``timm:resnet50.a1_in1k``, ``hf:microsoft/resnet-50``, ``keras:resnet50``).
    Other keywords are :class:`~resnetlab.training.config.FinetuneConfig` fields (``strategy``, ``epochs``,
    ``head_epochs``, ``lr_decay``, ``freeze_bn``, ``head_hidden``, ``keep_stages``...). ``callbacks``: as in
    :func:`train`.
    """
    callbacks = as_callbacks(callbacks)
    from resnetlab.models.pretrained import _architecture, read_pretrained
    from resnetlab.training.config import FinetuneConfig
    from resnetlab.training.finetune import make_phases

    resume_target(options)
    cfg = _finetune_config(data, pretrained, config, options)
    log = distributed.main_only(log or _log_to(cfg.quiet))  # under torchrun only rank 0 speaks
    if cfg.resume:
        cfg = resumed_config(FinetuneConfig, cfg, options)
    if not cfg.pretrained:
        raise ValueError("no pretrained weights: pass --pretrained FILE_OR_NAME (e.g. a resnetlab run's "
                         "checkpoints/best.safetensors, a torchvision .pth, or torchvision:resnet50)")
    cw = read_pretrained(cfg.pretrained)
    cfg.arch = _architecture(cw, cfg.arch)[0]
    # The default lr is the from-scratch one: the new head needs it, and every strategy already lowers the
    # pretrained layers' rates (discriminative multipliers, lp-ft's tenth). A further quarter of it left the heads
    # of few-sample runs untrained (BENCHMARKS.md, "Fine-tuning").
    cfg, device, prepared, pipeline = prepare_run(cfg, log)
    name, model, overrides, report = _finetune_model(cfg, prepared, pipeline, cw, log)
    phases = make_phases(cfg.strategy, model, cfg.epochs, head_epochs=cfg.head_epochs, lr=cfg.lr,
                         lr_decay=cfg.lr_decay, freeze_bn=cfg.freeze_bn)
    meta = model_meta(cfg, prepared, pipeline.input_size()[0], overrides)
    meta["pretrained"] = {"source": cfg.pretrained, "format": cw.format, "loaded": len(report.loaded),
                          "reshaped": report.reshaped, "new": report.new, "ignored": len(report.ignored)}
    result = run_training(cfg, model, prepared, pipeline, device, meta, phases=phases, log=log, callbacks=callbacks)
    for line in result.summary_lines():
        log(line)
    return result


def lr_find(data: str | None = None, *, pretrained: str | None = None, start_lr: float = 1e-6,
            end_lr: float = 10.0, steps: int = 100, config=None, log=None, **options) -> dict:
    """Learning-rate range test on ``data`` for a fresh (or ``pretrained``) model; writes ``lr_find.png`` and
    ``lr_find.json`` to ``out`` and returns ``{"suggestion", "steepest", "valley", "lrs", "losses", "plot"}``
    (``valley``: fastai's suggestion, :func:`resnetlab.training.lr_find.valley`)."""
    from resnetlab.report.plots import plot_lr_find
    from resnetlab.training.lr_find import lr_range_test

    cfg = _finetune_config(data, pretrained, config, options)
    log = log or _log_to(cfg.quiet)
    cw = None
    if cfg.pretrained:
        from resnetlab.models.pretrained import _architecture, read_pretrained

        cw = read_pretrained(cfg.pretrained)
        cfg.arch = _architecture(cw, cfg.arch)[0]
    cfg, device, prepared, pipeline = prepare_run(cfg, log)
    if cfg.out is None or cfg.out.startswith("runs/"):
        cfg.out = cfg.out.replace("runs/", "runs/lr-find-", 1) if cfg.out else "runs/lr-find"
    if cw is not None:
        _, model, _, _ = _finetune_model(cfg, prepared, pipeline, cw, log)
    else:
        model = new_model(cfg.arch, prepared, pipeline, log)
    prec = pick_precision(device, cfg.precision, cfg.channels_last, getattr(model, "ndim", 2))
    train_loader, _ = make_loaders(cfg, prepared, device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg.grad_norm_every = 0
    trainer = Trainer(model, pipeline, train_loader, None, cfg, out, {}, prec, log=log)
    res = lr_range_test(trainer, start_lr=start_lr, end_lr=end_lr, steps=steps)
    plot = plot_lr_find(res.lrs, res.losses, out / "lr_find.png", suggestion=res.suggestion)
    result = {"suggestion": res.suggestion, "steepest": res.steepest, "valley": res.valley, "lrs": res.lrs,
              "losses": res.losses, "plot": str(plot)}
    atomic_write(out / "lr_find.json", json.dumps(result, indent=1))
    log(f"suggested lr {res.suggestion:.3g} (a tenth of the minimum-loss lr; steepest descent at "
        f"{res.steepest:.3g}; fastai's valley at {res.valley:.3g}); plot: {plot}")
    return result
