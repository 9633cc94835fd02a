"""`resnetlab experiment degradation`: plain and residual nets trained the same way; the deep plain net trains worse."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_options, write_class_folders
from resnetlab.cli import main
from resnetlab.experiments.degradation import run_degradation


def test_degradation_finds_the_plain_net_trains_worse_than_the_residual_net_of_its_depth(tmp_path, monkeypatch):
    """He et al.'s finding in a setting where it holds every time: 56 layers, 18 steps of batch 8 on 8x8 images of
    4 easy classes. Measured over seeds 0-4: plain56 ends its last epoch at 54-67% training error, resnet56 at
    0-6%, plain20 at 0-10%; the margins below leave room for that spread, not for a net without shortcuts."""
    import resnetlab.report.run_report

    # each run's own report (plots of its curves, confusion, misclassified images) is not what this test is about,
    # and costs more than the training here; the experiment's comparison plots are still drawn
    monkeypatch.setattr(resnetlab.report.run_report, "write_run_report", lambda *a, **k: None)
    data = write_class_folders(tmp_path / "data", classes=4, per_class=16, size=8, seed=1)
    opts = tiny_options(tmp_path, img_size=8, batch_size=8, lr=0.02, val_fraction=0.25)
    for key in ("arch", "out", "epochs", "quiet"):
        opts.pop(key, None)
    summary = run_degradation(str(data), depths=(20, 56), epochs=3, out=tmp_path / "exp", log=lambda m: None,
                              **opts)
    err = {name: summary[name]["final_train_error"] for name in ("plain20", "plain56", "resnet20", "resnet56")}
    assert err["resnet56"] + 0.3 < err["plain56"], err  # the shortcuts make the deep net trainable
    assert err["plain20"] + 0.3 < err["plain56"], err  # without them, depth makes training worse
    assert summary["findings"] == {"plain_degrades": True, "residual_beats_plain": True,
                                   "residual_improves": err["resnet56"] <= err["resnet20"]}
    for name in err:
        assert summary[name]["stem_grad_norm"] > 0
    for png in ("train_error.png", "val_error.png", "grad_norms_stem.png"):
        assert (tmp_path / "exp" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "exp" / "summary.json").read_text())["findings"] == summary["findings"]


@pytest.mark.parametrize("depths", [["56", "20"], ["20", "21"]])
def test_bad_depths_exit_2_with_one_line(depths, capsys):
    assert main(["experiment", "degradation", "--depths", *depths, "--out", "/nonexistent/x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("depths" in err[0] or "plain21" in err[0])
