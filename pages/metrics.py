"""Model metrics for a quality manager: what the model is measured on and what it is not, every figure
with its 95% interval, the test split beside other labs' cells, calibration with per-bin counts, the
review rule's operating point; developer details last."""

from pathlib import Path

import pandas as pd
import streamlit as st

from pages._lib import charts
from bcc_core.evaluation import confusion_report, ece_interval, rate
from bcc_core.glossary import term
from pages._lib.ui_helpers import fmt_num, fmt_pct, read_json
from bcc_core.verification import load_reports
from bcc_core import cases
from pages._agreement import show_agreement
from pages._shared import current_model_dir, db, init_state, page_header, require_card

init_state()
page_header("Model metrics", "How the selected model did on images it never saw in training (its test split, "
                             "from the same labs), and on other labs' cells where they have been measured.")
card = require_card()
model_dir = Path(current_model_dir())
metrics, note = read_json(model_dir / "metrics.json")
if metrics is None:
    st.warning(f"{note} Only the summary recorded in the model card is shown.")
    metrics = {}
test = metrics.get("test") or {}


def with_ci(r: dict | None, digits: int = 1) -> str:
    """'93.4% (95% CI 90.1–95.6%, 412/441)' for a rate dict from bcc_core.evaluation.rate."""
    if not r or r.get("value") is None:
        return "n/a (no images)"
    lo, hi = r["ci95"]
    return f"{fmt_pct(r['value'], digits)} (95% CI {fmt_pct(lo, digits)}–{fmt_pct(hi, digits)}; {r['k']}/{r['n']})"


def num_ci(v, ci, digits: int = 3) -> str:
    return f"{fmt_num(v, digits)} (95% CI {fmt_num(ci[0], digits)}–{fmt_num(ci[1], digits)})" if ci else fmt_num(v, digits)


def _stamp(path: Path) -> float:
    """Latest modification time of a file, or of any file in a folder (0 when absent)."""
    files = [path] if path.is_file() else (list(path.glob("*")) if path.is_dir() else [])
    return max((f.stat().st_mtime for f in files), default=0.0)


@st.cache_data(show_spinner=False, max_entries=8)
def cached_reports(model_dir: str, weights_mtime: float, reports_mtime: float) -> list:
    """Saved external reports (hashing the weights to match them once per change, not on every rerun)."""
    return load_reports(model_dir)


# ---------------------------------------------------------------- read this first
st.subheader("Read this first")
for line in card.limitations or []:
    st.warning(line, icon=":material/report:")
sa = card.shortcut_audit or metrics.get("shortcut_audit") or {}
seen = sa.get("model_inputs") or {}
if seen:
    worst = max(seen.items(), key=lambda kv: kv[1] or 0)
    st.warning(f"On this model's own inputs the {worst[0].replace('_', ' ')} alone predicts the class "
               f"{fmt_pct(worst[1], 0)} of the time (chance {fmt_pct(sa.get('chance'), 0)}). The test figures below "
               "come from the same labs as training and overstate accuracy elsewhere; the other-lab figures "
               "beside them are the better guide.", icon=":material/report:")

# ---------------------------------------------------------------- at a glance: test split beside other labs
externals = cached_reports(str(model_dir), _stamp(model_dir / "model.keras"), _stamp(model_dir / "external"))
cm = test.get("confusion_matrix")
rep = confusion_report(cm, test.get("classes") or card.classes) if cm else None
measured = (card.review_rule or {}).get("measured_on_test") or (metrics.get("review") or {}).get("test") or {}
st.subheader("At a glance")
left, right = st.columns(2, gap="large")
with left:
    st.markdown(f"**Test split** — same labs as training, {rep['accuracy']['n'] if rep else 'n/a'} images never "
                "used for fitting")
    if rep:
        ci = rep["intervals"]
        st.markdown(f"- Accuracy: {with_ci(rep['accuracy'])}\n"
                    f"- Macro-F1: {num_ci(rep['macro_f1'], ci['macro_f1'])}\n"
                    f"- Agreement beyond chance (kappa): {num_ci(rep['kappa'], ci['kappa'])}", help=term("macro-F1"))
        if measured.get("n"):
            n_t, n_ok = measured["n"], measured.get("ok", 0)
            wrong_ok = round(measured.get("wrong_ok_of_all", 0) * n_t)
            st.markdown(f"- Shown as OK: {with_ci(rate(n_ok, n_t))}\n"
                        f"- Wrong and shown as OK: {with_ci(rate(wrong_ok, n_t), 2)}", help=term("wrong and OK"))
    else:
        st.info("No test-split confusion matrix is recorded (metrics.json missing or incomplete).")
