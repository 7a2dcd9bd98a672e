"""Audit trail (signers and administrators): does the hash chain verify, who did what and when, and how far
the model agrees with the reviewers' final classes over the signed cases."""

import json

import pandas as pd
import sqlalchemy as sa
import streamlit as st

from bcc_core import cases, store, trail
from pages._agreement import show_agreement
from pages._shared import db, init_state, page_header, require_permission

init_state()
page_header("Audit trail", "Every action (login, screening, decision, sign-off, amendment, export, user and model "
                           "changes) is an entry chained to the one before by SHA-256: a changed or removed entry, "
                           "or a row changed behind the app's back, breaks the chain.")
user = require_permission("audit")
engine = db()

# ---------------------------------------------------------------- does it verify?
st.subheader("Integrity")
if st.button("Verify the whole trail", type="primary", icon=":material/verified:", key="audit_verify"):
    trail.record(engine, user.username, "audit.verify", "audit")
    st.session_state["audit_result"] = trail.verify(engine)
res = st.session_state.get("audit_result")
if res is not None:
    if res["ok"]:
        st.success(f"The trail verifies: {res['entries']} entries, every case, result, decision and user row "
                   "matches the last entry that wrote it.", icon=":material/verified_user:")
    else:
        first = (f"first broken entry: {res['first_broken']}" if res["first_broken"] is not None
                 else f"first problem: {res['problems'][0]['entity']} row {res['problems'][0]['id']}")
        st.error(f"**The trail does not verify**: {len(res['problems'])} problem(s); {first}. Keep the database as "
                 "it is and tell the quality manager.", icon=":material/gpp_bad:")
        st.dataframe(pd.DataFrame(res["problems"]), hide_index=True)
else:
    st.caption("Recomputes every hash from the first entry on (the command line does the same: python -m bcc_core "
               "audit verify).")

# ---------------------------------------------------------------- who did what
st.subheader("Who did what")
with engine.connect() as con:
    actors = [r[0] for r in con.execute(sa.select(store.trail.c.actor).distinct().order_by(store.trail.c.actor))]
    actions = [r[0] for r in con.execute(sa.select(store.trail.c.action).distinct().order_by(store.trail.c.action))]
f = st.columns([1, 1, 1, 1])
who = f[0].multiselect("Who", actors, key="audit_actor")
what = f[1].multiselect("Action", actions, key="audit_action")
since = f[2].date_input("From (UTC)", value=None, key="audit_since")
until = f[3].date_input("Until (UTC, inclusive)", value=None, key="audit_until")
q = sa.select(store.trail).order_by(store.trail.c.id.desc())
if who:
    q = q.where(store.trail.c.actor.in_(who))
if what:
    q = q.where(store.trail.c.action.in_(what))
if since:
    q = q.where(store.trail.c.at >= since.isoformat())
if until:
    q = q.where(store.trail.c.at < (pd.Timestamp(until) + pd.Timedelta(days=1)).date().isoformat())
LIMIT = 2000
with engine.connect() as con:
    entries = [dict(r._mapping) for r in con.execute(q.limit(LIMIT))]


def summary(e: dict) -> str:
    """A short, readable account of what an entry changed (hashes and password hashes left out)."""
    after = json.loads(e["after"]) if e["after"] else {}
    before = json.loads(e["before"]) if e["before"] else {}
    after.pop("password_hash", None)
    before.pop("password_hash", None)
    if before:
        changed = {k: v for k, v in after.items() if before.get(k) != v}
        return ", ".join(f"{k}: {before.get(k)} → {v}" for k, v in changed.items())[:200]
    keep = ("sample_label", "name", "status", "predicted_class", "decision", "final_class", "comment", "username",
            "role", "formats", "options", "reason", "model_id", "via")
    return ", ".join(f"{k}: {after[k]}" for k in keep if after.get(k) not in (None, "", [], {}))[:200]


st.dataframe(pd.DataFrame([{"#": e["id"], "at (UTC)": e["at"][:19].replace("T", " "), "who": e["actor"],
                            "action": e["action"], "on": f"{e['entity']} {e['entity_id'] or ''}".strip(),
                            "what": summary(e)} for e in entries]), hide_index=True, height=420)
st.caption(f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'} shown"
           + (f" (the latest {LIMIT}; narrow the filters to see older ones)" if len(entries) == LIMIT else "") + ".")
st.download_button("Download these entries (CSV)", pd.DataFrame(entries).to_csv(index=False), mime="text/csv",
                   file_name="audit_trail.csv", icon=":material/download:", on_click="ignore")

# ---------------------------------------------------------------- agreement over signed cases
st.subheader("Model and reviewers, over signed cases")
models = cases.signed_models(engine)
if models:
    pick = st.selectbox("Model", range(len(models)), key="audit_model",
                        format_func=lambda i: f"{models[i]['model_id']} (version {models[i]['model_version'] or 'n/a'}, "
                                              f"weights {models[i]['model_sha256'][:12]}…): {models[i]['cases']} "
                                              "signed case(s)",
                        help="Each model is measured on its own cases: one model's figures say nothing about another's.")
    a = cases.agreement(engine, models[pick]["model_sha256"])
else:
    a = cases.agreement(engine)


show_agreement(a)
