"""Streamlit glue shared by app.py and the pages: session state, cached model/card, banner, flags.

Not a page itself (app.py lists the pages explicitly with st.navigation). Everything that is not
Streamlit-specific lives here; charts and display helpers live in pages/_lib (tested without a browser).
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import streamlit as st

ROOT = Path(__file__).resolve().parents[1]

DISCLAIMER = ("**Decision support, not a diagnosis.** Suggestions are for a second reader; a qualified "
              "person makes every decision.")

# Every session-state key the app uses, with its initial value. Pages never invent keys elsewhere.
STATE_DEFAULTS: dict = {
    "model_dir": None,        # str: selected model directory (sidebar selector in app.py)
    "single": None,           # dict: last single-image result {key, name, image, pred, sha256}
    "batch_rows": [],         # list[dict]: screening rows (bcc_core.screening.screen), input order
    "batch_sources": [],      # list[ImageSource]: the sources behind batch_rows, same order
    "batch_thumbs": [],       # list[str | None]: thumbnail data URIs, same order as batch_rows
    "batch_run_id": "",       # str: identifies the screening run (cache key for its large thumbnails)
    "batch_model": None,      # str: model directory the batch was screened with
    "batch_case": None,       # int: id of the case the batch was screened into (bcc_core.cases)
    "batch_result_ids": {},   # {row index: result id} of the batch's rows stored in that case
    "batch_detail": None,     # ((model dir, row index), original image, Prediction) of the open cell
    "batch_open": None,       # int: row index of the cell open for review (decisions land on it only)
    "batch_table_pick": (),   # tuple[int]: rows selected in the results table at the last run
    "batch_seconds": None,    # float: wall time of the last screening run
    "batch_job": None,        # int: case id of the screening job (bcc_core.jobs) this session follows
    "user": None,             # dict {username, role, since, last_seen}: who is logged in (see session_user)
    "login_notice": None,     # str: why the last session ended (idle, account disabled), shown on the login page
    "case_open": None,        # int: the case open on the Cases page
    "case_cell": None,        # int: the result id open for review on the Cases page
    "case_viewed": [],        # list[int]: cases whose opening this session has already been recorded
    "case_exports": None,     # (case id, options, {format: bytes}): files prepared on the Cases page
    "case_notice": None,      # (kind, text): outcome of the last action on the Cases page, shown once
    "review_notice": None,    # (kind, text): outcome of the last review-form submission, shown once
    "lab_cells": None,        # ((upload name, size), folder): the unpacked labelled .zip on the Your lab page
    "lab_candidate": None,    # {"dir", "summary", "parent"}: the last adapted, not yet promoted model
    "lab_notice": None,       # str: outcome of the last promotion / roll-back, shown once
    "lab_report": None,       # dict: the last local verification report (bcc_core.verification)
}


def models_root() -> Path:
    """Where models are listed from: ``$BCC_MODELS_DIR`` (development, tests) or ``<repo>/models``."""
    return Path(os.environ.get("BCC_MODELS_DIR") or ROOT / "models")


def available_models() -> list[str]:
    """Model directories (as str) that hold a model_card.json: the bundled ones (default first), then the
    lab's promoted models (bcc_core.lab_models)."""
    from bcc_core.inference import list_models
    from bcc_core.lab_models import list_lab_models

    return [str(p) for p in list_models(models_root())] + [str(p) for p in list_lab_models()]


def _ensure_app_shell(shell: bool) -> None:
    """Make sure a page runs inside app.py (page config, model selector, navigation).

    Streamlit still supports the old "pages/ folder" apps: until app.py has called st.navigation once
    in this server process, a first visit straight to e.g. /metrics runs pages/metrics.py on its own,
    with an automatic menu listing every file (streamlit.testing's AppTest does this on every run).
    Such a page run executes app.py in its place, within the same run so that a button click is not
    lost, and stops. app.py sets a marker at the start of every run and the page consumes it, so a
    page run that did not go through app.py finds no marker.
    """
    if shell:
        st.session_state["_app_shell"] = True
        return
    through_app = st.session_state.get("_app_shell", False)
    st.session_state["_app_shell"] = False
    if through_app:
        return
    import runpy

    # app.py's st.navigation resolves the page that was asked for and runs it, marker set.
    runpy.run_path(str(ROOT / "app.py"), run_name="__main__")
    st.stop()


def init_state(shell: bool = False) -> None:
    """Create every session-state key once (idempotent; safe to call from every page).

    Args:
        shell: True only when called from app.py.
    """
    _ensure_app_shell(shell)
    for k, v in STATE_DEFAULTS.items():
        if k not in st.session_state:
            st.session_state[k] = copy.deepcopy(v)
    if not st.session_state["model_dir"]:
        models = available_models()
        if models:
            st.session_state["model_dir"] = models[0]


