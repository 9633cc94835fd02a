"""One typed training configuration: defaults, then a YAML file, then the command line.

Every field is a command-line option (``--batch-size``) and a YAML key (``batch_size``). ``None`` means
"choose from the data" (see :func:`resnetlab.training.defaults.resolve`). The resolved config is written to
``RUN_DIR/config.yaml`` beside every checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from resnetlab.fileio import atomic_write
from resnetlab.training.loggers import normalize_log_names


@dataclass(frozen=True)
class Range:
    """Allowed numeric values of a field: ``lo``/``hi`` bounds (``None``: unbounded), closed unless ``*_open``."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, value: float) -> bool:
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return not (self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi))

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        return f"{'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"


POSITIVE = Range(0, lo_open=True)
NON_NEGATIVE = Range(0)
AT_LEAST_ONE = Range(1)
FRACTION = Range(0, 1, hi_open=True)  # [0, 1)
PROBABILITY = Range(0, 1)  # [0, 1]


def _opt(default, help: str, choices: tuple | None = None, group: str = "training", check: Range | None = None,
         metavar: str | None = None, aliases: dict | None = None, flags: tuple[str, ...] = ()):
    """A config field. ``aliases`` maps old names of a choice to the current one (read from old configs and
    command lines, never written). ``flags``: its command-line option names when not ``--field-name``."""
    meta = {"help": help, "choices": choices, "group": group, "check": check, "metavar": metavar,
            "aliases": aliases or {}, "flags": flags}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Hyperparameters of a run, with their units. ``None``: chosen from the data at start."""

    # data
    data: str | None = _opt(None, "dataset: a folder (class subfolders, or train/ + val|test/), a CSV manifest "
                                  "(path,label), or builtin:digits / builtin:spoken-digits", group="data")
    val_fraction: float = _opt(0.1, "fraction of each class carved out of train for validation when the data has no "
                                    "validation split of its own (a test split is never validated on: it is "
                                    "evaluated once, at the end)", group="data", check=FRACTION)
    group_by: str | None = _opt(None, "regular expression whose first capture group, matched on each file name, "
                                      "names its group (a speaker, a patient, a typeface): the validation split "
                                      "takes whole groups (default: a CSV group column, or the Speech Commands "
                                      "SPEAKER_nohash_N and FSDD DIGIT_SPEAKER_TAKE namings when the files follow "
                                      "them; none: off)", group="data", metavar="REGEX")
    img_size: int | None = _opt(None, "image side in pixels (default: the median size of the data, capped at 224)",
                                group="data", check=Range(8))
    channels: int | None = _opt(None, "image channels: 1 or 3 (default: 1 when every image is grayscale)", (1, 3),
                                group="data")
    strict_data: bool = _opt(False, "stop at the first unreadable file instead of skipping and listing it",
                             group="data")
    cache_dir: str | None = _opt(None, "decoded-data cache (default: $RESNETLAB_CACHE or ~/.cache/resnetlab)",
                                 group="data")
    stream: bool | None = _opt(None, "decode files on the fly in DataLoader workers instead of caching (default: "
                                     "only when the decoded data would not fit the cache)", group="data")
    workers: int = _opt(2, "DataLoader worker processes for --stream", group="data", check=Range(0),
                        flags=("--workers", "-j"))
    # model
    arch: str | None = _opt(None, "model name from `resnetlab models` (default: chosen from the data)",
                            group="model", flags=("--arch", "--model"))
    drop_rate: float = _opt(0.0, "dropout before the classifier", group="model", check=FRACTION)
    zero_init_last: bool = _opt(False, "start every residual block as the identity (zero last BN scale; "
                                       "helps deep bottleneck nets, hurts small option-A CIFAR nets)",
                                group="model")
    # optimisation
    epochs: int | None = _opt(None, "epochs (default: from the dataset size; with --time-budget, as many as fit, "
                                    "up to 1000)", check=AT_LEAST_ONE)
    time_budget: float = _opt(0.0, "train for this many minutes of wall time (validation included; the final "
                                   "validation and report come after it): the learning-rate schedule is stretched "
                                   "over the budget and ends at zero when it runs out, mid-epoch if need be; "
                                   "--epochs, if given, still caps the run; fine-tuning: strategies full and "
                                   "linear-probe only (0: off)",
                              check=NON_NEGATIVE, metavar="MIN")
    batch_size: int | None = _opt(None, "batch size (default: from the dataset size)", check=AT_LEAST_ONE,
                                  flags=("--batch-size", "-b"))
    optimizer: str = _opt("sgd", "optimizer (muon: Muon for the stages' convolution filters and weight matrices, "
                                 "Nesterov SGD at --lr for the rest: the stem, norms, biases and the head)",
                          ("sgd", "adamw", "muon"), flags=("--optimizer", "--opt"))
    lr: float | None = _opt(None, "peak learning rate (default: images 0.2 x batch/256 SGD, 2e-3 x batch/256 "
                                       "AdamW; audio 0.1 SGD, 2e-3 AdamW; fine-tuning the same, lowered for the "
                                       "pretrained layers by the strategy; muon: the SGD part's, as SGD)",
                            check=POSITIVE)
    momentum: float = _opt(0.9, "SGD momentum (Nesterov; muon: of the SGD part)", check=FRACTION)
    muon_lr: float = _opt(0.15, "--optimizer muon: peak lr of the Muon part, each filter's step relative to its "
                                "norm, which stays fixed; fine-tuning strategies lower it with --lr",
                          check=POSITIVE)
    muon_momentum: float = _opt(0.6, "--optimizer muon: momentum (Nesterov) of the Muon part", check=FRACTION)
    weight_decay: float | None = _opt(None, "weight decay, not applied to norms and biases "
                                            "(default: 5e-4 SGD and muon's SGD part, 0.05 AdamW; none on Muon's "
                                            "fixed-norm filters)", check=NON_NEGATIVE)
    schedule: str = _opt("linear", "learning-rate schedule after warm-up: linear (decays linearly to 0, as in "
                                   "airbench and the Hugging Face Trainer), cosine (to 0), constant, step (divided by "
                                   "10 at half and at three quarters of the steps: He et al. 2015's CIFAR schedule, "
                                   "32k and 48k of 64k); onecycle is an old name of linear",
                         ("linear", "cosine", "constant", "step"), aliases={"onecycle": "linear"},
                         flags=("--schedule", "--sched"))
    warmup_epochs: float = _opt(1.0, "linear warm-up, in epochs (fractions allowed; at most a quarter of the run)",
                                check=NON_NEGATIVE)
    label_smoothing: float = _opt(0.1, "label smoothing of the cross-entropy", check=FRACTION,
                                  flags=("--label-smoothing", "--smoothing"))
    ema: float = _opt(0.0, "decay of an exponential moving average of the weights, evaluated and saved as best "
                           "when better (0: off; e.g. 0.999)", check=FRACTION,
                       flags=("--ema", "--model-ema-decay"))
    lookahead: bool = _opt(False, "lookahead weight averaging (airbench): every 5 steps the weights become a slow "
                                  "average of themselves, weighted more toward the past as the run ends")
    grad_clip: float = _opt(0.0, "clip the global gradient norm to this value (0: off)", check=NON_NEGATIVE,
                            flags=("--grad-clip", "--clip-grad"))
    accum_steps: int = _opt(1, "gradient accumulation: one optimizer step every N batches, each batch's loss divided "
                               "by N (effective batch: N x batch_size x processes)", check=AT_LEAST_ONE)
    # augmentation (images)
    crop_pad: int | None = _opt(None, "random crop with this much padding, in pixels (default: img_size/8 for "
                                      "small images, 0 when random-resized-crop is on)", group="augmentation",
                                      check=NON_NEGATIVE)
    flip: bool = _opt(True, "horizontal flips, drawn as --flip-mode says (turn off for digits and text)",
                      group="augmentation")
    flip_mode: str = _opt("random", "how --flip draws: random (each image mirrored with probability 1/2 every epoch) "
                                    "or alternate (airbench's derandomised flip: each image mirrored every other "
                                    "epoch, from a random start set by --seed)", ("random", "alternate"),
                          group="augmentation")
    rrc: bool | None = _opt(None, "random-resized-crop (default: on for images of 96 px and more)",
                            group="augmentation")
    cutout: int = _opt(0, "cutout square side in pixels (0: off)", group="augmentation", check=NON_NEGATIVE)
    progressive_resize: float = _opt(0.0, "progressive resizing: train on images at this fraction of --img-size "
                                          "at first (e.g. 0.75), growing to the full size over the first three "
                                          "quarters of the run (its epochs, or its --time-budget); validation "
                                          "always at the full size (0: off)", group="augmentation",
                                     check=FRACTION, metavar="F")
    mixup: float = _opt(0.0, "mixup alpha (0: off)", group="augmentation", check=NON_NEGATIVE)
    cutmix: float = _opt(0.0, "cutmix alpha (0: off)", group="augmentation", check=NON_NEGATIVE)
    mean: list[float] | None = _opt(None, "per-channel mean for normalisation (default: measured on the data)",
                                    group="augmentation")
    std: list[float] | None = _opt(None, "per-channel std for normalisation (default: measured on the data)",
                                   group="augmentation")
    # audio
    sample_rate: int | None = _opt(None, "audio: target sample rate in Hz (default: the data's own rate, at most "
                                         "16000; upsampling only adds empty mel bands)", group="audio",
                                   check=AT_LEAST_ONE)
    duration: float | None = _opt(None, "audio: clip length in seconds (default: from the data)", group="audio",
                                  check=POSITIVE)
    features: str = _opt("logmel", "audio: front-end", ("logmel", "mfcc"), group="audio")
    n_mels: int = _opt(40, "audio: mel bands (and MFCCs)", group="audio", check=AT_LEAST_ONE)
    win_ms: float = _opt(25.0, "audio: analysis window in ms", group="audio", check=POSITIVE)
    hop_ms: float = _opt(10.0, "audio: hop in ms", group="audio", check=POSITIVE)
    time_shift_ms: float = _opt(100.0, "audio: random time shift, +- ms", group="audio", check=NON_NEGATIVE)
    noise_prob: float = _opt(0.0, "audio: probability of mixing background noise into a clip (helps noisy "
                                   "deployments; on small clean sets it costs accuracy)", group="audio",
                             check=PROBABILITY)
    noise_dir: str | None = _opt(None, "audio: folder of noise clips (default: generated noise)", group="audio")
    snr_db: list[float] = _opt([10.0, 30.0], "audio: SNR range of mixed noise, dB", group="audio")
    spec_augment: bool = _opt(True, "audio: SpecAugment time and frequency masks", group="audio")
    speed_perturb: bool = _opt(False, "audio: random speed perturbation 0.9-1.1x", group="audio")
    # engine
    device: str = _opt("auto", "device", ("auto", "cpu", "cuda"), group="engine")
    precision: str = _opt("auto", "autocast precision (auto: bf16 where the hardware supports it, fp32 otherwise)",
                          ("auto", "fp32", "bf16", "fp16"), group="engine")
    channels_last: bool | None = _opt(None, "channels-last memory format for 2-D nets (default: on)", group="engine")
    compile: bool = _opt(False, "torch.compile the model", group="engine")
    seed: int = _opt(0, "random seed (data split, init, augmentation, order)", group="engine")
    threads: int | None = _opt(None, "CPU threads for torch (default: torch's choice, one per core; 1 is much "
                                     "faster for small models on a busy machine)", group="engine", check=Range(1))
    deterministic: bool = _opt(False, "deterministic algorithms (slower; bitwise-reproducible on CPU)",
                               group="engine")
    out: str | None = _opt(None, "run directory (default: runs/<date>-<arch>)", group="engine",
                           flags=("--out", "--output"))
    resume: bool = _opt(False, "continue a run from its last checkpoint: the run in --out, or --resume RUN_DIR, or "
                               "--resume RUN_DIR/checkpoints/last.safetensors (to start from another checkpoint's "
                               "weights: finetune --pretrained FILE)", group="engine", metavar="RUN_DIR|CHECKPOINT")
    checkpoint_every: int = _opt(0, "also save checkpoints/last every N batches, so a killed run loses little "
                                    "(0: at the end of each epoch only)", group="engine", check=NON_NEGATIVE)
    save_at_end: bool = _opt(False, "save checkpoints/last when the run ends (and on SIGTERM, Ctrl-C, "
                                    "--checkpoint-every and a new best), not after every epoch: in runs of seconds "
                                    "per epoch the hash and fsync of each save cost a large share", group="engine")
    sync_bn: bool = _opt(False, "distributed (torchrun): BatchNorm statistics over the global batch instead of each "
                                "process's (SyncBatchNorm; CUDA only)", group="engine")
    val_every: int = _opt(1, "validate every N epochs, and always after the last (0: after the last only; saves "
                             "time in short runs)", group="engine", check=NON_NEGATIVE)
    quiet: bool = _opt(False, "no progress bars: one line per epoch, for logs", group="engine")
    grad_norm_every: int = _opt(20, "record per-stage gradient norms every N steps (0: off)", group="engine",
                                check=NON_NEGATIVE)
    # (not named ``log``: that is the API's keyword for the message function)
    loggers: str = _opt("csv", "where metrics go, comma-separated: csv (always: metrics.csv per epoch, steps.csv "
                               "every --log-every steps), tensorboard (RUN_DIR/tensorboard; pip install "
                               "'resnetlab[log]'), wandb, mlflow (when installed)", group="engine", metavar="NAMES",
                        flags=("--log", "--loggers"))
    log_every: int = _opt(50, "log loss, lr, samples/s and the gradient norm (when computed at that step) every N "
                              "steps to steps.csv and --log's loggers", group="engine", check=AT_LEAST_ONE)

    def __post_init__(self):
        for f in fields(self):
            value = _resolve_alias(f, getattr(self, f.name))
            _check_allowed(f, value)
            setattr(self, f.name, value)
        self.loggers = normalize_log_names(self.loggers)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class FinetuneConfig(TrainConfig):
    """A training config plus where the pretrained weights come from and how to adapt them."""

    pretrained: str | None = _opt(None, "weights: a file or folder (resnetlab, torchvision, timm, Hugging Face, "
                                        "Keras), or torchvision:NAME / timm:NAME / hf:ORG/NAME / keras:NAME looked "
                                        "up in the local caches", group="fine-tuning")
    strategy: str = _opt("lp-ft", "linear-probe: head only; full: all, discriminative lr; staged: head then all; "
                                  "gradual: unfreeze a stage per phase; lp-ft: linear probe then full at lr/10",
                         ("linear-probe", "full", "staged", "gradual", "lp-ft"), group="fine-tuning")
    head_epochs: int | None = _opt(None, "epochs of the head-only phase (staged, gradual, lp-ft; default: a third)",
                                   group="fine-tuning")
    lr_decay: float = _opt(0.3, "discriminative learning rates: each stage gets this times the next one's",
                           group="fine-tuning")
    freeze_bn: bool = _opt(False, "keep the backbone's BatchNorm statistics frozen (eval mode) in every phase; "
                                  "for small batches", group="fine-tuning")
    head_hidden: int | None = _opt(None, "a small MLP head with this many hidden units instead of a linear one",
                                   group="fine-tuning")
    keep_stages: int | None = _opt(None, "truncate the network to its first N stages (their weights are kept)",
                                   group="fine-tuning")

    def __post_init__(self):
        super().__post_init__()
        if self.time_budget and self.strategy not in SINGLE_PHASE_STRATEGIES:
            allowed = ", ".join(SINGLE_PHASE_STRATEGIES)
            raise ValueError(f"--time-budget works with the single-phase strategies ({allowed}); "
                             f"strategy {self.strategy!r} trains in phases")


SINGLE_PHASE_STRATEGIES = ("full", "linear-probe")


def _base_type(tp):
    """``int | None`` -> ``int``; ``list[float] | None`` -> ``list[float]``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def _field_types(cls) -> dict:
    return typing.get_type_hints(cls)


