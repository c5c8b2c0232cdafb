"""Who is this operator: bearer tokens, the console's session cookie, the same-origin check.

`ADMIN_TOKEN` is the operator `admin`; `OPERATOR_TOKENS` adds named ones. A request proves an
operator with `Authorization: Bearer <token>` or with the session cookie that
`POST /console/login` sets. The cookie never holds the token: it is `name.expiry.mac`, signed
with a key derived from that operator's token, so every instance of a fleet checks it without
shared state, and a changed token ends that operator's sessions.

A browser sends the cookie by itself, also on requests another site makes it send; so a request
that changes state with the cookie, and every WebSocket upgrade (a page cannot put a bearer
token on one), must come from a page of this same site: its `Origin` must be the host the
request was sent to (`Host`, or `X-Forwarded-Host` behind a proxy: operators may reach the
console at an internal address as well as at the public URL).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import orjson
from aiohttp import web

from server.console.throttle import Throttle, client_of

if TYPE_CHECKING:
    from server.settings import Settings

log = logging.getLogger("server.console")

COOKIE = "bridge_console"
SESSION_SECONDS = 12 * 3600
ADMIN = "admin"
_KEY_LABEL = b"phone-bridge console session v1"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_DEFAULT_PORTS = {"http": 80, "https": 443}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_error(cls: type[web.HTTPException], message: str,
               headers: Mapping[str, str] | None = None) -> web.HTTPException:
    """An HTTP error to raise whose body is `{"error": message}`."""
    return cls(text=orjson.dumps({"error": message}).decode(), content_type="application/json",
               headers=headers)


def unauthorized(message: str = "a valid operator token (Authorization: Bearer) or console "
                                "session is needed") -> web.HTTPException:
    return json_error(web.HTTPUnauthorized, message, {"WWW-Authenticate": 'Bearer realm="calls"'})


def too_many(retry_after: int) -> web.HTTPException:
    """429 for a client that presented too many wrong tokens (see `throttle.py`)."""
    return json_error(web.HTTPTooManyRequests,
                      f"too many wrong operator tokens from this address; try again in "
                      f"{retry_after} s", {"Retry-After": str(retry_after)})


class Operators:
    """The operators this server knows, by name; checks credentials in constant time, and
    refuses a client that keeps presenting wrong ones."""

    def __init__(self, tokens: Mapping[str, str], *,
                 session_seconds: float = SESSION_SECONDS,
                 clock: Callable[[], float] = time.time,
                 throttle: Throttle | None = None) -> None:
        self._tokens = {name: token.encode() for name, token in tokens.items() if token}
        self._keys = {name: hmac.new(token, _KEY_LABEL, hashlib.sha256).digest()
                      for name, token in self._tokens.items()}
        self.session_seconds = session_seconds
        self._clock = clock
        self.throttle = throttle or Throttle()

    @classmethod
    def from_settings(cls, settings: Settings) -> Operators:
        tokens = dict(settings.operator_tokens)
        if settings.admin_token:
            tokens[ADMIN] = settings.admin_token
        return cls(tokens)

    @property
    def enabled(self) -> bool:
        """False when no token is set: the console and the operator routes are off."""
        return bool(self._tokens)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._tokens))

    def by_token(self, token: str) -> str | None:
        """The operator whose token this is. Every token is compared, each in constant time,
        so the time taken says nothing about which one (or how much of one) matched."""
        given = token.encode()
        found = None
        for name, expected in self._tokens.items():
            if hmac.compare_digest(given, expected):
                found = name
        return found

    # --- the session cookie ---

    def session_value(self, name: str) -> str:
        """A cookie value for `name`, valid for `session_seconds` from now."""
        expires = int(self._clock() + self.session_seconds)
        return f"{name}.{expires}.{self._mac(name, expires)}"

    def session_operator(self, value: str) -> str | None:
        """The operator a cookie value names, if it is ours, intact and not expired."""
        name, _, rest = value.partition(".")
        expires_text, _, mac = rest.partition(".")
        if name not in self._keys or not expires_text.isdigit() or len(expires_text) > 12:
            return None
        expires = int(expires_text)
        if not hmac.compare_digest(mac.encode(), self._mac(name, expires).encode()):
            return None
        return name if expires > self._clock() else None

    def _mac(self, name: str, expires: int) -> str:
        digest = hmac.new(self._keys[name], f"{name}.{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def set_session(self, response: web.StreamResponse, request: web.Request, name: str) -> None:
        response.set_cookie(COOKIE, self.session_value(name), max_age=int(self.session_seconds),
                            path="/", httponly=True, samesite="Strict",
                            secure=came_over_https(request))

    @staticmethod
    def clear_session(response: web.StreamResponse, request: web.Request) -> None:
        response.set_cookie(COOKIE, "", max_age=0, path="/", httponly=True, samesite="Strict",
                            secure=came_over_https(request))

    # --- a request ---

    def authenticate(self, request: web.Request) -> str:
        """The operator making this request; raises 401 (no or a wrong credential) or 403 (a
        cookie-borne state change or a WebSocket upgrade from another site)."""
        header = request.headers.get("Authorization")
        upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
        if header is not None:
            client = client_of(request)
            if wait := self.throttle.retry_after(client):
                raise too_many(wait)
            scheme, _, given = header.partition(" ")
            name = self.by_token(given.strip()) if scheme.lower() == "bearer" else None
            if name is None:
                self.throttle.failed(client)
                raise unauthorized()
            # A browser always sends Origin on an upgrade; tools send none.
            if upgrade and "Origin" in request.headers and not same_origin(request):
                raise _cross_origin(request)
            return name
        cookie = request.cookies.get(COOKIE)
        name = self.session_operator(cookie) if cookie else None
        if name is None:
            raise unauthorized()
        if (upgrade or request.method not in _SAFE_METHODS) and not same_origin(request):
            raise _cross_origin(request)
        return name

    def identify(self, request: web.Request) -> str | None:
        """`authenticate` without raising: the operator, or None."""
        try:
            return self.authenticate(request)
        except web.HTTPException:
            return None


OPERATORS = web.AppKey("operators", Operators)
OPERATOR = web.RequestKey("operator", str)


def operators_for(app: web.Application, settings: Settings) -> Operators:
    """The app's operators, made from the settings on first use (one object per app)."""
    if OPERATORS not in app:
        app[OPERATORS] = Operators.from_settings(settings)
    return app[OPERATORS]


