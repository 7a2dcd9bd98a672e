"""Your lab: adapt the selected model to this lab's reviewed cells, compare, promote, roll back."""

import json
import shutil
import tempfile
from pathlib import Path

import pandas as pd
import streamlit as st

from bcc_core.adapt import describe_review, untaught_warning
from bcc_core.data import alike_classes
from bcc_core.lab_models import (list_lab_models, new_candidate_dir, promote, reviewed_labels, rollback,
                                 unpack_labelled_zip, write_reviewed_cells)
from pages._lib.ui_helpers import fmt_pct
from pages._shared import (available_models, current_model_dir, db, init_state, page_header, require_card,
                           require_user, session_user)

init_state()
page_header("Your lab", "Teach the selected model your lab's stain, scanner and cells from cells your reviewers "
                        "have classified: about 20 per class. The adapted model is compared with its parent on "
                        "cells it never saw, and used only once you promote it.")
card = require_card()
user = require_user()
parent = current_model_dir()
ss = st.session_state

# ---------------------------------------------------------------- 1. the lab's reviewed cells
st.subheader("1. Your lab's reviewed cells")
source = st.radio("Cells", ["Upload a labelled .zip", "Cells reviewed in this session (batch screening)"],
                  horizontal=True, key="lab_source")
cells_dir = None
if source.startswith("Upload"):
    up = st.file_uploader("A .zip with one folder per class (`basophil/cell001.png`, …). Folder names must be "
                          "the model's classes unless you allow new classes below.", type=["zip"], key="lab_zip")
    if up is not None:
        key = (up.name, up.size)
        if ss["lab_cells"] is None or ss["lab_cells"][0] != key:
            try:
                folder = unpack_labelled_zip(up.getvalue(), Path(tempfile.mkdtemp(prefix="bcc-lab-")) / "cells")
                ss["lab_cells"] = (key, str(folder))
            except (ValueError, OSError) as e:
                st.error(f"This archive cannot be used: {e}")
                ss["lab_cells"] = None
        cells_dir = ss["lab_cells"][1] if ss["lab_cells"] else None
else:
    rows, ids = ss["batch_rows"], ss["batch_result_ids"]
    if not rows or not ids:
        st.info("No batch has been screened and reviewed in this session. Screen a batch and record decisions on "
                "the Batch screening page, or upload a labelled .zip.")
    else:
        from bcc_core.cases import case_rows

        stored = case_rows(db(), ss["batch_case"])[1]
        current = pd.DataFrame([{"id": r["id"], "decision": r["decision"], "final_class": r["final_class"]}
                                for r in stored], columns=["id", "decision", "final_class"]).set_index("id")
        chosen = reviewed_labels(ids, current)
        key = ("session", ss["batch_run_id"], chosen)
        if chosen and (ss["lab_cells"] is None or ss["lab_cells"][0] != key):  # write the folder once per set
            items = [(label, rows[i]["file"], ss["batch_sources"][i].load()) for i, label in chosen]
            ss["lab_cells"] = (key, str(write_reviewed_cells(items, Path(tempfile.mkdtemp(prefix="bcc-lab-")) / "cells")))
        if chosen:
            cells_dir = ss["lab_cells"][1]
        else:
            st.info("No cell of this session's batch has a confirm or correct decision yet.")
class_map = {}
if cells_dir:
    counts = {p.name: sum(1 for f in p.iterdir() if f.is_file()) for p in sorted(Path(cells_dir).iterdir())
              if p.is_dir()}
    alike = {c: alike_classes(c, card.classes) for c in counts if c not in card.classes}
    alike = {c: m[0] for c, m in alike.items() if len(m) == 1}
    st.dataframe(pd.DataFrame([{"folder": c, "cells": n, "a class of the model": c in card.classes,
                                **({"may mean": alike.get(c, "")} if alike else {})}
                               for c, n in counts.items()]), hide_index=True)
    if alike and st.checkbox("Read these folders as the model's class they name: " + ", ".join(
            f"{c} → {m}" for c, m in alike.items()), value=True, key="lab_class_map"):
        class_map = alike

