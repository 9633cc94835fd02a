"""Export with preprocessing (ONNX, TorchScript, torch.export) and the Predictor's backends.

Parity is checked against resnetlab's own predict path in eager float32 PyTorch: a real file, decoded as
``predict`` decodes it, through the pipeline and the model; the exported graph gets the same decoded input.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from deploy_helpers import make_run, write_image, write_wave
from resnetlab.api import load_model
from resnetlab.cli import main
from resnetlab.data.audio import INT16_SCALE
from resnetlab.data.prepare import decoder_for
from resnetlab.deploy.export import SUFFIXES, ExportedModel, export_model, inference_model, read_export_metadata
from resnetlab.deploy.predictor import Predictor, resolve_backend, sniff

TOL = 1e-4

CASES = {
    "image-resnet20": dict(arch="resnet20"),
    "image-gray-preact": dict(arch="preact_resnet20", channels=1),
    "audio-res8-logmel": dict(arch="res8", modality="audio"),
    "audio-tc_resnet8-mfcc-1d": dict(arch="tc_resnet8", modality="audio", layout="1d", features="mfcc",
                                     normalize="global"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-runs")
    return {name: make_run(root / name, **kw) for name, kw in CASES.items()}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-inputs")
    return {"image": [write_image(root / f"i{k}.png", 24 + 4 * k, seed=k) for k in range(3)],
            "audio": [write_wave(root / f"a{k}.wav", seconds=0.3 + 0.2 * k, freq=300 + 400 * k, seed=k)
                      for k in range(3)]}


def reference(run, files):
    """Eager fp32 logits of resnetlab's predict path, and the exported graph's input for the same files."""
    model, pipeline, meta = load_model(run, device="cpu")
    decode = decoder_for(meta["pipeline"])[0]
    raw = torch.from_numpy(np.stack([decode(f) for f in files]))
    with torch.no_grad():
        logits = model(pipeline(raw, None, train=False)[0]).numpy()
    graph_input = raw if raw.dtype == torch.uint8 else raw.float() / INT16_SCALE
    return logits, graph_input, meta


def _reference_samples(run, files):
    """``reference``'s logits and the decoded samples, as a ``Predictor`` takes them."""
    ref, _, meta = reference(run, files)
    decode = decoder_for(meta["pipeline"])[0]
    return ref, [decode(f) for f in files]


def _modality(name: str) -> str:
    return name.split("-")[0]


def _check_parity(run, fmt, files, tmp_path, dynamic_batch):
    ref, x, meta = reference(run, files if dynamic_batch else files[:1])
    res = export_model(run, fmt, tmp_path / f"model{SUFFIXES[fmt]}", dynamic_batch=dynamic_batch)
    assert res.max_abs_diff is not None and res.max_abs_diff < TOL, res
    got = ExportedModel(res.path)(x.numpy())
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)
    md = read_export_metadata(res.path)
    assert md["classes"] == meta["classes"] and md["arch"] == meta["arch"]
    assert md["dynamic_batch"] is dynamic_batch
    if md["modality"] == "image":
        assert md["mean"] == meta["pipeline"]["mean"] and md["image_size"] == meta["pipeline"]["size"]
        assert md["input"]["dtype"] == "uint8"
    else:
        assert md["sample_rate"] == meta["pipeline"]["sample_rate"]
        assert md["num_samples"] == meta["pipeline"]["num_samples"]
        assert md["feature_settings"]["features"] == meta["pipeline"]["features"]
        assert md["input"]["dtype"] == "float32"
    return res


def test_inference_model_matches_pipeline(runs, inputs):
    """The module that gets exported computes exactly what the pipeline + model compute."""
    for name, run in runs.items():
        ref, x, _ = reference(run, inputs[_modality(name)])
        model, pipeline, _ = load_model(run, device="cpu")
        with torch.no_grad():
            got = inference_model(model, pipeline)(x).numpy()
        np.testing.assert_allclose(got, ref, atol=1e-6, rtol=0, err_msg=name)


def test_torchscript_parity_image(runs, inputs, tmp_path):
    _check_parity(runs["image-resnet20"], "torchscript", inputs["image"], tmp_path, dynamic_batch=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "torch-export"])
