"""The run report: one self-contained ``report/index.html`` summarising a run directory.

It reads what the run left behind and writes nothing else: ``config.yaml`` (shown as saved),
``metrics.jsonl`` (the per-epoch table and the headline figures), ``eval.json`` (the run's one evaluation on its
data's test split, shown apart from validation, or a later ``resnetlab evaluate``),
``report/skipped.txt`` (files the data loader skipped) and every ``report/*.png`` (linked relatively, so the
folder can be copied or zipped as a whole). No scripts, fonts or styles are fetched: it opens offline.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path

import yaml

from resnetlab.fileio import atomic_write
from resnetlab.report.metrics import dedupe_epochs

CAPTIONS = {
    "curves": "Loss and accuracy per epoch (train and validation); the star marks the best validation accuracy.",
    "confusion": "Confusion matrix: true class down the rows, predicted class across the columns.",
    "per_class": "Accuracy (recall) on each class, worst first, with the number of samples.",
    "misclassified": "Misclassified validation examples: true → predicted (probability), most confident first.",
    "grad_norms": "Gradient norm of each stage, input to output: how well the gradient reaches the early layers.",
    "spectrograms": "One example log-mel spectrogram per class.",
    "lr_find": "Learning-rate range test: loss against learning rate, with the suggested rate.",
}

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1100px;
       padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { margin-bottom: .2rem; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2rem; margin-top: 2rem; }
.sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; font-size: .9rem; margin: .5rem 0; }
th, td { border: 1px solid #ddd; padding: .25rem .6rem; text-align: right; }
th { background: #f4f4f4; } td.l, th.l { text-align: left; }
tr.best td { background: #e8f5e9; font-weight: 600; }
pre { background: #f7f7f7; border: 1px solid #e3e3e3; padding: .8rem; overflow-x: auto; font-size: .85rem; }
figure { margin: 1.2rem 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: .9rem; }
.cards { display: flex; flex-wrap: wrap; gap: .8rem; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: .5rem .9rem; min-width: 9rem; }
.card .v { font-size: 1.35rem; font-weight: 600; } .card .k { color: #666; font-size: .8rem; }
"""


def load_metrics(path: Path | str) -> list[dict]:
    """Records of a ``metrics.jsonl`` (or of ``<run_dir>/metrics.jsonl``), sorted by epoch.

    Blank and malformed lines (a run killed mid-write) are skipped; when an epoch appears twice (a resumed run
    appended again) the last record wins. A missing file gives ``[]``.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return [dict(r) for r in dedupe_epochs(records)]


def _fmt(v, key: str = "") -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10000 else str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if key == "lr" or (v != 0 and abs(v) < 1e-3):
            return f"{v:.3e}"
        if key in ("seconds",):
            return f"{v:.1f}"
        if key == "samples_per_s" or abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.4f}"
    return str(v)


def _is_acc(key: str) -> bool:
    return "acc" in key or "top" in key


def _pct(v) -> str:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        return "–"
    return f"{v:.2f}%" if v > 1.0 else f"{v:.2%}"


def _columns(records: Sequence[Mapping]) -> list[str]:
    cols: list[str] = []
    for r in records:
        for k in r:
            if k not in cols and not isinstance(r[k], (dict, list)):
                cols.append(k)
    if "epoch" in cols:
        cols.remove("epoch")
        cols.insert(0, "epoch")
    return cols


def _table(records: Sequence[Mapping], cols: Sequence[str], highlight: int | None = None) -> str:
    head = "".join(f'<th class="l">{escape(str(c))}</th>' if i == 0 else f"<th>{escape(str(c))}</th>"
                   for i, c in enumerate(cols))
    body = []
    for i, r in enumerate(records):
        cells = "".join(
            f'<td class="l">{escape(_fmt(r.get(c), c))}</td>' if j == 0 else f"<td>{escape(_fmt(r.get(c), c))}</td>"
            for j, c in enumerate(cols))
        cls = ' class="best"' if i == highlight else ""
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _cards(items: Sequence[tuple[str, str]]) -> str:
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="v">{escape(v)}</div><div class="k">{escape(k)}</div></div>' for k, v in items
    ) + "</div>"


def _headline(records: Sequence[Mapping]) -> tuple[str, int | None]:
    """Cards with the final and best figures, and the index of the best-val-accuracy record."""
    if not records:
        return "<p>No epochs recorded (metrics.jsonl is missing or empty).</p>", None
    last = records[-1]
    items = [("epochs", str(last.get("epoch", len(records))))]
    best_i = None
    val = [(i, r["val_acc"]) for i, r in enumerate(records) if isinstance(r.get("val_acc"), (int, float))
           and math.isfinite(r["val_acc"])]
    if val:
        best_i, best = max(val, key=lambda t: t[1])
        items.append((f"best val accuracy (epoch {records[best_i].get('epoch', best_i + 1)})", _pct(best)))
        top5 = records[best_i].get("val_top5")
        if isinstance(top5, (int, float)):
            items.append(("val top-5 at that epoch", _pct(top5)))
    for key, label in (("val_acc", "final val accuracy"), ("train_acc", "final train accuracy")):
        if isinstance(last.get(key), (int, float)):
            items.append((label, _pct(last[key])))
    losses = [r["val_loss"] for r in records if isinstance(r.get("val_loss"), (int, float))
              and math.isfinite(r["val_loss"])]
    if losses:
        items.append(("lowest val loss", f"{min(losses):.4f}"))
    seconds = [r["seconds"] for r in records if isinstance(r.get("seconds"), (int, float))]
    if seconds:
        items.append(("training time", str(_dt.timedelta(seconds=round(sum(seconds))))))
    speed = [r["samples_per_s"] for r in records if isinstance(r.get("samples_per_s"), (int, float))]
    if speed:
        items.append(("mean samples / s", f"{sum(speed) / len(speed):,.0f}"))
    return _cards(items), best_i


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _test_headline(evaluation: Mapping) -> str:
    """Cards with the test figures, apart from the validation ones: the best checkpoint's one evaluation."""
    items = [("test accuracy", _pct(evaluation.get("accuracy")))]
    if isinstance(evaluation.get("loss"), (int, float)):
        items.append(("test loss", f"{evaluation['loss']:.4f}"))
    if isinstance(evaluation.get("n"), int):
        items.append(("test samples", f"{evaluation['n']:,}"))
    return ("<h2>Test set</h2><p>The best checkpoint, evaluated once after training on the data's test split: "
            "no checkpoint, epoch or setting was chosen on it (validation figures are above and below).</p>"
            + _cards(items))


