"""Who may do what: users, roles, passwords, logins, sessions and tokens.

Passwords are argon2id hashes (argon2-cffi's defaults, RFC 9106). A login is a random token
(cookie for a browser, bearer for the API) of which only a SHA-256 is stored, with an expiry
of ``web.session_hours``; a disabled user's sessions stop working at once. Consecutive failed
logins lock the account at ``web.lockout_failures`` until an admin unlocks it. Every login,
failure, lock-out, logout and user change is an audit event with the user's name.

Roles map to permissions here and nowhere else (:data:`PERMISSIONS`); the web layer asks
``principal.can("jobs:write")``, never "is this an admin".
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
from dataclasses import dataclass
from datetime import timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from dicomnode.audit import AuditLog, EventKind, Outcome
from dicomnode.config import WebConfig
from dicomnode.schema import Role, User, WebSession, utcnow

# Every permission the console and API check; a role is a set of them.
ALL_PERMISSIONS = frozenset({
    "dashboard:read",
    "studies:read", "studies:write",  # write: force completion
    "studies:store",  # STOW-RS: store instances over DICOMweb
    "jobs:read", "jobs:write",  # write: retry, cancel
    "deliveries:read", "deliveries:write",
    "destinations:read",
    "audit:read", "audit:export", "audit:verify",
    "findings:read", "findings:review",
    "routes:read", "routes:test",
    "plugins:read",
    "users:read", "users:write",
})

PERMISSIONS: dict[Role, frozenset[str]] = {
    Role.ADMIN: ALL_PERMISSIONS,  # studies:store (STOW-RS) is the admin's only
    Role.RADIOLOGIST: frozenset({"studies:read", "findings:read", "findings:review"}),
    Role.AUDITOR: frozenset({"audit:read", "audit:export", "audit:verify"}),
}

# where each role lands after logging in
HOME: dict[Role, str] = {Role.ADMIN: "/", Role.RADIOLOGIST: "/findings",
                         Role.AUDITOR: "/audit"}

MIN_PASSWORD = 10
_hasher = PasswordHasher()  # argon2id, t=3, m=64 MiB, p=4
# verifying against this when the user does not exist keeps the answer's timing the same
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


class UserError(ValueError):
    """A user change that cannot be made (unknown user, weak password, duplicate name);
    the message says why."""


class LoginRefused(Exception):
    """Bad name or password, a disabled or a locked account. ``str()`` is what the person
    is told; ``locked`` says the account is (now) locked."""

    def __init__(self, message: str, *, locked: bool = False) -> None:
        super().__init__(message)
        self.locked = locked


@dataclass(frozen=True)
class Principal:
    """The person behind a request."""

    user_id: int
    name: str
    display_name: str
    role: Role
    session_id: int
    csrf_token: str
    via: str  # cookie | bearer

    def can(self, permission: str) -> bool:
        if permission not in ALL_PERMISSIONS:
            raise KeyError(f"unknown permission {permission!r}")
        return permission in PERMISSIONS[self.role]

    @property
    def home(self) -> str:
        return HOME[self.role]


def hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise UserError(f"password too short: at least {MIN_PASSWORD} characters")
    return _hasher.hash(password)


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_role(role: str) -> Role:
    try:
        return Role(role)
    except ValueError:
        raise UserError(f"unknown role {role!r} (roles: "
                        f"{', '.join(r.value for r in Role)})") from None


# -- users ------------------------------------------------------------------------------------


def add_user(s: Session, audit: AuditLog, name: str, role: str, password: str | None, *,
             by: str, display_name: str = "", sso_subject: str | None = None) -> User:
    """Create a user (``password`` None: single sign-on only). Audited as ``user-changed``."""
    name = name.strip()
    if not name or len(name) > 64 or any(c.isspace() or c in "\\/:" for c in name):
        raise UserError("user name: 1-64 characters, no spaces, slashes or colons")
    r = check_role(role)
    if s.execute(select(User.id).where(User.name == name)).first() is not None:
        raise UserError(f"user {name!r} exists already")
    user = User(name=name, display_name=display_name or name, role=r,
                password_hash=hash_password(password) if password is not None else "",
                sso_subject=sso_subject, disabled=False, failed_logins=0, created_at=utcnow())
    s.add(user)
    s.flush()
    audit.record(EventKind.USER_CHANGED, session=s, user=by, change="added", target=name,
                 role=r.value, sso=sso_subject is not None)
    return user


def get_user(s: Session, name: str) -> User:
    user = s.execute(select(User).where(User.name == name)).scalar_one_or_none()
    if user is None:
        raise UserError(f"no user {name!r}")
    return user


def set_password(s: Session, audit: AuditLog, name: str, password: str, *, by: str) -> None:
    """New password; the user's sessions end (log in again) and a lock is lifted."""
    user = get_user(s, name)
    user.password_hash = hash_password(password)
    user.failed_logins, user.locked_at = 0, None
    _end_sessions(s, user.id)
    audit.record(EventKind.USER_CHANGED, session=s, user=by, change="password", target=name)