def test_export_parity(runs, inputs, tmp_path, name, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    _check_parity(runs[name], fmt, inputs[_modality(name)], tmp_path, dynamic_batch=True)


@pytest.mark.slow
def test_onnx_fixed_batch_and_metadata_props(runs, inputs, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    res = _check_parity(runs["audio-res8-logmel"], "onnx", inputs["audio"], tmp_path, dynamic_batch=False)
    proto = onnx.load(str(res.path))
    props = {p.key: json.loads(p.value) for p in proto.metadata_props}
    assert props["sample_rate"] == 8000 and props["classes"] == ["c0", "c1", "c2"]
    assert props["resnetlab"]["opset"] == 18
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == [1, 4000]
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(n.op_type == "STFT" for n in proto.graph.node) or any(
        n.op_type == "STFT" for f in proto.functions for n in f.node)


def test_export_rejects_bad_arguments(runs, tmp_path):
    with pytest.raises(ValueError, match="unknown export format"):
        export_model(runs["image-resnet20"], "tflite")
    with pytest.raises(ValueError, match="opset must be an integer >= 17"):
        export_model(runs["image-resnet20"], "onnx", opset=13)
    with pytest.raises(ValueError, match=r"needs a name ending in \.pt2"):
        export_model(runs["image-resnet20"], "torch-export", tmp_path / "model.pt")
    assert main(["export", str(runs["image-resnet20"]), "--opset", "11"]) == 2
    with pytest.raises(FileNotFoundError):
        read_export_metadata(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a TorchScript or torch.export archive"):
        read_export_metadata(junk)


def test_onnx_without_exporter_says_what_to_install(runs, monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "onnxscript", None)  # makes `import onnxscript` fail
    pytest.importorskip("onnx")
    with pytest.raises(ImportError, match=r"resnetlab\[export\]"):
        export_model(runs["image-resnet20"], "onnx", tmp_path / "m.onnx")


def test_cli_export_torchscript(runs, tmp_path, capsys):
    out = tmp_path / "m.torchscript.pt"
    assert main(["export", str(runs["image-gray-preact"]), "--format", "torchscript", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert out.is_file() and "uint8 1x1x16x16" in text and "max |logit difference|" in text
    assert read_export_metadata(out)["channels"] == 1


def test_default_export_path_is_in_the_run(runs):
    res = export_model(runs["image-resnet20"], "torchscript", check=False)
    assert res.path == runs["image-resnet20"] / "export" / "best.torchscript.pt" and res.max_abs_diff is None


# --- Predictor -------------------------------------------------------------------------------------------


def test_predictor_matches_api_predict(runs, inputs):
    from resnetlab.api import predict

    for name in ("image-resnet20", "audio-res8-logmel"):
        files = [str(f) for f in inputs[_modality(name)]]
        expected = predict(runs[name], files, top_k=2, device="cpu")
        got = Predictor.load(runs[name], backend="eager", device="cpu").predict_files(files, top_k=2)
        assert [r["file"] for r in got] == files
        for e, g in zip(expected, got):
            assert [t["label"] for t in g["top_k"]] == [t["label"] for t in e["top_k"]] or \
                abs(g["top_k"][0]["prob"] - g["top_k"][1]["prob"]) < 0.02  # api.predict may run bf16 autocast


def test_predictor_eager_and_bf16_backends(runs, inputs):
    for name in ("image-resnet20", "audio-tc_resnet8-mfcc-1d"):
        ref, samples = _reference_samples(runs[name], inputs[_modality(name)])
        eager = Predictor.load(runs[name], backend="eager", device="cpu")
        np.testing.assert_allclose(eager.logits(samples).numpy(), ref, atol=TOL, rtol=0)
        bf16 = Predictor.load(runs[name], backend="bf16", device="cpu")
        assert bf16.logits(samples).dtype == torch.float32
        np.testing.assert_allclose(bf16.probabilities(samples).numpy(), torch.from_numpy(ref).softmax(1).numpy(),
                                   atol=0.08)


@pytest.mark.slow
def test_predictor_onnxruntime_backend(runs, inputs):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    for name in ("image-resnet20", "audio-res8-logmel"):
        ref, samples = _reference_samples(runs[name], inputs[_modality(name)])
        pred = Predictor.load(runs[name], backend="onnxruntime", device="cpu")
        np.testing.assert_allclose(pred.logits(samples).numpy(), ref, atol=TOL, rtol=0)
        np.testing.assert_allclose(pred.logits(samples[0]).numpy(), ref[:1], atol=TOL, rtol=0)  # one sample
        again = Predictor.load(runs[name], backend="onnxruntime", device="cpu")  # from the cached export
        np.testing.assert_allclose(again.logits(samples).numpy(), ref, atol=TOL, rtol=0)


def test_predictor_checks_arguments(runs):
    with pytest.raises(ValueError, match="unknown backend"):
        resolve_backend("tensorrt", torch.device("cpu"))
    assert resolve_backend("eager", torch.device("cpu")) == "eager"
    pred = Predictor.load(runs["image-resnet20"], backend="eager", device="cpu")
    with pytest.raises(ValueError, match=r"expected samples of shape \(3, 16, 16\)"):
        pred.logits(np.zeros((1, 3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        pred.top_k(torch.ones(1, 3) / 3, 0)


def test_predictor_predict_files_reports_bad_files(runs, inputs, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    pred = Predictor.load(runs["image-resnet20"], backend="eager", device="cpu")
    res = pred.predict_files([str(inputs["image"][0]), str(bad)], top_k=1, batch_size=1)
    assert "top_k" in res[0] and "error" in res[1] and "bad.png" in res[1]["error"]


def test_sniff():
    assert sniff(b"\x89PNG\r\n\x1a\n....")[:2] == ("image", ".png")
    assert sniff(b"\xff\xd8\xff\xe0")[0] == "image"
    assert sniff(b"RIFF\x00\x00\x00\x00WEBPVP8 ")[1] == ".webp"
    assert sniff(b"RIFF\x00\x00\x00\x00WAVEfmt ")[:2] == ("audio", ".wav")
    assert sniff(b"OggS\x00\x02")[:2] == ("audio", ".ogg")
    assert sniff(b"fLaC\x00")[0] == "audio"
    assert sniff(b"\x1a\x45\xdf\xa3\x01")[0] == "unsupported-audio"
    assert sniff(b"\x00\x00\x00\x20ftypM4A ")[0] == "unsupported-audio"
    assert sniff(b"hello world")[0] == "unknown"
