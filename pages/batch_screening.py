"""Batch screening: many images → a results table that fills as it runs, a review queue, a summary, a CSV."""

import json
import time
from pathlib import Path

import pandas as pd
import streamlit as st

from bcc_core import charts
from bcc_core.io import IMAGE_EXTENSIONS, ImageReadError, iter_image_sources, read_image, sources_from_uploads
from bcc_core.report import differential, results_to_csv, results_to_fhir_bundle
from bcc_core.ui_helpers import (GRADCAM_METHODS, flag_codes, fmt_pct, fmt_prob, png_data_uri, results_frame,
                                 summary_counts)
from pages._shared import (audit_log, current_model_dir, explanation_heatmap, init_state, page_header,
                           require_predictor, show_flags, show_status, show_suggestion)

init_state()
page_header("Batch screening", "Screen many images at once: uploaded images, a .zip of images, or "
                               "a folder on the server. Every input gets a row; unreadable files get a reason.")
predictor = require_predictor()
classes = predictor.classes
ss = st.session_state

LIVE_ROWS = 200  # rows shown while a batch runs
MAX_THUMBNAIL_ROWS = 2000
DISPLAY_MAX_CONFIDENCE = 0.999  # a table cell reading "100%" would claim a certainty no model has

DECISION_LABELS = {"confirm": "confirm: the suggested class is right",
                   "correct": "correct: it is another class",
                   "reject_image": "reject: image unusable / not a single cell"}

TABLE_COLUMNS = {
    "#": st.column_config.NumberColumn("#", width="small"),
    "thumbnail": st.column_config.ImageColumn("cell", width="small"),
    "file": st.column_config.TextColumn("file", width="medium"),
    "status": st.column_config.TextColumn("status", width="small"),
    "predicted_class": st.column_config.TextColumn("suggested class"),
    "confidence": st.column_config.ProgressColumn("confidence", min_value=0.0, max_value=1.0, format="percent",
                                                  help="Calibrated. Shown at most as 99.9%: never as a certainty."),
    "flags": st.column_config.TextColumn("flags", width="medium"),
    "reason": st.column_config.TextColumn("reason", width="large"),
}

# ---------------------------------------------------------------- inputs
mode = st.radio("Input", ["Upload images or a .zip", "Folder on the server"], horizontal=True, key="batch_mode")
if mode == "Upload images or a .zip":
    uploads = st.file_uploader("Images (PNG, JPEG, TIFF, BMP, WebP) and/or .zip archives of them",
                               accept_multiple_files=True, key="batch_uploads",
                               type=[e.lstrip(".") for e in IMAGE_EXTENSIONS] + ["zip"])
    folder = ""
else:
    uploads = []
    folder = st.text_input("Folder path on the server (searched recursively; a .zip path also works)",
                           key="batch_folder", placeholder="/data/smears/2024-05-01")

run = st.button("Run screening", type="primary", icon=":material/play_arrow:",
                disabled=not (uploads or folder.strip()))


def record_in_audit(rows, model_id):
    """Log every readable result so flagged cells can be reviewed and audited later; {row index: id}."""
    ids = {}
    try:
        log = audit_log()
        for i, r in enumerate(rows):
            if r["status"] != "error":
                ids[i] = log.record_prediction(r["sha256"], r["file"], model_id, r["predicted_class"],
                                               r["confidence"], r["status"], r["flags"])
    except Exception as e:  # the table is still useful without the log; say so plainly
        st.warning(f"Results could not be written to the audit log ({e}); decisions cannot be recorded.")
    return ids


