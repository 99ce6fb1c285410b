"""Single sign-on with OpenID Connect, against a real OpenID Provider that the test runs
(``tests/oidc_provider.py``: discovery, JWKS, authorization code with PKCE, RS256 ID tokens).

A browser signs in with the login page's button; then, following the redirects by hand with
httpx, every refusal is checked: a group that maps to no role, a state that does not belong
to this browser, an ID token with a foreign signature, audience, nonce or issuer or one that
expired, the person refusing at the provider, a provider that is down, a disabled account, a
name a local user holds. The role follows the provider at each login. Every outcome is an
audit event.
"""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from sqlalchemy import select

from dicomnode.schema import AuditEvent, Role, User
from dicomnode.web.auth import set_disabled
from dicomnode.web.oidc import KEY_FILE, Flow, OIDCClient
from tests.oidc_provider import OpenIDProvider
from tests.web import WebNode, free_port, screenshot, start_web, web_settings

SECRET = "s3cret/with+odd chars"  # form-encoded in Basic auth (RFC 6749 2.3.1)
ROLE_MAP = {"dn-admins": "admin", "dn-radiologists": "radiologist", "dn-auditors": "auditor"}


def person(sub: str, name: str, groups: Any, display: str = "") -> dict[str, Any]:
    return {"sub": sub, "preferred_username": name, "name": display or name.title(),
            "groups": groups, "email": f"{name}@hospital.example"}


@pytest.fixture(scope="module")
def idp_web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[WebNode,
                                                                         OpenIDProvider]]:
    provider = OpenIDProvider(client_id="dicomnode", client_secret=SECRET, redirect_uris=[])
    settings = web_settings(tmp_path_factory.mktemp("sso"), oidc={
        "issuer": provider.issuer, "client_id": "dicomnode", "client_secret": SECRET,
        "scope": "openid profile groups", "role_map": ROLE_MAP,
        "button_label": "Sign in with Hospital SSO"})
    provider.redirect_uris = [settings.web.base_url + "/login/sso/callback"]
    provider.start()
    web = start_web(settings)
    yield web, provider
    web.stop()
    provider.stop()


def sso(web: WebNode, provider: OpenIDProvider, user: dict[str, Any] | None, next: str = "/",
        client: httpx.Client | None = None) -> tuple[httpx.Client, httpx.Response]:
    """One sign-in, redirect by redirect: console → provider (auto-approves ``user``) →
    console's callback. Returns the browser-like client and the callback's answer."""
    if user is not None:
        provider.user = user
    c = client or httpx.Client(base_url=web.url, timeout=30)
    r = c.get("/login/sso", params={"next": next})
    assert r.status_code == 303, r.text
    at_provider = r.headers["location"]
    assert at_provider.startswith(f"{provider.issuer}/authorize?")
    r = httpx.get(at_provider, timeout=30)  # another site: the console's cookies stay home
    assert r.status_code == 302, r.text
    back = r.headers["location"]
    assert back.startswith(f"{web.url}/login/sso/callback?")
    return c, c.get(back)


def events(web: WebNode, kind: str, after: int = 0) -> list[AuditEvent]:
    with web.sessions() as s:
        return list(s.execute(select(AuditEvent).where(AuditEvent.event_type == kind,
                                                       AuditEvent.seq > after)
                              .order_by(AuditEvent.seq)).scalars())


def last_seq(web: WebNode) -> int:
    with web.sessions() as s:
        return max(s.execute(select(AuditEvent.seq)).scalars(), default=0)


def user_row(web: WebNode, name: str) -> User | None:
    with web.sessions() as s:
        return s.execute(select(User).where(User.name == name)).scalar_one_or_none()


def refused(web: WebNode, r: httpx.Response, c: httpx.Client, status: int, text: str,
            since: int, reason: str) -> AuditEvent:
    """The answer is the login page with ``text``, no session began, and the refusal is
    audited with ``reason``; returns that audit event."""
    assert r.status_code == status, r.text
    assert text in r.text, r.text
    assert 'href="/login/sso?next=' in r.text  # the login page, to try again
    assert "dn_session" not in c.cookies
    assert c.get("/api/me").status_code == 401
    failed = events(web, "login-failed", since)
    assert len(failed) == 1, [e.detail for e in failed]
    detail = json.loads(failed[0].detail)
    assert detail["via"] == "oidc" and reason in detail["reason"], detail
    assert not events(web, "user-login", since)
    return failed[0]


# -- the browser ---------------------------------------------------------------------------------


