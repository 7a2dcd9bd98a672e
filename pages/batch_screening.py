"""Batch screening: many images → a case (sample label) screened by a background job of the server (bcc_core.jobs)
whose rows are stored as they arrive, its progress (followed again when the page is reopened), a review queue
whose decisions go to the case, and the working differential."""

import re
import time
from pathlib import Path

import pandas as pd
import streamlit as st

from pages._lib import charts
from bcc_core.io import (IMAGE_EXTENSIONS, ImageReadError, content_hash, iter_image_sources, read_image,
                         server_folder_policy, sources_from_uploads)
from bcc_core import cases, jobs
from bcc_core.report import differential
from bcc_core.users import AuthError
from pages._lib.ui_helpers import flag_codes, png_data_uri, results_frame, summary_counts
from bcc_core.worklist import Worklist, decision_for, review_labels
from pages._shared import (current_model_dir, db, explanation_heatmap, explanation_methods, init_state,
                           page_header, predictor_for, require_permission, require_predictor, session_user,
                           show_flags, show_result)

init_state()
page_header("Batch screening", "Screen many images at once into a case: uploaded images, a .zip of images, or "
                               "a folder on the server. Every input gets a row, stored as it is screened; "
                               "unreadable files get a reason.")
user = require_permission("screen")
engine = db()
predictor = require_predictor()
classes = predictor.classes
ss = st.session_state

MAX_THUMBNAIL_ROWS = 2000
DISPLAY_MAX_CONFIDENCE = 0.999  # a table cell reading "100%" would claim a certainty no model has

DECISION_LABELS = {"confirm": "confirmed the suggested class", "reject_image": "image marked unusable"}
# The prediction shown for an open cell is recomputed from the image (for the model input and Grad-CAM); a
# decision is taken only when it equals the one stored in the case (same image hash, same weights).
SAME_PREDICTION_TOL = 1e-3
REJECT = "__reject_image__"  # the "Image unusable" button's label (not a cell type)

TABLE_COLUMNS = {
    "#": st.column_config.NumberColumn("#", width="small"),
    "thumbnail": st.column_config.ImageColumn("cell", width="small"),
    "file": st.column_config.TextColumn("file", width="medium"),
    "verdict": st.column_config.TextColumn("result", width="medium",
                                           help="The most severe flag in words, as the cell's detail view says it."),
    "predicted_class": st.column_config.TextColumn("suggested class"),
    "confidence": st.column_config.ProgressColumn("confidence", min_value=0.0, max_value=100.0, format="%.1f%%",
                                                  help="Calibrated. Shown at most as 99.9%: never as a certainty."),
    "why": st.column_config.TextColumn("why", width="large",
                                       help="The flags raised; open the cell for each flag's full explanation."),
}
# Shown columns; the full flag messages (`reason`) are in the cell's detail view and in the CSV.
TABLE_ORDER = ["#", "thumbnail", "file", "verdict", "predicted_class", "confidence", "why"]


LARGE_THUMB = 96  # px, the size screening keeps (ScreeningConfig.thumbnail)


@st.cache_data(show_spinner="Encoding larger thumbnails…", max_entries=2)
def large_thumbnails(run_id: str, n: int) -> list:
    """Data URIs of the batch's thumbnails at full kept size (computed once per run, on demand)."""
    return [png_data_uri(r.get("thumbnail"), max_side=LARGE_THUMB) for r in st.session_state["batch_rows"][:n]]


def literal(text) -> str:
    """`text` escaped so Markdown shows it as typed: file names (and reasons that quote them) are user input.
    Only emphasis, code, link, HTML, table, strike-through and maths marks are escaped (a name is never at the
    start of a line, so list and heading marks cannot act); line breaks become spaces."""
    return re.sub(r"([\\`*_\[\]<>|~$])", r"\\\1", " ".join(str(text).splitlines()))


def display(frame):
    """The table as shown: confidence in percent (one decimal everywhere), capped below certainty."""
    return frame.assign(confidence=frame["confidence"].clip(upper=DISPLAY_MAX_CONFIDENCE) * 100)


