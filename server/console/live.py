"""The console's live API: the live calls, their events and audio, and the operator's actions,
on whichever instance a request lands, for a call held by any instance.

Routes (every one needs an operator: server/console/auth.py; errors are JSON, 404 for a call
that is not live anywhere):
GET  /calls?status=live       the fleet's live calls (the records API asks `LiveDesk.live_calls`)
GET  /events                  SSE: every call's `call.started` and `call.ended`, and a
                              `call.status` when a live call's summary changes
GET  /calls/{sid}/events      SSE: the call's events from its start, then live (`id: <seq>`,
                              Last-Event-ID resumes); with Redis, through a handover too (the
                              numbering goes on, and a `call.ended` of kind `handover` is not
                              the end)
GET  /calls/{sid}/listen      WebSocket: the call's audio as Twilio media messages (inbound:
                              the caller; outbound: what the caller hears) and `clear`
GET  /calls/{sid}/talk        WebSocket, for the operator who took the call over: their audio
POST /calls/{sid}/whisper, takeover, handback, hangup, transfer   202 (409: another operator
                              has the call, or it is not taken over)

Where a call is: `CallRegistry.find` on this instance; elsewhere the action goes on the shared
state's control channel to the instance holding the call, which runs it (`perform`) and answers
through the live board (server/fleet/live.py); events come from the event bus (Redis Streams),
audio through Redis pub/sub, only while someone listens or talks. The index of live calls is
kept by `on_call_event`, a lossless listener on every call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import WSMsgType, web

from server.call.events import (
    CallEnded,
    CallEvent,
    CallStarted,
    HandBack,
    ReplyStarted,
    TakeOver,
    ToolFinished,
    ToolStarted,
    Transcript,
)
from server.call.features.operator import (
    MAX_WHISPER,
    BadTalk,
    Busy,
    NotTakenOver,
    OperatorFeature,
    TakenOver,
)
from server.console.auth import json_error, operator_of, operator_route
from server.console.sse import HEARTBEAT, EventStream, last_event_id
from server.records.api import LIVE_CALLS

if TYPE_CHECKING:
    from server.call.call import Call
    from server.fleet.events import EventBus
    from server.fleet.live import LiveBoard, Subscription
    from server.fleet.registry import CallRegistry
    from server.fleet.state import SharedState
    from server.settings import Settings

log = logging.getLogger("server.console")

ACTIONS = ("whisper", "takeover", "handback", "hangup", "transfer")
REQUEST_TIMEOUT = 3.0  # the instance holding a call answers an action within this
LISTEN_QUEUE = 250  # audio messages (5 s of both tracks) a listener may lag before losing some
LISTEN_REFRESH = 5.0  # a listener elsewhere renews its hold on the call's audio this often ...
LISTEN_LEASE = 15.0  # ... which lapses this long after the last renewal
NOBODY_GRACE = 3.0  # audio published to nobody this long: the listeners are gone
STATUS_EVERY = 0.5  # /events looks for changed live calls this often
SPEAKING_SECONDS = 2.0  # who spoke last counts as speaking this long
TALK_MAX_MESSAGE = 8 * 1024
STOP = '{"event":"stop"}'  # the end of a call's audio through Redis

Answer = dict[str, Any]  # {"status": int, "body": {...}}


def _answer(status: int, body: dict[str, Any]) -> Answer:
    return {"status": status, "body": body}


def _error(status: int, message: str, **extra: Any) -> Answer:
    return _answer(status, {"error": message, **extra})


class ListenTap:
    """One listen-in's share of a call's audio (an `AudioListener`): a bounded queue that drops
    the oldest for a reader that falls behind; the call never waits for it.

    An operator who has the call is not played their own voice back (heard a moment late, it
    makes talking hard): their tap leaves it out; a tap for listeners on other instances marks
    it (`"operator"` in the message) for each of them to leave out their own."""

    __slots__ = ("_queue", "closed", "dropped", "operator", "ready", "tagged")

    def __init__(self, size: int = LISTEN_QUEUE, operator: str | None = None,
                 tagged: bool = False) -> None:
        self._queue: deque[tuple[str, str, str | None]] = deque(maxlen=size)
        self.ready = asyncio.Event()
        self.dropped = 0
        self.closed = False
        self.operator = operator
        self.tagged = tagged

    def _put(self, track: str, payload: str, operator: str | None = None) -> None:
        queue = self._queue
        if len(queue) == queue.maxlen:
            self.dropped += 1
        queue.append((track, payload, operator))
        self.ready.set()

    def on_operator_audio(self, operator: str, payload: str) -> None:
        if operator != self.operator:
            self._put("outbound", payload, operator if self.tagged else None)

    def on_caller_audio(self, payload: str) -> None:
        self._put("inbound", payload)

    def on_assistant_audio(self, payload: str) -> None:
        self._put("outbound", payload)

    def on_clear(self) -> None:
        """What the caller will not hear any more is dropped here too."""
        self._queue = deque((m for m in self._queue if m[0] != "outbound"),
                            maxlen=self._queue.maxlen)
        self._put("clear", "")

    def close(self) -> None:
        """The call ended: the reader sends what is queued, then stops."""
        self.closed = True
        self.ready.set()

    def take(self) -> list[str]:
        """Everything queued, as Twilio's media messages."""
        queue, self._queue = self._queue, deque(maxlen=self._queue.maxlen)
        return [_media(track, payload, operator) if track != "clear" else '{"event":"clear"}'
                for track, payload, operator in queue]


