"""`resnetlab experiment degradation`: plain and residual nets trained the same way, compared in plots."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_options
from resnetlab.cli import main
from resnetlab.experiments.degradation import run_degradation


def test_degradation_trains_four_nets_and_writes_the_comparison(tiny_data, tmp_path):
    opts = tiny_options(tmp_path, epochs=1)
    for key in ("arch", "out", "epochs", "quiet"):
        opts.pop(key, None)
    summary = run_degradation(str(tiny_data), depths=(20, 32), epochs=1, out=tmp_path / "exp", log=lambda m: None,
                              **opts)
    assert set(summary) == {"plain20", "plain32", "resnet20", "resnet32", "findings"}
    for name in ("plain20", "plain32", "resnet20", "resnet32"):
        assert 0.0 <= summary[name]["final_train_error"] <= 1.0
        assert summary[name]["stem_grad_norm"] > 0
    for png in ("train_error.png", "val_error.png", "grad_norms_stem.png"):
        assert (tmp_path / "exp" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "exp" / "summary.json").read_text())
    assert saved["findings"].keys() == {"plain_degrades", "residual_improves"}


@pytest.mark.parametrize("depths", [["56", "20"], ["20", "21"]])
def test_bad_depths_exit_2_with_one_line(depths, capsys):
    assert main(["experiment", "degradation", "--depths", *depths, "--out", "/nonexistent/x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("depths" in err[0] or "plain21" in err[0])