# ---------------------------------------------------------------- 2. adapt
st.subheader("2. Adapt")
c1, c2 = st.columns(2)
lab = c1.text_input("Lab name", key="lab_name", placeholder="e.g. Haematology, St Elsewhere")
c2.markdown(f"Adapting as **{user.username}**. " + ("You may promote and roll back models." if user.may("promote")
                                                     else "Promoting a model into use is for an administrator."))
may_promote = user.may("promote")
add = st.checkbox("Allow new classes (a folder that is not a model class, with at least 8 distinct cells, becomes "
                  "a new class)", key="lab_add_classes")
leave_out = st.checkbox("Leave out the cells whose label the model doubts (it adapts twice when it doubts any)",
                        key="lab_leave_out", value=True)
go = st.button("Adapt the model", type="primary", icon=":material/model_training:",
               disabled=not (cells_dir and lab.strip()))
if go:
    from bcc_core.adapt import AdaptConfig, adapt

    bar = st.progress(0.0, text="Starting…")
    out = new_candidate_dir(Path(parent).name, lab)
    try:
        summary = adapt(parent, cells_dir, out, AdaptConfig(lab=lab.strip(), add_classes=add, class_map=class_map,
                                                         doubted_labels="leave_out" if leave_out else "list"),
                        progress=lambda f, msg: bar.progress(min(max(float(f), 0.0), 1.0), text=msg))
        ss["lab_candidate"] = {"dir": str(out), "summary": summary, "parent": parent}
    except ValueError as e:
        st.error(f"Adaptation was not possible: {e}")
    bar.empty()

# ---------------------------------------------------------------- 3. compare, promote
def do_promote():
    """Callback (runs before the sidebar's model selector is drawn, so the new model can be selected)."""
    who = session_user()
    if who is None or not who.may("promote"):
        return
    target = promote(Path(ss["lab_candidate"]["dir"]), who.username, engine=db())
    ss["lab_candidate"] = None
    ss["model_dir"] = str(target)
    ss["lab_notice"] = f"Promoted as {target.name} by {who.username}; it is now selected and listed in the sidebar."


def do_discard():
    shutil.rmtree(ss["lab_candidate"]["dir"], ignore_errors=True)
    ss["lab_candidate"] = None


def do_rollback(model_dir: str, fallback: str | None):
    who = session_user()
    if who is None or not who.may("promote"):
        return
    rollback(Path(model_dir), who.username, engine=db())
    if ss["model_dir"] == model_dir:
        ss["model_dir"] = fallback
    ss["lab_notice"] = f"Rolled back {Path(model_dir).name}; it is no longer offered."