def _mtime(model_dir: str) -> float:
    p = Path(model_dir) / "model_card.json"
    return p.stat().st_mtime if p.is_file() else 0.0


@st.cache_resource(show_spinner="Loading the model (first use only)…", max_entries=4)
def _load_predictor(model_dir: str, card_mtime: float):
    """Load once per model directory (and card version); shared by all users, never mutated."""
    from bcc_core.inference import Predictor

    return Predictor.load(model_dir)


@st.cache_data(show_spinner=False, max_entries=16)
def _load_card(model_dir: str, card_mtime: float):
    from bcc_core.model_card import load_card

    return load_card(model_dir)


def current_model_dir() -> str | None:
    return st.session_state.get("model_dir")


def no_model_message() -> None:
    st.error(f"No model found in `{models_root()}`: there is no folder with a `model_card.json`. "
             "Train one with `python -m bcc_core train --data <folder> --out models/<id>` and reload this page.")


def require_predictor():
    """The selected model's Predictor, or an explanation on the page and st.stop()."""
    d = current_model_dir()
    if not d:
        no_model_message()
        st.stop()
    try:
        return _load_predictor(d, _mtime(d))
    except Exception as e:  # a broken model folder must not show a traceback to the user
        st.error(f"The model in `{d}` could not be loaded: {e}")
        st.stop()


def predictor_for(model_dir: str):
    """The Predictor of a given model directory (e.g. the one a batch was screened with), cached."""
    return _load_predictor(model_dir, _mtime(model_dir))


@st.cache_data(show_spinner=False, max_entries=16)
def _identity(model_dir: str, card_mtime: float) -> dict:
    from bcc_core.verification import model_identity

    return model_identity(model_dir)


def model_for_weights(weights_sha256: str) -> str | None:
    """The installed model directory whose weights have this SHA-256 (a case's model), or None."""
    for d in available_models():
        try:
            if _identity(d, _mtime(d))["weights_sha256"] == weights_sha256:
                return d
        except OSError:
            continue
    return None


def card_or_error(model_dir: str):
    """(ModelCard, None) or (None, reason) for a model directory; never raises."""
    try:
        return _load_card(model_dir, _mtime(model_dir)), None
    except Exception as e:  # invalid or missing card: say why instead of a traceback
        return None, f"The model card in `{model_dir}` could not be read: {e}"


def require_card():
    """The selected model's ModelCard (no TensorFlow needed), or a message and st.stop()."""
    d = current_model_dir()
    if not d:
        no_model_message()
        st.stop()
    card, error = card_or_error(d)
    if card is None:
        st.error(error)
        st.stop()
    return card


def page_header(title: str, intro: str | None = None) -> None:
    """Compact header on every page: the title (what the page does in its tooltip) and one line with the
    decision-support notice and the model in use, so results start high on the screen."""
    st.title(title, help=intro)
    d = current_model_dir()
    model = f" Model: **{Path(d).name}** (change it in the sidebar)." if d else ""
    st.info(DISCLAIMER + model, icon=":material/medical_information:")


SEVERITY_TITLE = {"critical": "Critical", "warning": "Warning", "info": "Note"}


def show_flags(flags) -> None:
    """Each flag as a coloured box (critical → red): what is wrong and what to do next, said once."""
    from bcc_core.flags import FLAG_TITLES, next_step

    for f in flags or []:
        title = FLAG_TITLES.get(f.code, f.code)
        try:
            step = next_step(f.code)
        except ValueError:
            step = "Review the cell yourself."
        text = f"**{title}** ({SEVERITY_TITLE.get(f.severity, f.severity)}): {f.message}"
        if step not in f.message:  # quality and shortcut messages already end with their next step
            text += f"\n\n**Next step:** {step}"
        if f.severity == "critical":
            st.error(text, icon=":material/error:")
        elif f.severity == "warning":
            st.warning(text, icon=":material/warning:")
        else:
            st.info(text, icon=":material/info:")


def show_result(pred) -> None:
    """The headline a reviewer reads first, from the most severe flag, then the model's suggestion.

    When the image is not recognised or not usable, that is the headline and the suggested class is
    a secondary line in normal type; otherwise the suggestion and its calibrated confidence are shown
    as metrics under the status.
    """
    from bcc_core.flags import verdict
    from bcc_core.glossary import describe_class, term
    from pages._lib.ui_helpers import fmt_prob

    v = verdict(pred.flags)
    box = {"do_not_use": st.error, "unknown": st.error, "review": st.warning, "ok": st.success}[v.level]
    icon = {"do_not_use": ":material/block:", "unknown": ":material/help:", "review": ":material/rate_review:",
            "ok": ":material/check_circle:"}[v.level]
    box(f"**{v.headline}**", icon=icon)
    if v.trust_suggestion:
        m1, m2 = st.columns(2)
        m1.metric("Suggested class", pred.predicted_class, help=describe_class(pred.predicted_class))
        m2.metric("Calibrated confidence", fmt_prob(pred.confidence), help=term("calibrated confidence"))
    else:
        st.markdown(f"The model's guess, **not reliable for this image**: {pred.predicted_class} "
                    f"({fmt_prob(pred.confidence)}). Models are often confidently wrong on images unlike "
                    "their training data.")
    st.markdown(describe_class(pred.predicted_class))