def _eval_section(data) -> str:
    if not isinstance(data, Mapping):
        return f"<pre>{escape(json.dumps(data, indent=2, default=str))}</pre>"
    scalars = [(k, v) for k, v in data.items() if not isinstance(v, (dict, list))]
    parts = []
    if scalars:
        rows = "".join(
            f'<tr><td class="l">{escape(str(k))}</td>'
            f"<td>{escape(_pct(v) if _is_acc(k) and isinstance(v, float) else _fmt(v, k))}</td></tr>"
            for k, v in scalars)
        parts.append(f"<table><tbody>{rows}</tbody></table>")
    per_class = data.get("per_class")
    if isinstance(per_class, list) and per_class and all(isinstance(r, Mapping) for r in per_class):
        cols = ["class", "precision", "recall", "f1", "support"]
        cols += [c for c in _columns(per_class) if c not in cols]
        parts.append(f"<details{' open' if len(per_class) <= 40 else ''}><summary>per-class metrics "
                     f"({len(per_class)} classes)</summary>{_table(per_class, cols)}</details>")
    cm = data.get("confusion_matrix")
    if isinstance(cm, list) and cm:
        parts.append(f"<p>confusion_matrix: {len(cm)}&times;{len(cm)} (drawn in the confusion figure)</p>")
    rest = {k: v for k, v in data.items() if isinstance(v, (dict, list)) and k not in ("per_class", "confusion_matrix")}
    if rest:
        parts.append(f"<pre>{escape(json.dumps(rest, indent=2, default=str))}</pre>")
    return "".join(parts)


def _known(stem: str) -> str | None:
    """The CAPTIONS key a figure's stem names: ``confusion`` for ``confusion.png`` and ``val_confusion.png``."""
    for key in CAPTIONS:
        if stem == key or stem.endswith("_" + key):
            return key
    return None


def _caption(png: Path) -> str:
    stem = png.stem
    key = _known(stem)
    if key is not None:
        prefix = stem[: -len(key)].strip("_").replace("_", " ")
        if not prefix and key in ("confusion", "per_class"):  # the run's own: test figures carry test_
            prefix = "validation"
        return (f"[{prefix}] " if prefix else "") + CAPTIONS[key]
    if stem.startswith("compare_"):
        return f"Comparison of runs: {stem[len('compare_'):].replace('_', ' ')}."
    return stem.replace("_", " ").capitalize() + "."


