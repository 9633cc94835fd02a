"""Load pretrained weights from local files into resnetlab models, adapting what can be adapted.

``model, report = model_from_pretrained("torchvision:resnet50", num_classes=10)`` builds the architecture the
weights describe and loads them; ``report = load_pretrained(model, "hf:microsoft/resnet-50")`` loads into a
model you built. Either way the :class:`LoadReport` says, key by key, what was loaded, reshaped, newly
initialised, ignored or mismatched. Nothing is ever downloaded: see :mod:`resnetlab.models.weights` for the
sources and the cache folders they are looked for in.

Adaptations (``adapt=True``):

* classifier of another shape (new ``num_classes``, or a truncated model whose features are narrower): the
  model keeps its freshly initialised head, reported as *newly initialised*;
* first conv with other input channels (RGB weights -> a 1-channel spectrogram or grayscale model): the
  filters are summed (1 channel) or cycled and rescaled (:func:`adapt_input_conv`), reported as *reshaped*;
* checkpoint tensors the model has no place for (stages or blocks a truncated model lacks): *ignored*.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from resnetlab.models.convert import ConvertedWeights, arch_from_name, infer_resnet_kwargs, match_arch, read_weights
from resnetlab.models.weights import resolve_source

Shape = tuple[int, ...]


def read_pretrained(source: str | os.PathLike, *, check_hash: bool = True) -> ConvertedWeights:
    """Find a source locally (:func:`~resnetlab.models.weights.resolve_source`) and convert it to resnetlab names.

    Use it to inspect weights before building a model, or to pass converter options: e.g.
    ``load_pretrained(model, convert_keras(path, rgb_input=False))`` instead of a source string.
    """
    path, entry = resolve_source(source, check_hash=check_hash)
    cw = read_weights(path, entry)
    cw.source = os.fspath(source)
    return cw


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did with every tensor.

    Attributes:
        loaded: model keys copied from the checkpoint unchanged.
        reshaped: ``(key, model shape, checkpoint shape)`` of tensors adapted to the model (the first conv's
            input channels).
        new: model keys left at their fresh initialisation: the classifier when its shape differs, and keys
            the checkpoint lacks.
        ignored: checkpoint keys the model has no place for (e.g. stages a truncated model lacks).
        mismatched: ``(key, model shape, checkpoint shape)`` of tensors whose shapes differ and could not
            be adapted; the model keeps its own values.
        classifier: the classifier's module name (``"fc"``); its keys in ``new`` are expected when
            fine-tuning for other classes and do not make the report not ``ok``.
        notes: other changes made to the model (BatchNorm eps, channel order).
    """

    source: str
    format: str
    loaded: list[str] = field(default_factory=list)
    reshaped: list[tuple[str, Shape, Shape]] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, Shape, Shape]] = field(default_factory=list)
    classifier: str = "fc"
    notes: list[str] = field(default_factory=list)

    def _is_head(self, key: str) -> bool:
        return bool(self.classifier) and (key == self.classifier or key.startswith(self.classifier + "."))

    @property
    def missing(self) -> list[str]:
        """Keys in ``new`` outside the classifier: body tensors the checkpoint did not provide."""
        return [k for k in self.new if not self._is_head(k)]

    @property
    def ok(self) -> bool:
        """True when every body tensor of the model came from the checkpoint (loaded or reshaped).

        A newly initialised classifier and ignored checkpoint tensors are allowed: they are what fine-tuning
        and truncated models ask for. ``strict=True`` is the stricter check.
        """
        return not self.mismatched and not self.missing

    def __str__(self) -> str:
        lines = [f"{self.source} ({self.format}): {len(self.loaded)} tensors loaded"
                 + ("" if self.ok else "  [NOT OK: see below]")]
        if self.reshaped:
            lines.append(f"  reshaped ({len(self.reshaped)}): "
                         + "; ".join(f"{k} {_fmt(c)} -> {_fmt(m)}" for k, m, c in self.reshaped))
        head = [k for k in self.new if self._is_head(k)]
        if head:
            lines.append(f"  newly initialised ({len(head)}): {_summarise(head)}")
        if self.missing:
            lines.append(f"  missing from the checkpoint, newly initialised ({len(self.missing)}): "
                         f"{_summarise(self.missing)}")
        if self.ignored:
            lines.append(f"  ignored, not in the model ({len(self.ignored)}): {_summarise(self.ignored)}")
        if self.mismatched:
            lines.append(f"  mismatched, not loaded ({len(self.mismatched)}): "
                         + "; ".join(f"{k} model {_fmt(m)} vs checkpoint {_fmt(c)}" for k, m, c in self.mismatched))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _fmt(shape: Shape) -> str:
    return "x".join(map(str, shape)) if shape else "scalar"