# ---------------------------------------------------------------- inputs
# Server folders only under the roots an administrator allowed (BCC_IMAGE_ROOTS); off otherwise.
folder_policy = server_folder_policy()
mode = (st.radio("Input", ["Upload images or a .zip", "Folder on the server"], horizontal=True, key="batch_mode")
        if folder_policy.roots else "Upload images or a .zip")
if mode == "Upload images or a .zip":
    uploads = st.file_uploader("Images (PNG, JPEG, TIFF, BMP, WebP) and/or .zip archives of them",
                               accept_multiple_files=True, key="batch_uploads",
                               type=[e.lstrip(".") for e in IMAGE_EXTENSIONS] + ["zip"])
    folder = ""
else:
    uploads = []
    folder = st.text_input("Folder path on the server (searched recursively; a .zip path also works)",
                           key="batch_folder", placeholder=folder_policy.roots[0])
    st.caption(f"Folders the administrator allowed: {literal(', '.join(folder_policy.roots))}. At most "
               f"{folder_policy.max_files} images are listed from one folder.")

label = st.text_input("Sample label (slide or accession number)", key="batch_sample_label", max_chars=200,
                      placeholder="e.g. 26-H-004512 slide 1",
                      help="The case is saved under this label and found by it on the Cases page. Exports leave "
                           "it out unless you include it.").strip()
unfinished = cases.find_unfinished(engine, label) if label else None
resume = False
if unfinished:
    resume = st.checkbox(f"Resume the unfinished case '{literal(label)}' (#{unfinished['id']}): {unfinished['rows']} of "
                         f"{unfinished['n_inputs']} images stored, started by {unfinished['created_by']} at "
                         f"{unfinished['created_at'][:16].replace('T', ' ')}", value=True, key="batch_resume",
                         help="Give the same inputs: the images already stored are not screened again. Off: a new "
                              "case with the same label.")
from bcc_core.samples import sample_batch_paths, sample_batch_sources  # noqa: E402

n_samples = len(sample_batch_paths())
buttons_row = st.container(horizontal=True)
run = buttons_row.button("Resume screening" if resume else "Run screening", type="primary",
                         icon=":material/play_arrow:", disabled=not ((uploads or folder.strip()) and label))
try_sample = buttons_row.button(
    "Try the sample batch", key="batch_try_sample", icon=":material/science:", disabled=not n_samples,
    help=f"Screen the {n_samples} bundled sample images (cells of every pbs5 class, an out-of-focus cell, a blank "
         "frame and a file that is not an image; assets/samples) into a new case under the sample label, or "
         "'sample batch' when it is empty.")
if try_sample:  # the same path as a run on uploads: a new case, never a resumed one
    label, resume = label or "sample batch", False
if (uploads or folder.strip()) and not label:
    st.caption("Enter the sample label to run: every screening run is saved as a case.")


@st.cache_data(show_spinner=False, max_entries=8)
def model_identity(model_dir: str, card_mtime: float) -> dict:
    from bcc_core.verification import model_identity as ident

    return ident(model_dir)


def stored_row(r: dict) -> dict:
    """A row stored in the case, in the shape screening returns (to show a resumed case's earlier rows)."""
    from bcc_core.flags import Flag
    from bcc_core.io import read_image as decode

    png = cases.cell_image(engine, r.get("thumb_sha256"))
    return {"file": r["name"], "status": r["status"], "predicted_class": r["predicted_class"],
            "confidence": r["confidence"], "flags": [Flag(**f) for f in r["flags"]], "reason": r["reason"],
            "probabilities": r["probabilities"], "sha256": r["image_sha256"],
            "thumbnail": decode(png) if png else None}


class _Upload:
    """An upload's name and bytes, copied out of the session: the uploader's objects die with the rerun that a
    widget click starts, and the run goes on in the background."""

    def __init__(self, f):
        self.name, self._data = f.name, bytes(f.getvalue())

    def getvalue(self) -> bytes:
        return self._data


