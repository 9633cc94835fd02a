"""Metrics on hand-computed examples, every plot draws its series in a PNG of the expected size, the HTML
report escapes what it shows."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from matplotlib import image as mpimg
from matplotlib.colors import to_rgb

from resnetlab.report import (
    confusion_matrix,
    dedupe_epochs,
    format_report_table,
    load_metrics,
    per_class_report,
    plot_compare,
    plot_confusion,
    plot_curves,
    plot_grad_norms,
    plot_lr_find,
    plot_misclassified,
    plot_per_class,
    plot_spectrograms,
    summary_from_confusion,
    topk_accuracy,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# --- metrics ------------------------------------------------------------------------------------------------------

# 3 samples, 4 classes. Sample 0: right at top-1. Sample 1: true class ranked 2nd. Sample 2: true class ranked last.
LOGITS = torch.tensor([[0.1, 0.5, 0.25, 0.15],
                       [0.9, 0.05, 0.03, 0.02],
                       [0.1, 0.2, 0.3, 0.4]])
TARGET = torch.tensor([1, 1, 0])


def test_topk_accuracy_hand_computed():
    acc = topk_accuracy(LOGITS, TARGET, ks=(1, 2, 3, 4))
    assert acc == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 2 / 3, 4: 1.0})


def test_topk_accuracy_k_larger_than_num_classes_is_clipped_but_keeps_its_key():
    acc = topk_accuracy(LOGITS, TARGET)  # default ks=(1, 5) on 4 classes
    assert set(acc) == {1, 5}
    assert acc[5] == 1.0
    assert topk_accuracy(LOGITS[:, :2], torch.tensor([1, 0, 0]), ks=(5,)) == {5: 1.0}


def test_topk_accuracy_soft_targets_and_empty_batch():
    onehot = torch.nn.functional.one_hot(TARGET, 4).float()
    assert topk_accuracy(LOGITS, onehot, ks=(1, 2)) == topk_accuracy(LOGITS, TARGET, ks=(1, 2))
    assert topk_accuracy(torch.empty(0, 10), torch.empty(0, dtype=torch.long)) == {1: 0.0, 5: 0.0}


def test_topk_accuracy_rejects_bad_shapes():
    with pytest.raises(ValueError, match="logits must be"):
        topk_accuracy(torch.zeros(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="target must be"):
        topk_accuracy(LOGITS, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="k must be >= 1"):
        topk_accuracy(LOGITS, TARGET, ks=(0,))


# Class 3 has no samples but is predicted once; every ratio with a zero denominator must be 0.0.
Y_TRUE = [0, 0, 1, 2, 2, 2, 1]
Y_PRED = [0, 1, 1, 2, 0, 2, 3]
CM = np.array([[1, 1, 0, 0],
               [0, 1, 0, 1],
               [1, 0, 2, 0],
               [0, 0, 0, 0]])
CLASSES = ["a", "b", "c", "d"]


def test_confusion_matrix_rows_true_cols_pred():
    cm = confusion_matrix(Y_TRUE, Y_PRED, 4)
    assert cm.dtype == np.int64 and cm.shape == (4, 4)
    np.testing.assert_array_equal(cm, CM)
    np.testing.assert_array_equal(confusion_matrix(torch.tensor(Y_TRUE), np.array(Y_PRED), 4), CM)
    np.testing.assert_array_equal(confusion_matrix([], [], 3), np.zeros((3, 3), dtype=np.int64))


def test_confusion_matrix_rejects_bad_input():
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix([0, 4], [0, 1], 4)
    with pytest.raises(ValueError, match="same length"):
        confusion_matrix([0, 1], [0], 4)


def test_per_class_report_hand_computed_with_zero_division():
    rep = per_class_report(CM, CLASSES)
    assert [r["class"] for r in rep] == CLASSES
    assert [r["support"] for r in rep] == [2, 2, 3, 0]
    assert [r["precision"] for r in rep] == pytest.approx([0.5, 0.5, 1.0, 0.0])
    assert [r["recall"] for r in rep] == pytest.approx([0.5, 0.5, 2 / 3, 0.0])
    assert [r["f1"] for r in rep] == pytest.approx([0.5, 0.5, 0.8, 0.0])
    assert all(not math.isnan(r[k]) for r in rep for k in ("precision", "recall", "f1"))


def test_summary_from_confusion_hand_computed():
    s = summary_from_confusion(CM, CLASSES)
    assert s["accuracy"] == pytest.approx(4 / 7)
    assert s["macro_f1"] == pytest.approx((0.5 + 0.5 + 0.8 + 0.0) / 4)
    assert s["weighted_f1"] == pytest.approx((0.5 * 2 + 0.5 * 2 + 0.8 * 3) / 7)
    assert s["macro_precision"] == pytest.approx(0.5)
    assert s["macro_recall"] == pytest.approx((0.5 + 0.5 + 2 / 3) / 4)
    assert s["support"] == 7 and s["num_classes"] == 4 and len(s["per_class"]) == 4
    json.dumps(s)  # JSON-ready: plain floats and ints


def test_summary_of_empty_matrix_is_all_zero():
    s = summary_from_confusion(np.zeros((3, 3), dtype=np.int64))
    assert s["accuracy"] == 0.0 and s["macro_f1"] == 0.0 and s["weighted_f1"] == 0.0
    assert [r["class"] for r in s["per_class"]] == ["0", "1", "2"]


def test_summary_rejects_mismatched_class_names():
    with pytest.raises(ValueError, match="class names"):
        summary_from_confusion(CM, ["a", "b"])


def test_format_report_table_is_fixed_width():
    text = format_report_table(summary_from_confusion(CM, ["cat", "dog", "a-very-long-class-name-indeed-yes", "d"]))
    lines = text.splitlines()
    assert "precision" in lines[0] and "support" in lines[0]
    assert any(line.startswith("macro avg") for line in lines)
    assert any(line.startswith("weighted avg") for line in lines)
    assert "0.5714" in text  # accuracy 4/7
    assert len({len(line) for line in lines}) == 1, text  # every line, long names included, has one width


def test_dedupe_epochs_last_record_wins_and_sorted():
    recs = [{"epoch": 1, "v": "a"}, {"epoch": 2, "v": "b"}, {"epoch": 2, "v": "c"}, {"epoch": 0, "v": "z"}]
    assert [r["v"] for r in dedupe_epochs(recs)] == ["z", "a", "c"]


# --- plots --------------------------------------------------------------------------------------------------------

def fake_metrics(epochs: int, val: bool = True, top5: bool = True) -> list[dict]:
    out = []
    for e in range(1, epochs + 1):
        t = e / epochs
        m = {"epoch": e, "train_loss": 2.3 * math.exp(-3 * t), "train_acc": 0.9 * (1 - math.exp(-4 * t)),
             "lr": 0.1 * (1 - t), "seconds": 12.5, "samples_per_s": 4000.0}
        if val:
            m.update(val_loss=2.3 * math.exp(-2.5 * t) + 0.2, val_acc=0.85 * (1 - math.exp(-4 * t)))
            if top5:
                m["val_top5"] = min(1.0, m["val_acc"] + 0.08)
        out.append(m)
    return out


def assert_png(path, min_side: int = 100):
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4), img.shape
    assert img.shape[0] >= min_side and img.shape[1] >= min_side, img.shape
    assert float(img[..., :3].std()) > 0.01  # not a blank canvas


def grad_history(steps: int = 60) -> list[dict]:
    rng = np.random.default_rng(0)
    stages = ["fc", "layer2", "stem", "layer10", "layer1"]  # deliberately out of order
    return [{"step": s, "epoch": s / 20, "norms": {k: float(np.exp(rng.normal(-i, 0.2))) for i, k in enumerate(stages)}}
            for s in range(steps)]


def _cases():
    """name -> (draw(path), expected (width, height) in pixels, [(colour, at least this many pixels of it)],
    colours that must not appear).

    Sizes are each figure's ``figsize`` at 110 dpi plus the margins ``bbox_inches="tight"`` adds (about 12 px);
    misclassified_rgb's captions are wider than its two 1.9-inch cells. The colours are those of the series:
    lines, markers, bars, cells, captions; each must cover about a third of the pixels it did when this test was
    written, which a legend's sample alone does not (a legend line with no series: 58 to 169 pixels)."""
    rng = np.random.default_rng(0)
    cm10 = confusion_matrix(rng.integers(0, 10, 500), rng.integers(0, 10, 500), 10)
    cm30 = confusion_matrix(rng.integers(0, 30, 900), rng.integers(0, 30, 900), 30)
    per_class = summary_from_confusion(cm10, [f"class {i}" for i in range(10)])["per_class"]
    recalls = [r["recall"] for r in per_class]
    gray = rng.integers(0, 256, (5, 1, 28, 28), dtype=np.uint8)
    rgb = rng.integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    specs = rng.normal(size=(8, 40, 101)).astype(np.float32)
    lrs = np.logspace(-6, 0, 50)
    losses = 2.3 - np.tanh(np.log10(lrs) + 3) + np.where(lrs > 0.3, 50.0, 0.0)
    blue, orange, green, red = "tab:blue", "tab:orange", "tab:green", "tab:red"
    curves = (1222, 474)
    placeholder = (672, 276)
    return {
        # train in blue, val in orange, the best epoch's marker in green
        "curves": (lambda p: plot_curves(fake_metrics(12), p), curves, [(blue, 800), (orange, 1000), (green, 90)], []),
        "curves_single_epoch": (lambda p: plot_curves(fake_metrics(1), p), curves, [(blue, 70), (orange, 90)], []),
        "curves_no_val": (lambda p: plot_curves(fake_metrics(5, val=False), p), curves, [(blue, 700)], [orange]),
        "curves_empty": (lambda p: plot_curves([], p), placeholder, [], [blue, orange]),
        # the cell of the largest fraction (Blues at that value); at most 1.0 for counts on the sqrt scale
        "confusion_10": (lambda p: plot_confusion(cm10, [f"c{i}" for i in range(9)] + ["$5 bill$^"], p), (892, 782),
                         [(colormaps["Blues"](float((cm10 / cm10.sum(1, keepdims=True)).max())), 7000)], []),
        "confusion_30_counts": (lambda p: plot_confusion(cm30, [f"c{i}" for i in range(30)], p, normalize=False),
                                (1903, 1772), [(colormaps["Blues"](1.0), 2800)], []),
        # the bars of the worst and the best class, coloured by recall
        "per_class": (lambda p: plot_per_class(per_class, p), (947, 496),
                      [(colormaps["RdYlGn"](0.15 + 0.7 * min(recalls)), 220),
                       (colormaps["RdYlGn"](0.15 + 0.7 * max(recalls)), 2800)], []),
        # captions in red
        "misclassified_gray": (lambda p: plot_misclassified(gray, [0, 1, 2, 3, 4], [1, 2, 3, 4, 0],
                                                            [0.9, 0.8, 0.7, 0.6, 0.5], list("abcde"), p),
                               (639, 551), [(red, 25)], []),
        "misclassified_rgb": (lambda p: plot_misclassified(rgb, [0, 1, 2], [2, 0, 1], [0.5, 0.6, 0.7],
                                                           ["cat", "dog", "<b>"], p, max_items=2), (635, 278),
                              [(red, 35)], []),
        "misclassified_none": (lambda p: plot_misclassified(np.zeros((0, 3, 32, 32), np.uint8), [], [], [], ["a"], p),
                               placeholder, [], [red]),
        # the first stage (stem) and the last (fc) of the viridis range
        "grad_norms": (lambda p: plot_grad_norms(grad_history(), p), (1332, 496),
                       [(colormaps["viridis"](0.0), 3500), (colormaps["viridis"](0.9), 5800)], []),
        # each panel clips at its 99.5th percentile: the top of magma is there
        "spectrograms": (lambda p: plot_spectrograms(specs, [0, 1, 2, 0, 1, 2, 3, 3], ["yes", "no", "up", "down"], p),
                         (1068, 254), [(colormaps["magma"](1.0), 250)], []),
        "lr_find": (lambda p: plot_lr_find(list(lrs), list(losses), p, suggestion=1e-3), (782, 474),
                    [(blue, 450), (red, 85)], []),
        "lr_find_no_suggestion": (lambda p: plot_lr_find([1e-4, 1e-3], [2.0, float("nan")], p, None), (782, 474),
                                  [(blue, 30)], [red]),
        "compare": (lambda p: plot_compare({"residual": fake_metrics(8), "plain": fake_metrics(6), "none": []},
                                           "val_acc", p, "validation accuracy"), (837, 507),
                    [(colormaps["tab10"](0), 490), (colormaps["tab10"](1), 380)], []),
    }


