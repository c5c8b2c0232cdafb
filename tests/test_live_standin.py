"""The GPT-Live stand-in speaks GPT-Live where the bridge will depend on it, over a real socket.

Every event both ways is checked against openai-python's `openai.types.live` (and the Responses
events nested in `response.event`); every client event is made by `server.wire.live`'s encoders
and every server event is decoded by its decoder, so the two are tried against each other too.
"""

from __future__ import annotations

import asyncio
import base64
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from server.testing.audio import BYTES_PER_MS, FRAME_MS, ULAW_SILENCE
from server.testing.inbox import Inbox, wait_until
from server.testing.live_standin import (
    LiveStandinOptions,
    LiveStandinSession,
    backend_usage,
    create_live_standin_app,
    main,
    next_live_session,
)
from server.testing.sdk_check import EventChecker
from server.testing.standin import ToolCallScript, tool_call
from server.wire import live

MakeServer = Callable[..., Awaitable[TestServer]]
LOUD = bytes([0x80, 0x00] * 80)  # 20 ms of full-scale mu-law: speech to any VAD
QUIET = bytes([ULAW_SILENCE]) * 160
TEXT = aiohttp.WSMsgType.TEXT
FAST = LiveStandinOptions(pace=0, silence_ms=200)  # unpaced: as fast as the input allows


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]


LOOKUP = Tool("lookup_order", "Find an order", {"type": "object", "properties": {
    "order_id": {"type": "string"}}, "required": ["order_id"]})


