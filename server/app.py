"""The web app: Twilio's voice webhook, the media-stream WebSocket, the `<Connect action>`
answer, and a status page. Shared resources (the OpenAI client session, the shared state, the
call registry) are owned here through `cleanup_ctx`."""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import replace
from pathlib import Path

import aiohttp
from aiohttp import web

from server import NAME, __version__
from server.call.assembly import assemble
from server.call.call import Call, CallDeps, CallListener, FeatureFactory
from server.call.plan import Plans
from server.call.prewarm import Prewarmer, offered_tools
from server.console.auth import operator_of, operators_for
from server.console.live import LiveDesk
from server.console.live import add_routes as add_live_routes
from server.console.routes import add_routes as add_console_routes
from server.fleet.events import EventBus
from server.fleet.live import LiveBoard, board_for
from server.fleet.open import open_bus, open_state
from server.fleet.registry import CallRegistry
from server.fleet.state import SharedState
from server.fleet.tokens import StreamTokens
from server.logs import mask_number
from server.metrics import REFUSED_CAPACITY, REFUSED_DRAINING, Metrics, bearer_ok
from server.metrics import add_routes as add_metric_routes
from server.outbound import calls_api
from server.outbound.campaigns import Campaigns
from server.outbound.numbers import DoNotCall
from server.outbound.routes import add_routes as add_campaign_routes
from server.outbound.service import Outbound
from server.records.service import Records
from server.settings import ConfigError, Settings
from server.toolbox import Toolbox, load_toolbox
from server.wire import twilio as tw

log = logging.getLogger("server.app")

SETTINGS = web.AppKey("settings", Settings)
PLANS = web.AppKey("plans", Plans)
REGISTRY = web.AppKey("registry", CallRegistry)
STATE = web.AppKey("state", SharedState)
BUS = web.AppKey("bus", EventBus)
BOARD = web.AppKey("board", LiveBoard)
DESK = web.AppKey("desk", LiveDesk)
DEPS = web.AppKey("deps", CallDeps)
TOKENS: web.AppKey[StreamTokens | None] = web.AppKey("tokens")
FEATURES: web.AppKey[list[FeatureFactory]] = web.AppKey("features")
# Lossless in-process listeners on every call (records, metrics; a test may add its own)
LISTENERS: web.AppKey[list[CallListener]] = web.AppKey("listeners")
RECORDS = web.AppKey("records", Records)
METRICS = web.AppKey("metrics", Metrics)
TOOLS_DESCRIPTION = web.AppKey("tools_description", str)
# Outbound calls (issue 15): placing and following them, campaigns, the do-not-call list
OUTBOUND = web.AppKey("outbound", Outbound)
CAMPAIGNS = web.AppKey("campaigns", Campaigns)
DO_NOT_CALL = web.AppKey("do_not_call", DoNotCall)
# The campaigns' clock (epoch seconds: dialling windows, retries); tests move their own
CAMPAIGN_CLOCK: web.AppKey[Callable[[], float]] = web.AppKey("campaign_clock")

TWILIO_MAX_MSG = 64 * 1024  # a 20 ms media frame is ~300 bytes; anything near this is not Twilio
ACTION_PATH = "/connect-action"
STREAM_PATH = "/media-stream"
# A handed-over call's new stream: told apart before the upgrade (the start frame, with its
# `resume` parameter, comes after it), so a draining instance can still take it.
RESUME_PATH = "/media-stream/resume"
_SHUTDOWN_GRACE = 2.0
DECISION_WAIT = 3.0  # the action request may arrive before the call's clean-up has finished