if run:
    if uploads:
        sources = sources_from_uploads(uploads)
    else:
        sources = list(iter_image_sources([folder.strip()]))
    if not sources:
        st.warning("No image files found there. Accepted: " + ", ".join(IMAGE_EXTENSIONS) + ", or a .zip of them.")
        st.stop()
    from bcc_core.screening import screen

    bar = st.progress(0.0, text=f"Screening {len(sources)} image(s)…")
    live = st.empty()
    done_rows: list[dict] = []
    uris: list[str | None] = []
    last = [0.0]

    def on_result(row, done, total):
        done_rows.append(row)
        uris.append(png_data_uri(row.get("thumbnail"), max_side=48))
        now = time.monotonic()
        # Redraw at most twice a second, and only the latest rows: resending a growing table with
        # thumbnails on every result would dominate the run time of a big batch.
        if done == total or now - last[0] > 0.5:
            last[0] = now
            bar.progress(done / total, text=f"Screened {done} of {total}")
            k = max(0, len(done_rows) - LIVE_ROWS)
            with live.container():
                if k:
                    st.caption(f"Latest {LIVE_ROWS} results; the full table follows when the run ends.")
                st.dataframe(results_frame(done_rows[k:], thumbnail_uris=uris[k:], start=k).assign(
                                 confidence=lambda d: d["confidence"].clip(upper=DISPLAY_MAX_CONFIDENCE)),
                             column_config=TABLE_COLUMNS, hide_index=True,
                             height=min(400, 38 + 35 * (len(done_rows) - k)))

    t0 = time.perf_counter()
    rows = screen(sources, predictor, on_result=on_result)
    ss["batch_seconds"] = time.perf_counter() - t0
    ss["batch_rows"], ss["batch_sources"], ss["batch_model"] = rows, sources, current_model_dir()
    ss["batch_thumbs"] = uris
    ss["batch_detail"] = None
    ss["batch_prediction_ids"] = record_in_audit(rows, predictor.card.model_id)
    bar.empty()
    live.empty()

rows = ss["batch_rows"]
if not rows:
    st.stop()
if ss["batch_model"] != current_model_dir():
    st.warning(f"These results come from model `{Path(ss['batch_model']).name}`, not the one selected now. "
               "Run the screening again to use the selected model.")

# ---------------------------------------------------------------- summary
counts = summary_counts(rows, classes)
st.subheader("Summary")
m = st.columns(5)
m[0].metric("Images", counts["total"])
m[1].metric("OK", counts["ok"])
m[2].metric("Needs review", counts["flagged"])
m[3].metric("Errors (unreadable)", counts["error"])
m[4].metric("Time", f"{ss['batch_seconds']:.1f} s" if ss["batch_seconds"] else "n/a")
s1, s2 = st.columns([1.3, 1])
with s1:
    st.plotly_chart(charts.differential_bar(counts["per_class"], classes), config={"displayModeBar": False})
with s2:
    try:
        st.markdown("**Differential** (suggested classes, readable images)")
        st.dataframe(differential(rows, classes), hide_index=True,
                     column_config={"percent": st.column_config.NumberColumn("percent", format="%.1f%%")})
    except Exception as e:  # an export problem must not hide the results
        st.warning(f"Differential table not available: {e}")
st.caption("Flagged cells are counted under the suggested class until a reviewer corrects them. "
           "A differential from a model is a screening aid, not a count to report.")

exports = st.container(horizontal=True)
export_rows = [{k: v for k, v in r.items() if k != "thumbnail"} for r in rows]
card_dict = predictor.card.to_dict()
# Files are generated when the button is clicked, not on every rerun of this page.
exports.download_button("Download results (CSV)", lambda: results_to_csv(export_rows, classes),
                        file_name="screening_results.csv", mime="text/csv", icon=":material/download:")
exports.download_button("Download FHIR R4 Bundle (JSON)",
                        lambda: json.dumps(results_to_fhir_bundle(export_rows, card_dict), indent=2),
                        file_name="screening_fhir.json", mime="application/fhir+json", icon=":material/download:",
                        help="Preliminary Observations, one per readable image, each marked as decision support.")

# ---------------------------------------------------------------- results table
st.subheader("Results")
f1, f2 = st.columns([1, 3])
review_only = f1.toggle("Needs review only", key="batch_review_only")
show_classes = f2.multiselect("Suggested class", classes, default=classes, key="batch_class_filter",
                              help="Error rows (no class) are shown whenever 'Needs review only' is off.")