def _config_facts(text: str) -> str:
    """``model: resnet20 · dataset: cifar10``-style line from the config's top-level (or ``model.name``) keys."""
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError:
        return ""
    if not isinstance(cfg, Mapping):
        return ""
    facts = []
    for key in ("name", "model", "arch", "dataset", "data", "task", "epochs"):
        v = cfg.get(key)
        if key == "epochs" and cfg.get("time_budget"):  # the epochs were only a cap: the budget ended the run
            key, v = "time budget", f"{cfg['time_budget']:g} min"
        if isinstance(v, Mapping):
            v = v.get("name")
        if isinstance(v, (str, int, float)) and not isinstance(v, bool):
            facts.append(f"{key}: {v}")
    return " · ".join(facts)


def write_report(run_dir: Path) -> Path:
    """Write ``<run_dir>/report/index.html`` from what the run directory holds; return its path.

    Sections: the headline figures (best and final accuracy, time), every figure in ``report/`` (known ones
    first, in a fixed order, then the rest by name), the per-epoch metrics table (best val-accuracy epoch
    highlighted), ``eval.json``, skipped files and the resolved config. Missing pieces are noted, not fatal.
    All text from the run (class names, config values, file names) is HTML-escaped.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {str(run_dir)!r} does not exist")
    report_dir = run_dir / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    records = load_metrics(run_dir / "metrics.jsonl")
    cfg_path = run_dir / "config.yaml"
    cfg = cfg_path.read_text(encoding="utf-8", errors="replace") if cfg_path.is_file() else "(no config.yaml)"
    title = run_dir.resolve().name
    facts = _config_facts(cfg)

    sections = []
    headline, best_i = _headline(records)
    sections.append(f"<h2>Summary</h2>{headline}")
    evaluation = _read_json(run_dir / "eval.json")
    if isinstance(evaluation, Mapping) and evaluation.get("split") == "test":
        sections.append(_test_headline(evaluation))

    order = list(CAPTIONS)
    pngs = sorted(report_dir.glob("*.png"),
                  key=lambda p: (order.index(_known(p.stem)) if _known(p.stem) else len(order), p.name))
    if pngs:
        figs = "".join(
            f'<figure><img src="{escape(p.name, quote=True)}" alt="{escape(p.stem, quote=True)}" loading="lazy">'
            f"<figcaption>{escape(_caption(p))} <code>{escape(p.name)}</code></figcaption></figure>"
            for p in pngs)
        sections.append(f"<h2>Figures</h2>{figs}")

    if records:
        sections.append(f"<h2>Metrics per epoch</h2>{_table(records, _columns(records), best_i)}")

    tested = isinstance(evaluation, Mapping) and evaluation.get("split") == "test"
    for path, heading in ((run_dir / "eval.json", "Test set, best checkpoint" if tested else "Evaluation"),
                          (report_dir / "val_summary.json", "Validation set, best checkpoint")):
        if path.is_file():
            try:
                body = _eval_section(json.loads(path.read_text(encoding="utf-8")))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                body = f"<p>{escape(path.name)} could not be read: {escape(str(e))}</p>"
            sections.append(f"<h2>{escape(heading)} <small>({escape(path.name)})</small></h2>{body}")

    skipped_path = report_dir / "skipped.txt"
    if skipped_path.is_file():
        skipped = [s for s in skipped_path.read_text(encoding="utf-8", errors="replace").splitlines() if s.strip()]
        items = "".join(f"<li>{escape(s.replace(chr(9), ' — '))}</li>" for s in skipped)  # "path<TAB>reason"
        sections.append(f"<h2>Skipped files ({len(skipped)})</h2>"
                        f"<details{' open' if len(skipped) <= 20 else ''}><summary>show</summary>"
                        f"<ul>{items}</ul></details>")

    sections.append(f"<h2>Configuration</h2><pre>{escape(cfg)}</pre>")

    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)} · resnetlab report</title><style>{_CSS}</style></head><body>"
        f"<h1>{escape(title)}</h1><p class=\"sub\">{escape(facts + ' · ' if facts else '')}"
        f"resnetlab run report · {escape(str(run_dir))} · "
        f"written {escape(when)}</p>" + "".join(sections) + "</body></html>\n"
    )
    out = report_dir / "index.html"
    atomic_write(out, page)  # UTF-8
    return out
