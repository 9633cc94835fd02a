"""The model table of ``resnetlab models``: sizes measured once per version and registry, then cached."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from resnetlab.fileio import atomic_write
from resnetlab.models.info import count_macs
from resnetlab.models.registry import create_model, get_spec, list_models


def _cache_file() -> Path:
    from resnetlab import __version__

    names = ",".join(f"{n}:{get_spec(n).config}" for n in list_models())
    digest = hashlib.sha256(f"{__version__}|{names}".encode()).hexdigest()[:16]
    root = Path(os.environ.get("RESNETLAB_CACHE", Path.home() / ".cache" / "resnetlab"))
    return root / f"model_table-{digest}.json"


def _measure(name: str) -> dict:
    spec = get_spec(name)
    with torch.device("meta"):  # shapes only: no memory, no arithmetic
        model = create_model(name, num_classes=spec.num_classes)
        macs = count_macs(model, model.default_input_size)
    return {"name": name, "params": sum(p.numel() for p in model.parameters()), "macs": macs,
            "input_size": list(model.default_input_size), "num_classes": spec.num_classes,
            "modality": spec.modality, "description": spec.description, "paper": spec.paper}


def model_table(pattern: str | None = None) -> list[dict]:
    """One row per registered model (matching ``pattern``): name, params, MACs, input size, description, paper."""
    path = _cache_file()
    rows: dict[str, dict] = {}
    try:
        rows = {r["name"]: r for r in json.loads(path.read_text())}
    except (OSError, ValueError, KeyError, TypeError):
        rows = {}
    names = list_models(pattern)
    missing = [n for n in names if n not in rows]
    for n in missing:
        rows[n] = _measure(n)
    if missing:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, json.dumps(list(rows.values())))
        except OSError:
            pass  # a read-only home still gets the table, just not cached
    return [rows[n] for n in names]
