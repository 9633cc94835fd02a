"""Pretrained weights from local files: parity with each source library, safe loading, adaptation, reporting.

Parity tests build the reference model in its own library with random weights (BN running statistics
randomised too, or BN parity would be trivially true), save it in that library's format, load it into
resnetlab and compare eval-mode logits. Optional libraries (timm, transformers, keras, h5py) are skipped
when absent; install them with ``pip install -e '.[dev]'``.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
import zipfile

import pytest
import torch
from torch import nn

import hostile_files
from resnetlab.models import create_model
from resnetlab.models.convert import (
    MODEL_PREFIX,
    RESNETLAB_META_KEY,
    UnsafeCheckpointError,
    arch_from_name,
    hf_key_to_resnetlab,
    infer_resnet_kwargs,
    match_arch,
    read_resnetlab_checkpoint,
)
from resnetlab.models.pretrained import (
    LoadReport,
    adapt_input_conv,
    load_pretrained,
    model_from_pretrained,
    read_pretrained,
)
from resnetlab.models.weights import KNOWN_WEIGHTS, get_weights_entry, resolve_source

SIZE = 64


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN affine parameters and running statistics (and conv biases), so parity tests test them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            elif isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model.eval()


def images(n: int = 2, c: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, c, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty torch / Hugging Face / Keras caches under tmp_path (nothing of the real home is seen)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    return {"torch": tmp_path / "torch" / "hub" / "checkpoints", "hf": tmp_path / "hf" / "hub",
            "keras": tmp_path / "keras" / "models"}


def _torchvision_file(tmp_path_factory, name):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    ref = randomize(getattr(torchvision.models, name)())
    path = tmp_path_factory.mktemp("tv") / f"{name}.pth"
    torch.save(ref.state_dict(), path)
    return path, ref


@pytest.fixture(scope="module")
def tv_resnet18_file(tmp_path_factory):
    return _torchvision_file(tmp_path_factory, "resnet18")


@pytest.fixture(scope="module")
def tv_resnet50_file(tmp_path_factory):
    return _torchvision_file(tmp_path_factory, "resnet50")


# --- torchvision --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torchvision_parity(name, request):
    path, ref = request.getfixturevalue(f"tv_{name}_file")
    model, report = model_from_pretrained(path)
    assert model.arch == name  # told from the tensors' shapes: the file says nothing
    assert report.ok and not report.new and not report.ignored and not report.reshaped, report
    x = images()
    with torch.no_grad():
        assert_logits_close(model.eval()(x), ref(x))


def test_in_chans_1_sums_rgb_filters(tv_resnet18_file):
    path, ref = tv_resnet18_file
    model, report = model_from_pretrained(path, in_chans=1)
    assert report.reshaped == [("conv1.weight", (64, 1, 7, 7), (64, 3, 7, 7))]
    assert report.ok and "summed" in str(report)
    gray = images(c=1)
    with torch.no_grad():
        torch.testing.assert_close(model.conv1(gray), ref.conv1(gray.expand(-1, 3, -1, -1)), rtol=1e-5, atol=1e-5)
        # every other tensor is the pretrained one, so the whole network agrees too
        assert_logits_close(model.eval()(gray), ref(gray.expand(-1, 3, -1, -1)))


def test_adapt_input_conv_cycles_and_rescales():
    w = torch.randn(8, 3, 3, 3)
    x = torch.randn(1, 3, 9, 9)
    six = adapt_input_conv(w, 6)
    assert six.shape == (8, 6, 3, 3)
    # 6 channels = RGB twice, scaled 3/6: the same image given twice over gives the same activations
    torch.testing.assert_close(nn.functional.conv2d(torch.cat([x, x], 1), six), nn.functional.conv2d(x, w))
    four = adapt_input_conv(w, 4)
    torch.testing.assert_close(four, torch.cat([w, w[:, :1]], 1) * 0.75)
    with pytest.raises(ValueError, match="in_chans"):
        adapt_input_conv(w, 0)


def test_new_classifier_is_kept_and_reported(tv_resnet18_file):
    path, _ = tv_resnet18_file
    model, report = model_from_pretrained(path, num_classes=10)
    assert model.fc.out_features == 10
    assert sorted(report.new) == ["fc.bias", "fc.weight"] and report.ok
    assert "newly initialised (2): fc.weight, fc.bias" in str(report)
    assert "model 10x512, checkpoint 1000x512" in str(report)


def test_truncated_model_ignores_missing_stage(tv_resnet50_file):
    path, ref = tv_resnet50_file
    model = create_model("resnet50", layers=[3, 4, 6], widths=[64, 128, 256], num_classes=10)
    report = load_pretrained(model, path)
    assert report.ok
    assert report.ignored and all(k.startswith("layer4.") for k in report.ignored)
    assert sorted(report.new) == ["fc.bias", "fc.weight"]
    assert "ignored, not in the model (" in str(report) and "layer4.* (" in str(report)
    x = images()
    with torch.no_grad():
        want = ref.layer3(ref.layer2(ref.layer1(ref.maxpool(ref.relu(ref.bn1(ref.conv1(x)))))))
        torch.testing.assert_close(model.eval().forward_features(x), want, rtol=1e-4, atol=1e-4)


def test_strict_raises_one_line_naming_keys_and_leaves_model_alone(tv_resnet18_file):
    path, _ = tv_resnet18_file
    model = create_model("resnet18", num_classes=10)
    before = model.conv1.weight.clone()
    with pytest.raises(ValueError) as err:
        load_pretrained(model, path, strict=True)
    msg = str(err.value)
    assert "\n" not in msg
    assert "fc.weight model 10x512 vs checkpoint 1000x512" in msg and "fc.bias" in msg
    assert torch.equal(model.conv1.weight, before)
    load_pretrained(create_model("resnet18"), path, strict=True)  # an exact match passes


def test_adapt_false_reports_mismatches(tv_resnet18_file):
    path, _ = tv_resnet18_file
    model = create_model("resnet18", in_chans=1)
    before = model.conv1.weight.clone()
    report = load_pretrained(model, path, adapt=False)
    assert report.mismatched == [("conv1.weight", (64, 1, 7, 7), (64, 3, 7, 7))]
    assert not report.ok and "NOT OK" in str(report)
    assert torch.equal(model.conv1.weight, before)


def test_report_fields():
    r = LoadReport("x", "state-dict", loaded=["a"], new=["fc.weight"], classifier="fc")
    assert r.ok and r.missing == []
    r.new.append("layer1.0.conv1.weight")
    assert not r.ok and r.missing == ["layer1.0.conv1.weight"]


# --- architecture inference ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet18d", "resnet50d", "resnext50_32x4d",
                                  "wide_resnet50_2", "resnet20", "preact_resnet18", "preact_resnet20"])
def test_infer_architecture_from_shapes(name):
    with torch.device("meta"):
        sd = create_model(name).state_dict()
    assert match_arch(infer_resnet_kwargs(sd)) == (name, {})


def test_arch_from_name():
    assert arch_from_name("resnet50.a1_in1k") == ("resnet50", {})
    assert arch_from_name("resnet101d") == ("resnet101", {"stem": "deep", "shortcut": "D"})
    assert arch_from_name("resnext101_32x8d") == ("resnet101", {"groups": 32, "width_per_group": 8})
    assert arch_from_name("wide_resnet101_2") == ("resnet101", {"width_per_group": 128})
    assert arch_from_name("seresnet50") is None


# --- timm ---------------------------------------------------------------------------------------------------
def test_timm_resnet18d_safetensors_parity(tmp_path):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    ref = randomize(timm.create_model("resnet18d", pretrained=False))
    path = tmp_path / "resnet18d.safetensors"
    save_file(ref.state_dict(), str(path))
    model, report = model_from_pretrained(path)
    assert model.arch == "resnet18d" and report.ok and not report.ignored, report
    x = images()
    with torch.no_grad():
        assert_logits_close(model.eval()(x), ref(x))


def test_timm_resnet50_pth_parity(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = randomize(timm.create_model("resnet50", pretrained=False))
    path = tmp_path / "resnet50.pth"
    torch.save(ref.state_dict(), path)
    model = create_model("resnet50")
    report = load_pretrained(model, path, strict=True)
    assert report.ok
    x = images()
    with torch.no_grad():
        assert_logits_close(model.eval()(x), ref(x))


def test_timm_hub_folder_from_hf_cache(caches):
    timm = pytest.importorskip("timm")
    from timm.models._hub import save_for_hf

    torch.manual_seed(0)
    ref = randomize(timm.create_model("resnet18d", pretrained=False, num_classes=7))
    snapshot = caches["hf"] / "models--timm--resnet18d.ra2_in1k" / "snapshots" / "0123abc"
    save_for_hf(ref, str(snapshot), safe_serialization=True)
    model, report = model_from_pretrained("timm:resnet18d")  # timm's default tag for resnet18d
    assert report.format == "timm" and report.ok, report
    assert model.arch == "resnet18d" and model.fc.out_features == 7
    assert model.pretrained_cfg["interpolation"] == "bicubic"
    x = images()
    with torch.no_grad():
        assert_logits_close(model.eval()(x), ref(x))


# --- Hugging Face transformers ------------------------------------------------------------------------------
HF_CASES = {
    "bottleneck-safetensors": dict(layer_type="bottleneck", save="safetensors"),
    "bottleneck-bin-v1": dict(layer_type="bottleneck", save="bin", downsample_in_bottleneck=True,
                              downsample_in_first_stage=True),
    "basic-safetensors": dict(layer_type="basic", save="safetensors"),
    "basic-bin": dict(layer_type="basic", save="bin", embedding_size=24),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_transformers_parity(case, tmp_path):
    transformers = pytest.importorskip("transformers")
    opts = dict(HF_CASES[case])
    save = opts.pop("save")
    sizes = [32, 64, 96, 128] if opts["layer_type"] == "bottleneck" else [16, 24, 32, 48]
    config = transformers.ResNetConfig(depths=[1, 2, 1, 1], hidden_sizes=sizes, num_labels=7,
                                       **{"embedding_size": 16, **opts})
    torch.manual_seed(0)
    ref = randomize(transformers.ResNetForImageClassification(config))
    folder = tmp_path / "hf"
    ref.save_pretrained(folder)
    if save == "bin":  # the pre-safetensors layout: config.json + pytorch_model.bin (a torch.save state dict)
        (folder / "model.safetensors").unlink()
        torch.save(ref.state_dict(), folder / "pytorch_model.bin")
    model, report = model_from_pretrained(folder)
    assert report.format == "hf-transformers" and report.ok and not report.ignored, report
    assert model.fc.out_features == 7
    x = images()
    with torch.no_grad():
        assert_logits_close(model.eval()(x), ref(x).logits)


def test_hf_weights_without_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(depths=[1, 1, 1, 1], hidden_sizes=[32, 64, 96, 128], embedding_size=16,
                                       num_labels=5)
    torch.manual_seed(0)
    ref = randomize(transformers.ResNetForImageClassification(config))
    ref.save_pretrained(tmp_path / "hf")
    lone = tmp_path / "lone"
    lone.mkdir()
    (tmp_path / "hf" / "model.safetensors").rename(lone / "model.safetensors")
    model, report = model_from_pretrained(lone / "model.safetensors")
    assert report.ok and "no config.json" in str(report)
    x = images()
    with torch.no_grad():
        assert_logits_close(model.eval()(x), ref(x).logits)


def test_hf_from_cache_with_preprocessor_config(caches):
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(depths=[1, 1, 1, 1], hidden_sizes=[32, 64, 96, 128], embedding_size=16,
                                       num_labels=3, id2label={0: "cat", 1: "dog", 2: "bird"})
    torch.manual_seed(0)
    ref = randomize(transformers.ResNetForImageClassification(config))
    repo = caches["hf"] / "models--microsoft--resnet-50"
    snapshot = repo / "snapshots" / "deadbeef"
    ref.save_pretrained(snapshot)
    (snapshot / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25], "resample": 3, "size": 224,
         "crop_pct": 0.875}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("deadbeef")
    model, report = model_from_pretrained("hf:microsoft/resnet-50")
    assert report.ok
    assert model.pretrained_cfg["classes"] == ["cat", "dog", "bird"]
    assert model.pretrained_cfg["mean"] == [0.5, 0.5, 0.5] and model.pretrained_cfg["resize_size"] == 256
    x = images()
    with torch.no_grad():
        assert_logits_close(model.eval()(x), ref(x).logits)


def test_hf_key_mapping():
    assert hf_key_to_resnetlab("resnet.embedder.embedder.convolution.weight") == "conv1.weight"
    assert hf_key_to_resnetlab("resnet.encoder.stages.2.layers.0.shortcut.normalization.running_var") == \
        "layer3.0.downsample.1.running_var"
    assert hf_key_to_resnetlab("encoder.stages.0.layers.1.layer.2.convolution.weight") == "layer1.1.conv3.weight"
    assert hf_key_to_resnetlab("classifier.1.bias") == "fc.bias"
    assert hf_key_to_resnetlab("pooler.something") is None


# --- Keras --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keras_resnet50(tmp_path_factory):
    os.environ.setdefault("KERAS_BACKEND", "torch")  # before keras is imported
    pytest.importorskip("h5py")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip(f"keras was imported with the {keras.backend.backend()} backend")
    import numpy as np

    keras.utils.set_random_seed(0)
    model = keras.applications.ResNet50(weights=None, input_shape=(SIZE, SIZE, 3), classifier_activation=None)
    rng = np.random.default_rng(0)
    for layer in model.layers:  # random BN statistics and conv biases (Keras initialises them to 0 / 1)
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.1, beta.shape),
                               rng.normal(0, 0.1, mean.shape), rng.uniform(0.5, 1.5, var.shape)])
        elif isinstance(layer, keras.layers.Conv2D):
            kernel, bias = layer.get_weights()
            layer.set_weights([kernel, rng.normal(0, 0.1, bias.shape)])
    folder = tmp_path_factory.mktemp("keras")
    files = {"weights.h5": folder / "r50.weights.h5", "h5": folder / "r50.h5", "keras": folder / "r50.keras"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_weights(files["weights.h5"])
        model.save(files["h5"])  # legacy HDF5: named layers, as the downloadable application weights
        model.save(files["keras"])
    x = images()  # resnetlab's input: NCHW, RGB
    bgr_nhwc = x.flip(1).permute(0, 2, 3, 1).contiguous()  # Keras' input: NHWC, BGR
    with torch.no_grad():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = torch.as_tensor(np.asarray(keras.ops.convert_to_numpy(model(bgr_nhwc, training=False))))
    return files, x, ref


@pytest.mark.parametrize("fmt", ["weights.h5", pytest.param("h5", marks=pytest.mark.slow),
                                 pytest.param("keras", marks=pytest.mark.slow)])
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_keras_resnet50_parity(fmt, keras_resnet50):
    files, x, ref = keras_resnet50
    model, report = model_from_pretrained(files[fmt])
    assert report.format == "keras" and report.ok and not report.ignored, report
    assert model.arch == "resnet50"
    assert model.layer2[0].conv1.stride == (2, 2) and model.layer2[0].conv2.stride == (1, 1)  # ResNet v1
    assert model.conv1.bias is not None
    assert all(m.eps == 1.001e-5 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert "eps set to 1.001e-05" in str(report) and "RGB" in str(report)
    with torch.no_grad():
        assert_logits_close(model.eval()(x), ref)


def test_a_zip_bomb_keras_member_is_refused_from_its_header(tmp_path, monkeypatch):
    """Before: the member was read whole with ZipFile.read, however large it declared itself."""
    from resnetlab.models import convert_keras

    pytest.importorskip("h5py")
    path = tmp_path / "bomb.keras"
    path.write_bytes(hostile_files.keras_zip_bomb(8 << 20))  # 8 MiB of zeros in about 8 KB
    monkeypatch.setattr(convert_keras, "_RATIO_CHECK_BYTES", 1 << 20)
    reads = []
    monkeypatch.setattr(zipfile.ZipExtFile, "read", lambda *a, **k: reads.append(a) or b"")
    with pytest.raises(ValueError, match=r"bomb.keras: archive member model.weights.h5 inflates [\d,]+ bytes to "
                                         r"8,388,608 \(more than 100x\): a zip bomb") as err:
        read_pretrained(path)
    monkeypatch.setattr(convert_keras, "MAX_KERAS_BYTES", 4 << 20)
    with pytest.raises(ValueError, match="declares 8,388,608 bytes, more than 4,194,304"):
        read_pretrained(path)
    assert "\n" not in str(err.value) and not reads


def test_a_keras_member_that_lies_about_its_size_is_refused(tmp_path):
    pytest.importorskip("h5py")
    path = tmp_path / "liar.keras"
    path.write_bytes(hostile_files.keras_lying_zip(4 << 20, declared=1000))
    with pytest.raises(ValueError, match="liar.keras: corrupt archive member model.weights.h5 .*CRC"):
        read_pretrained(path)


@pytest.mark.timeout(30)  # before, the soft-link cycle made the layer search loop forever
@pytest.mark.parametrize("kind", ["external", "soft-cycle", "hard-cycle", "huge-dataset", "external-storage"])
def test_h5_files_that_reach_outside_or_loop_are_refused(tmp_path, kind):
    h5py = pytest.importorskip("h5py")
    import numpy as np

    path = tmp_path / "evil.weights.h5"
    if kind == "external":
        with h5py.File(tmp_path / "other.h5", "w") as o:
            o.create_dataset("conv2d/vars/0", data=np.zeros((7, 7, 3, 64), np.float32))
        hostile_files.h5_external_link(path, str(tmp_path / "other.h5"))
        expect = "HDF5 ExternalLink /layers to .*other.h5:/ refused"
    elif kind == "soft-cycle":
        hostile_files.h5_soft_link_cycle(path)
        expect = "HDF5 SoftLink /layers/sub/loop to /layers refused"
    elif kind == "hard-cycle":
        with h5py.File(path, "w") as f:
            f.create_group("layers/sub")
            f["layers/sub/up"] = f["layers"]
        expect = "HDF5 group /layers/sub/up is linked from more than one place"
    elif kind == "huge-dataset":  # 4 TiB declared in a few KB: chunked, never written
        with h5py.File(path, "w") as f:
            f.create_dataset("layers/conv2d/vars/0", shape=(1 << 40,), dtype="f4", chunks=(1024,))
        expect = "HDF5 arrays declare more than 2,147,483,648 bytes"
    else:
        with h5py.File(path, "w") as f:
            f.create_dataset("layers/conv2d/vars/0", shape=(10,), dtype="f4", external=[(str(tmp_path / "raw"), 0, 40)])
        expect = "HDF5 dataset /layers/conv2d/vars/0 keeps its data in other files"
    with pytest.raises(ValueError, match=f"evil.weights.h5: {expect}") as err:
        read_pretrained(path)
    assert "\n" not in str(err.value)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_keras_weights_need_stride_in_1x1(keras_resnet50):
    files, _, _ = keras_resnet50
    with pytest.raises(ValueError, match="stride_in_1x1=True"):
        load_pretrained(create_model("resnet50", bias=True), files["h5"])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_keras_cache_lookup_checks_md5(keras_resnet50, caches):
    files, x, ref = keras_resnet50
    caches["keras"].mkdir(parents=True)
    cached = caches["keras"] / "resnet50_weights_tf_dim_ordering_tf_kernels.h5"
    cached.write_bytes(files["h5"].read_bytes())
    with pytest.raises(ValueError, match="md5"):  # our random weights are not Keras' published file
        resolve_source("keras:resnet50")
    weights = read_pretrained("keras:resnet50", check_hash=False)
    assert weights.entry is get_weights_entry("keras:resnet50")
    model, report = model_from_pretrained(weights, num_classes=0)
    assert report.ok and model.pretrained_cfg["mean"][0] == pytest.approx(123.68 / 255)
    with torch.no_grad():
        assert model.eval()(x).shape == (2, 2048)


# --- resnetlab's own checkpoints ----------------------------------------------------------------------------
def _save_resnetlab(path, model, meta, extra=None):
    from safetensors.torch import save_file

    tensors = {MODEL_PREFIX + k: v.contiguous() for k, v in model.state_dict().items()}
    tensors.update(extra or {})
    save_file(tensors, str(path), metadata={RESNETLAB_META_KEY: json.dumps(meta)})


def test_resnetlab_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(0)
    ref = randomize(create_model("resnet20", num_classes=3, drop_rate=0.1))
    meta = {"arch": "resnet20", "num_classes": 3, "in_chans": 3, "model_overrides": {"drop_rate": 0.1},
            "classes": ["a", "b", "c"]}
    path = tmp_path / "ckpt.safetensors"
    _save_resnetlab(path, ref, meta, extra={"optim.state.0.exp_avg": torch.zeros(3)})
    sd, got_meta = read_resnetlab_checkpoint(path)
    assert got_meta == meta and set(sd) == set(ref.state_dict())
    model, report = model_from_pretrained(path)
    assert report.format == "resnetlab" and report.ok and not report.ignored, report
    assert model.arch == "resnet20" and model.drop_rate == 0.1
    assert model.pretrained_cfg["classes"] == ["a", "b", "c"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_logits_close(model.eval()(x), ref(x))
    run_dir = tmp_path / "run"  # a run directory stands for its best checkpoint, as in evaluate and predict
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("arch: resnet20\n")
    path.rename(run_dir / "checkpoints" / "best.safetensors")
    from_run, _ = model_from_pretrained(run_dir)
    with torch.no_grad():
        assert_logits_close(from_run.eval()(x), ref(x))


def test_resnetlab_checkpoint_errors(tmp_path):
    from safetensors.torch import save_file

    model = create_model("resnet20", num_classes=3)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, str(plain))
    with pytest.raises(ValueError, match="not a resnetlab checkpoint"):
        read_resnetlab_checkpoint(plain)
    no_arch = tmp_path / "no_arch.safetensors"
    _save_resnetlab(no_arch, model, {"num_classes": 3})
    with pytest.raises(ValueError, match="needs 'arch'"):
        read_resnetlab_checkpoint(no_arch)
    bad_classes = tmp_path / "bad.safetensors"
    _save_resnetlab(bad_classes, model, {"arch": "resnet20", "num_classes": 3, "classes": ["a"]})
    with pytest.raises(ValueError, match="1 classes for num_classes=3"):
        read_resnetlab_checkpoint(bad_classes)


# --- safety -------------------------------------------------------------------------------------------------
class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.parametrize("how", ["torch.save", "pickle", "hf-folder"])
def test_malicious_pickle_is_refused_and_never_runs(how, tmp_path):
    marker = tmp_path / "pwned"
    payload = {"conv1.weight": torch.zeros(1), "evil": _Evil(marker)}
    if how == "torch.save":
        source = tmp_path / "evil.pth"
        torch.save(payload, source)
    elif how == "pickle":
        source = tmp_path / "evil.pkl"
        source.write_bytes(pickle.dumps(payload))
    else:
        source = tmp_path / "folder"
        source.mkdir()
        (source / "config.json").write_text(json.dumps({"model_type": "resnet"}))
        torch.save(payload, source / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match="refusing to unpickle") as err:
        load_pretrained(create_model("resnet18"), source)
    assert "\n" not in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("version", ["2.5.1", "2.2.0+cpu", "1.13.1", "weird"])
def test_pickled_files_are_refused_on_a_torch_whose_weights_only_can_run_code(tmp_path, monkeypatch, version):
    """CVE-2025-32434: torch.load(weights_only=True) can run code on torch <= 2.5.1, so nothing pickled is opened."""
    source = tmp_path / "plain.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, source)
    loads = []
    monkeypatch.setattr(torch, "__version__", version)
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a))
    expected = f"plain.pth: refusing to unpickle it with torch {re.escape(version)}: .*CVE-2025-32434"
    with pytest.raises(UnsafeCheckpointError, match=expected) as err:
        load_pretrained(create_model("resnet18"), source)
    assert "\n" not in str(err.value) and not loads


def test_the_package_requires_a_torch_that_unpickles_safely():
    text = os.path.join(os.path.dirname(os.path.dirname(__file__)), "pyproject.toml")
    found = re.findall(r'^\s*"torch\s*>=\s*(\d+)\.(\d+)', open(text, encoding="utf-8").read(), re.MULTILINE)
    assert len(found) == 1 and tuple(map(int, found[0])) >= (2, 6), found


# --- sharded checkpoints: shards confined to the index's folder -----------------------------------------------
def _save_shard(path, value: float = 1.0):
    from safetensors.torch import save_file

    save_file({"conv1.weight": torch.full((2,), value)}, str(path))
    return path


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/../../x.safetensors",
                                   "..\\outside.safetensors", "C:outside.safetensors", "model.safetensors.index.json",
                                   "other.index.json", "notes.txt", 7, ""])
def test_a_shard_index_may_only_name_weights_files_in_its_folder(tmp_path, shard):
    """Before: index names were joined to the folder as given (``../``, absolute), and an index naming an index
    recursed until Python's recursion limit."""
    _save_shard(tmp_path / "outside.safetensors", 666.0)
    folder = tmp_path / "model"
    index = hostile_files.shard_folder(folder, shard)
    (folder / "sub").mkdir()
    (folder / "other.index.json").write_text(json.dumps({"weight_map": {"conv1.weight": "other.index.json"}}))
    for source in (index, folder):
        with pytest.raises(ValueError, match="model.safetensors.index.json: shard .* (not a plain file name|not a "
                                             r"\.safetensors|not a file name)") as err:
            read_pretrained(source)
        assert "\n" not in str(err.value)