def set_disabled(s: Session, audit: AuditLog, name: str, disabled: bool, *, by: str) -> None:
    user = get_user(s, name)
    user.disabled = disabled
    if disabled:
        _end_sessions(s, user.id)
    audit.record(EventKind.USER_CHANGED, session=s, user=by,
                 change="disabled" if disabled else "enabled", target=name)


def set_role(s: Session, audit: AuditLog, name: str, role: str, *, by: str) -> None:
    user = get_user(s, name)
    before = user.role
    user.role = check_role(role)
    _end_sessions(s, user.id)  # the new role applies from the next login
    audit.record(EventKind.USER_CHANGED, session=s, user=by, change="role", target=name,
                 before=str(before), after=str(user.role))


def unlock(s: Session, audit: AuditLog, name: str, *, by: str) -> None:
    user = get_user(s, name)
    user.failed_logins, user.locked_at = 0, None
    audit.record(EventKind.USER_CHANGED, session=s, user=by, change="unlocked", target=name)


def _end_sessions(s: Session, user_id: int) -> None:
    s.execute(update(WebSession).where(WebSession.user_fk == user_id,
                                       WebSession.revoked_at.is_(None))
              .values(revoked_at=utcnow()))


def has_users(s: Session) -> bool:
    return s.execute(select(User.id).limit(1)).first() is not None


# -- logging in ---------------------------------------------------------------------------------


