"""The Realtime stand-in behaves like the GA service where the bridge depends on it."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from server.testing.standin import StandinOptions, StandinSession, create_standin_app, next_session

MakeServer = Callable[..., Awaitable[TestServer]]
LOUD = bytes([0x80, 0x00] * 80)
QUIET = b"\xff" * 160
PCMU_UPDATE: dict[str, Any] = {"type": "session.update", "session": {
    "type": "realtime", "audio": {
        "input": {"format": {"type": "audio/pcmu"},
                  "turn_detection": {"type": "server_vad", "silence_duration_ms": 100}},
        "output": {"format": {"type": "audio/pcmu"}, "voice": "alloy"}}}}


class Client:
    """A minimal Realtime client: send events, read server events in order."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []

    async def send(self, event: dict[str, Any]) -> None:
        await self.ws.send_str(orjson.dumps(event).decode())

    async def append(self, audio: bytes) -> None:
        await self.send({"type": "input_audio_buffer.append",
                         "audio": base64.b64encode(audio).decode()})

    async def until(self, kind: str) -> dict[str, Any]:
        """Read events up to and including the next one of this type."""
        async with asyncio.timeout(5):
            while True:
                msg = await self.ws.receive()
                assert msg.type is aiohttp.WSMsgType.TEXT, msg
                event: dict[str, Any] = orjson.loads(msg.data)
                self.events.append(event)
                if event["type"] == kind:
                    return event

    def audio(self) -> bytes:
        return b"".join(base64.b64decode(e["delta"]) for e in self.events
                        if e["type"] == "response.output_audio.delta")


@pytest.fixture
async def connect(aiohttp_server: MakeServer) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    http = aiohttp.ClientSession()

    async def open_(options: StandinOptions | None = None, headers: dict[str, str] | None = None,
                    update: bool = True) -> tuple[Client, StandinSession]:
        server = await aiohttp_server(create_standin_app(options))
        ws = await http.ws_connect(server.make_url("/v1/realtime?model=gpt-realtime"),
                                   headers=headers or {})
        client = Client(ws)
        session = await next_session(server.app)
        if update:
            await client.until("session.created")
            await client.send(PCMU_UPDATE)
            await client.until("session.updated")
        return client, session

    yield open_
    await http.close()


async def test_handshake_refusals(aiohttp_server: MakeServer) -> None:
    async with aiohttp.ClientSession() as http:
        server = await aiohttp_server(create_standin_app(StandinOptions(api_key="right")))
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
                await http.ws_connect(server.make_url("/v1/realtime"), headers=headers)
            assert caught.value.status == 401
        ws = await http.ws_connect(server.make_url("/v1/realtime"),
                                   headers={"Authorization": "Bearer right"})
        await ws.close()
        down = await aiohttp_server(create_standin_app(StandinOptions(handshake_status=503)))
        with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
            await http.ws_connect(down.make_url("/v1/realtime"))
        assert caught.value.status == 503


async def test_beta_header_is_refused(connect: Callable[..., Awaitable[Any]]) -> None:
    client, _ = await connect(headers={"OpenAI-Beta": "realtime=v1"}, update=False)
    error = await client.until("error")
    assert error["error"]["code"] == "beta_api_shape_disabled"
    msg = await client.ws.receive()
    assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 4000


async def test_unknown_session_key_rejects_the_whole_update(
    connect: Callable[..., Awaitable[Any]]
) -> None:
    client, session = await connect(update=False)
    await client.until("session.created")
    bad = {"type": "session.update", "event_id": "e1",
           "session": {**PCMU_UPDATE["session"], "temperature": 0.8}}
    await client.send(bad)
    error = await client.until("error")
    assert error["error"]["code"] == "unknown_parameter"
    assert error["error"]["param"] == "session.temperature"
    assert error["error"]["event_id"] == "e1"
    assert session.session["audio"]["input"]["format"]["type"] == "audio/pcm"  # not applied
    await client.send({"type": "session.update", "session": {"instructions": "hi"}})
    assert (await client.until("error"))["error"]["param"] == "session.type"
    await client.send(PCMU_UPDATE)
    updated = await client.until("session.updated")
    assert updated["session"]["audio"]["output"]["format"] == {"type": "audio/pcmu"}