def create_app(settings: Settings, state: SharedState | None = None,
               bus: EventBus | None = None) -> web.Application:
    """Build the app; raises ConfigError if the configured prompt or features cannot load.

    `state`, `bus`: a shared state and event bus the caller owns (tests run two apps as one
    fleet on them); by default the app opens its own (memory, or Redis with REDIS_URL)."""
    app = web.Application()
    app[SETTINGS] = settings
    if state is not None:
        app[STATE] = state
    if bus is not None:
        app[BUS] = bus
    app[PLANS] = Plans(settings)  # every prompt, greeting and line checked now
    app[TOKENS] = (
        StreamTokens(settings.twilio_auth_token, settings.stream_token_ttl)
        if settings.twilio_auth_token
        else None
    )
    toolbox = load_toolbox(settings)
    if settings.record_calls:
        check_writable(settings.recordings_dir, "RECORDINGS_DIR")
    records = app[RECORDS] = Records(settings)
    metrics = app[METRICS] = Metrics()
    app[FEATURES] = list(assemble(settings, toolbox, records.prices, records.active_recorder,
                                  hang_up=lambda call_sid: _hang_up_later(app, call_sid)))
    listeners: list[CallListener] = [metrics, records]  # lossless: records and metrics
    app[LISTENERS] = listeners
    app[TOOLS_DESCRIPTION] = toolbox.describe()
    app.on_cleanup.append(lambda _app: _close_toolbox(toolbox))
    operators = operators_for(app, settings)
    calls_api.add_routes(app, outbound=lambda: app.get(OUTBOUND), authorize=authorize,
                         signed_form=_signed_form, operator_routes=operators.enabled)
    if operators.enabled:  # POST /calls above: before GET /calls' routes
        add_campaign_routes(app, campaigns=lambda: app.get(CAMPAIGNS),
                            do_not_call=lambda: app.get(DO_NOT_CALL), authorize=authorize,
                            check_prompt=lambda pid, version: _check_prompt(app, pid, version),
                            unavailable=lambda: _campaigns_unavailable(app))
    records.add_routes(app)
    add_console_routes(app, operators, settings)
    if operators.enabled:  # the console's live API: the live calls, their events and audio
        desk = app[DESK] = LiveDesk(settings)
        listeners.append(desk)  # keeps the fleet's index of live calls
        add_live_routes(app, desk)
    add_metric_routes(app, metrics, token=settings.metrics_token,
                      draining=lambda: REGISTRY in app and app[REGISTRY].draining,
                      ping=lambda: _ready(app))
    app.cleanup_ctx.append(_shared_state)
    app.cleanup_ctx.append(_http_session)
    app.cleanup_ctx.append(_records)
    app.cleanup_ctx.append(calls_api.outbound_context(
        OUTBOUND, CAMPAIGNS, DO_NOT_CALL, CAMPAIGN_CLOCK, state=STATE, registry=REGISTRY,
        plans=PLANS, records=RECORDS, metrics=METRICS, deps=DEPS, settings=SETTINGS))
    app.on_shutdown.append(_end_calls)
    app.router.add_get("/", status)
    app.router.add_route("GET", "/incoming-call", incoming_call)
    app.router.add_route("POST", "/incoming-call", incoming_call)
    app.router.add_route("POST", ACTION_PATH, connect_action)
    app.router.add_get(STREAM_PATH, media_stream)
    app.router.add_get(RESUME_PATH, media_stream)
    return app


async def _shared_state(app: web.Application) -> AsyncIterator[None]:
    """Tokens, capacity, decisions, plans and calls' events: in memory, or in Redis for a
    fleet (REDIS_URL)."""
    owned = STATE not in app
    state = await open_state(app[SETTINGS]) if owned else app[STATE]
    app[STATE] = state
    owned_bus = BUS not in app
    if owned_bus:
        try:
            app[BUS] = await open_bus(app[SETTINGS])
        except BaseException:
            if owned:
                await state.close()
            raise
    registry = app[REGISTRY] = CallRegistry(app[SETTINGS], state)
    state.on_control(registry.on_control)
    if app[SETTINGS].shutdown_mode == "handover":
        registry.shutdown_ending = registry.hand_over
    board = app[BOARD] = board_for(state)  # what the console shares: memory, or beside Redis
    await board.start()
    if DESK in app:
        app[DESK].attach(registry, state, board, app[BUS])
    try:
        yield
    finally:
        await board.close()
        if owned_bus:
            await app[BUS].close()
        if owned:
            await state.close()


async def _records(app: web.Application) -> AsyncIterator[None]:
    """The records store, its writer and the call webhook; closed (every record flushed) after
    the calls have ended and before the client session closes."""
    records = app[RECORDS]
    await records.open(app[DEPS].http)
    try:
        yield
    finally:
        await records.close()


