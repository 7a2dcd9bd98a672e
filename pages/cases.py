"""Cases: find a screened sample, review its flagged cells from the stored predictions, sign it (read-only
afterwards), amend it with a reason, and export it (CSV, JSON, FHIR R4 DiagnosticReport, PDF)."""

import hashlib
import json
import re

import pandas as pd
import streamlit as st

from bcc_core import cases
from bcc_core.flags import Flag
from bcc_core.report import (case_differential, case_document, case_to_csv, case_to_fhir, case_to_json,
                             case_to_pdf, cell_final_class)
from bcc_core.users import AuthError
from bcc_core.worklist import decision_for, review_labels
from pages._lib.ui_helpers import fmt_prob
from pages._shared import (db, explanation_heatmap, explanation_methods, init_state, model_for_weights, page_header,
                           predictor_for, require_user, session_user, show_flags)

init_state()
page_header("Cases", "Every screening run is a case: find it by its sample label, review its flagged cells, "
                     "sign it, amend it with a reason, export its report.")
user = require_user()
engine = db()
ss = st.session_state

STATUS_WORDS = {"running": "incomplete", "incomplete": "incomplete", "complete": "complete", "signed": "signed"}
STATUS_FILTER = {"incomplete": ("running", "incomplete"), "complete": ("complete",), "signed": ("signed",)}
REJECT = "Image unusable"


def literal(text) -> str:
    """User text (labels, file names) shown as typed, never as Markdown."""
    return re.sub(r"([\\`*_\[\]<>|~$])", r"\\\1", " ".join(str(text).splitlines()))


def notice(kind: str, text: str) -> None:
    ss["case_notice"] = (kind, text)


# ---------------------------------------------------------------- find
f1, f2 = st.columns([2, 2])
search = f1.text_input("Search sample labels", key="case_search", placeholder="part of a label")
wanted = f2.multiselect("Status", list(STATUS_FILTER), default=list(STATUS_FILTER), key="case_status")
found = cases.list_cases(engine, search, tuple(s for w in wanted for s in STATUS_FILTER[w]))
if not found:
    st.info("No case matches. Cases are made on the Batch screening page (or by the command line: python -m "
            "bcc_core screen --case LABEL).")
    st.stop()
st.dataframe(pd.DataFrame([{
    "case": c["id"], "sample label": c["sample_label"], "status": STATUS_WORDS[c["status"]],
    "images": c["n_inputs"], "stored": c["rows"], "flagged": c["flagged"], "awaiting decision": c["pending"],
    "screened by": c["created_by"], "screened at": c["created_at"][:16].replace("T", " "),
    "signed by": c["signed_by"] or ""} for c in found]), hide_index=True, height=min(300, 38 + 35 * len(found)))
options = [c["id"] for c in found]
if ss["case_open"] not in options:
    ss["case_open"] = options[0]
ss["case_pick"] = ss["case_open"]
labels_of = {c["id"]: c for c in found}
st.selectbox("Open case", options, key="case_pick", on_change=lambda: ss.update(case_open=ss["case_pick"]),
             format_func=lambda i: f"#{i} {labels_of[i]['sample_label']} ({STATUS_WORDS[labels_of[i]['status']]})")
cid = ss["case_open"]
if cid not in ss["case_viewed"]:   # who opened which sample: once per session and case
    cases.record_view(engine, user, cid)
    ss["case_viewed"] = [*ss["case_viewed"], cid]

case, rows = cases.case_rows(engine, cid)
by_id = {r["id"]: r for r in rows}
signed = case["status"] == "signed"
word = STATUS_WORDS[case["status"]]

# ---------------------------------------------------------------- the case
st.subheader(f"Case #{case['id']}: {case['sample_label']}")
if signed:
    st.success(f"**Signed** by {case['signed_by']} at {case['signed_at'][:19].replace('T', ' ')} UTC. Read-only: "
               "a correction is an amendment with a reason; the original decision is kept.", icon=":material/lock:")
elif word == "incomplete":
    st.warning(f"**Incomplete**: {len(rows)} of {case['n_inputs']} images were stored before screening stopped (or it "
               "is still running). Resume it on the Batch screening page with the same inputs and sample label.",
               icon=":material/hourglass_bottom:")
else:
    st.info("**Complete**: every image is screened. A signer signs it when every flagged cell has a decision.",
            icon=":material/rule:")