cand = ss["lab_candidate"]
if cand and Path(cand["dir"]).is_dir():
    st.subheader("3. Parent and adapted model, side by side")
    s = cand["summary"]
    b, a = s["before"], s["after"]
    st.caption(f"On {a['n']} of your lab's cells, each scored by a model fitted without it (the adapted model "
               f"itself learnt from every cell you gave), and on the parent's own test split." if s.get("cross_fitted")
               else f"On {a['n']} of your lab's cells held out from the adaptation (never used to fit the new model), "
               f"and on the parent's own test split.")
    table = [{"figure": f"recall {c}", "parent": fmt_pct(b["recall"].get(c)), "adapted": fmt_pct(a["recall"].get(c))}
             for c in sorted(set(b["recall"]) | set(a["recall"]))]
    table += [{"figure": "shown as OK", "parent": fmt_pct(b["ok_fraction"]), "adapted": fmt_pct(a["ok_fraction"])},
              {"figure": "wrong and shown as OK", "parent": f"{b['wrong_ok']} of {b['n']}",
               "adapted": f"{a['wrong_ok']} of {a['n']}"},
              {"figure": "macro-F1 on the parent's test split", "parent": f"{s['parent_test_macro_f1']['before']:.3f}",
               "adapted": f"{s['parent_test_macro_f1']['after']:.3f}"}]
    st.dataframe(pd.DataFrame(table), hide_index=True)
    st.caption(describe_review(s["review_rule"]))
    if s.get("untaught_white_cells"):
        st.warning(untaught_warning(s["untaught_white_cells"]) + ".")
    if s.get("labels_left_out"):
        st.info(f"Left out of the adaptation, their label doubted: {', '.join(s['labels_left_out'])}. Re-check them.")
    if s.get("labels_to_recheck"):
        st.warning(f"The model doubts the label of {len(s['labels_to_recheck'])} of your reviewed cells. It learnt "
                   "them as labelled: re-check these cells, correct any mislabelled ones and adapt again.")
        st.dataframe(pd.DataFrame([{"cell": d["file"], "labelled": d["label"], "p(label)": fmt_pct(d["p_label"]),
                                    "looks like": d["suggested"], "p(looks like)": fmt_pct(d["p_suggested"])}
                                   for d in s["labels_to_recheck"]]), hide_index=True)
    if a["n"] < 30:
        st.warning(f"These figures rest on {a['n']} held-out cells: each cell moves a class's recall by several "
                   "points. Verify the adapted model on more of your cells before relying on it.")
    p1, p2 = st.columns(2)
    p1.button("Promote: use the adapted model", type="primary", icon=":material/publish:", on_click=do_promote,
              disabled=not may_promote)
    p2.button("Discard", icon=":material/delete:", on_click=do_discard)
if ss["lab_notice"]:
    st.success(ss["lab_notice"])
    ss["lab_notice"] = None

# ---------------------------------------------------------------- verification report
st.subheader("Verify a model on your cells")
st.caption("Measures the selected model on the labelled cells above: per-class agreement with 95% intervals, "
           "kappa, shown as OK, wrong and OK, the confusion matrix. Use cells the model was not adapted on.")
if st.button("Verify the selected model", icon=":material/fact_check:", disabled=not (cells_dir and lab.strip())):
    from bcc_core.verification import save_report, verify_folder
    from pages._shared import require_predictor

    with st.spinner("Classifying your cells…"):
        rep = verify_folder(require_predictor(), cells_dir, class_map, name=lab.strip())
    save_report(current_model_dir(), rep)
    ss["lab_report"] = rep
rep = ss["lab_report"]
if rep:
    from bcc_core.verification import report_html

    st.markdown(f"**{rep['model']['model_id']}** on {rep['n']} cells of **{rep['name']}**: agreement "
                f"{fmt_pct(rep['agreement_known']['value'])} (95% CI {fmt_pct(rep['agreement_known']['ci95'][0])}–"
                f"{fmt_pct(rep['agreement_known']['ci95'][1])}), shown as OK {fmt_pct(rep['shown_as_ok']['value'])}, "
                f"wrong and OK {rep['wrong_and_ok']['k']} of {rep['n']}. Also on the Model metrics page.")
    st.download_button("Download the verification report (HTML)", report_html(rep), mime="text/html",
                       file_name=f"verification_{rep['name']}.html", icon=":material/download:", on_click="ignore")

# ---------------------------------------------------------------- lab models in use
st.subheader("Your lab's models")
lab_models = list_lab_models()
if not lab_models:
    st.caption("None promoted yet: the sidebar lists the bundled models only.")
for m in lab_models:
    lc = json.loads((m / "model_card.json").read_text())
    lin = lc.get("lineage") or {}
    r1, r2 = st.columns([4, 1])
    r1.markdown(f"**{m.name}** — lab {lin.get('lab', 'n/a')}, adapted from "
                f"{(lin.get('parent') or {}).get('model_id', 'n/a')} on {lc.get('created', 'n/a')}")
    parent_dir = (lin.get("parent") or {}).get("model_id")
    fallback = next((d for d in available_models() if Path(d).name == parent_dir), None)
    r2.button("Roll back", key=f"rollback_{m.name}", disabled=not may_promote, on_click=do_rollback,
              args=(str(m), fallback),
              help="Withdraw this model (kept on disk, recorded in the audit trail); its parent stays available.")