def test_browser_signs_in_with_the_button(browser: Any, idp_web: tuple[WebNode, OpenIDProvider]
                                          ) -> None:
    web, provider = idp_web
    since = last_seq(web)
    provider.user = person("sub-carol", "carol", ["staff", "dn-admins"], "Carol Admin")
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(f"{web.url}/")
    assert "/login?next=/" in page.url
    screenshot(page, "login-sso")
    page.click("text=Sign in with Hospital SSO")
    page.wait_for_url(f"{web.url}/")
    assert "Carol Admin" in page.inner_text("header") and "admin" in page.inner_text("header")
    assert page.context.cookies(web.url)  # the session cookie…
    assert all(c["name"] != "dn_sso" for c in page.context.cookies(f"{web.url}/login/sso"))
    me = page.goto(f"{web.url}/api/me")
    assert me is not None
    assert me.json()["name"] == "carol" and me.json()["role"] == "admin"
    context.close()
    row = user_row(web, "carol")
    assert row is not None and row.sso_subject == "sub-carol" and row.password_hash == ""
    assert row.role is Role.ADMIN and row.display_name == "Carol Admin"
    (login,) = events(web, "user-login", since)
    assert login.user == "carol" and json.loads(login.detail)["via"] == "oidc"
    (added,) = events(web, "user-changed", since)
    assert json.loads(added.detail)["change"] == "added" and added.user == "sso:carol"

    # a person whose groups map to no role sees why, and nothing else
    provider.user = person("sub-erin", "erin", ["staff"])
    page = browser.new_page()
    page.goto(f"{web.url}/login")
    page.click("text=Sign in with Hospital SSO")
    page.wait_for_load_state()
    assert "has no role in dicomnode" in page.inner_text("[role=alert]")
    screenshot(page, "login-sso-refused")
    page.close()


# -- the protocol, redirect by redirect -----------------------------------------------------------


def test_authorization_request_and_token_exchange(idp_web: tuple[WebNode, OpenIDProvider]
                                                  ) -> None:
    web, provider = idp_web
    provider.user = person("sub-rad", "rita", "dn-radiologists")  # a single string
    with httpx.Client(base_url=web.url, timeout=30) as c:
        r = c.get("/login/sso", params={"next": "/api/me"})
        assert r.status_code == 303
        q = {k: v[0] for k, v in parse_qs(urlsplit(r.headers["location"]).query).items()}
        assert q["response_type"] == "code" and q["client_id"] == "dicomnode"
        assert q["redirect_uri"] == f"{web.url}/login/sso/callback"
        assert q["code_challenge_method"] == "S256" and len(q["code_challenge"]) == 43
        assert len(q["state"]) >= 32 and len(q["nonce"]) >= 32
        assert "openid" in q["scope"].split()
        cookie = r.headers["set-cookie"]
        assert cookie.startswith("dn_sso=") and "HttpOnly" in cookie
        assert "Path=/login/sso" in cookie and "SameSite=lax" in cookie
        assert q["state"] not in cookie and q["nonce"] not in cookie  # encrypted
        back = httpx.get(r.headers["location"], timeout=30).headers["location"]
        r = c.get(back)
        assert r.status_code == 303 and r.headers["location"] == "/api/me"
        me = c.get("/api/me").json()
        assert me == {**me, "name": "rita", "role": "radiologist", "via": "cookie"}
        # the code is single-use: replaying the callback is refused
        assert c.get(back).status_code == 403
    token = provider.token_requests[-2]  # the last but one: the replay's
    assert token["pkce"] == "ok" and token["auth"] == "client_secret_basic"
    assert provider.discovery_hits == 1  # fetched at first use, then kept


def test_next_must_be_a_path_here(idp_web: tuple[WebNode, OpenIDProvider]) -> None:
    web, provider = idp_web
    for evil in ("//evil.example/x", "https://evil.example/", "/\\evil.example"):
        c, r = sso(web, provider, person("sub-aud", "audra", ["dn-auditors"]), next=evil)
        assert r.status_code == 303 and r.headers["location"] == "/audit", evil
        c.close()


def test_no_mapped_role_is_refused_and_audited(idp_web: tuple[WebNode, OpenIDProvider]) -> None:
    web, provider = idp_web
    since = last_seq(web)
    c, r = sso(web, provider, person("sub-frank", "frank", ["staff", "nurses"]))
    event = refused(web, r, c, 403, "Your account (frank) has no role in dicomnode: ask", since,
                    "no mapped groups")
    assert event.user == "frank"
    assert user_row(web, "frank") is None
    c, r = sso(web, provider, {k: v for k, v in person("sub-g", "gina", []).items()
                               if k != "groups"})  # no claim at all (not in userinfo either)
    refused(web, r, c, 403, "has no role in dicomnode", since + 1, "no mapped groups")


