"""A small but real OpenID Provider for the single sign-on tests (no Keycloak here).

It follows OpenID Connect Core 1.0 and RFC 6749/7636 for the authorization code flow:
discovery (``/.well-known/openid-configuration``), a JWKS with an RS256 key, ``/authorize``
(auto-approves :attr:`OpenIDProvider.user`, the person "at the keyboard"; refuses unknown
clients, unregistered redirect URIs, a missing ``openid`` scope or a missing S256 PKCE
challenge), ``/token`` (client authentication by ``client_secret_basic`` or
``client_secret_post``, single-use codes bound to client and redirect URI, the PKCE verifier
checked), and ``/userinfo``. ID tokens carry ``sub``, ``preferred_username``, ``name``,
``groups`` and the ``nonce``, signed with joserfc (authlib's JOSE layer).

It can misbehave on request (:attr:`OpenIDProvider.misbehave`), to prove the console refuses
what it must: ``bad_signature`` (signed with another key under the same key id),
``wrong_audience``, ``wrong_nonce``, ``wrong_issuer``, ``expired``, ``deny`` (the user
refuses: ``error=access_denied``), ``token_down`` (the token endpoint answers 503).
The checks it made are recorded (:attr:`OpenIDProvider.token_requests`).
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlencode

import uvicorn
from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from tests.web import free_port

KID = "test-key-1"


@dataclass
class OpenIDProvider:
    client_id: str
    client_secret: str
    redirect_uris: list[str]
    user: dict[str, Any] = field(default_factory=dict)  # claims of who signs in next
    misbehave: set[str] = field(default_factory=set)
    port: int = field(default_factory=free_port)
    token_requests: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.issuer = f"http://127.0.0.1:{self.port}"
        self.key = RSAKey.generate_key(2048, parameters={"kid": KID, "use": "sig"})
        self.rogue = RSAKey.generate_key(2048, parameters={"kid": KID, "use": "sig"})
        self.codes: dict[str, dict[str, Any]] = {}
        self.access: dict[str, dict[str, Any]] = {}
        self.discovery_hits = 0
        app = Starlette(routes=[
            Route("/.well-known/openid-configuration", self.discovery),
            Route("/jwks", self.jwks),
            Route("/authorize", self.authorize),
            Route("/token", self.token, methods=["POST"]),
            Route("/userinfo", self.userinfo),
        ])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_config=None, access_log=False))
        self.thread = threading.Thread(target=self.server.run, name="oidc-provider",
                                       daemon=True)

    # -- running ------------------------------------------------------------------------------

    def start(self) -> OpenIDProvider:
        self.thread.start()
        for _ in range(400):
            if self.server.started or not self.thread.is_alive():
                break
            time.sleep(0.05)
        assert self.server.started, "the test OpenID provider did not start"
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    # -- endpoints ------------------------------------------------------------------------------

    async def discovery(self, request: Request) -> Response:
        self.discovery_hits += 1
        i = self.issuer
        return JSONResponse({
            "issuer": i, "authorization_endpoint": f"{i}/authorize",
            "token_endpoint": f"{i}/token", "jwks_uri": f"{i}/jwks",
            "userinfo_endpoint": f"{i}/userinfo", "response_types_supported": ["code"],
            "subject_types_supported": ["public"], "grant_types_supported":
                ["authorization_code"], "id_token_signing_alg_values_supported": ["RS256"],
            "scopes_supported": ["openid", "profile", "email", "groups"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic",
                                                      "client_secret_post"],
            "code_challenge_methods_supported": ["S256"],
            "claims_supported": ["sub", "preferred_username", "name", "groups", "nonce"],
        })

    async def jwks(self, request: Request) -> Response:
        return JSONResponse(KeySet([self.key]).as_dict(private=False))

    async def authorize(self, request: Request) -> Response:
        q = request.query_params
        # errors that must not be sent back to an unverified redirect URI (RFC 6749 4.1.2.1)
        if q.get("client_id") != self.client_id:
            return PlainTextResponse("unknown client_id", 400)
        redirect_uri = q.get("redirect_uri", "")
        if redirect_uri not in self.redirect_uris:
            return PlainTextResponse(f"redirect_uri {redirect_uri!r} is not registered", 400)
        state = q.get("state")

        def back(**params: str) -> Response:
            if state is not None:
                params["state"] = state
            return RedirectResponse(f"{redirect_uri}?{urlencode(params)}", 302)

        if q.get("response_type") != "code":
            return back(error="unsupported_response_type")
        if "openid" not in q.get("scope", "").split():
            return back(error="invalid_scope", error_description="openid scope required")
        if not q.get("code_challenge") or q.get("code_challenge_method") != "S256":
            return back(error="invalid_request", error_description="PKCE S256 required")
        if "deny" in self.misbehave:
            return back(error="access_denied", error_description="The user refused access")
        code = secrets.token_urlsafe(24)
        self.codes[code] = {"client_id": self.client_id, "redirect_uri": redirect_uri,
                            "challenge": q["code_challenge"], "nonce": q.get("nonce"),
                            "user": dict(self.user), "at": time.time()}
        return back(code=code)

    async def token(self, request: Request) -> Response:
        form = dict(await request.form())
        record: dict[str, Any] = {"form": {k: v for k, v in form.items()
                                           if k != "client_secret"}}
        self.token_requests.append(record)
        if "token_down" in self.misbehave:
            return PlainTextResponse("maintenance", 503)
        client_id, secret = form.get("client_id"), form.get("client_secret")
        auth = request.headers.get("authorization", "")
        if auth.startswith("Basic "):
            cid, _, sec = base64.b64decode(auth[6:]).decode().partition(":")
            client_id, secret = unquote(cid), unquote(sec)
            record["auth"] = "client_secret_basic"
        if client_id != self.client_id or secret != self.client_secret:
            return JSONResponse({"error": "invalid_client"}, 401)
        if form.get("grant_type") != "authorization_code":
            return JSONResponse({"error": "unsupported_grant_type"}, 400)
        grant = self.codes.pop(str(form.get("code", "")), None)  # single use
        if grant is None or time.time() - grant["at"] > 60:
            return JSONResponse({"error": "invalid_grant",
                                 "error_description": "unknown or used code"}, 400)
        if form.get("redirect_uri") != grant["redirect_uri"]:
            return JSONResponse({"error": "invalid_grant",
                                 "error_description": "redirect_uri differs"}, 400)
        verifier = str(form.get("code_verifier", ""))
        digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
        if not verifier or digest.rstrip(b"=").decode() != grant["challenge"]:
            return JSONResponse({"error": "invalid_grant",
                                 "error_description": "PKCE verifier does not match"}, 400)
        record["pkce"] = "ok"
        user = grant["user"]
        now = int(time.time())
        claims = {"iss": self.issuer, "sub": user["sub"], "aud": self.client_id,
                  "iat": now, "exp": now + 300, "auth_time": now, "nonce": grant["nonce"],
                  **{k: v for k, v in user.items() if k != "sub"}}
        if "wrong_audience" in self.misbehave:
            claims["aud"] = "another-client"
        if "wrong_nonce" in self.misbehave:
            claims["nonce"] = secrets.token_urlsafe(24)
        if "wrong_issuer" in self.misbehave:
            claims["iss"] = "http://127.0.0.1:1/elsewhere"
        if "expired" in self.misbehave:
            claims["iat"], claims["exp"] = now - 3600, now - 1800
        key = self.rogue if "bad_signature" in self.misbehave else self.key
        id_token = jwt.encode({"alg": "RS256", "kid": KID, "typ": "JWT"}, claims, key)
        access = secrets.token_urlsafe(24)
        self.access[access] = user
        return JSONResponse({"access_token": access, "token_type": "Bearer",
                             "expires_in": 300, "id_token": id_token, "scope": "openid"},
                            headers={"Cache-Control": "no-store"})

    async def userinfo(self, request: Request) -> Response:
        auth = request.headers.get("authorization", "")
        user = self.access.get(auth[7:]) if auth.startswith("Bearer ") else None
        if user is None:
            return JSONResponse({"error": "invalid_token"}, 401)
        return JSONResponse(user)
