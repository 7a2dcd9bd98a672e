"""Every page of the app, driven through streamlit.testing (AppTest) with the real bundled model.

The app is started from app.py (st.navigation) and switched to each page, so the sidebar model
selector and session-state initialisation are exercised as a user would.
"""

from __future__ import annotations

import io
from pathlib import Path
import json
import zipfile

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from app_fixtures import (PASSWORD, app_env, blank_png, cell_png, finish_batch, log_in,  # noqa: F401  (fixtures)
                          model_dir)
from app_test_images import png_bytes, synthetic_cell
from pages._lib.ui_helpers import GRADCAM_METHODS, fmt_prob

GRADCAM_LABELS = {m: label for label, m in GRADCAM_METHODS.items()}

TIMEOUT = 180
DISCLAIMER = "Decision support, not a diagnosis"


def texts(at, *kinds) -> str:
    """All text of the given element kinds (default: the common text elements), joined."""
    kinds = kinds or ("markdown", "caption", "info", "warning", "error", "success", "title", "subheader")
    out = []
    for k in kinds:
        out += [str(getattr(e, "value", "")) for e in getattr(at, k)]
    return "\n".join(out)


def start(page: str | None = None, user: str | None = "rita") -> AppTest:
    """The app, logged in as `user` (None: not logged in), on `page`."""
    at = AppTest.from_file("../../app.py", default_timeout=TIMEOUT)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    if user:
        log_in(at, user)
        assert not at.exception, [e.value for e in at.exception]
        assert at.session_state["user"]["username"] == user
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
    # A model that names every class of the selected one and more is pointed out (pb7 beside pbs5: the
    # eosinophils and lymphocytes of every smear); the selection stays the seed's model.
    from bcc_core.inference import list_models, wider_models

    wider = wider_models(app_env["model_dir"], list_models(app_env["model_dir"].parent))
    for other, extra in wider[:1]:
        assert f"`{Path(other).name}` names every class of this model and also {', '.join(extra)}" in side
    if (app_env["model_dir"].parent / "pb7-mobilenetv2").is_dir() and app_env["model_dir"].name == "pbs5-mobilenetv2":
        assert wider[0][1] == ["eosinophil", "lymphocyte"]
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
    from bcc_core.flags import verdict

    v = verdict(pred.flags)
    boxes = texts(at, "success", "warning", "error", "info")
    assert v.headline in boxes
    # A synthetic cell is unlike the training images: flagged, no large-type class, the guess a plain line.
    # (A bundled sample cell, at the end, is the other branch.)
    assert not v.trust_suggestion and pred.predicted_class in classes
    assert not any(m.label == "Suggested class" for m in at.metric)
    assert f"not reliable for this image**: {pred.predicted_class}" in texts(at, "markdown")
    # Every flag's message is on the page, with its next step said once.
    for f in pred.flags:
        assert f.message in boxes
    # Probability chart (plotly), Grad-CAM overlay and the two downloads.
    assert len(at.get("plotly_chart")) >= 1
    assert any(s.value == "Grad-CAM explanation" for s in at.subheader)
    captions = [c for img in at.image for c in img.captions]
    assert any(c.startswith("Grad-CAM for '" + pred.predicted_class) for c in captions), captions
    labels = [b.label for b in at.download_button]
    assert "Result (JSON)" in labels and "Overlay (PNG)" in labels

    # Only methods that passed the model's explanation sanity checks are offered (Grad-CAM++ and
    # Score-CAM fail the randomisation test on the bundled models); another target class: the overlay
    # follows, with that class's probability, and the prediction does not change.
    from bcc_core.explain import offered_methods

    offered, _ = offered_methods(app_env["model_dir"])
    method_box = at.selectbox(key="single_cam_method")
    assert [GRADCAM_LABELS[m] for m in offered] == method_box.options and "Score-CAM" not in method_box.options
    other = next(c for c in classes if c != pred.predicted_class)
    next(s for s in at.selectbox if s.label == "Explain class").set_value(other)
    at.slider(key="single_cam_alpha").set_value(0.8).run()
    assert not at.exception, [e.value for e in at.exception]
    captions = [c for img in at.image for c in img.captions]
    assert f"Grad-CAM for '{other}' (probability {fmt_prob(pred.probabilities[other])}), opacity 0.80" in captions, \
        captions
    assert at.session_state["single"]["pred"] is pred

    # The result is kept as a one-cell case when the user asks (single-image results were never recorded).
    from bcc_core import cases, store

    at.text_input(key="single_case_label").input("SINGLE-1").run()
    at.button(key="single_case_save").click().run()
    assert not at.exception and "Saved as case #1" in texts(at, "success")
    case, rows = cases.case_rows(store.open_store(str(app_env["db"])), 1)
    assert (case["sample_label"], case["status"], case["created_by"]) == ("SINGLE-1", "complete", "rita")
    assert rows[0]["predicted_class"] == pred.predicted_class and rows[0]["image_sha256"] == \
        at.session_state["single"]["sha256"] and rows[0]["thumb_sha256"]

    # A bundled sample cell (a held-out pbs5 test image) the model recognises: OK, the class in large type, no
    # plain line. (About one held-out cell in ten goes to review by design: the first sample shown as ok.)
    from bcc_core.inference import Predictor
    from bcc_core.io import read_image
    from bcc_core.samples import sample_images

    model = Predictor.load(app_env["model_dir"])
    sample = next(s for s in sample_images(classes) if model.predict([read_image(s.path)])[0].status == "ok")
    at.file_uploader[0].set_value((sample.path.name, sample.path.read_bytes(), "image/jpeg")).run()
    assert not at.exception, [e.value for e in at.exception]
    ok = at.session_state["single"]["pred"]
    assert verdict(ok.flags).level == "ok" and verdict(ok.flags).trust_suggestion
    assert metric(at, "Suggested class") == ok.predicted_class == sample.label
    assert verdict(ok.flags).headline in texts(at, "success")
    assert "not reliable for this image" not in texts(at, "markdown")


FLAG_CASES = {
    "none": ([], "No flag raised", True),
    "low_confidence": ([("low_confidence", "warning", "Calibrated confidence 41% is below the threshold.")],
                       "Needs review", True),
    "ood": ([("low_confidence", "warning", "Unsure."),
             ("out_of_distribution", "warning", "This image is unlike the training images.")],
            "Not recognised — classify it yourself", False),
    "critical": ([("out_of_distribution", "warning", "Unlike the training images."),
                  ("image_quality", "critical", "Several cells of similar size are visible. Re-capture it.")],
                 "Do not use — several cells of similar size are visible", False),
}