thumbs = ss["batch_thumbs"] if len(ss["batch_thumbs"]) == len(rows) else None
df = results_frame(rows, thumbnail_uris=thumbs)
df["confidence"] = df["confidence"].clip(upper=DISPLAY_MAX_CONFIDENCE)
keep = df["predicted_class"].isin(show_classes) | (df["status"] == "error")
if review_only:
    keep &= df["status"] == "review"
view = df[keep].reset_index(drop=True)
if len(view) > MAX_THUMBNAIL_ROWS:  # keep each redraw of a very large table small and fast
    view = view.drop(columns="thumbnail")
    st.caption(f"Thumbnails are hidden above {MAX_THUMBNAIL_ROWS} rows; filter the table to see them.")
st.caption(f"{len(view)} of {len(df)} row(s) shown. Select a row to open the cell and its Grad-CAM.")
event = st.dataframe(view, column_config=TABLE_COLUMNS, hide_index=True, on_select="rerun",
                     selection_mode="single-row", key=f"batch_table_{int(review_only)}_{'|'.join(show_classes)}",
                     height=min(480, 38 + 35 * max(len(view), 1)))
selected = event.selection.rows if event is not None else []

# ---------------------------------------------------------------- selected cell
if selected:
    idx = int(view.iloc[selected[0]]["#"])
    r = rows[idx]
    st.subheader(f"Cell #{idx}: {r['file']}")
    if r["status"] == "error":
        st.error(f"This file could not be classified: {r['reason']}", icon=":material/broken_image:")
    else:
        detail = ss["batch_detail"]
        if not detail or detail[0] != (ss["batch_model"], idx):
            try:
                image = read_image(ss["batch_sources"][idx].load())
                detail = ((ss["batch_model"], idx), predictor.predict([image])[0])
            except (ImageReadError, IndexError) as e:
                st.error(f"The image is no longer available ({e}). Run the screening again.")
                detail = ((ss["batch_model"], idx), None)
            ss["batch_detail"] = detail
        pred = detail[1]
    if r["status"] != "error" and pred is not None:
        c1, c2, c3 = st.columns([1, 1, 1.3])
        c1.image(pred.model_input, caption="What the model saw", width="stretch")
        method = c3.selectbox("Explanation method", list(GRADCAM_METHODS), key="batch_cam_method")
        alpha = c3.slider("Heatmap opacity", 0.0, 1.0, 0.45, 0.05, key="batch_cam_alpha")
        try:
            from bcc_core.explain import overlay

            heat = explanation_heatmap(pred.model_input, GRADCAM_METHODS[method], classes.index(pred.predicted_class))
            c2.image(overlay(pred.model_input, heat, alpha), caption=f"{method} for '{pred.predicted_class}'",
                     width="stretch")
        except Exception as e:
            c2.error(f"The explanation could not be computed ({type(e).__name__}: {e}).")
        with c3:
            show_suggestion(pred)
            show_status(pred.status, len(pred.flags))
        show_flags(pred.flags)
        st.plotly_chart(charts.probability_bar(pred.probabilities, classes, pred.predicted_class),
                        config={"displayModeBar": False}, key=f"batch_prob_{idx}")

# ---------------------------------------------------------------- review queue
st.subheader("Review queue")
queue = [i for i, r in enumerate(rows) if r["status"] == "review"]
ids = ss["batch_prediction_ids"]
if not queue:
    st.success("No cell in this batch was flagged for review.")
elif not ids:
    st.warning("The audit log was not available when this batch ran, so decisions cannot be stored.")
