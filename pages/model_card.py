"""Model card: the selected model's contract, written for a reader (what it is for, and what it is not for)."""

import json
from pathlib import Path

import streamlit as st

from bcc_core.glossary import describe_class, term
from pages._lib.ui_helpers import fmt_num, fmt_pct
from pages._shared import current_model_dir, init_state, page_header, require_card

init_state()
page_header("Model card")
card = require_card()
model_dir = Path(current_model_dir())


def bullet(d: dict, keys: list[str] | None = None) -> str:
    """Scalar entries of a card section as a Markdown list (nested dicts/lists are shown elsewhere)."""
    items = [(k, d[k]) for k in (keys or d) if k in d and not isinstance(d[k], (dict, list))]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    return "\n".join(f"- **{k.replace('_', ' ')}**: {fmt(v)}" for k, v in items)


# ---------------------------------------------------------------- for the clinician
ident = card.identity
st.markdown(f"### {card.model_id}\nTask **{card.task}** · version **{ident['version']}** · created "
            f"{card.created or 'n/a'}")
st.caption(f"Weights SHA-256 {ident['sha256'] or 'not recorded'}: every result, case, export and audit entry "
           "names the model by this identity, and loading refuses weights that do not match it.")
lineage = card.lineage or {}
if lineage:
    parent = lineage.get("parent") or {}
    st.info(f"Adapted to the lab **{lineage.get('lab', 'n/a')}** from model **{parent.get('model_id', 'n/a')}** "
            f"with that lab's reviewed cells.", icon=":material/account_tree:")

st.markdown("### Intended use")
st.markdown(card.intended_use)

st.markdown("### Must NOT be used for")
st.error("\n".join(f"- {x}" for x in card.not_for), icon=":material/block:")

st.markdown("### Classes")
st.markdown("\n".join(f"- `{c}` — {describe_class(c)}" for c in card.classes)
            + f"\n\nAny other cell type is outside the model ({len(card.classes)} classes): at best it is flagged, "
              "at worst it is named as one of these.")

st.markdown("### Limitations")
st.markdown("\n".join(f"- {x}" for x in card.limitations) if card.limitations else "None recorded (which is itself "
            "a limitation).")

st.markdown("### When a result is shown as OK")
rr = card.review_rule or {}
if rr.get("guarantee"):
    st.markdown(f"> {rr['guarantee']}", help=term("review rule"))
    m = rr.get("measured_on_test") or {}
    if m:
        st.markdown(f"On its test split (same labs as training) {fmt_pct(m.get('ok_fraction'))} of images were shown "
                    f"as OK, with an error rate of {fmt_pct(m.get('selective_error'))} among them. Images unlike the "
                    "training images, of poor quality or with a low confidence go to review. Figures with intervals "
                    "and on other labs: Model metrics page.")
else:
    st.warning("No review rule: treat every result as needing review.")