def _summarise(keys: list[str], limit: int = 8) -> str:
    """Up to ``limit`` keys in full; beyond that, grouped by top-level module (``layer4.* (150)``)."""
    if len(keys) <= limit:
        return ", ".join(keys)
    groups: dict[str, list[str]] = {}
    for k in keys:
        groups.setdefault(k.split(".")[0], []).append(k)
    return ", ".join(v[0] if len(v) == 1 else f"{g}.* ({len(v)})" for g, v in groups.items())


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Adapt first-conv filters ``(out, C_src, *k)`` to ``in_chans`` input channels.

    * ``in_chans == 1``: sum over the source channels. A gray image replicated to ``C_src`` channels then
      gives exactly the pretrained model's first activations (same for a spectrogram fed as gray).
    * otherwise: cycle the source channels to ``in_chans`` (R, G, B, R, ...) and scale by ``C_src / in_chans``,
      so that inputs whose channels look alike give activations of the pretrained magnitude.

    The same rule as timm's ``adapt_input_conv``, for any ``C_src``. Returns a new tensor of ``weight``'s dtype.
    """
    if weight.dim() < 3:
        raise ValueError(f"expected conv filters (out, in, *kernel), got shape {tuple(weight.shape)}")
    if in_chans < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}")
    src = weight.shape[1]
    if in_chans == src:
        return weight.clone()
    w = weight.float()
    if in_chans == 1:
        out = w.sum(dim=1, keepdim=True)
    else:
        reps = math.ceil(in_chans / src)
        out = w.repeat(1, reps, *([1] * (w.dim() - 2)))[:, :in_chans] * (src / in_chans)
    return out.to(weight.dtype)


def _classifier_name(model: nn.Module) -> str:
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else getattr(model, "fc", None)
    if head is None:
        return ""
    return next((name for name, m in model.named_modules() if m is head and name), "")


def _first_conv_key(model: nn.Module) -> str | None:
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return f"{name}.weight"
    return None


def _stride_in_1x1(model: nn.Module) -> bool | None:
    """Where the model's strided bottlenecks put their stride: True (first 1x1), False (3x3), None (no such block)."""
    from resnetlab.models.blocks import Bottleneck

    for m in model.modules():
        if isinstance(m, Bottleneck):
            if max(m.conv1.stride) > 1:
                return True
            if max(m.conv2.stride) > 1:
                return False
    return None


