"""The console's live API on the real call core (stand-in + Twilio stream over loopback): the
live list, a call's events over SSE with Last-Event-ID, the fleet's events with `call.status`,
401 and 404, and a second instance controlling a call through Redis (skipped, saying why,
when redis-server is missing)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import statistics
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import orjson
import pytest

from server.app import REGISTRY
from server.call.conversation import OperatorTurn
from server.call.features.operator import OperatorFeature
from server.console.live import REQUEST_TIMEOUT, LiveDesk
from server.fleet.events import MemoryBus, RedisBus
from server.fleet.live import MemoryBoard
from server.fleet.redis import RedisState
from server.fleet.registry import CallRegistry
from server.fleet.state import MemoryState
from server.settings import Settings
from server.testing.audio import tone
from server.testing.dial import TwilioStream, call_form
from server.testing.inbox import wait_until
from server.testing.standin import next_session
from tests.conftest import SILENCE, MakeRig, Rig, speak
from tests.redis_server import RedisServer
from tests.test_handover import signed_post
from tests.test_operator import (
    ADMIN,
    ANN,
    BOB,
    OPERATOR_VOICE,
    WAIT,
    bearer,
    console_rig,
    post,
    say_as_operator,
)


class Sse:
    """An SSE response read event by event: (id, JSON data)."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self._buffer = b""

    async def next(self, timeout: float = WAIT) -> tuple[str | None, dict[str, Any]]:
        async with asyncio.timeout(timeout):
            while True:
                while b"\n\n" not in self._buffer:
                    chunk = await self.response.content.readany()
                    if not chunk:
                        raise EOFError("the stream ended")
                    self._buffer += chunk
                block, self._buffer = self._buffer.split(b"\n\n", 1)
                event_id, data = None, None
                for line in block.decode().split("\n"):
                    if line.startswith("id: "):
                        event_id = line[4:]
                    elif line.startswith("data: "):
                        data = orjson.loads(line[6:])
                if data is not None:
                    return event_id, data

    async def until(self, kind: str) -> list[dict[str, Any]]:
        seen = []
        while True:
            _, event = await self.next()
            seen.append(event)
            if event["type"] == kind:
                return seen


async def open_sse(client: Any, path: str, token: str = ANN,
                   last: str | None = None) -> Sse:
    headers = {**bearer(token), "Accept": "text/event-stream"}
    if last is not None:
        headers["Last-Event-ID"] = last
    response = await client.get(path, headers=headers)
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"] == "text/event-stream"
    return Sse(response)


async def test_every_live_route_needs_an_operator_and_knows_no_unknown_call(
        make_rig: MakeRig) -> None:
    rig = await console_rig(make_rig)
    client = rig.bridge
    gets = ("/events", "/calls/CA404/events", "/calls?status=live")
    posts = [f"/calls/CA404/{name}" for name in
             ("whisper", "takeover", "handback", "hangup", "transfer")]
    for path in gets:
        async with client.get(path) as response:
            assert response.status == 401 and "error" in await response.json(), path
    for path in posts:
        async with client.post(path, json={"text": "x", "target": "sales"}) as response:
            assert response.status == 401 and "error" in await response.json(), path
    for path in ("/calls/CA404/listen", "/calls/CA404/talk"):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await client.ws_connect(path)
        assert refused.value.status == 401
    # With a credential: 404 for a call that is not live, as JSON.
    async with client.get("/calls/CA404/events", headers=bearer(ANN)) as response:
        assert response.status == 404 and "no live call" in (await response.json())["error"]
    for path in posts:
        async with client.post(path, headers=bearer(ANN),
                               json={"text": "x", "target": "sales"}) as response:
            assert response.status == 404 and "error" in await response.json(), path
    for path in ("/calls/CA404/listen", "/calls/CA404/talk"):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await client.ws_connect(path, headers=bearer(ANN))
        assert refused.value.status == 404
    async with client.get("/calls/CA404/whisper", headers=bearer(ANN)) as response:
        assert response.status == 405 and "error" in await response.json()


