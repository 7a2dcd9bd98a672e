"""Who may do what: a local user store with argon2 password hashes and four roles.

viewer (read), reviewer (decide on cells), signer (decide and sign cases), admin (everything, users).
Labs with an identity provider can use Streamlit's OIDC login instead; the role then comes from this
store by user name. Every change to a user is a trail entry.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa

from . import store, trail

# What each role may do; a role includes the permissions listed for it only.
PERMISSIONS = {
    "viewer": {"view"},
    "reviewer": {"view", "screen", "decide"},
    "signer": {"view", "screen", "decide", "sign", "amend", "audit"},
    "admin": {"view", "screen", "decide", "sign", "amend", "audit", "users", "promote"},
}

# Failed logins within this window that lock an account (one message for every refusal, so a locked
# account and a wrong password cannot be told apart). Each failure is a trail entry, so this survives restarts.
MAX_FAILED_LOGINS = 5
LOCKOUT_MINUTES = 15


class AuthError(PermissionError):
    """Login failed or the user may not do this."""


@dataclass(frozen=True)
class User:
    username: str
    role: str

    def may(self, action: str) -> bool:
        return action in PERMISSIONS.get(self.role, set())

    def require(self, action: str) -> None:
        if not self.may(action):
            raise AuthError(f"{self.username} ({self.role}) may not {action}; ask an administrator for a role "
                            f"that may ({', '.join(r for r, p in PERMISSIONS.items() if action in p)}).")


def _hasher():
    from argon2 import PasswordHasher

    return PasswordHasher()


def add_user(engine, username: str, password: str, role: str, actor: str = "admin-cli") -> User:
    """Create a user (argon2id hash); refuses duplicates, unknown roles and short passwords."""
    username = username.strip()
    if not username:
        raise ValueError("user name must not be empty")
    if role not in store.ROLES:
        raise ValueError(f"role {role!r} is not one of {store.ROLES}")
    if len(password) < 10:
        raise ValueError("password must have at least 10 characters")
    with engine.begin() as con:
        if con.execute(sa.select(store.users.c.id).where(store.users.c.username == username)).first():
            raise ValueError(f"user {username!r} exists already")
        trail.write(con, actor, "user.add", "user", {"username": username, "password_hash": _hasher().hash(password),
                                                       "role": role, "active": True, "created_at": trail.now()})
    return User(username, role)


def set_active(engine, username: str, active: bool, actor: str) -> None:
    with engine.begin() as con:
        row = con.execute(sa.select(store.users).where(store.users.c.username == username)).first()
        if row is None:
            raise ValueError(f"no user {username!r}")
        if not active:
            _keep_an_admin(con, username)
        trail.write(con, actor, "user.enable" if active else "user.disable", "user", {"active": active}, row.id)


def set_role(engine, username: str, role: str, actor: str) -> None:
    """Change a user's role (a trail entry with the role before and after)."""
    if role not in store.ROLES:
        raise ValueError(f"role {role!r} is not one of {store.ROLES}")
    with engine.begin() as con:
        row = con.execute(sa.select(store.users).where(store.users.c.username == username)).first()
        if row is None:
            raise ValueError(f"no user {username!r}")
        if role != "admin":
            _keep_an_admin(con, username)
        trail.write(con, actor, "user.role", "user", {"role": role}, row.id)


def set_password(engine, username: str, password: str, actor: str) -> None:
    """Set a new password (an administrator's reset); the trail records that it changed, as a new hash."""
    if len(password) < 10:
        raise ValueError("password must have at least 10 characters")
    with engine.begin() as con:
        row = con.execute(sa.select(store.users).where(store.users.c.username == username)).first()
        if row is None:
            raise ValueError(f"no user {username!r}")
        trail.write(con, actor, "user.password", "user", {"password_hash": _hasher().hash(password)}, row.id)


def count_users(engine) -> int:
    """How many user accounts exist (none: the app explains how to create the first administrator)."""
    with engine.connect() as con:
        return con.execute(sa.select(sa.func.count()).select_from(store.users)).scalar_one()


def _keep_an_admin(con, username: str) -> None:
    """Refuse a change that would leave no active administrator (nobody could manage users any more)."""
    admins = [r.username for r in con.execute(sa.select(store.users.c.username)
                                              .where(store.users.c.role == "admin", store.users.c.active))]
    if admins == [username]:
        raise ValueError(f"{username} is the only active administrator; make someone else admin first")


def _recent_failures(engine, username: str) -> int:
    from datetime import datetime, timedelta, timezone

    since = (datetime.now(timezone.utc) - timedelta(minutes=LOCKOUT_MINUTES)).isoformat(timespec="microseconds")
    with engine.connect() as con:
        last_ok = con.execute(sa.select(sa.func.max(store.trail.c.id)).where(
            store.trail.c.actor == username, store.trail.c.action == "login")).scalar() or 0
        return con.execute(sa.select(sa.func.count()).select_from(store.trail).where(
            store.trail.c.actor == username, store.trail.c.action == "login.failed", store.trail.c.at >= since,
            store.trail.c.id > last_ok)).scalar_one()


def list_users(engine) -> list[dict]:
    with engine.connect() as con:
        return [{"username": r.username, "role": r.role, "active": bool(r.active), "created_at": r.created_at}
                for r in con.execute(sa.select(store.users).order_by(store.users.c.username))]


def login(engine, username: str, password: str) -> User:
    """The user if the password matches and the account is active; AuthError (one message) otherwise.
    Every attempt is a trail entry."""
    from argon2.exceptions import VerifyMismatchError, InvalidHashError

    with engine.connect() as con:
        row = con.execute(sa.select(store.users).where(store.users.c.username == username.strip())).first()
    ok = False
    locked = row is not None and _recent_failures(engine, row.username) >= MAX_FAILED_LOGINS
    if row is not None and row.active and not locked:
        try:
            ok = _hasher().verify(row.password_hash, password)
        except (VerifyMismatchError, InvalidHashError):
            ok = False
    trail.record(engine, username.strip() or "(empty)", "login" if ok else "login.failed", "login",
                 row.id if row is not None else None)
    if not ok:
        raise AuthError("unknown user, wrong password, disabled account, or too many failed attempts "
                        f"(then wait {LOCKOUT_MINUTES} minutes)")
    return User(row.username, row.role)


def current(engine, username: str) -> User | None:
    """The user as the store has it now (role changed, account disabled), or None: a session re-reads it on
    every page so that a disabled account or a withdrawn role takes effect at once."""
    with engine.connect() as con:
        row = con.execute(sa.select(store.users).where(store.users.c.username == username)).first()
    return User(row.username, row.role) if row is not None and row.active else None
