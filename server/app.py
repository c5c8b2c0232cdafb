"""The web app: Twilio's voice webhook, the media-stream WebSocket, and a status page."""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import AsyncIterator, Mapping

import aiohttp
from aiohttp import web

from server import NAME, __version__
from server import twilio_protocol as tw
from server.call import Call, CallDeps
from server.prompts import Prompt, load_prompt
from server.settings import Settings
from server.stream_tokens import StreamTokens

log = logging.getLogger("server.app")

SETTINGS = web.AppKey("settings", Settings)
PROMPT = web.AppKey("prompt", Prompt)
CALLS: web.AppKey[weakref.WeakSet[Call]] = web.AppKey("calls")
IDLE: web.AppKey[asyncio.Event] = web.AppKey("idle")  # set while no call is live
DEPS = web.AppKey("deps", CallDeps)
TOKENS: web.AppKey[StreamTokens | None] = web.AppKey("tokens")

TWILIO_MAX_MSG = 64 * 1024  # a 20 ms media frame is ~300 bytes; anything near this is not Twilio
_SHUTDOWN_GRACE = 2.0


def create_app(settings: Settings) -> web.Application:
    """Build the app; raises ConfigError if the configured prompt cannot be loaded."""
    app = web.Application()
    app[SETTINGS] = settings
    app[PROMPT] = load_prompt(settings)
    app[CALLS] = weakref.WeakSet()
    app[IDLE] = asyncio.Event()
    app[IDLE].set()
    app[TOKENS] = (
        StreamTokens(settings.twilio_auth_token, settings.stream_token_ttl)
        if settings.twilio_auth_token
        else None
    )
    app.cleanup_ctx.append(_http_session)
    app.on_shutdown.append(_end_calls)
    app.router.add_get("/", status)
    app.router.add_route("GET", "/incoming-call", incoming_call)
    app.router.add_route("POST", "/incoming-call", incoming_call)
    app.router.add_get("/media-stream", media_stream)
    return app


async def _http_session(app: web.Application) -> AsyncIterator[None]:
    """One ClientSession for every OpenAI socket, with no connection cap (aiohttp's default
    connector stops at 100 simultaneous sockets, and each call holds one)."""
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        app[DEPS] = CallDeps(app[SETTINGS], http, app[PROMPT], app[TOKENS])
        yield


async def drain(app: web.Application, seconds: float, interrupt: asyncio.Event) -> None:
    """Let live calls finish on their own, for up to `seconds` or until `interrupt` is set.

    Must run before the runner's cleanup: aiohttp stops reading every connection, live
    WebSockets included, before it calls on_shutdown, so a call cannot finish after that."""
    calls, idle = app[CALLS], app[IDLE]
    if not calls or seconds <= 0:
        return
    log.info("shutting down: waiting up to %g s for %d call(s) to end", seconds, len(calls))
    waiters = [asyncio.ensure_future(idle.wait()), asyncio.ensure_future(interrupt.wait())]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def _end_calls(app: web.Application) -> None:
    """On shutdown: end every live call with GOING_AWAY and wait for their sockets to close."""
    calls = app[CALLS]
    if calls:
        log.info("shutting down: ending %d call(s)", len(calls))
        for call in list(calls):
            call.shutdown()
        try:
            await asyncio.wait_for(app[IDLE].wait(), _SHUTDOWN_GRACE)
        except TimeoutError:
            log.warning("%d call(s) did not end within %g s", len(calls), _SHUTDOWN_GRACE)


async def status(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    return web.json_response(
        {
            "name": NAME,
            "version": __version__,
            "active_calls": len(request.app[CALLS]),
            "model": settings.openai_model,
            "prompt": request.app[PROMPT].describe(),
            "authenticated_webhooks": settings.twilio_auth_token is not None,
        }
    )


def public_base(request: web.Request, settings: Settings) -> str:
    """The scheme://host Twilio used to reach us: PUBLIC_URL, else what the proxy says."""
    if settings.public_url:
        return settings.public_url
    proto = request.headers.get("X-Forwarded-Proto", request.scheme).split(",")[0].strip()
    host = request.headers.get("X-Forwarded-Host", request.host).split(",")[0].strip()
    return f"{proto}://{host}"


def stream_url(request: web.Request, settings: Settings) -> str:
    base = public_base(request, settings)
    scheme, _, rest = base.partition("://")
    return f"{'wss' if scheme == 'https' else 'ws'}://{rest}/media-stream"


async def incoming_call(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    params: Mapping[str, str] = {}
    if request.method == "POST":
        params = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
    if settings.twilio_auth_token:
        url = public_base(request, settings) + request.raw_path
        signature = request.headers.get("X-Twilio-Signature")
        if not tw.signature_valid(settings.twilio_auth_token, url, params, signature):
            log.warning(
                "rejected webhook from %s: %s X-Twilio-Signature (checked against %s; "
                "set PUBLIC_URL to the URL configured in Twilio)",
                request.remote, "invalid" if signature else "missing", url,
            )
            raise web.HTTPForbidden(text="invalid Twilio signature\n")
    fields = {**request.query, **params}
    call_sid = str(fields.get("CallSid", ""))
    calls = request.app[CALLS]
    if settings.max_calls and len(calls) >= settings.max_calls:
        log.warning("refused call %s: at MAX_CALLS=%d", call_sid or "?", settings.max_calls)
        return _twiml(tw.busy_twiml("All our lines are busy. Please call again shortly."))
    parameters = {"caller": str(fields.get("From", "")), "called": str(fields.get("To", ""))}
    tokens = request.app[TOKENS]
    if tokens is not None:
        if not call_sid:
            raise web.HTTPBadRequest(text="CallSid is required\n")
        parameters["token"] = tokens.mint(call_sid)
    url = stream_url(request, settings)
    log.info("incoming call %s from %s: streaming to %s", call_sid or "?",
             parameters["caller"] or "?", url)
    return _twiml(tw.connect_twiml(url, parameters, settings.fallback_message))


def _twiml(body: str) -> web.Response:
    return web.Response(text=body, content_type="application/xml")


async def media_stream(request: web.Request) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    signature = request.headers.get("X-Twilio-Signature")
    if settings.twilio_auth_token and signature:
        url = stream_url(request, settings)
        if not tw.signature_valid(settings.twilio_auth_token, url, {}, signature):
            log.warning("rejected media stream from %s: invalid X-Twilio-Signature for %s",
                        request.remote, url)
            raise web.HTTPForbidden(text="invalid Twilio signature\n")
    ws = web.WebSocketResponse(
        compress=False,
        max_msg_size=TWILIO_MAX_MSG,
        timeout=1.0,  # wait at most this long for Twilio's reply to our close
        receive_timeout=settings.stream_idle_timeout,
        decode_text=False,
    )
    await ws.prepare(request)
    call = Call(request.app[DEPS], ws, peer=request.remote or "?")
    calls, idle = request.app[CALLS], request.app[IDLE]
    calls.add(call)
    idle.clear()
    try:
        await call.run()
    finally:
        calls.discard(call)
        if not calls:
            idle.set()
    return ws