if run or try_sample:
    if try_sample:
        sources = sample_batch_sources()
    elif uploads:
        sources = sources_from_uploads([_Upload(f) for f in uploads])
    else:
        sources = list(iter_image_sources([folder.strip()], policy=folder_policy))
    if not sources:
        st.warning("No image files found there. Accepted: " + ", ".join(IMAGE_EXTENSIONS) + ", or a .zip of them.")
        st.stop()
    ident = model_identity(current_model_dir(), Path(current_model_dir(), "model_card.json").stat().st_mtime)
    stored: dict[int, dict] = {}
    if resume:
        case_id = unfinished["id"]
        if unfinished["n_inputs"] != len(sources) or unfinished["model_sha256"] != ident["weights_sha256"]:
            st.error(f"Case #{case_id} was started with {unfinished['n_inputs']} images and model "
                     f"{unfinished['model_id']}; these are {len(sources)} images on {ident['model_id']}. Give the "
                     "same inputs with the same model, or switch off 'Resume' to start a new case.")
            st.stop()
        stored = {r["seq"]: r for r in cases.case_rows(engine, case_id)[1]}
        for seq, r in stored.items():
            src = sources[seq]
            try:
                same = r["name"] == cases.relative_name(src.name) and (
                    r["image_sha256"] is None or content_hash(src.load()) == r["image_sha256"])
            except OSError:
                same = False
            if not same:
                st.error(f"Input #{seq} ({literal(cases.relative_name(src.name))}) is not the image stored as #{seq} "
                         f"of case #{case_id} ({literal(r['name'])}). Give the same inputs in the same order.")
                st.stop()
    else:
        case_id = cases.create_case(engine, user, label, ident["model_id"], ident["weights_sha256"], len(sources),
                                    model_version=cases.model_version(current_model_dir()))
    # The run is a job of the server process (bcc_core.jobs), not of this page run: a widget click (a rerun)
    # or a closed tab does not stop it, and the page follows it by polling the store.
    try:
        jobs.start(engine, user, case_id, sources, predictor, todo=[k for k in range(len(sources)) if k not in stored],
                   model_dir=current_model_dir())
    except jobs.JobRefused as e:
        st.error(f"Not started: {literal(e)}.")
        st.stop()
    ss["batch_job"] = case_id
    ss["batch_rows"], ss["batch_case"], ss["batch_detail"], ss["batch_open"] = [], None, None, None
    ss["user"]["last_seen"] = time.time()   # a long run is activity, not idleness


def load_job(job) -> None:
    """The session shows an ended job's case: its stored rows (the run's own names for the inputs), sources, model."""
    case, stored = cases.case_rows(engine, job.case_id)
    by_seq = {r["seq"]: r for r in stored}
    n = next((k for k in range(len(job.sources) + 1) if k not in by_seq), len(job.sources))  # rows 0..n-1 stored
    rows = []
    for k in range(n):
        row = stored_row(by_seq[k])
        row["file"] = job.sources[k].name if k < len(job.sources) else row["file"]
        rows.append(row)
    ss["batch_rows"], ss["batch_sources"], ss["batch_model"] = rows, job.sources, job.model_dir or current_model_dir()
    ss["batch_thumbs"] = [png_data_uri(r.get("thumbnail"), max_side=48) for r in rows]
    ss["batch_run_id"] = f"{job.case_id}-{job.started_at}"
    ss["batch_seconds"] = (job.ended_at or time.time()) - job.started_at
    ss["batch_detail"], ss["batch_open"], ss["batch_table_pick"] = None, None, ()
    ss["batch_case"], ss["batch_result_ids"] = job.case_id, {k: by_seq[k]["id"] for k in range(n)}


@st.fragment(run_every=1.0)
def follow_job(case_id: int) -> None:
    """The running job's progress, read from the store every second; when it has ended, the whole page reruns to
    show the case. Clicks elsewhere rerun the page and find the job still running."""
    job = jobs.get(engine, case_id)
    if job is None or not job.running:
        st.rerun()
    done, n = jobs.progress(engine, case_id)
    if ss["user"]:
        ss["user"]["last_seen"] = time.time()   # a long run is activity, not idleness
    st.progress(done / max(n, 1), text=f"Screened {done} of {n}")
    st.caption(f"Case #{case_id} is being screened: {done} of {n} images stored. The run goes on if you use the "
               "page or close it; open this page again to follow it and see the results.")