def test_state_must_belong_to_this_browser(idp_web: tuple[WebNode, OpenIDProvider]) -> None:
    web, provider = idp_web
    provider.user = person("sub-hal", "hal", ["dn-admins"])
    with httpx.Client(base_url=web.url, timeout=30) as c:
        r = c.get("/login/sso")
        back = httpx.get(r.headers["location"], timeout=30).headers["location"]
        forged = back.replace("state=", "state=x")
        since = last_seq(web)
        refused(web, c.get(forged), c, 403, "does not belong to a sign-in started in this "
                "browser", since, "state does not match")
    # another browser (its own flow, another state) cannot finish this browser's sign-in
    with httpx.Client(base_url=web.url, timeout=30) as c, \
            httpx.Client(base_url=web.url, timeout=30) as other:
        other.get("/login/sso")
        back = httpx.get(c.get("/login/sso").headers["location"],
                         timeout=30).headers["location"]
        since = last_seq(web)
        refused(web, other.get(back), other, 403, "does not belong", since,
                "state does not match")
    # a forged flow cookie is no flow
    with httpx.Client(base_url=web.url, timeout=30) as c2:
        r = c2.get("/login/sso")
        back = httpx.get(r.headers["location"], timeout=30).headers["location"]
        value = c2.cookies["dn_sso"]
        c2.cookies.set("dn_sso", value[:-4] + ("AAAA" if value[-4:] != "AAAA" else "BBBB"),
                       domain="127.0.0.1", path="/login/sso")
        since = last_seq(web)
        refused(web, c2.get(back), c2, 403, "does not belong", since, "no or expired flow")
    assert user_row(web, "hal") is None


@pytest.mark.parametrize("fault, reason", [
    ("bad_signature", "BadSignatureError"),
    ("wrong_audience", "aud"),
    ("wrong_nonce", "nonce"),
    ("wrong_issuer", "iss"),
    ("expired", "ExpiredTokenError"),
])
def test_an_invalid_id_token_is_refused(idp_web: tuple[WebNode, OpenIDProvider], fault: str,
                                        reason: str) -> None:
    web, provider = idp_web
    provider.misbehave = {fault}
    try:
        since = last_seq(web)
        c, r = sso(web, provider, person(f"sub-{fault}", fault.replace("_", "-"),
                                         ["dn-admins"]))
    finally:
        provider.misbehave = set()
    refused(web, r, c, 403, "identity token from the single sign-on provider is not valid",
            since, reason)
    assert user_row(web, fault.replace("_", "-")) is None


def test_provider_refusal_and_outage(idp_web: tuple[WebNode, OpenIDProvider],
                                     tmp_path: Path) -> None:
    web, provider = idp_web
    provider.misbehave = {"deny"}
    try:
        since = last_seq(web)
        c, r = sso(web, provider, person("sub-ian", "ian", ["dn-admins"]))
    finally:
        provider.misbehave = set()
    refused(web, r, c, 401, "You did not allow the sign-in", since, "provider: access_denied")
    assert "The user refused access" in r.text

    provider.misbehave = {"token_down"}
    try:
        since = last_seq(web)
        c, r = sso(web, provider, None)
    finally:
        provider.misbehave = set()
    assert r.status_code == 502 and "token endpoint answered 503" in r.text
    assert "provider unreachable" in json.loads(events(web, "login-failed", since)[0].detail
                                                )["reason"]

    # a provider that is not there at all: a clear 502 page, not a crash
    down = start_web(web_settings(tmp_path, oidc={
        "issuer": f"http://127.0.0.1:{free_port()}/realms/x", "client_id": "dicomnode",
        "role_map": ROLE_MAP}), users=False)
    try:
        r = httpx.get(f"{down.url}/login/sso", timeout=30)
        assert r.status_code == 502
        assert "single sign-on provider cannot be reached" in r.text
        assert "web.oidc.issuer" in r.text
        assert "text/html" in r.headers["content-type"]
    finally:
        down.stop()


