"""The console's own routes: the login page, the session, the pages and their static files.

Every page is the same shell (`static/app.html`); its ES modules pick the view from the URL and
talk to the operator API (`/calls…`, `/stats`, `/events`) with the session cookie. The static
files are public (they hold no data); the pages and `GET /console/config` need an operator.
"""

from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from aiohttp import web

from server import __version__
from server.console.auth import (
    OPERATORS,
    Operators,
    json_error,
    operator_of,
    operator_route,
    same_origin,
)
from server.console.throttle import client_of

if TYPE_CHECKING:
    from server.settings import Settings

log = logging.getLogger("server.console")

STATIC = Path(__file__).resolve().parent / "static"
HOME = "/console"
LOGIN = "/console/login"

# The pages load nothing from elsewhere and nothing inline: a script injected into a
# transcript line (a caller's words are untrusted) could not run.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "media-src 'self'; connect-src 'self'; font-src 'self'; object-src 'none'; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}
CONTENT_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css",
                 ".svg": "image/svg+xml", ".png": "image/png", ".ico": "image/x-icon",
                 ".woff2": "font/woff2", ".txt": "text/plain"}

CONSOLE_SETTINGS: web.AppKey[dict[str, Any]] = web.AppKey("console_settings")


def add_routes(app: web.Application, operators: Operators, settings: Settings) -> None:
    """The console under /console, or a log line that it is off (no operator token)."""
    if not operators.enabled:
        log.info("ADMIN_TOKEN and OPERATOR_TOKENS are not set: the operator console is off")
        return
    app[CONSOLE_SETTINGS] = {
        "transfer_targets": [name for name, _ in settings.transfer_targets],
        "log_pii": settings.log_pii,
        "version": __version__,
    }
    app.router.add_get(LOGIN, login_page)
    app.router.add_post(LOGIN, login)
    app.router.add_post("/console/logout", logout)
    app.router.add_get("/console/config", config)
    app.router.add_get("/console/static/{path:.+}", static)
    app.router.add_get(HOME, page)
    app.router.add_get("/console/{page:.*}", page)


def _page_response(body: str, status: int = 200) -> web.Response:
    return web.Response(text=body, status=status, content_type="text/html",
                        headers={**SECURITY_HEADERS, "Cache-Control": "no-store"})


def _login_html(error: str = "", next_path: str = HOME) -> str:
    template = (STATIC / "login.html").read_text()
    notice = f'<p class="login-error" role="alert">{html.escape(error)}</p>' if error else ""
    return template.replace("{{error}}", notice).replace("{{next}}", html.escape(next_path))


def _next_path(value: object) -> str:
    """Where to go after logging in: a console page of this site, never elsewhere."""
    if isinstance(value, str) and value.startswith(HOME) and "//" not in value \
            and "\\" not in value and len(value) < 300 and value.isprintable():
        return value
    return HOME


async def login_page(request: web.Request) -> web.Response:
    operators = request.app[OPERATORS]
    if operators.identify(request) is not None:
        raise web.HTTPSeeOther(_next_path(request.query.get("next")))
    return _page_response(_login_html(next_path=_next_path(request.query.get("next"))))


async def login(request: web.Request) -> web.Response:
    """POST /console/login (form: token, next): the session cookie and on to the page; the
    login page again with 401 for a wrong token."""
    if "Origin" in request.headers and not same_origin(request):
        raise json_error(web.HTTPForbidden, "log in from the console's own page")
    form = await request.post()
    token, next_path = form.get("token"), _next_path(form.get("next"))
    operators = request.app[OPERATORS]
    client = client_of(request)
    if wait := operators.throttle.retry_after(client):
        response = _page_response(_login_html(
            f"Too many wrong tokens from your address. Try again in {_minutes(wait)}.",
            next_path), status=429)
        response.headers["Retry-After"] = str(wait)
        return response
    name = operators.by_token(token.strip()) if isinstance(token, str) and token else None
    if name is None:
        log.warning("console login refused from %s: wrong token", client)
        operators.throttle.failed(client)
        return _page_response(_login_html("That token is not valid.", next_path), status=401)
    log.info("operator %s logged in to the console from %s", name, client)
    response = web.Response(status=303, headers={"Location": next_path, **SECURITY_HEADERS})
    operators.set_session(response, request, name)
    return response


def _minutes(seconds: int) -> str:
    minutes = -(-seconds // 60)
    return "1 minute" if minutes == 1 else f"{minutes} minutes"


async def logout(request: web.Request) -> web.Response:
    """POST /console/logout: the cookie is cleared (it is signed, not stored: a copy taken
    earlier stays valid until it expires; change the token to end every session)."""
    if "Origin" in request.headers and not same_origin(request):
        raise json_error(web.HTTPForbidden, "log out from the console's own page")
    response = web.Response(status=303, headers={"Location": LOGIN, **SECURITY_HEADERS})
    Operators.clear_session(response, request)
    return response


@operator_route
async def config(request: web.Request) -> web.Response:
    """GET /console/config: who is logged in, and what the console may offer."""
    offers: dict[str, Any] = request.app[CONSOLE_SETTINGS]
    return web.json_response({"operator": operator_of(request), **offers},
                             headers={"Cache-Control": "no-store"})


async def page(request: web.Request) -> web.Response:
    """Every console page: the shell, for an operator; the login page for anyone else."""
    if request.app[OPERATORS].identify(request) is None:
        target = quote(_next_path(request.path_qs), safe="/")
        raise web.HTTPSeeOther(f"{LOGIN}?next={target}")
    return _page_response((STATIC / "app.html").read_text())


async def static(request: web.Request) -> web.FileResponse:
    """A file under static/ (never outside it), revalidated on each load so a deploy shows."""
    relative = request.match_info["path"]
    path = (STATIC / relative).resolve()
    if not path.is_relative_to(STATIC) or not path.is_file() or path.name.startswith("."):
        raise json_error(web.HTTPNotFound, "no such file")
    content_type = CONTENT_TYPES.get(path.suffix, "application/octet-stream")
    return web.FileResponse(path, headers={**SECURITY_HEADERS, "Content-Type": content_type,
                                           "Cache-Control": "no-cache"})