else:
    log = audit_log()
    current = log.queue(status="review", undecided_only=False).set_index("prediction_id")
    qdf = pd.DataFrame([{
        "#": i, "file": Path(rows[i]["file"]).name, "suggested class": rows[i]["predicted_class"],
        "confidence": min(rows[i]["confidence"], DISPLAY_MAX_CONFIDENCE), "flags": flag_codes(rows[i]["flags"]),
        "decision": current["decision"].get(ids.get(i)), "final class": current["final_class"].get(ids.get(i)),
        "reviewer": current["reviewer"].get(ids.get(i))} for i in queue])
    n_done = int(qdf["decision"].notna().sum())
    st.caption(f"{len(queue)} flagged cell(s), {n_done} decided. Each decision is stored with your name and the "
               "time in the audit log (append-only: a changed mind is a new decision, the history is kept).")
    st.dataframe(qdf.fillna({"decision": "pending", "final class": "", "reviewer": ""}), hide_index=True,
                 column_config={"confidence": st.column_config.NumberColumn(format="percent"),
                                "flags": st.column_config.TextColumn(width="medium")})
    pending = [i for i in queue if pd.isna(qdf.set_index("#").loc[i, "decision"])]
    if ss.get("review_pick") not in queue:
        ss["review_pick"] = pending[0] if pending else queue[0]

    def record_decision():
        """Form callback: store the decision, then move the form to the next undecided cell."""
        pick, decision, final = ss["review_pick"], ss["review_decision"], ss["review_final"]
        reviewer, comment = ss["reviewer"].strip(), ss["review_comment"].strip()
        if not reviewer:
            ss["review_notice"] = ("error", "Enter your name as reviewer: every decision in the audit log has an owner.")
            return
        if decision == "correct" and final == rows[pick]["predicted_class"]:
            ss["review_notice"] = ("error", f"'{final}' is the suggested class: choose 'confirm', or pick the class "
                                            "the cell really is.")
            return
        try:
            audit_log().record_decision(ids[pick], reviewer, decision, final if decision == "correct" else None,
                                        comment)
        except ValueError as e:
            ss["review_notice"] = ("error", f"The decision was not stored: {e}")
            return
        ss["review_notice"] = ("success", f"Recorded for #{pick} ({Path(rows[pick]['file']).name}): "
                                          f"{DECISION_LABELS[decision]}" + (f" → {final}" if decision == "correct" else "") + ".")
        later = [i for i in pending if i != pick]
        if later:
            ss["review_pick"] = later[0]
        ss["review_comment"] = ""

    with st.form("review_form"):
        st.selectbox("Flagged cell", queue, key="review_pick",
                     format_func=lambda i: f"#{i} {Path(rows[i]['file']).name}: suggested "
                                           f"{rows[i]['predicted_class']} ({fmt_prob(rows[i]['confidence'])})"
                                           + ("" if i in pending else " (decided)"))
        r1, r2 = st.columns(2)
        r1.radio("Decision", list(DECISION_LABELS), format_func=DECISION_LABELS.get, key="review_decision")
        r2.selectbox("Correct class (only for 'correct')", classes, key="review_final")
        r1.text_input("Reviewer", key="reviewer")
        r2.text_input("Comment (optional)", key="review_comment")
        st.form_submit_button("Record decision", type="primary", on_click=record_decision)
    if ss["review_notice"]:
        kind, text = ss["review_notice"]
        (st.success if kind == "success" else st.error)(text)
        ss["review_notice"] = None

    with st.expander("Audit log: all sessions (for quality review)"):
        everything = log.queue(status=None, undecided_only=False)
        agree = log.agreement()
        a = st.columns(3)
        a[0].metric("Predictions logged", len(everything))
        a[1].metric("Flagged, still undecided", int(((everything["status"] == "review")
                                                    & everything["decision"].isna()).sum()))
        a[2].metric("Reviewer agreement with the model", fmt_pct(agree.get("overall")),
                    help="Confirmed / (confirmed + corrected), from each cell's current decision.")
        st.download_button("Download the full audit trail (CSV)", log.export_csv(), file_name="audit_trail.csv",
                           mime="text/csv", icon=":material/download:", on_click="ignore")
