"""Export a trained model, with its eval-time preprocessing, to ONNX, TorchScript or torch.export.

The exported graph is :class:`InferenceModel`: what ``predict`` runs after decoding a file, in one module.

- Images: input ``uint8 (N, C, H, W)``, the decoded image already scaled to cover ``H x W`` and
  center-cropped (what :func:`resnetlab.data.images.decode_image` returns); inside the graph ``x / 255``, then
  ``(x - mean) / std``, then the network. Resizing stays outside: it depends on each file's own size.
- Audio: input ``float32 (N, num_samples)`` waves in [-1, 1) at the model's sample rate (int16 / 32768; what
  soundfile, librosa and the Web Audio API give); inside the graph the log-mel or MFCC front-end (STFT, mel
  filterbank, log, DCT), the normalisation and the layout, then the network. Mono mixdown, resampling and
  cutting or padding to ``num_samples`` stay outside.

The output is ``logits (N, num_classes)``: softmax gives the probabilities ``predict`` reports. Everything an
inference program needs is embedded as JSON (:func:`export_metadata`): class names, mean/std, input size and
dtype, and for audio the sample rate, clip length and feature settings. ONNX keeps it in the model's
``metadata_props`` (key ``resnetlab``, plus a few flat keys), TorchScript in ``_extra_files["resnetlab.json"]``,
torch.export in the ``.pt2`` archive's ``extra_files["resnetlab.json"]``; :func:`read_export_metadata` reads
any of the three.

ONNX export uses torch's dynamo-based exporter (``torch.onnx.export(..., dynamo=True)``; needs the ``onnx`` and
``onnxscript`` packages): it translates ``torch.stft`` into ONNX's STFT operator (opset >= 17), which the
TorchScript-based exporter cannot. TorchScript uses ``torch.jit.trace``, which torch now marks deprecated; it
still loads in C++ (libtorch) without Python.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from resnetlab.fileio import atomic_write
from resnetlab.models.convert import check_safe_unpickling
from resnetlab.training.inference import forward_logits
from resnetlab.training.precision import Precision

FORMATS = ("onnx", "torchscript", "torch-export")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "torch-export": ".pt2"}
EXPORT_FORMAT = "resnetlab-export/1"
META_FILE = "resnetlab.json"  # the name of the embedded JSON in TorchScript and .pt2 archives
DEFAULT_OPSET = 18
MIN_OPSET = 17  # ONNX's STFT operator, which the audio front-end needs
MAX_BATCH = 4096  # the upper bound of the dynamic batch axis


class InferenceModel(nn.Module):
    """A network with its eval-time preprocessing in front: decoded input in, logits out.

    ``modality="image"``: ``uint8 (N, C, H, W)`` in. ``modality="audio"``: ``float32 (N, num_samples)`` waves in
    [-1, 1). Built by :func:`inference_model` from a model and its pipeline; exportable as is.
    """

    def __init__(self, model: nn.Module, pipeline):
        super().__init__()
        self.model = model
        self.modality = pipeline.modality
        self.transform = pipeline.eval_transform()  # the pipeline's own eval-time code, not a copy of it

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Decoded input -> the network's float input: ``pipeline.eval_transform()``, which computes what
        ``Pipeline(x, None, train=False)`` does."""
        return self.transform(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.preprocess(x))


def inference_model(model: nn.Module, pipeline) -> InferenceModel:
    """Wrap ``model`` (eval mode, fp32, on the CPU for export) with ``pipeline``'s eval-time preprocessing."""
    return InferenceModel(model, pipeline).eval()


def input_spec(pipeline_cfg: dict) -> dict:
    """What the exported graph takes: dtype, shape without the batch axis, value range."""
    if pipeline_cfg["modality"] == "image":
        return {"dtype": "uint8", "shape": [pipeline_cfg["channels"], *pipeline_cfg["size"]], "layout": "NCHW",
                "range": [0, 255]}
    return {"dtype": "float32", "shape": [pipeline_cfg["num_samples"]], "layout": "NT (mono waves)",
            "range": [-1.0, 1.0]}


