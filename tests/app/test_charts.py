"""Figure builders (pages._lib.charts) and page helpers (pages._lib.ui_helpers): pure, no model needed."""

from __future__ import annotations

import base64
import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pages._lib import charts, ui_helpers
from bcc_core.flags import Flag

PBS5 = ["basophil", "erythroblast", "monocyte", "myeloblast", "seg_neutrophil"]


def test_class_colours_are_fixed_distinct_and_independent_of_order():
    a = charts.class_colours(PBS5)
    b = charts.class_colours(list(reversed(PBS5)))
    assert a == b
    assert len(set(a.values())) == len(PBS5)
    # Unknown names get a stable colour from the name itself, not from their position.
    assert charts.class_colour("some_new_cell") == charts.class_colour("some_new_cell")
    assert charts.class_colour("some_new_cell").startswith("#")


def test_same_class_same_colour_in_every_chart():
    probs = {c: 0.2 for c in PBS5}
    bar = charts.probability_bar(probs, PBS5, "monocyte")
    diff = charts.differential_bar({c: i for i, c in enumerate(PBS5)}, PBS5)
    roc = charts.roc_curves({c: {"fpr": [0, 1], "tpr": [0, 1]} for c in PBS5})
    bar_colours = dict(zip(PBS5, bar.data[0].marker.color))
    diff_colours = dict(zip(PBS5, diff.data[0].marker.color))
    roc_colours = {t.name: t.line.color for t in roc.data if t.name != "chance"}
    assert bar_colours == diff_colours == roc_colours == charts.class_colours(PBS5)


def test_probability_bar_values_and_predicted_highlight():
    probs = {"basophil": 0.1, "erythroblast": 0.7, "monocyte": 0.2, "myeloblast": 0.0, "seg_neutrophil": 0.0}
    fig = charts.probability_bar(probs, PBS5, "erythroblast")
    assert list(fig.data[0].x) == pytest.approx([10, 70, 20, 0, 0])
    assert "<b>erythroblast</b>" in fig.data[0].y
    assert list(fig.data[0].text)[1] == "70.0%"


def test_confusion_matrix_annotates_counts_and_row_rates():
    fig = charts.confusion_matrix_heatmap([[8, 2], [1, 9]], ["a", "b"])
    z = np.array(fig.data[0].z)
    assert z[0].tolist() == pytest.approx([0.8, 0.2]) and z[1].tolist() == pytest.approx([0.1, 0.9])
    assert fig.data[0].text[0][1] == "2<br>20%"


@pytest.mark.parametrize("build", [
    lambda: charts.confusion_matrix_heatmap(None, None),
    lambda: charts.roc_curves({}),
    lambda: charts.training_curves({}),
    lambda: charts.reliability_diagram(None, None),
    lambda: charts.per_class_bars(None),
    lambda: charts.probability_bar(None),
    lambda: charts.differential_bar({}, []),
])
def test_missing_data_gives_a_note_not_an_exception(build):
    fig = build()
    assert fig.layout.annotations and fig.layout.annotations[0].text


def test_reliability_diagram_skips_empty_bins_and_shows_ece():
    rel = {"confidence": [None, 0.55, 0.95], "accuracy": [None, 0.5, 0.97], "count": [0, 4, 20]}
    fig = charts.reliability_diagram(rel, rel, 0.021, 0.08)
    names = [t.name for t in fig.data]
    assert "after temperature scaling (ECE 0.021)" in names and "before scaling (ECE 0.080)" in names
    after = next(t for t in fig.data if t.name.startswith("after"))
    assert list(after.x) == [0.55, 0.95]


def test_training_curves_two_panels():
    h = {"loss": [1.0, 0.5], "val_loss": [1.1, 0.7], "accuracy": [0.5, 0.8], "val_accuracy": [0.45, 0.75]}
    fig = charts.training_curves(h)
    assert len(fig.data) == 4
    assert {t.name for t in fig.data} == {"training", "validation"}


def test_png_data_uri_roundtrip_and_shrinks():
    img = np.zeros((200, 100, 3), np.uint8)
    img[..., 0] = 200
    uri = ui_helpers.png_data_uri(img, max_side=64)
    assert uri.startswith("data:image/png;base64,")
    back = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert max(back.size) == 64 and back.getpixel((0, 0))[0] == 200
    assert ui_helpers.png_data_uri(None) is None


def test_results_frame_and_summary_keep_errors_visible():
    rows = [
        {"file": "a.png", "status": "ok", "predicted_class": "monocyte", "confidence": 0.9, "flags": [],
         "reason": "", "thumbnail": np.zeros((8, 8, 3), np.uint8)},
        {"file": "b.png", "status": "review", "predicted_class": "basophil", "confidence": 0.5,
         "flags": [Flag("low_confidence", "warning", "unsure", "below_threshold")], "reason": "unsure",
         "thumbnail": np.zeros((8, 8, 3), np.uint8)},
        {"file": "c.png", "status": "error", "predicted_class": None, "confidence": None, "flags": [],
         "reason": "c.png: data is not a recognised image format", "thumbnail": None},
    ]
    df = ui_helpers.results_frame(rows)
    assert list(df["#"]) == [0, 1, 2]
    assert df.loc[1, "flags"] == "low_confidence (below_threshold)"
    assert df.loc[2, "status"] == "error" and "not a recognised image" in df.loc[2, "reason"]
    assert pd.isna(df.loc[2, "thumbnail"]) and df.loc[0, "thumbnail"].startswith("data:image/png")
    s = ui_helpers.summary_counts(rows, PBS5)
    assert (s["total"], s["ok"], s["review"], s["error"]) == (3, 1, 1, 1)
    assert s["per_class"]["monocyte"] == 1 and s["per_class"]["basophil"] == 1 and sum(s["per_class"].values()) == 2


def test_read_json_reports_missing_and_broken(tmp_path):
    d, note = ui_helpers.read_json(tmp_path / "metrics.json")
    assert d is None and "missing" in note
    (tmp_path / "metrics.json").write_text("{not json")
    d, note = ui_helpers.read_json(tmp_path / "metrics.json")
    assert d is None and "could not be read" in note


def test_probabilities_are_never_shown_as_certain():
    assert ui_helpers.fmt_prob(0.99996) == "> 99.9%" and ui_helpers.fmt_prob(1.0) == "> 99.9%"
    assert ui_helpers.fmt_prob(0.00001) == "< 0.1%" and ui_helpers.fmt_prob(0.0) == "0%"
    assert ui_helpers.fmt_prob(0.5) == "50.0%" and ui_helpers.fmt_prob(None) == "n/a"
    fig = charts.probability_bar({"a": 0.99999, "b": 0.00001}, ["a", "b"], "a")
    assert list(fig.data[0].text) == ["> 99.9%", "< 0.1%"]


def test_format_helpers():
    assert ui_helpers.fmt_pct(0.934) == "93.4%" and ui_helpers.fmt_pct(1) == "100.0%"
    assert ui_helpers.fmt_pct(None) == "n/a" and ui_helpers.fmt_num(float("nan")) == "n/a"
    assert ui_helpers.fmt_num(0.12345) == "0.123"