if ss["batch_job"] is None and not ss["batch_rows"]:  # a page opened anew: the user's run in this server, if any
    mine = jobs.latest(engine, user.username)
    ss["batch_job"] = mine.case_id if mine is not None else None
job = jobs.get(engine, ss["batch_job"]) if ss["batch_job"] is not None else None
if job is not None and job.running:
    follow_job(job.case_id)
    st.stop()
if job is not None and ss["batch_case"] != job.case_id:
    load_job(job)
if job is not None and job.error and ss["batch_case"] == job.case_id:
    st.error(f"The run of case #{job.case_id} stopped: {literal(job.error)}. The {len(ss['batch_rows'])} row(s) "
             "stored are kept in the case; give the same inputs and sample label to resume it.",
             icon=":material/error:")

rows = ss["batch_rows"]
if not rows:
    st.stop()
if ss["batch_model"] != current_model_dir():
    st.warning(f"These results come from model `{Path(ss['batch_model']).name}`, not the one selected now. "
               "Run the screening again to use the selected model.")

# ---------------------------------------------------------------- the case and its decisions so far (the store)
ids = ss["batch_result_ids"]
case, stored_now = cases.case_rows(engine, ss["batch_case"])
current = {r["seq"]: r for r in stored_now if r["decision"] is not None}


def current_decision(i):
    """The case's current decision on row i ({decision, final_class, reviewer, decided_at}) or None."""
    r = current.get(i)
    return None if r is None else {"decision": r["decision"], "final_class": r["final_class"],
                                   "reviewer": r["decided_by"], "decided_at": r["decided_at"],
                                   "amendment": r["amendment"]}


decided = {i: (r["decision"], r["final_class"]) for i, r in current.items()}
signed = case["status"] == "signed"
status_word = {"running": "incomplete", "incomplete": "incomplete"}.get(case["status"], case["status"])
c1, c2 = st.columns([4, 1], vertical_alignment="center")
c1.markdown(f"Case **{literal(case['sample_label'])}** (#{case['id']}) · **{status_word}** · {len(stored_now)} of "
            f"{case['n_inputs']} images stored · screened by {case['created_by']}"
            + (f" · signed by {case['signed_by']}: read-only, corrections are amendments on the Cases page"
               if signed else ""))
if c2.button("Open in Cases", icon=":material/folder_open:", key="batch_to_case",
             help="The case on the Cases page: sign-off, amendments, exports."):
    ss["case_open"] = case["id"]
    st.switch_page("pages/cases.py")

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
try:
    diff = differential(rows, classes, decided)
except ValueError as e:  # an export problem must not hide the results
    diff = None
    s2.warning(f"Differential not available: {e}")
if diff is not None:
    with s1:
        st.plotly_chart(charts.differential_bar(dict(zip(diff["category"], diff["count"])), list(diff["category"]),
                                                title="Working differential (all images of the batch)"),
                        config={"displayModeBar": False})
    with s2:
        st.markdown("**Working differential** (percent of all images)")
        st.dataframe(diff, hide_index=True,
                     column_config={"percent": st.column_config.NumberColumn("percent", format="%.1f%%")})
st.caption("A cell counts under a class only when it is shown as OK or a reviewer has decided it; flagged cells "
           "wait under 'awaiting review'. A differential from a model is a screening aid, not a count to report.")

st.caption("Sign-off and the case's exports (CSV, JSON, FHIR R4 DiagnosticReport, PDF; pseudonymised by default) "
           "are on the Cases page.")

# ---------------------------------------------------------------- results table
st.subheader("Results")
f1, f2, f3 = st.columns([1, 1, 3])
review_only = f1.toggle("Needs review only", key="batch_review_only")
large = f2.toggle("Large thumbnails", key="batch_large_thumbs", help=f"{LARGE_THUMB} px instead of 48 px.")
show_classes = f3.multiselect("Suggested class", classes, default=classes, key="batch_class_filter",
                              help="Error rows (no class) are shown whenever 'Needs review only' is off.")