def authenticate(s: Session, audit: AuditLog, cfg: WebConfig, name: str, password: str, *,
                 remote: str, via: str) -> User:
    """Check a name and password; count failures and lock at ``cfg.lockout_failures``.
    Every outcome is audited (the password never is). Commit the session even when this
    raises: the failure count must be kept."""
    user = s.execute(select(User).where(User.name == name).with_for_update()
                     ).scalar_one_or_none()
    if user is None or not user.password_hash:
        # same work as for a real user: the timing does not tell who exists
        with contextlib.suppress(VerificationError):
            _hasher.verify(_DUMMY_HASH, password)
        audit.record(EventKind.LOGIN_FAILED, Outcome.MINOR_FAILURE, session=s, user=name[:64],
                     source_host=remote, via=via, reason="unknown user or no password")
        raise LoginRefused("wrong user name or password")
    if user.disabled:
        audit.record(EventKind.LOGIN_FAILED, Outcome.MINOR_FAILURE, session=s, user=name,
                     source_host=remote, via=via, reason="account disabled")
        raise LoginRefused("wrong user name or password")
    if user.locked_at is not None:
        audit.record(EventKind.LOGIN_FAILED, Outcome.SERIOUS_FAILURE, session=s, user=name,
                     source_host=remote, via=via, reason="account locked")
        raise LoginRefused("this account is locked after repeated failed logins: "
                           "ask an administrator to unlock it", locked=True)
    try:
        _hasher.verify(user.password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        user.failed_logins += 1
        user.last_failed_at = utcnow()
        audit.record(EventKind.LOGIN_FAILED, Outcome.MINOR_FAILURE, session=s, user=name,
                     source_host=remote, via=via, reason="wrong password",
                     consecutive=user.failed_logins)
        if user.failed_logins >= cfg.lockout_failures:
            user.locked_at = utcnow()
            _end_sessions(s, user.id)
            audit.record(EventKind.ACCOUNT_LOCKED, Outcome.SERIOUS_FAILURE, session=s,
                         user=name, source_host=remote, failures=user.failed_logins)
            raise LoginRefused("this account is now locked after repeated failed logins: "
                               "ask an administrator to unlock it", locked=True) from None
        raise LoginRefused("wrong user name or password") from None
    if _hasher.check_needs_rehash(user.password_hash):
        user.password_hash = _hasher.hash(password)
    user.failed_logins = 0
    user.last_login_at = utcnow()
    audit.record(EventKind.USER_LOGIN, session=s, user=name, source_host=remote, via=via)
    return user


def start_session(s: Session, user: User, cfg: WebConfig, *, kind: str, remote: str
                  ) -> tuple[str, WebSession]:
    """A new login for ``user``: returns the token to hand out (never stored) and its row."""
    token = secrets.token_urlsafe(32)
    now = utcnow()
    row = WebSession(token_hash=_token_hash(token), user_fk=user.id, kind=kind,
                     csrf_token=secrets.token_urlsafe(24), remote=remote[:64], created_at=now,
                     expires_at=now + timedelta(hours=cfg.session_hours))
    s.add(row)
    s.flush()
    return token, row


def principal_for(s: Session, token: str, kind: str) -> Principal | None:
    """The person a token belongs to, if it is valid now (not expired, revoked, disabled or
    locked), else None."""
    row = s.execute(
        select(WebSession, User).join(User, WebSession.user_fk == User.id)
        .where(WebSession.token_hash == _token_hash(token), WebSession.kind == kind)
    ).first()
    if row is None:
        return None
    ws, user = row
    if (ws.revoked_at is not None or ws.expires_at <= utcnow() or user.disabled
            or user.locked_at is not None):
        return None
    return Principal(user.id, user.name, user.display_name or user.name, user.role, ws.id,
                     ws.csrf_token, kind)


def end_session(s: Session, audit: AuditLog, principal: Principal, remote: str) -> None:
    s.execute(update(WebSession).where(WebSession.id == principal.session_id)
              .values(revoked_at=utcnow()))
    audit.record(EventKind.USER_LOGOUT, session=s, user=principal.name, source_host=remote,
                 via=principal.via)


def sso_user(s: Session, audit: AuditLog, *, subject: str, name: str, role: str,
             display_name: str, remote: str) -> User:
    """The user an OpenID Connect login maps to: created on first login, role updated from
    the provider's claim on every login (the provider is the source of truth). The user is
    found by the provider's subject (``sub``), so a name changed at the provider keeps the
    node's name (and its audit trail); a new subject may take a name only if no one holds it
    yet, or an administrator made that user for single sign-on (no password, no subject).
    Every refusal is audited; commit the session even when this raises."""

    def refuse(user_name: str, reason: str, message: str) -> LoginRefused:
        audit.record(EventKind.LOGIN_FAILED, Outcome.MINOR_FAILURE, session=s,
                     user=user_name[:64], source_host=remote, via="oidc", reason=reason)
        return LoginRefused(message)

    r = check_role(role)
    user = s.execute(select(User).where(User.sso_subject == subject).with_for_update()
                     ).scalar_one_or_none()
    link = False
    if user is None:
        user = s.execute(select(User).where(User.name == name).with_for_update()
                         ).scalar_one_or_none()
        if user is not None and user.sso_subject is not None:
            raise refuse(name, "name taken by another single sign-on account",
                         f"the user name {name!r} belongs to another single sign-on account "
                         "in dicomnode: ask an administrator")
        if user is not None and user.password_hash:
            raise refuse(name, "a local user has this name",
                         f"a local user {name!r} (with a password) exists: single sign-on "
                         "does not take over a password account; ask an administrator")
        link = user is not None
    if user is not None and user.disabled:
        raise refuse(user.name, "account disabled", "this account is disabled in dicomnode: "
                                                    "ask an administrator")
    if user is not None and user.locked_at is not None:
        raise refuse(user.name, "account locked", "this account is locked in dicomnode: ask "
                                                  "an administrator to unlock it")
    if user is None:
        try:
            user = add_user(s, audit, name, r.value, None, by=f"sso:{name}"[:64],
                            display_name=display_name, sso_subject=subject)
        except UserError as e:
            raise refuse(name, f"cannot create the user: {e}",
                         f"dicomnode cannot use the name your single sign-on gives ({e}): "
                         "ask an administrator") from None
    elif link:
        user.sso_subject = subject
        audit.record(EventKind.USER_CHANGED, session=s, user=f"sso:{user.name}"[:64],
                     change="sso-linked", target=user.name)
    if user.role != r:
        audit.record(EventKind.USER_CHANGED, session=s, user=f"sso:{user.name}"[:64],
                     change="role", target=user.name, before=str(user.role), after=r.value,
                     source="oidc")
        user.role = r
    user.display_name = display_name or user.display_name
    user.last_login_at = utcnow()
    audit.record(EventKind.USER_LOGIN, session=s, user=user.name, source_host=remote,
                 via="oidc")
    return user
