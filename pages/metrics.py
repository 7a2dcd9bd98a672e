"""Model metrics dashboard: what the selected model achieved on its held-out test split, and how far to trust it."""

from pathlib import Path

import pandas as pd
import streamlit as st

from bcc_core import charts
from bcc_core.ui_helpers import comparison_table, fmt_num, fmt_pct, read_json
from pages._shared import ROOT, current_model_dir, init_state, page_header, require_card

init_state()
page_header("Model metrics", "Measured once on the model's held-out test split (images never used for training, "
                             "calibration or thresholds). Expect lower figures on images from other labs.")
card = require_card()
model_dir = Path(current_model_dir())
metrics, note = read_json(model_dir / "metrics.json")
if metrics is None:
    st.warning(f"{note} Only the summary recorded in the model card is shown.")
    metrics = {}
test = metrics.get("test") or {}
summary = test or (card.metrics or {}).get("test", {})

# ---------------------------------------------------------------- shortcut audit first: it qualifies every number
sa = card.shortcut_audit or metrics.get("shortcut_audit") or {}
for w in sa.get("warnings", []):
    st.error(w, icon=":material/report:")

# ---------------------------------------------------------------- headline
st.subheader("Test metrics")
n = summary.get("n")
st.caption(f"Test split: {n if n is not None else 'n/a'} images. Confidence intervals are wide on small splits.")
cols = st.columns(6)
cols[0].metric("Accuracy", fmt_pct(summary.get("accuracy")))
cols[1].metric("Macro F1", fmt_num(summary.get("macro_f1")), help="Unweighted mean of the per-class F1 scores.")
cols[2].metric("Macro precision", fmt_num(test.get("macro_precision")))
cols[3].metric("Macro recall", fmt_num(test.get("macro_recall")))
cols[4].metric("Cohen's kappa", fmt_num(summary.get("kappa")))
cols[5].metric("ROC-AUC (macro, one-vs-rest)", fmt_num(summary.get("roc_auc")))

per_class = test.get("per_class") or {}
if per_class:
    tbl = pd.DataFrame([{"class": c, **{k: v.get(k) for k in ("precision", "recall", "f1", "specificity", "roc_auc",
                                                              "support")}} for c, v in per_class.items()])
    num = {k: st.column_config.NumberColumn(k, format="%.3f") for k in
           ("precision", "recall", "f1", "specificity", "roc_auc")}
    st.dataframe(tbl, hide_index=True, column_config={**num, "f1": st.column_config.NumberColumn("F1", format="%.3f"),
                                                      "roc_auc": st.column_config.NumberColumn("ROC-AUC", format="%.3f")})
else:
    st.info("Per-class metrics are not available (metrics.json missing or incomplete).")

c1, c2 = st.columns(2)
with c1:
    st.plotly_chart(charts.confusion_matrix_heatmap(test.get("confusion_matrix"), test.get("classes") or card.classes),
                    config={"displayModeBar": False})
with c2:
    st.plotly_chart(charts.roc_curves(test.get("roc_curves"), {c: v.get("roc_auc") for c, v in per_class.items()}),
                    config={"displayModeBar": False})

st.subheader("Training history")
st.plotly_chart(charts.training_curves(metrics.get("history"), title=None), config={"displayModeBar": False})

# ---------------------------------------------------------------- calibration
st.subheader("Calibration")
cal = metrics.get("calibration") or {}
ccal = card.calibration or {}
k = st.columns(3)
k[0].metric("Temperature", fmt_num(cal.get("temperature", ccal.get("temperature"))))
k[1].metric("ECE before scaling", fmt_num(cal.get("test_ece_before", ccal.get("test_ece_before"))))
k[2].metric("ECE after scaling", fmt_num(cal.get("test_ece_after", ccal.get("test_ece_after"))),
            help="Expected calibration error on the test split: average gap between confidence and accuracy.")
st.plotly_chart(charts.reliability_diagram(cal.get("reliability_after"), cal.get("reliability_before"),
                                           cal.get("test_ece_after"), cal.get("test_ece_before")),
                config={"displayModeBar": False})

# ---------------------------------------------------------------- review rule
st.subheader("Review rule and its guarantee")
rr = card.review_rule or {}
measured = rr.get("measured_on_test") or (metrics.get("review") or {}).get("test") or {}
if rr.get("guarantee"):
    st.markdown(f"> {rr['guarantee']}")
else:
    st.warning("The model card states no review rule: every result should be reviewed.")
thr = rr.get("threshold")
if isinstance(thr, (int, float)) and thr > 1.0:
    st.warning("On its calibration data this model could not meet the guarantee at any threshold, so the rule "
               "accepts nothing: **every result is marked 'needs review'.**")
if measured:
    q = st.columns(4)
    q[0].metric("Confidence threshold", fmt_num(thr))
    q[1].metric("Shown as ok (test)", fmt_pct(measured.get("ok_fraction")))
    q[2].metric("Error rate among ok (test)", fmt_pct(measured.get("selective_error")),
                help=f"Target at most {fmt_pct(rr.get('alpha'), 0)}.")
    q[3].metric("Accuracy of the reviewed ones", fmt_pct(measured.get("accuracy_of_reviewed")))
    if measured.get("conformal_coverage") is not None:
        st.caption(f"Conformal prediction sets on test: coverage {fmt_pct(measured.get('conformal_coverage'))}, "
                   f"mean set size {fmt_num(measured.get('conformal_mean_set_size'), 2)}, single-class sets "
                   f"{fmt_pct(measured.get('singleton_fraction'))}.")