pending = [r for r in rows if r["status"] == "review" and r["decision"] is None]
m = st.columns(5)
m[0].metric("Images", case["n_inputs"])
m[1].metric("OK", sum(r["status"] == "ok" for r in rows))
m[2].metric("Flagged", sum(r["status"] == "review" for r in rows))
m[3].metric("Awaiting decision", len(pending))
m[4].metric("Errors (unreadable)", sum(r["status"] == "error" for r in rows))
st.caption(f"Screened by {case['created_by']} at {case['created_at'][:19].replace('T', ' ')} UTC with model "
           f"**{case['model_id']}** (version {case.get('model_version') or 'n/a'}, weights SHA-256 "
           f"{case['model_sha256'][:16]}…).")

d1, d2 = st.columns([1, 1.4])
with d1:
    st.markdown("**Differential**" + (" (final)" if signed else " (working)"))
    st.dataframe(pd.DataFrame(case_differential(rows)).drop(columns="kind"), hide_index=True,
                 column_config={"percent": st.column_config.NumberColumn(format="%.1f%%")})
    st.caption("Classes: percent of the leukocytes counted. A cell counts only when shown as OK or decided by a "
               "reviewer; flagged cells wait under 'awaiting review' and never count as findings.")
with d2:
    st.markdown("**Cells**")
    st.dataframe(pd.DataFrame([{
        "#": r["seq"], "file": r["name"], "status": r["status"], "suggested": r["predicted_class"] or "",
        "confidence": r["confidence"], "decision": r["decision"] or ("pending" if r["status"] == "review" else ""),
        "counts as": cell_final_class(r) or "", "by": r["decided_by"] or "",
        "amended": bool(r["amendment"])} for r in rows]), hide_index=True, height=300,
        column_config={"confidence": st.column_config.NumberColumn(format="percent")})

if ss["case_notice"]:
    kind, text = ss["case_notice"]
    (st.success if kind == "success" else st.error)(text)
    ss["case_notice"] = None

def show_model_view(r: dict, original: bytes) -> None:
    """The kept original, what the model saw and the Grad-CAM, from the case's own model (same weights), and
    only when the recomputed prediction equals the stored one (nothing silently re-predicted)."""
    from bcc_core.explain import overlay
    from bcc_core.io import read_image

    model_dir = model_for_weights(case["model_sha256"])
    if model_dir is None:
        st.warning("The model this case was screened with (weights SHA-256 "
                   f"{case['model_sha256'][:16]}…) is no longer installed: only the stored prediction is shown.")
        return
    img = read_image(original)
    predictor = predictor_for(model_dir)
    again = predictor.predict([img])[0]
    stored = r["probabilities"] or {}
    diff = max((abs(float(again.probabilities.get(c, 0.0)) - float(p)) for c, p in stored.items()), default=0.0)
    if again.predicted_class != r["predicted_class"] or diff > 1e-3:
        st.error(f"The case's model now gives {again.predicted_class} for this image (stored: "
                 f"{r['predicted_class']}; probabilities differ by up to {diff:.4f}): not shown.")
        return
    methods, _ = explanation_methods(model_dir)
    label, method = next(iter(methods.items()))
    heat = explanation_heatmap(again.model_input, method, predictor.classes.index(again.predicted_class),
                               model_dir=model_dir)
    v = st.columns(3)
    v[0].image(img, caption="Original (kept with the case)", width="stretch")
    v[1].image(again.model_input, caption="What the model saw", width="stretch")
    v[2].image(overlay(again.model_input, heat, 0.45), caption=f"{label} for '{again.predicted_class}'",
               width="stretch")


# ---------------------------------------------------------------- review (from the stored predictions)
readable = [r for r in rows if r["status"] != "error"]
labels = review_labels(sorted({c for r in rows for c in (r["probabilities"] or {})}))
st.subheader("Amend a decision" if signed else "Review")
may_act = user.may("amend") if signed else user.may("decide")
if signed and not may_act:
    st.info(f"This case is signed and read-only. Your role ({user.role}) may not amend; a signer can.",
            icon=":material/lock:")
elif not may_act:
    st.info(f"Your role ({user.role}) may view cases but not record decisions.", icon=":material/visibility:")
elif not readable:
    st.info("No readable cell in this case.")
