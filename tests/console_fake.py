"""A stand-in for the console's live routes (issue 14 phase 2 builds the real ones), serving
the documented routes and JSON shapes next to the real console routes, operators and records
API, on a loopback port. The tests drive it: start and end calls, publish events, send audio;
it keeps what the page sent (posts, talk frames) and when it sent each event and frame, so a
test can measure event-to-page and audio-to-page delays.

Routes (as the front end expects them from phase 2; README "The operator console"):
GET  /events                  SSE: call.started / call.ended of every call
GET  /calls/{sid}/events      SSE: one call's events, replayed from the start (Last-Event-ID)
GET  /calls/{sid}/listen      WebSocket: {"event":"media","media":{"track","payload"}}, clear
GET  /calls/{sid}/talk        WebSocket: {"event":"media","media":{"payload"}} (taken over only)
POST /calls/{sid}/whisper     {"text","respond"} -> 202
POST /calls/{sid}/takeover    -> 202; 409 when another operator has it
POST /calls/{sid}/handback    -> 202
POST /calls/{sid}/hangup      -> 202
POST /calls/{sid}/transfer    {"target"} -> 202
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from aiohttp import WSMsgType, web

from server.console import routes as console_routes
from server.console.auth import OPERATORS, Operators, json_error, operator_of, operator_route
from server.console.sse import EventStream, last_event_id
from server.logs import mask_number
from server.outbound.campaigns import Campaigns
from server.outbound.routes import add_routes as add_campaign_routes
from server.outbound.store import CampaignStore, open_campaign_store
from server.records import api as records_api
from server.records.store import SQLiteStore
from server.settings import Settings

ADMIN = "admin-token-0123456789abcdef"
ANN = "ann-token-0123456789abcdef"
BOB = "bob-token-0123456789abcdef"
TARGETS = (("sales", "+15550100001"), ("support", "sip:desk@example.com"))


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class FakeCall:
    sid: str
    caller: str
    called: str
    direction: str
    started: float = field(default_factory=time.time)
    events: list[dict[str, Any]] = field(default_factory=list)
    queues: list[asyncio.Queue[dict[str, Any] | None]] = field(default_factory=list)
    sent_at: dict[int, float] = field(default_factory=dict)  # seq -> when first written out
    listeners: list[web.WebSocketResponse] = field(default_factory=list)
    talk_frames: list[tuple[float, str]] = field(default_factory=list)
    talk_open: asyncio.Event = field(default_factory=asyncio.Event)
    talk_closed: asyncio.Event = field(default_factory=asyncio.Event)
    listener_joined: asyncio.Event = field(default_factory=asyncio.Event)
    resumed: asyncio.Event = field(default_factory=asyncio.Event)
    resumed_from: list[int] = field(default_factory=list)  # Last-Event-ID of reconnections
    taken_over_by: str | None = None
    speaker: str | None = None
    latency_ms: float | None = None
    tools_running: int = 0
    ended: bool = False

    @property
    def started_iso(self) -> str:
        return datetime.fromtimestamp(self.started, UTC).isoformat(
            timespec="milliseconds").replace("+00:00", "Z")

    def publish(self, kind: str, at: float | None = None, /, **fields: Any) -> dict[str, Any]:
        """One event as design-core.md shapes it, to every subscriber."""
        event = {"type": kind, "seq": len(self.events) + 1,
                 "at": round(time.time() - self.started, 3) if at is None else at,
                 "time": now_iso(), "call_sid": self.sid, **fields}
        self.events.append(event)
        if kind == "transcript":
            self.speaker = fields["role"]
        elif kind == "latency":
            self.latency_ms = fields["ms"]
        elif kind == "tool.started":
            self.tools_running += 1
        elif kind == "tool.finished":
            self.tools_running -= 1
        for queue in self.queues:
            queue.put_nowait(event)
        return event

    def drop_streams(self) -> None:
        """End every SSE stream of this call (as a proxy or a restart would); the page
        reconnects."""
        for queue in self.queues:
            queue.put_nowait(None)

    def summary(self) -> dict[str, Any]:
        """`GET /calls?status=live`: the records' summary shape plus the live fields."""
        return {"call_sid": self.sid, "from": mask_number(self.caller), "to": self.called,
                "direction": self.direction, "started_at": self.started_iso, "ended_at": None,
                "duration_seconds": round(time.time() - self.started, 3), "end_kind": None,
                "end_reason": None, "cost_usd": None, "recording": False,
                "speaker": self.speaker, "latency_ms": self.latency_ms,
                "tools_running": self.tools_running, "taken_over_by": self.taken_over_by}

    async def send_audio(self, track: str, payload: bytes) -> float:
        """One media message to every listener; returns when it went out."""
        message = orjson.dumps({"event": "media", "media": {
            "track": track, "payload": base64.b64encode(payload).decode()}}).decode()
        sent = time.time()
        for ws in list(self.listeners):
            await ws.send_str(message)
        return sent

    async def clear(self) -> float:
        sent = time.time()
        for ws in list(self.listeners):
            await ws.send_str('{"event":"clear"}')
        return sent


