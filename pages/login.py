"""Log in: the only page anyone sees before a user name and password (or the lab's identity provider) say
who they are. Every attempt is an entry in the audit trail; five failures in 15 minutes lock the account.

The first administrator is created on the server, never here: `python -m bcc_core users add NAME --role
admin`. A set-up screen shown while no user exists would give the administrator role to whoever opened the
page first; the command needs a shell on the server and write access to the database.
"""

import os

import streamlit as st

from bcc_core import trail, users
from bcc_core.store import database_url
from pages._shared import DISCLAIMER, db, init_state, log_in

init_state()
st.title("Blood-cell decision support")
st.caption(DISCLAIMER.replace("**", ""))
if st.session_state["login_notice"]:
    st.warning(st.session_state["login_notice"], icon=":material/timer_off:")

engine = db()
if users.count_users(engine) == 0:
    url = database_url()
    where = url.removeprefix("sqlite:///") if url.startswith("sqlite") else "the database in $BCC_DATABASE_URL"
    st.info("**No user account exists yet.** An administrator creates the first one on the server, in the "
            "app's folder:\n\n```\npython -m bcc_core users add YOUR_NAME --role admin\n```\n\n"
            f"(it asks for a password; the accounts are kept in `{where}`). Then reload this page and log in; "
            "the administrator adds everyone else on the *Users* page. There is no set-up screen on purpose: "
            "it would make whoever opens this page first the administrator.", icon=":material/person_add:")

if os.environ.get("BCC_AUTH", "").lower() == "oidc":
    # The lab's identity provider (configured in .streamlit/secrets.toml [auth], see Streamlit's st.login);
    # the role still comes from this app's user store, by the account's e-mail address.
    if not st.user.is_logged_in:
        st.button("Log in with your organisation's account", type="primary", on_click=st.login)
        st.stop()
    name = str(st.user.get("email") or st.user.get("name") or "")
    user = users.current(engine, name)
    if user is None:
        trail.record(engine, name or "(unknown)", "login.failed", "login", None, {"via": "oidc", "why": "no role"})
        st.error(f"{name} has no role in this app yet. Ask an administrator to add the account "
                 f"(`python -m bcc_core users add {name} --role reviewer`).")
        st.button("Log out of the identity provider", on_click=st.logout)
        st.stop()
    trail.record(engine, user.username, "login", "login", None, {"via": "oidc"})
    log_in(user)
    st.rerun()

with st.form("login", border=True, width=420):
    st.subheader("Log in")
    name = st.text_input("User name", key="login_user", autocomplete="username")
    password = st.text_input("Password", type="password", key="login_password", autocomplete="current-password")
    submitted = st.form_submit_button("Log in", type="primary", icon=":material/login:")
if submitted:
    try:
        user = users.login(engine, name, password)
    except users.AuthError as e:
        st.error(f"Not logged in: {e}.", icon=":material/lock:")
    else:
        log_in(user)
        st.rerun()
