"""One view of how far a model agrees with its reviewers over signed cases (bcc_core.cases.agreement):
shown on the Audit trail page (any model) and on the Model metrics page (the selected model)."""

import pandas as pd
import streamlit as st

from pages._lib.ui_helpers import fmt_pct


def _ci(r: dict) -> str:
    if r["value"] is None:
        return "n/a (no cell)"
    return f"{fmt_pct(r['value'])} [{fmt_pct(r['ci95'][0])}, {fmt_pct(r['ci95'][1])}] ({r['k']} of {r['n']})"


def show_agreement(a: dict) -> None:
    """Signed cases, reviewed cells, kappa, agreement and correction rates with Wilson 95% intervals, confusion."""
    if not a["reviewed"]:
        st.info(f"{a['cases']} signed case(s), no reviewed cell yet: nothing to compare.")
        return
    k = st.columns(3)
    k[0].metric("Signed cases", a["cases"])
    k[1].metric("Cells a reviewer decided", a["reviewed"], help=f"Of {a['cells']} readable cells in signed cases.")
    k[2].metric("Cohen's kappa", "n/a" if a["kappa"] is None else f"{a['kappa']:.2f}")
    st.dataframe(pd.DataFrame([
        {"figure": "model agrees with the final class", "value [Wilson 95%]": _ci(a["agreement"])},
        {"figure": "flagged cells corrected by the reviewer", "value [Wilson 95%]": _ci(a["flagged_corrected"])},
        {"figure": "OK cells corrected by the reviewer (the review rule's miss rate here)",
         "value [Wilson 95%]": _ci(a["ok_corrected"])},
        {"figure": "OK cells a reviewer looked at", "value [Wilson 95%]": _ci(a["ok_reviewed"])},
        {"figure": "images marked unusable", "value [Wilson 95%]": str(a["rejected"])},
    ]), hide_index=True)
    if a["ok_reviewed"]["n"] and a["ok_reviewed"]["k"] < 30:
        st.caption("Fewer than 30 OK cells were reviewed: the OK-cell figure cannot yet say whether the review "
                   "rule holds in this lab. Verify OK cells too (the review toggle) on some cases.")
    st.markdown("**Confusion** (rows: the model's class, columns: the final class)")
    st.dataframe(pd.DataFrame(a["confusion"], index=a["labels"], columns=a["labels"]))