@pytest.mark.parametrize("case", list(FLAG_CASES))
def test_result_headline_follows_the_most_severe_flag(case):
    """What a reviewer reads first: the most severe flag's words, and the class in large type only when
    the image is recognised and usable."""
    flags, headline, class_in_large_type = FLAG_CASES[case]

    def page(flags):
        import numpy as np

        from bcc_core.flags import Flag
        from bcc_core.inference import Prediction
        from pages._shared import show_flags, show_result

        fl = [Flag(*f) for f in flags]
        pred = Prediction("myeloblast", 0.938, {"myeloblast": 0.938, "monocyte": 0.062}, fl,
                          "review" if fl else "ok", model_input=np.zeros((8, 8, 3), np.uint8))
        show_result(pred)
        show_flags(pred.flags)

    at = AppTest.from_function(page, args=(flags,), default_timeout=60)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    first = (at.error or at.warning or at.success)[0].value
    assert headline in first, first
    severe = any(f[1] == "critical" for f in flags) or any(f[0] == "out_of_distribution" for f in flags)
    assert bool(at.error) == severe   # red only for "not recognised" / "do not use" (and critical flags)
    assert any(m.label == "Suggested class" for m in at.metric) == class_in_large_type
    assert ("not reliable for this image**: myeloblast (93.8%)" in texts(at, "markdown")) == (not class_in_large_type)
    for f in flags:
        assert f[2] in texts(at, "warning", "error")


def test_single_image_blank_is_flagged(app_env, blank_png):
    at = start()
    at.file_uploader[0].set_value(("blank.png", blank_png, "image/png")).run()
    assert not at.exception, [e.value for e in at.exception]
    pred = at.session_state["single"]["pred"]
    assert pred.status == "review"
    assert "image_quality" in {f.code for f in pred.flags}
    boxes = texts(at, "warning", "error")
    assert "Image quality" in boxes and "Do not use — " in boxes


def test_single_image_corrupt_upload_is_a_message_not_a_crash(app_env):
    at = start()
    at.file_uploader[0].set_value(("broken.png", b"this is not an image", "image/png")).run()
    assert not at.exception
    err = texts(at, "error")
    assert "cannot be used" in err and "broken.png: data is not a recognised image" in err
    assert not any(m.label == "Suggested class" for m in at.metric)


# ---------------------------------------------------------------------------------------------- metrics, card


def test_metrics_page(app_env):
    """A quality manager's page: the confound first, intervals on the figures, the other lab beside the test
    split, per-bin counts in the reliability diagram, no ROC curves and no comparison of unequals."""
    from bcc_core.evaluation import confusion_report
    from bcc_core.verification import load_reports

    at = start("pages/metrics.py")
    assert not at.exception, [e.value for e in at.exception]
    assert at.title[0].value == "Model metrics"
    assert DISCLAIMER in texts(at, "info")
    card = json.loads((app_env["model_dir"] / "model_card.json").read_text())
    metrics = json.loads((app_env["model_dir"] / "metrics.json").read_text())
    # The card's limitations (the one-lab-per-class confound) come first, before any figure.
    assert at.subheader[0].value == "Read this first"
    warnings = texts(at, "warning")
    for line in card["limitations"]:
        assert line in warnings
    # Test figures carry 95% intervals computed from the recorded confusion matrix.
    rep = confusion_report(metrics["test"]["confusion_matrix"], metrics["test"]["classes"])
    body = texts(at, "markdown")
    lo, hi = rep["accuracy"]["ci95"]
    assert f"Accuracy: {rep['accuracy']['value'] * 100:.1f}% (95% CI {lo * 100:.1f}%–{hi * 100:.1f}%" in body
    assert "Macro-F1: " in body and "(95% CI " in body.split("Macro-F1: ")[1].split("\n")[0]
    per_class = next(d.value for d in at.dataframe if "recall (test)" in d.value.columns)
    assert list(per_class["class"]) == metrics["test"]["classes"]
    assert per_class["recall (test)"].str.contains("95% CI").all()
    # External figures from saved reports (the bundled pbs5 model has one for BCCD) sit beside the test split.
    for ext in load_reports(app_env["model_dir"]):
        assert f"Other lab: {ext['name']}" in body
        assert any(f"recall ({ext['name']})" in d.value.columns for d in at.dataframe)
    # Calibration error with an interval; the reliability diagram labels each bin with its count.
    assert "95% CI" in metric(at, "Calibration error after scaling")
    figs = [c.proto.spec for c in at.get("plotly_chart")]
    assert any('"n=' in f for f in figs)
    assert not any("ROC" in f for f in figs)
    assert "Model comparison" not in texts(at, "subheader")
    assert card["review_rule"]["guarantee"] in texts(at)


def test_metrics_page_warns_of_a_look_alike_folder_measured_unmapped(app_env, monkeypatch):
    """An external report whose 'neutrophil' folder was not mapped counted those cells as an unknown type: the
    page says so beside its figures and gives the map."""
    import copy

    import streamlit as st

    import bcc_core.verification as verification

    real = verification.load_reports
    if not real(app_env["model_dir"]):
        pytest.skip("the model has no saved external report")

    def unmapped(model_dir):
        reps = copy.deepcopy(real(model_dir))
        reps[0]["data"]["unmapped_look_alike"] = {"neutrophil": ["seg_neutrophil"]}
        return reps

    monkeypatch.setattr(verification, "load_reports", unmapped)
    st.cache_data.clear()
    at = start("pages/metrics.py")
    assert not at.exception, [e.value for e in at.exception]
    assert ("Folder **neutrophil** looks like the model's **seg_neutrophil**" in texts(at, "warning")
            and "--class-map neutrophil=seg_neutrophil" in texts(at, "warning"))
    st.cache_data.clear()


def test_model_card_page(app_env):
    at = start("pages/model_card.py")
    assert at.title[0].value == "Model card"
    card = json.loads((app_env["model_dir"] / "model_card.json").read_text())
    body = texts(at)
    assert "Must NOT be used for" in body
    # The model's identity: the card's version (or "unversioned") and the weights' SHA-256.
    assert f"SHA-256 {card['model_sha256']}:" in texts(at, "caption") and "version **" in body
    for item in card["not_for"]:
        assert item in texts(at, "error")
    assert card["intended_use"] in body
    for c in card["classes"]:
        assert f"`{c}` — " in body   # each class with its plain-language description
    # Clinical content first; developer settings only inside the technical expander.
    assert [e.label for e in at.expander] == ["Technical details (for developers and auditors)"]
    assert "Grad-CAM target layer" in "\n".join(m.value for m in at.expander[0].markdown)
    assert card["review_rule"]["guarantee"] in body
    for lim in card["limitations"]:
        assert lim in body
    assert card.get("reproduce")                              # every bundled card records its command
    assert any(card["reproduce"] == c.value for c in at.code)
    assert [b.label for b in at.download_button] == ["Download model_card.json"]