def _media(track: str, payload: str, operator: str | None) -> str:
    message: dict[str, Any] = {"event": "media", "media": {"track": track, "payload": payload}}
    if operator is not None:
        message["operator"] = operator
    return orjson.dumps(message).decode()


class ListenRelay:
    """A call held here that operators on other instances listen to: one tap, its audio
    published on `listen:<sid>` while any listener renews its lease and someone receives it."""

    def __init__(self, desk: LiveDesk, call: Call, feature: OperatorFeature) -> None:
        self.desk = desk
        self.call = call
        self.feature = feature
        self.channel = f"listen:{call.call_sid}"
        self.tap = ListenTap(tagged=True)
        self.leases: dict[str, float] = {}  # listener id -> monotonic expiry

    def renew(self, listener: str) -> bool:
        """True for a listener not seen before."""
        new = listener not in self.leases
        self.leases[listener] = time.monotonic() + LISTEN_LEASE
        return new

    async def run(self) -> None:
        board = self.desk.board
        tap = self.tap
        self.feature.add_listener(tap)
        unheard_since: float | None = None
        try:
            while True:
                tap.ready.clear()
                batch = tap.take()
                now = time.monotonic()
                self.leases = {k: t for k, t in self.leases.items() if t > now}
                if not self.leases:
                    return
                if batch:
                    if await board.publish(self.channel, batch):
                        unheard_since = None
                    elif unheard_since is None:
                        unheard_since = now
                    elif now - unheard_since > NOBODY_GRACE:
                        return
                    continue
                if tap.closed:
                    return
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await tap.ready.wait()
        finally:
            self.feature.remove_listener(tap)
            if self.desk.relays.get(self.call.call_sid) is self:
                del self.desk.relays[self.call.call_sid]
            if tap.closed:  # the call ended: tell the listeners now
                await board.publish(self.channel, [STOP])


