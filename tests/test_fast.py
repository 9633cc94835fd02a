"""FastResNet (whitening stem, conv-pool residual stages) and the fast-training options around it: the model's
data-dependent initialisation and lr multipliers in training, lookahead, validation every N epochs and
flip-shift test-time augmentation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import resnetlab
from conftest import FakeClock, assert_one_line_error, run_cli, tiny_options, train_argv
from resnetlab.models.fast import FastResNet
from resnetlab.training.checkpoint import read_checkpoint
from resnetlab.training.inference import _tta_views, tta_mode


def _quiet(msg: str) -> None:
    pass


def _metrics(run_dir) -> list[dict]:
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]


# --- the model ------------------------------------------------------------------------------------------------


def test_shapes_stem_and_frozen_scales():
    m = resnetlab.create_model("fastresnet_s", num_classes=7)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert m.conv1.weight.shape == (24, 3, 2, 2) and not m.conv1.weight.requires_grad  # 2 x 3 x 2 x 2 filters
    assert m.conv1.bias.requires_grad
    bns = [mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d)]
    assert len(bns) == 6 and all(not b.weight.requires_grad and b.bias.requires_grad for b in bns)
    assert m.stage_names == ["layer1", "layer2", "layer3"] and m.num_features == 256
    gray = FastResNet((16, 32), num_classes=0, in_chans=1)
    assert gray.conv1.weight.shape == (8, 1, 2, 2)
    assert gray(torch.randn(3, 1, 28, 28)).shape == (3, 32)  # num_classes=0: pooled features


def test_too_small_input_is_a_clear_error():
    m = resnetlab.create_model("fastresnet_s", num_classes=10)
    assert m.min_input_size == 9
    m(torch.randn(2, 3, 9, 9))
    with pytest.raises(ValueError, match="at least 9 px"):
        m(torch.randn(1, 3, 8, 8))


def test_convs_start_as_the_identity_and_plain_has_no_sums():
    m = resnetlab.create_model("fastresnet", num_classes=10)
    w = m.layer2.conv2.weight  # 256 -> 256: the identity on every channel
    assert torch.equal(w[:, :, 1, 1], torch.eye(256)) and float(w.detach().sum()) == 256.0
    w = m.layer1.conv1.weight  # 24 -> 64: the identity on the first 24 outputs, random beyond
    assert torch.equal(w[:24, :, 1, 1], torch.eye(24)) and float(w[24:].detach().abs().sum()) > 0
    x = torch.randn(2, 3, 32, 32)
    plain = resnetlab.create_model("fastplain", num_classes=10)
    assert all(not getattr(plain, s).residual for s in plain.stage_names)
    plain.load_state_dict(m.state_dict())  # same parameters, different function
    m.eval(), plain.eval()
    assert not torch.allclose(m(x), plain(x))


def test_init_from_data_whitens_patches():
    torch.manual_seed(0)
    # strongly correlated pixels: smooth images with unequal channel scales
    x = torch.nn.functional.avg_pool2d(torch.randn(400, 3, 36, 36), 5, 1) * torch.tensor([1.0, 3.0, 0.5])[:, None,
                                                                                                        None]
    m = FastResNet((8, 8, 8), num_classes=2)
    m.init_from_data(x)
    w = m.conv1.weight
    assert torch.equal(w[:12], -w[12:])  # each filter and its negation
    with torch.no_grad():
        out = torch.nn.functional.conv2d(x, w[:12])  # the whitened patches, without the (zero) bias
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12).double()
    cov = flat.T @ flat / len(flat)
    off = cov - torch.diag(cov.diagonal())
    assert off.abs().max() < 0.02  # decorrelated
    # unit variance along the strong directions; the weakest ones stay below 1 (eps keeps noise from blowing up)
    assert (cov.diagonal()[:6] - 1).abs().max() < 0.05 and cov.diagonal().max() < 1.01, cov.diagonal()
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        m.init_from_data(torch.randn(4, 1, 8, 8))


# --- in training ----------------------------------------------------------------------------------------------


def test_training_initialises_the_stem_and_uses_the_models_lr_multipliers(tmp_path, tiny_data, monkeypatch):
    from resnetlab.training import engine

    seen = {}
    original = engine.build_optimizer

    def spy(groups, *args, **kwargs):
        seen["groups"] = groups
        return original(groups, *args, **kwargs)

    monkeypatch.setattr(engine, "build_optimizer", spy)
    logs = []
    result = resnetlab.train(str(tiny_data), log=logs.append, **tiny_options(tmp_path, arch="fastresnet_s",
                                                                            epochs=1))
    assert any("initialised FastResNet's stem from 12 training samples" in m for m in logs)
    tensors, _ = read_checkpoint(Path(result.run_dir) / "checkpoints" / "last.safetensors")
    w = tensors["model.conv1.weight"]
    assert torch.equal(w[:12], -w[12:])  # the whitening filters, kept frozen through training
    fast = {n for g in seen["groups"] if g["lr_mult"] == 64.0 for n in g["names"]}
    assert fast == {"conv1.bias"} | {f"layer{i}.bn{j}.bias" for i in (1, 2, 3) for j in (1, 2)}
    assert all(g["lr_mult"] == 1.0 for g in seen["groups"] if "fc.weight" in g["names"])


def test_resume_keeps_the_trained_stem_and_a_run_killed_before_its_first_checkpoint_gets_one(tmp_path, tiny_data):
    opts = tiny_options(tmp_path, arch="fastresnet_s", epochs=1)
    resnetlab.train(str(tiny_data), log=_quiet, **opts)
    last = Path(opts["out"]) / "checkpoints" / "last.safetensors"
    first, _ = read_checkpoint(last)
    # the saved schedule says 1 epoch: resuming it trains nothing more and keeps the stem it trained with
    resnetlab.train(out=opts["out"], resume=True, quiet=True, log=_quiet)
    assert torch.equal(first["model.conv1.weight"], read_checkpoint(last)[0]["model.conv1.weight"])
    # killed after writing config.yaml, before any checkpoint: the resumed run starts over, whitened
    for f in (Path(opts["out"]) / "checkpoints").iterdir():
        f.unlink()
    (Path(opts["out"]) / "metrics.jsonl").unlink()
    resnetlab.train(out=opts["out"], resume=True, quiet=True, log=_quiet)
    w = read_checkpoint(last)[0]["model.conv1.weight"]
    assert torch.equal(w[:12], -w[12:]) and float(w.abs().sum()) > 0


def test_init_sees_the_training_samples_normalised(tmp_path, tiny_data, monkeypatch):
    from resnetlab.api import build_config, prepare_run

    seen = []
    monkeypatch.setattr(FastResNet, "init_from_data", lambda self, x: seen.append(x.clone()))
    opts = tiny_options(tmp_path, arch="fastresnet_s", epochs=1)
    resnetlab.train(str(tiny_data), log=_quiet, **opts)
    _, _, prepared, pipeline = prepare_run(build_config(None, data=str(tiny_data), **opts), _quiet)
    everything, _ = pipeline(torch.from_numpy(prepared.train.x[:].copy()), None, train=False)
    assert len(prepared.train) == 12 and torch.equal(seen[0], everything)  # small data: all of it, every class


def test_init_sample_indices_are_spread():
    from resnetlab.api import init_indices

    idx = init_indices(50_000, (3, 32, 32))
    assert len(idx) == 5000 and idx[0] == 0 and idx[-1] == 49_999 and (np.diff(idx) > 0).all()
    assert len(init_indices(12, (3, 32, 32))) == 12
    assert len(init_indices(50_000, (3, 224, 224))) == 5000 * 3 * 32 * 32 // (3 * 224 * 224)


def test_model_lr_multipliers_apply_only_when_training_from_scratch(tmp_path, tiny_data):
    from resnetlab.training.engine import Phase, Trainer

    scratch = _bare_trainer(tmp_path, tiny_data, Trainer, arch="fastresnet_s")
    assert scratch.model_lr_mult == {"layer*.bn*.bias": 64.0, "conv1.bias": 64.0}
    tuned = _bare_trainer(tmp_path, tiny_data, Trainer, arch="fastresnet_s", phases=[Phase("fine-tune", 2)])
    tuned._enter_phase(0)
    assert tuned.model_lr_mult == {} and {g["lr_mult"] for g in tuned.opt.param_groups} == {1.0}


def test_progressive_resizing_stops_at_the_models_smallest_input(tmp_path, tiny_data):
    logs = []
    result = resnetlab.train(str(tiny_data), log=logs.append, **tiny_options(
        tmp_path, arch="fastresnet_s", epochs=2, progressive_resize=0.25))
    assert result.best_acc >= 0
    assert any("training images at 12x12 px, growing to 16x16" in m for m in logs), logs


def test_set_train_scale_min_side():
    from resnetlab.data.image_pipeline import ImagePipeline

    pipe = ImagePipeline((32, 32), 3, [0.5] * 3, [0.25] * 3, 10)
    pipe.set_train_scale(0.25)
    assert pipe.train_size == (8, 8)
    pipe.set_train_scale(0.25, min_side=9)
    assert pipe.train_size == (12, 12)  # rounded up to a multiple of 4
    pipe.set_train_scale(0.9, min_side=9)
    assert pipe.train_size == (28, 28)


def test_lookahead_pulls_weights_to_the_slow_copy_and_is_saved(tmp_path, tiny_data):
    result = resnetlab.train(str(tiny_data), log=_quiet, **tiny_options(tmp_path, epochs=4, lookahead=True))
    tensors, meta = read_checkpoint(Path(result.run_dir) / "checkpoints" / "last.safetensors")
    assert meta["step"] == 12
    slow = {k[len("lookahead."):]: v for k, v in tensors.items() if k.startswith("lookahead.")}
    model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    assert slow and set(slow) == {k for k, v in model.items() if v.is_floating_point()}
    # the last sync was at step 10; two plain steps followed, so the weights moved on from the slow copy
    name = "conv1.weight"
    assert not torch.equal(slow[name], model[name])


def test_lookahead_math(tmp_path, tiny_data):
    """alpha = 0.95^5 x progress^3: at progress 0 the slow copy jumps to the weights, later it lags behind."""
    from resnetlab.training.engine import Trainer

    trainer = _bare_trainer(tmp_path, tiny_data, Trainer)
    p = next(trainer.model.parameters())
    slow_key = next(k for k, v in trainer.model.state_dict().items() if v.data_ptr() == p.data_ptr())
    with torch.no_grad():
        p.add_(1.0)
    trainer._lookahead()  # progress 0: alpha 0
    assert torch.equal(trainer.slow[slow_key], p)
    start = p.detach().clone()
    trainer.step = trainer.total_epochs * trainer.steps_per_epoch // 2  # progress 1/2: alpha = 0.95^5 / 8
    with torch.no_grad():
        p.add_(1.0)
    trainer._lookahead()
    alpha = 0.95 ** 5 / 8
    assert torch.allclose(p, start + (1 - alpha), atol=1e-6)  # the weights restart from the slow copy
    assert torch.equal(trainer.slow[slow_key], p)


def _bare_trainer(tmp_path, data, trainer_cls, arch="resnet20", phases=None):
    from resnetlab.api import build_config, prepare_run
    from resnetlab.data.loader import ArrayLoader
    from resnetlab.training.precision import pick_precision

    cfg = build_config(None, data=str(data), **tiny_options(tmp_path, epochs=2, lookahead=True))
    cfg, device, prepared, pipeline = prepare_run(cfg, _quiet)
    loader = ArrayLoader(prepared.train.x, prepared.train.y, cfg.batch_size, shuffle=True, drop_last=True)
    prec = pick_precision(device, "fp32", False, 2)
    model = resnetlab.create_model(arch, num_classes=3)
    return trainer_cls(model, pipeline, loader, None, cfg, tmp_path / "bare", {}, prec, phases=phases, log=_quiet)


@pytest.mark.parametrize("every, validated", [(2, [False, True, False, True, True]), (0, [False] * 4 + [True])])
def test_val_every_validates_every_nth_and_the_last_epoch(tmp_path, tiny_data, every, validated):
    result = resnetlab.train(str(tiny_data), log=_quiet, **tiny_options(tmp_path, epochs=5, val_every=every))
    records = _metrics(result.run_dir)
    assert ["val_acc" in r for r in records] == validated
    assert result.best_epoch in [i + 1 for i, v in enumerate(validated) if v]
    assert result.best_acc == max(r["val_acc"] for r in records if "val_acc" in r)
    assert (Path(result.run_dir) / "report" / "curves.png").is_file()


def test_a_budget_spent_after_an_unvalidated_epoch_still_validates_it(tmp_path, tiny_data, monkeypatch):
    from resnetlab.training import engine
    from resnetlab.training.engine import Trainer

    clock = FakeClock(0.01)
    monkeypatch.setattr(engine, "time", clock)
    original = Trainer.save_last

    def save_last(self):  # the end of epoch 1 (its checkpoint) spends the rest of the budget
        original(self)
        if self.epoch == 1 and self.batch_in_epoch == 0:
            clock.now += 1000.0

    monkeypatch.setattr(Trainer, "save_last", save_last)
    result = resnetlab.train(str(tiny_data), log=_quiet, **tiny_options(tmp_path, epochs=None, time_budget=0.2,
                                                                         val_every=0))
    records = _metrics(result.run_dir)
    assert len(records) == 1 and "batches" not in records[0]  # a whole epoch, not cut by the budget
    assert "val_acc" in records[0] and result.best_acc == records[0]["val_acc"] and result.best_epoch == 1
    assert (Path(result.run_dir) / "checkpoints" / "best.safetensors").is_file()


# --- test-time augmentation ---------------------------------------------------------------------------------


def test_tta_modes_and_views():
    assert tta_mode(True) == "flip" and tta_mode(False) is None and tta_mode("flip-shift") == "flip-shift"
    with pytest.raises(ValueError, match="allowed: flip, flip-shift"):
        tta_mode("rotate")
    x = torch.arange(2 * 3 * 5 * 6, dtype=torch.float32).reshape(2, 3, 5, 6)
    views = _tta_views(x, "flip-shift")
    assert len(views) == 6 and sum(w for _, w in views) == pytest.approx(1.0)
    assert all(v.shape == x.shape for v, _ in views)
    up_left, down_right = views[2][0], views[4][0]
    # content moved by one pixel: the interior of the shifted view is the original one pixel away
    assert torch.equal(up_left[..., 1:, 1:], x[..., :-1, :-1])
    assert torch.equal(down_right[..., :-1, :-1], x[..., 1:, 1:])
    assert torch.equal(views[3][0], up_left.flip(-1))
    assert len(_tta_views(x, "flip")) == 2
    assert len(_tta_views(torch.zeros(2, 40, 101), "flip-shift")) == 2  # 1-D inputs: flip only


def test_evaluate_with_flip_shift_tta(trained_run, held_out_data, capsys):
    result, _ = trained_run
    data = held_out_data
    plain = resnetlab.evaluate(result.run_dir, str(data), log=_quiet, out=str(result.run_dir / "eval-plain"))
    shifted = resnetlab.evaluate(result.run_dir, str(data), tta="flip-shift", log=_quiet,
                                 out=str(result.run_dir / "eval-tta"))
    assert shifted["tta"] == "flip-shift" and plain["tta"] is False
    # on images the run never saw, the averaged views keep it accurate (chance: 1/3)
    assert shifted["n"] == plain["n"] == 36 and plain["top1"] > 0.8 and shifted["top1"] > 0.8
    code, out, err = run_cli(capsys, "evaluate", result.run_dir, "--data", data, "--tta-shift", "--out",
                             result.run_dir / "eval-cli")
    assert code == 0 and "(TTA flip-shift)" in out
    code, out, err = run_cli(capsys, "evaluate", "--tta", result.run_dir, "--data", data, "--out",
                             result.run_dir / "eval-cli")  # a switch: the run directory may follow it
    assert code == 0 and "(TTA flip)" in out
    with pytest.raises(ValueError, match="unknown test-time augmentation 'rotate'"):
        resnetlab.evaluate(result.run_dir, str(data), tta="rotate", log=_quiet)


def test_fast_flags_on_the_cli(tmp_path, tiny_data, capsys):
    code, out, err = run_cli(capsys, *train_argv(tmp_path, tiny_data, arch="fastresnet_s", epochs=2, lookahead=True,
                                                 val_every=0))
    assert code == 0, err
    records = _metrics(tmp_path / "run")
    assert ["val_acc" in r for r in records] == [False, True]
    code, out, err = run_cli(capsys, *train_argv(tmp_path, tiny_data, val_every=-1, out=str(tmp_path / "bad")))
    assert code == 2
    assert_one_line_error(err, "val_every", "-1")
    assert not (tmp_path / "bad").exists()


def test_finetune_onto_other_channels_whitens_a_new_stem(tmp_path, tiny_data):
    from conftest import write_class_folders

    run = resnetlab.train(str(tiny_data), log=_quiet, **tiny_options(tmp_path, arch="fastresnet_s", epochs=1))
    gray = write_class_folders(tmp_path / "gray", per_class=6, channels=1)
    logs = []
    opts = {k: v for k, v in tiny_options(tmp_path, out=str(tmp_path / "ft"), epochs=1).items() if k != "arch"}
    result = resnetlab.finetune(str(gray), pretrained=str(run.run_dir), strategy="linear-probe", log=logs.append,
                                **opts)
    assert any("initialised FastResNet's stem" in m for m in logs)  # the RGB stem cannot whiten gray images
    w = read_checkpoint(Path(result.run_dir) / "checkpoints" / "last.safetensors")[0]["model.conv1.weight"]
    assert w.shape == (8, 1, 2, 2) and torch.equal(w[:4], -w[4:])
    same = resnetlab.finetune(str(tiny_data), pretrained=str(run.run_dir), strategy="linear-probe", log=logs.append,
                              **{**opts, "out": str(tmp_path / "ft-rgb")})
    assert same.best_acc >= 0
    assert sum("initialised" in m for m in logs) == 1  # the RGB stem loaded as it was: not re-initialised