def test_model_card_page_names_an_adapted_models_second_opinion(app_env):
    """A lab model whose card carries a second opinion (`bcc_core.second_opinion`) says so under the review rule,
    with the file and its hash."""
    from bcc_core.second_opinion import FILE, READS, SecondOpinion

    lab_model = app_env["data_dir"] / "models" / "pbs5-lab-with-second-opinion"
    lab_model.mkdir(parents=True)
    for f in app_env["model_dir"].iterdir():
        if f.name != "model_card.json":
            (lab_model / f.name).symlink_to(f)
    z = np.zeros((4, 2), np.float32)
    sha = SecondOpinion(z, z[0], z[:2], z[0]).save(lab_model)
    card = json.loads((app_env["model_dir"] / "model_card.json").read_text())
    card["trust"]["second_opinion"] = {"file": FILE, "sha256": sha, "reads": READS,
                                       "ok_only_when": "it names the same class as the model"}
    (lab_model / "model_card.json").write_text(json.dumps(card))
    at = start("pages/model_card.py")
    at.sidebar.selectbox[0].set_value(str(lab_model)).run()
    assert not at.exception, [e.value for e in at.exception]
    assert (f"A result is shown as ok only when a second opinion, a head reading {READS}, names the same class "
            f"(`{FILE}`, SHA-256 {sha[:12]}…)") in texts(at, "markdown")


# ---------------------------------------------------------------------------------------------- batch screening


def _results_table(at):
    """The results table: the dataframe with a 'file' and a 'thumbnail' column."""
    for df in at.dataframe:
        v = df.value
        if "file" in v.columns and "thumbnail" in v.columns:
            return v
    raise AssertionError("no results table on the page")


def test_batch_screening_rows_errors_summary_and_review(app_env):
    import numpy as np

    at = start("pages/batch_screening.py")
    assert at.title[0].value == "Batch screening" and DISCLAIMER in texts(at, "info")
    files = [(f"cell{i}.png", png_bytes(synthetic_cell(20 + i)), "image/png") for i in range(2)]
    files.append(("blank.png", png_bytes(np.full((360, 360, 3), (236, 214, 222), np.uint8)), "image/png"))
    files.append(("corrupt.png", b"\x89PNG\r\n\x1a\n this is not really a png", "image/png"))
    at.file_uploader[0].set_value(files).run()
    run = next(b for b in at.button if b.label == "Run screening")
    assert run.disabled                                       # every run is a case: it needs a sample label
    at.text_input(key="batch_sample_label").input("SLIDE-0001").run()
    run = next(b for b in at.button if b.label == "Run screening")
    assert not run.disabled
    _click_run(at, run)

    # One row per input, in input order; the corrupt file is an error row with a reason.
    table = _results_table(at)
    assert list(table["file"]) == [f[0] for f in files]
    err = table[table["status"] == "error"]
    assert list(err["file"]) == ["corrupt.png"]
    assert "not a recognised image" in err["reason"].iloc[0]
    assert set(table["status"]) <= {"ok", "review", "error"}
    assert table.loc[table["file"] == "blank.png", "status"].item() == "review"
    classes = json.loads((app_env["model_dir"] / "model_card.json").read_text())["classes"]
    assert set(table.loc[table["status"] != "error", "predicted_class"]) <= set(classes)
    assert table.loc[table["status"] != "error", "thumbnail"].str.startswith("data:image/png;base64,").all()
    # The table says what the detail view says (the most severe flag in words); the blank field is unusable.
    assert table.loc[table["file"] == "blank.png", "verdict"].item() == "Do not use"
    assert table.loc[table["file"] == "corrupt.png", "verdict"].item() == "Error (unreadable)"
    assert "Image quality" in table.loc[table["file"] == "blank.png", "why"].item()
    # Larger thumbnails on demand: the kept 96 px images instead of 48 px.
    import base64
    import io as _io

    from PIL import Image

    def thumb_side(t):
        uri = t.loc[t["file"] == "cell0.png", "thumbnail"].item()
        return Image.open(_io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).size[0]

    assert thumb_side(table) == 48
    at.toggle(key="batch_large_thumbs").set_value(True).run()
    assert thumb_side(_results_table(at)) == 96
    at.toggle(key="batch_large_thumbs").set_value(False).run()

    # Summary: counts, errors, the differential and the exports.
    n_review = int((table["status"] == "review").sum())
    assert metric(at, "Images") == "4" and metric(at, "Errors (unreadable)") == "1"
    assert metric(at, "Needs review") == str(n_review)
    assert int(metric(at, "OK")) + n_review == 3
    diff = next(d.value for d in at.dataframe if "category" in d.value.columns)
    assert list(diff.loc[diff["kind"] == "class", "category"]) == classes
    # Only cells shown as OK count under a class; flagged ones await review; one denominator (all 4 images).
    assert diff.loc[diff["kind"] == "class", "count"].sum() == int(metric(at, "OK"))
    assert diff.loc[diff["category"] == "awaiting review", "count"].item() == n_review
    assert diff.loc[diff["category"] == "errors", "count"].item() == 1
    assert diff["percent"].sum() == pytest.approx(100.0)
    assert "Case **SLIDE-0001** (#1) · **complete** · 4 of 4 images stored · screened by rita" in texts(at, "markdown")

    # Results survive a rerun; the "needs review only" filter narrows the table.
    at.toggle(key="batch_review_only").set_value(True).run()
    assert len(_results_table(at)) == n_review and (_results_table(at)["status"] == "review").all()

    # Every row is in the case, names relative to it, with the model's identity.
    from bcc_core import cases, store

    eng = store.open_store(str(app_env["db"]))
    case, stored = cases.case_rows(eng, at.session_state["batch_case"])
    assert [r["name"] for r in stored] == [f[0] for f in files] and case["n_inputs"] == 4
    assert case["model_id"] == "pbs5-mobilenetv2" and len(case["model_sha256"]) == 64 and case["model_version"]

    # Review: the blank image is in the worklist; a decision recorded while it is open lands on it, in the
    # case, as the logged-in user (there is no name to type).
    blank_idx = 2
    opened = _open_cell(at, blank_idx)
    assert f"Cell #{blank_idx}" in opened and "Deciding as **rita** (reviewer)" in texts(at, "markdown")
    assert not [t for t in at.text_input if t.key == "reviewer_field"]
    at.text_input(key=f"review_comment_{blank_idx}").input("no cell in the image")
    _button(at, f"decide_{blank_idx}_reject").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert "Recorded for #2 (blank.png)" in texts(at, "success")
    assert [(h["seq"], h["decision"], h["actor"], h["comment"]) for h in cases.history(eng, case["id"])] == [
        (2, "reject_image", "rita", "no cell in the image")]       # and no other cell received a decision
    diff = next(d.value for d in at.dataframe if "category" in d.value.columns).set_index("category")
    assert diff.loc["rejected by reviewer", "count"] == 1 and diff.loc["awaiting review", "count"] == n_review - 1