with right:
    if not externals:
        st.markdown("**Other labs** — not measured for this model")
        st.info("No external validation is recorded. Measure on your lab's labelled cells with "
                "`python -m bcc_core evaluate --model DIR --data FOLDER --external --save NAME`.")
    for ext in externals:
        known = [c for c, v in ext["per_true_label"].items() if v["known_to_model"]]
        unknown = [c for c, v in ext["per_true_label"].items() if not v["known_to_model"]]
        st.markdown(f"**Other lab: {ext['name']}** — {ext['n']} images, never used for training or fitting")
        st.markdown(f"- Agreement on known classes: {with_ci(ext['agreement_known'])}\n"
                    f"- Shown as OK: {with_ci(ext['shown_as_ok'])}\n"
                    f"- Wrong and shown as OK: {with_ci(ext['wrong_and_ok'], 2)}\n"
                    + "".join(f"- Recall {c}: {with_ci(ext['per_true_label'][c]['recall'], 0)}\n" for c in known)
                    + (f"- Cell types the model does not know ({', '.join(unknown)}): "
                       f"{sum(ext['per_true_label'][c]['n'] for c in unknown)} images, "
                       f"{sum(ext['per_true_label'][c]['shown_as_ok']['k'] for c in unknown)} shown as OK\n"
                       if unknown else ""), help=term("95% interval"))
        for folder, alike in ext.get("data", {}).get("unmapped_look_alike", {}).items():
            st.warning(f"Folder **{folder}** looks like the model's **{alike[0]}** but was counted as a type the "
                       f"model does not know (measure again with `--class-map {folder}={alike[0]}`).")

# ---------------------------------------------------------------- per class
st.subheader("Per class")
if rep:
    st.caption("Operating point of the suggested class. Recall: of the cells of a class, the share suggested as "
               "that class; precision: of the cells suggested as a class, the share that were. Intervals are "
               "Wilson 95% intervals.")
    st.dataframe(pd.DataFrame([{"class": c, "cells": v["support"], "recall (test)": with_ci(v["recall"]),
                                "precision (test)": with_ci(v["precision"])} for c, v in rep["per_class"].items()]),
                 hide_index=True)
for ext in externals:
    rows = []
    for c, v in ext["per_true_label"].items():
        prec = ext["per_suggested_class"].get(c, {}).get("precision")
        rows.append({"true label": c, "cells": v["n"], f"recall ({ext['name']})": with_ci(v["recall"], 0)
                     if v["recall"] else "not a model class",
                     f"precision ({ext['name']})": with_ci(prec, 0) if prec else "—",
                     "shown as OK": with_ci(v["shown_as_ok"], 0), "wrong and OK": v["wrong_and_ok"]})
    st.dataframe(pd.DataFrame(rows), hide_index=True)

c1, c2 = st.columns(2)
with c1:
    st.plotly_chart(charts.confusion_matrix_heatmap(cm, test.get("classes") or card.classes),
                    config={"displayModeBar": False})
if externals:  # the first other lab's matrix beside the test split's (every lab's table is above)
    conf = externals[0]["confusion"]
    with c2:
        st.plotly_chart(charts.confusion_matrix_heatmap(conf["matrix"], conf["rows"], columns=conf["columns"],
                                                        title=f"Confusion matrix ({externals[0]['name']}; rows = true label)"),
                        config={"displayModeBar": False})

# ---------------------------------------------------------------- calibration
st.subheader("Does the confidence mean what it says?")
cal = metrics.get("calibration") or {}
ccal = card.calibration or {}
after, before = cal.get("reliability_after"), cal.get("reliability_before")
k = st.columns(2)
k[0].metric("Calibration error before scaling", num_ci(cal.get("test_ece_before", ccal.get("test_ece_before")),
                                                        ece_interval(before)), help=term("ECE"))
k[1].metric("Calibration error after scaling", num_ci(cal.get("test_ece_after", ccal.get("test_ece_after")),
                                                       ece_interval(after)), help=term("ECE"))
st.caption("Each point is a confidence bin of the test split with its number of images (n) and a 95% interval "
           "on its accuracy; points near the diagonal mean the stated confidence is right. Bins with few images "
           "say little.")
st.plotly_chart(charts.reliability_diagram(after, before, cal.get("test_ece_after"), cal.get("test_ece_before")),
                config={"displayModeBar": False})

# ---------------------------------------------------------------- review rule
st.subheader("Which results are shown as OK")
rr = card.review_rule or {}
thr = rr.get("threshold")
if rr.get("guarantee"):
    st.markdown(f"> {rr['guarantee']}", help=term("review rule") + " " + term("exchangeable"))
else:
    st.warning("The model card states no review rule: every result should be reviewed.")
certified = bool(rr.get("certified"))
if not certified:
    st.warning("On its calibration data this model could not meet the guarantee at any threshold, so the rule "
               "accepts nothing: **every result is marked 'needs review'.**")