CASES = _cases()


def colour_pixels(img: np.ndarray, colour) -> int:
    """How many pixels of ``img`` (H, W, 3|4 floats in [0, 1]) are ``colour`` (any matplotlib colour), within 8/255
    per channel (anti-aliased edges differ; a line's core does not)."""
    return int((np.abs(img[..., :3] - np.array(to_rgb(colour))).max(axis=-1) < 8 / 255).sum())


@pytest.mark.parametrize("name", list(CASES))
def test_plot_draws_its_series_at_the_expected_size(name, tmp_path):
    draw, (width, height), drawn, absent = CASES[name]
    out = tmp_path / "sub" / f"{name}.png"
    assert draw(out) == out
    assert_png(out)
    img = mpimg.imread(out)
    assert abs(img.shape[1] - width) <= 0.1 * width and abs(img.shape[0] - height) <= 0.1 * height, img.shape
    for colour, at_least in drawn:
        assert colour_pixels(img, colour) >= at_least, f"{colour} not drawn"
    for colour in absent:
        assert colour_pixels(img, colour) == 0, f"{colour} drawn"


def test_plots_do_not_touch_pyplot_state(tmp_path):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    plot_curves(fake_metrics(3), tmp_path / "c.png")
    assert plt.get_fignums() == before


def test_grad_norm_stage_order_is_input_to_output():
    from resnetlab.report.plots import _stage_key

    names = ["fc", "layer2", "stem", "layer10", "layer1", "extra"]
    order = sorted(names, key=lambda s: _stage_key(s, names.index(s)))
    assert order == ["stem", "layer1", "layer2", "layer10", "extra", "fc"]