# ---------------------------------------------------------------- for developers and auditors
with st.expander("Technical details (for developers and auditors)"):
    st.markdown("#### Input and preprocessing")
    inp = card.input or {}
    st.markdown(f"Input {inp.get('size')}×{inp.get('size')}×{inp.get('channels')} {inp.get('colour')}, "
                f"{inp.get('dtype')} in {inp.get('range')}; normalisation is inside the model.\n\n"
                + bullet(card.preprocessing))
    st.markdown(f"Grad-CAM target layer: `{card.gradcam_layer}`")

    st.markdown("#### Training")
    tr = card.training or {}
    st.markdown(bullet(tr, ["backbone", "epochs", "epochs_run", "batch_size", "learning_rate", "class_weights",
                            "aug_views", "fine_tune_layers", "fine_tune_epochs", "fine_tune_lr", "swa_start",
                            "fast_path_frozen_features", "seed", "training_time_s"])
                or "Not recorded.")
    aug = tr.get("augment") or {}
    if aug.get("amp_mix_p"):
        st.markdown(f"Cross-lab augmentation: Fourier amplitude mixing with images of other classes "
                    f"(p = {aug['amp_mix_p']}), LAB stain jitter (p = {aug.get('lab_jitter_p')}), tight crops "
                    f"(p = {aug.get('tight_crop_p')}), blur up to σ {aug.get('blur_sigma_range', [0, 0])[1]}"
                    + (f", unsharp masking (p = {aug['unsharp_p']})" if aug.get("unsharp_p") else "") + ", "
                    f"resolution down to {aug.get('down_up_scale_range', [1, 1])[0]:.0%}.")

    st.markdown("#### Data provenance")
    data, split = card.data or {}, card.split or {}
    st.markdown((bullet(data) or "Not recorded.") + ("\n\n**Split**\n" + bullet(split) if split else ""))
    if data.get("class_counts"):
        st.markdown("Class counts: " + ", ".join(f"{c} {n}" for c, n in data["class_counts"].items()))

    st.markdown("#### Metrics (held-out test split)")
    t = (card.metrics or {}).get("test") or {}
    if t:
        st.markdown(f"- accuracy {fmt_pct(t.get('accuracy'))}\n- macro F1 {fmt_num(t.get('macro_f1'))}\n"
                    f"- Cohen's kappa {fmt_num(t.get('kappa'))}\n- ROC-AUC (macro) {fmt_num(t.get('roc_auc'))}\n"
                    f"- log loss {fmt_num(t.get('log_loss'))}\n- n = {t.get('n', 'n/a')}")
        pcf = (card.metrics or {}).get("per_class_f1") or {}
        if pcf:
            st.markdown("Per-class F1: " + ", ".join(f"{c} {fmt_num(v)}" for c, v in pcf.items()))
        st.caption("See the Model metrics page for the full dashboard.")
    else:
        st.info("No metrics are recorded in the card.")

    st.markdown("#### Calibration")
    cal = card.calibration or {}
    st.markdown(f"Temperature {fmt_num(cal.get('temperature'))} ({cal.get('method', 'temperature scaling')}); "
                f"ECE on test {fmt_num(cal.get('test_ece_before'))} before, {fmt_num(cal.get('test_ece_after'))} after.")
    views = int((card.trust or {}).get("views", 1))
    if views > 1:
        st.markdown(f"Each image is scored by its logits averaged over the image and its flips / 90° rotations "
                    f"({views} views); the trust layer was fitted on scores made the same way.")

    st.markdown("#### Out-of-distribution detection")
    ood = card.ood or {}
    st.markdown(bullet(ood) if ood else "None configured: unusual images are not flagged.")

    st.markdown("#### Review rule")
    if rr:
        st.markdown(bullet(rr, ["kind", "threshold", "alpha", "delta", "conformal_alpha"]))
    second = (card.trust or {}).get("second_opinion")
    if second:
        st.markdown(f"A result is shown as ok only when a second opinion, a head reading {second['reads']}, names "
                    f"the same class (`{second['file']}`, SHA-256 {second['sha256'][:12]}…); the review rule was "
                    f"fitted on the cells where the two agree.")
    st.markdown("#### Shortcut audit")
    sa = card.shortcut_audit or {}
    if sa.get("warnings"):
        for w in sa["warnings"]:
            st.error(w, icon=":material/report:")
    elif sa:
        st.success("No trivial cue (border colour, image size, colour histogram) predicts the class far above chance.")
    else:
        st.info("No shortcut audit recorded.")
    for where in ("raw_images", "model_inputs"):
        if sa.get(where):
            st.markdown(f"Balanced accuracy from one cue, {where.replace('_', ' ')} (chance {fmt_pct(sa.get('chance'))}): "
                        + ", ".join(f"{k.replace('_', ' ')} {fmt_pct(v)}" for k, v in sa[where].items()
                                    if not isinstance(v, dict)))

    st.markdown("#### Versions")
    st.markdown(bullet(card.versions or {}) or "Not recorded.")
    if card.parameters:
        st.markdown(bullet(card.parameters))

    st.markdown("#### Reproduce")
    st.code(card.reproduce or "not recorded", language="bash")

    raw = model_dir / "model_card.json"
    st.download_button("Download model_card.json", raw.read_bytes() if raw.is_file() else json.dumps(card.to_dict(), indent=2),
                       file_name=f"{card.model_id}_model_card.json",
                       mime="application/json", icon=":material/download:", on_click="ignore")