def _run(at, label: str) -> None:
    """Enter the sample label and run the screening (inputs already given)."""
    at.text_input(key="batch_sample_label").input(label).run()
    _click_run(at, next(b for b in at.button if b.label in ("Run screening", "Resume screening")))


def _click_run(at, button) -> None:
    """Click a button that starts a screening run and show the page once the run has ended."""
    button.click().run()
    assert not at.exception, [e.value for e in at.exception]
    finish_batch(at)
    assert not at.exception, [e.value for e in at.exception]


def _button(at, key):
    hits = [b for b in at.button if b.key == key]
    assert hits, f"no button {key!r}; have {[b.key for b in at.button]}"
    return hits[0]


def _open_cell(at, idx: int) -> str:
    """Step through the worklist with Next until cell idx is open; the page's text then."""
    for _ in range(len(at.session_state["batch_rows"]) + 1):
        if at.session_state["batch_open"] == idx:
            return texts(at, "markdown")
        _button(at, "review_next").click().run()
        assert not at.exception, [e.value for e in at.exception]
    raise AssertionError(f"cell {idx} is not reachable with Next")


def test_decisions_land_on_the_open_cell_and_move_on(app_env):
    """Each decision is stored for the cell that was on screen, then the next undecided cell opens."""
    from bcc_core import cases, store

    at = start("pages/batch_screening.py")
    files = [(f"cell{i}.png", png_bytes(synthetic_cell(40 + i)), "image/png") for i in range(6)]
    at.file_uploader[0].set_value(files).run()
    _run(at, "SLIDE-B")
    at.toggle(key="batch_verify_all").set_value(True).run()   # every cell is in the worklist
    rows = at.session_state["batch_rows"]
    classes = json.loads((app_env["model_dir"] / "model_card.json").read_text())["classes"]
    eng = store.open_store(str(app_env["db"]))

    def history(i):
        return [(h["decision"], h["final_class"]) for h in cases.history(eng, at.session_state["batch_case"])
                if h["seq"] == i]

    first = at.session_state["batch_open"]
    assert first == 0

    # Open cells out of order (Next twice, Previous once) and decide each with a different action.
    _button(at, "review_next").click().run()
    _button(at, "review_next").click().run()
    _button(at, "review_prev").click().run()
    assert at.session_state["batch_open"] == 1 and "Cell #1" in texts(at, "markdown")
    other = next(c for c in classes if c != rows[1]["predicted_class"])
    _button(at, f"decide_1_{other}").click().run()
    assert at.session_state["batch_open"] == 2   # the next undecided cell opens
    _button(at, "decide_2_lymphocyte").click().run()      # a cell type the model does not know
    assert at.session_state["batch_open"] == 3
    _button(at, "review_next").click().run()
    assert at.session_state["batch_open"] == 4
    _button(at, "decide_4_confirm").click().run()
    assert not at.exception, [e.value for e in at.exception]

    # A button of a cell that is no longer open (a key pressed while the page still showed it) records
    # nothing: the page shows #5's buttons; with #3 opened meanwhile, a press on them is refused.
    at.session_state["batch_open"] = 3
    _button(at, "decide_5_confirm").click().run()
    assert "Nothing was recorded: that decision was for cell #5" in texts(at, "error")
    assert history(5) == [] and history(3) == []
    at.session_state["batch_open"] = 5
    at.run()

    current = {i: history(i) for i in range(len(rows))}
    assert current[1] == [("correct", other)]
    assert current[2] == [("correct", "lymphocyte")]
    assert current[4] == [("confirm", rows[4]["predicted_class"])]
    assert current[0] == current[3] == current[5] == []
    # After the last decision the next undecided cell after #4 is open, and the worklist table says so.
    assert at.session_state["batch_open"] == 5
    q = next(d.value for d in at.dataframe if "decision" in d.value.columns)
    assert list(q.loc[q["decision"] != "pending", "#"]) == [1, 2, 4]


def test_batch_screening_from_folder_and_zip(app_env, tmp_path, monkeypatch):
    monkeypatch.setenv("BCC_IMAGE_ROOTS", str(tmp_path))  # server folders are off unless allowed
    folder = tmp_path / "smear"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.png").write_bytes(png_bytes(synthetic_cell(31)))
    (folder / "sub" / "b.jpg").write_bytes(png_bytes(synthetic_cell(32)))  # wrong extension for PNG data: still read
    (folder / "notes.txt").write_text("not an image: ignored in folders")

    at = start("pages/batch_screening.py")
    at.radio(key="batch_mode").set_value("Folder on the server").run()
    at.text_input(key="batch_folder").input(str(folder)).run()
    _run(at, "FOLDER-1")
    table = _results_table(at)
    assert [p.rsplit("/", 1)[-1] for p in table["file"]] == ["a.png", "b.jpg"]
    assert (table["status"] != "error").all()

    # A .zip upload expands to its members; a missing folder is one error row, not a crash.
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("cells/x.png", png_bytes(synthetic_cell(33)))
        zf.writestr("cells/y.png", b"broken")
    at.radio(key="batch_mode").set_value("Upload images or a .zip").run()
    at.file_uploader[0].set_value(("batch.zip", buf.getvalue(), "application/zip")).run()
    _click_run(at, next(b for b in at.button if b.label == "Run screening"))
    table = _results_table(at)
    assert list(table["file"]) == ["batch.zip:cells/x.png", "batch.zip:cells/y.png"]
    assert list(table["status"])[1] == "error" and table["reason"].iloc[1]

    at.radio(key="batch_mode").set_value("Folder on the server").run()
    at.text_input(key="batch_folder").input(str(tmp_path / "does-not-exist")).run()
    _click_run(at, next(b for b in at.button if b.label == "Run screening"))
    table = _results_table(at)
    assert len(table) == 1 and table["status"].item() == "error" and "not found" in table["reason"].item()


