"""``Predictor``: a trained model loaded once for repeated inference, on the fastest backend this machine has.

It owns what ``predict`` and ``serve`` need beyond the model: decoding files and uploaded bytes into the cache
format, the eval-time preprocessing (:class:`~resnetlab.deploy.export.InferenceModel`), top-k labels, and
Grad-CAM for explanations (always on the fp32 eager model, which gradients need).

Backends (``backend=``), all fed the same decoded input (uint8 images, float waves):

- ``"eager"``: PyTorch fp32, channels-last for 2-D nets.
- ``"bf16"``: on a CPU, a bfloat16 copy of the network (weights and activations), channels-last; the audio
  front-end stays fp32. On CUDA, autocast (bf16, or fp16 where bf16 is missing). bf16 keeps 8 bits of
  mantissa: probabilities move (by a few 1e-2 on the tests' small nets, up to 0.4 on an untrained ResNet-50
  whose classes are near-ties), and so may a top-1 label that was a near-tie.
- ``"onnxruntime"``: the model exported to ONNX with its preprocessing (dynamic batch), cached by checkpoint
  hash under the resnetlab cache, run by onnxruntime's CPU provider. fp32: matches eager to ~1e-5.
- ``"auto"``: on CUDA ``bf16``; on a CPU ``onnxruntime`` when it is installed, else ``bf16`` where the CPU has
  native bf16 (AVX512-BF16 / AMX), else ``eager``. From ``benchmarks/bench_inference.py`` (BENCHMARKS.md,
  "Inference"), ResNet-50 at 224 on the project's 2-core AVX512-BF16 CPUs: onnxruntime is 1.6x (batch 1) and
  2.2x (batch 32) torchvision's eager fp32 with one thread, more with two, and keeps fp32 results. bf16 is as
  fast or faster at batch 32 but moves probabilities by up to several 0.1 on an untrained ResNet-50, and
  ``torch.compile`` (fastest at batch 32) compiles for minutes per batch shape, which a server that forms
  batches of every size cannot afford; neither is the default.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

from resnetlab.data.errors import DataError
from resnetlab.data.layout import AUDIO_EXTS, IMAGE_EXTS
from resnetlab.deploy.export import InferenceModel, inference_model
from resnetlab.training.inference import predict_files, top_k_labels

BACKENDS = ("auto", "eager", "bf16", "onnxruntime")

# Magic numbers of the formats an upload may be. What soundfile (libsndfile) and the image decoders read is
# accepted; the others get a message that says what to send instead.
_IMAGE_MAGIC = [(b"\x89PNG\r\n\x1a\n", ".png", "PNG"), (b"\xff\xd8\xff", ".jpg", "JPEG"), (b"BM", ".bmp", "BMP"),
                (b"GIF87a", ".gif", "GIF"), (b"GIF89a", ".gif", "GIF"), (b"II*\x00", ".tif", "TIFF"),
                (b"MM\x00*", ".tif", "TIFF")]
_AUDIO_MAGIC = [(b"fLaC", ".flac", "FLAC"), (b"OggS", ".ogg", "OGG")]
_UNSUPPORTED_AUDIO = [(b"\x1a\x45\xdf\xa3", "WebM/Matroska audio (what Chrome's MediaRecorder writes)")]
_MP3 = ".mp3" in AUDIO_EXTS  # libsndfile >= 1.1 reads MP3
# What an upload may be, for messages and the page (GET /info): the formats sniff() accepts.
UPLOAD_FORMATS = {"image": ["PNG", "JPEG", "WebP", "BMP", "GIF", "TIFF"],
                  "audio": ["WAV", "FLAC", "OGG (Vorbis / Opus)"] + (["MP3"] if _MP3 else [])}


def sniff(data: bytes) -> tuple[str, str, str]:
    """``(kind, suffix, format name)`` of file bytes from their magic number; kind is ``"image"``, ``"audio"``,
    ``"unsupported-audio"`` or ``"unknown"``."""
    head = data[:16]
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image", ".webp", "WebP"
    if head[:4] in (b"RIFF", b"RF64", b"BW64") and head[8:12] == b"WAVE":
        return "audio", ".wav", "WAV"
    for magic, suffix, name in _IMAGE_MAGIC:
        if head.startswith(magic):
            return "image", suffix, name
    for magic, suffix, name in _AUDIO_MAGIC:
        if head.startswith(magic):
            return "audio", suffix, name
    # MP3: an ID3 tag, or an MPEG audio layer III frame sync (11 set bits, then version, layer bits 01)
    if head[:3] == b"ID3" or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE6 == 0xE2):
        return ("audio", ".mp3", "MP3") if _MP3 else ("unsupported-audio", "", "MP3")
    if head[4:8] == b"ftyp":
        return "unsupported-audio", "", "MP4/M4A"
    for magic, name in _UNSUPPORTED_AUDIO:
        if head.startswith(magic):
            return "unsupported-audio", "", name
    return "unknown", "", "unknown"


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend ``"auto"`` stands for on ``device`` (see the module docstring); checks the others."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if device.type != "cpu":
        if backend == "onnxruntime":
            raise ValueError("--backend onnxruntime runs on the CPU only here; use --device cpu")
        return "bf16" if backend == "auto" else backend
    if backend != "auto":
        return backend
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401  (the exporter)

        return "onnxruntime"
    except ImportError:
        from resnetlab.training.precision import cpu_has_bf16

        return "bf16" if cpu_has_bf16() else "eager"


class Predictor:
    """A model with its preprocessing and decoding, for repeated inference.

    Build with :meth:`load` (a run directory or checkpoint) or directly from ``(model, pipeline, meta)`` as
    :func:`resnetlab.load_model` returns them. ``threads``: intra-op threads of the backend (default: torch's).
    Calls that run the model are serialised by a lock, so one Predictor may be shared between threads.
    """

    def __init__(self, model: torch.nn.Module, pipeline, meta: dict, *, backend: str = "auto",
                 threads: int | None = None, log=None):
        from resnetlab.data.prepare import decoder_for

        self.meta = meta
        self.classes: list[str] = list(meta["classes"])
        self.pipeline_cfg: dict = meta["pipeline"]
        self.modality: str = self.pipeline_cfg["modality"]
        self.model = model.eval()
        self.pipeline = pipeline
        self.device = next(model.parameters()).device
        self.backend = resolve_backend(backend, self.device)
        self.threads = threads
        self.decode_file, self.sample_shape, self.sample_dtype = decoder_for(self.pipeline_cfg)
        self._lock = threading.Lock()
        self._log = log or (lambda msg: None)
        self.onnx_path: Path | None = None  # the exported file the onnxruntime backend runs
        self._runner = self._build_runner()

    @classmethod
    def load(cls, run_or_checkpoint: str | os.PathLike, *, backend: str = "auto", device: str = "auto",
             which: str = "best", threads: int | None = None, log=None) -> Predictor:
        from resnetlab.training.run_dir import load_model

        model, pipeline, meta = load_model(run_or_checkpoint, device=device, which=which)
        return cls(model, pipeline, meta, backend=backend, threads=threads, log=log)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def info(self) -> dict:
        """What a client needs to know: modality, classes, input size, backend (``GET /info`` of the server)."""
        pc = self.pipeline_cfg
        out = {"arch": self.meta.get("arch"), "modality": self.modality, "classes": self.classes,
               "backend": self.backend, "device": str(self.device), "formats": UPLOAD_FORMATS[self.modality],
               "extensions": sorted(IMAGE_EXTS if self.modality == "image" else AUDIO_EXTS)}
        if self.modality == "image":
            out.update(image_size=list(pc["size"]), channels=pc["channels"])
        else:
            out.update(sample_rate=pc["sample_rate"], num_samples=pc["num_samples"],
                       duration_s=pc["num_samples"] / pc["sample_rate"])
        return out

    # --- backends --------------------------------------------------------------------------------------

    def _build_runner(self):
        module = inference_model(self.model, self.pipeline).to(self.device)
        channels_last = getattr(self.model, "ndim", 2) == 2
        if self.backend == "onnxruntime":
            return self._onnx_runner(module)
        if self.backend == "bf16":
            if self.device.type == "cpu":
                net = copy.deepcopy(self.model).to(torch.bfloat16)
                if channels_last:
                    net = net.to(memory_format=torch.channels_last)
                return _TorchRunner(module, net, torch.bfloat16, channels_last, None)
            from resnetlab.training.precision import pick_precision

            # channels-last weights for the channels-last input (else cuDNN converts them at every convolution)
            net = copy.deepcopy(self.model).to(memory_format=torch.channels_last) if channels_last else self.model
            return _TorchRunner(module, net, None, channels_last, pick_precision(self.device, "auto"))
        net = self.model
        if channels_last and self.device.type == "cpu":
            net = copy.deepcopy(self.model).to(memory_format=torch.channels_last)
        return _TorchRunner(module, net, None, channels_last and self.device.type == "cpu", None)

    def _onnx_runner(self, module: InferenceModel):
        from resnetlab.data.cache import default_cache_root
        from resnetlab.deploy.export import DEFAULT_OPSET, ExportedModel, _export_onnx, example_input, export_metadata

        key = self._export_key()
        path = default_cache_root() / "exports" / f"{self.meta.get('arch', 'model')}-{key}-op{DEFAULT_OPSET}.onnx"
        if not path.is_file():
            self._log(f"exporting the model to ONNX for onnxruntime (once; cached in {path})")
            path.parent.mkdir(parents=True, exist_ok=True)
            info = export_metadata(self.meta, fmt="onnx", dynamic_batch=True, batch=1, opset=DEFAULT_OPSET)
            _export_onnx(module.cpu(), example_input(self.pipeline_cfg, 2), path, info, True, DEFAULT_OPSET)
        self.onnx_path = path
        exported = ExportedModel(path, threads=self.threads)
        return lambda x: torch.from_numpy(exported(x.numpy()))

    def _export_key(self) -> str:
        """Names the cached ONNX file: the checkpoint's tensor hash (stable when the same weights are saved
        again), the pipeline, the classes and torch's version (the exporter's)."""
        h = hashlib.sha256()
        digest = None
        ckpt = self.meta.get("checkpoint")
        if ckpt and Path(ckpt).is_file():
            try:
                from safetensors import safe_open

                with safe_open(str(ckpt), framework="pt") as f:
                    digest = (f.metadata() or {}).get("sha256")
            except Exception:  # noqa: BLE001 - not a safetensors file: hash the weights below
                digest = None
        if digest:
            h.update(digest.encode())
        else:  # a model built in memory
            for k, v in self.model.state_dict().items():
                h.update(k.encode() + v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        h.update(json.dumps([self.pipeline_cfg, self.classes, str(torch.__version__)], sort_keys=True,
                            default=str).encode())
        return h.hexdigest()[:20]

    # --- inference -------------------------------------------------------------------------------------

    def to_input(self, arrays) -> torch.Tensor:
        """Decoded samples (one array or a sequence or a stacked batch, in the cache format: uint8
        ``(C, H, W)`` / int16 ``(T,)``) -> the input batch of the inference graph (uint8 images, float waves)."""
        if isinstance(arrays, torch.Tensor):
            x = arrays
        else:
            arr = np.asarray(arrays) if not isinstance(arrays, (list, tuple)) else np.stack(arrays)
            x = torch.from_numpy(np.ascontiguousarray(arr))
        if x.dim() == len(self.sample_shape):
            x = x[None]
        if tuple(x.shape[1:]) != tuple(self.sample_shape):
            raise ValueError(f"expected samples of shape {tuple(self.sample_shape)}, got {tuple(x.shape[1:])}")
        if self.modality == "audio":
            from resnetlab.data.audio import INT16_SCALE

            x = x.float() / INT16_SCALE if x.dtype == torch.int16 else x.float()
        return x

    def logits(self, arrays) -> torch.Tensor:
        """float32 logits ``(N, num_classes)`` on the CPU, for decoded samples (see :meth:`to_input`)."""
        x = self.to_input(arrays)
        with self._lock:
            return self._runner(x).float().cpu()

    def probabilities(self, arrays) -> torch.Tensor:
        return self.logits(arrays).softmax(1)

    def top_k(self, probs: torch.Tensor, k: int = 5) -> list[list[dict]]:
        """``[[{"label", "prob"}, ...] per row]`` for probabilities ``(N, num_classes)``."""
        return top_k_labels(probs, self.classes, k)

    def predict_files(self, inputs, *, top_k: int = 5, batch_size: int = 64, workers: int = 4) -> list[dict]:
        """``resnetlab.api.predict``'s result for files or folders: ``{"file", "top_k"}`` per readable file,
        ``{"file", "error"}`` per unreadable one (:func:`resnetlab.training.inference.predict_files`, this
        predictor's backend computing the logits). Files are decoded by ``workers`` threads."""
        from resnetlab.data.layout import list_input_files

        files = list_input_files([inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs),
                                 keep_unknown=True)
        return predict_files(files, self.decode_file, self.logits, self.classes, top_k=top_k,
                             batch_size=batch_size, workers=workers)

    # --- uploads ---------------------------------------------------------------------------------------

    def decode_upload(self, data: bytes, name: str = "upload", *, max_pixels: int | None = None,
                      max_seconds: float | None = None) -> np.ndarray:
        """Uploaded file bytes -> one decoded sample (cache format). Raises ``DataError`` with a message for the
        client that names ``name`` and the problem (empty, wrong kind for this model, unsupported, corrupt).

        ``max_pixels`` / ``max_seconds``: a server's tighter limits than the data layer's, checked from the
        file's header before decoding (an audio stream that declares no length is bounded by the data layer's
        ``MAX_AUDIO_VALUES`` only)."""
        if not data:
            raise DataError(f"{name}: empty file (0 bytes)")
        kind, suffix, fmt = sniff(data)
        if kind == "unsupported-audio":
            raise DataError(f"{name}: {fmt} cannot be decoded here; send {', '.join(UPLOAD_FORMATS['audio'])}")
        if kind == "unknown":
            what = "an image" if self.modality == "image" else "an audio file"
            raise DataError(f"{name}: not a recognised file type; this model takes {what} "
                            f"({', '.join(UPLOAD_FORMATS[self.modality])})")
        if kind != self.modality:
            raise DataError(f"{name}: this model classifies {self.modality}, but the upload is {fmt} {kind}")
        fd, tmp = tempfile.mkstemp(suffix=suffix, prefix="resnetlab-upload-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            _check_header_limits(tmp, name, kind, max_pixels, max_seconds)
            return self.decode_file(tmp)
        except DataError as e:
            raise DataError(str(e).replace(tmp, name)) from None
        finally:
            os.unlink(tmp)

    # --- explanations ----------------------------------------------------------------------------------

    def explain(self, sample: np.ndarray, target: int | None = None):
        """Grad-CAM and saliency (:class:`~resnetlab.explain.gradcam.Explanation`) of one decoded sample, on
        the fp32 eager model."""
        from resnetlab.explain.gradcam import explain_raw

        x = torch.from_numpy(np.ascontiguousarray(sample))[None]
        with self._lock:
            return explain_raw(self.model, self.pipeline, x, None if target is None else torch.tensor([target]))

    def heatmap_png(self, sample: np.ndarray, explanation=None) -> bytes:
        """The Grad-CAM picture of one decoded sample as PNG bytes (image overlay, or spectrogram + saliency)."""
        from resnetlab.explain.gradcam import heatmap_image, png_bytes

        exp = explanation if explanation is not None else self.explain(sample)
        return png_bytes(heatmap_image(sample, exp, 0, self.modality))


def _check_header_limits(path: str, name: str, kind: str, max_pixels: int | None, max_seconds: float | None) -> None:
    """Refuses an image of more than ``max_pixels`` or a clip declaring more than ``max_seconds``, from the header."""
    if kind == "image" and max_pixels is not None:
        from resnetlab.data.images import read_header

        h = read_header(path)
        if h.width * h.height > max_pixels:
            raise DataError(f"{name}: image too large ({h.width}x{h.height} = {h.width * h.height:,} pixels; this "
                            f"server takes at most {max_pixels:,})")
    elif kind == "audio" and max_seconds is not None:
        import soundfile as sf

        try:
            with sf.SoundFile(path) as f:
                frames, rate = f.frames, f.samplerate
        except Exception:  # noqa: BLE001 - unreadable: the decoder says why, in its words
            return
        if rate > 0 and 0 < frames < 2**62 and frames / rate > max_seconds:
            raise DataError(f"{name}: clip too long ({frames / rate:,.1f} s declared; this server takes at most "
                            f"{max_seconds:g} s)")


class _TorchRunner:
    """Preprocess in fp32 (the audio front-end needs it), then the network in its dtype and memory format."""

    def __init__(self, module: InferenceModel, net: torch.nn.Module, dtype, channels_last: bool, precision):
        self.module, self.net, self.dtype = module, net, dtype
        self.channels_last, self.precision = channels_last, precision
        self.device = next(net.parameters()).device

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            inp = self.module.preprocess(x.to(self.device))
            if self.dtype is not None:
                inp = inp.to(self.dtype)
            if self.channels_last and inp.dim() == 4:
                inp = inp.contiguous(memory_format=torch.channels_last)
            if self.precision is not None:
                with self.precision.autocast():
                    return self.net(inp)
            return self.net(inp)
