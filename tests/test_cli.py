"""The command line, run in-process through ``resnetlab.cli.main``: output formats, exit codes, one-line errors."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys

import pytest

from conftest import assert_one_line_error, run_cli, train_argv
from resnetlab.cli import main
from resnetlab.training.engine import Trainer

# --- models --------------------------------------------------------------------------------------------------


def test_models_table_lists_resnet50_with_its_size(capsys):
    code, out, _ = run_cli(capsys, "models", "resnet50")
    assert code == 0
    header, *rows = out.strip().splitlines()
    assert header.split()[:3] == ["name", "params", "MACs"]
    row = next(r for r in rows if r.split()[0] == "resnet50")
    assert row.split()[1] == "25.56M" and "4.09G" in row and "3x224x224" in row


@pytest.mark.slow
def test_models_full_table(capsys):
    code, out, _ = run_cli(capsys, "models")
    assert code == 0
    names = [line.split()[0] for line in out.strip().splitlines()[1:]]
    assert {"resnet18", "resnet20", "resnet50", "res15"} <= set(names)


def test_models_json_parses(capsys):
    code, out, _ = run_cli(capsys, "models", "resnet5*", "--format", "json")
    assert code == 0
    rows = json.loads(out)
    by_name = {r["name"]: r for r in rows}
    assert set(by_name) == {"resnet50", "resnet50d", "resnet56"}
    assert by_name["resnet50"]["params"] == 25_557_032
    assert by_name["resnet50"]["input_size"] == [3, 224, 224]


def test_unknown_model_pattern_exits_2_naming_the_choices(capsys):
    code, out, err = run_cli(capsys, "models", "nope")
    assert code == 2 and out == ""
    assert_one_line_error(err, "'nope'", "resnet50", "resnet20")


# --- train: argument errors ----------------------------------------------------------------------------------


def test_train_unknown_arch_exits_2_naming_the_choices(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--arch", "nope", "--data", tmp_path, "--cache-dir", tmp_path / "c")
    assert code == 2
    assert_one_line_error(err, "unknown model 'nope'", "resnet20", "resnet50")


@pytest.mark.parametrize("argv, fragments", [
    (["--epochs", "0"], ["'epochs'", "0", ">= 1"]),
    (["--lr", "abc"], ["'lr'", "'abc'", "float"]),
    (["--batch-size", "-1"], ["'batch_size'", "-1", ">= 1"]),
    (["--val-fraction", "1.5"], ["'val_fraction'", "1.5", "[0, 1)"]),
    (["--label-smoothing", "2"], ["'label_smoothing'", "2", "[0, 1)"]),
    (["--channels", "2"], ["'channels'", "2", "1, 3"]),
    (["--img-size", "4"], ["'img_size'", "4", ">= 8"]),
])
def test_train_bad_values_exit_2_with_one_line(capsys, tmp_path, tiny_data, argv, fragments):
    code, _, err = run_cli(capsys, "train", "--data", tiny_data, "--out", tmp_path / "run", *argv)
    assert code == 2
    assert_one_line_error(err, "resnetlab train: error:", *fragments)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_train_bad_choice_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--optimizer", "rmsprop"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'rmsprop'" in err and "Traceback" not in err


def test_train_bad_yaml_exits_2_naming_the_file(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [3\n")
    code, _, err = run_cli(capsys, "train", "--config", bad)
    assert code == 2
    assert_one_line_error(err, str(bad), "line")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("epochs: 3\nlearning_rate: 0.1\n")
    code, _, err = run_cli(capsys, "train", "--config", unknown)
    assert code == 2
    assert_one_line_error(err, "'learning_rate'", "allowed:")


def test_train_without_data_exits_2(capsys):
    code, _, err = run_cli(capsys, "train", "--epochs", "1")
    assert code == 2
    assert_one_line_error(err, "--data")


def test_train_missing_dataset_exits_2(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--data", tmp_path / "missing", "--cache-dir", tmp_path / "c")
    assert code == 2
    assert_one_line_error(err, "dataset not found", str(tmp_path / "missing"))


# --- train: a run, an interruption and a resume --------------------------------------------------------------


def test_train_interrupt_exits_130_and_resume_finishes(capsys, tmp_path, tiny_data, monkeypatch):
    original = Trainer.train_step
    calls = {"n": 0}

    def train_step(self, xb, yb, *rest):
        calls["n"] += 1
        if calls["n"] > 4:
            raise KeyboardInterrupt
        return original(self, xb, yb, *rest)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    code, out, _ = run_cli(capsys, *train_argv(tmp_path, tiny_data, epochs=3))
    assert code == 130
    assert "interrupted at epoch 2, batch 1" in out
    monkeypatch.undo()
    code, out, _ = run_cli(capsys, "train", "--out", tmp_path / "run", "--resume", "--quiet")
    assert code == 0
    assert "resumed from" in out and "epoch 3/3" in out and "best val accuracy" in out
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3


# --- evaluate and predict --------------------------------------------------------------------------------------


def test_evaluate_prints_the_table(capsys, tmp_path, trained_run, held_out_data):
    result, _ = trained_run
    data = held_out_data
    code, out, _ = run_cli(capsys, "evaluate", result.run_dir, "--data", data, "--device", "cpu", "--out", tmp_path)
    assert code == 0
    for name in ("c0", "c1", "c2", "macro avg", "weighted avg", "precision", "recall", "f1"):
        assert name in out
    assert "top-1" in out and "on 36 samples" in out
    assert (tmp_path / "eval.json").is_file()
    code, out, _ = run_cli(capsys, "evaluate", result.run_dir, "--data", data, "--device", "cpu", "--out", tmp_path,
                           "--format", "json")
    summary = json.loads(out)
    assert code == 0 and summary["n"] == 36 and summary["top1"] > 0.8 and "confusion_matrix" not in summary


def test_predict_formats(capsys, tmp_path, trained_run):
    result, data = trained_run
    files = [data / "c0" / "0.png", data / "c1" / "0.png"]
    code, out, err = run_cli(capsys, "predict", result.run_dir, *files, "--top-k", "2", "--format", "json",
                             "--device", "cpu")
    assert code == 0 and err == ""
    rows = json.loads(out)
    assert [r["file"] for r in rows] == [str(f) for f in files]
    assert all(len(r["top_k"]) == 2 and {"label", "prob"} == set(r["top_k"][0]) for r in rows)

    code, out, _ = run_cli(capsys, "predict", result.run_dir, *files, "--top-k", "2", "--format", "csv",
                           "--device", "cpu")
    table = list(csv.reader(io.StringIO(out)))
    assert code == 0 and table[0] == ["file", "rank", "label", "prob", "error"]
    assert len(table) == 1 + 2 * 2
    assert [row[1] for row in table[1:]] == ["1", "2", "1", "2"]
    assert all(row[2] in ("c0", "c1", "c2") and 0 <= float(row[3]) <= 1 for row in table[1:])
    # the json and csv outputs agree
    assert [(r[2], float(r[3])) for r in table[1:]] == [
        (t["label"], pytest.approx(t["prob"], abs=1e-6)) for r in rows for t in r["top_k"]]

    code, out, _ = run_cli(capsys, "predict", result.run_dir, *files, "--top-k", "1", "--device", "cpu")
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 2
    assert lines[0].startswith(f"{files[0]}: ") and lines[0].count("(") == 1


def test_predict_with_a_corrupt_file_exits_1_and_reports_it(capsys, tmp_path, trained_run):
    result, data = trained_run
    bad = tmp_path / "bad.jpg"
    bad.write_text("not a jpeg")
    code, out, err = run_cli(capsys, "predict", result.run_dir, data / "c0" / "0.png", bad, "--format", "csv",
                             "--device", "cpu")
    assert code == 1
    table = list(csv.reader(io.StringIO(out)))
    bad_rows = [row for row in table[1:] if row[0] == str(bad)]
    assert len(bad_rows) == 1 and bad_rows[0][4]  # an error column, and no ranks for it
    assert len(table) == 1 + 3 + 1
    assert_one_line_error(err, "1 of 2 files could not be read")


def test_missing_run_dir_exits_2_with_one_line(capsys, tmp_path, trained_run):
    _, data = trained_run
    missing = tmp_path / "no-such-run"
    code, _, err = run_cli(capsys, "predict", missing, data / "c0" / "0.png")
    assert code == 2
    assert_one_line_error(err, "resnetlab predict: error:", str(missing))
    code, _, err = run_cli(capsys, "evaluate", missing, "--data", data)
    assert code == 2
    assert_one_line_error(err, "resnetlab evaluate: error:", str(missing))


def test_predict_missing_input_exits_2(capsys, tmp_path, trained_run):
    result, _ = trained_run
    code, _, err = run_cli(capsys, "predict", result.run_dir, tmp_path / "nope.png")
    assert code == 2
    assert_one_line_error(err, "input not found", str(tmp_path / "nope.png"))


# --- the module entry point --------------------------------------------------------------------------------------


def test_python_m_resnetlab_help_lists_the_subcommands():
    proc = subprocess.run([sys.executable, "-m", "resnetlab", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for cmd in ("models", "train", "evaluate", "predict", "demo"):
        assert cmd in proc.stdout
    assert "examples:" in proc.stdout


# --- the flag names of timm's train.py and torchvision's reference scripts ------------------------------------


def test_familiar_flag_aliases_parse_as_the_long_options():
    from resnetlab.cli import _parser

    familiar = ["--model", "resnet18", "-b", "32", "-j", "3", "--opt", "adamw", "--sched", "cosine", "--output",
                "runs/o", "--clip-grad", "1.5", "--smoothing", "0.2", "--model-ema-decay", "0.99"]
    ours = ["--arch", "resnet18", "--batch-size", "32", "--workers", "3", "--optimizer", "adamw", "--schedule",
            "cosine", "--out", "runs/o", "--grad-clip", "1.5", "--label-smoothing", "0.2", "--ema", "0.99"]
    for command in ("train", "finetune"):
        a, b = _parser().parse_args([command, *familiar]), _parser().parse_args([command, *ours])
        assert vars(a) == vars(b) and (a.arch, a.batch_size, a.workers) == ("resnet18", "32", "3")  # coerced later
    assert _parser().parse_args(["train", "--sched", "onecycle"]).schedule == "onecycle"  # the old name still reads
    assert _parser().parse_args(["train", "--resume"]).resume is True  # still a bare switch (with --out)
    assert _parser().parse_args(["train", "--no-resume"]).resume is False
    assert _parser().parse_args(["train", "--resume", "runs/x"]).resume == "runs/x"


def test_resume_takes_the_run_dir_or_its_last_checkpoint(capsys, tmp_path, trained_run):
    from resnetlab.api import resume_target

    run = tmp_path / "run"
    for given in (run, run / "checkpoints" / "last.safetensors"):
        options = {"resume": str(given)}
        resume_target(options)
        assert options == {"resume": True, "out": str(run)}
    with pytest.raises(ValueError, match="finetune --pretrained"):  # best has no optimizer state to continue
        resume_target({"resume": str(run / "checkpoints" / "best.safetensors")})
    with pytest.raises(ValueError, match="name different runs"):
        resume_target({"resume": str(run), "out": str(tmp_path / "other")})
    shutil.copytree(trained_run[0].run_dir, run)  # a finished run: the resumed one only re-reads and reports
    code, out, err = run_cli(capsys, "train", "--resume", run / "checkpoints" / "last.safetensors", "--device", "cpu")
    assert code == 0 and "resumed from" in out + err, out + err