def test_try_the_sample_batch_screens_it_into_a_case(app_env):
    """One click screens the bundled sample batch (assets/samples/batch) into a case labelled "sample batch",
    the same way as a run on uploads: one row per file in name order, the file that is not an image an error row."""
    from bcc_core import cases, store
    from bcc_core.samples import sample_batch_paths

    names = [p.name for p in sample_batch_paths()]
    assert len(names) == 13 and names[-2:] == ["zz_not_an_image.jpg", "zz_out_of_focus.jpg"]
    at = start("pages/batch_screening.py")
    _click_run(at, _button(at, "batch_try_sample"))
    table = _results_table(at)
    assert list(table["file"]) == [f"sample batch/{n}" for n in names]
    assert list(table.loc[table["status"] == "error", "file"]) == ["sample batch/zz_not_an_image.jpg"]
    assert table.loc[table["file"] == "sample batch/zz_blank.png", "status"].item() == "review"
    case, stored = cases.case_rows(store.open_store(str(app_env["db"])), at.session_state["batch_case"])
    assert (case["sample_label"], case["status"], case["n_inputs"]) == ("sample batch", "complete", 13)
    assert [r["name"] for r in stored] == names and stored[11]["status"] == "error"


def test_a_batch_run_goes_on_through_clicks_and_a_new_session_follows_it(app_env, monkeypatch):
    """The run is a background job: held after two stored rows, it survives widget clicks (reruns, the uploads
    replaced, a second start of the same case refused), a new session of the same user shows its progress, and
    once released both sessions show the complete case with every row."""
    import threading

    from bcc_core import cases, jobs, store

    real, two_stored, go_on = cases.add_result, threading.Event(), threading.Event()

    def held_at_the_third(engine, user, case_id, seq, row):
        if seq == 2:
            two_stored.set()
            assert go_on.wait(600), "the test never released the run"
        return real(engine, user, case_id, seq, row)

    monkeypatch.setattr(cases, "add_result", held_at_the_third)
    at = start("pages/batch_screening.py")
    files = [(f"bg{i}.png", png_bytes(synthetic_cell(120 + i)), "image/png") for i in range(5)]
    at.file_uploader[0].set_value(files).run()
    at.text_input(key="batch_sample_label").input("SLIDE-BG").run()
    next(b for b in at.button if b.label == "Run screening").click().run()
    assert not at.exception, [e.value for e in at.exception]
    try:
        assert two_stored.wait(600)
        eng = store.open_store(str(app_env["db"]))
        job = jobs.get(eng, 1)
        progress = "Case #1 is being screened: 2 of 5 images stored"
        at.run()
        assert job.running and progress in texts(at, "caption")
        # Clicks during the run: starting the same case again is refused; other inputs; the page reruns each time.
        assert at.checkbox(key="batch_resume").value
        next(b for b in at.button if b.label == "Resume screening").click().run()
        assert "Not started: case #1 is being screened already" in texts(at, "error")
        at.file_uploader[0].set_value([("other.png", png_bytes(synthetic_cell(7)), "image/png")]).run()
        at.text_input(key="batch_sample_label").input("SLIDE-NEXT").run()
        assert not at.exception, [e.value for e in at.exception]
        assert job.running and jobs.progress(eng, 1) == (2, 5) and progress in texts(at, "caption")
        # The page opened anew (a new session, same user) shows the run's progress.
        at2 = start("pages/batch_screening.py")
        assert progress in texts(at2, "caption") and not at2.session_state["batch_rows"]
    finally:
        go_on.set()
    assert job.wait(600) and (job.state, job.status) == ("done", "complete")
    for session in (at2, at):   # (the progress fragment reruns the page by itself in a browser)
        session.run()
        assert not session.exception, [e.value for e in session.exception]
        assert list(_results_table(session)["file"]) == [f[0] for f in files]
        assert "Case **SLIDE-BG** (#1) · **complete** · 5 of 5 images stored" in texts(session, "markdown")
    case, rows = cases.case_rows(eng, 1)
    assert case["status"] == "complete" and [r["seq"] for r in rows] == [0, 1, 2, 3, 4]
    assert len(cases.list_cases(eng)) == 1


def test_model_selector_drives_every_page(app_env):
    models = sorted(p.parent for p in app_env["model_dir"].parent.glob("*/model_card.json"))
    if len(models) < 2:
        pytest.skip("only one model is installed: nothing to switch to")
    other = next(m for m in models if m != app_env["model_dir"])
    at = start("pages/model_card.py")
    at.sidebar.selectbox[0].set_value(str(other)).run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.session_state["model_dir"] == str(other)
    card = json.loads((other / "model_card.json").read_text())
    assert f"### {card['model_id']}" in texts(at, "markdown")
    assert f"Model: **{other.name}**" in texts(at, "info")
    at.switch_page("pages/metrics.py").run()
    assert at.session_state["model_dir"] == str(other)
    metrics_file = other / "metrics.json"
    assert metrics_file.is_file()                             # every installed model ships its metrics
    from bcc_core.evaluation import confusion_report

    t = json.loads(metrics_file.read_text())["test"]
    assert f"Macro-F1: {confusion_report(t['confusion_matrix'], t['classes'])['macro_f1']:.3f}" in texts(at)


# ---------------------------------------------------------------------------------------------- your lab


def _labelled_zip(classes, n, seed=900) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for k, c in enumerate(classes):
            for i in range(n):
                zf.writestr(f"lab_cells/{c}/cell{i:02d}.png", png_bytes(synthetic_cell(seed + 100 * k + i)))
    return buf.getvalue()


