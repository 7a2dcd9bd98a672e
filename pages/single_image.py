"""Single image: one cell image → suggested class, calibrated confidence, flags and Grad-CAM."""

import re
from pathlib import Path

import streamlit as st

from pages._lib import charts
from bcc_core.results import ModelIdentity, ScreenResult
from bcc_core.io import IMAGE_EXTENSIONS, ImageReadError, content_hash, encode_png, read_image
from bcc_core.report import result_to_json
from pages._lib.ui_helpers import fmt_prob
from bcc_core.glossary import term
from pages._shared import (current_model_dir, explanation_heatmap, explanation_methods, init_state,
                           page_header, require_predictor, show_flags, show_result)

init_state()
page_header("Single image", "Upload one image like those the model was trained on. The model suggests a class "
                            "with a calibrated confidence, says when not to trust it, and shows where its "
                            "evidence lies.")
predictor = require_predictor()
card = predictor.card

# ---------------------------------------------------------------- input
from bcc_core.samples import sample_images  # noqa: E402

samples = sample_images(predictor.classes)  # bundled, attributed cells of this model's classes (assets/samples)
upload = st.file_uploader("Cell image (PNG, JPEG, TIFF, BMP or WebP)", key="single_upload",
                          type=[e.lstrip(".") for e in IMAGE_EXTENSIONS])
if samples:
    c_try, c_pick = st.columns([1, 2], vertical_alignment="bottom")
    pick = c_pick.selectbox("Sample cell", samples, key="single_sample_pick",
                            format_func=lambda s: f"{s.label}: {s.path.name}",
                            help="Held-out test cells of the pbs5 data set (CC BY 4.0), bundled with the app; "
                                 "sources in assets/samples/ATTRIBUTION.md.")
    if c_try.button("Try a sample", key="single_try_sample", icon=":material/science:"):
        st.session_state["single_sample"] = str(pick.path)
if upload is not None:
    src, name, data = upload, upload.name, upload.getvalue()
elif st.session_state.get("single_sample"):
    sample_path = Path(st.session_state["single_sample"])
    src, name, data = sample_path, sample_path.name, sample_path.read_bytes()
else:
    st.caption(f"Task `{card.task}`: images like the training set ({card.data.get('name', card.task)}). "
               f"Classes: {', '.join(card.classes)}. Anything else is at best flagged, at worst misnamed."
               + ("" if samples else " No sample cells are bundled for this model's classes."))
    st.stop()


def literal(text) -> str:
    """`text` escaped so Markdown shows it as typed: file names (and messages that quote them) are user input.
    Only emphasis, code, link, HTML, table, strike-through and maths marks are escaped (a name is never at the
    start of a line, so list and heading marks cannot act); line breaks become spaces."""
    return re.sub(r"([\\`*_\[\]<>|~$])", r"\\\1", " ".join(str(text).splitlines()))


# ---------------------------------------------------------------- one core call (cached per image and model)
key = (current_model_dir(), content_hash(data))
if (st.session_state["single"] or {}).get("key") != key:
    try:
        image = read_image(src)  # (not the bytes: the error message then names the file)
    except ImageReadError as e:
        st.session_state["single"] = None
        # The message quotes the file name, which is user input: shown as typed, never as Markdown.
        st.error("This file cannot be used: " + literal(e), icon=":material/broken_image:")
        st.stop()
    with st.spinner("Classifying…"):
        pred = predictor.predict([image])[0]
    st.session_state["single"] = {"key": key, "name": name, "image": image, "pred": pred, "sha256": key[1]}
res = st.session_state["single"]
image, pred = res["image"], res["pred"]

# ---------------------------------------------------------------- result: what not to trust first
st.subheader("Result")
c_res, c_img, c_in = st.columns([1.4, 1, 1], gap="medium")
with c_res:
    show_result(pred)
    if pred.prediction_set and len(pred.prediction_set) > 1:
        st.markdown(f"Classes the model cannot rule out: **{', '.join(pred.prediction_set)}**",
                    help=term("prediction set"))
    show_flags(pred.flags)
with c_img:
    st.image(image, caption=f"Original: {literal(res['name'])} ({image.shape[1]}×{image.shape[0]} px)", width="stretch")