def test_role_follows_the_provider_and_disabled_cannot_log_in(
        idp_web: tuple[WebNode, OpenIDProvider]) -> None:
    web, provider = idp_web
    c, r = sso(web, provider, person("sub-dave", "dave", ["dn-auditors"]))
    assert r.status_code == 303 and r.headers["location"] == "/audit"
    assert c.get("/api/me").json()["role"] == "auditor"
    since = last_seq(web)
    # both groups: the first entry of role_map that matches wins (radiologist before auditor)
    c, r = sso(web, provider, person("sub-dave", "dave", ["dn-auditors", "dn-radiologists"]))
    assert r.status_code == 303 and r.headers["location"] == "/findings"
    assert c.get("/api/me").json()["role"] == "radiologist"
    (changed,) = events(web, "user-changed", since)
    assert changed.user == "sso:dave"
    assert json.loads(changed.detail) == {**json.loads(changed.detail), "change": "role",
                                          "target": "dave", "before": "auditor",
                                          "after": "radiologist"}
    row = user_row(web, "dave")
    assert row is not None and row.role is Role.RADIOLOGIST

    # a name changed at the provider keeps the node's user (found by subject)
    c, r = sso(web, provider, person("sub-dave", "david", ["dn-radiologists"]))
    assert r.status_code == 303 and c.get("/api/me").json()["name"] == "dave"
    assert user_row(web, "david") is None

    with web.sessions() as s, s.begin():
        set_disabled(s, web.audit, "dave", True, by="admin")
    assert c.get("/api/me").status_code == 401  # the running session ends too
    since = last_seq(web)
    c, r = sso(web, provider, None)
    refused(web, r, c, 403, "this account is disabled in dicomnode", since, "account disabled")


def test_names_held_by_others_are_refused(idp_web: tuple[WebNode, OpenIDProvider]) -> None:
    web, provider = idp_web
    since = last_seq(web)  # a local user (password) holds the name "admin"
    c, r = sso(web, provider, person("sub-mallory", "admin", ["dn-admins"]))
    refused(web, r, c, 403, "a local user &#39;admin&#39; (with a password) exists", since,
            "a local user")
    row = user_row(web, "admin")
    assert row is not None and row.sso_subject is None

    c, r = sso(web, provider, person("sub-jo", "jo", ["dn-auditors"]))
    assert r.status_code == 303
    since = last_seq(web)  # another subject claims jo's name
    c, r = sso(web, provider, person("sub-other-jo", "jo", ["dn-admins"]))
    refused(web, r, c, 403, "belongs to another single sign-on account", since, "name taken")
    row = user_row(web, "jo")
    assert row is not None and row.sso_subject == "sub-jo" and row.role is Role.AUDITOR


def test_flow_key_is_made_once_and_private(idp_web: tuple[WebNode, OpenIDProvider]) -> None:
    web, _ = idp_web
    path = web.settings.storage.path / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(path.read_bytes()) == 32
    cfg = web.settings.web.oidc
    assert cfg is not None
    a = OIDCClient(cfg, "http://x/cb", web.settings.storage.path)
    b = OIDCClient(cfg, "http://x/cb", web.settings.storage.path)  # another process, same key
    flow = Flow.new("/studies")
    assert b.unseal(a.seal(flow)) == flow
    assert b.unseal(a.seal(Flow(**{**flow.__dict__, "expires": 1}))) is None  # expired
    assert b.unseal("not a cookie") is None and b.unseal(None) is None


def test_sign_in_on_each_database(db_url: str, tmp_path: Path) -> None:
    """The user rows, sessions and audit events of a sign-in on SQLite and PostgreSQL
    (``sso_user`` locks the user row while it decides)."""
    provider = OpenIDProvider(client_id="dicomnode", client_secret=SECRET, redirect_uris=[])
    settings = web_settings(tmp_path, db_url, oidc={
        "issuer": provider.issuer, "client_id": "dicomnode", "client_secret": SECRET,
        "role_map": ROLE_MAP})
    provider.redirect_uris = [settings.web.base_url + "/login/sso/callback"]
    provider.start()
    web = start_web(settings, users=False)
    try:
        c, r = sso(web, provider, person("sub-kim", "kim", ["dn-admins"]))
        assert r.status_code == 303 and c.get("/api/me").json()["role"] == "admin"
        c, r = sso(web, provider, person("sub-kim", "kim", ["dn-auditors"]))
        assert r.status_code == 303 and c.get("/api/me").json()["role"] == "auditor"
        assert [json.loads(e.detail)["change"] for e in events(web, "user-changed")] == [
            "added", "role"]
        assert len(events(web, "user-login")) == 2
    finally:
        web.stop()
        provider.stop()