thumbs = ss["batch_thumbs"] if len(ss["batch_thumbs"]) == len(rows) else None
if large:
    thumbs = large_thumbnails(ss["batch_run_id"], len(rows))
df = results_frame(rows, thumbnail_uris=thumbs)
keep = df["predicted_class"].isin(show_classes) | (df["status"] == "error")
if review_only:
    keep &= df["status"] == "review"
view = df[keep].reset_index(drop=True)
if len(view) > MAX_THUMBNAIL_ROWS:  # keep each redraw of a very large table small and fast
    view = view.drop(columns="thumbnail")
    st.caption(f"Thumbnails are hidden above {MAX_THUMBNAIL_ROWS} rows; filter the table to see them.")
st.caption(f"{len(view)} of {len(df)} row(s) shown. Select a row to open the cell for review below.")
row_h = LARGE_THUMB + 8 if large else 35
event = st.dataframe(display(view), column_config=TABLE_COLUMNS, column_order=TABLE_ORDER, hide_index=True,
                     on_select="rerun", selection_mode="single-row", row_height=row_h,
                     key=f"batch_table_{int(review_only)}_{'|'.join(show_classes)}",
                     height=min(560, 38 + row_h * max(len(view), 1)))
selected = event.selection.rows if event is not None else []

# ---------------------------------------------------------------- review: one open cell, decided in place
# A decision is made on the cell shown above its buttons and nowhere else: each button carries that
# cell's row index, so what is recorded is always the cell the reviewer was looking at.
st.subheader("Review")
include_ok = st.toggle("Verify every cell (not only the flagged ones)", key="batch_verify_all",
                       help="Off: the worklist holds the cells that need review. On: every readable cell.")
work = Worklist.from_rows(rows, [i for i in ids if current_decision(i)], include_ok=include_ok)
picked = tuple(int(view.iloc[j]["#"]) for j in selected)
if picked != ss["batch_table_pick"]:  # a row clicked in the table opens that cell
    ss["batch_table_pick"] = picked
    if picked:
        ss["batch_open"] = int(picked[0])
if ss["batch_open"] is None or ss["batch_open"] >= len(rows):
    ss["batch_open"] = work.next_pending(None) if work.pending else (work.order[0] if work.order else None)


def go(offset=0):
    """Navigation callback: previous/next cell of the worklist (offset -1/+1), or the next undecided one."""
    now = ss["batch_open"]
    ss["batch_open"] = work.next_pending(now) if offset == 0 else work.step(now, offset)


def record(i, label):
    """Decision callback for row i: store it in the case as the logged-in user, then open the next undecided
    cell. Refused when the cell is no longer the open one, or its prediction is not the one stored."""
    comment = ss.get(f"review_comment_{i}", "").strip()
    if ss["batch_open"] != i:  # a key pressed while the page was still showing an earlier cell
        ss["review_notice"] = ("error", f"Nothing was recorded: that decision was for cell #{i}, which is no "
                                        f"longer the open cell (#{ss['batch_open']} is). Decide on the cell shown.")
        return
    detail = ss["batch_detail"]
    if not detail or detail[0] != (ss["batch_model"], i) or detail[3]:
        ss["review_notice"] = ("error", f"Nothing was recorded for #{i}: the prediction shown could not be matched "
                                        "with the one stored in the case.")
        return
    who = session_user()
    if who is None:
        return
    if label == REJECT:
        decision, final = "reject_image", None
    else:
        decision, final = decision_for(label, rows[i]["predicted_class"])
    try:
        cases.decide(engine, who, ids[i], decision, final if decision == "correct" else None, comment,
                     expect_sha256=rows[i]["sha256"])
    except (cases.CaseError, AuthError, ValueError, KeyError) as e:
        ss["review_notice"] = ("error", f"The decision on #{i} was not stored: {e}")
        return
    ss["review_notice"] = ("success", f"Recorded for #{i} ({literal(Path(rows[i]['file']).name)}): "
                                      + (f"{DECISION_LABELS[decision]}" if decision != "correct" else
                                         f"corrected to {final}") + ".")
    done = Worklist(work.order, work.decided | {i})
    ss["batch_open"] = done.next_pending(i) if done.pending else i