with c_in:
    st.image(pred.model_input, caption=f"What the model saw ({pred.model_input.shape[1]}×"
                                       f"{pred.model_input.shape[0]}, {card.preprocessing.get('mode', '')} "
                                       f"crop, stain norm: {card.preprocessing.get('stain_norm', 'none')})",
             width="stretch")
st.plotly_chart(charts.probability_bar(pred.probabilities, predictor.classes, pred.predicted_class),
                config={"displayModeBar": False})

# ---------------------------------------------------------------- explanation
st.subheader("Grad-CAM explanation")
st.caption("Where the model found evidence for the chosen class, on the image it saw. It is not a segmentation: "
           "a hot spot on the background or the slide edge means the model may be using the wrong cue. All "
           "classes share one colour scale: a class the model finds little evidence for shows little heat.")
methods, methods_note = explanation_methods()
e_ctl, e_over, e_in = st.columns(3, gap="medium")
with e_ctl:
    method_label = st.selectbox("Method", list(methods), key="single_cam_method", help=methods_note)
    target = st.selectbox("Explain class", predictor.classes, index=predictor.classes.index(pred.predicted_class),
                          key=f"single_cam_target_{res['sha256'][:12]}",
                          help="Default: the suggested class. Pick another to see what speaks for it.")
    alpha = st.slider("Heatmap opacity", 0.0, 1.0, 0.45, 0.05, key="single_cam_alpha")
    st.caption(methods_note)
try:
    heat = explanation_heatmap(pred.model_input, methods[method_label], predictor.classes.index(target))
except Exception as e:  # an explanation failure must not hide the prediction
    heat = None
    e_over.error(f"The explanation could not be computed ({type(e).__name__}: {e}).")
if heat is not None:
    from bcc_core.explain import overlay

    over = overlay(pred.model_input, heat, alpha)
    e_over.image(over, caption=f"{method_label} for '{target}' (probability {fmt_prob(pred.probabilities[target])}), "
                               f"opacity {alpha:.2f}", width="stretch")
    e_in.image(pred.model_input, caption="Model input without overlay", width="stretch")

# ---------------------------------------------------------------- downloads
st.subheader("Downloads")
row = ScreenResult.from_prediction(res["name"], pred, res["sha256"], model=ModelIdentity.from_card(card)).to_row()
downloads = st.container(horizontal=True)
try:
    downloads.download_button("Result (JSON)", result_to_json(row, card.to_dict()),
                              file_name=f"{Path(res['name']).stem}_result.json", mime="application/json",
                              icon=":material/download:", on_click="ignore")
except ValueError as e:  # the result is still on screen; say why it cannot be exported
    downloads.warning(f"JSON export is not available: {e}")
if heat is not None:
    downloads.download_button("Overlay (PNG)", encode_png(over), mime="image/png", icon=":material/download:",
                              file_name=f"{Path(res['name']).stem}_{methods[method_label]}.png",
                              on_click="ignore")

# ---------------------------------------------------------------- keep it in a case (reviewed and signed there)
from pages._shared import db, session_user  # noqa: E402  (the section is self-contained)

user = session_user()
if user is not None and user.may("screen"):
    with st.expander("Keep this result as a case (review, sign-off and the audit trail on the Cases page)"):
        case_label = st.text_input("Sample label", key="single_case_label", max_chars=200)
        if st.button("Save as a case", key="single_case_save", icon=":material/save:", disabled=not case_label.strip()):
            import numpy as np
            from PIL import Image

            from bcc_core import cases
            from bcc_core.verification import model_identity

            ident = model_identity(current_model_dir())
            thumb = Image.fromarray(image)
            thumb.thumbnail((96, 96))
            engine = db()
            cid = cases.create_case(engine, user, case_label, ident["model_id"], ident["weights_sha256"], 1,
                                    model_version=cases.model_version(current_model_dir()))
            cases.add_result(engine, user, cid, 0, {**row, "thumbnail": np.asarray(thumb.convert("RGB"))})
            cases.finish(engine, user, cid)
            st.success(f"Saved as case #{cid} ({literal(case_label.strip())}); open it on the Cases page to review "
                       "and sign it.", icon=":material/task_alt:")