class LiveDesk:
    """The live API's side on one instance (one per app)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.transfer_targets = dict(settings.transfer_targets)
        self.registry: CallRegistry | None = None
        self.state: SharedState | None = None
        self.board: LiveBoard = _NO_BOARD
        self.bus: EventBus | None = None
        self.relays: dict[str, ListenRelay] = {}  # calls here listened to from elsewhere
        self._talkers: dict[str, TakenOver] = {}  # calls here talked to from elsewhere
        self._entries: dict[str, dict[str, Any]] = {}  # this instance's live calls

    def attach(self, registry: CallRegistry, state: SharedState, board: LiveBoard,
               bus: EventBus) -> None:
        """At startup, once the fleet's pieces are open."""
        self.registry, self.state, self.board, self.bus = registry, state, board, bus
        registry.controls["operator"] = self.on_control

    # --- the live calls' index (a lossless listener on every call) ---

    def on_call_event(self, call: Call, event: CallEvent) -> None:
        if not call.events.public:  # a stream never admitted (its sid may be a live call's)
            return
        sid = call.call_sid
        if isinstance(event, CallStarted):
            found = self._entries[sid] = {
                "call_sid": sid, "from": event.caller, "to": event.called,
                "direction": event.direction, "started_at": event.started_at,
                "ended_at": None, "duration_seconds": None, "end_kind": None,
                "end_reason": None, "cost_usd": None, "recording": self.settings.record_calls,
                "speaker": None, "spoke_at": None, "latency_ms": None, "tools_running": 0,
                "taken_over_by": None}
            self.board.put(sid, found)
            return
        entry = self._entries.get(sid)
        if entry is None:
            return
        if isinstance(event, Transcript):
            now = round(time.time(), 3)
            if entry["speaker"] == event.role and now - (entry["spoke_at"] or 0) < 0.5:
                return  # a word more of the same turn: not worth a write
            entry["speaker"], entry["spoke_at"] = event.role, now
        elif isinstance(event, ReplyStarted):
            if event.latency_ms is None:
                return
            entry["latency_ms"] = event.latency_ms
        elif isinstance(event, ToolStarted):
            entry["tools_running"] += 1
        elif isinstance(event, ToolFinished):
            entry["tools_running"] = max(0, entry["tools_running"] - 1)
        elif isinstance(event, TakeOver):
            entry["taken_over_by"] = event.operator
        elif isinstance(event, HandBack):
            entry["taken_over_by"] = None
        elif isinstance(event, CallEnded):
            del self._entries[sid]
            self.board.remove(sid)
            return
        else:
            return
        self.board.put(sid, entry)

    async def live_calls(self) -> list[dict[str, Any]]:
        """`GET /calls?status=live`: newest first, in the records' summary shape plus
        `speaker`, `latency_ms`, `tools_running`, `taken_over_by`."""
        now = time.time()
        calls = [summary(found, now) for found in await self.board.calls()]
        calls.sort(key=lambda c: str(c.get("started_at") or ""), reverse=True)
        return calls

    async def live_elsewhere(self, call_sid: str) -> bool:
        return any(c.get("call_sid") == call_sid for c in await self.board.calls())

    # --- where a call is ---

    def local(self, call_sid: str) -> Call | None:
        """The call, if this instance holds it and it is live (admitted, not ending)."""
        call = self.registry.find(call_sid) if self.registry is not None else None
        if call is None or not call.events.public or call.ending is not None:
            return None
        return call

    async def act(self, call_sid: str, action: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Run an operator action on the call wherever it is; (HTTP status, JSON body)."""
        registry, state = self.registry, self.state
        if registry is None or state is None:
            return 503, {"error": "the server is starting"}
        call = registry.find(call_sid)
        if call is not None:
            answer = await self.perform(call_sid, call, action)
        elif not await self.live_elsewhere(call_sid):
            # (an instance ignores actions for calls it no longer holds: no need to wait)
            return 404, {"error": f"no live call {call_sid}"}
        else:
            key = self.board.reply_key()
            delivered = await state.publish(call_sid, {**action, "action": "operator",
                                                       "reply": key})
            if not delivered:
                await self.board.wait_reply(key, 0)  # forget it
                return 404, {"error": f"no live call {call_sid}"}
            found = await self.board.wait_reply(key, REQUEST_TIMEOUT)
            if found is None:
                return 504, {"error": "the instance holding the call did not answer"}
            answer = found
        status, body = answer.get("status"), answer.get("body")
        if not isinstance(status, int) or not isinstance(body, dict):
            return 502, {"error": "a malformed answer from the instance holding the call"}
        return status, body

    async def tell(self, call_sid: str, action: dict[str, Any]) -> None:
        """`act` without waiting for the answer (a listener leaving)."""
        call = self.registry.find(call_sid) if self.registry is not None else None
        if call is not None:
            await self.perform(call_sid, call, action)
        elif self.state is not None:
            await self.state.publish(call_sid, {**action, "action": "operator"})

    async def on_control(self, call_sid: str, call: Call | None,
                         action: dict[str, Any]) -> None:
        """An operator action sent here from another instance: run it, send the answer."""
        answer = await self.perform(call_sid, call, action)
        key = action.get("reply")
        if isinstance(key, str):
            await self.board.reply(key, answer)

    async def perform(self, call_sid: str, call: Call | None, action: dict[str, Any]) -> Answer:
        """An operator action on a call this instance holds (or held)."""
        if call is None or call is not self.local(call_sid):
            return _error(404, f"no live call {call_sid}")
        feature = call.feature(OperatorFeature)
        if feature is None:
            return _error(503, "the operator's powers are off on the instance holding this call")
        op, operator = action.get("op"), str(action.get("operator") or "")
        if not operator:
            return _error(400, "no operator")
        try:
            return await self._perform(call, feature, str(op), operator, action)
        except Exception:
            call.log.exception("operator action %r failed", op)
            return _error(500, "internal error")

    async def _perform(self, call: Call, feature: OperatorFeature, op: str, operator: str,
                       action: dict[str, Any]) -> Answer:
        sid = call.call_sid
        if op == "whisper":
            text, respond = action.get("text"), action.get("respond")
            if not isinstance(text, str) or not text.strip() or not isinstance(respond, bool):
                return _error(400, "text (a string) and respond (a boolean)")
            await feature.whisper(operator, text.strip()[:MAX_WHISPER], respond)
            return _answer(202, {"call_sid": sid, "whisper": "sent"})
        if op == "takeover":
            try:
                control = await feature.take_over(operator)
            except Busy as e:
                return _error(409, str(e), operator=e.operator)
            if self.board.fleet and self._talkers.get(sid) is not control:
                # The operator's talk socket may be on another instance: its audio comes
                # through Redis. Subscribed before answering, so none of it is lost.
                subscription = await self.board.subscribe(f"talk:{sid}")
                self._talkers[sid] = control
                call.spawn(self._talk_from_fleet(call, feature, control, subscription),
                           "operator-talk-fleet")
            return _answer(202, {"call_sid": sid, "taken_over_by": operator})
        if op == "handback":
            try:
                await feature.hand_back(operator)
            except NotTakenOver as e:
                return _error(409, str(e))
            return _answer(202, {"call_sid": sid, "handback": "done"})
        if op == "hangup":
            feature.hang_up(operator)
            return _answer(202, {"call_sid": sid, "hangup": "requested"})
        if op == "transfer":
            target = action.get("target")
            number = self.transfer_targets.get(target) if isinstance(target, str) else None
            if number is None or not isinstance(target, str):
                return _error(400, "target is not one of TRANSFER_TARGETS")
            feature.transfer(operator, target, number)
            return _answer(202, {"call_sid": sid, "transfer": target})
        if op == "talk":
            if feature.taken_over_by != operator:
                return _talk_refused(feature)
            return _answer(200, {"call_sid": sid, "taken_over_by": operator})
        if op == "listen":
            listener = str(action.get("listener") or "")
            relay = self.relays.get(sid)
            if relay is None:
                relay = self.relays[sid] = ListenRelay(self, call, feature)
                relay.renew(listener)
                call.spawn(relay.run(), "listen-relay")
                feature.listening(operator)
            elif relay.renew(listener):
                feature.listening(operator)
            return _answer(202, {"call_sid": sid, "listen": relay.channel})
        if op == "unlisten":
            relay = self.relays.get(sid)
            if relay is not None:
                relay.leases.pop(str(action.get("listener") or ""), None)
                relay.tap.ready.set()
            return _answer(202, {"call_sid": sid})
        return _error(400, f"unknown action {op!r}")

    async def _talk_from_fleet(self, call: Call, feature: OperatorFeature, control: TakenOver,
                               subscription: Subscription) -> None:
        """The operator's audio from a talk socket on another instance, while they have it."""
        bad = 0
        try:
            while not control.released.is_set():
                for payload in await subscription.get(0.5) or ():
                    try:
                        await feature.operator_audio(control.operator, payload)
                    except NotTakenOver:
                        return
                    except BadTalk as e:
                        bad += 1
                        if bad == 1:
                            call.warn(f"operator audio through Redis: {e}")
        finally:
            await subscription.close()
            if self._talkers.get(call.call_sid) is control:
                del self._talkers[call.call_sid]


def _talk_refused(feature: OperatorFeature) -> Answer:
    holder = feature.taken_over_by
    if holder is None:
        return _error(409, "the call is not taken over: take it over first")
    return _error(409, f"{holder} has taken this call over", operator=holder)


class _NoBoard:
    """Before startup: nothing shared yet."""

    fleet = False

    def put(self, call_sid: str, summary: Any) -> None: ...

    def remove(self, call_sid: str) -> None: ...

    async def calls(self) -> list[dict[str, Any]]:
        return []


_NO_BOARD: Any = _NoBoard()


def summary(found: dict[str, Any], now: float) -> dict[str, Any]:
    """A live call's index entry as `GET /calls` shows it: its duration now, and the speaker
    only while they are speaking."""
    out = dict(found)
    spoke_at = out.pop("spoke_at", None)
    if not isinstance(spoke_at, (int, float)) or now - spoke_at > SPEAKING_SECONDS:
        out["speaker"] = None
    started = out.get("started_at")
    if isinstance(started, str):
        with contextlib.suppress(ValueError):
            begun = datetime.fromisoformat(started.replace("Z", "+00:00"))
            out["duration_seconds"] = round(max(0.0, now - begun.timestamp()), 3)
    return out


# --- the routes ---

DESK = web.AppKey("live_desk", LiveDesk)


def add_routes(app: web.Application, desk: LiveDesk) -> None:
    """The live routes (the caller checked that operator tokens are set)."""
    app[DESK] = desk
    app[LIVE_CALLS] = desk.live_calls
    app.router.add_get("/events", fleet_events)
    app.router.add_get("/calls/{call_sid}/events", call_events)
    app.router.add_get("/calls/{call_sid}/listen", listen)
    app.router.add_get("/calls/{call_sid}/talk", talk)
    for name in ACTIONS:
        app.router.add_post(f"/calls/{{call_sid}}/{name}", control)
    for path in ("/events", "/calls/{call_sid}/events", "/calls/{call_sid}/listen",
                 "/calls/{call_sid}/talk"):
        app.router.add_route("*", path, _only("GET"))
    for name in ACTIONS:
        app.router.add_route("*", f"/calls/{{call_sid}}/{name}", _only("POST"))


def _only(method: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def not_allowed(request: web.Request) -> web.Response:
        return web.json_response({"error": f"{request.method} is not allowed here: use "
                                           f"{method}"}, status=405, headers={"Allow": method})
    return not_allowed


def _sid(request: web.Request) -> str:
    sid = request.match_info["call_sid"]
    if not 0 < len(sid) <= 64 or not sid.isascii() or not sid.isalnum():
        raise json_error(web.HTTPNotFound, "no such call")
    return sid


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise json_error(web.HTTPBadRequest, "the body is not JSON") from None
    if not isinstance(body, dict):
        raise json_error(web.HTTPBadRequest, "the body is not a JSON object")
    return body


@operator_route
async def control(request: web.Request) -> web.Response:
    """POST /calls/{sid}/whisper | takeover | handback | hangup | transfer."""
    desk, operator, sid = request.app[DESK], operator_of(request), _sid(request)
    name = request.path.rsplit("/", 1)[1]
    action: dict[str, Any] = {"op": name, "operator": operator}
    if name == "whisper":
        body = await _body(request)
        text, respond = body.get("text"), body.get("respond", False)
        if not isinstance(text, str) or not text.strip() or not isinstance(respond, bool):
            raise json_error(web.HTTPBadRequest, "a whisper is {\"text\": a string, "
                                                 "\"respond\": a boolean}")
        if len(text) > MAX_WHISPER:
            raise json_error(web.HTTPBadRequest, f"text is longer than {MAX_WHISPER} characters")
        action.update(text=text, respond=respond)
    elif name == "transfer":
        body = await _body(request)
        target = body.get("target")
        if not isinstance(target, str) or target not in desk.transfer_targets:
            raise json_error(web.HTTPBadRequest, "target is not one of TRANSFER_TARGETS ("
                             + (", ".join(desk.transfer_targets) or "none are set") + ")")
        action.update(target=target)
    status, body = await desk.act(sid, action)
    if status < 300:
        log.info("operator %s: %s on %s", operator, name, sid)
    return web.json_response(body, status=status)


async def _next(iterator: AsyncIterator[dict[str, Any]]) -> dict[str, Any] | None:
    try:
        return await anext(iterator)
    except StopAsyncIteration:
        return None


async def _stream(stream: EventStream, events: AsyncIterator[dict[str, Any]],
                  after: int) -> None:
    """A call's events to the browser (those after `after`) until its end, with a heartbeat
    while nothing happens; returns when the call ended or the browser went away."""
    pending: asyncio.Task[dict[str, Any] | None] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(_next(events))
            done, _ = await asyncio.wait({pending}, timeout=HEARTBEAT)
            if not done:
                await stream.comment()
                continue
            event, pending = pending.result(), None
            if event is None:
                return
            seq = event.get("seq")
            if isinstance(seq, int) and seq <= after:
                continue
            await stream.send(event)
            if event.get("type") == "call.ended" and event.get("kind") != "handover":
                return  # (a handover's: the call goes on elsewhere, and a shared bus follows)
    except (ConnectionError, OSError):
        return  # the browser went away
    finally:
        if pending is not None:
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        close = getattr(events, "aclose", None)
        if close is not None:
            await close()


@operator_route
async def call_events(request: web.Request) -> web.StreamResponse:
    """GET /calls/{sid}/events."""
    desk, sid = request.app[DESK], _sid(request)
    after = last_event_id(request)
    call = desk.local(sid)
    bus = desk.bus
    events: AsyncIterator[dict[str, Any]]
    # A call handed over to this instance: the fleet's bus has its events from before too.
    if call is not None and not (call.resumed and bus is not None and bus.shared):
        events = aiter(call.subscribe(replay=True))
    elif bus is not None and (call is not None or await desk.live_elsewhere(sid)):
        events = bus.call_events(sid)
    else:
        raise json_error(web.HTTPNotFound, f"no live call {sid}")
    stream = await EventStream.open(request)
    await _stream(stream, events, after)
    return stream.response


@operator_route
async def fleet_events(request: web.Request) -> web.StreamResponse:
    """GET /events: every call starting and ending, and `call.status` when a live call's
    speaker, latency, tools or operator changes."""
    desk = request.app[DESK]
    if desk.bus is None:
        raise json_error(web.HTTPServiceUnavailable, "the server is starting")
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=1000)
    reader = asyncio.ensure_future(_forward(desk.bus.fleet_events(), queue))
    stream = await EventStream.open(request)
    loop = asyncio.get_running_loop()
    known = {c["call_sid"]: _status_key(c) for c in await desk.live_calls()}
    looked = wrote = loop.time()
    try:
        while not reader.done():
            wait = max(0.0, looked + STATUS_EVERY - loop.time())
            event: dict[str, Any] | None = None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    event = await queue.get()
            if event is not None:
                await stream.send(event, with_id=False)
                wrote = loop.time()
            if loop.time() >= looked + STATUS_EVERY:
                looked = loop.time()
                current = await desk.live_calls()
                for call in current:
                    key = _status_key(call)
                    sid = call["call_sid"]
                    if known.get(sid) != key:
                        await stream.send({"type": "call.status", **call}, with_id=False)
                        wrote = loop.time()
                    known[sid] = key
                live = {c["call_sid"] for c in current}
                known = {sid: key for sid, key in known.items() if sid in live}
            if loop.time() - wrote > HEARTBEAT:
                await stream.comment()
                wrote = loop.time()
    except (ConnectionError, OSError):
        pass  # the browser went away
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    return stream.response


def _status_key(call: dict[str, Any]) -> tuple[Any, ...]:
    return (call.get("speaker"), call.get("latency_ms"), call.get("tools_running"),
            call.get("taken_over_by"))


async def _forward(events: AsyncIterator[dict[str, Any]],
                   queue: asyncio.Queue[dict[str, Any]]) -> None:
    try:
        async for event in events:
            with contextlib.suppress(asyncio.QueueFull):  # a page that does not read
                queue.put_nowait(event)
    finally:
        close = getattr(events, "aclose", None)
        if close is not None:
            await close()


async def _socket(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=TALK_MAX_MESSAGE, compress=False)
    await ws.prepare(request)
    return ws


@operator_route
async def listen(request: web.Request) -> web.StreamResponse:
    """GET /calls/{sid}/listen: the call's audio, both tracks, as it is relayed."""
    desk, operator, sid = request.app[DESK], operator_of(request), _sid(request)
    call = desk.local(sid)
    if call is not None:
        feature = call.feature(OperatorFeature)
        if feature is None:
            raise json_error(web.HTTPServiceUnavailable, "listening is off on this server")
        ws = await _socket(request)
        tap = ListenTap(operator=operator)
        feature.listening(operator)
        feature.add_listener(tap)
        log.info("operator %s listens to %s", operator, sid)
        try:
            await _serve(ws, _send_tap(ws, tap))
        finally:
            feature.remove_listener(tap)
        return ws
    if not desk.board.fleet:
        raise json_error(web.HTTPNotFound, f"no live call {sid}")
    # Held elsewhere: its audio comes through Redis while this socket renews its lease.
    subscription = await desk.board.subscribe(f"listen:{sid}")
    listener = desk.board.reply_key().rsplit(":", 1)[-1]
    try:
        status, body = await desk.act(sid, {"op": "listen", "operator": operator,
                                            "listener": listener})
        if status != 202:
            return web.json_response(body, status=status)
        ws = await _socket(request)
        log.info("operator %s listens to %s (held by another instance)", operator, sid)
        await _serve(ws, _relay_listen(ws, desk, subscription, sid, operator, listener))
    finally:
        await subscription.close()
    await desk.tell(sid, {"op": "unlisten", "operator": operator, "listener": listener})
    return ws


async def _serve(ws: web.WebSocketResponse, writer: Awaitable[None]) -> None:
    """Run `writer` (it returns when the call's audio has ended) while reading the socket
    (nothing is expected from the page) until either ends, then close the socket: 1000 "the
    call ended" when the writer finished. The reader is stopped before the close, so the close
    waits for the page's answer (a close with a reader waiting drops the connection)."""
    task = asyncio.ensure_future(writer)
    reading = asyncio.ensure_future(_drain(ws))
    try:
        await asyncio.wait({task, reading}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (reading, task):
            pending.cancel()
        await asyncio.gather(reading, task, return_exceptions=True)
        ended = task.done() and not task.cancelled() and task.exception() is None
        if ended:
            await ws.close(code=1000, message=b"the call ended")
        else:
            await ws.close()


async def _drain(ws: web.WebSocketResponse) -> None:
    async for _ in ws:
        pass


async def _send_tap(ws: web.WebSocketResponse, tap: ListenTap) -> None:
    while True:
        tap.ready.clear()
        batch = tap.take()
        if batch:
            for message in batch:
                await ws.send_str(message)
            continue
        if tap.closed:
            return
        await tap.ready.wait()


async def _relay_listen(ws: web.WebSocketResponse, desk: LiveDesk, subscription: Subscription,
                        sid: str, operator: str, listener: str) -> None:
    loop = asyncio.get_running_loop()
    renew_at = loop.time() + LISTEN_REFRESH
    while True:
        for message in await subscription.get(1.0) or ():
            if message == STOP:
                return
            if '"operator":' in message and orjson.loads(message).get("operator") == operator:
                continue  # their own voice (see ListenTap)
            await ws.send_str(message)
        if loop.time() >= renew_at:
            renew_at = loop.time() + LISTEN_REFRESH
            status, _ = await desk.act(sid, {"op": "listen", "operator": operator,
                                             "listener": listener})
            if status == 404:
                return


@operator_route
async def talk(request: web.Request) -> web.StreamResponse:
    """GET /calls/{sid}/talk: the operator's audio to the caller (and the model)."""
    desk, operator, sid = request.app[DESK], operator_of(request), _sid(request)
    call = desk.local(sid)
    if call is not None:
        feature = call.feature(OperatorFeature)
        control = feature.control if feature is not None else None
        if feature is None or control is None or control.operator != operator:
            answer = _talk_refused(feature) if feature is not None else _error(
                503, "talking is off on this server")
            return web.json_response(answer["body"], status=answer["status"])
        ws = await _socket(request)
        log.info("operator %s talks to %s", operator, sid)
        await _serve_talk(ws, control, lambda payload: feature.operator_audio(operator, payload),
                          call.warn)
        return ws
    status, body = await desk.act(sid, {"op": "talk", "operator": operator})
    if status != 200:
        return web.json_response(body, status=status)
    ws = await _socket(request)
    log.info("operator %s talks to %s (held by another instance)", operator, sid)
    channel = f"talk:{sid}"
    checked = [0.0]

    async def to_fleet(payload: str) -> None:
        if await desk.board.publish(channel, [payload]):
            return
        # Nobody took it: handed back (or the call is over)? Asked at most twice a second.
        now = time.monotonic()
        if now - checked[0] >= 0.5:
            checked[0] = now
            answer, _ = await desk.act(sid, {"op": "talk", "operator": operator})
            if answer != 200:
                raise NotTakenOver("the call was handed back")

    await _serve_talk(ws, None, to_fleet, lambda message: log.warning("%s", message))
    return ws


async def _serve_talk(ws: web.WebSocketResponse, control: TakenOver | None,
                      play: Callable[[str], Awaitable[None]],
                      warn: Callable[[str], None]) -> None:
    """Read the operator's media messages until the socket closes, the take-over ends or the
    audio is bad (closed with 1007 and a log line; the call goes on)."""
    released = asyncio.ensure_future(control.released.wait()) if control is not None else None
    try:
        reading = asyncio.ensure_future(_read_talk(ws, play, warn))
        waiting = {reading} if released is None else {reading, released}
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if not reading.done():
            reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)
    finally:
        if released is not None:
            released.cancel()
        await ws.close(code=1000, message=b"handed back")


async def _read_talk(ws: web.WebSocketResponse, play: Callable[[str], Awaitable[None]],
                     warn: Callable[[str], None]) -> None:
    async for message in ws:
        data: Any = None
        if message.type != WSMsgType.TEXT:
            warn("talk socket: a binary frame (media messages are JSON text); closed")
            await ws.close(code=1003, message=b"text media messages only")
            return
        try:
            data = orjson.loads(message.data)
            payload = data["media"]["payload"] if data.get("event") == "media" else None
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            payload = None
        if not isinstance(payload, str):
            if isinstance(data, dict) and data.get("event") not in (None, "media"):
                continue  # another event (a mark, a keep-alive): nothing to play
            warn("talk socket: a message that is not a media message; closed")
            await ws.close(code=1007, message=b"not a media message")
            return
        try:
            await play(payload)
        except NotTakenOver:
            return
        except BadTalk as e:
            warn(f"talk socket: {e}; closed")
            await ws.close(code=1007, message=b"bad audio")
            return