def coerce(cls, key: str, value):
    """Check and convert one value for field ``key``; a ValueError says what was received and what is allowed."""
    hints = _field_types(cls)
    if key not in hints:
        allowed = ", ".join(f.name for f in fields(cls))
        raise ValueError(f"unknown config key {key!r}; allowed: {allowed}")
    f = next(f for f in fields(cls) if f.name == key)
    tp = hints[key]
    if value is None:
        if type(None) in typing.get_args(tp):
            return None
        raise ValueError(f"config key {key!r} cannot be empty")
    base = _base_type(tp)
    try:
        if base is bool:
            if isinstance(value, str):
                low = value.lower()
                if low not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise ValueError
                value = low in ("true", "1", "yes", "on")
            elif not isinstance(value, bool):
                raise ValueError
        elif typing.get_origin(base) is list:
            (inner,) = typing.get_args(base)
            if isinstance(value, str):
                value = [v for v in value.replace(",", " ").split() if v]
            if not isinstance(value, (list, tuple)):
                raise ValueError
            value = [inner(v) for v in value]
            if inner is float and not all(math.isfinite(v) for v in value):
                raise ValueError
        elif base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            value = int(value)
        elif base is float:
            if isinstance(value, bool):
                raise ValueError
            value = float(value)
            if not math.isfinite(value):  # NaN, inf: never a meaningful setting
                raise ValueError
        elif base is str:
            if isinstance(value, os.PathLike):  # data=Path(...), out=tmp_path / "run"
                value = os.fspath(value)
            if not isinstance(value, (str, int, float)):
                raise ValueError
            value = str(value)
    except (TypeError, ValueError):
        raise ValueError(f"bad value for {key!r}: {value!r} (expected {getattr(base, '__name__', base)})") from None
    value = _resolve_alias(f, value)
    _check_allowed(f, value)
    return value