@pytest.mark.slow
def test_your_lab_adapt_compare_promote_select_and_roll_back(app_env):
    """The lab's page end to end: a labelled .zip is adapted on, parent and adapted model are compared on
    held-out cells, the adapted model is promoted into the selector, selected, and rolled back."""
    from bcc_core import store, trail

    at = start("pages/your_lab.py", user="ada")     # promoting a model into use is an administrator's act
    assert at.title[0].value == "Your lab"
    at.file_uploader[0].set_value(("lab.zip", _labelled_zip(["monocyte", "seg_neutrophil"], 12), "application/zip"))
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    counts = next(d.value for d in at.dataframe if "cells" in d.value.columns)
    assert dict(zip(counts["folder"], counts["cells"])) == {"monocyte": 12, "seg_neutrophil": 12}
    at.text_input(key="lab_name").input("Test Lab")
    at.run()
    assert at.checkbox(key="lab_leave_out").value  # by default the doubted cells are left out (and listed)
    next(b for b in at.button if b.label == "Adapt the model").click().run(timeout=600)
    assert not at.exception, [e.value for e in at.exception]
    cand = at.session_state["lab_candidate"]
    assert cand and Path(cand["dir"]).is_dir() and Path(cand["dir"]).parent == app_env["data_dir"] / "candidates"
    table = next(d.value for d in at.dataframe if "adapted" in d.value.columns)
    assert {"recall monocyte", "recall seg_neutrophil", "shown as OK", "wrong and shown as OK",
            "macro-F1 on the parent's test split"} <= set(table["figure"])
    # pbs5 taught by this lab cannot name its lymphocytes and eosinophils: the lab is told before promoting
    assert "This model cannot name lymphocyte, eosinophil" in texts(at, "warning")
    from bcc_core.adapt import describe_review                   # ... and what set the review threshold
    assert describe_review(cand["summary"]["review_rule"]) in texts(at, "caption")
    # ... and which reviewed cells' labels the model doubts, as a table to re-check them by (the label check ran)
    doubted = cand["summary"]["labels_to_recheck"]
    assert doubted is not None
    shown = [d.value for d in at.dataframe if "looks like" in d.value.columns]
    assert [list(t["cell"]) for t in shown] == ([[d["file"] for d in doubted]] if doubted else [])
    slip = {"file": "monocyte/cell03.png", "label": "monocyte", "suggested": "seg_neutrophil", "p_label": 0.04,
            "p_suggested": 0.96}
    at.session_state["lab_candidate"] = {**cand, "summary": {**cand["summary"], "labels_to_recheck": [slip],
                                                             "labels_left_out": ["seg_neutrophil/cell07.png"]}}
    at.run()
    assert "Left out of the adaptation, their label doubted: seg_neutrophil/cell07.png" in texts(at, "info")
    (shown,) = [d.value for d in at.dataframe if "looks like" in d.value.columns]
    assert shown.to_dict("records") == [{"cell": "monocyte/cell03.png", "labelled": "monocyte", "p(label)": "4.0%",
                                         "looks like": "seg_neutrophil", "p(looks like)": "96.0%"}]
    assert "The model doubts the label of 1 of your reviewed cells" in texts(at, "warning")
    at.session_state["lab_candidate"] = cand
    at.run()

    next(b for b in at.button if b.label == "Promote: use the adapted model").click().run()
    assert not at.exception, [e.value for e in at.exception]
    promoted = app_env["data_dir"] / "models" / Path(cand["dir"]).name
    assert promoted.is_dir() and at.session_state["model_dir"] == str(promoted)
    assert f"{promoted.name} (your lab)" in at.sidebar.selectbox[0].options   # beside the bundled models
    card = json.loads((promoted / "model_card.json").read_text())
    assert card["lineage"]["lab"] == "Test Lab" and card["lineage"]["parent"]["model_id"] == "pbs5-mobilenetv2"
    at.switch_page("pages/single_image.py").run()                       # the promoted model is in use
    assert not at.exception and f"Model: **{promoted.name}**" in texts(at, "info")

    at.switch_page("pages/your_lab.py").run()
    # Local verification report of the promoted model on the lab's cells: per class with intervals, saved
    # beside the model (the metrics page shows it) and downloadable as HTML.
    at.file_uploader[0].set_value(("lab.zip", _labelled_zip(["monocyte", "seg_neutrophil"], 12), "application/zip"))
    at.text_input(key="lab_name").input("Test Lab")
    at.run()
    next(b for b in at.button if b.label == "Verify the selected model").click().run()
    assert not at.exception, [e.value for e in at.exception]
    rep = at.session_state["lab_report"]
    assert rep["n"] == 24 and rep["model"]["model_id"] == promoted.name
    assert set(rep["per_true_label"]) == {"monocyte", "seg_neutrophil"} and rep["agreement_known"]["ci95"][0] is not None
    assert (promoted / "external" / "Test Lab.json").is_file()
    assert "Download the verification report (HTML)" in [b.label for b in at.download_button]
    next(b for b in at.button if b.key == f"rollback_{promoted.name}").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert not promoted.exists() and (app_env["data_dir"] / "retired" / promoted.name).is_dir()
    assert f"{promoted.name} (your lab)" not in at.sidebar.selectbox[0].options
    eng = store.open_store()
    with eng.connect() as con:
        import sqlalchemy as sa

        acts = [(r.action, r.actor) for r in con.execute(sa.select(store.trail.c.action, store.trail.c.actor))]
    assert ("model.promote", "ada") in acts and ("model.rollback", "ada") in acts
    assert trail.verify(eng)["ok"]


def test_your_lab_offers_to_read_a_look_alike_folder_as_the_model_class(app_env, monkeypatch):
    """A zip whose folder is 'Monocytes' (the model's 'monocyte' spelt otherwise) is shown with the class it may
    mean, and adaptation and the verification report read it as that class unless the user unticks the box."""
    import bcc_core.adapt
    import bcc_core.verification

    seen = []

    def fake_adapt(parent, cells, out, cfg, progress=None):
        seen.append(cfg)
        raise ValueError("stopped by the test")

    monkeypatch.setattr(bcc_core.adapt, "adapt", fake_adapt)
    saved = []   # the bundled model's verification reports are kept here, never written into models/
    monkeypatch.setattr(bcc_core.verification, "save_report", lambda model_dir, rep: saved.append(rep))
    at = start("pages/your_lab.py")
    at.file_uploader[0].set_value(("lab.zip", _labelled_zip(["Monocytes", "seg_neutrophil"], 2), "application/zip"))
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    counts = next(d.value for d in at.dataframe if "cells" in d.value.columns)
    assert dict(zip(counts["folder"], counts["may mean"])) == {"Monocytes": "monocyte", "seg_neutrophil": ""}
    assert at.checkbox(key="lab_class_map").value
    at.text_input(key="lab_name").input("Test Lab")
    at.run()
    next(b for b in at.button if b.label == "Adapt the model").click().run()
    assert seen[-1].class_map == {"Monocytes": "monocyte"} and "stopped by the test" in texts(at, "error")
    # The verification report reads the folder the same way: its cells are monocytes, not an unknown type.
    next(b for b in at.button if b.label == "Verify the selected model").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert set(at.session_state["lab_report"]["per_true_label"]) == {"monocyte", "seg_neutrophil"}
    at.checkbox(key="lab_class_map").uncheck().run()
    next(b for b in at.button if b.label == "Adapt the model").click().run()
    assert seen[-1].class_map == {}
    next(b for b in at.button if b.label == "Verify the selected model").click().run()
    assert set(at.session_state["lab_report"]["per_true_label"]) == {"Monocytes", "seg_neutrophil"}
    assert [set(r["per_true_label"]) for r in saved] == [{"monocyte", "seg_neutrophil"}, {"Monocytes", "seg_neutrophil"}]