class LiveClient:
    """A minimal GPT-Live client: sends what `server.wire.live` encodes, and reads every server
    event (as JSON, and decoded by the wire module) into an inbox."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.events: Inbox[dict[str, Any]] = Inbox()
        self.decoded: list[live.LiveEvent] = []
        self.arrived: list[float] = []  # loop time of each audio delta
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            async for msg in self.ws:
                if msg.type is not TEXT:
                    continue
                self.decoded.append(live.decode(msg.data))
                event = orjson.loads(msg.data)
                if event["type"] == "session.output_audio.delta":
                    self.arrived.append(loop.time())
                self.events.add(event)
        finally:
            self.events.close()

    async def send(self, data: bytes | dict[str, Any]) -> None:
        await self.ws.send_frame(data if isinstance(data, bytes) else orjson.dumps(data), TEXT)

    async def audio(self, frames: bytes) -> None:
        """Caller audio, one append per 20 ms frame, as Twilio would send it."""
        for n in range(0, len(frames), 160):
            await self.send(live.append_audio(base64.b64encode(frames[n:n + 160]).decode()))

    async def paced(self, frames: bytes) -> None:
        """Caller audio at real time (a drift-free clock), as a phone line delivers it."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        for n in range(0, len(frames), 160):
            await asyncio.sleep(max(start + n // 160 * FRAME_MS / 1000 - loop.time(), 0))
            await self.send(live.append_audio(base64.b64encode(frames[n:n + 160]).decode()))

    async def until(self, kind: str, count: int = 1, timeout: float = 5.0) -> dict[str, Any]:
        return await self.events.wait_for(lambda e: e["type"] == kind, count, timeout, kind)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events.items if e["type"] == kind]

    def chunks(self) -> list[bytes]:
        return [base64.b64decode(e["delta"]) for e in self.of("session.output_audio.delta")]

    def words(self, kind: str) -> list[tuple[str, int, int]]:
        return [(e["delta"], e["start_ms"], e["end_ms"]) for e in self.of(kind)]

    async def send_at_once(self, frames: bytes) -> None:
        """Caller audio in one append (the socket may close in the middle of it)."""
        await self.send(live.append_audio(base64.b64encode(frames).decode()))

    async def ended(self) -> None:
        """Wait until the server has closed the socket and every event is read."""
        async with asyncio.timeout(5):
            await asyncio.shield(self._reader)

    async def close(self) -> None:
        await self.ws.close()
        await self._reader


Connect = Callable[..., Awaitable[tuple[LiveClient, LiveStandinSession]]]


@pytest.fixture
def checker() -> EventChecker:
    return EventChecker("live")


@pytest.fixture
async def connect(aiohttp_server: MakeServer,
                  checker: EventChecker) -> AsyncIterator[Connect]:
    """A stand-in (every event checked by `checker`) and a client; `start` sends
    session.start (these keyword arguments) and waits for session.started."""
    http = aiohttp.ClientSession()
    clients: list[LiveClient] = []

    async def open_(options: LiveStandinOptions = FAST, start: bool = True,
                    **session: Any) -> tuple[LiveClient, LiveStandinSession]:
        server = await aiohttp_server(create_live_standin_app(
            replace(options, check_events=checker)))
        ws = await http.ws_connect(server.make_url("/v1/live/sessions"),
                                   headers=live.auth_headers("sk-test"))
        client = LiveClient(ws)
        clients.append(client)
        standin = await next_live_session(server.app)
        if start:
            args = {"model": "gpt-live-1", "instructions": "Be brief.", "voice": "marin",
                    **session}
            await client.send(live.session_start(**args))
            await client.until("session.started")
        return client, standin

    yield open_
    for client in clients:
        await client.close()
    await http.close()
    checker.assert_clean()


def loud(chunk: bytes) -> bool:
    return any(b != ULAW_SILENCE for b in chunk)


# --- connecting and starting ---


async def test_handshake_refusals(aiohttp_server: MakeServer) -> None:
    async with aiohttp.ClientSession() as http:
        server = await aiohttp_server(create_live_standin_app(LiveStandinOptions(api_key="k")))
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
                await http.ws_connect(server.make_url("/v1/live/sessions"), headers=headers)
            assert caught.value.status == 401
        with pytest.raises(aiohttp.WSServerHandshakeError) as caught:  # Realtime's URL shape
            await http.ws_connect(server.make_url("/v1/live/sessions?model=gpt-live-1"),
                                  headers=live.auth_headers("k"))
        assert caught.value.status == 400
        ws = await http.ws_connect(server.make_url("/v1/live/sessions"),
                                   headers=live.auth_headers("k"))
        await ws.close()
        down = await aiohttp_server(create_live_standin_app(
            LiveStandinOptions(handshake_status=503)))
        with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
            await http.ws_connect(down.make_url("/v1/live/sessions"))
        assert caught.value.status == 503


async def test_session_start_comes_first_and_nothing_is_buffered(
        connect: Connect, checker: EventChecker) -> None:
    client, standin = await connect(start=False)
    await client.audio(LOUD * 5)  # before the start: refused, not kept
    await client.send(live.instructions_append("Greet the caller now."))
    errors = [await client.until("error", n) for n in (1, 6)]
    assert {e["error"]["code"] for e in errors} == {"session_not_started"}
    assert standin.timeline_ms == 0 and not standin.started
    await client.send(live.session_start("gpt-live-1.1", "Be brief.", "cedar"))
    started = await client.until("session.started")
    assert started["client_event_id"] == live.SESSION_START_ID
    decoded = next(e for e in client.decoded if isinstance(e, live.SessionStarted))
    assert decoded.session_id == standin.id and decoded.model == "gpt-live-1.1"
    assert decoded.expires_at is not None and decoded.expires_at > 1_700_000_000
    assert started["session"]["audio"] == {"format": live.PCMU_8K, "output": {"voice": "cedar"}}
    await client.send(live.session_start("gpt-live-1", "Again.", "marin"))
    assert (await client.until("error", 7))["error"]["code"] == "session_already_started"
    await client.ws.send_bytes(live.append_audio("AAAA"))  # a binary frame
    assert (await client.until("error", 8))["error"]["code"] == "invalid_json"
    await client.send(b"{not json")
    assert (await client.until("error", 9))["error"]["code"] == "invalid_json"
    assert checker.checked > 0


@pytest.mark.parametrize(("session", "code", "param"), [
    ({"temperature": 0.8}, "unknown_parameter", "session.temperature"),
    ({"audio": {"format": live.PCMU_8K, "input": {"noise_reduction": None}}},
     "unknown_parameter", "session.audio.input"),
    ({"audio": {"format": {"type": "audio/pcmu", "rate": 8000, "channels": 1}}},
     "unknown_parameter", "session.audio.format.channels"),
    ({"tools": []}, "unknown_parameter", "session.tools"),  # tools live in delegation
    ({"audio": {"format": {"type": "audio/pcm", "rate": 24000}}}, "invalid_value",
     "session.audio.format"),
    ({"audio": {"output": {"voice": "marin"}}}, "invalid_value", "session.audio.format"),
    ({"model": "gpt-realtime"}, "model_not_found", "session.model"),
    ({"delegation": {"type": "responses", "responses": {"tools": []}}},
     "missing_required_parameter", "session.delegation.responses.model"),
    ({"delegation": {"type": "responses", "responses": {"model": "m", "temperature": 1}}},
     "unknown_parameter", "session.delegation.responses.temperature"),
])
async def test_a_bad_session_start_is_refused_whole(
        connect: Connect, checker: EventChecker, session: dict[str, Any], code: str,
        param: str) -> None:
    client, standin = await connect(start=False)
    start = {"model": "gpt-live-1", "audio": {"format": live.PCMU_8K}, **session}
    await client.send({"type": "session.start", "event_id": "start_1", "session": start})
    error = await client.until("error")
    assert (error["error"]["code"], error["error"]["param"]) == (code, param)
    assert error["error"]["client_event_id"] == "start_1"
    decoded = next(e for e in client.decoded if isinstance(e, live.Error))
    assert decoded.code == code and decoded.param == param
    assert decoded.fatal is (code == "model_not_found")  # a bad key or quota, and the like
    assert not standin.started
    # the SDK finds some of these wrong too (unknown keys): the client's, as provoked
    assert all("sent to OpenAI by the client" in v for v in checker.take())


async def test_the_bridges_refused_start_is_fatal(connect: Connect) -> None:
    client, _ = await connect(start=False)
    await client.send(live.session_start("gpt-live-9", "Be brief.", "marin"))
    await client.until("error")
    error = next(e for e in client.decoded if isinstance(e, live.Error))
    assert error.code == "model_not_found" and error.fatal
    assert error.client_event_id == live.SESSION_START_ID


async def test_history_within_the_limits_is_taken_and_beyond_them_refused(
        connect: Connect, checker: EventChecker) -> None:
    entries = [("user" if n % 2 else "assistant", f"message {n}") for n in range(200)]
    trimmed = live.history_input(entries)
    assert len(trimmed) == 128
    _, standin = await connect(history=trimmed)
    assert standin.resource is not None and standin.resource["input"] == trimmed
    too_many = [live.history_input([("user", f"m {n}")])[0] for n in range(129)]
    too_long = live.history_input([("user", "x" * 33_000)], max_tokens=20_000)
    for history, code in ((too_many, "array_above_max_length"), (too_long, "input_too_large")):
        other, _ = await connect(start=False)
        await other.send({"type": "session.start", "session": {
            "model": "gpt-live-1", "audio": {"format": live.PCMU_8K}, "input": history}})
        assert (await other.until("error"))["error"]["code"] == code
    for entries in ([("user", "x" * 33_000), ("assistant", "ok")], [("user", "y" * 40_000)]):
        trimmed = live.history_input(entries)
        assert trimmed[0]["role"] == "developer"  # what was cut, said first
        other, standin = await connect(history=trimmed)
        assert standin.started
    assert checker.violations == []


async def test_update_changes_the_backend_only(connect: Connect, checker: EventChecker) -> None:
    client, standin = await connect(tools=[LOOKUP], backend_model="gpt-5-mini")
    await client.send(live.session_update(backend_instructions="Be exact.", tools=[]))
    updated = await client.until("session.updated")
    responses = updated["session"]["delegation"]["responses"]
    assert responses == {"model": "gpt-5-mini", "instructions": "Be exact.", "tools": []}
    assert updated["client_event_id"] == live.SESSION_UPDATE_ID
    assert any(isinstance(e, live.SessionUpdated) and e.session_id == standin.id
               for e in client.decoded)
    for session, code, param in (
            ({"instructions": "Be rude."}, "immutable_field_update", "session.instructions"),
            ({"audio": {"output": {"voice": "ash"}}}, "immutable_field_update",
             "session.audio"),
            ({"delegation": {"type": "client"}}, "immutable_field_update",
             "session.delegation.type"),
            ({"voice": "ash"}, "unknown_parameter", "session.voice")):
        await client.send({"type": "session.update", "session": session})
        error = await client.until("error", 1 + len(client.of("error")))
        assert (error["error"]["code"], error["error"]["param"]) == (code, param)
    assert standin.resource is not None and standin.resource["instructions"] == "Be brief."
    # SessionUpdateConfig has no instructions, audio or voice: the client's, as provoked
    taken = checker.take()
    assert len(taken) == 3 and all("sent to OpenAI by the client" in v for v in taken)


# --- audio both ways ---


async def test_output_is_one_continuous_track_at_real_pace(connect: Connect) -> None:
    client, standin = await connect(replace(FAST, pace=1.0))
    loop = asyncio.get_running_loop()
    started = loop.time()
    await client.paced(LOUD * 15 + QUIET * 35)  # a caller turn, then quiet: one second
    await client.until("session.output_audio.delta", 10)
    chunks = client.chunks()
    assert [len(c) for c in chunks] == [100 * BYTES_PER_MS] * len(chunks)  # 100 ms each
    assert [loud(c) for c in chunks[:10]] == [False] * 5 + [True] * 3 + [False] * 2
    # at real time: the n-th delta cannot come before n x 100 ms (load only makes it later)
    assert client.arrived[9] - started >= 0.9
    # a burst of input does not make the output faster than real time
    mark = loop.time()
    await client.audio(QUIET * 50)
    await client.until("session.output_audio.delta", 15)
    assert client.arrived[14] - mark >= 0.39
    assert standin.timeline_ms == 2000


async def test_the_output_waits_for_input(connect: Connect) -> None:
    client, standin = await connect()
    await client.audio(QUIET * 15)  # 300 ms
    await wait_until(lambda: standin.stalled and standin.out_ms == 300, what="a stalled clock")
    assert standin.audio_deltas == 3
    await client.audio(QUIET * 5)
    await client.until("session.output_audio.delta", 4)
    assert standin.out_ms == 400


async def test_a_caller_turn_is_heard_then_echoed_with_transcripts(connect: Connect) -> None:
    client, standin = await connect()
    speech = bytes(range(0x80, 0x88)) * 20 * 15  # 300 ms, distinct bytes
    await client.audio(QUIET * 5 + speech + QUIET * 30)  # turn 100..400 ms, then 600 ms quiet
    await client.until("session.output_audio.delta", 10)
    assert client.words("session.input_transcript.delta") == [
        ("caller", 100, 160), (" turn", 160, 220), (" 1", 220, 280), (" (300", 280, 340),
        (" ms)", 340, 400)]
    track = b"".join(client.chunks())
    echo_at = 600 * BYTES_PER_MS  # 200 ms of quiet end the turn: the echo starts at 600
    assert track[echo_at:echo_at + len(speech)] == speech
    assert not loud(track[:echo_at]) and not loud(track[echo_at + len(speech):])
    assert [w for w, _, _ in client.words("session.output_transcript.delta")] == [
        "echo", " of", " caller", " turn", " 1", " (300", " ms)"]
    assert standin.spoken == [("echo", 600, 900)]
    grouper = live.TranscriptGrouper()
    done = [out for e in client.decoded
            if isinstance(e, (live.InputTranscriptDelta, live.OutputTranscriptDelta))
            for out in grouper.add(e) if isinstance(out, live.TurnDone)]
    done += grouper.flush()
    assert [(d.speaker, d.text, d.start_ms, d.end_ms) for d in done] == [
        ("caller", "caller turn 1 (300 ms)", 100, 400),
        ("assistant", "echo of caller turn 1 (300 ms)", 600, 900)]


async def test_the_model_goes_quiet_when_the_caller_talks_over_it(connect: Connect) -> None:
    client, standin = await connect()
    # turn 1: 0..600 ms; its echo from 800; the caller talks over it from 1000 to 1200
    await client.audio(LOUD * 30 + QUIET * 20 + LOUD * 10 + QUIET * 25)
    await client.until("session.output_audio.delta", 17)
    assert standin.barge_ins == [1100]  # 100 ms of speech over its voice: it yields
    assert [loud(c) for c in client.chunks()[:17]] == (
        [False] * 8 + [True] * 3 + [False] * 3 + [True] * 2 + [False])
    assert standin.spoken == [("echo", 800, 1100), ("echo", 1400, 1600)]
    said = client.words("session.output_transcript.delta")
    assert [w for w, start, _ in said if start < 1400] == ["echo", " of", " caller", " turn"]
    assert [w for w, start, _ in said if start >= 1400] == [
        "echo", " of", " caller", " turn", " 2", " (200", " ms)"]


async def test_usage_snapshots_and_the_close(connect: Connect) -> None:
    client, standin = await connect(replace(FAST, usage_interval_ms=250))
    await client.audio(QUIET * 50)
    await client.until("session.usage.updated", 4)
    assert [e["usage"]["seconds"] for e in client.of("session.usage.updated")] == [
        0.25, 0.5, 0.75, 1.0]
    snapshots = [e for e in client.decoded if isinstance(e, live.UsageUpdated)]
    assert snapshots[-1].seconds == 1.0 and snapshots[-1].usage_ratio is not None
    await client.send(live.session_close("bye"))
    closed = await client.until("session.closed")
    assert closed["reason"] == "close_requested" and closed["usage"] == {"seconds": 1.0}
    assert closed["session"]["id"] == standin.id
    assert live.SessionClosed("close_requested", 1.0) in client.decoded
    await client.ended()
    assert client.ws.closed
    await asyncio.wait_for(standin.closed.wait(), 5)


async def test_ends_by_expiry_by_the_service_and_by_a_dropped_socket(
        connect: Connect) -> None:
    client, _ = await connect(replace(FAST, session_lifetime_ms=300))
    await client.send_at_once(QUIET * 20)
    closed = await client.until("session.closed")
    assert closed["reason"] == "expired" and closed["usage"]["seconds"] == 0.3
    client, standin = await connect()
    await client.audio(QUIET * 5)
    await standin.end("connection_lost")
    assert (await client.until("session.closed"))["reason"] == "connection_lost"
    client, standin = await connect()
    standin.drop()
    with pytest.raises(EOFError):
        await client.until("session.closed")
    await client.ended()
    assert client.ws.closed and not client.of("session.closed")


# --- appended context ---


async def test_appends_are_acked_and_greet_makes_it_speak_first(connect: Connect) -> None:
    client, standin = await connect(replace(FAST, greeting_ms=300))
    await client.audio(QUIET * 5)
    await client.send(live.thinking_append("The caller pressed 1 2 3.", event_id="t1"))
    await client.send(live.instructions_append("Greet the caller now, then listen.",
                                               event_id="g1"))
    ack = await client.until("session.instructions.appended")
    assert (ack["start_ms"], ack["end_ms"], ack["client_event_id"]) == (100, 100, "g1")
    assert (await client.until("session.thinking.appended"))["client_event_id"] == "t1"
    assert live.Appended("session.thinking.appended", 100, 100, "t1") in client.decoded
    await client.audio(QUIET * 25)
    await client.until("session.output_audio.delta", 5)
    assert [loud(c) for c in client.chunks()[:5]] == [False, True, True, True, False]
    assert [w for w, _, _ in client.words("session.output_transcript.delta")] == [
        "greeting", " (300", " ms)"]
    assert standin.context == [("thinking", "The caller pressed 1 2 3.", None),
                               ("instructions", "Greet the caller now, then listen.", None)]
    await client.send(live.instructions_append("x " * 1001))
    assert (await client.until("error"))["error"]["code"] == "string_above_max_length"


# --- delegation ---


async def test_a_scripted_tool_call_round_trip(connect: Connect) -> None:
    options = replace(FAST, tool_calls={1: tool_call("lookup_order", {"order_id": "1"},
                                                     say_ms=200)}, tool_reply_ms=300)
    client, standin = await connect(options, tools=[LOOKUP], backend_model="gpt-5-mini")
    await client.audio(LOUD * 10 + QUIET * 15)  # turn 1 ends at 200, heard at 400
    created = await client.until("session.delegation.created")
    assert created["delegation"]["target"] == "responses" and created["offset_ms"] == 400
    await client.until("response.event", 5)
    calls = [e for e in client.decoded if isinstance(e, live.FunctionCall)]
    assert [(c.name, c.arguments, c.delegation_id) for c in calls] == [
        ("lookup_order", '{"order_id":"1"}', created["delegation"]["id"])]
    usage = [e for e in client.decoded if isinstance(e, live.BackendDone)]
    assert [u.usage for u in usage] == [backend_usage(1)]
    call_id = calls[0].call_id
    await client.send(live.response_create("early"))
    assert "without an output" in (await client.until("error"))["error"]["message"]
    await client.send(live.function_call_output("call_nope", "{}"))
    assert (await client.until("error", 2))["error"]["param"] == "item.call_id"
    await client.send(live.function_call_output(call_id, '{"status":"shipped"}'))
    await client.send(live.response_create())
    await client.until("response.event", 8)
    answer = next(e for e in client.of("response.event")
                  if e["event"]["type"] == "response.output_item.done"
                  and e["event"]["item"]["type"] == "message")
    text = answer["event"]["item"]["content"][0]["text"]
    assert text == 'answer (300 ms): lookup_order -> {"status":"shipped"}'
    await client.audio(QUIET * 40)
    await client.until("session.output_audio.delta", 12)
    assert standin.spoken == [("let me check", 400, 600), ("answer", 600, 900)]
    said = "".join(w for w, _, _ in client.words("session.output_transcript.delta"))
    assert said == 'let me check (200 ms)answer (300 ms): lookup_order -> {"status":"shipped"}'
    assert standin.tool_outputs == {call_id: '{"status":"shipped"}'}
    assert standin.pending_calls == {}
    await client.send(live.response_create())  # nothing new for the backend
    assert (await client.until("error", 3))["error"]["code"] == "invalid_value"


async def test_keypad_text_delegates_and_a_call_without_arguments(connect: Connect) -> None:
    options = replace(FAST, text_tool_calls={"1 2 3 4": ToolCallScript((("check_pin", "{"),))})
    client, standin = await connect(options, tools=[LOOKUP], backend_model="gpt-5-mini")
    await client.audio(QUIET * 5)
    await client.send(live.thinking_append("The caller typed 1 2 3 4."))
    await client.until("session.delegation.created")
    await client.until("response.event", 5)
    call = next(e for e in client.decoded if isinstance(e, live.FunctionCall))
    assert (call.name, call.arguments) == ("check_pin", "{")  # invalid JSON, as scripted
    await client.send(live.thinking_append("note", delegation_id="deleg_1"))
    error = await client.until("error")
    assert "Responses delegation" in error["error"]["message"]
    assert standin.pending_calls == {call.call_id: "check_pin"}


async def test_client_delegation(connect: Connect, checker: EventChecker) -> None:
    client, standin = await connect(replace(FAST, tool_calls={1: ToolCallScript(())}))
    await client.audio(LOUD * 10 + QUIET * 15)
    created = await client.until("session.delegation.created")
    assert created["delegation"]["target"] == "client"
    assert "response_id" not in created["delegation"]
    delegation = next(e for e in client.decoded if isinstance(e, live.DelegationCreated))
    assert delegation.target == "client" and delegation.response_id is None
    await client.send(live.commentary_append("Your order has shipped.", delegation.delegation_id))
    await client.until("session.commentary.appended")
    assert standin.context == [("commentary", "Your order has shipped.",
                                delegation.delegation_id)]
    await client.send(live.commentary_append("Stale.", "deleg_unknown"))
    assert (await client.until("error"))["error"]["param"] == "delegation_id"
    await client.send(live.function_call_output("call_1", "{}"))
    error = await client.until("error", 2)
    assert error["error"]["message"] == "response.item.create requires Responses delegation."
    await client.audio(QUIET * 40)
    await wait_until(lambda: bool(standin.spoken), what="the commentary spoken")
    assert standin.spoken[0][0] == "commentary"


async def test_every_event_kind_was_checked(connect: Connect, checker: EventChecker) -> None:
    """One session through every path: the checker saw (and passed) each kind both ways."""
    options = replace(FAST, tool_calls={1: tool_call("lookup_order", {"order_id": "1"})},
                      usage_interval_ms=500)
    client, standin = await connect(options, tools=[LOOKUP], backend_model="gpt-5-mini",
                                    history=live.history_input([("user", "hi")]))
    await client.audio(LOUD * 10 + QUIET * 15)
    await client.until("response.event", 5)
    call = next(e for e in client.decoded if isinstance(e, live.FunctionCall))
    for data in (live.function_call_output(call.call_id, "{}"), live.response_create(),
                 live.instructions_append("Greet."), live.thinking_append("t"),
                 live.commentary_append("c"), live.session_update(tools=[LOOKUP])):
        await client.send(data)
    await client.until("session.updated")
    await client.audio(LOUD * 10 + QUIET * 40)
    await client.until("session.output_transcript.delta")
    await client.send(live.session_close())
    await client.until("session.closed")
    checker.assert_clean()
    seen = {kind for _, kind in checker.seen}
    assert seen >= {
        "session.start", "session.update", "session.input_audio.append",
        "session.instructions.append", "session.thinking.append", "session.commentary.append",
        "response.item.create", "response.create", "session.close",
        "session.started", "session.updated", "session.output_audio.delta",
        "session.input_transcript.delta", "session.output_transcript.delta",
        "session.delegation.created", "response.event", "session.usage.updated",
        "session.closed", "session.instructions.appended", "session.thinking.appended",
        "session.commentary.appended"}
    assert not any(isinstance(e, live.Other) for e in client.decoded)
    assert standin.turns == 2


def test_the_wire_and_the_standin_run_without_openai() -> None:
    code = ("import sys, server.wire.live, server.testing.live_standin; "
            "sys.exit('openai' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_main_announces_the_url(monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[Any] = []
    monkeypatch.setattr("aiohttp.web.run_app", lambda app, **kw: ran.append(kw))
    lines: list[str] = []
    main(["--port", "9999", "--pace", "0"], announce=lines.append)
    assert lines == ["GPT-Live stand-in: OPENAI_LIVE_URL=ws://127.0.0.1:9999/v1/live/sessions"]
    assert ran and ran[0]["port"] == 9999
