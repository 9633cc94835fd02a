"""``--optimizer muon``: Muon for the stages' filters, Nesterov SGD for the rest, in one optimizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import resnetlab
from conftest import assert_one_line_error, run_cli, tiny_options, train_argv, write_class_folders
from resnetlab.models.registry import create_model
from resnetlab.training.checkpoint import read_checkpoint
from resnetlab.training.optim import Muon, build_optimizer, orthogonalize, param_groups, set_lr


def _quiet(msg: str) -> None:
    pass


@pytest.mark.parametrize("shape", [(16, 72), (72, 16), (32, 32)], ids=["wide", "tall", "square"])
def test_orthogonalize_gives_a_near_orthogonal_matrix_in_the_gradient_direction(shape):
    torch.manual_seed(0)
    g = torch.randn(shape) @ torch.diag(torch.logspace(0, 1, shape[1]))  # condition number 10
    o = orthogonalize(g)
    assert o.shape == g.shape and o.dtype == g.dtype
    sv = torch.linalg.svdvals(o)
    assert sv.min() > 0.5 and sv.max() < 1.3, sv  # Muon's quintic iteration: singular values in about [0.7, 1.2]
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    assert torch.nn.functional.cosine_similarity((u @ vh).flatten(), o.flatten(), dim=0) > 0.95


def test_muon_takes_the_stages_filters_and_leaves_stem_head_and_norms_to_sgd():
    model = create_model("resnet20", num_classes=10)
    opt = build_optimizer(param_groups(model, 5e-4, 0.1), "muon", 0.1, 0.9, muon_lr=0.3, muon_momentum=0.5,
                          stage_names=model.stage_names)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.param_groups if g["muon"] for p in g["params"]}
    other = {names[id(p)] for g in opt.param_groups if not g["muon"] for p in g["params"]}
    assert muon == {n for n, p in model.named_parameters() if p.ndim == 4 and n.startswith("layer")}
    assert {"conv1.weight", "fc.weight", "fc.bias", "bn1.weight", "layer1.0.bn1.bias"} <= other
    assert not muon & other and len(muon | other) == len(list(model.parameters()))
    for g in opt.param_groups:
        assert (g["lr"], g["momentum"], g["weight_decay"]) == ((0.3, 0.5, 0.0) if g["muon"] else
                                                               (0.1, 0.9, g["weight_decay"]))
    set_lr(opt, 0.1, 0.5)  # the schedule moves both parts in proportion
    assert sorted({round(g["lr"], 9) for g in opt.param_groups}) == [0.05, 0.15]


def test_muon_sgd_groups_make_torch_sgds_update_and_muon_groups_an_orthogonal_step():
    torch.manual_seed(0)
    a, b = (torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Conv2d(8, 4, 3))
            for _ in range(2))
    b.load_state_dict(a.state_dict())
    stages = ["2"]  # the second conv is "inside a stage"; the first plays the stem
    opt = build_optimizer(param_groups(a, 5e-4, 0.1), "muon", 0.1, 0.9, muon_lr=0.2, muon_momentum=0.6,
                          stage_names=stages)
    assert isinstance(opt, Muon) and opt.defaults["fused"] is True
    rest = [{k: v for k, v in g.items() if k != "names"} for g in param_groups(b, 5e-4, 0.1)]
    for g in rest:
        g["params"] = [p for p in g["params"] if p is not b[2].weight]
    reference = torch.optim.SGD([g for g in rest if g["params"]], lr=0.1, momentum=0.9, nesterov=True)
    w, buf = b[2].weight.detach().clone(), torch.zeros_like(b[2].weight)
    norm = w.norm()
    for _ in range(3):
        for pa, pb in zip(a.parameters(), b.parameters()):
            pa.grad = torch.randn_like(pa)
            pb.grad = pa.grad.clone()
        opt.step()
        reference.step()
        buf = 0.6 * buf + b[2].weight.grad  # Muon by hand: Nesterov momentum, fixed norm, orthogonal step
        update = b[2].weight.grad + 0.6 * buf
        w = w * (norm / w.norm())  # the norm it started with, and a step of 0.2 of it (in airbench's units)
        w = w - 0.2 * norm / len(w) ** 0.5 * orthogonalize(update.reshape(len(w), -1)).view_as(w)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        if name != "2.weight":
            torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a[2].weight, w, rtol=1e-4, atol=1e-5)
    # about its own scale, not sqrt(out) = 2
    assert float(a[2].weight.detach().norm()) == pytest.approx(float(norm), rel=0.3)
    assert a[2].bias is not None and "momentum_buffer" in opt.state[a[2].bias]  # the bias stays with SGD


def test_muon_trains_resumes_exactly_and_records_its_options(tmp_path, monkeypatch):
    from resnetlab.training.engine import Trainer

    data = write_class_folders(tmp_path / "data", per_class=12, seed=3)
    opts = tiny_options(tmp_path, epochs=4, lr=0.02, flip=False, deterministic=True, optimizer="muon", muon_lr=0.1,
                        out=str(tmp_path / "ref"))
    ref = resnetlab.train(str(data), log=_quiet, **opts)
    assert ref.best_acc > 0.6  # 3 classes: chance is 0.33
    cfg = (Path(ref.run_dir) / "config.yaml").read_text()
    assert "optimizer: muon" in cfg and "muon_lr: 0.1" in cfg

    original, count = Trainer.train_step, {"n": 0}

    def train_step(self, xb, yb, *rest):
        count["n"] += 1
        if count["n"] > 11:  # mid-epoch 2 (6 batches an epoch)
            raise KeyboardInterrupt
        return original(self, xb, yb, *rest)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    out = str(tmp_path / "resumed")
    assert resnetlab.train(str(data), log=_quiet, **{**opts, "out": out}).interrupted
    monkeypatch.undo()
    assert not resnetlab.train(resume=True, out=out, log=_quiet).interrupted
    a, _ = read_checkpoint(Path(ref.run_dir) / "checkpoints" / "last.safetensors")
    b, _ = read_checkpoint(Path(out) / "checkpoints" / "last.safetensors")
    keys = [k for k in a if k.startswith(("model.", "optim."))]
    assert any(k.startswith("optim.") for k in keys) and keys == [k for k in b if k.startswith(("model.", "optim."))]
    assert [k for k in keys if not torch.equal(a[k], b[k])] == []


def test_lr_find_sweeps_the_muon_part_in_proportion(tmp_path, monkeypatch):
    from resnetlab.training import optim

    data = write_class_folders(tmp_path / "data", seed=4)
    seen = []
    original = optim.set_lr

    def spy(opt, base_lr, factor):
        out = original(opt, base_lr, factor)
        seen.append({g["muon"]: g["lr"] for g in opt.param_groups})
        return out

    monkeypatch.setattr("resnetlab.training.lr_find.set_lr", spy)
    opts = tiny_options(tmp_path, optimizer="muon", lr=0.1, muon_lr=0.3)
    opts.pop("epochs")
    resnetlab.lr_find(str(data), steps=6, log=_quiet, **opts)
    assert len(seen) >= 3
    for lrs in seen:
        assert lrs[True] == pytest.approx(3 * lrs[False])


def test_cli_muon_options_and_a_bad_value(tmp_path, capsys):
    data = write_class_folders(tmp_path / "data", seed=1)
    code, _, err = run_cli(capsys, *train_argv(tmp_path, data, optimizer="muon", muon_lr=-1))
    assert code == 2
    assert_one_line_error(err, "muon_lr", "-1")
    code, _, err = run_cli(capsys, *train_argv(tmp_path, data, optimizer="muon", muon_momentum=0.8, epochs=1))
    assert code == 0, err
    assert "muon_momentum: 0.8" in (tmp_path / "run" / "config.yaml").read_text()


def test_muon_steps_tall_filters_by_lr_of_their_norm_and_zero_ones_by_sgd():
    torch.manual_seed(0)
    tall = torch.nn.Parameter(torch.randn(256, 64, 1, 1))  # a bottleneck's expanding 1x1: more rows than columns
    wide = torch.nn.Parameter(torch.randn(64, 64, 3, 3))
    zero = torch.nn.Parameter(torch.zeros(16, 8, 3, 3))  # a zero-initialised residual branch
    twin = torch.nn.Parameter(torch.zeros(16, 8, 3, 3))
    groups = [{"params": [tall, wide, zero], "names": ["layer1.a", "layer1.b", "layer1.c"], "weight_decay": 1e-3,
               "lr": 0.1, "lr_mult": 1.0}]
    opt = build_optimizer(groups, "muon", 0.1, 0.9, muon_lr=0.2, stage_names=["layer1"])
    reference = torch.optim.SGD([twin], lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    before = [p.detach().clone() for p in (tall, wide)]
    for p in (tall, wide, zero):
        p.grad = torch.randn_like(p)
    twin.grad = zero.grad.clone()
    opt.step()
    reference.step()
    steps = [float((p.detach() - b).norm() / b.norm()) for p, b in zip((tall, wide), before)]
    # about lr of the norm (Newton-Schulz leaves singular values in about [0.7, 1.2]), and alike for both shapes
    # (without the min(out, in) scaling the tall one would move half as far)
    assert all(0.12 < s < 0.24 for s in steps) and steps[0] == pytest.approx(steps[1], rel=0.2), steps
    assert zero.detach().abs().sum() > 0
    torch.testing.assert_close(zero.detach(), twin.detach())


def test_muon_build_errors_name_the_cause():
    p = torch.nn.Parameter(torch.randn(4, 4, 3, 3))
    with pytest.raises(ValueError, match="lr > 0"):
        build_optimizer([{"params": [p], "names": ["layer1.w"], "weight_decay": 0.0}], "muon", 0.0)
    with pytest.raises(ValueError, match="param_groups"):
        build_optimizer([{"params": [p], "weight_decay": 0.0}], "muon", 0.1)


def test_lp_ft_lowers_the_muon_part_with_the_rest(tmp_path, monkeypatch):
    from resnetlab.training import engine

    data = write_class_folders(tmp_path / "data", seed=2)
    pre = resnetlab.train(str(data), log=_quiet, **tiny_options(tmp_path, epochs=1, out=str(tmp_path / "pre")))
    seen = []
    original = engine.Trainer._enter_phase

    def spy(self, index):
        original(self, index)
        seen.append((self.phases[index].name, sorted({(g["muon"], round(g["lr"], 6)) for g in self.opt.param_groups})))

    monkeypatch.setattr(engine.Trainer, "_enter_phase", spy)
    opts = tiny_options(tmp_path, epochs=2, lr=0.05, optimizer="muon", muon_lr=0.2, out=str(tmp_path / "ft"))
    resnetlab.finetune(str(data), pretrained=str(pre.run_dir), strategy="lp-ft", log=_quiet, **opts)
    phases = dict(seen)
    assert phases["fine-tune"] == [(False, 0.005), (True, 0.02)]  # a tenth of each
    assert (True, 0.2) not in phases["fine-tune"]


def test_orthogonalize_takes_a_batch_of_matrices_one_by_one():
    torch.manual_seed(0)
    for shape in [(4, 6, 18), (3, 18, 6)]:
        g = torch.randn(shape)
        torch.testing.assert_close(orthogonalize(g), torch.stack([orthogonalize(m) for m in g]))


@pytest.mark.parametrize(("out", "k", "block"), [(8, 3, (2, 18)), (32, 1, (8, 2))], ids=["wide", "tall"])
def test_muon_orthogonalises_a_grouped_convolution_group_by_group(out, k, block):
    """ResNeXt's grouped 3x3: 4 groups, each an independent 2 x 2*3*3 matrix; as one 8 x 18 matrix the update
    could not be orthogonal within each group (and a grouped 1x1 that widens: 8 x 2 blocks)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(8, out, k, groups=4, bias=False))
    groups = param_groups(model, 0.0, 0.1)
    assert {n: b for g in groups for n, b in zip(g["names"], g["blocks"])} == {"0.weight": 1, "0.bias": 1,
                                                                               "1.weight": 4}
    opt = build_optimizer(groups, "muon", 0.1, 0.9, muon_lr=0.2, muon_momentum=0.0, stage_names=["1"])
    w = model[1].weight
    before = w.detach().clone()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    blocks = orthogonalize(w.grad.reshape(4, *block))  # momentum 0: the update is the gradient's
    expected = before - 0.2 * before.norm() / (4 * min(block)) ** 0.5 * blocks.reshape_as(w)
    torch.testing.assert_close(w.detach(), expected, rtol=1e-4, atol=1e-5)
    for b in (w.detach() - before).reshape(4, *block):  # each group's step: near-orthogonal
        sv = torch.linalg.svdvals(b)
        assert sv.max() / sv.min() < 1.8, sv
    step = float((w.detach() - before).norm() / before.norm())
    assert 0.12 < step < 0.24, step  # about muon_lr of the norm, as for an ungrouped filter


def test_muon_keeps_its_blocks_when_loading_a_state_without_them():
    """``blocks`` describe the model: a checkpoint from before they existed must not turn them off."""
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, groups=4, bias=False))
    opt = build_optimizer(param_groups(model, 0.0, 0.1), "muon", 0.1, muon_lr=0.2, stage_names=["0"])
    model[0].weight.grad = torch.randn_like(model[0].weight)
    opt.step()
    saved = opt.state_dict()
    old = {**saved, "param_groups": [{k: v for k, v in g.items() if k != "blocks"} for g in saved["param_groups"]]}
    fresh = build_optimizer(param_groups(model, 0.0, 0.1), "muon", 0.1, muon_lr=0.2, stage_names=["0"])
    fresh.load_state_dict(old)
    assert [g.get("blocks") for g in fresh.param_groups if g["muon"]] == [[4]]
    torch.testing.assert_close(fresh.state[model[0].weight]["momentum_buffer"],
                               opt.state[model[0].weight]["momentum_buffer"])