def example_input(pipeline_cfg: dict, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """A seeded random input of the exported graph's dtype and shape (images: noise; audio: noise at -20 dBFS
    over a tone, so no mel band is empty)."""
    g = torch.Generator().manual_seed(seed)
    spec = input_spec(pipeline_cfg)
    if spec["dtype"] == "uint8":
        return torch.randint(0, 256, (batch, *spec["shape"]), generator=g, dtype=torch.uint8)
    n, sr = pipeline_cfg["num_samples"], pipeline_cfg["sample_rate"]
    t = torch.arange(n, dtype=torch.float32) / sr
    tone = 0.3 * torch.sin(2 * torch.pi * 440.0 * t)
    return (tone + 0.1 * torch.randn(batch, n, generator=g)).clamp(-1, 1)


def export_metadata(meta: dict, *, fmt: str, dynamic_batch: bool, batch: int, opset: int | None = None) -> dict:
    """The JSON embedded in every export: everything inference needs beside the graph."""
    pc = meta["pipeline"]
    spec = input_spec(pc)
    info = {
        "format": EXPORT_FORMAT, "export_format": fmt, "arch": meta["arch"], "modality": pc["modality"],
        "classes": list(meta["classes"]), "num_classes": int(meta["num_classes"]),
        "input": {"name": "input", **spec, "shape": ["batch" if dynamic_batch else batch, *spec["shape"]]},
        "output": {"name": "logits", "dtype": "float32", "shape": ["batch" if dynamic_batch else batch,
                                                                   int(meta["num_classes"])],
                   "note": "softmax over axis 1 gives class probabilities"},
        "dynamic_batch": bool(dynamic_batch),
    }
    if pc["modality"] == "image":
        info.update(mean=pc["mean"], std=pc["std"], image_size=list(pc["size"]), channels=pc["channels"],
                    preprocessing={"in_graph": "x / 255, then (x - mean) / std per channel",
                                   "before": "decode; apply EXIF orientation; composite alpha onto white; convert to "
                                             f"{pc['channels']} channel(s) (gray: BT.601 luma); scale to cover "
                                             f"{pc['size'][0]}x{pc['size'][1]} (antialiased bilinear) and "
                                             "center-crop"})
    else:
        keys = ("features", "n_mels", "n_mfcc", "n_fft", "win_length", "hop_length", "f_min", "f_max", "layout",
                "normalize", "mean", "std")
        dct = ", DCT-II" if pc["features"] == "mfcc" else ""
        info.update(sample_rate=pc["sample_rate"], num_samples=pc["num_samples"],
                    duration_s=pc["num_samples"] / pc["sample_rate"], feature_settings={k: pc[k] for k in keys},
                    preprocessing={"in_graph": f"{pc['features']} features (Hann-windowed STFT, Slaney mel "
                                               f"filterbank, natural log{dct}), {pc['normalize']} normalisation, "
                                               f"{pc['layout']} layout",
                                   "before": f"mix down to mono; resample to {pc['sample_rate']} Hz; keep the "
                                             f"middle {pc['num_samples']} samples or zero-pad both sides to them; "
                                             "scale int16 by 1/32768"})
    if opset is not None:
        info["opset"] = opset
    info.update(pipeline=pc, checkpoint=meta.get("checkpoint"), code_version=meta.get("code_version"),
                torch=str(torch.__version__))
    return info


@dataclass
class ExportResult:
    path: Path
    metadata: dict
    max_abs_diff: float | None  # exported vs eager PyTorch on a random input; None when not checked
    check: str  # what the check ran on, or why it was skipped


def default_export_path(checkpoint: Path, fmt: str) -> Path:
    """``RUN_DIR/export/<checkpoint stem><suffix>`` for a run's checkpoint; beside a loose checkpoint file."""
    folder = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    return folder / "export" / (checkpoint.name.replace(".safetensors", "") + SUFFIXES[fmt])


def export_model(run_or_checkpoint: str | os.PathLike, fmt: str = "onnx", out: str | os.PathLike | None = None, *,
                 dynamic_batch: bool = False, opset: int = DEFAULT_OPSET, which: str = "best",
                 check: bool = True) -> ExportResult:
    """Export a run's model (its ``which`` checkpoint) with its preprocessing; see the module docstring.

    Args:
        fmt: ``"onnx"``, ``"torchscript"`` or ``"torch-export"``.
        out: the file to write (default :func:`default_export_path`).
        dynamic_batch: a free batch axis (1 to 4096); else the batch is fixed at 1.
        opset: ONNX opset (>= 17, the STFT operator's; ignored by the other formats).
        check: run the exported file on a random input and compare with eager PyTorch (needs ``onnxruntime``
            for ONNX; skipped with a note when it is missing).
    """
    from resnetlab.training.run_dir import load_model

    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; allowed: {', '.join(FORMATS)}")
    if fmt == "onnx" and (not isinstance(opset, int) or opset < MIN_OPSET):
        raise ValueError(f"--opset must be an integer >= {MIN_OPSET} (ONNX's STFT operator), got {opset!r}")
    model, pipeline, meta = load_model(run_or_checkpoint, device="cpu", which=which)
    module = inference_model(model, pipeline)
    batch = 2 if dynamic_batch else 1  # an example batch of 1 would make torch.export specialise the axis to 1
    x = example_input(meta["pipeline"], batch)
    info = export_metadata(meta, fmt=fmt, dynamic_batch=dynamic_batch, batch=1,
                           opset=opset if fmt == "onnx" else None)
    path = Path(out) if out else default_export_path(Path(meta["checkpoint"]), fmt)
    if export_format_of(path) != fmt:  # loaders tell the format by the name
        raise ValueError(f"--out {path}: a {fmt} file needs a name ending in {SUFFIXES[fmt]}"
                         + (" (any ending but .onnx and .pt2)" if fmt == "torchscript" else ""))
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "onnx":
        _export_onnx(module, x, path, info, dynamic_batch, opset)
    elif fmt == "torchscript":
        _export_torchscript(module, x, path, info)
    else:
        _export_program(module, x, path, info, dynamic_batch)
    diff, note = None, "not checked"
    if check:
        diff, note = check_export(path, model, pipeline, meta["pipeline"], dynamic_batch)
    return ExportResult(path, info, diff, note)


def _dynamic_shapes(dynamic_batch: bool):
    return ({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},) if dynamic_batch else None


def _export_onnx(module: nn.Module, x: torch.Tensor, path: Path, info: dict, dynamic_batch: bool,
                 opset: int) -> None:
    _require("onnx", "export to ONNX")
    _require("onnxscript", "export to ONNX (torch's dynamo-based ONNX exporter)")
    import onnx

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and version chatter
        program = torch.onnx.export(module, (x,), dynamo=True, input_names=["input"], output_names=["logits"],
                                    dynamic_shapes=_dynamic_shapes(dynamic_batch), opset_version=opset,
                                    verbose=False)
    proto = program.model_proto
    flat = {"resnetlab": info, "classes": info["classes"], "modality": info["modality"], "input": info["input"]}
    for key in ("mean", "std", "image_size", "sample_rate", "num_samples", "feature_settings"):
        if key in info:
            flat[key] = info[key]
    del proto.metadata_props[:]
    for key, value in flat.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    proto.producer_name = "resnetlab"
    atomic_write(path, lambda tmp: onnx.save(proto, str(tmp)))


def _export_torchscript(module: nn.Module, x: torch.Tensor, path: Path, info: dict) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit.*deprecated")
        traced = torch.jit.trace(module, (x,), check_trace=False)
        atomic_write(path, lambda tmp: torch.jit.save(traced, str(tmp), _extra_files={META_FILE: json.dumps(info)}))


def _export_program(module: nn.Module, x: torch.Tensor, path: Path, info: dict, dynamic_batch: bool) -> None:
    with torch.no_grad():
        program = torch.export.export(module, (x,), dynamic_shapes=_dynamic_shapes(dynamic_batch))
    with warnings.catch_warnings():  # about constants that share storage (the audio front-end's); harmless on CPU
        warnings.filterwarnings("ignore", message="No complete tensor found")
        atomic_write(path, lambda tmp: torch.export.save(program, str(tmp), extra_files={META_FILE: json.dumps(info)}),
                     keep_suffix=True)  # torch.export.save checks the suffix


def _require(module: str, purpose: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{module} is needed to {purpose}: pip install 'resnetlab[export]' "
                          f"(or pip install {module})") from None


def export_format_of(path: str | os.PathLike) -> str:
    """The export format of a file, from its name: ``.onnx``, ``.pt2``, else TorchScript."""
    name = os.fspath(path).lower()
    return "onnx" if name.endswith(".onnx") else "torch-export" if name.endswith(".pt2") else "torchscript"


def read_export_metadata(path: str | os.PathLike) -> dict:
    """The JSON that :func:`export_model` embedded in an ONNX, TorchScript or ``.pt2`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such exported model: {path}")
    fmt = export_format_of(path)
    if fmt == "onnx":
        try:
            import onnx

            props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        except ImportError:  # a runtime-only install: onnxruntime reads the same table
            ort = _require("onnxruntime", "read ONNX metadata")
            props = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta() \
                .custom_metadata_map
        if "resnetlab" not in props:
            raise ValueError(f"{path} has no resnetlab metadata (not exported by resnetlab export)")
        return json.loads(props["resnetlab"])
    import zipfile

    try:  # TorchScript and .pt2 files are zip archives; the extra files sit in <archive name>/extra/
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith(f"/extra/{META_FILE}")]
            if not names:
                raise ValueError(f"{path} has no embedded {META_FILE} (not exported by resnetlab export)")
            return json.loads(z.read(names[0]))
    except zipfile.BadZipFile:
        raise ValueError(f"{path} is not a TorchScript or torch.export archive") from None


class ExportedModel:
    """An exported file, loaded for inference: ``logits = exported(x)`` with ``x`` a numpy array or tensor of
    the input dtype and shape in :attr:`metadata` (``["input"]``); returns float32 numpy logits."""

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None):
        self.path = Path(path)
        self.format = export_format_of(self.path)
        if self.format == "onnx":
            ort = _require("onnxruntime", "run ONNX models")
            opts = ort.SessionOptions()
            if threads:
                opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
            self.input_name = self.session.get_inputs()[0].name
            props = self.session.get_modelmeta().custom_metadata_map
            if "resnetlab" not in props:
                raise ValueError(f"{path} has no resnetlab metadata (not exported by resnetlab export)")
            self.metadata = json.loads(props["resnetlab"])
        else:
            self.metadata = read_export_metadata(self.path)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit.*deprecated")
                warnings.filterwarnings("ignore", message="No complete tensor found")  # non-persistent buffers
                if self.format == "torchscript":
                    self.module = torch.jit.load(str(self.path), map_location="cpu")
                else:
                    check_safe_unpickling(self.path)  # a .pt2 archive holds pickles
                    self.module = torch.export.load(str(self.path)).module()

    def __call__(self, x) -> np.ndarray:
        if self.format == "onnx":
            arr = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
            return self.session.run(None, {self.input_name: arr})[0]
        t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
        with torch.no_grad():
            return self.module(t).float().numpy()


def check_export(path: Path, model: nn.Module, pipeline, pipeline_cfg: dict, dynamic_batch: bool
                 ) -> tuple[float | None, str]:
    """Max absolute logit difference between the exported file and eager PyTorch fp32 on a fresh random input
    (batch 3 when the batch axis is dynamic, else 1). The reference is what ``predict`` and ``evaluate`` compute
    (:func:`resnetlab.training.inference.forward_logits`: the pipeline itself, then the model), so the check
    covers the exported preprocessing too."""

    if export_format_of(path) == "onnx":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return None, "not checked: onnxruntime is not installed (pip install 'resnetlab[export]')"
    batch = 3 if dynamic_batch else 1
    x = example_input(pipeline_cfg, batch, seed=1)
    ref = forward_logits(model, pipeline, x, Precision(torch.device("cpu"), None, False)).numpy()
    got = ExportedModel(path)(x)
    if got.shape != ref.shape:
        raise RuntimeError(f"exported model returned shape {got.shape}, eager PyTorch {ref.shape}")
    return float(np.abs(got - ref).max()), f"batch {batch}, random input"