def test_plot_inputs_are_validated(tmp_path):
    with pytest.raises(ValueError, match="square"):
        plot_confusion(np.zeros((2, 3)), ["a", "b"], tmp_path / "x.png")
    with pytest.raises(ValueError, match="C in"):
        plot_misclassified(np.zeros((1, 2, 8, 8), np.uint8), [0], [1], [0.5], None, tmp_path / "x.png")


# --- html ---------------------------------------------------------------------------------------------------------

def make_run(tmp_path):
    run = tmp_path / "cifar_resnet20"
    (run / "report").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    (run / "config.yaml").write_text("model: resnet20\ndataset: cifar10\nnote: '<script>alert(1)</script>'\n")
    lines = [json.dumps(m) for m in fake_metrics(4)]
    lines.insert(2, "{not json")  # a run killed mid-write leaves a torn line
    lines.append(json.dumps({**fake_metrics(4)[3], "val_acc": 0.8123}))  # resumed run: epoch 4 written again
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    summary = summary_from_confusion(CM, ["<b>", "dog", "cat", "d&d"])
    (run / "eval.json").write_text(json.dumps(summary))
    (run / "report" / "skipped.txt").write_text("data/a <1>.wav\ttruncated\n")
    val = {**summary, "top1": 0.5714, "loss": float("nan"), "confusion_matrix": CM.tolist()}
    (run / "report" / "val_summary.json").write_text(json.dumps(val))
    plot_confusion(CM, ["<b>", "dog", "cat", "d&d"], run / "report" / "val_confusion.png")
    plot_curves(fake_metrics(4), run / "report" / "curves.png")
    plot_per_class(summary["per_class"], run / "report" / "per_class.png")
    return run


