"""One inference path: ``predict``, ``evaluate``, the server and the exported graph compute the same thing.

The exported graph's preprocessing is the pipeline's own eval transform (one definition of each normalisation),
and ``predict`` (the model as trained), ``evaluate`` (through the data cache and the loader) and the HTTP server
(the predictor's eager backend) return the same probabilities for the same files.
"""

from __future__ import annotations

import http.client
import json
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import resnetlab
import resnetlab.api
from deploy_helpers import make_run, write_image, write_wave
from resnetlab.data.audio_pipeline import AudioPipeline
from resnetlab.data.image_pipeline import ImagePipeline
from resnetlab.deploy.export import inference_model
from resnetlab.deploy.predictor import Predictor
from resnetlab.deploy.serve import make_server
from resnetlab.training.checkpoint import read_checkpoint, save_checkpoint


def _audio_pipeline(normalize: str, layout: str, features: str = "logmel") -> AudioPipeline:
    return AudioPipeline(num_classes=3, sample_rate=8000, num_samples=4000, features=features, n_mels=20, n_mfcc=13,
                         n_fft=256, win_length=200, hop_length=80, layout=layout, normalize=normalize,
                         mean=-4.0 if normalize == "global" else None, std=2.5 if normalize == "global" else None)


def _check_graph_equals_pipeline(pipeline, x: torch.Tensor, graph_input: torch.Tensor) -> None:
    expected, _ = pipeline(x, None, train=False)
    transform = pipeline.eval_transform()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit.*deprecated")
        traced = torch.jit.trace(transform, (graph_input,), check_trace=False)  # what an export records
        for got in (transform(x), transform(graph_input), traced(graph_input)):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        model = torch.nn.Identity()  # the exported module's preprocessing is the same transform
        torch.testing.assert_close(inference_model(model, pipeline).preprocess(graph_input), expected,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("channels", [1, 3])
def test_exported_image_preprocessing_is_the_pipelines_eval_transform(channels):
    g = torch.Generator().manual_seed(channels)
    mean = torch.rand(channels, generator=g).tolist()
    std = (0.1 + torch.rand(channels, generator=g)).tolist()
    pipeline = ImagePipeline((12, 10), channels, mean, std, 4, crop_pad=2, cutout=3, mixup=0.4)
    x = torch.randint(0, 256, (5, channels, 12, 10), generator=g, dtype=torch.uint8)
    _check_graph_equals_pipeline(pipeline, x, x)
    # and the numbers are the documented ones: (x / 255 - mean) / std per channel
    manual = (x.float() / 255 - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    torch.testing.assert_close(pipeline.eval_transform()(x), manual)


@pytest.mark.parametrize("normalize, layout, features", [
    ("utterance", "2d", "logmel"), ("global", "1d", "logmel"), ("none", "2d", "mfcc"), ("global", "2d", "mfcc")])
def test_exported_audio_preprocessing_is_the_pipelines_eval_transform(normalize, layout, features):
    pipeline = _audio_pipeline(normalize, layout, features)
    g = torch.Generator().manual_seed(7)
    waves = (torch.randn(3, 4000, generator=g) * 6000).clamp(-32768, 32767).to(torch.int16)
    # cached clips are int16; the exported graph takes float waves in [-1, 1)
    _check_graph_equals_pipeline(pipeline, waves, waves.float() / 32768)


def _with_fp32(run: Path) -> Path:
    """The run's checkpoint, saved again as if trained in fp32 (so the model as trained runs in fp32 here too,
    like the predictor's eager backend, whatever this CPU's bf16 support)."""
    path = run / "checkpoints" / "best.safetensors"
    tensors, meta = read_checkpoint(path)
    save_checkpoint(path, tensors, {**meta, "precision": "fp32"}, keep_previous=False)
    return run


def _dataset(root: Path, modality: str) -> Path:
    for c in range(3):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(2):
            if modality == "image":
                write_image(root / f"c{c}" / f"{i}.png", 20, seed=10 * c + i)
            else:
                write_wave(root / f"c{c}" / f"{i}.wav", 8000, 0.5, freq=300.0 + 200 * c + 37 * i, seed=10 * c + i)
    return root


def _post(server, path: Path) -> dict:
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    try:
        conn.request("POST", f"/predict?filename={path.name}&top_k=3", path.read_bytes(),
                     {"Content-Type": "application/octet-stream"})
        r = conn.getresponse()
        body = json.loads(r.read())
        assert r.status == 200, body
        return body
    finally:
        conn.close()


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_predict_evaluate_and_the_server_return_the_same_probabilities(tmp_path, monkeypatch, modality):
    arch = "resnet20" if modality == "image" else "res8"
    run = _with_fp32(make_run(tmp_path / "run", arch, modality=modality, normalize="global"))
    data = _dataset(tmp_path / "data", modality)

    predicted = resnetlab.predict(run, data, top_k=3, device="cpu")
    by_predict = {Path(r["file"]).relative_to(data).as_posix(): {t["label"]: t["prob"] for t in r["top_k"]}
                  for r in predicted}
    assert len(by_predict) == 6

    seen = {}  # what evaluate read (its held-out files) and computed (the logits it scores)
    held_out, predict_loader = resnetlab.api.prepare_held_out, resnetlab.api.predict_loader

    def keep_files(*args, **kwargs):
        out = held_out(*args, **kwargs)
        seen["files"] = list(out[-1].files)
        return out

    def keep_logits(*args, **kwargs):
        pred = predict_loader(*args, **kwargs)
        seen["logits"] = pred.logits.clone()
        return pred

    monkeypatch.setattr(resnetlab.api, "prepare_held_out", keep_files)
    monkeypatch.setattr(resnetlab.api, "predict_loader", keep_logits)
    resnetlab.evaluate(run, str(data), device="cpu", out=tmp_path / "eval", batch_size=4)
    files = [Path(f).relative_to(data).as_posix() for f in seen["files"]]
    probs = seen["logits"].softmax(1)
    by_evaluate = {f: {f"c{j}": float(probs[i, j]) for j in range(3)} for i, f in enumerate(files)}
    assert sorted(by_evaluate) == sorted(by_predict)

    server = make_server(Predictor.load(run, backend="eager", device="cpu"), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        by_server = {name: {t["label"]: t["prob"] for t in _post(server, data / name)["top_k"]}
                     for name in by_predict}
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)

    spread = max(max(p.values()) - min(p.values()) for p in by_predict.values())
    assert spread > 0.01  # the model tells the files' classes apart: the comparison below means something
    for name, p in by_predict.items():
        for label, prob in p.items():  # predict and the server round to 6 decimals
            assert abs(prob - by_evaluate[name][label]) < 2e-6, (name, label, prob, by_evaluate[name][label])
            assert abs(prob - by_server[name][label]) < 2e-6, (name, label, prob, by_server[name][label])
    assert np.isfinite([v for p in by_server.values() for v in p.values()]).all()