else:
    every = st.toggle("Every readable cell (not only the flagged ones)", key="case_all_cells", value=signed)
    queue = readable if every else [r for r in readable if r["status"] == "review"]
    if not queue:
        st.success("No cell was flagged. Switch on 'Every readable cell' to verify OK cells too.")
    else:
        ids = [r["id"] for r in queue]
        if ss["case_cell"] not in ids:
            nxt = next((r["id"] for r in queue if r["decision"] is None), ids[0])
            ss["case_cell"] = nxt
        ss["case_cell_pick"] = ss["case_cell"]
        st.selectbox("Cell", ids, key="case_cell_pick", on_change=lambda: ss.update(case_cell=ss["case_cell_pick"]),
                     format_func=lambda i: f"#{by_id[i]['seq']} {by_id[i]['name']} — {by_id[i]['predicted_class']}, "
                                           f"{by_id[i]['decision'] or 'pending'}")
        r = by_id[ss["case_cell"]]
        c_img, c_pred = st.columns([1, 2])
        png = cases.cell_image(engine, r.get("thumb_sha256"))
        if png:
            c_img.image(png, caption=f"Cell #{r['seq']} as screened (thumbnail)", width=192)
        else:
            c_img.caption("No image kept for this cell (screened from the command line, or its stored image no "
                          "longer matches its hash).")
        with c_pred:
            st.markdown(f"Stored prediction: **{r['predicted_class']}** ({fmt_prob(r['confidence'])}); top classes: "
                        + ", ".join(f"{c} {fmt_prob(p)}" for c, p in sorted((r["probabilities"] or {}).items(),
                                                                            key=lambda kv: -kv[1])[:3]))
            show_flags([Flag(**f) for f in r["flags"]])
            original = cases.cell_image(engine, r["image_sha256"])
            if original is not None and st.toggle("Show what the model saw and its Grad-CAM", key="case_show_cam",
                                                  help="Recomputed from the kept image with the case's model; "
                                                       "shown only when it gives the stored prediction again."):
                show_model_view(r, original)
            if r["decision"]:
                st.info(f"Current decision: **{r['decision']}**"
                        + (f" → {r['final_class']}" if r["final_class"] else "")
                        + f" by {r['decided_by']} ({r['decided_at'][:19].replace('T', ' ')})"
                        + (" — an amendment" if r["amendment"] else "") + ".", icon=":material/history:")

        def act(result_id: int, label: str) -> None:
            """Decision / amendment callback on the cell that was shown (its image hash goes with it)."""
            who = session_user()
            if who is None:
                return
            if ss["case_cell"] != result_id:
                notice("error", "Nothing was recorded: that cell is no longer the open one.")
                return
            cell = by_id[result_id]
            decision, final = ("reject_image", None) if label == REJECT else decision_for(label, cell["predicted_class"])
            try:
                cases.decide(engine, who, result_id, decision, final if decision == "correct" else None,
                             ss.get("case_comment", ""), reason=ss.get("case_reason", "") if signed else "",
                             expect_sha256=cell["image_sha256"])
            except (cases.CaseError, AuthError, ValueError) as e:
                notice("error", f"Not recorded: {e}")
                return
            notice("success", f"{'Amendment' if signed else 'Decision'} recorded for cell #{cell['seq']}: "
                              + {"confirm": "confirmed", "correct": f"→ {final}", "reject_image": "unusable"}[decision]
                              + f", by {who.username}.")
            ss["case_comment"] = ""
            ss["case_reason"] = ""
            later = [x["id"] for x in queue if x["decision"] is None and x["id"] != result_id]
            if later and not signed:
                ss["case_cell"] = later[0]

        if signed:
            st.text_input("Reason for the amendment (required; it appears in the case's reports)", key="case_reason")
        st.text_input("Comment (optional; exported only when you include comments)", key="case_comment")
        b = st.container(horizontal=True)
        b.button(f"Confirm {r['predicted_class']}", key="case_confirm", type="primary", icon=":material/check:",
                 shortcut="Enter", on_click=act, args=(r["id"], r["predicted_class"]))
        pick = b.selectbox("Reclassify as", [x for x in labels if x != r["predicted_class"]], key="case_relabel",
                           label_visibility="collapsed", width=220)
        b.button("Reclassify", key="case_reclassify", icon=":material/edit:", on_click=act, args=(r["id"], pick))
        b.button(REJECT, key="case_reject", icon=":material/block:", shortcut="X", on_click=act, args=(r["id"], REJECT))
        if signed:
            st.caption("Recording an amendment needs the reason above; the original decision stays in the history.")