async def test_live_list_and_a_calls_events_from_its_start_then_live(make_rig: MakeRig) -> None:
    rig = await console_rig(make_rig)
    fleet = await open_sse(rig.bridge, "/events")
    stream, _session = await rig.place()
    (call,) = rig.live_calls()
    _, started = await fleet.next()
    assert (started["type"], started["call_sid"]) == ("call.started", call.call_sid)
    await speak(stream, frames=10, variant=1)
    await stream.wait_for("media")
    async with rig.bridge.get("/calls?status=live", headers=bearer(BOB)) as response:
        (live,) = (await response.json())["calls"]
    assert live["call_sid"] == call.call_sid and live["from"] == "+1555***1111"
    assert live["direction"] == "inbound" and live["duration_seconds"] >= 0
    assert {"speaker", "latency_ms", "tools_running", "taken_over_by"} <= set(live)
    assert live["tools_running"] == 0 and live["taken_over_by"] is None
    # A page that joins now gets the call from its start, ids in order.
    events = await open_sse(rig.bridge, f"/calls/{call.call_sid}/events")
    first = [await events.next() for _ in range(3)]
    assert next(e["type"] for _, e in first) == "call.started"
    assert [i for i, _ in first] == ["1", "2", "3"]
    # A take-over shows in the list and as a `call.status` on the fleet's stream.
    sent = time.monotonic()
    assert (await post(rig, f"/calls/{call.call_sid}/takeover"))[0] == 202
    while True:
        _, status = await fleet.next()
        if status["type"] == "call.status" and status["taken_over_by"] == "ann":
            break
    print(f"call.status on /events {(time.monotonic() - sent) * 1000:.0f} ms after the change")
    taken = await events.until("takeover")
    assert taken[-1]["operator"] == "ann"
    # A reconnection resumes after the last id it saw: nothing twice, nothing lost.
    last_id = str(taken[-1]["seq"])
    await events.response.release()
    assert (await post(rig, f"/calls/{call.call_sid}/handback"))[0] == 202
    resumed = await open_sse(rig.bridge, f"/calls/{call.call_sid}/events", last=last_id)
    event_id, event = await resumed.next()
    assert event_id == str(int(last_id) + 1) and event["seq"] == int(last_id) + 1
    await stream.send_stop()
    rest = await resumed.until("call.ended")
    assert "handback" in [e["type"] for e in [event, *rest]]
    with pytest.raises(EOFError):  # the stream ends with the call
        await resumed.next()
    while (await fleet.next())[1]["type"] != "call.ended":
        pass
    async with rig.bridge.get("/calls?status=live", headers=bearer(ANN)) as response:
        assert (await response.json())["calls"] == []
    async with rig.bridge.get(f"/calls/{call.call_sid}/events",
                              headers=bearer(ANN)) as response:
        assert response.status == 404  # ended
    await fleet.response.release()


# --- two instances, one Redis ---


@contextlib.asynccontextmanager
async def redis_fleet(make_rig: MakeRig, redis_server: RedisServer, prefix: str,
                      *each: dict[str, Any]) -> AsyncIterator[list[Rig]]:
    """Instances on one Redis (state, events, the console's board), each with its own
    stand-in and the settings given for it."""
    opened: list[Any] = []
    rigs = []
    try:
        for overrides in each:
            state = RedisState(redis_server.url, prefix=prefix)
            bus = RedisBus(redis_server.url, prefix=prefix)
            await state.start()
            await bus.start()
            opened += [bus, state]
            rigs.append(await console_rig(make_rig, state=state, bus=bus, **overrides))
        yield rigs
    finally:
        for rig in rigs:
            for stream in rig.streams:
                await stream.close()
        for thing in opened:
            await thing.close()


@pytest.fixture
async def fleet_of_two(make_rig: MakeRig, redis_server: RedisServer,
                       redis_prefix: str) -> AsyncIterator[tuple[Rig, Rig]]:
    """Instances A and B on one Redis."""
    async with redis_fleet(make_rig, redis_server, redis_prefix, {}, {}) as (a, b):
        yield a, b