def test_a_shard_that_is_a_symlink_out_of_the_folder_is_refused(tmp_path):
    _save_shard(tmp_path / "secret.safetensors", 666.0)
    folder = tmp_path / "model"
    index = hostile_files.shard_folder(folder, "model-1.safetensors")
    (folder / "model-1.safetensors").symlink_to(tmp_path / "secret.safetensors")
    with pytest.raises(ValueError, match="shard 'model-1.safetensors' is a symlink to .*secret.safetensors, outside"):
        read_pretrained(index)
    (folder / "model-1.safetensors").unlink()
    _save_shard(folder / "model-1.safetensors", 2.0)
    assert read_pretrained(index).state_dict["conv1.weight"].tolist() == [2.0, 2.0]


def test_shards_in_a_hugging_face_cache_snapshot_may_link_into_its_blobs(tmp_path):
    repo = tmp_path / "hub" / "models--org--net"
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    _save_shard(repo / "blobs" / "f00d", 3.0)
    (snapshot / "model-1.safetensors").symlink_to("../../blobs/f00d")
    index = hostile_files.shard_folder(snapshot, "model-1.safetensors")
    assert read_pretrained(index).state_dict["conv1.weight"].tolist() == [3.0, 3.0]
    _save_shard(tmp_path / "hub" / "elsewhere", 666.0)  # outside this repository's cache folder
    (snapshot / "model-1.safetensors").unlink()
    (snapshot / "model-1.safetensors").symlink_to("../../../elsewhere")
    with pytest.raises(ValueError, match="is a symlink to .*elsewhere, outside"):
        read_pretrained(index)


