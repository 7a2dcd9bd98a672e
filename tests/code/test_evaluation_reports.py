"""Intervals and labelled-set reports (bcc_core.evaluation): the figures the metrics page and the
external/verification reports show."""

import numpy as np
import pytest

from bcc_core.evaluation import confusion_report, ece_interval, labelled_set_report, rate, wilson


def test_wilson_matches_the_closed_form():
    k, n, z = 9, 20, 1.959963984540054
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lo, hi = wilson(k, n)
    assert lo == pytest.approx(centre - half, abs=1e-9) and hi == pytest.approx(centre + half, abs=1e-9)
    assert wilson(0, 0) == (None, None)
    assert rate(0, 20)["ci95"][0] == 0.0 and rate(0, 20)["ci95"][1] > 0.1   # 0/20 is not "0% for sure"


def test_confusion_report_per_class_and_bootstrap():
    cm = [[45, 5, 0], [2, 40, 8], [0, 0, 50]]
    rep = confusion_report(cm, ["a", "b", "c"])
    assert rep["per_class"]["b"]["recall"]["k"] == 40 and rep["per_class"]["b"]["recall"]["n"] == 50
    assert rep["per_class"]["c"]["precision"]["n"] == 58
    assert rep["accuracy"]["value"] == pytest.approx(135 / 150)
    for key in ("accuracy", "macro_f1", "kappa"):
        lo, hi = rep["intervals"][key]
        point = rep[key]["value"] if key == "accuracy" else rep[key]
        assert lo < point < hi and hi - lo < 0.2


def test_labelled_set_report_counts_unknown_types_shown_as_ok_as_wrong():
    classes = ["monocyte", "seg_neutrophil"]
    true = ["monocyte"] * 4 + ["seg_neutrophil"] * 4 + ["lymphocyte"] * 2
    sugg = ["monocyte", "monocyte", "seg_neutrophil", "monocyte",
            "seg_neutrophil", "seg_neutrophil", "seg_neutrophil", "monocyte", "monocyte", "seg_neutrophil"]
    ok = [True, False, True, True, True, True, False, False, True, False]
    rep = labelled_set_report(true, sugg, ok, classes, name="lab")
    assert rep["per_true_label"]["monocyte"]["recall"]["k"] == 3
    assert rep["per_true_label"]["lymphocyte"]["recall"] is None          # not a model class
    assert rep["per_true_label"]["lymphocyte"]["wrong_and_ok"] == 1
    # wrong and ok: the monocyte called neutrophil (ok) and the lymphocyte called monocyte (ok)
    assert rep["wrong_and_ok"]["k"] == 2 and rep["wrong_and_ok"]["n"] == 10
    assert rep["shown_as_ok"]["k"] == 6 and rep["error_among_ok"]["n"] == 6
    assert rep["per_suggested_class"]["monocyte"]["precision"]["k"] == 3   # 3 of 5 suggested monocytes
    assert rep["confusion"]["rows"] == ["monocyte", "seg_neutrophil", "lymphocyte"]
    assert np.array(rep["confusion"]["matrix"]).sum() == 10


def test_ece_interval_contains_the_ece_and_widens_with_fewer_images():
    big = {"count": [400, 600], "confidence": [0.7, 0.95], "accuracy": [0.68, 0.96]}
    small = {"count": [4, 6], "confidence": [0.7, 0.95], "accuracy": [0.5, 1.0]}
    ece = 0.4 * 0.02 + 0.6 * 0.01
    lo, hi = ece_interval(big)
    assert lo <= ece <= hi
    s_lo, s_hi = ece_interval(small)
    assert s_hi - s_lo > hi - lo
    assert ece_interval(None) is None


def test_verification_html_report_is_self_contained_and_escapes_names():
    from bcc_core.verification import report_html

    rep = labelled_set_report(["a", "b", "<script>x</script>"], ["a", "a", "b"], [True, False, True], ["a", "b"],
                              name="Lab <b>1</b>")
    rep.update({"model": {"model_id": "m", "weights_sha256": "ab" * 32, "created": "2026"},
                "data": {"root": "cells", "file_list_sha256": "cd" * 32}, "measured": "now"})
    html = report_html(rep)
    assert html.startswith("<!doctype html>") and "<script>" not in html and "&lt;script&gt;" in html
    assert "Lab &lt;b&gt;1&lt;/b&gt;" in html and "95% CI" in html and "ab" * 32 in html
    assert "http" not in html   # no external resources


def test_verification_markdown_reports_per_class_precision_intervals_and_mean_recall():
    from bcc_core.verification import report_markdown

    true = ["a"] * 8 + ["b"] * 2 + ["x"] * 2
    sugg = ["a"] * 8 + ["a", "b"] + ["b", "a"]
    ok = [True] * 8 + [False, True, True, False]
    rep = labelled_set_report(true, sugg, ok, ["a", "b"], name="lab Z")
    rep.update(model={"model_id": "m", "weights_sha256": "ab" * 32}, data={"file_list_sha256": "cd" * 32})
    md = "\n".join(report_markdown(rep))
    assert "mean per-class recall 75.0%" in md  # (8/8 + 1/2) / 2, not the pooled 9/10
    assert "| a | 80.0% (" in md and "8/10)" in md  # precision of a: 8 of the 10 suggested (one b, one x)
    assert "| x | 2 | not a model class | 50.0% (" in md and "| x | " in md.split("suggested")[0]
    assert "wrong and shown as ok: 8.33%" in md  # the unknown x shown as ok as b


def test_balanced_accuracy_is_sklearns_and_quiet_when_a_suggested_class_has_no_true_image():
    import warnings

    from sklearn.metrics import balanced_accuracy_score

    from bcc_core.evaluation import classification_metrics

    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 200)
    probs = rng.random((200, 4))
    probs[np.arange(200), y] += rng.random(200) * 1.5          # mostly right; class 3 never true
    probs /= probs.sum(1, keepdims=True)
    pred = probs.argmax(1)
    assert (pred == 3).any()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = balanced_accuracy_score(y, pred)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = classification_metrics(y, probs, ["a", "b", "c", "d"])["balanced_accuracy"]
    assert got == pytest.approx(want)
    probs3 = probs[:, :3] / probs[:, :3].sum(1, keepdims=True)
    assert classification_metrics(y, probs3, ["a", "b", "c"])["balanced_accuracy"] == pytest.approx(
        balanced_accuracy_score(y, probs3.argmax(1)))
