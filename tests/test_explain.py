"""Grad-CAM and saliency: correctness against independent formulas, every model kind, the pictures and the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from deploy_helpers import make_run, write_image, write_wave
from resnetlab.api import load_model
from resnetlab.cli import main
from resnetlab.data.prepare import decoder_for
from resnetlab.explain.gradcam import (
    explain_batch,
    explain_files,
    explain_raw,
    heatmap_image,
    image_overlay,
    overlay_examples,
    png_bytes,
    spectrogram_overlay,
)
from resnetlab.models import create_model

# (name, create_model kwargs, model input shape without the batch axis)
MODELS = [
    ("resnet20", {"num_classes": 4}, (3, 16, 16)),
    ("preact_resnet20", {"num_classes": 4}, (3, 16, 16)),
    ("resnet18", {"num_classes": 5, "in_chans": 1}, (1, 48, 40)),
    ("res8", {"num_classes": 4}, (1, 20, 51)),
    ("res15_narrow", {"num_classes": 4}, (1, 12, 30)),
    ("tc_resnet8", {"num_classes": 4, "in_chans": 20}, (20, 51)),
    ("resnet1d18", {"num_classes": 3, "in_chans": 10}, (10, 40)),
]


def _model(name, kwargs):
    torch.manual_seed(0)
    model = create_model(name, **kwargs).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.running_mean.uniform_(-0.2, 0.2)
    return model


@pytest.mark.parametrize("name,kwargs,shape", MODELS, ids=[m[0] for m in MODELS])
def test_grad_cam_is_cam_for_a_linear_head(name, kwargs, shape):
    """With global average pooling and a linear classifier, Grad-CAM's channel weights are the classifier's
    weights over the map size, so the map is the class activation map of Zhou et al. (2016):
    relu(sum_c w[target, c] * A_c), computed here from the features directly."""
    model = _model(name, kwargs)
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 1, 2])
    exp = explain_batch(model, x, target)
    with torch.no_grad():
        feats = model.forward_features(x)
        cam = F.relu(torch.einsum("nc...,nc->n...", feats, model.fc.weight[target]))[:, None]
        mode = "bilinear" if cam.dim() == 4 else "linear"
        cam = F.interpolate(cam, size=x.shape[2:], mode=mode, align_corners=False)[:, 0]
        cam = cam / cam.reshape(3, -1).amax(1).clamp_min(1e-12).view(-1, *[1] * (cam.dim() - 1))
    np.testing.assert_allclose(exp.cam, cam.numpy(), atol=1e-5)
    assert exp.cam.shape == (3, *shape[1:])
    assert exp.target.tolist() == [0, 1, 2]
    # saliency: |d score / d input|, max over channels for 2-D inputs, per band for 1-D inputs
    xg = x.clone().requires_grad_(True)
    model(xg).gather(1, target[:, None]).sum().backward()
    sal = xg.grad.abs().amax(1) if x.dim() == 4 else xg.grad.abs()
    sal = sal / sal.reshape(3, -1).amax(1).view(-1, *[1] * (sal.dim() - 1))
    np.testing.assert_allclose(exp.saliency, sal.numpy(), atol=1e-5)
    np.testing.assert_allclose(exp.probs.sum(1), 1.0, atol=1e-5)


def test_explain_leaves_the_model_alone():
    model = _model("resnet20", {"num_classes": 3}).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    exp = explain_batch(model, torch.randn(2, 3, 16, 16))
    assert model.training  # mode restored
    assert all(p.grad is None for p in model.parameters())  # nothing accumulated
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN statistics untouched
    assert exp.target.tolist() == exp.probs.argmax(1).tolist()
    assert 0.0 <= exp.cam.min() and exp.cam.max() <= 1.0


def test_explain_needs_a_resnetlab_model():
    with pytest.raises(TypeError, match="forward_features"):
        explain_batch(torch.nn.Linear(3, 2), torch.randn(1, 3))


def test_pictures():
    img = np.random.default_rng(0).integers(0, 256, (3, 16, 20), dtype=np.uint8)
    pic = image_overlay(img, np.linspace(0, 1, 16 * 20).reshape(16, 20))
    assert pic.dtype == np.uint8 and pic.shape == (16 * 14, 20 * 14, 3)  # enlarged by a whole factor to >= 224
    gray = image_overlay(img[:1], np.zeros((16, 20)), min_side=16)
    assert gray.shape == (16, 20, 3)
    spec = spectrogram_overlay(np.random.rand(20, 51), np.random.rand(51), np.random.rand(20, 51))
    assert spec.dtype == np.uint8 and spec.shape[1] == 51 * 8 and spec.shape[0] > 2 * 20 * 8
    data = png_bytes(pic)
    assert data.startswith(b"\x89PNG")


def test_overlay_examples_image_and_audio(tmp_path):
    image_run = make_run(tmp_path / "img", num_classes=3)
    model, pipeline, meta = load_model(image_run)
    x = np.random.default_rng(0).integers(0, 256, (5, 3, 16, 16), dtype=np.uint8)
    out = overlay_examples(model, pipeline, x, [0, 1, 2, 0, 1], meta["classes"], tmp_path / "cam.png")
    assert Image.open(out).size[0] > 300
    out = overlay_examples(model, pipeline, x[:0], None, meta["classes"], tmp_path / "none.png")
    assert out.is_file()
    audio_run = make_run(tmp_path / "aud", "res8", modality="audio")
    model, pipeline, meta = load_model(audio_run)
    waves = (np.random.default_rng(1).standard_normal((3, 4000)) * 3000).astype(np.int16)
    out = overlay_examples(model, pipeline, torch.from_numpy(waves), None, meta["classes"], tmp_path / "aud.png",
                           max_items=2)
    assert Image.open(out).size[0] > 300


def test_heatmap_image_for_each_modality(tmp_path):
    for run, f in ((make_run(tmp_path / "i"), write_image(tmp_path / "a.png")),
                   (make_run(tmp_path / "a1", "tc_resnet8", modality="audio", layout="1d"),
                    write_wave(tmp_path / "a.wav"))):
        model, pipeline, meta = load_model(run)
        raw = decoder_for(meta["pipeline"])[0](f)
        exp = explain_raw(model, pipeline, torch.from_numpy(raw[None]))
        pic = heatmap_image(raw, exp, 0, meta["pipeline"]["modality"])
        assert pic.ndim == 3 and pic.shape[2] == 3 and min(pic.shape[:2]) >= 100


def test_explain_files_and_cli(tmp_path, capsys):
    run = make_run(tmp_path / "run", "res8", modality="audio")
    wav = write_wave(tmp_path / "yes.wav")
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF....WAVEjunk")
    res = explain_files(run, [wav], tmp_path / "out", target="c2")
    assert res[0]["explained"] == "c2" and Image.open(res[0]["png"]).size[0] > 300
    assert main(["explain", str(run), str(wav), str(bad)]) == 1  # the good file is still written
    out = capsys.readouterr().out
    assert "yes.wav" in out and (run / "explain" / "yes.gradcam.png").is_file()
    assert "broken.wav: error:" in out
    assert main(["explain", str(run), str(wav), "--target", "nope"]) == 2
    assert "not a class of this model" in capsys.readouterr().err


def test_cli_explain_image(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    folder = tmp_path / "imgs"
    folder.mkdir()
    for k in range(2):
        write_image(folder / f"{k}.png", seed=k)
    assert main(["explain", str(run), str(folder), "--out", str(tmp_path / "cams")]) == 0
    assert sorted(p.name for p in (tmp_path / "cams").iterdir()) == ["0.gradcam.png", "1.gradcam.png"]