# --- finding weights ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("source, expect", [
    ("torchvision:resnet50", ["resnet50-11ad3fa6.pth", "hub/checkpoints", "https://download.pytorch.org/models/"]),
    ("torchvision:resnet18.IMAGENET1K_V1", ["resnet18-f37072fd.pth"]),
    ("timm:resnet50.a1_in1k", ["models--timm--resnet50.a1_in1k", "https://huggingface.co/timm/resnet50.a1_in1k"]),
    ("hf:microsoft/resnet-50", ["models--microsoft--resnet-50", "https://huggingface.co/microsoft/resnet-50"]),
    ("keras:resnet50", ["resnet50_weights_tf_dim_ordering_tf_kernels.h5", "keras/models",
                        "https://storage.googleapis.com/tensorflow/keras-applications/resnet/"]),
])
def test_not_found_says_what_and_where(source, expect, caches):
    with pytest.raises(FileNotFoundError) as err:
        resolve_source(source)
    msg = str(err.value)
    assert "\n" not in msg and "never downloads" in msg
    for text in expect:
        assert text in msg
    folder = {"torchvision": caches["torch"], "keras": caches["keras"]}.get(source.split(":")[0], caches["hf"])
    assert str(folder) in msg


def test_unknown_sources(caches, tmp_path):
    with pytest.raises(ValueError, match="unknown torchvision weights 'resnet9'"):
        resolve_source("torchvision:resnet9")
    with pytest.raises(FileNotFoundError, match="no such file"):
        resolve_source(tmp_path / "nope.pth")


