"""The model family: reference parity with torchvision, published sizes, every registered model runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import resnetlab
from resnetlab.models import create_model, get_spec, list_models, model_info
from resnetlab.models.layers import PadShortcut

torchvision = pytest.importorskip("torchvision")

TORCHVISION_ARCHS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
                     "wide_resnet50_2"]


def _randomize_bn(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


@pytest.mark.parametrize("arch", TORCHVISION_ARCHS)
def test_torchvision_parity(arch):
    torch.manual_seed(0)
    ref = getattr(torchvision.models, arch)(weights=None).eval()
    _randomize_bn(ref)
    ours = create_model(arch).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected, got = ref(x), ours(x)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch,params", [("resnet18", 11_689_512), ("resnet50", 25_557_032)])
def test_published_imagenet_params(arch, params):
    assert model_info(arch)["params"] == params


def test_resnet50_macs():
    macs = model_info("resnet50", (3, 224, 224))["macs"]
    assert 4.05e9 < macs < 4.15e9


@pytest.mark.parametrize("arch,millions", [("resnet20", 0.27), ("resnet56", 0.85), ("resnet110", 1.7)])
def test_cifar_params(arch, millions):
    params = sum(p.numel() for p in create_model(arch, num_classes=10).parameters())
    assert abs(params / 1e6 - millions) / millions < 0.03, params


@pytest.mark.parametrize("arch,thousands", [("res8", 110), ("res15", 238), ("res26", 438),
                                            ("res8_narrow", 19.9), ("res15_narrow", 42.6), ("res26_narrow", 78.4)])
def test_tang_lin_params(arch, thousands):
    params = sum(p.numel() for p in create_model(arch, num_classes=12).parameters())
    assert abs(params / 1e3 - thousands) / thousands < 0.01, params


def _small_input(name: str) -> tuple[int, ...]:
    spec = get_spec(name)
    if spec.ndim == 1:
        return (spec.input_size[0], 64)
    if spec.modality == "audio":
        return (1, 40, 32)
    return (3, 32, 32) if spec.input_size[1] <= 64 else (3, 64, 64)


HEAVY = {"resnet1202", "preact_resnet1202", "preact_resnet1001", "resnet152", "preact_resnet152", "wide_resnet50_2"}


@pytest.mark.parametrize("name", [n for n in list_models() if n not in HEAVY])
def test_every_model_forward_backward(name):
    model = create_model(name, num_classes=5)
    size = _small_input(name)
    x = torch.randn(2, *size)
    out = model(x)
    assert out.shape == (2, 5)
    assert torch.isfinite(out).all()
    out.sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(HEAVY))
def test_heavy_models_forward(name):
    model = create_model(name, num_classes=5).eval()
    with torch.no_grad():
        out = model(torch.randn(1, *_small_input(name)))
    assert out.shape == (1, 5)


def test_one_d_models_take_n_c_t():
    model = create_model("tc_resnet8", num_classes=12)
    assert isinstance(model.conv1, nn.Conv1d)
    assert model(torch.randn(3, 40, 101)).shape == (3, 12)
    seed = create_model("seed_resnet1d", num_classes=4)
    assert isinstance(seed.conv1, nn.Conv1d) and isinstance(seed.maxpool, nn.MaxPool1d)
    assert seed(torch.randn(2, 40, 80)).shape == (2, 4)


def test_seed_resnet_structure():
    m = create_model("seed_resnet", num_classes=10)
    assert m.conv1.kernel_size == (7, 7) and m.conv1.stride == (2, 2)
    assert isinstance(m.bn1, nn.BatchNorm2d) and isinstance(m.maxpool, nn.MaxPool2d)
    assert len(m.layer1) == 2 and m.num_features == 64
    assert m.layer1[0].downsample is None  # 64 -> 64: identity shortcut


def test_plain_nets_have_no_shortcuts():
    plain, res = create_model("plain20", num_classes=10), create_model("resnet20", num_classes=10)
    blocks = [b for b in plain.modules() if hasattr(b, "residual")]
    assert blocks and not any(b.residual for b in blocks)
    assert all(b.downsample is None for b in blocks)
    # Same weights count (option A shortcuts have none), different function.
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in res.parameters())
    res.load_state_dict(plain.state_dict())
    plain.eval(), res.eval()
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(plain(x), res(x))


def test_option_a_shortcut_pads_zeros():
    sc = PadShortcut(16, 32, 2, ndim=2)
    x = torch.randn(2, 16, 8, 8)
    y = sc(x)
    assert y.shape == (2, 32, 4, 4)
    torch.testing.assert_close(y[:, :16], x[:, :, ::2, ::2])
    assert (y[:, 16:] == 0).all()
    assert isinstance(create_model("resnet20").layer2[0].downsample, PadShortcut)


def test_stride_placement_v1_vs_v15():
    v15 = create_model("resnet50")
    v1 = create_model("resnet50", stride_in_1x1=True, bias=True)
    assert v15.layer2[0].conv1.stride == (1, 1) and v15.layer2[0].conv2.stride == (2, 2)
    assert v1.layer2[0].conv1.stride == (2, 2) and v1.layer2[0].conv2.stride == (1, 1)
    assert v1.layer2[0].conv1.bias is not None
    assert v1(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_resnet_d_shortcut_and_deep_stem():
    m = create_model("resnet50d")
    ds = m.layer2[0].downsample
    assert isinstance(ds[0], nn.AvgPool2d) and ds[1].stride == (1, 1)
    assert isinstance(m.conv1, nn.Sequential) and len([c for c in m.conv1 if isinstance(c, nn.Conv2d)]) == 3


def test_preact_blocks_are_preactivated():
    m = create_model("preact_resnet20", num_classes=10)
    from resnetlab.models.blocks import PreActBasicBlock

    assert all(isinstance(b, PreActBasicBlock) for b in m.layer1)
    assert isinstance(m.bn1, nn.Identity)  # CIFAR pre-act nets start straight with the blocks
    assert isinstance(m.norm[0], nn.BatchNorm2d)  # and end with the BN-ReLU the blocks left out


def test_zero_init_last_makes_blocks_identity():
    m = create_model("resnet18", num_classes=10, zero_init_last=True).eval()
    block = m.layer1[0]
    x = torch.relu(torch.randn(1, 64, 8, 8))
    torch.testing.assert_close(block(x), x)


def test_groups_and_width():
    m = create_model("resnext50_32x4d")
    assert m.layer1[0].conv2.groups == 32 and m.layer1[0].conv2.out_channels == 128
    assert create_model("wide_resnet50_2").layer1[0].conv2.out_channels == 128


def test_head_surface():
    m = create_model("resnet18", num_classes=10, drop_rate=0.2).eval()
    x = torch.randn(2, 3, 64, 64)
    feats = m.forward_features(x)
    assert feats.shape == (2, 512, 2, 2)
    assert m.forward_head(feats, pre_logits=True).shape == (2, 512)
    torch.testing.assert_close(m.forward_head(feats), m(x))
    m.reset_classifier(3)
    assert m(x).shape == (2, 3)
    m.reset_classifier(0)
    assert m(x).shape == (2, 512)
    m.reset_classifier(7, hidden=32)
    assert m(x).shape == (2, 7)


def test_in_chans_and_stages_as_data():
    m = create_model("resnet18", num_classes=4, in_chans=1)
    assert m.conv1.in_channels == 1
    custom = resnetlab.models.ResNet("bottleneck", [1, 1], [32, 64], [1, 2], num_classes=3, stem="cifar",
                                     stem_width=32)
    assert custom(torch.randn(2, 3, 16, 16)).shape == (2, 3)
    assert custom.stage_names == ["layer1", "layer2"]


def test_receptive_field_of_1d_net():
    info = model_info("tc_resnet8", with_receptive_field=True)
    # r = 1 + sum((k - 1) * jump): stem k3 (+2), then per block a k9 stride-2 conv and a k9 conv:
    # 3 + 8*(1+2) + 8*(2+4) + 8*(4+8) = 171 frames, clipped to the 101 frames of a 1 s clip.
    assert info["receptive_field"] == 101
    info = model_info("tc_resnet8", (40, 400), with_receptive_field=True)
    assert info["receptive_field"] == 171


@pytest.mark.parametrize("call,match", [
    (lambda: create_model("resnet19"), "unknown model 'resnet19'"),
    (lambda: create_model("resnet18", num_classes=-1), "num_classes"),
    (lambda: create_model("resnet18", in_chans=0), "in_chans"),
    (lambda: create_model("resnet18", bogus=1), r"unknown argument\(s\) \['bogus'\]"),
    (lambda: create_model("resnet18", shortcut="Z"), "unknown shortcut 'Z'"),
    (lambda: model_info("resnet18", (3, 64)), "input_size must be 3"),
])
def test_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_list_models_filters():
    assert "resnet50" in list_models("resnet*")
    assert all("preact" in n for n in list_models("preact"))
    assert set(TORCHVISION_ARCHS) <= set(list_models())


def test_the_readmes_model_figures_are_model_infos():
    """Every ``NAME (NNK params, X M MACs at AxB...`` and ``model_info("NAME")  # {'params': P, 'macs': M`` in
    the README is what ``model_info`` measures (the README once said 114K for tc_resnet8's 65,180)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    short = re.findall(r"`(\w+)`\s*\((\d+)K params, ([\d.]+) M MACs at (\d+)x(\d+)", readme)
    exact = re.findall(r"model_info\(\"(\w+)\"\)\s*# \{'params': (\d+), 'macs': (\d+)", readme)
    assert short and exact  # the patterns still find the figures
    for name, k_params, m_macs, a, b in short:
        info = model_info(name, input_size=(int(a), int(b)))
        assert (round(info["params"] / 1000), round(info["macs"] / 1e6, 1)) == (int(k_params), float(m_macs)), name
    for name, params, macs in exact:
        info = model_info(name)
        assert (info["params"], info["macs"]) == (int(params), int(macs)), name