async def test_instance_a_controls_a_call_on_instance_b(fleet_of_two: tuple[Rig, Rig]) -> None:
    a, b = fleet_of_two
    stream, session = await b.place()
    (call,) = b.live_calls()
    sid = call.call_sid
    assert a.live_calls() == []
    # A lists it and follows its events (from B, through Redis).
    async def listed() -> bool:
        async with a.bridge.get("/calls?status=live", headers=bearer(ANN)) as response:
            return [c["call_sid"] for c in (await response.json())["calls"]] == [sid]
    await wait_until(listed, WAIT, "the call in A's live list")
    events = await open_sse(a.bridge, f"/calls/{sid}/events")
    assert (await events.next())[1]["type"] == "call.started"
    # Listen on A: B's audio through Redis.
    listen = await a.bridge.ws_connect(f"/calls/{sid}/listen", headers=bearer(BOB))
    feature = call.feature(OperatorFeature)
    assert feature is not None
    await wait_until(lambda: len(call.audio_listeners) == 1, WAIT, "B's listen relay")
    spoken = await speak(stream, frames=10, variant=2)
    got = await asyncio.wait_for(listen.receive_json(), WAIT)
    assert got == {"event": "media", "media": {"track": "inbound",
                                               "payload": base64.b64encode(spoken).decode()}}
    # Whisper from A reaches B's model.
    delays = []
    for n in range(1, 11):
        sent = time.monotonic()
        assert (await post(a, f"/calls/{sid}/whisper",
                           body={"text": f"from A {n}", "respond": False}))[0] == 202
        item = await session.wait_for("conversation.item.create", count=n)
        delays.append((time.monotonic() - sent) * 1000)
        assert item["item"]["content"][0]["text"] == f"from A {n}"
    print(f"whisper from another instance (through Redis), the POST to the model: median "
          f"{statistics.median(delays):.1f} ms, max {max(delays):.1f} ms (n={len(delays)})")
    # Take over from A; a second operator on B is refused; A's talk socket reaches B's caller.
    assert (await post(a, f"/calls/{sid}/takeover"))[0] == 202
    status, body = await post(b, f"/calls/{sid}/takeover", token=BOB)
    assert (status, body["operator"]) == (409, "ann")
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await a.bridge.ws_connect(f"/calls/{sid}/talk", headers=bearer(BOB))
    assert refused.value.status == 409
    talk = await a.bridge.ws_connect(f"/calls/{sid}/talk", headers=bearer(ANN))
    media = stream.counts["media"]
    voice = [tone(20, 1000.0, 9000 - n) for n in range(10)]
    await say_as_operator(talk, voice)
    await stream.wait_for("media", count=media + 10)
    played = [base64.b64decode(m["media"]["payload"]) for m in stream.received
              if m.get("event") == "media"][media:]
    assert played == voice
    for _ in range(18):
        await stream.send_media(SILENCE)
    await wait_until(lambda: any(isinstance(e, OperatorTurn) for e in call.conversation),
                     WAIT, "the operator's turn on B")
    # The listener on A hears the operator as what the caller hears.
    while True:  # (after the assistant's reply to the caller's turn, before the take-over)
        got = await asyncio.wait_for(listen.receive_json(), WAIT)
        if got["event"] == "media" and got["media"]["track"] == "outbound" \
                and base64.b64decode(got["media"]["payload"]) == voice[0]:
            break
    # ann, listening on A too, is not played her own voice back.
    own = await a.bridge.ws_connect(f"/calls/{sid}/listen", headers=bearer(ANN))
    await wait_until(lambda: call.record.operator_actions[-1]["operator"] == "ann", WAIT,
                     "ann listening")
    control = feature.control
    assert control is not None
    frames = control.frames
    await say_as_operator(talk, [OPERATOR_VOICE] * 5)
    await wait_until(lambda: control.frames == frames + 5, WAIT, "the operator's audio at B")
    await stream.send_media(tone(20, 300.0, 9000))  # then a caller frame: the end
    end = base64.b64encode(tone(20, 300.0, 9000)).decode()
    tracks = []
    while True:
        got = await asyncio.wait_for(own.receive_json(), WAIT)
        tracks.append(got["media"]["track"])
        if got["media"]["payload"] == end:
            break
    assert "outbound" not in tracks
    await own.close()
    # Hand back from A: B stops taking the talk socket's audio; A closes it.
    assert (await post(a, f"/calls/{sid}/handback"))[0] == 202
    await say_as_operator(talk, [OPERATOR_VOICE] * 60)
    await asyncio.wait_for(talk.receive(), WAIT)
    assert talk.closed
    # Hang up from A: B ends the call; A's listener and event stream end with it.
    assert (await post(a, f"/calls/{sid}/hangup", token=BOB))[0] == 202
    await asyncio.wait_for(stream.closed.wait(), WAIT)
    rest = await events.until("call.ended")
    assert rest[-1]["kind"] == "admin_hung_up"
    while not listen.closed:
        await asyncio.wait_for(listen.receive(), WAIT)
    assert listen.close_code == 1000, (listen.close_code, listen.exception())
    assert [(x["operator"], x["action"]) for x in call.record.operator_actions] == [
        ("bob", "listen"), *[("ann", "whisper")] * 10, ("ann", "takeover"), ("ann", "listen"),
        ("ann", "handback"), ("bob", "hangup")]
    assert (await post(a, f"/calls/{sid}/whisper", body={"text": "late"}))[0] == 404
    await events.response.release()


async def stream_to(rig: Rig, path: str, sid: str, stream_sid: str,
                    parameters: Mapping[str, str]) -> TwilioStream:
    """What Twilio does with a <Connect><Stream>: the stream, up to the model session's set-up."""
    stream = await TwilioStream.connect(rig.bridge.session, str(rig.bridge.make_url(path)))
    rig.streams.append(stream)
    await stream.send_connected()
    await stream.send_start(sid, stream_sid, parameters)
    await (await next_session(rig.standin.app)).wait_for("session.update")
    return stream