def _resolve_alias(f: dataclasses.Field, value):
    """The current name of a choice given by an old name (``schedule: onecycle`` -> ``linear``)."""
    aliases = f.metadata.get("aliases") or {}
    return aliases.get(value, value) if isinstance(value, str) else value


def _check_allowed(f: dataclasses.Field, value) -> None:
    """A ValueError naming the field, the value and what is allowed, when ``value`` is outside its choices/range."""
    if value is None:
        return
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ValueError(f"bad value for {f.name!r}: {value!r}; allowed: {', '.join(map(str, choices))}")
    check = f.metadata.get("check")
    if check is not None and isinstance(value, (int, float)) and value not in check:
        raise ValueError(f"bad value for {f.name!r}: {value!r}; allowed: {check}")


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping of config keys; a one-line ValueError names the file and the problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"cannot read config {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ValueError(f"cannot read config {path}: not a UTF-8 text (YAML) file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        what = getattr(e, "problem", None) or " ".join(str(e).split())  # one line, whatever the error type
        raise ValueError(f"bad YAML in {path}{where}: {what}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config {path} must be a mapping of keys to values, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def make_config(cls=TrainConfig, *layers: dict):
    """Defaults, then each mapping in ``layers`` in order (YAML file, then command line), each value checked."""
    values = {}
    for layer in layers:
        for k, v in layer.items():
            values[k] = coerce(cls, k, v)
    return cls(**values)


# options that act only when another option has a given value: option -> (that option, the value)
DEPENDS_ON = {"muon_lr": ("optimizer", "muon"), "muon_momentum": ("optimizer", "muon"), "flip_mode": ("flip", True)}


def inert_options(cfg: TrainConfig) -> list[str]:
    """A sentence for each option set away from its default that does nothing in ``cfg`` (``--muon-lr`` without
    ``--optimizer muon``): a user who set it expects it to act."""
    defaults = {f.name: f.default for f in fields(cfg)}
    notes = []
    for name, (other, needed) in DEPENDS_ON.items():
        if getattr(cfg, name) != defaults[name] and getattr(cfg, other) != needed:
            flag, other_flag = "--" + name.replace("_", "-"), "--" + other.replace("_", "-")
            needs = other_flag if needed is True else f"{other_flag} {needed}"
            notes.append(f"{flag} {getattr(cfg, name)} has no effect without {needs}")
    return notes


def save_config(cfg, path: Path, extra: dict | None = None) -> None:
    data = dataclasses.asdict(cfg)
    if extra:
        data.update(extra)
    atomic_write(path, yaml.safe_dump(data, sort_keys=False))  # a run killed while writing keeps its previous config


class _ChoicesWithAliases(tuple):
    """argparse choices that also accept old names (resolved later by :func:`coerce`) but list only the current
    ones in ``--help`` and error messages."""

    def __new__(cls, choices: tuple, aliases: dict):
        self = super().__new__(cls, choices)
        self.aliases = aliases
        return self

    def __contains__(self, value) -> bool:
        return super().__contains__(value) or value in self.aliases


def add_config_arguments(parser: argparse.ArgumentParser, cls=TrainConfig, skip: tuple[str, ...] = ()) -> None:
    """One option per config field, grouped; unset options stay out of the namespace (argparse.SUPPRESS)."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    hints = _field_types(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        group = f.metadata.get("group", "training")
        if group not in groups:
            groups[group] = parser.add_argument_group(group)
        opts = f.metadata.get("flags") or ("--" + f.name.replace("_", "-"),)
        base = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata.get("help", "")
        if default is not None and default != "":
            help_text += f" [default: {default}]"
        kwargs = {"default": argparse.SUPPRESS, "help": help_text, "dest": f.name}
        if f.name == "resume":  # a switch (the run in --out) that may also name the run or its last checkpoint
            groups[group].add_argument(*opts, nargs="?", const=True, metavar=f.metadata["metavar"], **kwargs)
            groups[group].add_argument("--no-resume", action="store_const", const=False, dest=f.name,
                                       default=argparse.SUPPRESS, help="start afresh (the default)")
            continue
        if base is bool:
            groups[group].add_argument(*opts, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if typing.get_origin(base) is list:
            kwargs.update(nargs="+", metavar="X")
        else:
            kwargs["metavar"] = f.metadata.get("metavar") or (f.name.upper() if base is not str else "TEXT")
        if f.metadata.get("choices") and base is str:  # other types are checked after conversion, in coerce
            kwargs["choices"] = f.metadata["choices"]
            kwargs.pop("metavar")
            if f.metadata.get("aliases"):  # old names are accepted (coerce resolves them) but not listed in --help
                kwargs["choices"] = _ChoicesWithAliases(f.metadata["choices"], f.metadata["aliases"])
                kwargs["metavar"] = "{" + ",".join(f.metadata["choices"]) + "}"
        groups[group].add_argument(*opts, **kwargs)
