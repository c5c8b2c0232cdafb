"""The HTTP side of outbound calls, and what the app owns for them.

    POST /calls          an operator places a call: JSON as `spec.parse_call_request` takes it
                         -> 201 {"call_sid": "CA…", "status": "queued"}; 400 with the reason,
                         401, 409 (do-not-call), 415, 429 (at MAX_CALLS), 502 (Twilio refused:
                         its code and message), 503 (not configured, shutting down)
    POST /call-status    Twilio's status callbacks (signature-checked like the webhook)
    POST /amd-status     Twilio's answering-machine result (signature-checked)

`outbound_context(...)` is the app's cleanup context for outbound calling: the do-not-call
list, the pacer, the REST client, the `Outbound` service and, with a database, the campaigns
and this instance's campaign scheduler (a restart resumes running campaigns).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

import orjson
from aiohttp import web
from redis.asyncio import Redis

from server.outbound.campaigns import Campaigns, CampaignScheduler
from server.outbound.numbers import DoNotCall, DoNotCallError
from server.outbound.pacing import Pacer, RedisPaceStore
from server.outbound.service import Outbound, PlaceRefused
from server.outbound.spec import BadRequest, parse_call_request
from server.outbound.store import CampaignStore, StoreError, open_campaign_store
from server.outbound.twilio_rest import TwilioRest
from server.settings import ConfigError

if TYPE_CHECKING:
    from server.call.call import CallDeps
    from server.call.plan import Plans
    from server.fleet.registry import CallRegistry
    from server.fleet.state import SharedState
    from server.metrics import Metrics
    from server.records.service import Records
    from server.settings import Settings

log = logging.getLogger("server.outbound")

Authorize = Callable[[web.Request], Awaitable[str]]
SignedForm = Callable[[web.Request, str], Awaitable[dict[str, str]]]
MAX_BODY = 64 * 1024  # one call's request: a few variables and a greeting


def add_routes(app: web.Application, *, outbound: Callable[[], Outbound | None],
               authorize: Authorize, signed_form: SignedForm,
               operator_routes: bool = True) -> None:
    """Add the routes; `outbound()` is read at request time (it starts with the app).
    `operator_routes` False (no operator can log in): only Twilio's callbacks."""

    async def create(request: web.Request) -> web.Response:
        operator = await authorize(request)  # 401 / 403, answered as the authorizer says
        service = outbound()
        if service is None:
            return _error(503, "outbound calling is not running")
        if request.content_type != "application/json":
            return _error(415, "send JSON (application/json)")
        if request.content_length is not None and request.content_length > MAX_BODY:
            return _error(413, f"the body is larger than {MAX_BODY} bytes")
        raw = await request.content.read(MAX_BODY + 1)
        if len(raw) > MAX_BODY:
            return _error(413, f"the body is larger than {MAX_BODY} bytes")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            return _error(400, f"the body is not JSON ({e.msg} at position {e.pos})")
        try:
            call = parse_call_request(body, check_prompt=service.check_prompt)
            call_sid = await service.place(call, operator=operator)
        except BadRequest as e:
            return _error(400, str(e))
        except PlaceRefused as e:
            if e.status == 502:
                log.warning("POST /calls by %s: Twilio refused: %s", operator, e.twilio)
            return web.json_response(e.to_dict(), status=e.status)
        return web.json_response({"call_sid": call_sid, "status": "queued"}, status=201,
                                 headers={"Location": f"/calls/{call_sid}"})

    async def status(request: web.Request) -> web.Response:
        fields = await signed_form(request, "status callback")
        service = outbound()
        if service is not None:
            await service.on_status(fields)
        return web.Response(status=204)

    async def amd(request: web.Request) -> web.Response:
        fields = await signed_form(request, "AMD callback")
        service = outbound()
        if service is not None:
            await service.on_amd(fields)
        return web.Response(status=204)

    if operator_routes:
        app.router.add_post("/calls", create)
    app.router.add_post("/call-status", status)
    app.router.add_post("/amd-status", amd)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def outbound_context(outbound_key: web.AppKey[Outbound], campaigns_key: web.AppKey[Campaigns],
                     dnc_key: web.AppKey[DoNotCall],
                     clock_key: web.AppKey[Callable[[], float]], *,
                     settings: web.AppKey[Settings], state: web.AppKey[SharedState],
                     registry: web.AppKey[CallRegistry], plans: web.AppKey[Plans],
                     records: web.AppKey[Records], metrics: web.AppKey[Metrics],
                     deps: web.AppKey[CallDeps],
                     ) -> Callable[[web.Application], AsyncIterator[None]]:
    """The cleanup context that owns outbound calling (after the records store: campaigns
    live in the same database; closed before it)."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        s = app[settings]
        dnc = DoNotCall(s.do_not_call)
        try:
            await dnc.load()  # a bad line stops the start: a blocked number must stay blocked
        except DoNotCallError as e:
            raise ConfigError("DO_NOT_CALL", str(e)) from None
        app[dnc_key] = dnc
        redis: Redis | None = Redis.from_url(s.redis_url) if s.redis_url else None
        pacer = Pacer(s.outbound_cps, RedisPaceStore(redis) if redis is not None else None)
        rest = (TwilioRest.from_settings(s, app[deps].http)
                if s.twilio_account_sid and s.twilio_auth_token else None)
        service = Outbound(s, rest=rest, state=app[state], registry=app[registry],
                           plans=app[plans], records=app[records], metrics=app[metrics],
                           do_not_call=dnc, pacer=pacer)
        app[outbound_key] = service
        if service.unavailable:
            log.info("%s (POST /calls and campaigns answer 503)", service.unavailable)
        store: CampaignStore | None = None
        scheduler: CampaignScheduler | None = None
        try:
            store = open_campaign_store(s.database_url) if not service.unavailable else None
            if store is not None:
                try:
                    await store.open()
                except StoreError as e:
                    log.error("campaigns unavailable: %s", e)
                    store = None
            if store is not None:
                clock = app.get(clock_key, time.time)
                scheduler = CampaignScheduler(store, service.place_for_campaign, clock=clock,
                                              pacer=pacer, do_not_call=dnc)
                service.scheduler = scheduler
                app[campaigns_key] = Campaigns(store, dnc, clock=clock,
                                               on_change=scheduler.wake)
                await scheduler.start()  # running campaigns resume
            yield
        finally:
            if scheduler is not None:
                await scheduler.close()
            await service.close()
            if store is not None:
                await store.close()
            if redis is not None:
                await redis.aclose()

    return context
