"""Single sign-on pages: ``GET /login/sso`` sends the browser to the OpenID Connect provider,
``GET /login/sso/callback`` takes it back, checks everything (:mod:`dicomnode.web.oidc`), and
starts a cookie session for the node user the provider's claims map to
(:func:`dicomnode.web.auth.sso_user`).

Every outcome is audited: ``user-login`` (via ``oidc``), ``login-failed`` with the reason
(the provider's error, a state that does not match this browser, an invalid ID token, no
mapped role, a disabled account), ``user-changed`` when the user is made or the provider
changed their role. A provider that cannot be reached answers 502 with what to check.
Both routes are public: they are how a person logs in.
"""

from __future__ import annotations

import logging
import secrets
from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response

from dicomnode.audit import EventKind, Outcome
from dicomnode.web.auth import LoginRefused, Principal, sso_user
from dicomnode.web.auth import start_session as _start
from dicomnode.web.deps import WebState, node, remote_of
from dicomnode.web.views.session import _login_page, _safe_next, set_session_cookie

if TYPE_CHECKING:  # authlib and joserfc load at the first sign-in: no cost without SSO
    from dicomnode.web.oidc import Identity, OIDCClient

log = logging.getLogger("dicomnode.web")
pages = APIRouter(include_in_schema=False)

FLOW_COOKIE = "dn_sso"
FLOW_PATH = "/login/sso"  # the cookie goes to /login/sso and /login/sso/callback only
CALLBACK = "/login/sso/callback"


def client_of(request: Request, st: WebState) -> OIDCClient:
    """The app's relying party (made at first use), or 404 when SSO is not configured."""
    cfg = st.settings.web.oidc
    if cfg is None:
        raise HTTPException(404, "single sign-on is not configured on this node (web.oidc): "
                                 "log in with your user name and password")
    client: OIDCClient | None = getattr(request.app.state, "oidc", None)
    if client is None:
        from dicomnode.web.oidc import OIDCClient

        client = OIDCClient(cfg, st.settings.web.base_url + CALLBACK, st.settings.storage.path)
        request.app.state.oidc = client
    return client


async def _failed(st: WebState, request: Request, reason: str, user: str = "",
                  outcome: Outcome = Outcome.MINOR_FAILURE) -> None:
    # a database write: not on the event loop (SQLite may wait for ingest's write lock)
    await run_in_threadpool(st.audit.record, EventKind.LOGIN_FAILED, outcome, user=user[:64],
                            source_host=remote_of(request), via="oidc", reason=reason[:300])


def _refused(request: Request, st: WebState, message: str, status: int, nxt: str = "/"
             ) -> Response:
    response = _login_page(request, st, message, status, nxt)
    response.delete_cookie(FLOW_COOKIE, path=FLOW_PATH)
    return response


@pages.get("/login/sso")
async def sso_start(request: Request, next: str = "/", st: WebState = Depends(node)
                    ) -> Response:
    """To the provider: a new flow (state, nonce, PKCE) in an encrypted cookie."""
    from dicomnode.web.oidc import FLOW_SECONDS, ProviderError

    client = client_of(request, st)
    try:
        url, flow = await client.begin(_safe_next(next))
    except ProviderError as e:
        log.warning("single sign-on: %s", e)
        raise HTTPException(502, str(e)) from None
    response = RedirectResponse(url, status_code=303)
    # SameSite=Lax: the provider sends the browser back with a top-level GET, which Lax allows
    response.set_cookie(FLOW_COOKIE, client.seal(flow), max_age=FLOW_SECONDS, httponly=True,
                        samesite="lax", path=FLOW_PATH,
                        secure=st.settings.web.base_url.startswith("https:"))
    return response


@pages.get(CALLBACK)
async def sso_callback(request: Request, st: WebState = Depends(node)) -> Response:
    """Back from the provider: check, exchange, validate, log in."""
    from dicomnode.web.oidc import ProviderError, SSORefused

    client = client_of(request, st)
    q = request.query_params
    flow = client.unseal(request.cookies.get(FLOW_COOKIE))
    nxt = flow.next if flow else "/"
    if q.get("error"):
        error, description = q.get("error", ""), q.get("error_description", "")
        await _failed(st, request, f"provider: {error} {description}".strip())
        said = f": {description}" if description else ""
        message = ("You did not allow the sign-in, or the single sign-on provider refused it"
                   f" ({error}{said})." if error == "access_denied" else
                   f"The single sign-on provider could not sign you in ({error}{said}).")
        return _refused(request, st, message, 401, nxt)
    state, code = q.get("state", ""), q.get("code", "")
    if flow is None or not state or not secrets.compare_digest(flow.state, state):
        await _failed(st, request, "state does not match this browser's sign-in "
                             f"({'no or expired flow cookie' if flow is None else 'mismatch'})",
                outcome=Outcome.SERIOUS_FAILURE)
        return _refused(request, st, "This single sign-on answer does not belong to a sign-in "
                                     "started in this browser, or it took too long: please "
                                     "sign in again.", 403)
    meta_iss = q.get("iss")
    try:
        meta = await client.metadata()
        if meta_iss is not None and meta_iss != meta["issuer"]:  # RFC 9207
            raise SSORefused("the answer came from another provider: please sign in again",
                             f"iss {meta_iss!r} is not the issuer")
        if not code:
            raise SSORefused("the single sign-on provider sent no code: please sign in again",
                             "no code")
        identity = await client.finish(flow, code)
    except ProviderError as e:
        log.warning("single sign-on: %s", e)
        await _failed(st, request, f"provider unreachable: {e}")
        raise HTTPException(502, str(e)) from None
    except SSORefused as e:
        log.warning("single sign-on refused (%s): %s", e.user or "-", e.reason)
        await _failed(st, request, e.reason, e.user)
        return _refused(request, st, str(e), 403, nxt)
    try:
        token, who = await run_in_threadpool(_login_committing, st, identity,
                                             remote_of(request))
    except LoginRefused as e:
        return _refused(request, st, str(e), 403, nxt)
    target = _safe_next(flow.next)
    response = RedirectResponse(who.home if target == "/" else target, status_code=303)
    set_session_cookie(response, st, token)
    response.delete_cookie(FLOW_COOKIE, path=FLOW_PATH)
    return response


def _login_committing(st: WebState, identity: Identity, remote: str) -> tuple[str, Principal]:
    # sso_user audits its refusals in the same transaction: keep them
    with st.sessions() as s:
        s.begin()
        try:
            user = sso_user(s, st.audit, subject=identity.subject, name=identity.name,
                            role=identity.role, display_name=identity.display_name,
                            remote=remote)
        except LoginRefused:
            s.commit()
            raise
        token, row = _start(s, user, st.settings.web, kind="cookie", remote=remote)
        who = Principal(user.id, user.name, user.display_name or user.name, user.role, row.id,
                        row.csrf_token, "cookie")
        s.commit()
    return token, who


__all__ = ["client_of", "pages"]