if measured.get("n"):
    n_ok = measured.get("ok", 0)
    wrong_ok = round(measured.get("selective_error", 0) * n_ok)
    st.markdown(f"- Confidence needed to be shown as OK (and no flag): {fmt_pct(thr) if certified else 'none certified'}\n"
                f"- Errors among results shown as OK (test): {with_ci(rate(wrong_ok, n_ok), 2)}; target at most "
                f"{fmt_pct(rr.get('alpha'), 0)}\n"
                f"- Accuracy of the results sent to review (test): {fmt_pct(measured.get('accuracy_of_reviewed'))}")

# ---------------------------------------------------------------- in this lab, over signed cases
st.subheader("In this lab: the model against its reviewers")
st.caption("Over the signed cases screened with this model (its weights' SHA-256), every cell a person decided: "
           "the figure that shows whether the review rule holds on this lab's cells. Amendments count.")
if card.model_sha256:
    show_agreement(cases.agreement(db(), card.model_sha256))
else:
    st.info("This model's card records no weights SHA-256, so its cases cannot be told from another model's.")

# ---------------------------------------------------------------- unlike the training images
st.subheader("Images unlike the training images")
ood = card.ood or {}
mood = metrics.get("ood") or {}
if ood:
    st.markdown(f"An image is flagged *unlike the training images* when any of the detectors fires; "
                f"{fmt_pct(mood.get('test_flag_rate'))} of test images (same labs) are flagged. "
                "How well other labs and unknown cell types are caught is in the other-lab figures above.",
                help=term("out of distribution"))
    comp = mood.get("comparison") or ood.get("comparison") or {}
    if comp:
        plain = {"mahalanobis": "distance to the classes (top features)", "knn": "distance to the nearest training "
                 "images", "energy": "overall evidence for any class", "mahalanobis_early":
                 "colour and texture (mid-network layer)"}
        st.dataframe(pd.DataFrame([{"detector": plain.get(m, m), "technical name": m,
                                    "test images flagged": v.get("test_flag_rate")} for m, v in comp.items()]),
                     hide_index=True, column_config={"test images flagged": st.column_config.NumberColumn(
                         format="percent")})
else:
    st.info("This model has no detector for unfamiliar images: unusual images are not flagged.")

# ---------------------------------------------------------------- shortcut audit table
st.subheader("Could a trivial cue predict the class?")
if sa:
    st.caption(f"Balanced accuracy of a simple classifier that sees one trivial cue only (chance "
               f"{fmt_pct(sa.get('chance'))}). High values mean the data let a model learn the lab, not the cell.")
    recs = [{"measured on": where.replace("_", " "), "cue": cue.replace("_", " "),
             "balanced accuracy": v if not isinstance(v, dict) else v.get("balanced_accuracy")}
            for where in ("raw_images", "model_inputs") for cue, v in (sa.get(where) or {}).items()]
    if recs:
        st.dataframe(pd.DataFrame(recs), hide_index=True,
                     column_config={"balanced accuracy": st.column_config.NumberColumn(format="%.3f")})
else:
    st.info("No shortcut audit is recorded for this model.")

# ---------------------------------------------------------------- for developers
with st.expander("Training, speed, size and data (for developers)"):
    st.plotly_chart(charts.training_curves(metrics.get("history"), title=None), config={"displayModeBar": False})
    lat = metrics.get("latency") or {}
    par = metrics.get("parameters") or card.parameters or {}
    e = st.columns(4)
    e[0].metric("Latency, batch 1", f"{fmt_num(lat.get('batch1_ms_per_image'), 1)} ms/image")
    e[1].metric("Latency, batch 32", f"{fmt_num(lat.get('batch32_ms_per_image'), 1)} ms/image")
    e[2].metric("Parameters", f"{par['total']:,}" if isinstance(par.get("total"), int) else "n/a")
    e[3].metric("Trainable parameters", f"{par['trainable']:,}" if isinstance(par.get("trainable"), int) else "n/a")
    data = card.data or {}
    if data:
        st.markdown(f"Dataset **{data.get('name', 'n/a')}**, {data.get('n_images', 'n/a')} images; class counts: "
                    + ", ".join(f"{c} {n}" for c, n in (data.get("class_counts") or {}).items()))
        split = card.split or {}
        if split:
            st.markdown("Split: " + (", ".join(f"{k} {v}" for k, v in (split.get("sizes") or {}).items())
                                     or "sizes not recorded") + f" (seed {split.get('seed', 'n/a')}); "
                        f"{split.get('grouping', '')}.")
    st.markdown("Backbone comparisons are in `bench/RESULTS.md`; they were not run under equal conditions "
                "(initialisation and budget differ), so no comparison table is shown here.")
