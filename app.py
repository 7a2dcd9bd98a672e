"""Blood-cell microscopy decision support: Streamlit entry point (`streamlit run app.py`).

Sets up the page and the session state; shows only the login page until someone has logged in; then the
pages the user's role allows, the model selector, who is logged in and the intended-use notice in the
sidebar, and runs the selected page from pages/. Every page calls the same bcc_core functions as the CLI
and checks the role itself as well.
"""

from pathlib import Path

import streamlit as st

from bcc_core.inference import wider_models
from pages._shared import available_models, card_or_error, init_state, log_out, models_root, session_user

st.set_page_config(page_title="Blood-cell decision support", page_icon=":material/biotech:", layout="wide",
                   menu_items={"About": "Decision support for a second reader of blood-cell images. "
                                        "Not a diagnosis: a qualified person makes every decision."})
init_state(shell=True)

user = session_user()
if user is None:  # nothing but the login page until someone has logged in
    st.navigation([st.Page("pages/login.py", title="Log in", icon=":material/login:")], position="hidden").run()
    st.stop()

pages = [
    st.Page("pages/single_image.py", title="Single image", icon=":material/image_search:", default=True),
    *([st.Page("pages/batch_screening.py", title="Batch screening", icon=":material/grid_view:")]
      if user.may("screen") else []),
    st.Page("pages/cases.py", title="Cases", icon=":material/folder_open:"),
    *([st.Page("pages/audit.py", title="Audit trail", icon=":material/verified_user:")] if user.may("audit") else []),
    st.Page("pages/metrics.py", title="Model metrics", icon=":material/monitoring:"),
    st.Page("pages/your_lab.py", title="Your lab", icon=":material/science:"),
    st.Page("pages/model_card.py", title="Model card", icon=":material/description:"),
    *([st.Page("pages/users.py", title="Users", icon=":material/group:")] if user.may("users") else []),
]
page = st.navigation(pages)

with st.sidebar:
    who = st.container(horizontal=True, vertical_alignment="center")
    who.markdown(f"**{user.username}** · {user.role}")
    who.button("Log out", key="logout", icon=":material/logout:", on_click=log_out, type="tertiary")
    models = available_models()
    if models:
        if st.session_state["model_dir"] not in models:
            st.session_state["model_dir"] = models[0]
        st.selectbox("Model", models, key="model_dir",
                     format_func=lambda p: Path(p).name + ("" if Path(p).parent == models_root() else " (your lab)"),
                     help=f"Every folder in `{models_root()}` that holds a model card. The choice applies to "
                          "every page.")
        card, error = card_or_error(st.session_state["model_dir"])
        if card is None:
            st.error(error)
        else:
            st.caption(f"Task `{card.task}` · {len(card.classes)} classes · backbone `{card.backbone}`")
            for other, extra in wider_models(st.session_state["model_dir"], models)[:1]:
                st.caption(f"`{Path(other).name}` names every class of this model and also {', '.join(extra)}: "
                           "choose it above when such cells may be screened.")
            with st.container(border=True):
                st.markdown("**Intended use**")
                st.caption(card.intended_use)
                st.markdown("**Not for**")
                st.caption("\n".join(f"- {x}" for x in card.not_for))
    else:
        st.error(f"No model in `{models_root()}`.")
    st.caption("Decision support, not a diagnosis.")

page.run()