else:
    st.info("No measurement of the review rule on the test split is recorded.")

# ---------------------------------------------------------------- OOD
st.subheader("Out-of-distribution detection")
ood = card.ood or {}
mood = metrics.get("ood") or {}
if ood:
    method = ood.get("method", "n/a")
    how = ("an image is flagged when any of the detectors below fires (each score is rescaled so that its "
           "own threshold maps to 1)" if method == "union" else "an image is flagged when its score exceeds the threshold")
    st.markdown(f"Method **{method}**, threshold {fmt_num(ood.get('threshold'), 2)}: {how}. Thresholds sit at the "
                f"{fmt_pct(ood.get('quantile'), 0)} quantile of in-distribution validation scores (fitted on "
                f"{ood.get('fitted_on', 'n/a')}). Share of test images flagged: **{fmt_pct(mood.get('test_flag_rate'))}**.")
    if ood.get("early_layer"):
        st.markdown(f"`mahalanobis_early` scores the pooled activations of the mid-network layer "
                    f"`{ood['early_layer']}` in the same forward pass: the fine-tuned top learned to ignore the "
                    "lab's colour and texture, this layer did not, so cells from an unseen lab or of an unknown type "
                    "go to review even when the top is confident.")
    comp = mood.get("comparison") or ood.get("comparison") or {}
    if comp:
        tbl = pd.DataFrame([{"detector": m, **v} for m, v in comp.items()])
        st.dataframe(tbl, hide_index=True, column_config={
            "threshold": st.column_config.NumberColumn(format="%.3f"),
            **{c: st.column_config.NumberColumn(c.replace("_", " "), format="percent")
               for c in tbl.columns if c.endswith("flag_rate")}})
    st.caption("These are flag rates on in-distribution images (the cost in needless reviews). How well the "
               "detectors catch other labs and unknown cell types is measured on external data, not here.")
else:
    st.info("This model has no OOD detector configured: unusual images are not flagged.")

# ---------------------------------------------------------------- shortcut audit table
st.subheader("Shortcut audit")
if sa:
    st.caption(f"Balanced accuracy of a simple classifier using one trivial cue alone (chance "
               f"{fmt_pct(sa.get('chance'))}). High values mean the data let a model learn the lab, not the cell.")
    recs = []
    for where in ("raw_images", "model_inputs"):
        for cue, v in (sa.get(where) or {}).items():
            recs.append({"measured on": where.replace("_", " "), "cue": cue.replace("_", " "),
                         "balanced accuracy": v if not isinstance(v, dict) else v.get("balanced_accuracy")})
    if recs:
        st.dataframe(pd.DataFrame(recs), hide_index=True,
                     column_config={"balanced accuracy": st.column_config.NumberColumn(format="%.3f")})
    if not sa.get("warnings"):
        st.success("No trivial cue predicts the class far above chance.")
else:
    st.info("No shortcut audit is recorded for this model.")

# ---------------------------------------------------------------- efficiency
st.subheader("Speed and size")
lat = metrics.get("latency") or {}
par = metrics.get("parameters") or card.parameters or {}
e = st.columns(4)
e[0].metric("Latency, batch 1", f"{fmt_num(lat.get('batch1_ms_per_image'), 1)} ms/image")
e[1].metric("Latency, batch 32", f"{fmt_num(lat.get('batch32_ms_per_image'), 1)} ms/image")
e[2].metric("Parameters", f"{par['total']:,}" if isinstance(par.get("total"), int) else "n/a")
e[3].metric("Trainable parameters", f"{par['trainable']:,}" if isinstance(par.get("trainable"), int) else "n/a")
if lat:
    st.caption("Measured on the training machine's CPU; model forward pass only (no decoding or preprocessing).")

# ---------------------------------------------------------------- comparison
st.subheader("Model comparison")
table, where = comparison_table(ROOT, card.task)
if table:
    st.markdown(table)
    st.caption(where)
else:
    st.info(where)

# ---------------------------------------------------------------- provenance and use
st.subheader("Data provenance")
data = card.data or {}
if data:
    st.markdown(f"Dataset **{data.get('name', 'n/a')}**, {data.get('n_images', 'n/a')} images; class counts: "
                + ", ".join(f"{c} {n}" for c, n in (data.get("class_counts") or {}).items()))
    split = card.split or {}
    if split:
        sizes = split.get("sizes") or {}
        st.markdown("Split: " + (", ".join(f"{k} {v}" for k, v in sizes.items()) or "sizes not recorded")
                    + f" (seed {split.get('seed', 'n/a')}); {split.get('grouping', '')}.")
else:
    st.info("No data provenance is recorded in the model card.")
st.subheader("Intended use and limitations")
st.markdown(card.intended_use)
st.markdown("**Not for:**\n" + "\n".join(f"- {x}" for x in card.not_for))
if card.limitations:
    st.markdown("**Limitations:**\n" + "\n".join(f"- {x}" for x in card.limitations))