def check_writable(directory: Path, variable: str) -> None:
    """Create the directory if needed and write a file in it: a setting that names a place the
    server cannot write stops startup now, not at the end of the first call."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-check-"):
            pass
    except OSError as e:
        raise ConfigError(variable, f"{directory} is not a writable directory "
                                    f"({e.strerror or e})") from None


async def _close_toolbox(toolbox: Toolbox) -> None:
    """After the calls: sync tools still running are logged and left behind."""
    toolbox.close()


async def _ready(app: web.Application) -> bool:
    """For /readyz: the records store answers. Not Redis: without it each instance goes on on
    its own state (logged), and failing readiness fleet-wide would refuse every call instead."""
    return await app[RECORDS].store.ping()


async def _http_session(app: web.Application) -> AsyncIterator[None]:
    """One ClientSession for every OpenAI socket, with no connection cap (aiohttp's default
    connector stops at 100 simultaneous sockets, and each call holds one). Sessions opened
    at the webhook (pre-warmed) are closed before it."""
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        settings = app[SETTINGS]
        features: list[FeatureFactory] = app[FEATURES]
        listeners: list[CallListener] = app[LISTENERS]  # the list itself: tests add to it
        deps = CallDeps(settings, http, app[PLANS], app[TOKENS], app[REGISTRY],
                        tuple(features), listeners=listeners)
        prewarm = Prewarmer(settings, http, app[PLANS], deps.sessions,
                            offered_tools(features, settings) if settings.prewarm else None,
                            app[METRICS].prewarmed)
        app[DEPS] = replace(deps, prewarm=prewarm)
        try:
            yield
        finally:
            await prewarm.close()


async def drain(app: web.Application, seconds: float, interrupt: asyncio.Event) -> None:
    """Stop taking calls and let live ones finish, for up to `seconds` or until `interrupt`.

    Must run before the runner's cleanup: aiohttp stops reading every connection, live
    WebSockets included, before it calls on_shutdown, so a call cannot finish after that."""
    registry = app[REGISTRY]
    registry.draining = True
    await registry.wait_idle(seconds, interrupt)


async def _end_calls(app: web.Application) -> None:
    """On shutdown: end every live call and wait for their sockets to close."""
    registry = app[REGISTRY]
    registry.draining = True
    await registry.close_all(_SHUTDOWN_GRACE)


async def status(request: web.Request) -> web.Response:
    """GET /: `{"ok": true}` for anyone (load balancers, uptime checks); the details (model,
    prompt, live calls, whether webhooks are authenticated) only with the admin token, since
    they tell an attacker where to aim."""
    settings = request.app[SETTINGS]
    if settings.admin_token is None or not bearer_ok(request, settings.admin_token):
        return web.json_response({"ok": True})
    return web.json_response(
        {
            "ok": True,
            "name": NAME,
            "version": __version__,
            "active_calls": len(request.app[REGISTRY]),
            "model": settings.openai_model,
            "prompt": request.app[PLANS].default_prompt.describe(),
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


def stream_url(request: web.Request, settings: Settings, path: str = STREAM_PATH) -> str:
    base = public_base(request, settings)
    scheme, _, rest = base.partition("://")
    return f"{'wss' if scheme == 'https' else 'ws'}://{rest}{path}"


async def _signed_form(request: web.Request, what: str) -> dict[str, str]:
    """The request's parameters, after checking Twilio's signature (403 when it is wrong)."""
    settings = request.app[SETTINGS]
    params: Mapping[str, str] = {}
    if request.method == "POST":
        params = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
    if settings.twilio_auth_token:
        url = public_base(request, settings) + request.raw_path
        signature = request.headers.get("X-Twilio-Signature")
        if not tw.signature_valid(settings.twilio_auth_token, url, params, signature):
            # The query string is left out: a GET webhook carries the caller's number in it.
            shown = public_base(request, settings) + request.path + (
                "?…" if request.query_string else "")
            log.warning(
                "rejected %s from %s: %s X-Twilio-Signature (checked against %s; "
                "set PUBLIC_URL to the URL configured in Twilio)",
                what, request.remote, "invalid" if signature else "missing", shown,
            )
            raise web.HTTPForbidden(text="invalid Twilio signature\n")
    return {**request.query, **params}


def _stream_twiml(request: web.Request, call_sid: str, caller: str, called: str,
                  resume: bool = False) -> str:
    settings = request.app[SETTINGS]
    parameters = {"caller": caller, "called": called}
    if resume:
        parameters["resume"] = "1"
    tokens = request.app[TOKENS]
    if tokens is not None:
        parameters["token"] = tokens.mint(call_sid)
    action = public_base(request, settings) + ACTION_PATH
    path = RESUME_PATH if resume else STREAM_PATH
    return tw.connect_twiml(stream_url(request, settings, path), parameters, action)


async def incoming_call(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    fields = await _signed_form(request, "webhook")
    call_sid = str(fields.get("CallSid", ""))
    if settings.twilio_auth_token and not call_sid:
        raise web.HTTPBadRequest(text="CallSid is required\n")
    registry = request.app[REGISTRY]
    outbound = request.app.get(OUTBOUND)
    placement = request.query.get("plan")  # a call placed here: inside the signed URL
    placed = (await outbound.answered(call_sid, placement)
              if placement and outbound is not None else None)
    if placed is not None:
        pass  # its slot was reserved when it was placed, and moved to this CallSid
    elif not await registry.reserve(call_sid or f"anonymous-{id(request)}"):
        reason = REFUSED_DRAINING if registry.draining else REFUSED_CAPACITY
        request.app[METRICS].call_refused(reason)
        log.warning("refused call %s: %s", call_sid or "?", "shutting down"
                    if reason == REFUSED_DRAINING else f"at MAX_CALLS={settings.max_calls}")
        return _twiml(tw.busy_twiml("All our lines are busy. Please call again shortly."))
    caller, called = str(fields.get("From", "")), str(fields.get("To", ""))
    log.info("incoming call %s from %s", call_sid or "?", mask_number(caller, settings.log_pii))
    plan = placed
    if plan is None:
        plan = request.app[PLANS].inbound(called)
        if call_sid:  # this line's plan, for whichever instance takes the stream
            await registry.decide(call_sid, plan)
    prewarm = request.app[DEPS].prewarm
    if prewarm is not None and call_sid and not registry.draining:
        prewarm.start(call_sid, plan, caller, called)  # in the background: the answer now
    return _twiml(_stream_twiml(request, call_sid, caller, called))


async def connect_action(request: web.Request) -> web.Response:
    """Twilio's `<Connect action>` request: the stream has closed; say what happens next."""
    fields = await _signed_form(request, "connect action")
    call_sid = str(fields.get("CallSid", ""))
    if fields.get("CallStatus") in ("completed", "canceled", "failed", "busy", "no-answer"):
        return _twiml(tw.decision_twiml(tw.HANGUP))  # nobody left to instruct
    state = request.app[STATE]
    data = await state.get_decision(call_sid, wait=DECISION_WAIT) if call_sid else None
    if data is None:
        log.warning("connect action for unknown call %s: fallback, then hang up",
                    call_sid or "?")
        decision = tw.say(request.app[SETTINGS].fallback_message)
    else:
        decision = tw.Decision.from_dict(data)
    log.info("connect action for %s: %s", call_sid or "?", decision.action)
    if decision.action == "reconnect":
        body = _stream_twiml(request, call_sid, str(fields.get("From", "")),
                             str(fields.get("To", "")), resume=True)
    else:
        body = tw.decision_twiml(decision)
    if data is not None:  # a stopping instance waits for this before it exits
        request.app[REGISTRY].action_fetched(call_sid)
        await state.mark_fetched(call_sid)
    return _twiml(body)