@dataclass
class Post:
    action: str
    operator: str
    body: Any
    at: float = field(default_factory=time.time)


class Fleet:
    """The live calls, the fleet-wide event subscribers, and what operators asked for."""

    def __init__(self) -> None:
        self.calls: dict[str, FakeCall] = {}
        self.fleet_queues: list[asyncio.Queue[dict[str, Any] | None]] = []
        self.fleet_sent: dict[str, float] = {}  # "<type> <sid>" -> when written out
        self.posts: list[Post] = []
        self.posted = asyncio.Event()
        self.sockets: set[web.WebSocketResponse] = set()

    def _fleet(self, event: dict[str, Any]) -> None:
        for queue in self.fleet_queues:
            queue.put_nowait(event)

    def start_call(self, sid: str, caller: str = "+15550001111", called: str = "+15550002222",
                   direction: str = "inbound") -> FakeCall:
        call = self.calls[sid] = FakeCall(sid, caller, called, direction)
        started = call.publish("call.started", direction=direction,
                               caller=mask_number(caller), called=called,
                               stream_sid="MZ" + sid[2:], model_api="realtime",
                               model="gpt-realtime", prompt="support-v3",
                               started_at=call.started_iso)
        self._fleet(started)
        return call

    def end_call(self, sid: str, kind: str = "caller_hung_up",
                 reason: str = "the caller hung up") -> None:
        call = self.calls.pop(sid)
        call.ended = True
        ended = call.publish("call.ended", kind=kind, reason=reason,
                             duration_seconds=round(time.time() - call.started, 3))
        self._fleet(ended)
        for queue in call.queues:
            queue.put_nowait(None)

    async def hand_over(self, sid: str) -> FakeCall:
        """A deploy moves the call to another instance: its `call.ended` of kind `handover`,
        its streams and sockets closed, and live nowhere (404) until `resume`."""
        call = self.calls.pop(sid)
        self._fleet(call.publish("call.ended", kind="handover",
                                 reason="handed over to another instance",
                                 duration_seconds=round(time.time() - call.started, 3)))
        call.drop_streams()
        for ws in list(call.listeners):
            await ws.close()
        return call

    def resume(self, call: FakeCall) -> None:
        """The new instance took the call up: live again, its events numbered on."""
        self.calls[call.sid] = call
        self._fleet(call.publish("call.started", direction=call.direction,
                                 caller=mask_number(call.caller), called=call.called,
                                 stream_sid="MZ" + call.sid[2:], model_api="realtime",
                                 model="gpt-realtime", prompt="support-v3",
                                 started_at=call.started_iso))

    async def live(self) -> list[dict[str, Any]]:
        return [call.summary() for call in self.calls.values()]

    def record_post(self, post: Post) -> None:
        self.posts.append(post)
        self.posted.set()

    async def wait_post(self, action: str, timeout: float = 5.0) -> Post:
        """The first post of `action` (waits for it)."""
        async def find() -> Post:
            while True:
                for post in self.posts:
                    if post.action == action:
                        return post
                self.posted.clear()
                await self.posted.wait()

        return await asyncio.wait_for(find(), timeout)

    async def close(self) -> None:
        for queue in self.fleet_queues:
            queue.put_nowait(None)
        for call in self.calls.values():
            for queue in call.queues:
                queue.put_nowait(None)
        for ws in list(self.sockets):
            await ws.close()


FLEET = web.AppKey("fleet", Fleet)
SEEN = web.AppKey("seen", list)


def _call(request: web.Request) -> FakeCall:
    call = request.app[FLEET].calls.get(request.match_info["sid"])
    if call is None:
        raise json_error(web.HTTPNotFound, "no live call with this SID")
    return call