def test_torchvision_cache_lookup(caches, tv_resnet18_file):
    path, ref = tv_resnet18_file
    caches["torch"].mkdir(parents=True)
    cached = caches["torch"] / "resnet18-f37072fd.pth"
    cached.write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match="sha256"):  # the name promises torchvision's file; ours is random
        resolve_source("torchvision:resnet18")
    found, entry = resolve_source("torchvision:resnet18", check_hash=False)
    assert found == cached and entry.key == "torchvision:resnet18.IMAGENET1K_V1"
    # resnet50: IMAGENET1K_V2 is the default, V1 is used when it is the only file there
    (caches["torch"] / "resnet50-0676ba61.pth").write_bytes(b"")
    assert resolve_source("torchvision:resnet50", check_hash=False)[1].name == "resnet50.IMAGENET1K_V1"
    model, report = model_from_pretrained(read_pretrained("torchvision:resnet18", check_hash=False))
    assert report.format == "torchvision" and report.ok
    assert len(model.pretrained_cfg["classes"]) == 1000 and model.pretrained_cfg["resize_size"] == 256


# --- the weights table --------------------------------------------------------------------------------------
def test_weights_table_is_consistent():
    keys = [e.key for e in KNOWN_WEIGHTS]
    assert len(keys) == len(set(keys))
    for e in KNOWN_WEIGHTS:
        assert arch_from_name(e.arch) is not None, e.key
        assert e.file_name or e.hf_repo, e.key
        if e.file_hash:
            assert re.fullmatch(r"(sha256:[0-9a-f]{8,}|md5:[0-9a-f]{32})", e.file_hash), e.key
    families: dict[tuple[str, str], int] = {}
    for e in KNOWN_WEIGHTS:
        family = (e.source, e.name.split(".")[0] if e.source != "keras" else e.name)
        families[family] = families.get(family, 0) + e.default
    assert set(families.values()) == {1}, families