@st.cache_data(show_spinner="Computing the explanation heatmap…", max_entries=64)
def heatmap(model_dir: str, card_mtime: float, model_input, method: str, class_index: int):
    """Cached Grad-CAM-family heatmap (S, S) float in [0, 1] for one model input."""
    from bcc_core.explain import explain

    return explain(_load_predictor(model_dir, card_mtime), model_input, method=method, class_index=class_index)


@st.cache_data(show_spinner=False, max_entries=16)
def _offered(model_dir: str, card_mtime: float):
    from bcc_core.explain import offered_methods

    return offered_methods(model_dir)


def explanation_methods(model_dir: str | None = None) -> tuple[dict, str]:
    """{label: method} the app may offer for the model (those that passed its sanity checks), and a note."""
    from pages._lib.ui_helpers import GRADCAM_METHODS

    d = model_dir or current_model_dir()
    names, note = _offered(d, _mtime(d))
    return {label: m for label, m in GRADCAM_METHODS.items() if m in names}, note


def explanation_heatmap(model_input, method: str, class_index: int, model_dir: str | None = None):
    """Heatmap from `model_dir` (default: the selected model), cached."""
    d = model_dir or current_model_dir()
    return heatmap(d, _mtime(d), model_input, method, int(class_index))


# ---------------------------------------------------------------- who is logged in

IDLE_MINUTES_ENV = "BCC_SESSION_IDLE_MINUTES"


def idle_minutes() -> float:
    """A session ends after this long without a page action (default 30; $BCC_SESSION_IDLE_MINUTES)."""
    try:
        return float(os.environ.get(IDLE_MINUTES_ENV) or 30)
    except ValueError:
        return 30.0


@st.cache_resource(show_spinner=False, max_entries=4)
def _engine(url: str):
    from bcc_core.store import open_store

    return open_store(url)


def db():
    """The store (cases, users, trail): $BCC_DATABASE_URL or SQLite in $BCC_DATA_DIR, opened once per URL."""
    from bcc_core.store import database_url

    return _engine(database_url())


def log_in(user) -> None:
    """Start a session for a user that bcc_core.users.login returned."""
    now = time.time()
    st.session_state["user"] = {"username": user.username, "role": user.role, "since": now, "last_seen": now}
    st.session_state["login_notice"] = None


def log_out(why: str | None = None) -> None:
    """End the session (a trail entry names the reason) and forget everything it held."""
    from bcc_core import trail

    u = st.session_state.get("user")
    if u:
        try:
            trail.record(db(), u["username"], "logout", "login", None, {"reason": why or "user"})
        except Exception:  # the session ends even when the database cannot be reached
            pass
    for k, v in STATE_DEFAULTS.items():
        if k != "model_dir":
            st.session_state[k] = copy.deepcopy(v)
    if why == "idle":
        st.session_state["login_notice"] = (f"You were logged out after {idle_minutes():.0f} minutes without "
                                            "activity. Log in again to continue.")
    elif why == "disabled":
        st.session_state["login_notice"] = "Your account was disabled or removed by an administrator."


def session_user():
    """The logged-in bcc_core.users.User, re-read from the store on every run (a role changed or an account
    disabled by an administrator takes effect at once), or None (idle sessions end)."""
    from bcc_core import users

    u = st.session_state.get("user")
    if not u:
        return None
    now = time.time()
    if now - u["last_seen"] > idle_minutes() * 60:
        log_out("idle")
        return None
    cur = users.current(db(), u["username"])
    if cur is None:
        log_out("disabled")
        return None
    u.update(last_seen=now, role=cur.role)
    return cur


def require_user():
    """The logged-in user; app.py shows only the login page to anyone else, so this stops only a page run
    outside app.py."""
    user = session_user()
    if user is None:
        st.error("Log in first.")
        st.stop()
    return user


def require_permission(action: str):
    """The logged-in user if their role may do `action` (bcc_core.users.PERMISSIONS), else a message and stop."""
    user = require_user()
    if not user.may(action):
        from bcc_core.users import PERMISSIONS

        roles = ", ".join(r for r, p in PERMISSIONS.items() if action in p)
        st.error(f"Your role ({user.role}) does not include this page. Roles that do: {roles}. An administrator "
                 "can change your role.", icon=":material/lock:")
        st.stop()
    return user
