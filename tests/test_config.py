"""TrainConfig: coercion and validation of values, YAML loading, precedence, and the CLI options it generates."""

from __future__ import annotations

import dataclasses

import pytest

import resnetlab
from conftest import tiny_options
from resnetlab.api import build_config
from resnetlab.cli import main
from resnetlab.training.config import TrainConfig, coerce, inert_options, load_yaml, make_config


@pytest.mark.parametrize("key, raw, expected", [
    ("epochs", "3", 3),
    ("epochs", 3.0, 3),
    ("lr", "1e-3", 0.001),
    ("lr", 2, 2.0),
    ("label_smoothing", "0", 0.0),
    ("flip", "no", False),
    ("flip", "Off", False),
    ("flip", "true", True),
    ("flip", "1", True),
    ("deterministic", True, True),
    ("mean", "0.5,0.25 0.125", [0.5, 0.25, 0.125]),
    ("mean", [1, "2"], [1.0, 2.0]),
    ("snr_db", ("5", 10), [5.0, 10.0]),
    ("optimizer", "adamw", "adamw"),
    ("data", "builtin:digits", "builtin:digits"),
    ("arch", None, None),
    ("img_size", None, None),
])
def test_coerce_converts_values(key, raw, expected):
    value = coerce(TrainConfig, key, raw)
    assert value == expected
    assert type(value) is type(expected)
    if isinstance(value, list):
        assert all(type(v) is float for v in value)


@pytest.mark.parametrize("key, raw, fragment", [
    ("epochs", "3.5", "expected int"),
    ("epochs", True, "expected int"),
    ("epochs", "three", "expected int"),
    ("lr", "abc", "expected float"),
    ("lr", "nan", "expected float"),
    ("lr", False, "expected float"),
    ("flip", "maybe", "expected bool"),
    ("flip", 2, "expected bool"),
    ("mean", "a,b", "expected list"),
    ("optimizer", "rmsprop", "allowed: sgd, adamw"),
    ("schedule", "exponential", "allowed: linear, cosine, constant, step"),
    ("precision", "int8", "allowed: auto, fp32, bf16, fp16"),
    ("optimizer", None, "cannot be empty"),
])
def test_coerce_rejects_bad_values_naming_key_and_value(key, raw, fragment):
    with pytest.raises(ValueError) as err:
        coerce(TrainConfig, key, raw)
    msg = str(err.value)
    assert repr(key) in msg
    assert fragment in msg
    assert "\n" not in msg


@pytest.mark.parametrize("key, value, allowed", [
    ("epochs", 0, ">= 1"),
    ("epochs", -3, ">= 1"),
    ("batch_size", -1, ">= 1"),
    ("lr", 0, "> 0"),
    ("lr", -0.1, "> 0"),
    ("img_size", 4, ">= 8"),
    ("channels", 2, "allowed: 1, 3"),
    ("val_fraction", 1.0, "[0, 1)"),
    ("val_fraction", -0.1, "[0, 1)"),
    ("label_smoothing", 1.0, "[0, 1)"),
    ("momentum", 1.5, "[0, 1)"),
    ("weight_decay", -1e-4, ">= 0"),
    ("warmup_epochs", -1, ">= 0"),
    ("ema", 1.0, "[0, 1)"),
    ("grad_clip", -1, ">= 0"),
    ("drop_rate", 1.0, "[0, 1)"),
    ("cutout", -2, ">= 0"),
    ("mixup", -0.2, ">= 0"),
    ("noise_prob", 1.5, "[0, 1]"),
    ("grad_norm_every", -1, ">= 0"),
])
def test_out_of_range_values_are_refused_with_the_allowed_range(key, value, allowed):
    with pytest.raises(ValueError) as err:
        make_config(TrainConfig, {key: value})
    msg = str(err.value)
    assert repr(key) in msg and repr(value) in msg and allowed in msg
    with pytest.raises(ValueError):  # the dataclass itself checks too, not only the parsing layer
        TrainConfig(**{key: value})


def test_in_range_edge_values_are_accepted():
    cfg = make_config(TrainConfig, {"epochs": 1, "batch_size": 1, "val_fraction": 0.0, "label_smoothing": 0.0,
                                    "ema": 0.0, "img_size": 8, "channels": 1, "noise_prob": 1.0})
    assert (cfg.epochs, cfg.batch_size, cfg.val_fraction, cfg.img_size) == (1, 1, 0.0, 8)
    # dataclasses.replace re-runs the checks
    with pytest.raises(ValueError, match="'epochs'"):
        dataclasses.replace(cfg, epochs=0)


def test_unknown_key_names_the_key_and_lists_allowed_ones():
    with pytest.raises(ValueError) as err:
        make_config(TrainConfig, {"epochs": 2}, {"learning_rate": 0.1})
    msg = str(err.value)
    assert "'learning_rate'" in msg
    assert "allowed:" in msg
    for f in dataclasses.fields(TrainConfig):
        assert f.name in msg