def test_load_metrics_skips_torn_lines_and_dedupes(tmp_path):
    run = make_run(tmp_path)
    recs = load_metrics(run)
    assert [r["epoch"] for r in recs] == [1, 2, 3, 4]
    assert recs[-1]["val_acc"] == 0.8123
    assert load_metrics(tmp_path / "nowhere") == []


def test_write_report_contains_metrics_images_and_escapes(tmp_path):
    run = make_run(tmp_path)
    out = write_report(run)
    assert out == run / "report" / "index.html"
    html = out.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>")
    assert "cifar_resnet20" in html  # title
    assert '<img src="curves.png"' in html and '<img src="per_class.png"' in html
    assert html.count("<figcaption>") == 3
    assert "[val] Confusion matrix" in html  # a prefixed known figure keeps its caption
    assert "81.23%" in html  # best val accuracy, from the last record of the resumed epoch
    assert "val_loss" in html and "train_acc" in html
    # run text is escaped, never interpreted
    assert "<b>" not in html and "&lt;b&gt;" in html
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "d&amp;d" in html
    assert "data/a &lt;1&gt;.wav — truncated" in html and "Skipped files (1)" in html
    assert "macro_f1" in html  # eval.json summary
    assert "val_summary.json" in html and "57.14%" in html  # the engine's validation summary, top1 as percent
    assert "[[1, 1, 0, 0]" not in html  # the confusion matrix is drawn, not dumped
    assert "http://" not in html and "https://" not in html  # self-contained


def test_write_report_on_an_empty_run_dir(tmp_path):
    html = write_report(tmp_path).read_text(encoding="utf-8")
    assert "No epochs recorded" in html and "(no config.yaml)" in html


def test_write_report_missing_dir_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_report(tmp_path / "missing")


def test_top1_breaks_ties_as_argmax_does_so_it_equals_the_confusion_accuracy():
    logits = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0], [3.0, 3.0, 3.0]]).to(torch.bfloat16).float()
    target = torch.tensor([0, 1, 0])  # every row a tie, every argmax right
    assert topk_accuracy(logits, target, ks=(1,))[1] == 1.0
    assert (logits.argmax(1) == target).float().mean().item() == 1.0