def test_your_lab_takes_this_sessions_reviewed_cells(app_env):
    """Cells confirmed or corrected on the batch page become the lab's labelled cells, under their final class."""
    at = start("pages/batch_screening.py")
    files = [(f"c{i}.png", png_bytes(synthetic_cell(80 + i)), "image/png") for i in range(4)]
    at.file_uploader[0].set_value(files).run()
    _run(at, "LAB-CELLS")
    at.toggle(key="batch_verify_all").set_value(True).run()
    for i, label in enumerate(["monocyte", "lymphocyte", "monocyte"]):
        assert at.session_state["batch_open"] == i
        _button(at, f"decide_{i}_{label}").click().run()
    _button(at, "decide_3_reject").click().run()                  # unusable: not a labelled cell
    at.switch_page("pages/your_lab.py").run()
    at.radio(key="lab_source").set_value("Cells reviewed in this session (batch screening)").run()
    assert not at.exception, [e.value for e in at.exception]
    counts = next(d.value for d in at.dataframe if "cells" in d.value.columns)
    assert dict(zip(counts["folder"], counts["cells"])) == {"lymphocyte": 1, "monocyte": 2}
    assert dict(zip(counts["folder"], counts["a class of the model"])) == {"lymphocyte": False, "monocyte": True}


# ---------------------------------------------------------------------------------------------- login and roles


def test_login_comes_before_anything_else(app_env, monkeypatch, tmp_path):
    from bcc_core import store
    import sqlalchemy as sa

    at = start(user=None)
    assert at.title[0].value == "Blood-cell decision support" and not at.file_uploader   # no page, no model
    with pytest.raises(ValueError, match="Known pages: .*login.py'\\]"):  # no other page exists yet
        at.switch_page("pages/batch_screening.py")
    log_in(at, "rita", "not the password")
    assert "Not logged in" in texts(at, "error") and at.session_state["user"] is None
    log_in(at, "rita")
    assert at.title[0].value == "Single image" and "**rita** · reviewer" in texts(at, "markdown")
    next(b for b in at.sidebar.button if b.key == "logout").click().run()
    assert at.session_state["user"] is None and at.title[0].value == "Blood-cell decision support"
    with store.open_store(str(app_env["db"])).connect() as con:
        acts = [(r.actor, r.action) for r in con.execute(sa.select(store.trail.c.actor, store.trail.c.action)
                                                         .where(store.trail.c.entity == "login").order_by(store.trail.c.id))]
    assert acts == [("rita", "login.failed"), ("rita", "login"), ("rita", "logout")]

    # An idle session ends: the next action shows the login page and says why.
    log_in(at, "sam")
    at.session_state["user"]["last_seen"] -= 31 * 60
    at.run()
    assert at.session_state["user"] is None and "logged out after 30 minutes" in texts(at, "warning")

    # A new installation has no user: the page says how an administrator creates the first one (no set-up
    # screen that the first visitor could use to become administrator).
    monkeypatch.setenv("BCC_DATA_DIR", str(tmp_path / "empty"))
    at = start(user=None)
    assert "python -m bcc_core users add YOUR_NAME --role admin" in texts(at, "info")


def _not_offered(at, page):
    """The page is not in the user's navigation (the app registers only the pages their role allows)."""
    with pytest.raises(ValueError, match="Could not find a navigation page"):
        at.switch_page(page)


def test_roles_decide_what_each_user_may_do(app_env):
    # A viewer reads cases but cannot screen, decide, sign, audit or manage users.
    at = start("pages/cases.py", user="vic")
    for page in ("pages/batch_screening.py", "pages/audit.py", "pages/users.py"):
        _not_offered(at, page)
    # A reviewer screens and decides; no audit or users page; promoting a model is for an administrator.
    at = start("pages/your_lab.py", user="rita")
    assert "Promoting a model into use is for an administrator." in texts(at, "markdown")
    _not_offered(at, "pages/audit.py")
    _not_offered(at, "pages/users.py")
    # A signer reads the audit trail; only an administrator manages users.
    at = start("pages/audit.py", user="sam")
    assert at.title[0].value == "Audit trail" and not at.exception
    _not_offered(at, "pages/users.py")
    at = start("pages/users.py", user="ada")
    assert at.title[0].value == "Users"
    assert set(next(d.value for d in at.dataframe)["username"]) == {"ada", "sam", "rita", "vic"}
    at.text_input(key="users_new_name").input("nina")
    at.text_input(key="users_new_pw").input("a long password")
    at.text_input(key="users_new_pw2").input("a long password")
    next(b for b in at.button if b.label == "Add user").click().run()
    assert "Added nina (reviewer)." in texts(at, "success")
    at.selectbox(key="users_pick").set_value("vic").run()
    at.button(key="users_toggle").click().run()                # disabled: logged out at their next action
    assert "vic is disabled." in texts(at, "success")
    at = start(user=None)
    log_in(at, "vic")
    assert at.session_state["user"] is None and "Not logged in" in texts(at, "error")


def _case_of(at, app_env):
    from bcc_core import cases, store

    eng = store.open_store(str(app_env["db"]))
    return eng, cases.case_rows(eng, at.session_state["batch_case"])