def _bn_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def load_pretrained(model: nn.Module, source: str | os.PathLike | ConvertedWeights, *, strict: bool = False,
                    adapt: bool = True) -> LoadReport:
    """Load weights from a local source into ``model``, checking every shape.

    Args:
        model: a resnetlab model (any ``nn.Module`` with resnetlab / torchvision parameter names works).
        source: a source string (``"torchvision:resnet50"``, ``"timm:resnet50.a1_in1k"``,
            ``"hf:microsoft/resnet-50"``, ``"keras:resnet50"``), a file or folder path, or weights already
            read with :func:`read_pretrained` / a converter.
        strict: raise unless every model tensor comes from the checkpoint (loaded or reshaped) and every
            checkpoint tensor is used. Nothing is changed in the model when it raises.
        adapt: keep a fresh classifier when the checkpoint's has another shape, and adapt the first conv to
            the model's input channels (:func:`adapt_input_conv`). ``False``: such tensors are reported as
            mismatched and left as they are.

    Returns:
        A :class:`LoadReport`; ``print(report)`` lists what differs, ``report.ok`` is True when the whole
        body of the model is pretrained.

    Raises:
        ValueError: ``strict`` and the checkpoint does not match (one line listing the keys and shapes), or
            the weights need the bottleneck stride elsewhere than the model has it (Keras' ResNet v1 weights
            in a v1.5 model: build it with ``stride_in_1x1=True``).
        FileNotFoundError: the source is not on this machine (the message says where to put it).
        UnsafeCheckpointError: a pickled checkpoint holds objects other than tensors; nothing of it was run.
    """
    cw = source if isinstance(source, ConvertedWeights) else read_pretrained(source)
    label = cw.source or str(cw.path)
    want = cw.required_kwargs.get("stride_in_1x1")
    have = _stride_in_1x1(model)
    if want is not None and have is not None and want != have:
        where = {True: "first 1x1 conv (ResNet v1)", False: "3x3 conv (ResNet v1.5)"}
        raise ValueError(f"{label}: these weights put the bottleneck stride on the {where[want]} but the model has "
                         f"it on the {where[have]}; build the model with stride_in_1x1={want} (model_from_pretrained "
                         "does this)")

    target = model.state_dict()
    src = cw.state_dict
    head = _classifier_name(model)
    first_conv = _first_conv_key(model)
    report = LoadReport(label, cw.format, classifier=head, notes=list(cw.notes))

    def is_head(key: str) -> bool:
        return bool(head) and key.startswith(head + ".")

    head_differs = any(is_head(k) and k in src and src[k].shape != t.shape for k, t in target.items())
    to_load: dict[str, torch.Tensor] = {}
    for key, t in target.items():
        if key not in src:
            if not key.endswith("num_batches_tracked"):  # absent from Keras files, irrelevant to inference
                report.new.append(key)
            continue
        s = src[key]
        if adapt and head_differs and is_head(key):  # the head is replaced whole, bias included
            report.new.append(key)
        elif s.shape == t.shape:
            to_load[key] = s
            report.loaded.append(key)
        elif (adapt and key == first_conv and s.dim() == t.dim() and s.shape[0] == t.shape[0]
              and s.shape[2:] == t.shape[2:]):
            to_load[key] = adapt_input_conv(s, t.shape[1])
            report.reshaped.append((key, tuple(t.shape), tuple(s.shape)))
        else:
            report.mismatched.append((key, tuple(t.shape), tuple(s.shape)))
    report.ignored = [k for k in src if k not in target]
    if head_differs and adapt:
        w = f"{head}.weight"
        if w in src and w in target:
            report.notes.append(f"classifier {head} kept newly initialised: model {_fmt(tuple(target[w].shape))}, "
                                f"checkpoint {_fmt(tuple(src[w].shape))}")
    if report.reshaped:
        key, (_, new_in, *_), (_, old_in, *_) = report.reshaped[0]
        how = "summed over input channels" if new_in == 1 else f"cycled to {new_in} channels, scaled {old_in}/{new_in}"
        report.notes.append(f"{key}: {old_in}-channel filters {how}")
    conv_biases = [k for k in report.ignored if k.endswith(".bias") and k[:-5] + ".weight" in target
                   and target[k[:-5] + ".weight"].dim() > 2]
    if conv_biases:
        report.notes.append(f"the checkpoint has conv biases the model lacks ({len(conv_biases)}): build it with "
                            "bias=True")

    if strict and (report.new or report.ignored or report.mismatched):
        raise ValueError(f"{label} does not match the model (strict=True): "
                         + "; ".join(_strict_problems(report, target, src)))

    if cw.bn_eps is not None:
        bns = [m for m in _bn_modules(model) if m.eps != cw.bn_eps]
        for m in bns:
            m.eps = cw.bn_eps
        if bns:
            report.notes.append(f"BatchNorm eps set to {cw.bn_eps:g} on {len(bns)} layers, as the weights were "
                                "trained (torch's default is 1e-05)")
    with torch.no_grad():
        result = model.load_state_dict(to_load, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    return report


def _strict_problems(report: LoadReport, target: dict[str, torch.Tensor], src: dict[str, torch.Tensor]) -> list[str]:
    problems = []
    shapes = [(k, tuple(target[k].shape), tuple(src[k].shape)) for k in report.new if k in src]
    shapes += report.mismatched
    if shapes:
        problems.append("shapes differ: " + ", ".join(f"{k} model {_fmt(m)} vs checkpoint {_fmt(c)}"
                                                     for k, m, c in shapes))
    absent = [k for k in report.new if k not in src]
    if absent:
        problems.append(f"missing from the checkpoint: {_summarise(absent)}")
    if report.ignored:
        problems.append(f"not in the model: {_summarise(report.ignored)}")
    return problems


def _architecture(cw: ConvertedWeights, arch: str | None) -> tuple[str, dict[str, Any]]:
    if arch is not None:
        found = arch_from_name(arch)
        if found is None:
            raise ValueError(f"unknown architecture {arch!r}; use a registered name (resnetlab.list_models()) or a "
                             "torchvision / timm ResNet name such as resnet101d or resnext101_32x8d")
        return found
    if cw.arch is not None:
        return cw.arch, dict(cw.arch_kwargs)
    try:
        return match_arch(infer_resnet_kwargs(cw.state_dict))
    except ValueError as e:
        raise ValueError(f"{cw.source or cw.path}: cannot tell the architecture ({e}); pass arch=") from None


def _pretrained_cfg(cw: ConvertedWeights, num_classes: int) -> dict[str, Any]:
    cfg: dict[str, Any] = cw.entry.pretrained_cfg() if cw.entry is not None else {}
    cfg.update({k: cw.meta[k] for k in ("mean", "std", "input_size", "resize_size", "crop_pct", "interpolation")
                if k in cw.meta})
    cfg.update(source=cw.source or str(cw.path), format=cw.format)
    classes = cw.meta.get("classes")
    if not classes and cw.entry is not None and cw.entry.dataset == "imagenet-1k" and cw.num_classes == 1000:
        from torchvision.models import ResNet50_Weights

        classes = list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
    if classes and len(classes) == num_classes:
        cfg["classes"] = list(classes)
    return cfg


def model_from_pretrained(source: str | os.PathLike | ConvertedWeights, *, arch: str | None = None,
                          num_classes: int | None = None, in_chans: int | None = None, strict: bool = False,
                          **overrides) -> tuple[nn.Module, LoadReport]:
    """Build the architecture the weights describe and load them: ``(model, report)``.

    The architecture comes from, in order: ``arch`` (a registered name, or a torchvision / timm ResNet name
    such as ``resnet101d``); the file's own description (resnetlab metadata, a transformers config.json,
    a timm config.json); the weights table; the tensors' shapes. Whatever ``arch`` says, arguments the
    weights need (Keras' ``stride_in_1x1=True, bias=True``) are added; ``overrides`` (any ``create_model``
    argument) come last.

    Args:
        num_classes: ``None`` keeps the checkpoint's classifier; another number gets a fresh classifier
            (reported as newly initialised); 0 builds a feature extractor.
        in_chans: ``None`` keeps the checkpoint's input channels; another number adapts the first conv
            (e.g. 1 for spectrograms).
        strict: as in :func:`load_pretrained`.

    The model gets a ``pretrained_cfg`` dict: source, mean/std, input and resize size, interpolation, class
    names (when known and the classifier is kept), license and URL.
    """
    from resnetlab.models.registry import create_model

    cw = source if isinstance(source, ConvertedWeights) else read_pretrained(source)
    name, kwargs = _architecture(cw, arch)
    kwargs = {**kwargs, **cw.required_kwargs, **overrides}
    n_classes = cw.num_classes if num_classes is None else num_classes
    model = create_model(name, num_classes=n_classes, in_chans=in_chans if in_chans is not None else cw.in_chans,
                         **kwargs)
    report = load_pretrained(model, cw, strict=strict)
    model.pretrained_cfg = _pretrained_cfg(cw, n_classes)
    return model, report


__all__ = ["ConvertedWeights", "LoadReport", "adapt_input_conv", "load_pretrained", "model_from_pretrained",
           "read_pretrained"]
