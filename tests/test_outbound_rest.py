"""The Twilio REST client against the fake Twilio, and the fake playing Twilio's part of a call:
signed callbacks, the TwiML fetch, the media stream, AMD, hang-up and redirect."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from server.outbound.twilio_rest import CallbackUrls, TwilioError, TwilioRest
from server.settings import ConfigError, Settings
from server.testing.dial import ACCOUNT_SID
from server.testing.inbox import Inbox, wait_until
from server.testing.twilio_rest import Callee, FakeTwilio, answering_machine
from server.wire import twilio as tw

TOKEN = "fake-twilio-auth-token-0123456789"
TO, FROM = "+15550001111", "+15550009999"
MakeServer = Callable[..., Awaitable[TestServer]]


@dataclass
class Receiver:
    """The application's side, as far as these tests need it: signed callbacks recorded, the
    TwiML that opens a stream, and the stream's messages."""

    token: str
    status: Inbox[dict[str, str]] = field(default_factory=Inbox)
    amd: Inbox[dict[str, str]] = field(default_factory=Inbox)
    twiml_fetches: list[dict[str, str]] = field(default_factory=list)
    stream: Inbox[dict[str, Any]] = field(default_factory=Inbox)
    rejected: list[str] = field(default_factory=list)
    close_stream: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/incoming-call", self._twiml)
        app.router.add_post("/call-status", self._callback(self.status))
        app.router.add_post("/amd-status", self._callback(self.amd))
        app.router.add_post("/connect-action", self._action)
        app.router.add_get("/media-stream", self._ws)
        return app

    async def _signed(self, request: web.Request) -> dict[str, str]:
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        if not tw.signature_valid(self.token, str(request.url), form,
                                  request.headers.get("X-Twilio-Signature")):
            self.rejected.append(request.path)
            raise web.HTTPForbidden()
        return form

    async def _twiml(self, request: web.Request) -> web.Response:
        form = await self._signed(request)
        self.twiml_fetches.append({**form, "plan": request.query.get("plan", "")})
        ws = str(request.url.with_path("/media-stream").with_query(None)).replace(
            "http://", "ws://")
        action = str(request.url.with_path("/connect-action").with_query(None))
        return web.Response(text=tw.connect_twiml(ws, {"plan": request.query["plan"]}, action),
                            content_type="text/xml")

    async def _action(self, request: web.Request) -> web.Response:
        await self._signed(request)
        return web.Response(text=tw.decision_twiml(tw.HANGUP), content_type="text/xml")

    def _callback(self, inbox: Inbox[dict[str, str]],
                  ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            inbox.add(await self._signed(request))
            return web.Response(status=204)

        return handle

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        closer = asyncio.get_running_loop().create_task(self.close_stream.wait())
        reader = asyncio.get_running_loop().create_task(self._read(ws))
        await asyncio.wait({closer, reader}, return_when=asyncio.FIRST_COMPLETED)
        closer.cancel()
        reader.cancel()
        await asyncio.gather(closer, reader, return_exceptions=True)
        await ws.close()
        self.stream.close()
        return ws

    async def _read(self, ws: web.WebSocketResponse) -> None:
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                self.stream.add(orjson.loads(msg.data))

    def statuses(self) -> list[str]:
        return [f["CallStatus"] for f in self.status.items]

    def media(self) -> int:
        return sum(1 for m in self.stream.items if m.get("event") == "media")


@dataclass
class World:
    fake: FakeTwilio
    receiver: Receiver
    rest: TwilioRest
    api_url: str
    app_url: str
    http: aiohttp.ClientSession

    def urls(self, plan: str = "plan-1") -> CallbackUrls:
        return CallbackUrls.for_plan(self.app_url, plan)


@pytest.fixture
async def world(aiohttp_server: MakeServer) -> AsyncIterator[World]:
    fake = FakeTwilio(auth_token=TOKEN)
    api = await aiohttp_server(fake.app)
    receiver = Receiver(TOKEN)
    app = await aiohttp_server(receiver.app())
    async with aiohttp.ClientSession() as http:
        api_url = str(api.make_url("")).rstrip("/")
        rest = TwilioRest(http, account_sid=ACCOUNT_SID, auth_token=TOKEN, api_url=api_url)
        yield World(fake, receiver, rest, api_url, str(app.make_url("")).rstrip("/"), http)


async def ended(world: World, sid: str, timeout: float = 10.0) -> None:
    await asyncio.wait_for(world.fake.calls[sid].ended.wait(), timeout)


async def test_place_call_sends_twilios_fields_and_plays_a_human_answer(world: World) -> None:
    placed = await world.rest.place_call(to=TO, from_=FROM, urls=world.urls("plan-42"),
                                         ring_timeout=25)
    assert placed.sid.startswith("CA") and placed.status == "queued"
    post = world.fake.creates()[0]
    assert post.authorized and post.user == ACCOUNT_SID
    form = post.form
    assert (form["To"], form["From"]) == (TO, FROM)
    assert form["Url"] == f"{world.app_url}/incoming-call?plan=plan-42"
    assert form["StatusCallback"] == f"{world.app_url}/call-status"
    assert form.getall("StatusCallbackEvent") == ["initiated", "ringing", "answered",
                                                  "completed"]
    assert (form["Timeout"], form["MachineDetection"], form["AsyncAmd"]) == (
        "25", "DetectMessageEnd", "true")
    assert form["AsyncAmdStatusCallback"] == f"{world.app_url}/amd-status"

    # Twilio's part: answered, the TwiML fetched with the plan, the stream opened with the
    # TwiML's parameters, the callee's "hello" streamed, then AMD says human.
    amd = await world.receiver.amd.wait_for(lambda f: True, timeout=10)
    assert amd["AnsweredBy"] == "human" and amd["CallSid"] == placed.sid
    assert int(amd["MachineDetectionDuration"]) > 0
    fetch = world.receiver.twiml_fetches[0]
    assert fetch["plan"] == "plan-42" and fetch["Direction"] == "outbound-api"
    start = await world.receiver.stream.wait_for(lambda m: m.get("event") == "start")
    assert start["start"]["callSid"] == placed.sid
    assert start["start"]["customParameters"] == {"plan": "plan-42"}
    await wait_until(lambda: world.receiver.media() >= 40, what="800 ms of the callee's hello")

    # Hang up through the API: `stop` on the stream, then `completed`.
    assert await world.rest.hang_up(placed.sid) is True
    await ended(world, placed.sid)
    await world.receiver.stream.wait_for(lambda m: m.get("event") == "stop")
    assert world.fake.calls[placed.sid].hung_up_by == "api"
    await world.receiver.status.wait_for(lambda f: f["CallStatus"] == "completed")
    assert world.receiver.statuses() == ["initiated", "ringing", "in-progress", "completed"]
    assert [int(f["SequenceNumber"]) for f in world.receiver.status.items] == [0, 1, 2, 3]
    assert world.receiver.rejected == []  # every callback and fetch was signed correctly
    assert world.fake.calls[placed.sid].errors == []
    assert await world.rest.hang_up(placed.sid) is True  # already over: still fine to ask


async def test_answering_machine_result_comes_after_the_greeting_and_beep(world: World) -> None:
    world.fake.callees[TO] = Callee("machine", audio=answering_machine(600, 200))
    placed = await world.rest.place_call(to=TO, from_=FROM, urls=world.urls())
    amd = await world.receiver.amd.wait_for(lambda f: True, timeout=10)
    assert amd["AnsweredBy"] == "machine_end_beep"
    assert amd["MachineDetectionDuration"] == "1000"  # 600 ms greeting + 200 ms beep + 200
    # the whole greeting and the beep reached the stream (40 frames of 20 ms)
    await wait_until(lambda: world.receiver.media() >= 40, what="greeting and beep")
    assert world.receiver.statuses()[:3] == ["initiated", "ringing", "in-progress"]
    # The application ends it by closing the stream: Twilio asks <Connect action>, hangs up.
    world.receiver.close_stream.set()
    await ended(world, placed.sid)
    call = world.fake.calls[placed.sid]
    assert call.status == "completed" and call.hung_up_by == "server"
    assert [c.kind for c in world.fake.callbacks if c.kind in ("twiml", "action")] == [
        "twiml", "action"]


@pytest.mark.parametrize("answer", ["busy", "no-answer", "failed"])
async def test_unanswered_calls_report_their_final_status(world: World, answer: str) -> None:
    world.fake.callees[TO] = Callee(answer, ring_s=0.1)
    placed = await world.rest.place_call(to=TO, from_=FROM, urls=world.urls())
    await ended(world, placed.sid)
    await world.receiver.status.wait_for(lambda f: f["CallStatus"] == answer)
    assert world.receiver.statuses() == ["initiated", "ringing", answer]
    assert world.receiver.twiml_fetches == [] and world.receiver.amd.items == []


async def test_hang_up_while_ringing_cancels(world: World) -> None:
    world.fake.callees[TO] = Callee("human", ring_s=30)
    placed = await world.rest.place_call(to=TO, from_=FROM, urls=world.urls())
    await world.receiver.status.wait_for(lambda f: f["CallStatus"] == "ringing")
    assert await world.rest.hang_up(placed.sid) is True
    await ended(world, placed.sid)
    assert world.receiver.statuses() == ["initiated", "ringing", "canceled"]


async def test_redirect_replaces_the_stream_with_new_twiml(world: World) -> None:
    placed = await world.rest.place_call(to=TO, from_=FROM, urls=world.urls())
    await world.receiver.stream.wait_for(lambda m: m.get("event") == "start")
    status = await world.rest.redirect(placed.sid, tw.decision_twiml(tw.say("Goodbye.")))
    assert status == "in-progress"
    await ended(world, placed.sid)
    await world.receiver.stream.wait_for(lambda m: m.get("event") == "stop")
    assert world.fake.calls[placed.sid].said == ["Goodbye."]
    with pytest.raises(TwilioError) as caught:  # no longer in progress
        await world.rest.redirect(placed.sid, tw.decision_twiml(tw.HANGUP))
    assert (caught.value.status, caught.value.code) == (400, 21220)


async def test_unknown_call_hang_up_is_false(world: World) -> None:
    assert await world.rest.hang_up("CA" + "0" * 32) is False


async def test_bad_credentials_raise_with_twilios_code_and_never_log_the_token(
        world: World, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = TwilioRest(world.http, account_sid=ACCOUNT_SID, auth_token="wrong-token-abcdef",
                       api_url=world.api_url)
    with pytest.raises(TwilioError) as caught:
        await wrong.place_call(to=TO, from_=FROM, urls=world.urls())
    assert (caught.value.status, caught.value.code, caught.value.message) == (
        401, 20003, "Authenticate")
    assert world.fake.posts[0].authorized is False and world.fake.calls == {}
    assert "wrong-token-abcdef" not in caplog.text and "wrong-token" not in repr(wrong)
    assert TO not in caplog.text  # the number is masked in the log line
    assert "401" in caplog.text


async def test_a_twilio_error_carries_status_code_and_message(world: World) -> None:
    world.fake.callees[TO] = Callee(rest_error=(400, 21215, "Geo permissions do not allow it"))
    with pytest.raises(TwilioError) as caught:
        await world.rest.place_call(to=TO, from_=FROM, urls=world.urls())
    error = caught.value
    assert (error.status, error.code) == (400, 21215)
    assert error.message == "Geo permissions do not allow it"
    assert error.more_info == "https://www.twilio.com/docs/errors/21215"
    assert error.to_dict() == {"error": "Geo permissions do not allow it",
                               "twilio_status": 400, "twilio_code": 21215}


async def test_every_request_is_bounded_by_the_timeout(aiohttp_server: MakeServer) -> None:
    never = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await never.wait()
        return web.json_response({})

    async def html(request: web.Request) -> web.Response:
        return web.Response(status=502, text="<html>Bad gateway</html>",
                            content_type="text/html")

    app = web.Application()
    app.router.add_post("/hang/2010-04-01/Accounts/{a}/Calls.json", hang)
    app.router.add_post("/html/2010-04-01/Accounts/{a}/Calls.json", html)
    server = await aiohttp_server(app)
    base = str(server.make_url("")).rstrip("/")
    async with aiohttp.ClientSession() as http:
        slow = TwilioRest(http, account_sid=ACCOUNT_SID, auth_token=TOKEN,
                          api_url=f"{base}/hang", timeout=0.3)
        with pytest.raises(TwilioError) as caught:
            # a deadline far above the client's own 0.3 s: a request that ignored its timeout
            # would end here in TimeoutError, not TwilioError (aiohttp's default is 5 minutes)
            async with asyncio.timeout(10):
                await slow.place_call(to=TO, from_=FROM, urls=CallbackUrls("u", "s", "a"))
        assert caught.value.status is None and "0.3 s" in caught.value.message
        proxy = TwilioRest(http, account_sid=ACCOUNT_SID, auth_token=TOKEN,
                           api_url=f"{base}/html")
        with pytest.raises(TwilioError) as caught:
            await proxy.place_call(to=TO, from_=FROM, urls=CallbackUrls("u", "s", "a"))
        assert (caught.value.status, caught.value.code) == (502, None)
        assert caught.value.message == "an answer that is not JSON"
        unreachable = TwilioRest(http, account_sid=ACCOUNT_SID, auth_token=TOKEN,
                                 api_url="http://127.0.0.1:9")
        with pytest.raises(TwilioError) as caught:
            await unreachable.hang_up("CA1")
        assert caught.value.status is None
    never.set()


async def test_from_settings_names_what_is_missing() -> None:
    base = Settings(openai_api_key="sk-x", twilio_auth_token=TOKEN)
    async with aiohttp.ClientSession() as http:
        with pytest.raises(ConfigError) as caught:
            TwilioRest.from_settings(base, http)
        assert caught.value.variable == "TWILIO_ACCOUNT_SID"
        rest = TwilioRest.from_settings(
            Settings(openai_api_key="sk-x", twilio_auth_token=TOKEN,
                     twilio_account_sid=ACCOUNT_SID, twilio_api_url="http://127.0.0.1:1"), http)
        assert "127.0.0.1:1/2010-04-01/Accounts/" in repr(rest) and TOKEN not in repr(rest)


def test_callback_urls_carry_the_plan() -> None:
    urls = CallbackUrls.for_plan("https://bridge.example.com/", "p 1&x")
    assert urls.twiml == "https://bridge.example.com/incoming-call?plan=p+1%26x"
    assert (urls.status, urls.amd) == ("https://bridge.example.com/call-status",
                                       "https://bridge.example.com/amd-status")