def test_weights_table_matches_torchvision():
    from torchvision.models import resnet as tv

    enums = [tv.ResNet18_Weights, tv.ResNet34_Weights, tv.ResNet50_Weights, tv.ResNet101_Weights,
             tv.ResNet152_Weights, tv.ResNeXt50_32X4D_Weights, tv.Wide_ResNet50_2_Weights]
    for enum in enums:
        for w in enum:
            arch = w.url.rsplit("/", 1)[1].rsplit("-", 1)[0]
            e = get_weights_entry(f"torchvision:{arch}.{w.name}")
            assert e is not None, (arch, w.name)
            t = w.transforms()
            assert (e.url, e.resize_size, e.input_size[-1]) == (w.url, t.resize_size[0], t.crop_size[0])
            assert e.metrics == {"top1": w.meta["_metrics"]["ImageNet-1K"]["acc@1"],
                                 "top5": w.meta["_metrics"]["ImageNet-1K"]["acc@5"]}
            assert e.default == (w is enum.DEFAULT)


def test_weights_table_matches_timm():
    pytest.importorskip("timm")
    from timm.models import get_pretrained_cfg

    for e in (e for e in KNOWN_WEIGHTS if e.source == "timm"):
        cfg = get_pretrained_cfg(e.name)
        assert cfg is not None, e.name
        assert cfg.hf_hub_id == e.hf_repo and cfg.url.endswith("/" + e.file_name)
        assert (tuple(cfg.mean), tuple(cfg.std), tuple(cfg.input_size)) == (e.mean, e.std, e.input_size)
        assert (cfg.interpolation, cfg.num_classes) == (e.interpolation, e.num_classes)
        assert int(cfg.input_size[-1] / cfg.crop_pct) == e.resize_size