@operator_route
async def fleet_events(request: web.Request) -> web.StreamResponse:
    fleet = request.app[FLEET]
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    fleet.fleet_queues.append(queue)
    stream = await EventStream.open(request)
    try:
        while (event := await queue.get()) is not None:
            fleet.fleet_sent.setdefault(f"{event['type']} {event['call_sid']}", time.time())
            await stream.send(event, event_id=None)
    finally:
        fleet.fleet_queues.remove(queue)
    return stream.response


@operator_route
async def call_events(request: web.Request) -> web.StreamResponse:
    call = _call(request)
    after = last_event_id(request)
    if "Last-Event-ID" in request.headers:
        call.resumed_from.append(after)
        call.resumed.set()
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    call.queues.append(queue)  # before the replay: nothing falls between the two
    stream = await EventStream.open(request)
    try:
        for past in list(call.events):
            if past["seq"] > after:
                call.sent_at.setdefault(past["seq"], time.time())
                await stream.send(past)
                after = past["seq"]
        while (event := await queue.get()) is not None:
            if event["seq"] > after:
                call.sent_at.setdefault(event["seq"], time.time())
                await stream.send(event)
    finally:
        call.queues.remove(queue)
    return stream.response


async def _socket(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(heartbeat=None)
    await ws.prepare(request)
    request.app[FLEET].sockets.add(ws)
    return ws


@operator_route
async def listen(request: web.Request) -> web.WebSocketResponse:
    call = _call(request)
    ws = await _socket(request)
    call.listeners.append(ws)
    call.listener_joined.set()
    request.app[FLEET].record_post(Post("listen", operator_of(request), None))
    try:
        async for _ in ws:  # nothing expected from the page
            pass
    finally:
        call.listeners.remove(ws)
        request.app[FLEET].sockets.discard(ws)
    return ws


@operator_route
async def talk(request: web.Request) -> web.StreamResponse:
    call = _call(request)
    if call.taken_over_by != operator_of(request):
        raise json_error(web.HTTPConflict, "the call is not taken over by you")
    ws = await _socket(request)
    call.talk_open.set()
    try:
        async for message in ws:
            if message.type == WSMsgType.TEXT:
                data = orjson.loads(message.data)
                if data.get("event") == "media":
                    call.talk_frames.append((time.time(), data["media"]["payload"]))
    finally:
        call.talk_closed.set()
        request.app[FLEET].sockets.discard(ws)
    return ws


async def _json(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise json_error(web.HTTPBadRequest, "the body is not JSON") from None
    if not isinstance(body, dict):
        raise json_error(web.HTTPBadRequest, "the body is not a JSON object")
    return body


@operator_route
async def control(request: web.Request) -> web.Response:
    fleet, call, operator = request.app[FLEET], _call(request), operator_of(request)
    action = request.match_info["action"]
    body: Any = None
    if action == "whisper":
        body = await _json(request)
        if not isinstance(body.get("text"), str) or not body["text"].strip() \
                or not isinstance(body.get("respond", False), bool):
            raise json_error(web.HTTPBadRequest, "text (a string) and respond (a boolean)")
        call.publish("whisper", operator=operator, text=body["text"],
                     respond=body.get("respond", False))
    elif action == "takeover":
        if call.taken_over_by not in (None, operator):
            raise web.HTTPConflict(text=orjson.dumps({
                "error": f"{call.taken_over_by} has taken this call over",
                "operator": call.taken_over_by}).decode(), content_type="application/json")
        call.taken_over_by = operator
        call.publish("takeover", operator=operator)
    elif action == "handback":
        call.taken_over_by = None
        call.publish("handback", operator=operator)
    elif action == "hangup":
        call.publish("operator.action", operator=operator, action="hangup", detail=None)
        fleet.end_call(call.sid, "admin_hung_up", f"hung up by operator {operator}")
    elif action == "transfer":
        body = await _json(request)
        if body.get("target") not in dict(TARGETS):
            raise json_error(web.HTTPBadRequest, "target is not one of TRANSFER_TARGETS")
        call.publish("operator.action", operator=operator, action="transfer",
                     detail=body["target"])
    else:
        raise json_error(web.HTTPNotFound, "no such action")
    fleet.record_post(Post(action, operator, body))
    return web.json_response({"call_sid": call.sid, action: "requested"}, status=202)


@web.middleware
async def _seen(request: web.Request,
                handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                ) -> web.StreamResponse:
    """Every request's method, path and Range header, for the tests to look at."""
    request.app[SEEN].append((request.method, request.path, request.headers.get("Range")))
    return await handler(request)


async def _operator(request: web.Request) -> str:
    return operator_of(request)


@dataclass
class Backend:
    url: str
    fleet: Fleet
    store: SQLiteStore
    operators: Operators
    app: web.Application
    campaigns: Campaigns

    @property
    def seen(self) -> list[tuple[str, str, str | None]]:
        return self.app[SEEN]


def console_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"openai_api_key": "sk-test", "admin_token": ADMIN,
                              "operator_tokens": (("ann", ANN), ("bob", BOB)),
                              "transfer_targets": TARGETS}
    values.update(overrides)
    return Settings(**values)


@contextlib.asynccontextmanager
async def start_backend(tmp_path: Path) -> AsyncIterator[Backend]:
    """The real console, operators, records and campaigns API (no dialler: campaigns stay
    where the test puts them) plus the fake live routes, on 127.0.0.1."""
    settings = console_settings()
    operators = Operators.from_settings(settings)
    store = SQLiteStore(tmp_path / "calls.db")
    await store.open()
    campaign_store: CampaignStore | None = open_campaign_store(
        f"sqlite:///{tmp_path / 'campaigns.db'}")
    assert campaign_store is not None
    await campaign_store.open()
    campaigns = Campaigns(campaign_store)
    fleet = Fleet()
    app = web.Application(middlewares=[_seen])
    app[FLEET] = fleet
    app[SEEN] = []
    app[OPERATORS] = operators
    app[records_api.LIVE_CALLS] = fleet.live
    records_api.add_routes(app, lambda: store, operators)
    console_routes.add_routes(app, operators, settings)
    add_campaign_routes(app, campaigns=lambda: campaigns, do_not_call=lambda: None,
                        authorize=_operator)
    app.router.add_get("/events", fleet_events)
    app.router.add_get("/calls/{sid}/events", call_events)
    app.router.add_get("/calls/{sid}/listen", listen)
    app.router.add_get("/calls/{sid}/talk", talk)
    app.router.add_post("/calls/{sid}/{action}", control)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield Backend(f"http://127.0.0.1:{port}", fleet, store, operators, app, campaigns)
    finally:
        await fleet.close()
        await runner.cleanup()
        await store.close()
        await campaign_store.close()


# --- history to look at: a day of calls, one with a recording ---

FEATURED = "CA0f3a9c2e71d84b6f9a1c5e2d7b8a4c61"
FEATURED_TIMELINE: list[dict[str, Any]] = [
    {"at": 0.8, "kind": "caller", "text": "Hi, I'm calling about my order. It hasn't arrived yet.",
     "item_id": "item_c1"},
    {"at": 3.9, "kind": "assistant", "item_id": "item_a1", "latency_ms": 640.0,
     "text": "I'm sorry to hear that. Could you type or say your order number?"},
    {"at": 7.5, "kind": "keypad", "digits": "4821"},
    {"at": 8.2, "kind": "tool", "name": "lookup_order", "call_id": "call_1",
     "arguments": {"order": "4821"}, "outcome": "ok", "seconds": 0.418,
     "result": {"status": "shipped", "carrier": "UPS", "eta": "Thursday"}},
    {"at": 9.1, "kind": "assistant", "item_id": "item_a2", "latency_ms": 910.0,
     "interrupted": True, "heard_ms": 2300,
     "text": "Thanks. Order 4821 shipped on Monday with UPS and should arrive on Thursday. "
             "Would you like me to text you the tracking link so you can follow it?"},
    {"at": 12.4, "kind": "caller", "item_id": "item_c2",
     "text": "Can I get it sooner? I need it for the weekend."},
    {"at": 14.0, "kind": "assistant", "item_id": "item_a3", "latency_ms": 720.0,
     "text": "I can upgrade it to express delivery at no cost, so it arrives tomorrow. "
             "Shall I do that?"},
    {"at": 19.0, "kind": "caller", "item_id": "item_c3", "text": "Yes please. Thank you!"},
    {"at": 20.3, "kind": "assistant", "item_id": "item_a4", "latency_ms": 580.0,
     "text": "Done: it arrives tomorrow before noon. Anything else I can help with?"},
]
FEATURED_SECONDS = 24.6


def _recording(path: Path, timeline: list[dict[str, Any]], seconds: float) -> None:
    """A stereo WAV like the bridge's (caller left, assistant right, 8 kHz): a tone while
    each side speaks, so the player has something to play and seek in."""
    import array
    import math
    import wave

    rate = 8000
    left = array.array("h", bytes(2 * int(seconds * rate)))
    right = array.array("h", bytes(2 * int(seconds * rate)))
    turns = [e for e in timeline if e["kind"] in ("caller", "assistant")]
    for i, turn in enumerate(turns):
        end = turns[i + 1]["at"] - 0.4 if i + 1 < len(turns) else seconds - 0.5
        channel, hz = (left, 220.0) if turn["kind"] == "caller" else (right, 330.0)
        for n in range(int(turn["at"] * rate), min(len(channel), int(end * rate))):
            envelope = 0.5 + 0.5 * math.sin(2 * math.pi * 3 * n / rate)  # syllables
            channel[n] = int(6000 * envelope * math.sin(2 * math.pi * hz * n / rate))
    frames = array.array("h", (s for pair in zip(left, right, strict=True) for s in pair))
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(2)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(frames.tobytes())


async def seed_history(store: SQLiteStore, directory: Path, calls: int = 36) -> None:
    """A day of finished calls ending in the last hours, one featured with a recording."""
    import random
    from datetime import timedelta

    from server.call.conversation import CallerTurn, Conversation
    from server.call.record import CallRecord

    rng = random.Random(14)
    now = datetime.now(UTC)
    kinds = (["caller_hung_up"] * 12 + ["assistant_ended"] * 6 + ["transferred"] * 3
             + ["admin_hung_up", "time_limit", "openai_error", "idle"])
    numbers = ["+15550100" + f"{n:03d}" for n in range(40)]
    for i in range(calls):
        started = now - timedelta(hours=23.5 * rng.random() ** 0.7, minutes=rng.random() * 5)
        duration = 20 + rng.random() * 240
        record = CallRecord(call_sid=f"CA{i:02d}" + f"{rng.getrandbits(120):030x}",
                            caller=rng.choice(numbers), called="+15550002222",
                            direction="outbound" if i % 7 == 3 else "inbound",
                            model="gpt-realtime", prompt="support-v3", started_at=started)
        record.ended_at = started + timedelta(seconds=duration)
        record.end_kind = rng.choice(kinds)
        record.end_reason = record.end_kind.replace("_", " ")
        record.latencies_ms = [round(rng.lognormvariate(6.6, 0.35), 1)
                               for _ in range(rng.randint(2, 12))]
        record.cost_usd = round(duration * 0.0031, 4)
        record.conversation.add(CallerTurn(0.6, "Hello?", "item_1"))
        await store.save(record.to_dict())
    featured = CallRecord(call_sid=FEATURED, caller="+15550147311", called="+15550002222",
                          model="gpt-realtime", prompt="support-v3",
                          started_at=now - timedelta(minutes=42))
    featured.ended_at = featured.started_at + timedelta(seconds=FEATURED_SECONDS)
    featured.end_kind, featured.end_reason = "caller_hung_up", "the caller hung up"
    featured.conversation = Conversation.from_dicts(FEATURED_TIMELINE)
    assert featured.timeline == FEATURED_TIMELINE, "a kind the record does not keep"
    featured.latencies_ms = [e["latency_ms"] for e in FEATURED_TIMELINE if "latency_ms" in e]
    featured.barge_ins = 1
    featured.usage = {"total_tokens": 4210, "input_tokens": 3120, "output_tokens": 1090,
                      "input_token_details": {"text_tokens": 1480, "audio_tokens": 1640,
                                              "cached_tokens": 960},
                      "output_token_details": {"text_tokens": 270, "audio_tokens": 820}}
    featured.cost_usd = 0.0712
    featured.operator_actions = [{"time": None, "at": 10.2, "operator": "ann",
                                  "action": "listen", "detail": None}]
    wav = directory / f"{FEATURED}.wav"
    _recording(wav, FEATURED_TIMELINE, FEATURED_SECONDS)
    featured.recording = str(wav)
    await store.save(featured.to_dict())