def operator_of(request: web.Request) -> str:
    """The operator making this request (checked once per request); raises 401/403."""
    known: str | None = request.get(OPERATOR)
    if known is not None:
        return known
    operators = request.app.get(OPERATORS)
    if operators is None or not operators.enabled:
        raise unauthorized("no operator tokens are set on this server")
    name = request[OPERATOR] = operators.authenticate(request)
    return name


def operator_route(handler: Handler) -> Handler:
    """Decorate a route handler: only an operator reaches it (`operator_of` inside is free)."""

    @functools.wraps(handler)
    async def guarded(request: web.Request) -> web.StreamResponse:
        operator_of(request)
        return await handler(request)

    return guarded


def came_over_https(request: web.Request) -> bool:
    """https to us directly, or to the proxy in front (`X-Forwarded-Proto`)."""
    forwarded = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    return request.secure or forwarded == "https"


def same_origin(request: web.Request) -> bool:
    """True when the request's `Origin` is the host it was sent to: `Host`, or the first
    `X-Forwarded-Host` (a page's script cannot set that header on a cross-site request)."""
    origin = _origin(request.headers.get("Origin", ""))
    if origin is None:
        return False
    scheme, want = origin
    hosts = [request.headers.get("Host", ""),
             request.headers.get("X-Forwarded-Host", "").split(",")[0].strip()]
    return any(host and _netloc(scheme, host) == want for host in hosts)


def _origin(value: str) -> tuple[str, str] | None:
    scheme, sep, host = value.strip().partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in _DEFAULT_PORTS or not host or "/" in host:
        return None
    netloc = _netloc(scheme, host)
    return (scheme, netloc) if netloc else None


def _netloc(scheme: str, host: str) -> str | None:
    """`host[:port]` in one form: lower case, without the scheme's default port."""
    try:
        parts = urlsplit(f"//{host}")
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname or parts.username is not None:
        return None
    name = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return name if port in (None, _DEFAULT_PORTS[scheme]) else f"{name}:{port}"


def _cross_origin(request: web.Request) -> web.HTTPException:
    log.warning("refused %s %s from %s: Origin is not this site", request.method, request.path,
                request.remote)
    return json_error(web.HTTPForbidden, "this request must come from the console's own site "
                                         "(Origin does not match the host)")