async def test_a_turn_is_detected_and_echoed(connect: Callable[..., Awaitable[Any]]) -> None:
    client, session = await connect()
    speech = bytes(range(0x80, 0x90)) * 10 * 6  # six loud 20 ms frames, distinct bytes
    await client.append(QUIET * 2)
    await client.append(speech)
    await client.append(QUIET * 5)  # 100 ms of silence ends the turn
    started = await client.until("input_audio_buffer.speech_started")
    stopped = await client.until("input_audio_buffer.speech_stopped")
    assert started["item_id"] == stopped["item_id"]
    assert stopped["audio_end_ms"] == 160  # where the speech ended, before the silence
    committed = await client.until("input_audio_buffer.committed")
    assert committed["item_id"] == started["item_id"]
    done = await client.until("response.done")
    assert done["response"]["status"] == "completed"
    assert done["response"]["usage"]["output_token_details"]["audio_tokens"] > 0
    assert client.audio() == speech  # the echo assistant answers with the caller's turn
    assert session.audio_bytes_received == len(speech) + 7 * 160


async def test_barge_in_cancels_a_streaming_response(
    connect: Callable[..., Awaitable[Any]]
) -> None:
    client, _ = await connect(StandinOptions(pace=1.0, chunk_ms=20))
    await client.append(LOUD * 25 + QUIET * 5)
    created = await client.until("response.created")
    await client.until("response.output_audio.delta")
    await client.append(LOUD)  # the caller talks over the reply
    await client.until("input_audio_buffer.speech_started")
    done = await client.until("response.done")
    assert done["response"]["id"] == created["response"]["id"]
    assert done["response"]["status"] == "cancelled"
    assert done["response"]["status_details"]["reason"] == "turn_detected"
    assert len(client.audio()) < 25 * 160


async def test_truncate_is_checked_against_generated_audio(
    connect: Callable[..., Awaitable[Any]]
) -> None:
    client, session = await connect()
    await client.append(LOUD * 10 + QUIET * 5)
    delta = await client.until("response.output_audio.delta")
    await client.until("response.done")
    item = delta["item_id"]
    await client.send({"type": "conversation.item.truncate", "item_id": item,
                       "content_index": 0, "audio_end_ms": 201})
    error = await client.until("error")
    assert "exceeds the audio duration" in error["error"]["message"]
    await client.send({"type": "conversation.item.truncate", "item_id": item,
                       "content_index": 0, "audio_end_ms": 120})
    truncated = await client.until("conversation.item.truncated")
    assert truncated["audio_end_ms"] == 120
    await client.send({"type": "conversation.item.truncate", "item_id": "nope",
                       "content_index": 0, "audio_end_ms": 0})
    assert (await client.until("error"))["error"]["param"] == "item_id"
    assert (await session.wait_for("conversation.item.truncate", count=3))["item_id"] == "nope"


async def test_response_create_greets_and_refuses_a_second(
    connect: Callable[..., Awaitable[Any]]
) -> None:
    client, _ = await connect(StandinOptions(pace=1.0, chunk_ms=100, greeting_ms=600))
    await client.send({"type": "response.create", "response": {"instructions": "Greet"}})
    await client.until("response.created")
    await client.send({"type": "response.create"})
    error = await client.until("error")
    assert error["error"]["code"] == "conversation_already_has_active_response"
    await client.send({"type": "response.cancel"})
    done = await client.until("response.done")
    assert done["response"]["status_details"]["reason"] == "client_cancelled"
    await client.send({"type": "response.cancel"})
    assert (await client.until("error"))["error"]["code"] == "response_cancel_not_active"


async def test_bad_client_input_keeps_the_session(
    connect: Callable[..., Awaitable[Any]]
) -> None:
    client, session = await connect()
    await client.ws.send_str("{not json")
    assert (await client.until("error"))["error"]["code"] == "invalid_json"
    await client.send({"type": "input_audio_buffer.append", "audio": "***"})
    assert (await client.until("error"))["error"]["code"] == "invalid_value"
    await client.send({"type": "no.such.event"})
    assert (await client.until("error"))["error"]["code"] == "unknown_event_type"
    await client.send({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}})
    assert (await client.until("conversation.item.added"))["item"]["role"] == "user"
    assert not session.closed.is_set()


async def test_stream_mode_and_session_end(connect: Callable[..., Awaitable[Any]]) -> None:
    heard: list[bytes] = []
    frames = iter(bytes([n]) * 160 for n in range(1000))
    client, session = await connect(StandinOptions(reply="stream",
                                                   stream_frame=lambda: next(frames),
                                                   on_audio=heard.append))
    for _ in range(3):
        await client.until("response.output_audio.delta")
    assert client.audio() == bytes([0]) * 160 + bytes([1]) * 160 + bytes([2]) * 160
    await client.append(LOUD)
    await session.wait_for("input_audio_buffer.append")
    assert heard == [LOUD]
    await client.ws.close()
    await asyncio.wait_for(session.closed.wait(), 1.0)