def test_bad_yaml_names_the_file_and_the_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 3\nlr: 0.1\nmean: [0.5, 0.5\nseed: 2\n")
    with pytest.raises(ValueError) as err:
        load_yaml(path)
    msg = str(err.value)
    assert str(path) in msg
    assert "line 4" in msg  # where the parser found the unclosed list
    assert "\n" not in msg


def test_yaml_that_is_not_a_mapping_or_missing(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must be a mapping"):
        load_yaml(path)
    with pytest.raises(ValueError, match="cannot read config"):
        load_yaml(tmp_path / "missing.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert load_yaml(tmp_path / "empty.yaml") == {}


def test_yaml_keys_accept_dashes(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("batch-size: 16\nlabel_smoothing: 0.2\n")
    cfg = build_config(path)
    assert cfg.batch_size == 16 and cfg.label_smoothing == 0.2


def test_precedence_defaults_then_yaml_then_options(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 7\nlr: 0.1\noptimizer: adamw\nflip: false\n")
    cfg = build_config(path, lr=0.5, epochs=None)  # None: "not given", so the YAML value stays
    assert cfg.lr == 0.5  # option beats YAML
    assert cfg.epochs == 7  # YAML beats default
    assert cfg.optimizer == "adamw" and cfg.flip is False
    assert cfg.momentum == TrainConfig().momentum  # default where neither says anything
    assert cfg.batch_size is None


def _cli_config(monkeypatch, argv: list[str]) -> TrainConfig:
    """The config ``resnetlab ARGV`` builds, stopped before any data is read."""
    import resnetlab.api

    seen = {}

    class Stop(Exception):
        pass

    def capture(cfg, log=print):
        seen["cfg"] = cfg
        raise Stop

    monkeypatch.setattr(resnetlab.api, "prepare_run", capture)
    with pytest.raises(Stop):
        main(argv)
    return seen["cfg"]


def test_cli_precedence_defaults_then_yaml_then_command_line(tmp_path, monkeypatch):
    """``resnetlab train --config f.yaml --lr X`` builds the config the same way (stopped before any data)."""
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 7\nlr: 0.1\nbatch_size: 16\nflip: true\n")
    cfg = _cli_config(monkeypatch, ["train", "--config", str(path), "--lr", "0.5", "--no-flip", "--data", "somewhere",
                                    "--mean", "0.1", "0.2", "0.3"])
    assert (cfg.lr, cfg.epochs, cfg.batch_size, cfg.flip) == (0.5, 7, 16, False)
    assert cfg.mean == [0.1, 0.2, 0.3]
    assert cfg.weight_decay is None and cfg.optimizer == "sgd"


def test_train_help_lists_every_config_field(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--config" in out
    for f in dataclasses.fields(TrainConfig):
        opt = "--" + f.name.replace("_", "-")
        assert opt in out, f"{opt} missing from `resnetlab train --help`"
        if f.type in ("bool", "bool | None"):
            assert "--no-" + f.name.replace("_", "-") in out


def test_time_budget_is_refused_for_phased_fine_tuning_before_anything_runs():
    from resnetlab.training.config import FinetuneConfig

    assert FinetuneConfig(strategy="full", time_budget=5.0).time_budget == 5.0
    with pytest.raises(ValueError, match="single-phase strategies .*'lp-ft' trains in phases"):
        FinetuneConfig(time_budget=5.0)


def test_options_that_do_nothing_in_the_config_are_named():
    assert inert_options(TrainConfig()) == []
    assert inert_options(TrainConfig(optimizer="muon", muon_lr=0.3, flip_mode="alternate")) == []
    assert inert_options(TrainConfig(muon_lr=0.3, muon_momentum=0.7)) == [
        "--muon-lr 0.3 has no effect without --optimizer muon",
        "--muon-momentum 0.7 has no effect without --optimizer muon"]
    assert inert_options(TrainConfig(flip=False, flip_mode="alternate")) == [
        "--flip-mode alternate has no effect without --flip"]


def test_train_says_when_an_option_does_nothing(tmp_path, tiny_data, capsys):
    resnetlab.train(str(tiny_data), **tiny_options(tmp_path, epochs=1, muon_lr=0.3))
    assert "note: --muon-lr 0.3 has no effect without --optimizer muon" in capsys.readouterr().err


def test_the_linear_schedule_is_also_read_under_its_old_name_onecycle(tmp_path, monkeypatch, capsys):
    """``onecycle`` (linear warm-up then linear decay to 0) is now ``linear``; old configs, old run directories
    (resume reads their config.yaml) and old command lines still work, and resolve to the new name."""
    from resnetlab.training.optim import lr_at

    assert TrainConfig().schedule == "linear"
    assert TrainConfig(schedule="onecycle").schedule == "linear"
    assert coerce(TrainConfig, "schedule", "onecycle") == "linear"
    (tmp_path / "config.yaml").write_text("schedule: onecycle\nepochs: 2\n")
    assert make_config(TrainConfig, load_yaml(tmp_path / "config.yaml")).schedule == "linear"
    assert [lr_at(s, 10, 0, "linear") for s in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])
    assert _cli_config(monkeypatch, ["train", "--data", "somewhere", "--schedule", "onecycle"]).schedule == "linear"
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "{linear,cosine,constant,step}" in capsys.readouterr().out