async def authorize(request: web.Request) -> str:
    """The operator behind a request to the outbound routes (POST /calls, campaigns,
    do-not-call): a bearer token (ADMIN_TOKEN is `admin`, OPERATOR_TOKENS named ones) or the
    console's session; raises 401/403 (server.console.auth)."""
    return operator_of(request)


def _hang_up_later(app: web.Application, call_sid: str) -> None:
    """An outbound call's answering-machine feature ends the call through the REST API too."""
    outbound = app.get(OUTBOUND)
    if outbound is not None:
        outbound.hang_up_later(call_sid)


def _check_prompt(app: web.Application, prompt_id: str, version: str | None) -> str | None:
    outbound = app.get(OUTBOUND)
    return outbound.check_prompt(prompt_id, version) if outbound is not None else None


def _campaigns_unavailable(app: web.Application) -> str:
    if app[SETTINGS].database_url == "off":
        return "campaigns need a database (DATABASE_URL is off)"
    outbound = app.get(OUTBOUND)
    return (outbound.unavailable if outbound is not None else None) or \
        "campaigns are not available"


def _twiml(body: str) -> web.Response:
    return web.Response(text=body, content_type="application/xml")


async def media_stream(request: web.Request) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    registry = request.app[REGISTRY]
    if registry.draining and request.path != RESUME_PATH:
        # Refused before the upgrade, so a load balancer can retry it on another instance; a
        # handed-over call's stream (RESUME_PATH) is not a new call and is still taken.
        request.app[METRICS].call_refused(REFUSED_DRAINING)
        log.warning("refused a new media stream from %s: shutting down", request.remote)
        return web.json_response({"error": "shutting down"}, status=503,
                                 headers={"Retry-After": "1"})
    signature = request.headers.get("X-Twilio-Signature")
    if settings.twilio_auth_token and signature:
        url = stream_url(request, settings, request.path)
        if not tw.signature_valid(settings.twilio_auth_token, url, {}, signature):
            log.warning("rejected media stream from %s: invalid X-Twilio-Signature for %s",
                        request.remote, url)
            raise web.HTTPForbidden(text="invalid Twilio signature\n")
    ws = web.WebSocketResponse(
        compress=False,
        max_msg_size=TWILIO_MAX_MSG,
        timeout=1.0,  # wait at most this long for Twilio's reply to our close
        decode_text=False,
    )
    await ws.prepare(request)
    call = Call(request.app[DEPS], ws, peer=request.remote or "?")
    call.events.sinks.append(request.app[BUS].publish)  # followers on any instance
    registry.add(call)
    try:
        await call.run()
    finally:
        registry.discard(call)
    return ws