# ---------------------------------------------------------------- sign
if not signed:
    st.subheader("Sign-off")
    if not user.may("sign"):
        st.caption(f"A signer signs the case once every flagged cell has a decision (your role: {user.role}).")
    else:
        ready = word == "complete" and not pending
        if word != "complete":
            st.caption("The case can be signed once screening is complete.")
        elif pending:
            st.caption(f"{len(pending)} flagged cell(s) still need a decision before the case can be signed.")
        attest = st.checkbox("I have reviewed the flagged cells and the differential of this case.",
                             key="case_attest", disabled=not ready)

        def do_sign() -> None:
            who = session_user()
            if who is None:
                return
            try:
                cases.sign(engine, who, cid)
            except (cases.CaseError, AuthError) as e:
                notice("error", f"Not signed: {e}")
                return
            notice("success", f"Case #{cid} signed by {who.username}. It is read-only now.")
            ss["case_attest"] = False

        st.button("Sign the case", type="primary", icon=":material/approval:", key="case_sign",
                  disabled=not (ready and attest), on_click=do_sign)

# ---------------------------------------------------------------- history
hist = cases.history(engine, cid)
with st.expander(f"Decision history ({len(hist)}; nothing is overwritten)", expanded=signed and any(
        h["amendment"] for h in hist)):
    if hist:
        st.dataframe(pd.DataFrame(hist).drop(columns=["id"]).rename(columns={"seq": "#", "decided_at": "at"}),
                     hide_index=True)
    else:
        st.caption("No decision yet.")

# ---------------------------------------------------------------- exports
st.subheader("Export")
st.caption("Pseudonymised by default: the case is named by its random id and cells by their number. Model id, "
           "version and weights SHA-256 are in every file. Each export is recorded in the audit trail with the "
           "SHA-256 of every file produced.")
o = st.columns(4)
inc_label = o[0].checkbox("Include the sample label", key="case_inc_label")
inc_names = o[1].checkbox("Include file names", key="case_inc_names",
                          help="File names and folders often carry patient names or record numbers.")
inc_comments = o[2].checkbox("Include reviewers' comments", key="case_inc_comments")
patient = o[3].text_input("Patient reference for FHIR (optional)", key="case_patient", placeholder="Patient/…")
options = {"sample_label": inc_label, "file_names": inc_names, "comments": inc_comments,
           "patient_reference": bool(patient.strip())}


def prepare() -> None:
    who = session_user()
    if who is None:
        return
    c, rs = cases.case_rows(engine, cid)
    doc = case_document(c, rs, cases.history(engine, cid), include_label=inc_label, include_names=inc_names,
                        include_comments=inc_comments)
    files = {"csv": case_to_csv(doc).encode(), "json": case_to_json(doc).encode()}
    if c["status"] == "signed":
        files["fhir"] = json.dumps(case_to_fhir(doc, patient_ref=patient.strip() or None), indent=2).encode()
        thumbs = {x["seq"]: png for x in rs if (x["status"] == "review" or x["decision"])
                  and (png := cases.cell_image(engine, x.get("thumb_sha256")))}
        files["pdf"] = case_to_pdf(doc, thumbnails=thumbs)
    cases.record_export(engine, who, cid, {"formats": sorted(files), "options": options,
                                           "sha256": {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}})
    ss["case_exports"] = (cid, options, files)


st.button("Prepare the exports", icon=":material/output:", key="case_prepare", on_click=prepare)
if not signed:
    st.caption("The report (FHIR DiagnosticReport, PDF) is issued once the case is signed; CSV and JSON hold the "
               "working data now.")
prepared = ss["case_exports"]
if prepared and prepared[0] == cid and prepared[1] == options:
    stem = f"case_{case['uid'][:8]}" + (f"_{re.sub(r'[^A-Za-z0-9_-]+', '_', case['sample_label'])}" if inc_label else "")
    kinds = {"csv": ("CSV", "text/csv", ".csv"), "json": ("JSON", "application/json", ".json"),
             "fhir": ("FHIR R4 DiagnosticReport (JSON)", "application/fhir+json", "_fhir.json"),
             "pdf": ("PDF report", "application/pdf", ".pdf")}
    dl = st.container(horizontal=True)
    for k, data in prepared[2].items():
        label, mime, ext = kinds[k]
        dl.download_button(f"Download {label}", data, file_name=stem + ext, mime=mime, icon=":material/download:",
                           on_click="ignore", key=f"case_dl_{k}")
