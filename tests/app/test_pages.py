"""Every page of the app, driven through streamlit.testing (AppTest) with the real bundled model.

The app is started from app.py (st.navigation) and switched to each page, so the sidebar model
selector and session-state initialisation are exercised as a user would.
"""

from __future__ import annotations

import io
import json
import zipfile

import pytest
from streamlit.testing.v1 import AppTest

from conftest import png_bytes, synthetic_cell

TIMEOUT = 180
DISCLAIMER = "Decision support, not a diagnosis"


def texts(at, *kinds) -> str:
    """All text of the given element kinds (default: the common text elements), joined."""
    kinds = kinds or ("markdown", "caption", "info", "warning", "error", "success", "title", "subheader")
    out = []
    for k in kinds:
        out += [str(getattr(e, "value", "")) for e in getattr(at, k)]
    return "\n".join(out)


def start(page: str | None = None) -> AppTest:
    at = AppTest.from_file("../../app.py", default_timeout=TIMEOUT)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    if page:
        at.switch_page(page).run()
        assert not at.exception, [e.value for e in at.exception]
    return at


def metric(at, label: str) -> str:
    for m in at.metric:
        if m.label == label:
            return m.value
    raise AssertionError(f"no metric {label!r}; have {[m.label for m in at.metric]}")


# ---------------------------------------------------------------------------------------------- app shell


def test_app_shell_sidebar_and_default_page(app_env):
    at = start()
    # Sidebar: the model selector lists the bundled model and the card's intended use is shown.
    sel = at.sidebar.selectbox[0]
    assert sel.label == "Model"
    assert str(app_env["model_dir"]) in sel.options or app_env["model_dir"].name in " ".join(sel.options)
    assert at.session_state["model_dir"] == str(app_env["model_dir"])
    side = "\n".join(str(e.value) for e in at.sidebar.caption)
    card = json.loads((app_env["model_dir"] / "model_card.json").read_text())
    assert card["intended_use"] in side
    assert card["not_for"][0] in side
    # The default page is the single-image page, with the decision-support notice and an uploader.
    assert at.title[0].value == "Single image"
    assert DISCLAIMER in texts(at, "info")
    assert len(at.file_uploader) == 1


# ---------------------------------------------------------------------------------------------- single image


def test_single_image_prediction_flags_and_gradcam(app_env, cell_png):
    at = start()
    classes = json.loads((app_env["model_dir"] / "model_card.json").read_text())["classes"]
    at.file_uploader[0].set_value(("cell.png", cell_png, "image/png")).run()
    assert not at.exception, [e.value for e in at.exception]

    pred = at.session_state["single"]["pred"]
    suggested = metric(at, "Suggested class")
    assert suggested in classes and suggested == pred.predicted_class
    conf = metric(at, "Calibrated confidence")
    assert conf.endswith("%") and 0 <= float(conf[:-1]) <= 100
    # Status and every flag's message are on the page, each with a next step.
    boxes = texts(at, "success", "warning", "error", "info")
    assert ("Status: OK" in boxes) if pred.status == "ok" else ("Status: NEEDS REVIEW" in boxes)
    for f in pred.flags:
        assert f.message in boxes
    assert boxes.count("Next step:") == len(pred.flags)
    # Probability chart (plotly), Grad-CAM overlay and the two downloads.
    assert len(at.get("plotly_chart")) >= 1
    assert any(s.value == "Grad-CAM explanation" for s in at.subheader)
    captions = [c for img in at.image for c in img.captions]
    assert any(c.startswith("Grad-CAM for '" + pred.predicted_class) for c in captions), captions
    labels = [b.label for b in at.download_button]
    assert "Result (JSON)" in labels and "Overlay (PNG)" in labels


def test_single_image_blank_is_flagged(app_env, blank_png):
    at = start()
    at.file_uploader[0].set_value(("blank.png", blank_png, "image/png")).run()
    assert not at.exception, [e.value for e in at.exception]
    pred = at.session_state["single"]["pred"]
    assert pred.status == "review"
    assert "image_quality" in {f.code for f in pred.flags}
    boxes = texts(at, "warning", "error")
    assert "Image quality" in boxes and "Status: NEEDS REVIEW" in boxes


def test_single_image_corrupt_upload_is_a_message_not_a_crash(app_env):
    at = start()
    at.file_uploader[0].set_value(("broken.png", b"this is not an image", "image/png")).run()
    assert not at.exception
    err = texts(at, "error")
    assert "cannot be used" in err and "not a recognised image" in err
    assert not any(m.label == "Suggested class" for m in at.metric)


# ---------------------------------------------------------------------------------------------- metrics, card


def test_metrics_page(app_env):
    at = start("pages/metrics.py")
    assert at.title[0].value == "Model metrics"
    assert DISCLAIMER in texts(at, "info")
    labels = [m.label for m in at.metric]
    for lab in ("Accuracy", "Macro F1", "Cohen's kappa", "ROC-AUC (macro, one-vs-rest)", "ECE after scaling",
                "Latency, batch 1", "Parameters"):
        assert lab in labels
    metrics = json.loads((app_env["model_dir"] / "metrics.json").read_text())
    assert metric(at, "Macro F1") == f"{metrics['test']['macro_f1']:.3f}"
    # Per-class table has one row per class; confusion matrix, ROC, history and reliability are charts.
    per_class = at.dataframe[0].value
    assert list(per_class["class"]) == metrics["test"]["classes"]
    assert {"precision", "recall", "f1", "specificity"} <= set(per_class.columns)
    assert len(at.get("plotly_chart")) >= 4
    card = json.loads((app_env["model_dir"] / "model_card.json").read_text())
    # Shortcut warnings from the card are shown loudly, verbatim.
    errors = texts(at, "error")
    for w in card.get("shortcut_audit", {}).get("warnings", []):
        assert w in errors
    body = texts(at)
    assert card["review_rule"]["guarantee"] in body
    assert "Model comparison" in body
    assert card["not_for"][0] in body


def test_model_card_page(app_env):
    at = start("pages/model_card.py")
    assert at.title[0].value == "Model card"
    card = json.loads((app_env["model_dir"] / "model_card.json").read_text())
    body = texts(at)
    assert "Must NOT be used for" in body
    for item in card["not_for"]:
        assert item in texts(at, "error")
    assert card["intended_use"] in body
    for c in card["classes"]:
        assert f"`{c}`" in body
    for lim in card["limitations"]:
        assert lim in body
    assert any(card["reproduce"] == c.value for c in at.code) if card.get("reproduce") else True
    assert [b.label for b in at.download_button] == ["Download model_card.json"]
