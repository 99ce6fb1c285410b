"""Single sign-on: the OpenID Connect relying party (``web.oidc``).

The authorization code flow with PKCE (RFC 7636, S256), ``state`` and ``nonce``:

1. :meth:`OIDCClient.begin` makes a :class:`Flow` (random state, nonce, PKCE verifier, where
   to go afterwards) and the provider's authorization URL. The flow travels in the browser as
   a short-lived cookie, encrypted and authenticated (JWE, ``dir`` + A256GCM) with a key made
   once and kept in ``<storage.path>/web-sso.key`` (mode 0600): no server-side state, and no
   other browser can finish the login (the state must match the cookie).
2. :meth:`OIDCClient.finish` exchanges the code (with the PKCE verifier and the client
   secret) at the token endpoint and validates the ID token: signature against the
   provider's JWKS (asymmetric algorithms only), issuer, audience, ``azp``, nonce, expiry,
   ``at_hash``. Claims the ID token lacks (the user name or the role claim) are read from the
   userinfo endpoint when the provider has one. The role claim's value(s) map to a node role
   through ``web.oidc.role_map`` (first matching entry wins).

The discovery document is fetched at first use and kept for the life of the process; the
JWKS is fetched again when an ID token names a key it does not hold (key rotation). A
provider that cannot be reached raises :class:`ProviderError` (the console answers 502);
a login that must not succeed raises :class:`SSORefused` with what to tell the person.

authlib provides the protocol pieces (authorization URL, PKCE challenge, OIDC ID token claim
rules), joserfc (authlib's JOSE layer) the signatures and the cookie's encryption, httpx the
HTTP calls.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from authlib.oauth2.rfc6749.parameters import prepare_grant_uri
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from authlib.oidc.core import CodeIDToken
from joserfc import jwe, jwt
from joserfc.errors import InvalidKeyIdError, JoseError
from joserfc.jwk import KeySet, OctKey

from dicomnode.config import OIDCConfig

log = logging.getLogger("dicomnode.web")

#: how long a browser may take between leaving for the provider and coming back
FLOW_SECONDS = 600
#: ID token signature algorithms we accept (never "none", never HS*: the client secret is
#: not a signing key we want to trust)
ASYMMETRIC = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384",
              "ES512", "EdDSA")
KEY_FILE = "web-sso.key"
LEEWAY = 60  # seconds of clock skew tolerated on exp/iat/nbf


class ProviderError(Exception):
    """The provider cannot be reached or answered something that is not OpenID Connect;
    ``str()`` says which and what to check."""


class SSORefused(Exception):
    """This sign-in must not succeed. ``str()`` is what the person is told, ``reason`` what
    the audit records, ``user`` who it was (when known)."""

    def __init__(self, message: str, reason: str, user: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.user = user


@dataclass(frozen=True)
class Flow:
    """One sign-in in progress (kept in the browser's encrypted cookie)."""

    state: str
    nonce: str
    verifier: str
    next: str
    expires: int

    @classmethod
    def new(cls, next_path: str) -> Flow:
        return cls(state=secrets.token_urlsafe(24), nonce=secrets.token_urlsafe(24),
                   verifier=secrets.token_urlsafe(48), next=next_path,
                   expires=int(time.time()) + FLOW_SECONDS)


@dataclass(frozen=True)
class Identity:
    """Who the provider says signed in, and the node role that maps to."""

    subject: str  # the ID token's sub (unique and stable at the one configured issuer)
    name: str
    display_name: str
    role: str


def load_key(storage: Path) -> bytes:
    """The cookie key: made once (32 random bytes, 0600) in the storage folder, then read.
    ``O_EXCL`` makes two processes starting at once agree on one key."""
    path = storage / KEY_FILE
    storage.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(50):  # another process may be writing it right now
            data = path.read_bytes()
            if len(data) == 32:
                return data
            time.sleep(0.02)
        raise ProviderError(f"{path} is not a 32-byte key: delete it and it is made "
                            "again (sign-ins in progress then fail once)") from None
    key = secrets.token_bytes(32)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
        f.flush()
        os.fsync(f.fileno())
    return key


def _claim(claims: Mapping[str, Any], name: str) -> Any:
    """A claim by name; a dotted name reaches into objects (Keycloak's
    ``realm_access.roles``) when no top-level claim has that name."""
    if name in claims:
        return claims[name]
    value: Any = claims
    for part in name.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def map_role(cfg: OIDCConfig, value: Any) -> str | None:
    """The node role for a role claim's value (a string or a list of them): the first entry
    of ``role_map``, in the order of the configuration, that the value holds."""
    if isinstance(value, str):
        values = {value}
    elif isinstance(value, list):
        values = {str(v) for v in value}
    else:
        values = set()
    for claim_value, role in cfg.role_map.items():
        if claim_value in values:
            return role
    return None


class OIDCClient:
    """The relying party for one provider; one per app, made at first use."""

    def __init__(self, cfg: OIDCConfig, redirect_uri: str, storage: Path,
                 timeout: float = 10.0) -> None:
        self.cfg = cfg
        self.redirect_uri = redirect_uri
        self.timeout = timeout
        self._key = OctKey.import_key(load_key(storage))
        self._meta: dict[str, Any] | None = None
        self._jwks: KeySet | None = None
        self._jwks_at = 0.0
        self._lock = asyncio.Lock()

    # -- the provider's documents --------------------------------------------------------------

    async def _get_json(self, url: str, what: str, **kw: Any) -> Any:
        try:
            async with httpx.AsyncClient(timeout=self.timeout) as c:
                r = await c.get(url, **kw)
        except httpx.HTTPError as e:
            raise ProviderError(f"the single sign-on provider cannot be reached ({what} at "
                                f"{url}: {e.__class__.__name__}): try again later, or ask "
                                "an administrator to check web.oidc.issuer") from None
        if r.status_code != 200:
            raise ProviderError(f"the single sign-on provider answered {r.status_code} for "
                                f"its {what} ({url}): try again later, or ask an "
                                "administrator to check web.oidc.issuer")
        try:
            return r.json()
        except ValueError:
            raise ProviderError(f"the single sign-on provider's {what} ({url}) is not "
                                "JSON: check web.oidc.issuer") from None

    async def metadata(self) -> dict[str, Any]:
        """The discovery document (fetched once, checked: the issuer must be ours)."""
        if self._meta is not None:
            return self._meta
        async with self._lock:
            if self._meta is None:
                issuer = self.cfg.issuer.rstrip("/")
                meta = await self._get_json(f"{issuer}/.well-known/openid-configuration",
                                            "discovery document")
                if not isinstance(meta, dict):
                    raise ProviderError("the provider's discovery document is not an object")
                missing = [k for k in ("issuer", "authorization_endpoint", "token_endpoint",
                                       "jwks_uri") if not isinstance(meta.get(k), str)]
                if missing:
                    raise ProviderError("the provider's discovery document lacks "
                                        f"{', '.join(missing)}: is {issuer} an OpenID "
                                        "Connect issuer?")
                if meta["issuer"].rstrip("/") != issuer:
                    raise ProviderError(f"the provider calls itself {meta['issuer']!r}, not "
                                        f"{self.cfg.issuer!r}: set web.oidc.issuer to "
                                        "exactly its issuer")
                self._meta = meta
        assert self._meta is not None
        return self._meta

    async def _keys(self, refresh: bool = False) -> KeySet:
        meta = await self.metadata()
        if self._jwks is None or (refresh and time.monotonic() - self._jwks_at > 10):
            data = await self._get_json(meta["jwks_uri"], "key set (JWKS)")
            try:
                self._jwks = KeySet.import_key_set(data)
            except (JoseError, ValueError, KeyError, TypeError) as e:
                raise ProviderError(f"the provider's key set is not a JWKS ({e})") from None
            self._jwks_at = time.monotonic()
        return self._jwks

    # -- the flow --------------------------------------------------------------------------------

    async def begin(self, next_path: str) -> tuple[str, Flow]:
        """The provider's authorization URL for a new sign-in, and the flow to keep."""
        meta = await self.metadata()
        flow = Flow.new(next_path)
        url = prepare_grant_uri(
            meta["authorization_endpoint"], self.cfg.client_id, "code",
            redirect_uri=self.redirect_uri, scope=self.cfg.scope, state=flow.state,
            nonce=flow.nonce, code_challenge=create_s256_code_challenge(flow.verifier),
            code_challenge_method="S256")
        return str(url), flow

    def seal(self, flow: Flow) -> str:
        """The flow as a cookie value: encrypted and authenticated with the node's key."""
        return jwe.encrypt_compact({"alg": "dir", "enc": "A256GCM"},
                                   json.dumps(asdict(flow)), self._key)

    def unseal(self, value: str | None) -> Flow | None:
        """The flow from a cookie value; None when absent, forged or expired."""
        if not value:
            return None
        try:
            data = json.loads(jwe.decrypt_compact(value, self._key).plaintext or b"")
            flow = Flow(**data)
        except (JoseError, ValueError, TypeError):
            return None
        return flow if flow.expires > time.time() else None

    async def finish(self, flow: Flow, code: str) -> Identity:
        """Exchange the code, validate the ID token, map the claims to a node user."""
        meta = await self.metadata()
        tokens = await self._exchange(meta, flow, code)
        claims = await self._id_token(tokens, flow)
        cfg = self.cfg
        if (_claim(claims, cfg.username_claim) is None or _claim(claims, cfg.role_claim) is None
                ) and isinstance(meta.get("userinfo_endpoint"), str) and tokens.get(
                    "access_token"):
            info = await self._get_json(
                meta["userinfo_endpoint"], "userinfo",
                headers={"Authorization": f"Bearer {tokens['access_token']}"})
            if isinstance(info, dict) and info.get("sub") == claims["sub"]:
                claims = {**info, **claims}
        name = _claim(claims, cfg.username_claim)
        if not isinstance(name, str) or not name.strip():
            raise SSORefused(f"the single sign-on provider did not say who you are (no "
                             f"'{cfg.username_claim}' claim): ask an administrator to check "
                             "web.oidc.username_claim", f"no {cfg.username_claim} claim")
        name = name.strip()
        role_value = _claim(claims, cfg.role_claim)
        role = map_role(cfg, role_value)
        if role is None:
            raise SSORefused(
                f"Your account ({name}) has no role in dicomnode: ask the administrator of "
                f"your single sign-on to give you one of the {cfg.role_claim} that dicomnode "
                f"maps to a role ({', '.join(cfg.role_map) or 'none is configured'}).",
                f"no mapped {cfg.role_claim}: {_short(role_value)}", user=name)
        display = claims.get("name")
        if not isinstance(display, str) or not display.strip():
            display = " ".join(str(claims[k]) for k in ("given_name", "family_name")
                               if isinstance(claims.get(k), str)) or name
        return Identity(subject=str(claims["sub"]), name=name, display_name=display[:128],
                        role=role)

    async def _exchange(self, meta: Mapping[str, Any], flow: Flow, code: str
                        ) -> dict[str, Any]:
        data = {"grant_type": "authorization_code", "code": code,
                "redirect_uri": self.redirect_uri, "code_verifier": flow.verifier,
                "client_id": self.cfg.client_id}
        headers = {"Accept": "application/json"}
        if self.cfg.client_secret:
            methods = meta.get("token_endpoint_auth_methods_supported",
                               ["client_secret_basic"])
            if "client_secret_basic" in methods or "client_secret_post" not in methods:
                # RFC 6749 2.3.1: both parts form-encoded before Basic
                pair = f"{quote(self.cfg.client_id, safe='')}:" \
                       f"{quote(self.cfg.client_secret, safe='')}"
                headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
            else:
                data["client_secret"] = self.cfg.client_secret
        url = meta["token_endpoint"]
        try:
            async with httpx.AsyncClient(timeout=self.timeout) as c:
                r = await c.post(url, data=data, headers=headers)
        except httpx.HTTPError as e:
            raise ProviderError(f"the single sign-on provider cannot be reached (token "
                                f"endpoint {url}: {e.__class__.__name__}): try again "
                                "later") from None
        try:
            body = r.json()
        except ValueError:
            body = None
        if r.status_code >= 500 or not isinstance(body, dict):
            raise ProviderError(f"the single sign-on provider's token endpoint answered "
                                f"{r.status_code}: try again later")
        if r.status_code != 200 or "error" in body:
            error = str(body.get("error", r.status_code))
            if error == "invalid_client":
                raise SSORefused("the single sign-on provider does not accept dicomnode's "
                                 "client credentials: ask an administrator to check "
                                 "web.oidc.client_id and client_secret",
                                 "token endpoint: invalid_client")
            raise SSORefused("the single sign-on provider refused to complete the sign-in "
                             f"({error}): please sign in again",
                             f"token endpoint: {error} {_short(body.get('error_description'))}")
        if not isinstance(body.get("id_token"), str):
            raise SSORefused("the single sign-on provider sent no identity token: ask an "
                             "administrator to check that web.oidc.scope includes 'openid'",
                             "no id_token")
        return body

    async def _id_token(self, tokens: Mapping[str, Any], flow: Flow) -> dict[str, Any]:
        meta = await self.metadata()
        offered = meta.get("id_token_signing_alg_values_supported") or ["RS256"]
        algorithms = [a for a in ASYMMETRIC if a in offered] or ["RS256"]
        raw = tokens["id_token"]
        try:
            try:
                token = jwt.decode(raw, await self._keys(), algorithms=algorithms)
            except InvalidKeyIdError:
                # an unknown key id: the provider may have rotated its keys
                token = jwt.decode(raw, await self._keys(refresh=True), algorithms=algorithms)
            claims = CodeIDToken(
                dict(token.claims), dict(token.header),
                options={"iss": {"essential": True, "value": meta["issuer"]},
                         "aud": {"essential": True, "value": self.cfg.client_id},
                         "sub": {"essential": True},
                         "exp": {"essential": True},
                         "nonce": {"essential": True, "value": flow.nonce}},
                params={"nonce": flow.nonce, "client_id": self.cfg.client_id,
                        "access_token": tokens.get("access_token")})
            claims.validate(leeway=LEEWAY)
        except (JoseError, ValueError, TypeError) as e:
            raise SSORefused("the identity token from the single sign-on provider is not "
                             "valid: please sign in again (if it keeps happening, ask an "
                             "administrator: the log says why)",
                             f"id token: {e.__class__.__name__}: {_short(str(e))}") from None
        return dict(claims)


def _short(value: Any, n: int = 120) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:n]