if not work.order and ss["batch_open"] is None:
    st.success("No cell in this batch was flagged for review. Switch on 'Verify every cell' to verify them all.")
nav = st.container(horizontal=True, vertical_alignment="center")
nav.markdown(f"Deciding as **{user.username}** ({user.role})")
nav.button("Previous", key="review_prev", icon=":material/arrow_back:", shortcut="P", on_click=go, args=(-1,),
           disabled=not work.order, help="Previous cell of the worklist (key P).")
nav.button("Next", key="review_next", icon=":material/arrow_forward:", shortcut="N", on_click=go, args=(1,),
           disabled=not work.order, help="Next cell of the worklist (key N).")
nav.button("Next undecided", key="review_next_pending", icon=":material/skip_next:", shortcut="U", on_click=go,
           disabled=not work.pending, help="The next cell without a decision (key U).")
nav.caption(f"Worklist: {len(work.order)} cell(s), {len(work.order) - len(work.pending)} decided, "
            f"{len(work.pending)} to go.")
if ss["review_notice"]:
    kind, text = ss["review_notice"]
    (st.success if kind == "success" else st.error)(text)
    ss["review_notice"] = None

def binding_problem(stored: dict, again) -> str | None:
    """Why the prediction recomputed for display is not the one stored in the case (None when it is)."""
    ident = model_identity(ss["batch_model"], Path(ss["batch_model"], "model_card.json").stat().st_mtime)
    if ident["weights_sha256"] != case["model_sha256"]:
        return "the model's weights have changed since this case was screened."
    diff = max(abs(float(again.probabilities.get(c, 0.0)) - float(p))
               for c, p in (stored.get("probabilities") or {}).items()) if stored.get("probabilities") else 0.0
    if again.predicted_class != stored["predicted_class"] or diff > SAME_PREDICTION_TOL:
        return (f"the model now gives {again.predicted_class} for this image, the case holds "
                f"{stored['predicted_class']} (probabilities differ by up to {diff:.4f}).")
    return None


