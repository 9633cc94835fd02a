"""Where a run's metrics go besides ``metrics.jsonl``: CSV files, TensorBoard, Weights & Biases, MLflow and the
Python API's callbacks, each behind the one small :class:`Logger` interface.

    RUN_DIR/metrics.csv    one row per epoch: the records of metrics.jsonl as a table (always)
    RUN_DIR/steps.csv      one row every --log-every steps: step, epoch, loss, lr, samples_per_s, grad_norm (always)
    RUN_DIR/tensorboard/   event files (--log tensorboard; needs the tensorboard package, the [log] extra)

W&B and MLflow are used only when asked for (``--log wandb``, ``--log mlflow``) and installed; they read their own
settings from the environment (``WANDB_PROJECT``, ``WANDB_MODE``, ``MLFLOW_TRACKING_URI``...). Loggers run on the
process that writes the run directory (rank 0 under torchrun).

Step values are read from the device only every ``log_every`` steps (one host sync each), never every step.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

from resnetlab.fileio import atomic_write

LOGGER_NAMES = ("csv", "tensorboard", "wandb", "mlflow")
STEP_COLUMNS = ("step", "epoch", "loss", "lr", "samples_per_s", "grad_norm")
# the package each logger needs, and how to get it
_PACKAGES = {"tensorboard": ("tensorboard", "pip install 'resnetlab[log]' (or pip install tensorboard)"),
             "wandb": ("wandb", "pip install wandb"), "mlflow": ("mlflow", "pip install mlflow")}


class Logger(Protocol):
    """Receives a run's values. ``log_step``: every ``log_every`` steps (``step`` counts batches since the run's
    start); ``log_epoch``: after each epoch, with the epoch's record (as in ``metrics.jsonl``) plus ``step``."""

    def log_step(self, step: int, values: dict[str, float]) -> None: ...

    def log_epoch(self, epoch: int, values: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def normalize_log_names(value: str | Iterable[str] | None) -> str:
    """``"tensorboard, csv"`` (or a list) -> ``"csv,tensorboard"``: checked, csv first and always present."""
    if value is None:
        value = ""
    parts = value.replace(",", " ").split() if isinstance(value, str) else [str(v) for v in value]
    bad = [p for p in parts if p not in LOGGER_NAMES]
    if bad:
        raise ValueError(f"bad value for --log: {', '.join(bad)}; allowed: a comma-separated list of "
                         f"{', '.join(LOGGER_NAMES)}")
    return ",".join(n for n in LOGGER_NAMES if n == "csv" or n in parts)


def check_available(names: str) -> None:
    """A one-line ValueError if a logger in ``names`` needs a package that is not installed."""
    for name in normalize_log_names(names).split(","):
        if name in _PACKAGES:
            package, how = _PACKAGES[name]
            if not _installed(package):
                raise ValueError(f"--log {name} needs the {package} package, which is not installed: {how}")


def _installed(package: str) -> bool:
    if package in sys.modules:  # (None there: an import that failed, or one blocked on purpose)
        return sys.modules[package] is not None
    return importlib.util.find_spec(package) is not None


def as_callbacks(callbacks) -> list:
    """``callbacks`` as a list, checked: objects with ``on_step_end(step, values)`` and/or
    ``on_epoch_end(epoch, metrics)``, or plain callables (called as ``on_epoch_end``)."""
    if callbacks is None:
        return []
    items = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
    for cb in items:
        if not (hasattr(cb, "on_step_end") or hasattr(cb, "on_epoch_end") or callable(cb)):
            raise ValueError(f"callback {cb!r} has neither on_step_end nor on_epoch_end and is not callable")
    return items


# --- CSV --------------------------------------------------------------------------------------------------
def _cell(v) -> str:
    if v is None:
        return ""
    return repr(v) if isinstance(v, float) else str(v)


def write_epoch_csv(path: Path, records: list[dict]) -> None:
    """``records`` (``metrics.jsonl``'s) as a CSV table, rewritten whole: the columns are every key in the order
    first seen; an epoch without a value (not validated) has an empty cell."""
    columns: list[str] = []
    for r in records:
        columns += [k for k in r if k not in columns]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in records:
        w.writerow([_cell(r.get(c)) for c in columns])
    atomic_write(path, buf.getvalue())


class StepCsv:
    """``steps.csv``: one row per logged step (``STEP_COLUMNS``; empty where a value was not measured).

    A resumed run (``start_step > 0``) keeps the rows of the steps before ``start_step`` and drops the rest, which
    it will redo, as ``grad_norms.jsonl`` does; a new run starts the file afresh."""

    def __init__(self, path: Path, start_step: int = 0):
        self.path = Path(path)
        kept = []
        if start_step > 0 and self.path.exists():
            with open(self.path, newline="") as f:
                for row in list(csv.reader(f))[1:]:
                    try:
                        if int(row[0]) <= start_step:
                            kept.append(row)
                    except (ValueError, IndexError):  # a torn last line of a killed run
                        pass
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(STEP_COLUMNS)
        w.writerows(kept)
        atomic_write(self.path, buf.getvalue())

    def log_step(self, step: int, values: dict[str, float]) -> None:
        row = [_cell({**values, "step": step}.get(c)) for c in STEP_COLUMNS]
        with open(self.path, "a", newline="") as f:
            csv.writer(f, lineterminator="\n").writerow(row)

    def log_epoch(self, epoch: int, values: dict[str, float]) -> None:
        pass  # metrics.csv is written with metrics.jsonl, from the checkpointed history (write_epoch_csv)

    def close(self) -> None:
        pass


# --- adapters ---------------------------------------------------------------------------------------------
def _numbers(values: dict) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardLogger:
    """Scalars ``train/<name>`` per logged step and ``epoch/<name>`` per epoch, both against the step (so curves
    of runs with different epoch lengths line up). A resumed run hides the events of a killed session past its
    checkpoint (``purge_step``)."""

    def __init__(self, log_dir: Path, start_step: int = 0):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # (check_available said so earlier, in the one-line form)
            raise ValueError(f"--log tensorboard needs the tensorboard package: {_PACKAGES['tensorboard'][1]}") \
                from None
        # events at steps after start_step came from a session that died before its next checkpoint
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=start_step + 1 if start_step else None)

    def log_step(self, step: int, values: dict[str, float]) -> None:
        for k, v in _numbers(values).items():
            if k != "step":
                self.writer.add_scalar(f"train/{k}", v, step)

    def log_epoch(self, epoch: int, values: dict[str, float]) -> None:
        step = int(values.get("step", epoch))
        for k, v in _numbers(values).items():
            if k not in ("step", "epoch"):
                self.writer.add_scalar(f"epoch/{k}", v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """A W&B run named after the run directory, with the config; project from ``WANDB_PROJECT`` (default
    ``resnetlab``)."""

    def __init__(self, run_dir: Path, config: dict):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "resnetlab"), name=Path(run_dir).name,
                              dir=str(run_dir), config=config)

    def log_step(self, step: int, values: dict[str, float]) -> None:
        self.run.log({f"train/{k}": v for k, v in _numbers(values).items()}, step=step)

    def log_epoch(self, epoch: int, values: dict[str, float]) -> None:
        step = int(values.get("step", epoch))
        self.run.log({f"epoch/{k}": v for k, v in _numbers(values).items() if k != "step"}, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowLogger:
    """An MLflow run named after the run directory (tracking URI and experiment from MLflow's environment), the
    config's scalar values as parameters."""

    def __init__(self, run_dir: Path, config: dict):
        import mlflow

        self.mlflow = mlflow
        self.run = mlflow.start_run(run_name=Path(run_dir).name)
        mlflow.log_params({k: v for k, v in config.items() if isinstance(v, (str, int, float, bool))})

    def log_step(self, step: int, values: dict[str, float]) -> None:
        self.mlflow.log_metrics({f"train/{k}": v for k, v in _numbers(values).items()}, step=step)

    def log_epoch(self, epoch: int, values: dict[str, float]) -> None:
        step = int(values.get("step", epoch))
        self.mlflow.log_metrics({f"epoch/{k}": v for k, v in _numbers(values).items() if k != "step"}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class CallbackLogger:
    """The Python API's ``callbacks=``: ``on_step_end(step, values)`` every ``log_every`` steps and
    ``on_epoch_end(epoch, metrics)`` after each epoch (a plain callable: ``on_epoch_end``). Each gets a copy."""

    def __init__(self, callbacks: list):
        self.callbacks = callbacks

    def log_step(self, step: int, values: dict[str, float]) -> None:
        for cb in self.callbacks:
            if hasattr(cb, "on_step_end"):
                cb.on_step_end(step, dict(values))

    def log_epoch(self, epoch: int, values: dict[str, float]) -> None:
        for cb in self.callbacks:
            fn: Callable | None = getattr(cb, "on_epoch_end", None) or (
                cb if callable(cb) and not hasattr(cb, "on_step_end") else None)
            if fn is not None:
                fn(epoch, dict(values))

    def close(self) -> None:
        pass


class RunLoggers:
    """Every logger of a run, fanned out; ``due(step)`` says when a step is to be logged (every ``every``)."""

    def __init__(self, loggers: list, every: int, start_step: int = 0):
        self.loggers, self.every, self.last = loggers, max(int(every), 1), start_step

    @classmethod
    def open(cls, names: str, run_dir: Path, *, every: int, start_step: int = 0, config: dict | None = None,
             callbacks=None) -> RunLoggers:
        """The loggers in ``names`` (csv is always on) plus the callbacks, for a run at ``start_step``."""
        names_list = normalize_log_names(names).split(",")
        check_available(",".join(names_list))
        run_dir = Path(run_dir)
        loggers: list = [StepCsv(run_dir / "steps.csv", start_step)]
        config = config or {}
        if "tensorboard" in names_list:
            loggers.append(TensorBoardLogger(run_dir / "tensorboard", start_step))
        if "wandb" in names_list:
            loggers.append(WandbLogger(run_dir, config))
        if "mlflow" in names_list:
            loggers.append(MlflowLogger(run_dir, config))
        callbacks = as_callbacks(callbacks)
        if callbacks:
            loggers.append(CallbackLogger(callbacks))
        return cls(loggers, every, start_step)

    def due(self, step: int) -> bool:
        """Whether ``step`` (a group's last batch) crosses a multiple of ``every`` since the last logged step."""
        return step // self.every > self.last // self.every

    def log_step(self, step: int, values: dict[str, float]) -> None:
        self.last = step
        for lg in self.loggers:
            lg.log_step(step, values)

    def log_epoch(self, epoch: int, values: dict[str, float]) -> None:
        for lg in self.loggers:
            lg.log_epoch(epoch, values)

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()