async def test_a_handed_over_call_is_one_event_stream_on_every_instance(
        make_rig: MakeRig, redis_server: RedisServer, redis_prefix: str) -> None:
    """SHUTDOWN_MODE=handover moves a call from A to B. An operator following it (on B,
    through Redis) sees one call: the numbering and the clock go on, and the handover's
    `call.ended` is not the end; a page opened on B after the handover replays both parts."""
    public = "http://fleet.example"
    async with redis_fleet(make_rig, redis_server, redis_prefix,
                           {"shutdown_mode": "handover", "public_url": public},
                           {"shutdown_mode": "drain", "public_url": public}) as (a, b):
        sid = "CA" + "b" * 32
        form = call_form(sid, "+15550001111", "+15550002222")
        twiml = await signed_post(a, public, "/incoming-call", form)
        stream = await stream_to(a, "/media-stream", sid, "MZ" + "1" * 32, twiml.parameters)

        async def listed_on_b() -> bool:
            async with b.bridge.get("/calls?status=live", headers=bearer(ANN)) as response:
                return [c["call_sid"] for c in (await response.json())["calls"]] == [sid]
        await wait_until(listed_on_b, WAIT, "the call in B's live list")
        follow = await open_sse(b.bridge, f"/calls/{sid}/events")
        await speak(stream, frames=10, variant=1)
        seen: list[dict[str, Any]] = []
        while not any(e["type"] == "transcript" and e["role"] == "caller" and e["final"]
                      for e in seen):
            seen.append((await follow.next())[1])
        # Deploy: A hands the call over; the follower on B hears of it, and stays.
        await a.app[REGISTRY].close_all(grace=WAIT)
        await asyncio.wait_for(stream.closed.wait(), WAIT)
        seen += await follow.until("call.ended")
        left = seen[-1]
        assert left["kind"] == "handover"
        # Twilio asks what next (through the load balancer, at B) and streams to B.
        again = await signed_post(b, public, "/connect-action",
                                  {**form, "CallStatus": "in-progress"})
        resumed = await stream_to(b, "/media-stream/resume", sid, "MZ" + "2" * 32,
                                  again.parameters)
        back = (await follow.next())[1]
        assert back["type"] == "call.started" and back["seq"] == left["seq"] + 1
        assert back["at"] >= left["at"]  # the call's clock, not the new stream's
        await speak(resumed, frames=6, variant=4)
        # A page opened now, on B (which holds the call): both parts, from the start...
        fresh = await open_sse(b.bridge, f"/calls/{sid}/events")
        replay = [(await fresh.next())[1] for _ in range(back["seq"])]
        assert [e["seq"] for e in replay] == list(range(1, back["seq"] + 1))
        assert [e["type"] for e in replay if e["type"] in ("call.started", "call.ended")] == [
            "call.started", "call.ended", "call.started"]
        # ...and a browser reconnecting after the handover's end gets what came after it.
        later = await open_sse(b.bridge, f"/calls/{sid}/events", last=str(left["seq"]))
        assert (await later.next())[1] == back
        # The caller hangs up: now the follower's stream ends, with every event numbered once.
        await resumed.send_stop()
        seen += [back, *await follow.until("call.ended")]
        assert seen[-1]["kind"] == "caller_hung_up"
        assert [e["seq"] for e in seen] == list(range(1, len(seen) + 1))
        assert sum(e["type"] == "transcript" and e["final"] for e in seen) >= 3
        with pytest.raises(EOFError):
            await follow.next()
        for sse in (follow, fresh, later):
            sse.response.release()


async def test_an_action_for_a_call_live_nowhere_is_404_without_waiting() -> None:
    """An instance ignores actions for calls it no longer holds (a call just ended, its owner
    entry not yet gone): the asking instance answers 404 from the live index rather than wait
    for an answer that never comes (it was a 504 after 3 s, a listener's socket lingering)."""
    published: list[dict[str, Any]] = []

    class Owner(MemoryState):
        async def publish(self, call_sid: str, action: dict[str, Any]) -> bool:
            published.append(action)
            return True  # delivered to an instance that will not answer

    desk = LiveDesk(Settings(openai_api_key="sk-x", admin_token=ADMIN))
    state = Owner()
    desk.attach(CallRegistry(desk.settings, state), state, MemoryBoard(), MemoryBus())
    status, body = await asyncio.wait_for(
        desk.act("CAgone", {"op": "whisper", "operator": "ann", "text": "x", "respond": False}),
        REQUEST_TIMEOUT / 2)
    assert (status, published) == (404, []) and "no live call" in body["error"]
