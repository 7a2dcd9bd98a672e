"""Users (administrators): who may use the app and in which role; every change is an audit-trail entry."""

import pandas as pd
import streamlit as st

from bcc_core import users
from bcc_core.store import ROLES
from pages._shared import db, init_state, page_header, require_permission

init_state()
page_header("Users", "Accounts and roles: viewer (reads cases), reviewer (screens and decides), signer (also "
                     "signs and amends), admin (also manages users, promotes lab models and reads the audit trail).")
admin = require_permission("users")
engine = db()
ss = st.session_state

if ss.get("users_notice"):
    kind, text = ss["users_notice"]
    (st.success if kind == "success" else st.error)(text)
    ss["users_notice"] = None

st.dataframe(pd.DataFrame(users.list_users(engine)), hide_index=True)

st.subheader("Add a user")
with st.form("users_add", clear_on_submit=True):
    c = st.columns(3)
    name = c[0].text_input("User name", key="users_new_name")
    role = c[1].selectbox("Role", ROLES, index=1, key="users_new_role")
    c2 = st.columns(3)
    pw = c2[0].text_input("Initial password (at least 10 characters)", type="password", key="users_new_pw")
    pw2 = c2[1].text_input("Repeat it", type="password", key="users_new_pw2")
    if st.form_submit_button("Add user", type="primary", icon=":material/person_add:"):
        if pw != pw2:
            ss["users_notice"] = ("error", "The two passwords differ; nobody was added.")
        else:
            try:
                users.add_user(engine, name, pw, role, actor=admin.username)
                ss["users_notice"] = ("success", f"Added {name.strip()} ({role}).")
            except ValueError as e:
                ss["users_notice"] = ("error", f"Not added: {e}.")
        st.rerun()

st.subheader("Change a user")
everyone = [u["username"] for u in users.list_users(engine)]
who = st.selectbox("User", everyone, key="users_pick")
u = next(x for x in users.list_users(engine) if x["username"] == who)
c = st.columns(3)
new_role = c[0].selectbox("Role", ROLES, index=ROLES.index(u["role"]), key=f"users_role_{who}")


def run(fn, done: str) -> None:
    try:
        fn()
        ss["users_notice"] = ("success", done)
    except ValueError as e:
        ss["users_notice"] = ("error", f"Not changed: {e}.")


c[0].button("Set role", key="users_set_role", disabled=new_role == u["role"],
            on_click=run, args=(lambda: users.set_role(engine, who, new_role, admin.username),
                                f"{who} is now {new_role}."))
c[1].button("Disable" if u["active"] else "Enable", key="users_toggle",
            on_click=run, args=(lambda: users.set_active(engine, who, not u["active"], admin.username),
                                f"{who} is {'disabled' if u['active'] else 'enabled'}."),
            help="A disabled user is logged out at their next page action; their records stay.")
new_pw = c[2].text_input("New password", type="password", key="users_reset_pw")
c[2].button("Reset password", key="users_reset", disabled=len(new_pw) < 10,
            on_click=run, args=(lambda: users.set_password(engine, who, new_pw, admin.username),
                                f"{who}'s password was reset; tell them in person."))
