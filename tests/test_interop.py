"""Weights other libraries load (issue 16, point 3): ``resnetlab export RUN --format safetensors`` gives a
model.safetensors that torchvision loads with strict=True and timm loads as pretrained weights, each giving
resnetlab's logits; config.json in timm's pretrained-config layout. Offline: nothing is downloaded."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_one_line_error, run_cli
from deploy_helpers import make_run
from resnetlab.training.run_dir import load_model


@pytest.fixture
def exported(tmp_path, capsys):
    run = make_run(tmp_path / "run", "resnet18", img_size=32, num_classes=3)
    code, out, _ = run_cli(capsys, "export", run, "--format", "safetensors")
    assert code == 0, out
    folder = run / "export" / "safetensors"
    model, _, _ = load_model(run)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return folder, x, model(x)


def test_torchvision_loads_the_weights_strictly_and_gives_resnetlabs_logits(exported):
    import torchvision

    folder, x, expected = exported
    tensors = load_file(folder / "model.safetensors")
    assert not any(k.startswith("model.") for k in tensors)
    tv = torchvision.models.resnet18(num_classes=3)
    tv.load_state_dict(tensors, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(tv.eval()(x), expected, atol=1e-4, rtol=0)


def test_timm_loads_the_file_as_pretrained_weights_and_config_json_has_timms_layout(exported, monkeypatch):
    import timm

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, x, expected = exported
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architecture"] == "resnet18" and cfg["num_classes"] == 3 and cfg["label_names"] == ["c0", "c1", "c2"]
    pcfg = cfg["pretrained_cfg"]
    assert pcfg["input_size"] == [3, 32, 32] and pcfg["mean"] == [0.5] * 3 and pcfg["std"] == [0.25] * 3
    assert pcfg["crop_pct"] == 1.0 and pcfg["num_classes"] == 3
    model = timm.create_model(cfg["architecture"], pretrained=True, num_classes=cfg["num_classes"],
                              pretrained_cfg_overlay=dict(file=str(folder / "model.safetensors"),
                                                          num_classes=cfg["num_classes"]))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["resnet50"])  # bottlenecks: conv3, a stage-1 projection
def test_transformers_loads_the_hf_folder_and_gives_resnetlabs_logits(tmp_path, capsys, monkeypatch, arch):
    from transformers import ResNetForImageClassification

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = make_run(tmp_path / "run", arch, img_size=32, num_classes=3)
    code, out, _ = run_cli(capsys, "export", run, "--format", "hf")
    assert code == 0, out
    model, _, _ = load_model(run)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    hf = ResNetForImageClassification.from_pretrained(run / "export" / "hf").eval()
    assert hf.config.id2label == {0: "c0", 1: "c1", 2: "c2"}
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).logits, model(x), atol=1e-4, rtol=0)


def test_an_architecture_transformers_cannot_express_is_refused_in_one_line(tmp_path, capsys):
    run = make_run(tmp_path / "run", "resnet20", img_size=16, num_classes=3)
    code, _, err = run_cli(capsys, "export", run, "--format", "hf")
    assert code != 0
    assert_one_line_error(err, "--format hf", "resnet20", "differs in")