def test_a_case_from_screening_to_sign_off_amendment_export_and_audit(app_env):
    """Screen into a case, decide every flagged cell, sign (read-only afterwards), amend with a reason,
    export every format (pseudonymised, the FHIR bundle validates), verify the trail on the audit page."""
    import numpy as np
    from fhir.resources.R4B.bundle import Bundle

    from bcc_core import cases

    at = start("pages/batch_screening.py", user="rita")
    files = [(f"PATIENT_DOE_{i}.png", png_bytes(synthetic_cell(60 + i)), "image/png") for i in range(3)]
    files.append(("PATIENT_DOE_blank.png", png_bytes(np.full((360, 360, 3), (236, 214, 222), np.uint8)),
                  "image/png"))
    at.file_uploader[0].set_value(files).run()
    _run(at, "ACC-778899")
    eng, (case, rows) = _case_of(at, app_env)
    flagged = [r for r in rows if r["status"] == "review"]
    assert case["status"] == "complete" and flagged

    # The reviewer decides the flagged cells on the Cases page, from the stored predictions; a flagged cell's
    # original is kept, so what the model saw and its Grad-CAM can be shown (recomputed with the case's
    # model, and only because it gives the stored prediction again).
    assert all(cases.cell_image(eng, r["image_sha256"]) for r in flagged)
    at.switch_page("pages/cases.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.subheader[0].value == "Case #1: ACC-778899"
    assert not [b for b in at.button if b.key == "case_sign"]              # a reviewer does not sign
    at.toggle(key="case_show_cam").set_value(True).run()
    assert not at.exception, [e.value for e in at.exception]
    captions = [c for img in at.image for c in img.captions]
    assert "What the model saw" in captions and any(c.startswith("Grad-CAM for '") for c in captions), captions
    at.toggle(key="case_show_cam").set_value(False).run()
    for k in range(len(flagged)):
        at.button(key="case_reject" if k == 0 else "case_confirm").click().run()
        assert not at.exception, [e.value for e in at.exception]
        assert "recorded for cell" in texts(at, "success")
    _, rows = cases.case_rows(eng, case["id"])
    assert all(r["decision"] and r["decided_by"] == "rita" for r in rows if r["status"] == "review")

    # The signer signs (after attesting); the case is then read-only.
    at = start("pages/cases.py", user="sam")
    sign = at.button(key="case_sign")
    assert sign.disabled                                                    # not before the attestation
    at.checkbox(key="case_attest").check().run()
    at.button(key="case_sign").click().run()
    assert "Case #1 signed by sam" in texts(at, "success")
    assert cases.case_rows(eng, case["id"])[0]["status"] == "signed"

    # Trying to edit: a reviewer gets no decision buttons; a signer's change without a reason is refused.
    at_r = start("pages/cases.py", user="rita")
    assert "signed and read-only" in texts(at_r, "info") and not [b for b in at_r.button if b.key == "case_confirm"]
    assert "Amend a decision" in [s.value for s in at.subheader]
    target = flagged[0]
    at.selectbox(key="case_cell_pick").set_value(target["id"]).run()
    at.button(key="case_confirm").click().run()
    assert "Not recorded: case is signed: a change is an amendment and needs a reason" in texts(at, "error")
    at.text_input(key="case_reason").input("second look under oil: a usable cell").run()
    at.button(key="case_confirm").click().run()
    assert "Amendment recorded for cell" in texts(at, "success")
    hist = cases.history(eng, case["id"])
    assert [(h["decision"], h["amendment"]) for h in hist if h["seq"] == target["seq"]] == [
        ("reject_image", False), ("confirm", True)]                        # the original is kept

    # Export every format: pseudonymised by default, recorded in the trail with each file's SHA-256.
    at.button(key="case_prepare").click().run()
    assert not at.exception, [e.value for e in at.exception]
    _, _, produced = at.session_state["case_exports"]
    assert set(produced) == {"csv", "json", "fhir", "pdf"} and produced["pdf"][:4] == b"%PDF"
    for fmt in ("csv", "json", "fhir"):
        text = produced[fmt].decode()
        assert "PATIENT_DOE" not in text and "ACC-778899" not in text and case["model_sha256"] in text, fmt
    bundle = json.loads(produced["fhir"])
    Bundle.model_validate(bundle)
    assert bundle["entry"][0]["resource"]["status"] == "amended"
    assert {b.label for b in at.download_button} >= {"Download PDF report", "Download FHIR R4 DiagnosticReport (JSON)"}
    import hashlib
    import sqlalchemy as sa
    from bcc_core import store

    with eng.connect() as con:
        exp = json.loads(con.execute(sa.select(store.trail.c.after).where(store.trail.c.action == "case.export"))
                         .scalar_one())
    assert exp["sha256"]["fhir"] == hashlib.sha256(produced["fhir"]).hexdigest()
    at.checkbox(key="case_inc_label").check().run()                        # only when asked for
    at.button(key="case_prepare").click().run()
    assert "ACC-778899" in at.session_state["case_exports"][2]["json"].decode()

    # The audit page verifies the trail and counts the signed case in the agreement figures.
    at.switch_page("pages/audit.py").run()
    at.button(key="audit_verify").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert "The trail verifies" in texts(at, "success")
    assert metric(at, "Signed cases") == "1"
    log = next(d.value for d in at.dataframe if "action" in d.value.columns)
    assert {"login", "case.create", "result.add", "decision.add", "case.sign", "decision.amend", "case.export",
            "case.view"} <= set(log["action"])
    # The metrics page shows the same figures for the selected model (the one this case was screened with).
    at.switch_page("pages/metrics.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert metric(at, "Signed cases") == "1" and metric(at, "Cells a reviewer decided") != "0"


def test_a_batch_stopped_midway_keeps_its_rows_and_resumes(app_env, monkeypatch):
    """The run dies after two stored rows (as when the app is killed): the case is incomplete with both rows;
    the same inputs and label resume it, screening only the rest."""
    from bcc_core import cases

    real, calls = cases.add_result, []

    def dies_after_two(*a, **k):
        if len(calls) == 2:
            raise RuntimeError("the process was killed")
        calls.append(a[3])
        return real(*a, **k)

    at = start("pages/batch_screening.py")
    files = [(f"c{i}.png", png_bytes(synthetic_cell(90 + i)), "image/png") for i in range(4)]
    at.file_uploader[0].set_value(files).run()
    monkeypatch.setattr(cases, "add_result", dies_after_two)
    at.text_input(key="batch_sample_label").input("SLIDE-KILLED").run()
    _click_run(at, next(b for b in at.button if b.label == "Run screening"))
    assert "The run of case #1 stopped: RuntimeError: the process was killed" in texts(at, "error")
    assert len(_results_table(at)) == 2                                     # the rows stored are shown
    monkeypatch.setattr(cases, "add_result", real)
    from bcc_core import store

    eng = store.open_store(str(app_env["db"]))
    (c,) = cases.list_cases(eng, "SLIDE-KILLED")
    assert (c["status"], c["rows"]) == ("incomplete", 2)
    first_two = {r["seq"]: r["id"] for r in cases.case_rows(eng, c["id"])[1]}

    at = start("pages/batch_screening.py")                                 # a new session, same inputs
    at.file_uploader[0].set_value(files).run()
    at.text_input(key="batch_sample_label").input("SLIDE-KILLED").run()
    assert at.checkbox(key="batch_resume").value
    _click_run(at, next(b for b in at.button if b.label == "Resume screening"))
    case, rows = cases.case_rows(eng, c["id"])
    assert case["status"] == "complete" and [r["seq"] for r in rows] == [0, 1, 2, 3]
    assert {r["seq"]: r["id"] for r in rows if r["seq"] < 2} == first_two  # earlier rows kept, not repeated
    assert len(cases.list_cases(eng, "SLIDE-KILLED")) == 1
    assert list(_results_table(at)["file"]) == ["c0.png", "c1.png", "c2.png", "c3.png"]