idx = ss["batch_open"]
if idx is not None:
    r = rows[idx]
    pos = f" ({work.order.index(idx) + 1} of {len(work.order)} in the worklist)" if idx in work.order else ""
    st.markdown(f"#### Cell #{idx}{pos}")
    st.text(f"File: {r['file']}")
    pred, original, heat_slot = None, None, None
    if r["status"] == "error":
        st.error(f"This file could not be classified: {literal(r['reason'])}", icon=":material/broken_image:")
    else:
        detail = ss["batch_detail"]
        if not detail or detail[0] != (ss["batch_model"], idx):
            try:
                data = ss["batch_sources"][idx].load()
                if content_hash(data) != r["sha256"]:
                    raise ImageReadError("the file has changed since it was screened")
                original = read_image(data)
                again = predictor_for(ss["batch_model"]).predict([original])[0]
                detail = ((ss["batch_model"], idx), original, again, binding_problem(r, again))
            except (ImageReadError, IndexError, OSError) as e:
                st.error(f"The image is no longer available as screened ({e}). Run the screening again.")
                detail = ((ss["batch_model"], idx), None, None, str(e))
            ss["batch_detail"] = detail
        _, original, pred, problem = detail
        if problem and pred is not None:
            st.error(f"Decisions on this cell are off: {problem}", icon=":material/link_off:")
    if pred is not None:
        c_res, c0, c1, c2 = st.columns([1.5, 1, 1, 1], gap="small")
        with c_res:
            show_result(pred)
            show_flags(pred.flags)
        c0.image(original, caption=f"Original ({original.shape[1]}×{original.shape[0]} px)", width="stretch")
        c1.image(pred.model_input, caption="What the model saw (cropped, stain-normalised)", width="stretch")
        # The heatmap is drawn last (end of the page): the decision buttons must not wait for it.
        heat_slot = c2.empty()
        heat_slot.caption("Computing the explanation…")
    if r["status"] != "error" and idx in ids and signed:
        st.info(f"Case signed by {case['signed_by']}: read-only. A correction is an amendment with a reason, on "
                "the Cases page.", icon=":material/lock:")
    elif r["status"] != "error" and idx in ids:
        now = current_decision(idx)
        if now:
            st.info(f"Current decision: **{now['decision']}**" + (f" → {now['final_class']}" if now["final_class"] else "")
                    + f" by {now['reviewer']} ({now['decided_at']}). A new decision is added to the history.",
                    icon=":material/history:")
        st.markdown(f"**Decide on cell #{idx}** — the cell shown above. Enter confirms the suggestion; "
                    "a number key assigns that class; X marks the image unusable.")
        labels = review_labels(classes)
        buttons = st.container(horizontal=True)
        buttons.button(f"Confirm {r['predicted_class']}", key=f"decide_{idx}_confirm", type="primary",
                       icon=":material/check:", shortcut="Enter", on_click=record, args=(idx, r["predicted_class"]))
        for n, label in enumerate(labels):
            key_hint = str((n + 1) % 10) if n < 10 else None
            buttons.button(label, key=f"decide_{idx}_{label}",
                           shortcut=key_hint, on_click=record, args=(idx, label),
                           help=f"Record '{label}' for cell #{idx}" + (f" (key {key_hint})" if key_hint else ""))
        buttons.button("Image unusable", key=f"decide_{idx}_reject", icon=":material/block:", shortcut="X",
                       on_click=record, args=(idx, REJECT), help="Not a usable single-cell image (key X).")
        st.text_input("Comment on this cell (optional, stored with the decision)", key=f"review_comment_{idx}")
    if pred is not None:
        with st.expander("Explanation settings and all class probabilities"):
            e1, e2 = st.columns(2)
            offered, offered_note = explanation_methods(ss["batch_model"])
            e1.selectbox("Explanation method", list(offered), key="batch_cam_method", help=offered_note)
            e2.slider("Heatmap opacity", 0.0, 1.0, 0.45, 0.05, key="batch_cam_alpha")
            st.plotly_chart(charts.probability_bar(pred.probabilities, classes, pred.predicted_class),
                            config={"displayModeBar": False}, key=f"batch_prob_{idx}")

if work.order:
    qdf = pd.DataFrame([{
        "#": i, "file": Path(rows[i]["file"]).name, "status": rows[i]["status"],
        "suggested class": rows[i]["predicted_class"],
        "confidence": min(rows[i]["confidence"], DISPLAY_MAX_CONFIDENCE), "flags": flag_codes(rows[i]["flags"]),
        **{k: (current_decision(i) or {}).get(v) for k, v in (("decision", "decision"), ("final class", "final_class"),
                                                              ("reviewer", "reviewer"))}} for i in work.order])
    with st.expander(f"Worklist: {len(work.order)} cell(s), decisions so far", expanded=False):
        st.dataframe(qdf.fillna({"decision": "pending", "final class": "", "reviewer": ""}), hide_index=True,
                     column_config={"confidence": st.column_config.NumberColumn(format="percent"),
                                    "flags": st.column_config.TextColumn(width="medium")})

# ---------------------------------------------------------------- the open cell's explanation, drawn last
if idx is not None and heat_slot is not None and pred is not None:
    try:
        from bcc_core.explain import overlay

        methods, _ = explanation_methods(ss["batch_model"])
        method = st.session_state.get("batch_cam_method") or next(iter(methods))
        method = method if method in methods else next(iter(methods))
        heat = explanation_heatmap(pred.model_input, methods[method], classes.index(pred.predicted_class),
                                   model_dir=ss["batch_model"])
        heat_slot.image(overlay(pred.model_input, heat, st.session_state.get("batch_cam_alpha", 0.45)),
                        caption=f"{method} for '{pred.predicted_class}' "
                                f"({pred.probabilities[pred.predicted_class]:.1%})", width="stretch")
    except Exception as e:
        heat_slot.error(f"The explanation could not be computed ({type(e).__name__}: {e}).")
